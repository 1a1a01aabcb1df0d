"""The file store: ``<root>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``, written atomically.

A file is written to a hidden temporary name in its final folder, fsynced, renamed over
the final name, and the folder is fsynced: after a crash a reader sees the whole old
file, the whole new one, or none, never a partial one.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

from dicom_node.errors import StorageError

TMP_PREFIX = ".tmp-"
_UID_SAFE = re.compile(r"[^0-9A-Za-z.\-]")


def sanitise_uid(uid: str) -> str:
    """A UID made safe as one path component: only digits, letters, '.' and '-' survive."""
    cleaned = _UID_SAFE.sub("_", uid.strip().rstrip("\x00"))[:64].strip(".")
    if not cleaned:
        raise ValueError(f"UID {uid!r} is empty after sanitising")
    return cleaned


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore:
    def __init__(self, root: Path, min_free_disk_mb: int = 0) -> None:
        self.root = root
        self.min_free_bytes = min_free_disk_mb * 1024 * 1024
        self.root.mkdir(parents=True, exist_ok=True)

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        return "/".join(
            (sanitise_uid(study_uid), sanitise_uid(series_uid), sanitise_uid(sop_uid) + ".dcm")
        )

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_free_space(self, incoming_bytes: int = 0) -> None:
        """Refuse before the disk fills: keep at least ``min_free_disk_mb`` free."""
        free = self.free_bytes()
        if free - incoming_bytes < self.min_free_bytes:
            raise StorageError(
                f"free disk space {free // (1024 * 1024)} MB at {self.root} is below the "
                f"configured floor of {self.min_free_bytes // (1024 * 1024)} MB "
                "(storage.min_free_disk_mb): free space or prune old series"
            )

    def write_atomic(self, relative: str, data: bytes | memoryview) -> Path:
        """Write ``data`` durably at ``relative``; replaces an existing file atomically."""
        final = self.root / relative
        folder = final.parent
        tmp = folder / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            new_dir = not folder.exists()
            folder.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
            _fsync_dir(folder)
            if new_dir:
                _fsync_dir(folder.parent)
                _fsync_dir(folder.parent.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write {final}: {exc.strerror or exc}") from exc
        return final

    def remove(self, relative: str) -> None:
        path = self.root / relative
        path.unlink(missing_ok=True)
        for parent in (path.parent, path.parent.parent):
            try:
                parent.rmdir()
            except OSError:
                break

    def sweep_temporaries(self) -> int:
        """Delete temporary files left by a crash mid-write; returns how many."""
        count = 0
        for tmp in self.root.glob(f"*/*/{TMP_PREFIX}*"):
            tmp.unlink(missing_ok=True)
            count += 1
        return count
