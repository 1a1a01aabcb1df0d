"""The one settings model for ``config.yaml``.

Loaded once by the CLI and passed down explicitly; no module reads the file itself.
Units are in the key names (``quiet_period_s``, ``min_free_disk_mb``).
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dicom_node.errors import ConfigError, validation_problems

AE_TITLE_RE = re.compile(
    r"^[\x20-\x5b\x5d-\x7e]{1,16}$"
)  # default character repertoire, no backslash


# The index's name columns (storage.models: Job.rule_name and model_name, Delivery.destination
# and resolved_peer): a longer name passed here and failed each job of it on PostgreSQL,
# which enforces VARCHAR lengths (SQLite does not). A test keeps the two equal.
NAME_LENGTH = 128
_Name = Annotated[str, Field(max_length=NAME_LENGTH)]


def _check_ae_title(value: str) -> str:
    if not AE_TITLE_RE.match(value) or not value.strip():
        raise ValueError(
            f"AE title {value!r} is invalid: use 1-16 printable ASCII characters, no backslash"
        )
    return value.strip()


class _Strict(BaseModel):
    # No .inf (or NaN): an endless interval or timeout overflows the waits and date
    # arithmetic it reaches, and ends the thread that runs it.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TLSSettings(_Strict):
    enabled: bool = False
    port: int = Field(2762, ge=1, le=65535)
    certificate: Path | None = None
    key: Path | None = None
    # Where set, the only CA trusted: for senders' certificates and for TLS peers' (send.py).
    ca_certificate: Path | None = None
    require_client_certificate: bool = True
    # OpenSSL cipher list for TLS 1.2, both directions; None: BCP 195's forward-secret AEAD
    # suites. TLS 1.3's suites are all strong and not affected.
    ciphers: str | None = None

    @field_validator("ciphers")
    @classmethod
    def _known_ciphers(cls, value: str | None) -> str | None:
        # An unknown list failed each handshake instead of the start.
        if value is not None:
            try:
                ssl.create_default_context().set_ciphers(value)
            except ssl.SSLError:
                raise ValueError(f"no cipher suite OpenSSL knows matches {value!r}") from None
        return value

    @model_validator(mode="after")
    def _files_given(self) -> TLSSettings:
        if self.enabled and (self.certificate is None or self.key is None):
            raise ValueError("tls.enabled needs tls.certificate and tls.key (PEM files)")
        if (self.certificate is None) != (self.key is None):
            # Also the client certificate to peers with tls: true; one without the other
            # would silently present none.
            raise ValueError("tls.certificate and tls.key go together: set both or neither")
        if self.enabled and self.require_client_certificate and self.ca_certificate is None:
            raise ValueError(
                "tls.require_client_certificate needs tls.ca_certificate "
                "(or set require_client_certificate: false)"
            )
        return self


class NodeSettings(_Strict):
    ae_title: str = "DICOMNODE"
    bind_address: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    max_associations: int = Field(16, ge=1, le=1000)
    max_pdu_bytes: int = Field(262144, ge=0, le=2**32 - 1)  # the PDU length field's limit
    accept_unknown_callers: bool = False
    # True: a configured peer's AE title is accepted only from the address of its `host`.
    check_caller_host: bool = False
    network_timeout_s: float = Field(60.0, gt=0)
    # Each process takes up to max_associations. More than 1 pays only with several senders
    # at once (four senders, 2 cores: 4 processes ~1.2-1.3x one, benchmarks/receive.py).
    receiver_processes: int = Field(1, ge=1, le=64)
    tls: TLSSettings = TLSSettings()

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))

    @model_validator(mode="after")
    def _sane(self) -> NodeSettings:
        if 0 < self.max_pdu_bytes < 4096:
            raise ValueError("node.max_pdu_bytes must be 0 (unlimited) or at least 4096")
        if self.tls.enabled and self.tls.port == self.port:
            raise ValueError(f"node.tls.port and node.port are both {self.port}: use two ports")
        return self


class PeerSettings(_Strict):
    name: _Name
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))


class StorageSettings(_Strict):
    data_dir: Path = Path("var")
    database_url: str | None = None  # None: SQLite at <data_dir>/index.sqlite
    min_free_disk_mb: int = Field(1024, ge=0)
    # False: files and SQLite commits are not forced to disk. Still atomic and safe against
    # a killed process; not against a power loss (what Orthanc and storescp do by default).
    fsync: bool = True
    # A C-STORE whose index row is not committed by then gets 0xA700: a hung index server
    # (stalled disk, frozen VM) otherwise holds every sender until its own DIMSE timeout.
    index_timeout_s: float = Field(20.0, gt=0.0)
    # Finished series older than this (e.g. "30d") are pruned automatically; None: never.
    retention: str | None = None
    retention_check_interval_s: float = Field(3600.0, gt=0.0)

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, value: str | None) -> str | None:
        if value:
            from sqlalchemy.engine import make_url
            from sqlalchemy.exc import ArgumentError

            try:
                backend = make_url(value).get_backend_name()
            except ArgumentError as exc:
                raise ValueError(f"not a database URL: {exc}") from exc
            if backend not in ("sqlite", "postgresql"):
                raise ValueError(
                    f"{backend!r} is not supported: use postgresql+psycopg://... or sqlite:///..."
                )
        return value

    @field_validator("retention")
    @classmethod
    def _valid_retention(cls, value: str | None) -> str | None:
        if value is not None:
            from storage.retention import parse_duration

            parse_duration(value)  # raises ValueError with the accepted forms
        return value

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'index.sqlite').resolve()}"


class CompletionSettings(_Strict):
    # At 0 every series still arriving would count as complete at each check: a SEG of
    # part of the series, and a new version for the rest.
    quiet_period_s: float = Field(30.0, ge=1.0)
    check_interval_s: float = Field(0.5, gt=0.0)
    complete_on_release_when_count_matches: bool = True


class InferenceSettings(_Strict):
    models_dir: Path | None = None  # None: <data_dir>/models
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    tile_step_size: float | None = Field(None, gt=0.0, le=1.0)  # None: the model's descriptor
    use_mirroring: bool | None = None  # None: the model's descriptor
    perform_everything_on_device: bool = True
    cpu_threads: int = Field(0, ge=0)  # 0: all cores
    # nnU-Net brings every label's scores back to the series' grid before its argmax: labels
    # x voxels x 2 bytes (TotalSegmentator `total` on a 512x512x600 CT: 37 GB). Above this,
    # they come back one label at a time: the same label map in a few volumes of memory,
    # slower by a little. 0: always so.
    scores_back_limit_mb: int = Field(2048, ge=0)


# What the SEG encoder writes (dicom_node.seg_encode.ALLOWED_COMPRESSIONS, which a test keeps
# equal; not imported here, as it loads highdicom): 1-bit BINARY frames only native or JPEG 2000.
COMPRESSIONS_BY_FORMAT: dict[str, tuple[str, ...]] = {
    "binary": ("none", "jpeg2000"),
    "labelmap": ("none", "rle", "jpegls", "jpeg2000"),
}


def image_type_value(value: str) -> str:
    """One value of Image Type (0008,0008) as a rule names it: matched without case or
    surrounding spaces. Blank, or several values joined by a backslash, it would match no
    series (and each job would fall back or the rule never fire), so it is refused."""
    text = value.strip()
    if not text:
        raise ValueError("an Image Type value cannot be blank")
    if "\\" in text:
        raise ValueError(
            f"{value!r} holds several Image Type values: name one (a rule's "
            "image_type_contains takes a list, e.g. [ORIGINAL, PRIMARY])"
        )
    return text.upper()


class OutputProfile(_Strict):
    format: Literal["binary", "labelmap"] = "binary"
    compression: Literal["none", "rle", "jpegls", "jpeg2000"] = "none"
    fallback_to_binary: bool = True  # destinations refusing Label Map SEG get BINARY
    # A series of several stacks (echoes, time points, Dixon contrasts): which one to segment.
    stack: Literal["first", "last"] = "first"
    stack_image_type: str | None = None  # e.g. W: the stack whose Image Type has this value

    @field_validator("stack_image_type")
    @classmethod
    def _one_value(cls, value: str | None) -> str | None:
        return None if value is None else image_type_value(value)

    @model_validator(mode="after")
    def _compression_fits_format(self) -> OutputProfile:
        # Refused at start: otherwise every job of the rule would fail.
        allowed = COMPRESSIONS_BY_FORMAT[self.format]
        if self.compression not in allowed:
            raise ValueError(
                f"compression {self.compression!r} cannot be used with format "
                f"{self.format!r}: use one of {', '.join(allowed)}"
            )
        return self


class RuleMatch(_Strict):
    # An empty list would match nothing (or, for image_type_contains, everything).
    modality: list[str] | None = Field(None, min_length=1)
    series_description: str | None = None  # regular expression, searched
    protocol_name: str | None = None
    image_type_contains: list[str] | None = Field(None, min_length=1)
    body_part_examined: list[str] | None = Field(None, min_length=1)
    calling_ae_title: list[str] | None = Field(None, min_length=1)
    min_images: int | None = Field(None, ge=1)
    max_images: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _count_range(self) -> RuleMatch:
        if self.min_images and self.max_images and self.min_images > self.max_images:
            raise ValueError(
                f"min_images {self.min_images} is more than max_images {self.max_images}: "
                "the rule could never match"
            )
        return self

    @field_validator("min_images", "max_images", mode="before")
    @classmethod
    def _no_yes_or_no(cls, value: object) -> object:
        # YAML's true/false: pydantic took them for 1 and 0 (true as "at least one image").
        if isinstance(value, bool):
            raise ValueError(f"give a number of images, not {str(value).lower()}")
        return value

    @field_validator("image_type_contains")
    @classmethod
    def _image_type_values(cls, values: list[str] | None) -> list[str] | None:
        return None if values is None else [image_type_value(v) for v in values]

    @field_validator("series_description", "protocol_name")
    @classmethod
    def _valid_regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {value!r}: {exc}") from exc
        return value


class RuleSettings(_Strict):
    name: _Name
    match: RuleMatch = RuleMatch()
    model: _Name
    profile: OutputProfile = OutputProfile()
    destinations: list[_Name] = ["origin"]


class DicomWebDestination(_Strict):
    name: _Name
    url: str  # the service root: STOW-RS posts to <url>/studies
    headers: dict[str, str] = {}  # sent with each request (Authorization); never logged
    # PEM CA bundle the https server's certificate is checked against, instead of the
    # public CAs (a hospital's own CA); None: the public CAs.
    ca_certificate: Path | None = None
    # A request unanswered this long fails and is retried: a hung server held the outbox.
    timeout_s: float = Field(60.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        # Otherwise each delivery would fail on it, and be retried for hours.
        parsed = urlsplit(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
        # The URL is in every failure's text (log, `deliveries list`): no secret in it.
        if parsed.username is not None or parsed.password is not None:
            raise ValueError(
                "the URL holds a user or password: put credentials in headers "
                "(Authorization: Basic <base64 of user:password>)"
            )
        if parsed.query or parsed.fragment:
            raise ValueError(
                "the URL has a query or fragment (<url>/studies is appended to it): "
                "give the service root, and tokens in headers"
            )
        return value


class WorkerSettings(_Strict):
    processes: int = Field(1, ge=0, le=64)
    job_timeout_s: float = Field(3600.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    retry_delay_s: float = Field(30.0, ge=0)
    heartbeat_timeout_s: float = Field(60.0, gt=0)
    poll_interval_s: float = Field(0.5, gt=0)


class OutboxSettings(_Strict):
    max_attempts: int = Field(10, ge=1)
    backoff_initial_s: float = Field(10.0, gt=0)
    backoff_max_s: float = Field(3600.0, gt=0)
    lease_s: float = Field(300.0, gt=0)
    poll_interval_s: float = Field(0.5, gt=0)


class LoggingSettings(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # pynetdicom's own lines (associations, every PDU and DIMSE message at DEBUG). None: as
    # ``level`` at DEBUG, else its warnings only.
    network_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] | None = None
    file: Path | None = None  # None: stderr only
    json_lines: bool = False


class MetricsSettings(_Strict):
    port: int | None = Field(None, ge=1, le=65535)  # None: no metrics endpoint
    bind_address: str = "127.0.0.1"


class Settings(_Strict):
    node: NodeSettings = NodeSettings()
    peers: list[PeerSettings] = []
    dicomweb: list[DicomWebDestination] = []
    storage: StorageSettings = StorageSettings()
    completion: CompletionSettings = CompletionSettings()
    inference: InferenceSettings = InferenceSettings()
    rules: list[RuleSettings] = []
    workers: WorkerSettings = WorkerSettings()
    outbox: OutboxSettings = OutboxSettings()
    logging: LoggingSettings = LoggingSettings()
    metrics: MetricsSettings = MetricsSettings()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        names = [p.name for p in self.peers] + [d.name for d in self.dicomweb]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes or "origin" in names:
            clashes = sorted(dupes | ({"origin"} & set(names)))
            raise ValueError(f"peer/dicomweb names must be unique and not 'origin': {clashes}")
        rule_names = [r.name for r in self.rules]
        twice = sorted({n for n in rule_names if rule_names.count(n) > 1})
        if twice:
            # Jobs are kept per (series version, rule name): two rules of one name would share.
            raise ValueError(f"rule names must be unique: {twice}")
        own = [p.name for p in self.peers if p.ae_title == self.node.ae_title]
        if own:
            # The node admits its own title only for its health check from this machine.
            raise ValueError(
                f"peers {own} have this node's own AE title {self.node.ae_title!r}: "
                "each DICOM node needs its own title; change node.ae_title or the peer's"
            )
        titles = [p.ae_title for p in self.peers]
        shared = sorted({t for t in titles if titles.count(t) > 1})
        if shared:
            # A series' results go back to the peer whose AE title sent it ("origin"): with
            # two, one device's patient would go to the other.
            raise ValueError(
                f"peers share AE titles {shared}: each device needs its own calling AE title"
            )
        known = set(names) | {"origin"}
        for rule in self.rules:
            unknown = [d for d in rule.destinations if d not in known]
            if unknown:
                raise ValueError(
                    f"rule {rule.name!r} names unknown destinations {unknown}: "
                    "add them under peers or dicomweb, or use 'origin'"
                )
            again = sorted({d for d in rule.destinations if rule.destinations.count(d) > 1})
            if again:
                raise ValueError(f"rule {rule.name!r} names destinations twice: {again}")
        listening = {self.node.port} | ({self.node.tls.port} if self.node.tls.enabled else set())
        if self.metrics.port in listening:
            raise ValueError(
                f"metrics.port {self.metrics.port} is a DICOM port of this node: use another"
            )
        return self

    @property
    def models_dir(self) -> Path:
        return self.inference.models_dir or self.storage.data_dir / "models"

    def peer_by_ae(self, ae_title: str) -> PeerSettings | None:
        for peer in self.peers:
            if peer.ae_title == ae_title.strip():
                return peer
        return None

    def peer_by_name(self, name: str) -> PeerSettings | None:
        for peer in self.peers:
            if peer.name == name:
                return peer
        return None


def load_settings(path: Path | None) -> Settings:
    """Read and validate ``config.yaml``; relative paths are taken from the file's folder."""
    if path is None:
        return Settings()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"configuration {path} is not valid YAML: {exc}") from exc
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"configuration {path} is invalid:\n{validation_problems(exc)}") from exc
    base = path.resolve().parent
    return _resolve_paths(settings, base)


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    def fix(p: Path | None) -> Path | None:
        if p is None or p.is_absolute():
            return p
        return base / p

    storage = settings.storage.model_copy(
        update={
            "data_dir": fix(settings.storage.data_dir),
            "database_url": _sqlite_file_from(settings.storage.database_url, base),
        }
    )
    inference = settings.inference.model_copy(
        update={"models_dir": fix(settings.inference.models_dir)}
    )
    tls = settings.node.tls.model_copy(
        update={
            "certificate": fix(settings.node.tls.certificate),
            "key": fix(settings.node.tls.key),
            "ca_certificate": fix(settings.node.tls.ca_certificate),
        }
    )
    node = settings.node.model_copy(update={"tls": tls})
    logging_ = settings.logging.model_copy(update={"file": fix(settings.logging.file)})
    dicomweb = [
        web.model_copy(update={"ca_certificate": fix(web.ca_certificate)})
        for web in settings.dicomweb
    ]
    return settings.model_copy(
        update={
            "storage": storage,
            "inference": inference,
            "node": node,
            "logging": logging_,
            "dicomweb": dicomweb,
        }
    )


def _sqlite_file_from(url: str | None, base: Path) -> str | None:
    """A relative SQLite file is taken from the config's folder, as every other path: from
    the working directory, a command run elsewhere would open (and create) another index."""
    if not url:
        return url
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return url
    if database.startswith("file:") or Path(database).is_absolute():
        return url
    return parsed.set(database=str(base / database)).render_as_string(hide_password=False)
