"""Label catalogues: what each integer of a model's label map means, in coded terms.

A catalogue is the project's own YAML file (``inference/catalogues/NAME.yaml`` for the shipped
ones). Each label carries the SNOMED CT codes and the colour a DICOM-SEG segment needs, so the
DICOM side never guesses meanings from label names.
"""

from __future__ import annotations

import logging
import unicodedata
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from dicom_node.errors import ModelError, validation_problems

logger = logging.getLogger(__name__)

CATALOGUE_DIR = Path(__file__).resolve().parent / "catalogues"

Colour = Annotated[list[Annotated[int, Field(ge=0, le=255)]], Field(min_length=3, max_length=3)]


def _default_repertoire(text: str) -> str:
    # The SEG writes names and meanings under the source's character set, which may be
    # none (ASCII): other characters would be invalid there (dciodvfy) or replaced by "?".
    # A backslash separates values in DICOM.
    if any(not " " <= ch <= "~" or ch == "\\" for ch in text):
        raise ValueError(
            "use ASCII letters, digits, spaces and punctuation only (no backslash): a SEG "
            "writes it in DICOM's default character set"
        )
    return text


DicomText = Annotated[str, AfterValidator(_default_repertoire)]


def to_dicom_text(text: str, max_length: int = 64) -> str:
    """``text`` made valid as ``DicomText`` of at most ``max_length`` characters: accents
    dropped (``Läsion`` -> ``Lasion``), a backslash as ``/``, other characters outside
    printable ASCII as spaces; empty when nothing of it is ASCII (``肝臓``)."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    kept = "".join("/" if ch == "\\" else ch if " " <= ch <= "~" else " " for ch in folded)
    return " ".join(kept.split())[:max_length].strip()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Code(_Strict):
    """One coded concept, as DICOM writes it: (scheme, value, meaning)."""

    scheme: DicomText = Field(min_length=1, max_length=16)
    code: DicomText = Field(min_length=1, max_length=64)
    meaning: DicomText = Field(min_length=1, max_length=64)


ANATOMICAL_STRUCTURE = Code(scheme="SCT", code="123037004", meaning="Anatomical Structure")
LEFT = Code(scheme="SCT", code="7771000", meaning="Left")
RIGHT = Code(scheme="SCT", code="24028007", meaning="Right")


class Label(_Strict):
    id: int = Field(ge=1, le=65535)
    name: DicomText = Field(min_length=1, max_length=64)
    category: Code
    type: Code
    modifier: Code | None = None
    # Where the structure lies, for types that are not anatomy themselves (a cyst in the kidney).
    anatomic_region: Code | None = None
    anatomic_region_modifier: Code | None = None
    color: Colour
    code_note: str | None = None

    @property
    def rgb(self) -> tuple[int, int, int]:
        return (self.color[0], self.color[1], self.color[2])


class Catalogue(_Strict):
    name: str = Field(min_length=1)
    description: str = ""
    source: str = ""
    labels: list[Label] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Catalogue:
        ids = [label.id for label in self.labels]
        names = [label.name for label in self.labels]
        dup_ids = sorted({i for i in ids if ids.count(i) > 1})
        dup_names = sorted({n for n in names if names.count(n) > 1})
        if dup_ids:
            raise ValueError(f"label ids must be unique; repeated: {dup_ids}")
        if dup_names:
            raise ValueError(f"label names must be unique; repeated: {dup_names}")
        return self

    @property
    def max_id(self) -> int:
        return max(label.id for label in self.labels)

    def by_id(self) -> dict[int, Label]:
        return {label.id: label for label in self.labels}

    def label(self, label_id: int) -> Label:
        try:
            return self.by_id()[label_id]
        except KeyError:
            raise KeyError(f"catalogue {self.name!r} has no label {label_id}") from None


def shipped_catalogues() -> list[str]:
    """Names of the catalogues that ship with the package."""
    return sorted(p.stem for p in CATALOGUE_DIR.glob("*.yaml"))


def resolve_catalogue_path(name_or_path: str | Path, base_dir: Path | None = None) -> Path:
    """A shipped name (``vibe``) or a path, relative paths taken from ``base_dir`` when given."""
    text = str(name_or_path)
    if isinstance(name_or_path, str) and "/" not in text and not text.endswith((".yaml", ".yml")):
        return CATALOGUE_DIR / f"{text}.yaml"
    path = Path(name_or_path)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def load_catalogue(name_or_path: str | Path, base_dir: Path | None = None) -> Catalogue:
    """Load and validate a catalogue by shipped name or YAML path.

    Raises ``ModelError`` naming the file and the problem, so a bad model descriptor is
    reported at install or start-up rather than while encoding a result.
    """
    path = resolve_catalogue_path(name_or_path, base_dir)
    if not path.is_file():
        raise ModelError(
            f"label catalogue {str(name_or_path)!r} not found (looked for {path}); "
            f"shipped catalogues: {', '.join(shipped_catalogues())}"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ModelError(f"label catalogue {path} cannot be read: {exc}") from exc
    return parse_catalogue(raw, origin=str(path))


def parse_catalogue(raw: object, origin: str = "<data>") -> Catalogue:
    try:
        return Catalogue.model_validate(raw)
    except ValidationError as exc:
        problems = validation_problems(exc)
        raise ModelError(f"label catalogue {origin} is invalid:\n{problems}") from exc


def dump_catalogue(catalogue: Catalogue) -> str:
    """YAML text of a catalogue, in the same layout ``load_catalogue`` reads."""
    data = catalogue.model_dump(mode="json", exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)
