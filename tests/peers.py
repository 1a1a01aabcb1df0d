"""Real peers for tests: the node as a subprocess, DCMTK tools, Orthanc, generated series.

Everything listens on free loopback ports, is started by the test and stopped by its own
PID (or its own process group). Readiness is polled, never slept for.
Imported by ``conftest.py`` and by ``benchmarks/``; the module has no pytest fixtures.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import psutil
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
SHARED_DATA = SHARED_DIR / "data"
VENV_BIN = REPO_ROOT / ".venv" / "bin"
DICOM_NODE = VENV_BIN / "dicom-node"

# DCMTK explicitly: the venv's pynetdicom puts its own storescu/echoscu first on PATH.
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
STORESCP = "/usr/bin/storescp"
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
ORTHANC_DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"

SCU_AET = "STORESCU"  # the calling AE title NodeProcess accepts by default
NODE_AET = "DICOMNODE"

T = TypeVar("T")


class PeerUnavailable(RuntimeError):
    """A binary or data set a test needs is absent; conftest turns this into a skip."""


# -- small utilities ---------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_binary(path: str | Path) -> str:
    """Return ``path`` if it is an executable, else raise :class:`PeerUnavailable`."""
    text = str(path)
    if not (os.path.isfile(text) and os.access(text, os.X_OK)):
        raise PeerUnavailable(f"{text} is not installed (see ../shared/PEERS.md, Install)")
    return text


def wait_until(
    predicate: Callable[[], T | None],
    *,
    timeout_s: float = 60.0,
    interval_s: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns a truthy value; return it, or fail on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def deep_merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``overrides`` merged in (nested dicts merged, the rest replaced)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK/Orthanc: TCP_NODELAY=1 avoids the 45 ms Nagle trap."""
    return {**os.environ, "TCP_NODELAY": "1"}


# -- DCMTK command-line tools --------------------------------------------------------------


@contextlib.contextmanager
def listening(command: Sequence[str], port: int, what: str, **popen: Any) -> Iterator[int]:
    """``command`` started (output discarded) until the block ends; yields ``port`` once it
    accepts connections."""
    server = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen
    )
    try:
        wait_until(lambda: port_open(port), timeout_s=10, what=f"{what} listening")
        yield port
    finally:
        server.terminate()
        server.wait(timeout=10)


@contextlib.contextmanager
def storescp_to(folder: Path, *args: str) -> Iterator[int]:
    """DCMTK storescp (AE PACS) writing what it receives to ``folder``, with extra arguments
    (e.g. ``+tls``: its default profile is BCP 195's); yields its port."""
    port = free_port()
    folder.mkdir(parents=True)
    command = [require_binary(STORESCP), "-aet", "PACS", *args, "-od", str(folder), str(port)]
    with listening(command, port, "storescp", env=dcmtk_env()) as listening_port:
        yield listening_port


def echoscu(
    port: int,
    *,
    aet: str = SCU_AET,
    aec: str = NODE_AET,
    extra_args: Sequence[str] = (),
    timeout_s: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    cmd = [
        require_binary(ECHOSCU),
        "-aet",
        aet,
        "-aec",
        aec,
        "-to",
        "20",
        *extra_args,
        "127.0.0.1",
        str(port),
    ]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=timeout_s, check=False
    )


def storescu_command(
    port: int,
    paths: Iterable[str | Path],
    *,
    aet: str = SCU_AET,
    aec: str = NODE_AET,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """``storescu +sd +r`` (directories are scanned recursively), proposing Explicit VR LE
    first (``-xe``) so uncompressed files arrive in the syntax they were written in."""
    return [
        require_binary(STORESCU),
        "+sd",
        "+r",
        "-xe",
        "-aet",
        aet,
        "-aec",
        aec,
        "-to",
        "30",
        *extra_args,
        "127.0.0.1",
        str(port),
        *(str(p) for p in paths),
    ]


def storescu(
    port: int,
    paths: Iterable[str | Path],
    *,
    aet: str = SCU_AET,
    aec: str = NODE_AET,
    extra_args: Sequence[str] = (),
    timeout_s: float = 300.0,
) -> subprocess.CompletedProcess[str]:
    cmd = storescu_command(port, paths, aet=aet, aec=aec, extra_args=extra_args)
    return subprocess.run(
        cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=timeout_s, check=False
    )


def storescu_background(
    port: int, paths: Iterable[str | Path], log_path: Path
) -> subprocess.Popen[bytes]:
    """``storescu -v`` sending in the background, its output (for ``acknowledged_files``) in
    ``log_path``; the caller waits for or kills it."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            storescu_command(port, paths, extra_args=["-v"]),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dcmtk_env(),
        )


def acknowledged_files(storescu_output: str) -> list[str]:
    """Files storescu (run with ``-v``) saw acknowledged with status Success.

    storescu -v prints ``Sending file: PATH`` ... ``Received Store Response (Success)``.
    """
    acked: list[str] = []
    current: str | None = None
    for line in storescu_output.splitlines():
        text = line.split(": ", 1)[-1] if line.startswith(("I:", "W:", "E:", "D:")) else line
        if text.startswith("Sending file: "):
            current = text[len("Sending file: ") :].strip()
        elif "Received Store Response" in text and current is not None:
            if "(Success)" in text:
                acked.append(current)
            current = None
    return acked


def refused_files(storescu_output: str) -> list[tuple[str, str]]:
    """(file, response line) for every response storescu -v printed that was not Success."""
    refused: list[tuple[str, str]] = []
    current: str | None = None
    for line in storescu_output.splitlines():
        text = line.split(": ", 1)[-1] if line.startswith(("I:", "W:", "E:", "D:")) else line
        if text.startswith("Sending file: "):
            current = text[len("Sending file: ") :].strip()
        elif "Received Store Response" in text and current is not None:
            if "(Success)" not in text:
                refused.append((current, text))
            current = None
    return refused


# -- generated series ----------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratedSeries:
    folder: Path
    paths: list[Path]
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: list[str]
    series_description: str

    def __len__(self) -> int:
        return len(self.paths)


def make_mr_series(
    folder: Path,
    count: int,
    *,
    size: int = 64,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    series_description: str = "generated MR",
    first_instance_number: int = 1,
    patient_id: str = "GEN-001",
    seed: int = 0,
) -> GeneratedSeries:
    """Write ``count`` MR Image Storage files (``size`` x ``size`` uint16, Explicit VR LE),
    axial slices 2 mm apart, into ``folder``; one file per instance named by its number."""
    folder.mkdir(parents=True, exist_ok=True)
    study = study_instance_uid or generate_uid()
    series = series_instance_uid or generate_uid()
    frame_of_reference = generate_uid()
    rng = np.random.default_rng(seed)
    base = (np.add.outer(np.arange(size), np.arange(size)) * 7).astype(np.uint16)
    paths: list[Path] = []
    uids: list[str] = []
    for i in range(count):
        number = first_instance_number + i
        sop = generate_uid()
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240517"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
        ds.AccessionNumber = "ACC-GEN"
        ds.Modality = "MR"
        ds.Manufacturer = "dicom-node tests"
        ds.ReferringPhysicianName = ""
        ds.PatientName = "Generated^Series"
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyDescription = "generated study"
        ds.SeriesDescription = series_description
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.StudyID = "1"
        ds.SeriesNumber = 3
        ds.InstanceNumber = number
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.ImagePositionPatient = [-64.0, -64.0, 2.0 * (number - 1)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 2.0
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = size
        ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        noise = rng.integers(0, 64, size=(size, size), dtype=np.uint16)
        ds.PixelData = (base + noise + number).astype(np.uint16).tobytes()
        path = folder / f"IM{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        uids.append(sop)
    return GeneratedSeries(folder, paths, study, series, uids, series_description)


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its File Meta Information group."""
    data = path.read_bytes()
    if data[128:132] != b"DICM":
        raise ValueError(f"{path} is not a DICOM Part 10 file")
    # (0002,0000) FileMetaInformationGroupLength, explicit VR UL: value at offset 140.
    if data[132:136] != b"\x02\x00\x00\x00":
        raise ValueError(f"{path} has no File Meta Information Group Length")
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length :]


# -- the node as a subprocess -------------------------------------------------------------


class NodeProcess:
    """``dicom-node -c CONFIG serve`` in its own process group, with a config in ``workdir``.

    ``overrides`` are deep-merged into the generated config. The default config listens on
    127.0.0.1 on a free port, accepts calling AE ``STORESCU`` (``peers``), keeps data in
    ``workdir/data``, runs no workers, and has no free-space floor.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        ae_title: str = NODE_AET,
        peers: list[dict[str, Any]] | None = None,
        quiet_period_s: float = 2.0,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        if peers is None:
            peers = [{"name": "scu", "ae_title": SCU_AET, "host": "127.0.0.1", "port": 104}]
        config: dict[str, Any] = {
            "node": {
                "ae_title": ae_title,
                "bind_address": "127.0.0.1",
                "port": self.port,
                "network_timeout_s": 30,
            },
            "peers": peers,
            # relative to the config's folder, as an operator would write it
            "storage": {"data_dir": "data", "min_free_disk_mb": 0},
            "completion": {"quiet_period_s": quiet_period_s, "check_interval_s": 0.5},
            "workers": {"processes": 0},
            "rules": [],
            "logging": {"level": "INFO"},
        }
        self.config = deep_merge(config, overrides or {})
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.log_path = workdir / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    # -- paths and config ------------------------------------------------------------------
    @property
    def ae_title(self) -> str:
        return str(self.config["node"]["ae_title"])

    def relative(self, path: Path) -> str:
        """``path`` relative to the config's folder (how paths are written into the config)."""
        return os.path.relpath(path, self.workdir)

    @property
    def data_dir(self) -> Path:
        return self.workdir / self.config["storage"]["data_dir"]

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"

    @property
    def index_path(self) -> Path:
        return self.data_dir / "index.sqlite"

    @property
    def tls_port(self) -> int | None:
        tls = self.config["node"].get("tls") or {}
        return int(tls["port"]) if tls.get("enabled") else None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the node is not running")
        return self.proc.pid

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, *, timeout_s: float = 90.0) -> NodeProcess:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("the node is already running")
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"---- start {self.starts} ----\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [str(DICOM_NODE), "-c", str(self.config_path), "serve"],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: receiver children too
            )
        self.wait_ready(timeout_s=timeout_s)
        return self

    def wait_ready(self, *, timeout_s: float = 90.0) -> None:
        """Poll until the node answers a C-ECHO (or, if no caller is allowed, accepts TCP)."""
        proc = self.proc
        assert proc is not None

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"dicom-node exited with {proc.returncode} while starting:\n{self.log_text()}"
                )
            if not port_open(self.port):
                return False
            if self.tls_port is not None and not port_open(self.tls_port):
                return False
            return self._echo_ok()

        wait_until(ready, timeout_s=timeout_s, interval_s=0.1, what=f"dicom-node on {self.port}")

    def _echo_ok(self) -> bool:
        peers = self.config.get("peers") or []
        if self.config["node"].get("accept_unknown_callers"):
            calling = "ANY-SCU"
        elif peers:
            calling = str(peers[0]["ae_title"])
        else:
            return True  # nobody may associate: an open port is all we can check
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=calling)
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
        assoc = ae.associate("127.0.0.1", self.port, ae_title=self.ae_title)
        try:
            if not assoc.is_established:
                return False
            status = assoc.send_c_echo()
            return bool(status) and int(status.Status) == 0
        finally:
            if assoc.is_established:
                assoc.release()
            ae.shutdown()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout_s: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def stop(self, *, timeout_s: float = 60.0) -> int | None:
        """SIGTERM the node's PID and wait; SIGKILL its process group on timeout.

        Returns the exit code (``None`` when it was not running)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._kill_group()
                proc.wait(timeout=30)
        self._kill_group()  # receiver children left behind, if any
        return proc.returncode

    def kill9(self) -> None:
        """Crash the node: SIGKILL every process of its group (main, receivers, workers)
        but multiprocessing's resource tracker, as when the kernel kills a crashed node.

        The tracker outlives the node and unlinks the named semaphores (/dev/shm/sem.mp-*)
        of its Events and Values, as it does after a real crash; killed with the rest, it
        left a dozen behind per test (a power loss empties /dev/shm anyway).
        """
        assert self.proc is not None
        tracker: psutil.Process | None = None
        for process in self._group():
            with contextlib.suppress(psutil.Error):
                if any("resource_tracker" in part for part in process.cmdline()):
                    tracker = process
                    continue
                process.kill()
        self.proc.wait(timeout=30)
        if tracker is not None:
            with contextlib.suppress(psutil.Error):
                tracker.wait(timeout=10)  # it exits once every process it served is gone
        self._kill_group()  # anything that was starting meanwhile, and a tracker that hung

    def _group(self) -> list[psutil.Process]:
        assert self.proc is not None
        members = []
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(process.pid) == self.proc.pid:
                    members.append(process)
        return members

    def _kill_group(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def restart(self, *, timeout_s: float = 90.0) -> NodeProcess:
        self.stop()
        return self.start(timeout_s=timeout_s)

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- observing ---------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, *, timeout_s: float = 30.0) -> str:
        """Poll the log until a line contains ``text``; returns that line."""

        def find() -> str | None:
            for line in self.log_text().splitlines():
                if text in line:
                    return line
            return None

        return wait_until(find, timeout_s=timeout_s, interval_s=0.1, what=f"log line {text!r}")

    def cli(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(DICOM_NODE), "-c", str(self.config_path), *args],
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def cli_json(self, *args: str) -> Any:
        result = self.cli(*args, "--json")
        if result.returncode != 0:
            raise RuntimeError(
                f"dicom-node {' '.join(args)} exited {result.returncode}: {result.stderr}"
            )
        return json.loads(result.stdout)

    def series_json(self) -> list[dict[str, Any]]:
        """``dicom-node series list --json``."""
        data = self.cli_json("series", "list")
        assert isinstance(data, list)
        return data

    def series_show(self, series_uid: str) -> dict[str, Any]:
        """``dicom-node series show UID --json``."""
        data = self.cli_json("series", "show", series_uid)
        assert isinstance(data, dict)
        return data

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Read the SQLite index directly (read-only connection)."""
        if not self.index_path.exists():
            return []
        conn = sqlite3.connect(f"file:{self.index_path}?mode=ro", uri=True, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            return list(conn.execute(sql, params))
        finally:
            conn.close()

    def query_rows(self, sql: str) -> list[dict[str, Any]]:
        """Rows of ``sql`` (no parameters) from the node's index, SQLite or PostgreSQL."""
        url = self.config.get("storage", {}).get("database_url")
        if not url:
            return [dict(row) for row in self.query(sql)]
        from sqlalchemy import create_engine

        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                return [dict(row._mapping) for row in conn.exec_driver_sql(sql)]
        finally:
            engine.dispose()

    def instance_rows(self, series_uid: str | None = None) -> list[sqlite3.Row]:
        sql = (
            "SELECT i.*, s.series_instance_uid, s.modality, s.series_description "
            "FROM instances i JOIN series s ON i.series_pk = s.id"
        )
        if series_uid is None:
            return self.query(sql)
        return self.query(sql + " WHERE s.series_instance_uid = ?", (series_uid,))

    def stored_files(self) -> list[Path]:
        return sorted(self.store_dir.rglob("*.dcm")) if self.store_dir.exists() else []

    def relative_to_store(self, path: Path) -> str:
        """How the index and ``store check`` name a file: relative to the store folder."""
        return path.relative_to(self.store_dir).as_posix()

    def temporary_files(self) -> list[Path]:
        return sorted(self.store_dir.rglob(".tmp-*")) if self.store_dir.exists() else []


# -- Orthanc -----------------------------------------------------------------------------------


class Orthanc:
    """Orthanc in the foreground (``TCP_NODELAY=1 Orthanc CONFIG.json``), on free ports."""

    # Sent with each of the tests' REST calls (a login, where authentication is enabled).
    rest_headers: Mapping[str, str] = {}

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, Mapping[str, Any]] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.http_port = free_port()
        self.dicom_port = free_port()
        config: dict[str, Any] = {
            "Name": "dicom-node-tests",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": True,
            "OverwriteInstances": True,
            "StableAge": 2,
            "DicomModalities": {name: dict(value) for name, value in (modalities or {}).items()},
            "Plugins": [ORTHANC_DICOMWEB_PLUGIN] if os.path.exists(ORTHANC_DICOMWEB_PLUGIN) else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpServerEnabled": True,
            "StorageCompression": False,
        }
        self.config = deep_merge(config, extra or {})
        self.config_path = workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(self.config, indent=2))
        self.log_path = workdir / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, *, timeout_s: float = 90.0) -> Orthanc:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [require_binary(ORTHANC), str(self.config_path)],
                cwd=self.workdir,
                env=dcmtk_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {proc.returncode}:\n"
                    + self.log_path.read_text(errors="replace")[-3000:]
                )
            try:
                self.get_json("/system")
            except (OSError, urllib.error.URLError):
                return False
            return True

        wait_until(ready, timeout_s=timeout_s, interval_s=0.1, what="Orthanc /system")
        return self

    def stop(self, *, timeout_s: float = 30.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(OSError, urllib.error.URLError):
            self.request("POST", "/tools/shutdown", b"")
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- REST ----------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        content_type: str = "application/json",
        timeout_s: float = 300.0,
    ) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        for name, value in self.rest_headers.items():
            req.add_header(name, value)
        if body is not None:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=timeout_s) as response:
            return bytes(response.read())

    def get_json(self, path: str) -> Any:
        return json.loads(self.request("GET", path, timeout_s=10))

    def post_json(self, path: str, payload: Any) -> Any:
        return json.loads(self.request("POST", path, json.dumps(payload).encode()))

    def upload(self, path: Path) -> str:
        """``POST /instances`` one file; returns the Orthanc instance id."""
        answer = json.loads(
            self.request("POST", "/instances", path.read_bytes(), content_type="application/dicom")
        )
        return str(answer["ID"])

    def instances(self) -> list[str]:
        return list(self.get_json("/instances"))

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        return dict(self.get_json(f"/instances/{instance_id}/simplified-tags"))

    def get_file(self, instance_id: str) -> bytes:
        return self.request("GET", f"/instances/{instance_id}/file")

    def store_to_modality(self, modality: str, resources: Sequence[str]) -> Any:
        """``POST /modalities/NAME/store`` (synchronous C-STORE from Orthanc)."""
        return self.post_json(
            f"/modalities/{modality}/store", {"Resources": list(resources), "Synchronous": True}
        )


# -- TLS material -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(folder: Path) -> TlsFiles:
    """A CA, a server certificate (CN/SAN 127.0.0.1) and a client certificate, with openssl."""
    openssl = require_binary(OPENSSL)
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.pem",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    for name, cn, ext in (
        ("server", "127.0.0.1", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "STORESCU", "extendedKeyUsage=clientAuth"),
    ):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")  # fmt: skip
        (folder / f"{name}.ext").write_text(ext + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.pem",
            "-extfile", f"{name}.ext")  # fmt: skip
    return TlsFiles(
        ca_cert=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
    )


def series_versions(node: NodeProcess, series_uid: str) -> list[sqlite3.Row]:
    """The series' versions straight from the index (cheap to poll; no subprocess)."""
    return node.query(
        "SELECT v.version, v.state, v.instance_count FROM series_versions v "
        "JOIN series s ON v.series_pk = s.id WHERE s.series_instance_uid = ? ORDER BY v.version",
        (series_uid,),
    )


def wait_series_complete(
    node: NodeProcess, series_uid: str, *, count: int, version: int = 1, timeout_s: float = 60.0
) -> None:
    """Poll the index until ``version`` of the series is complete with ``count`` instances."""

    def done() -> bool:
        return any(
            row["version"] == version
            and row["state"] == "complete"
            and row["instance_count"] == count
            for row in series_versions(node, series_uid)
        )

    wait_until(done, timeout_s=timeout_s, interval_s=0.2, what=f"series {series_uid} complete")
