"""Retention: remove files and rows of finished series older than a cut-off."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import re
from dataclasses import dataclass, field

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from dicom_node.errors import DicomNodeError
from storage.database import Index, rolled_back_for_a_conflict
from storage.filestore import FileStore, aside_path
from storage.models import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Patient,
    Series,
    SeriesState,
    SeriesVersion,
    Study,
    utcnow,
)

logger = logging.getLogger(__name__)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_LONGEST_S = 100 * 365.25 * 86400


def parse_duration(text: str) -> dt.timedelta:
    """'90s', '15m', '12h', '30d', '2w' -> timedelta."""
    if re.fullmatch(r"\s*\d+(?:\.\d+)?\s*M\s*", text):
        # Read as minutes, "6M" meant as six months would prune six minutes after completion.
        raise ValueError(
            f"duration {text!r} is ambiguous: m is minutes; for months give days (180d)"
        )
    match = _DURATION.match(text.lower())
    if not match:
        raise ValueError(
            f"duration {text!r} not understood: use a number and s, m, h, d or w (30d)"
        )
    seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if seconds > _LONGEST_S:
        # "Now minus it" would fall before year 1 and fail every sweep: no retention keeps all.
        raise ValueError(f"duration {text!r} is more than 100 years")
    return dt.timedelta(seconds=seconds)


@dataclass(frozen=True)
class PruneResult:
    series: list[str]
    instances: int
    bytes_freed: int
    # Old enough, but kept for now: (series UID, why), e.g. a delivery still pending.
    kept: list[tuple[str, str]] = field(default_factory=list)


_UNFINISHED_JOBS = (JobState.QUEUED, JobState.RUNNING, JobState.RETRY_WAIT)
_UNFINISHED_DELIVERIES = (DeliveryState.PENDING, DeliveryState.SENDING)


def prune(
    index: Index, store: FileStore, older_than: dt.timedelta, *, dry_run: bool = False
) -> PruneResult:
    """Remove series whose every version completed before the cut-off and whose jobs and
    deliveries are finished (succeeded, failed, cancelled, delivered or dead).

    One short transaction per series, so a node receiving meanwhile is held up for one
    series at a time, never for a whole run. Files go after their rows are committed: a
    crash in between leaves unreferenced files (wasted space), never rows without files.
    """
    cutoff = utcnow() - older_than
    pruned: list[str] = []
    kept: list[tuple[str, str]] = []
    count = 0
    freed = 0
    for series_pk in _candidates(index, cutoff):
        try:
            removed = _remove_series(index, store, series_pk, cutoff, dry_run=dry_run)
        except SQLAlchemyError as exc:  # e.g. pruned at the same moment by another node
            logger.warning("could not prune series row %d: %s", series_pk, exc)
            continue
        if isinstance(removed, str):  # no longer qualifies (an image arrived, a job queued)
            with index.session() as session:
                uid = session.scalar(
                    select(Series.series_instance_uid).where(Series.id == series_pk)
                )
            if uid is not None:
                kept.append((uid, removed))
            continue
        uid, instances, size = removed
        pruned.append(uid)
        count += instances
        freed += size
    return PruneResult(series=pruned, instances=count, bytes_freed=freed, kept=kept)


def _candidates(index: Index, cutoff: dt.datetime) -> list[int]:
    """Series whose every version is complete, the newest completed before the cut-off."""
    unfinished = case(
        (
            (SeriesVersion.state != SeriesState.COMPLETE) | SeriesVersion.completed_at.is_(None),
            1,
        ),
        else_=0,
    )
    with index.session() as session:
        return list(
            session.scalars(
                select(SeriesVersion.series_pk)
                .group_by(SeriesVersion.series_pk)
                .having(func.sum(unfinished) == 0, func.max(SeriesVersion.completed_at) <= cutoff)
                .order_by(SeriesVersion.series_pk)
            )
        )


def delete_series(index: Index, store: FileStore, series_instance_uid: str) -> PruneResult:
    """An operator's removal of one series (sent by mistake, the wrong patient): every
    version, image, job, delivery and SEG. Refused, with the reason, while it is still
    receiving or one of its jobs or deliveries is unfinished."""
    with index.session() as session:
        series_pk = session.scalar(
            select(Series.id).where(Series.series_instance_uid == series_instance_uid)
        )
    if series_pk is None:
        raise DicomNodeError(f"series {series_instance_uid} is not in the index")
    try:
        removed = _remove_series(index, store, series_pk, None, dry_run=False, verb="deleted")
    except (IntegrityError, OperationalError) as exc:
        if isinstance(exc, OperationalError) and not rolled_back_for_a_conflict(exc):
            raise
        # Its rows and files are all kept (the transaction was rolled back).
        removed = (
            "images of it arrived while it was being deleted, and it was kept: delete it "
            "once its new version completes"
        )
    if isinstance(removed, str):
        raise DicomNodeError(f"series {series_instance_uid} not deleted: {removed}")
    uid, count, size = removed
    return PruneResult(series=[uid], instances=count, bytes_freed=size)


def _remove_series(
    index: Index,
    store: FileStore,
    series_pk: int,
    cutoff: dt.datetime | None,
    *,
    dry_run: bool,
    verb: str = "pruned",
) -> tuple[str, int, int] | str:
    """Remove one series; (UID, instances, bytes), or why not.

    With ``cutoff``, every version must have completed before it.
    """
    # A removal that took its images aside and then failed (its commit too) puts them
    # back at once, by what the index then holds; a crash leaves that to finish_removals.
    taken: list[tuple[str, list[tuple[str, int]], list[str]]] = []
    try:
        with contextlib.ExitStack() as stack:
            if not dry_run:
                stack.enter_context(index.writer_turn())  # receivers queue behind it, briefly
            session = stack.enter_context(index.session())
            stack.enter_context(session.begin())
            if not dry_run:
                # Lock first, then check: the checks below must hold until the deletes commit.
                # SQLite reads outside a write transaction until the first write, and
                # PostgreSQL's reads lock nothing: an image (or a delivery retried) committed
                # in between was deleted with the series, acknowledged or not. The no-op
                # UPDATE takes SQLite's write lock; FOR UPDATE holds off PostgreSQL's inserts
                # that reference the series row.
                session.execute(select(Series.id).where(Series.id == series_pk).with_for_update())
                session.execute(
                    update(Series)
                    .where(Series.id == series_pk)
                    .values(series_instance_uid=Series.series_instance_uid)
                )
            series = session.get(Series, series_pk)
            if series is None:
                return "it is not in the index"
            versions = session.scalars(
                select(SeriesVersion).where(SeriesVersion.series_pk == series.id)
            ).all()
            receiving = [v.version for v in versions if v.state != SeriesState.COMPLETE]
            if receiving:
                return (
                    f"version {receiving[0]} is still receiving: wait until it completes "
                    "(completion.quiet_period_s)"
                )
            if cutoff is not None and any(
                v.completed_at is None or v.completed_at > cutoff for v in versions
            ):
                return "it completed after the cut-off"
            version_ids = [v.id for v in versions]
            busy_job = session.execute(
                select(Job.id, Job.state).where(
                    Job.series_version_pk.in_(version_ids), Job.state.in_(_UNFINISHED_JOBS)
                )
            ).first()
            if busy_job is not None:
                return (
                    f"job {busy_job.id} is {busy_job.state.value}: wait for it, "
                    f"or `dicom-node jobs cancel {busy_job.id}`"
                )
            job_ids = session.scalars(
                select(Job.id).where(Job.series_version_pk.in_(version_ids))
            ).all()
            busy_delivery = session.execute(
                select(Delivery.id, Delivery.state).where(
                    Delivery.job_pk.in_(job_ids), Delivery.state.in_(_UNFINISHED_DELIVERIES)
                )
            ).first()
            if busy_delivery is not None:
                cancel = (
                    f", or `dicom-node deliveries cancel {busy_delivery.id}`"
                    if busy_delivery.state == DeliveryState.PENDING
                    else ""
                )
                return (
                    f"delivery {busy_delivery.id} is {busy_delivery.state.value}: wait until it "
                    f"is delivered or dead{cancel}"
                )
            instances = session.scalars(
                select(Instance).where(Instance.series_pk == series.id)
            ).all()
            uid = series.series_instance_uid
            size = sum(i.size_bytes for i in instances)
            if dry_run:
                return uid, len(instances), size
            # Which file each row names now: one written at the same path after the commit
            # (the image sent again) is another file, and stays.
            images = [
                (i.path, inode) for i in instances if (inode := store.inode(i.path)) is not None
            ]
            results: list[str] = []
            for job_id in job_ids:  # the SEG (Job.seg_path) and a BINARY fallback beside it
                results += store.job_results(job_id)
            # Before the commit: a crash between it and the last file's removal leaves files
            # that no row names; this record keeps `store check --repair` from indexing them
            # again (a deleted wrong-patient series back as a complete one).
            record = store.begin_removal(images, results)
            taken.append((record, images, results))
            store.take_aside(record, [path for path, _ in images])
            session.execute(delete(Delivery).where(Delivery.job_pk.in_(job_ids)))
            session.execute(delete(Job).where(Job.id.in_(job_ids)))
            session.execute(delete(Instance).where(Instance.series_pk == series.id))
            session.execute(delete(SeriesVersion).where(SeriesVersion.series_pk == series.id))
            study_pk = series.study_pk
            # The study's row locked before its series are counted, and the patient's before
            # its studies are (always series, study, patient: no deadlock between removals).
            # On PostgreSQL (READ COMMITTED) two removals of the last two series of a study
            # each counted the other's series, deleted but not yet committed, and neither
            # removed the study or its patient. Locked, the second counts after the first
            # committed. (SQLite: writer_turn and its write lock serialise removals already.)
            session.execute(select(Study.id).where(Study.id == study_pk).with_for_update())
            session.delete(series)
            session.flush()
            if not session.scalar(select(func.count(Series.id)).where(Series.study_pk == study_pk)):
                study = session.get(Study, study_pk)
                if study is not None:
                    patient_pk = study.patient_pk
                    session.execute(
                        select(Patient.id).where(Patient.id == patient_pk).with_for_update()
                    )
                    session.delete(study)
                    session.flush()
                    if not session.scalar(
                        select(func.count(Study.id)).where(Study.patient_pk == patient_pk)
                    ):
                        patient = session.get(Patient, patient_pk)
                        if patient is not None:
                            session.delete(patient)
    except BaseException:
        for record, images, results in taken:
            try:
                _settle(index, store, record, images, results)
            except Exception as exc:  # the index is down: the next start settles it
                logger.error("could not settle removal %s after a failure: %s", record, exc)
        raise
    _remove_files(store, record, images, results)
    store.end_removal(record)
    logger.info("%s series %s: %d instances", verb, uid, len(instances))
    return uid, len(instances), size


def _remove_files(
    store: FileStore, record: str, images: list[tuple[str, int]], results: list[str]
) -> None:
    """After the commit: the images taken aside, and the results."""
    for path, _ in images:
        store.remove(aside_path(record, path))
    for path in results:
        store.remove(path)


def _settle(
    index: Index,
    store: FileStore,
    record: str,
    images: list[tuple[str, int]],
    results: list[str],
) -> None:
    """End a removal that did not end itself, by what the index holds: an image a row
    still names stays (or is put back), one no row names goes; so do results of no job."""
    with index.session() as session:
        named = set(
            session.scalars(select(Instance.path).where(Instance.path.in_([p for p, _ in images])))
        )
        jobs = set(session.scalars(select(Job.id)))
    for path, inode in images:
        if not store.settle_aside(record, path, named=path in named) and path not in named:
            # A record from before images were taken aside: the file that was there.
            store.remove_unchanged(path, inode)
    for path in results:
        if not _of_job(path, jobs):
            store.remove(path)
    store.end_removal(record)


def finish_removals(index: Index, store: FileStore) -> int:
    """Finish the removals a crash interrupted (``FileStore.pending_removals``): the files
    no row names any more go; a record whose transaction never committed leaves its files
    with their rows. Returns how many records were finished.

    Only records whose owner no longer runs: another node's removal under way on the
    shared store is left to it (or taken once its record is stale)."""
    pending = store.pending_removals(abandoned_only=True)
    for record, (images, results) in pending.items():
        _settle(index, store, record, images, results)
        logger.info("finished an interrupted removal (%s)", record)
    return len(pending)


def _of_job(result: str, jobs: set[int]) -> bool:
    folder = result.split("/")[1] if result.count("/") >= 2 else ""
    return folder.isdigit() and int(folder) in jobs
