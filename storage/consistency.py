"""Does the file store match the index? What ``dicom-node store check`` reports and mends.

Compared both ways: every instance row and every succeeded job's SEG must have its file
(of the recorded size), and every file in the store must belong to a row. Files younger
than a grace period are left out: a running node writes a file a moment before its row
commits. No DICOM parsing here; indexing unreferenced images is ``dicom_node.store_check``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import case, delete, select, update

from storage.database import Index
from storage.filestore import REMOVING_DIR, RESULTS_DIR, TMP_PREFIX, FileStore, aside_path
from storage.models import Instance, Job, JobState, Series, SeriesState, SeriesVersion, utcnow

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MissingFile:
    kind: str  # "instance" or "seg"
    path: str  # relative to the store root
    what: str  # "instance <SOP UID> of series <UID>" or "SEG of job <id>"
    problem: str  # "missing" or "size 1234, indexed as 5678"
    sop_instance_uid: str = ""  # of an instance's row


@dataclass
class StoreReport:
    instances_checked: int = 0
    seg_results_checked: int = 0
    missing: list[MissingFile] = field(default_factory=list)  # rows whose file is gone or altered
    unreferenced_images: list[str] = field(default_factory=list)  # files no instance row names
    unreferenced_results: list[str] = field(default_factory=list)  # results/<id>/ of no job
    temporaries: list[str] = field(default_factory=list)  # partial writes left by a crash
    # A prune or delete a crash interrupted (its record in .removing/): the files it was
    # removing are not lost images; --repair finishes the removal.
    interrupted_removals: list[str] = field(default_factory=list)
    # Removals whose process still runs (another node, a prune now): their files are not
    # judged, and they are not faults.
    removals_in_progress: list[str] = field(default_factory=list)
    recent: int = 0  # files younger than the grace period, not judged

    @property
    def consistent(self) -> bool:
        return not (
            self.missing
            or self.unreferenced_images
            or self.unreferenced_results
            or self.temporaries
            or self.interrupted_removals
        )


def check_store(index: Index, store: FileStore, grace_s: float = 60.0) -> StoreReport:
    """Compare the store's files with the index's rows; changes nothing."""
    report = StoreReport()
    cutoff = time.time() - grace_s
    removing: set[str] = set()
    taken_aside: set[str] = set()  # images a removal holds aside until its commit
    abandoned = store.pending_removals(abandoned_only=True)
    for record, (images, results) in store.pending_removals().items():
        if record in abandoned:
            report.interrupted_removals.append(record)
        else:
            report.removals_in_progress.append(record)
        removing.update(path for path, _ in images)
        removing.update(aside_path(record, path) for path, _ in images)
        removing.update(results)
        taken_aside.update(
            path for path, _ in images if store.absolute(aside_path(record, path)).is_file()
        )
    with index.session() as session:
        indexed = {
            path: (size, sop, series_uid)
            for path, size, sop, series_uid in session.execute(
                select(
                    Instance.path,
                    Instance.size_bytes,
                    Instance.sop_instance_uid,
                    Series.series_instance_uid,
                ).join(Series, Instance.series_pk == Series.id)
            )
        }
        # Only a succeeded job's SEG must exist: one queued again keeps the seg_path of its
        # last run, whose file its worker removes as the new run starts.
        jobs = {
            job_id: seg_path if state == JobState.SUCCEEDED else ""
            for job_id, seg_path, state in session.execute(select(Job.id, Job.seg_path, Job.state))
        }
    report.instances_checked = len(indexed)
    for path, (size, sop, series_uid) in sorted(indexed.items()):
        problem = _file_problem(store.absolute(path), size)
        if problem == "missing" and path in taken_aside:
            continue  # the removal's to settle: gone at its commit, put back otherwise
        if problem:
            report.missing.append(
                MissingFile(
                    "instance", path, f"instance {sop} of series {series_uid}", problem, sop
                )
            )
    for job_id, seg_path in sorted(jobs.items()):
        if seg_path:
            report.seg_results_checked += 1
            if not store.absolute(seg_path).is_file():
                report.missing.append(
                    MissingFile("seg", seg_path, f"SEG of job {job_id}", "missing")
                )

    for relative, mtime in _walk(store.root):
        parts = relative.split("/")
        if parts[0] == REMOVING_DIR or relative in removing:
            continue
        if parts[-1].startswith(TMP_PREFIX):
            if mtime > cutoff:
                report.recent += 1
            else:
                report.temporaries.append(relative)
        elif parts[0] == RESULTS_DIR:
            job_folder = parts[1] if len(parts) == 3 else ""
            if job_folder.isdigit() and int(job_folder) in jobs:
                continue
            if mtime > cutoff:
                report.recent += 1
            else:
                report.unreferenced_results.append(relative)
        elif relative not in indexed:
            if mtime > cutoff:
                report.recent += 1
            else:
                report.unreferenced_images.append(relative)
    return report


def _file_problem(path: Path, size: int) -> str:
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    return "" if actual == size else f"size {actual}, indexed as {size}"


def _walk(root: Path) -> Iterator[tuple[str, float]]:
    """(path relative to ``root``, modification time) of every regular file, sorted."""
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        base = Path(folder).relative_to(root)
        for name in sorted(files):
            try:
                mtime = os.stat(os.path.join(folder, name)).st_mtime
            except FileNotFoundError:  # removed by the node meanwhile
                continue
            except OSError as exc:  # a link that loops, a file this user may not read
                logger.warning(
                    "store check: left out %s: %s", (base / name).as_posix(), exc.strerror
                )
                continue
            yield (base / name).as_posix(), mtime


def remove_files(store: FileStore, paths: list[str]) -> None:
    """Remove leftovers (temporaries, SEGs of pruned jobs) and their emptied folders."""
    for path in paths:
        store.remove(path)
        logger.info("store check: removed %s", path)


def forget_missing(index: Index, paths: list[str]) -> int:
    """Remove the instance rows of files that are gone, and lower their versions' counts.

    For an operator who has accepted the loss: a row without its file makes every job on
    that series fail.
    """
    forgotten = 0
    with index.session() as session, session.begin():
        for path in paths:
            row = session.execute(
                select(Instance.id, Instance.series_pk, Instance.version).where(
                    Instance.path == path
                )
            ).first()
            if row is None:
                continue
            session.execute(delete(Instance).where(Instance.id == row.id))
            session.execute(
                update(SeriesVersion)
                .where(
                    SeriesVersion.series_pk == row.series_pk, SeriesVersion.version == row.version
                )
                .values(
                    instance_count=case(
                        (SeriesVersion.instance_count > 0, SeriesVersion.instance_count - 1),
                        else_=0,
                    )
                )
            )
            forgotten += 1
            logger.warning("store check: forgot instance row of missing file %s", path)
    return forgotten


def settle_versions(index: Index, version_pks: list[int], reason: str) -> None:
    """Mark versions opened by re-indexed files complete and routed: what the node knew of
    them is gone, so they are not segmented again by themselves (``series process`` does)."""
    if not version_pks:
        return
    now = utcnow()
    with index.session() as session, session.begin():
        session.execute(
            update(SeriesVersion)
            .where(SeriesVersion.id.in_(version_pks))
            .values(
                state=SeriesState.COMPLETE,
                completed_at=now,
                completion_reason=reason,
                routed_at=now,
            )
        )
