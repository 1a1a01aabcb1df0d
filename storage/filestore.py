"""The file store: ``<root>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``, written atomically.

A file is written to a hidden temporary name in its final folder, fdatasynced, renamed over
the final name, and the folder is fsynced: after a crash a reader sees the whole old
file, the whole new one, or none, never a partial one.

With ``fsync=False`` (``storage.fsync: false``) the rename stays atomic but nothing is
forced to disk: a killed process loses nothing (the page cache survives it), a power loss
may lose the latest files, as with Orthanc and DCMTK's storescp.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import psutil

from dicom_node.errors import StorageError

TMP_PREFIX = ".tmp-"
# A temporary's name says who writes it (".tmp-<host>~<pid>~<namespace>~<random>"), so a
# sweep takes only what no running process will rename: a store shared by several machines
# (workers on one index), containers with one hostname (each may run the node as pid 1), or
# a receiver process replaced while the others write on.
_HOST = re.sub(r"[^0-9A-Za-z.\-]", "-", socket.gethostname()) or "host"
# A temporary (or removal record) this old is abandoned whoever wrote it: no write (or
# removal of one series) takes this long.
STALE_TMP_S = 3600.0
RESULTS_DIR = "results"  # <root>/results/<job id>/: the SEGs the node made
# <root>/.removing/<id>.json: the files a prune or delete removes after its commit, until
# they are gone. Left by a crash, it tells store check those files are not lost images.
REMOVING_DIR = ".removing"
# <folder>/.removing-<record id>-<name>: an image a removal took from its path before its
# commit (``take_aside``), until the commit (then it goes) or a rollback (then it is back).
ASIDE_PREFIX = ".removing-"
# Patient images, SEGs and their folders: the service's user and its group (administrators
# added to it), never every local user. The umask may narrow these further, not widen them.
FILE_MODE = 0o640
FOLDER_MODE = 0o750
_UID_SAFE = re.compile(r"[^0-9A-Za-z.\-]")
# Used as they are: at most 64 safe characters, no '_' (a digest name has one).
_UID_PLAIN = re.compile(r"[0-9A-Za-z\-]([0-9A-Za-z.\-]{0,62}[0-9A-Za-z\-])?")
_UID_MAX = 64


def sanitise_uid(uid: str) -> str:
    """A UID made safe as one path component, and distinct for distinct UIDs.

    A valid UID (digits and dots, at most 64 characters) is its own name. Anything else
    devices send (longer, or with characters a path cannot hold) keeps its safe characters
    and gets a digest of the UID as sent: two such UIDs that clean up alike would otherwise
    share a file, and the second image would overwrite the first one acknowledged.
    """
    stripped = uid.strip().rstrip("\x00")
    if not stripped:
        raise ValueError(f"UID {uid!r} is empty")
    if _UID_PLAIN.fullmatch(stripped) and stripped != RESULTS_DIR:
        # The store's own folder is not a study's: an image of Study "results", Series "7"
        # lay in job 7's results folder, removed as an earlier result when the job ran.
        return stripped
    cleaned = _UID_SAFE.sub("_", stripped).strip(".")
    digest = hashlib.sha256(stripped.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{cleaned[: _UID_MAX - 17]}_{digest}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore:
    def __init__(self, root: Path, min_free_disk_mb: int = 0, *, fsync: bool = True) -> None:
        self.root = root
        self.min_free_bytes = min_free_disk_mb * 1024 * 1024
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True, mode=FOLDER_MODE)

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

    def write_atomic(self, relative: str, *parts: bytes | memoryview) -> Path:
        """Write ``parts`` durably at ``relative``; replaces an existing file atomically."""
        final, folders = self.write_file(relative, *parts)
        self.sync_folders(folders)
        return final

    def write_file(
        self, relative: str, *parts: bytes | memoryview
    ) -> tuple[Path, tuple[Path, ...]]:
        """Write ``parts``, one after the other, to disk and rename them into place at ``relative``.

        Returns the file and the folders whose entries changed: the rename is durable only
        after ``sync_folders`` on them, which ``write_atomic`` does next.
        """
        final = self.root / relative
        folder = final.parent
        tmp = folder / temporary_name()
        folders: tuple[Path, ...] = (folder,)
        try:
            if not folder.is_dir():
                # A new series (and maybe study) folder: its own entry must be durable too.
                folders = (folder, folder.parent)
                if not folder.parent.is_dir():
                    folders = (folder, folder.parent, folder.parent.parent)
                _make_folders(folder)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            try:
                for part in parts:  # written in turn: no joined copy of a large image
                    view = memoryview(part)
                    while view:
                        view = view[os.write(fd, view) :]
                if self.fsync:
                    # The data and its size, not the timestamps: what a reader needs.
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write {final}: {exc.strerror or exc}") from exc
        return final, folders

    def sync_folders(self, folders: Iterable[Path]) -> None:
        """Make renames and new entries in ``folders`` durable (each fsynced once)."""
        if not self.fsync:
            return
        for folder in dict.fromkeys(folders):
            try:
                _fsync_dir(folder)
            except OSError as exc:
                raise StorageError(f"cannot sync folder {folder}: {exc.strerror or exc}") from exc

    def remove(self, relative: str) -> None:
        path = self.root / relative
        path.unlink(missing_ok=True)
        _remove_empty_folders(path)

    def inode(self, relative: str) -> int | None:
        """The file's inode number (which file it is), or None when it is missing."""
        try:
            return (self.root / relative).stat().st_ino
        except OSError:
            return None

    def remove_unchanged(self, relative: str, inode: int) -> bool:
        """Remove the file if it is still the one with ``inode``; False, and the file left in
        place, when it is another: an image sent again since and written there (it is
        renamed into place, so it has a new inode), which its new row will name.

        Another file is not moved at all: renamed aside to look, then back, it was under a
        temporary's name meanwhile, which a kill -9 then left to the next start's sweep
        (an acknowledged copy lost), and its own store's check found it gone. The file is
        renamed aside (a temporary's name: a crash leaves it to the sweep) before it goes,
        so a copy renamed there after the look is never the one removed.
        """
        path = self.root / relative
        try:
            if path.stat().st_ino != inode:
                return False
        except FileNotFoundError:
            return False
        aside = path.parent / temporary_name()
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        if aside.stat().st_ino != inode:
            # Not ours: put it back, unless an even newer copy has been written there.
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
            aside.unlink()
            return False
        aside.unlink()
        _remove_empty_folders(path)
        return True

    def begin_removal(self, images: list[tuple[str, int]], results: list[str]) -> str:
        """Record, durably, the files about to be removed (images with their inodes, and
        result files); returns the record's path, for ``end_removal`` once they are gone.

        The record names its owner, this process: another node starting on the shared store
        meanwhile must leave it alone (``pending_removals(abandoned_only=True)``).
        """
        record = f"{REMOVING_DIR}/{uuid.uuid4().hex}.json"
        owner = {"host": _HOST, "pid": os.getpid(), "namespace": namespace_token()}
        content = {"owner": owner, "images": images, "results": results}
        self.write_atomic(record, json.dumps(content).encode())
        return record

    def take_aside(self, record: str, images: Iterable[str]) -> None:
        """Move a removal's images from their paths (to ``aside_path``) before it commits.

        A copy of one sent again meanwhile (its row waits for the removal's locks) is
        taken too, and its receiver, finding its file gone before its own commit, refuses
        it (``WrittenFile.check_still_there``). Removed after the commit, by the inode read
        before it, that copy went although its row committed and it was acknowledged.
        """
        for relative in images:
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.root / relative, self.root / aside_path(record, relative))

    def settle_aside(self, record: str, relative: str, *, named: bool) -> bool:
        """End an image ``take_aside`` moved: back at its path when a row still names it
        (the removal did not commit) and no newer copy took the path, else removed.
        Returns whether there was one."""
        aside = aside_path(record, relative)
        if not (self.root / aside).exists():
            return False
        if named:
            with contextlib.suppress(FileExistsError):  # a newer copy is there: it stays
                os.link(self.root / aside, self.root / relative)
                self.sync_folders([(self.root / relative).parent])
        self.remove(aside)
        return True

    def end_removal(self, record: str) -> None:
        path = self.root / record
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # another removal's record is still there
            path.parent.rmdir()

    def pending_removals(
        self, *, abandoned_only: bool = False
    ) -> dict[str, tuple[list[tuple[str, int]], list[str]]]:
        """Removals under way or that a crash interrupted: record -> (images with inodes,
        result files).

        ``abandoned_only``: only those whose owner no longer runs (as ``sweep_temporaries``
        judges a temporary's writer), which another process may finish. A removal under way
        in another process or on another machine sharing the store is its owner's to end:
        finished before its delete committed, its files stayed (their rows still named them)
        and its record went, so a crash of the owner after the commit left files that
        neither a row nor a record named, taken for lost images by ``store check``.
        """
        pending = {}
        now = time.time()
        booted = psutil.boot_time()
        for file in sorted((self.root / REMOVING_DIR).glob("*.json")):
            try:
                data = json.loads(file.read_text())
                images = [(str(path), int(inode)) for path, inode in data["images"]]
                results = [str(path) for path in data["results"]]
                written = file.stat().st_mtime
            except FileNotFoundError:
                continue  # ended meanwhile
            except (OSError, ValueError, KeyError, TypeError):
                continue  # unreadable: its files are then judged as any others
            if abandoned_only and not _removal_abandoned(data.get("owner"), written, now, booted):
                continue
            pending[f"{REMOVING_DIR}/{file.name}"] = (images, results)
        return pending

    def result_path(self, job_id: int, name: str) -> str:
        """Where a job's output file ``name`` goes, relative to the root."""
        return f"{RESULTS_DIR}/{job_id}/{name}"

    def job_results(self, job_id: int) -> list[str]:
        """Every file in a job's results folder (its SEG, a BINARY fallback), relative."""
        folder = self.root / RESULTS_DIR / str(job_id)
        if not folder.is_dir():
            return []
        return [self.result_path(job_id, f.name) for f in sorted(folder.iterdir())]

    def sweep_temporaries(self, pid: int | None = None) -> int:
        """Delete temporary files left by a crash mid-write; returns how many.

        ``pid``: only those of that (dead) process of this machine. Otherwise (before this
        process writes) every one whose writer is gone: this process, a process of this
        machine no longer running, a writer before the last boot (its pid may be reused),
        an unnamed one (older versions), or one older than ``STALE_TMP_S``. Those of
        another live writer (a worker, another machine) stay.
        """
        count = 0
        now = time.time()
        booted = psutil.boot_time()
        for tmp in self.root.glob(f"*/*/{TMP_PREFIX}*"):
            owner = _tmp_owner(tmp.name)
            if pid is not None:
                abandoned = owner is not None and _is_here(owner, pid)
            elif owner is None or _is_here(owner, os.getpid()):
                abandoned = True
            else:
                try:
                    written = tmp.stat().st_mtime
                except FileNotFoundError:  # renamed into place meanwhile
                    continue
                abandoned = _writer_gone(*owner[:2], written, now, booted, owner[2])
            if abandoned:
                tmp.unlink(missing_ok=True)
                count += 1
        return count


def temporary_name(
    pid: int | None = None, host: str | None = None, namespace: str | None = None
) -> str:
    """A fresh temporary's name, owned by ``pid`` on ``host`` in PID ``namespace``
    (default: this process)."""
    space = namespace_token() if namespace is None else namespace
    owner = f"{host or _HOST}~{os.getpid() if pid is None else pid}~{space}"
    return f"{TMP_PREFIX}{owner}~{uuid.uuid4().hex}"


def aside_path(record: str, relative: str) -> str:
    """Where the removal ``record`` keeps the image at ``relative`` until it commits."""
    folder, _, name = relative.rpartition("/")
    aside = f"{ASIDE_PREFIX}{PurePosixPath(record).stem}-{name}"
    return f"{folder}/{aside}" if folder else aside


@dataclass(frozen=True)
class WrittenFile:
    """A file a receiver wrote and renamed into place, and its inode."""

    path: Path
    inode: int

    @classmethod
    def of(cls, path: Path) -> WrittenFile:
        try:
            return cls(path, path.stat().st_ino)
        except FileNotFoundError:
            raise TakenByRemoval(path) from None

    def check_still_there(self) -> None:
        """Raise unless the file is still at its path: TakenByRemoval when a removal of its
        series (``FileStore.take_aside``) took it since, ReplacedMeanwhile when another copy
        of the same image (another association's) was renamed over it."""
        try:
            inode = self.path.stat().st_ino
        except FileNotFoundError:
            raise TakenByRemoval(self.path) from None
        if inode != self.inode:
            raise ReplacedMeanwhile(self.path)


class TakenByRemoval(StorageError):
    """A received image's file was removed before its row committed: by a removal of its
    series, or by the store of this image under another series, which removes the image's
    earlier file. The image is not stored (the sender is told to send it again)."""

    def __init__(self, path: Path) -> None:
        # The outcome first: a C-STORE response's Error Comment keeps 64 characters.
        super().__init__(
            "file removed as it was stored: not stored, send it again (taken by a prune or "
            f"series delete, or by this image stored again under another series; {path.name})"
        )


class ReplacedMeanwhile(StorageError):
    """Another copy of the same image (same SOP Instance UID, another association) was
    renamed over a received image's file before its row committed: that copy's row names
    the file; this one is not stored (the sender is told to send it again)."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            "replaced by another copy of this image stored at the same moment: not stored, "
            f"send it again ({path.name})"
        )


def _make_folders(folder: Path) -> None:
    """``folder`` and its missing parents, each ``FOLDER_MODE`` (``Path.mkdir(parents=True)``
    makes the parents with the default mode)."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for each in reversed(missing):
        each.mkdir(mode=FOLDER_MODE, exist_ok=True)  # another writer may have made it


def _remove_empty_folders(path: Path) -> None:
    """The series and study folders of a removed file, once empty."""
    for parent in (path.parent, path.parent.parent):
        try:
            parent.rmdir()
        except OSError:
            break


@functools.cache
def namespace_token() -> str:
    """What tells this process's PID namespace and boot from every other: containers with
    one hostname (``docker --network host``, a ``hostname:`` set alike in compose) each
    count their PIDs from 1, so ``host:pid`` alone named processes of two of them alike
    (a worker's identity, a removal record's owner). Empty where /proc does not say (not
    Linux): identities are ``host:pid`` there."""
    parts: list[str] = []
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12] if parts else ""


def _writer_gone(
    host: str,
    pid: int,
    written: float,
    now: float,
    booted: float,
    namespace: str | None = None,
) -> bool:
    """Whether the process ``pid`` of ``host`` that wrote a file at ``written`` no longer
    runs: the file is stale, or the process was of this machine and ran before its last
    boot or has ended. ``namespace``: its PID namespace and boot, where known; a process of
    another one (a container) may run on, unseen from here, until the file is stale."""
    if now - written > STALE_TMP_S:
        return True
    if host != _HOST or namespace not in (None, namespace_token()):
        # Another machine, or another container or machine of this hostname: its
        # processes and boot cannot be seen from here.
        return False
    if written < booted:
        return True
    return not psutil.pid_exists(pid)


def _removal_abandoned(owner: object, written: float, now: float, booted: float) -> bool:
    """Whether a removal record's owner (``begin_removal``) no longer runs. As for a
    temporary, this process's own count as abandoned: those are finished where none of its
    removals is under way (at start, in a retention round). A record of an older version
    (no owner) is taken as abandoned, as it was before."""
    if not isinstance(owner, dict):
        return True
    host, pid, namespace = owner.get("host"), owner.get("pid"), owner.get("namespace")
    if not (isinstance(host, str) and isinstance(pid, int) and isinstance(namespace, str)):
        return True
    if (host, pid, namespace) == (_HOST, os.getpid(), namespace_token()):
        return True
    return _writer_gone(host, pid, written, now, booted, namespace)


def _tmp_owner(name: str) -> tuple[str, int, str | None] | None:
    """(host, pid, PID namespace) of a temporary's writer; None for a name without them.
    The namespace is None in names written before it was part of them (host~pid~random)."""
    parts = name[len(TMP_PREFIX) :].split("~")
    if len(parts) not in (3, 4) or not parts[0] or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2] if len(parts) == 4 else None


def _is_here(owner: tuple[str, int, str | None], pid: int) -> bool:
    """Whether ``owner`` is the process ``pid`` of this machine and PID namespace (one
    written before namespaces were named: of this machine)."""
    host, its_pid, namespace = owner
    return (host, its_pid) == (_HOST, pid) and namespace in (None, namespace_token())
