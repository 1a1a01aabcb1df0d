"""Jobs and deliveries as persisted state machines, claimed safely by several processes.

A claim is an optimistic ``UPDATE ... WHERE state = <seen state>``: whoever changes the row
first owns it, on SQLite and PostgreSQL alike, across processes and machines. A running job
carries a heartbeat; a sending delivery carries a lease. When either lapses (its process
was killed), the row can be claimed again.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicom_node.errors import DicomNodeError
from storage.database import Index
from storage.models import (
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Series,
    SeriesVersion,
    Study,
    utcnow,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobSpec:
    rule_name: str
    model_name: str
    profile: dict[str, object]
    destinations: list[str]


def create_job(index: Index, series_version_pk: int, spec: JobSpec) -> int | None:
    """Queue one job per (series version, rule); returns its id, or None if it existed (or
    its series is gone)."""
    try:
        with index.session() as session, session.begin():
            # The series row shared first: a `series delete` or prune holds it FOR UPDATE from
            # its check of the series' jobs to its commit. On PostgreSQL a job queued in
            # between made the deletion fail on its reference ("images of it arrived"), and
            # then ran: the wrong patient's SEG sent. Waited for, the series is gone. (SQLite
            # ignores the lock: it has one writer at a time.)
            series_pk = session.scalar(
                select(SeriesVersion.series_pk).where(SeriesVersion.id == series_version_pk)
            )
            shared = select(Series.id).where(Series.id == series_pk)
            if series_pk is None or (
                session.scalar(shared.with_for_update(read=True, key_share=True)) is None
            ):
                return None
            job = Job(
                series_version_pk=series_version_pk,
                rule_name=spec.rule_name,
                model_name=spec.model_name,
                profile=spec.profile,
                destinations=spec.destinations,
            )
            session.add(job)
            session.flush()
            return job.id
    except IntegrityError:
        return None


def claim_job(
    index: Index, worker: str, heartbeat_timeout_s: float, *, max_attempts: int | None = None
) -> Job | None:
    """Take the oldest runnable job: queued, due for retry, or running with a lapsed heartbeat.

    A lapsed job that has had ``max_attempts`` attempts is marked failed instead: its
    workers keep dying or losing the index on it, and taken over each time it would
    stand for ever before every newer job.
    """
    now = utcnow()
    stale = now - dt.timedelta(seconds=heartbeat_timeout_s)
    runnable = or_(
        Job.state == JobState.QUEUED,
        and_(Job.state == JobState.RETRY_WAIT, Job.next_attempt_at <= now),
        and_(Job.state == JobState.RUNNING, Job.heartbeat_at < stale),
    )
    for _ in range(5):
        with index.session() as session, session.begin():
            # PostgreSQL: a row another worker is claiming right now is skipped, not
            # picked by everyone (all but one lost the UPDATE below, and after five such
            # rounds gave up while jobs were queued). SQLite ignores it: one writer at a time.
            candidate = session.scalar(
                select(Job)
                .where(runnable)
                .order_by(Job.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            if candidate is None:
                return None
            if candidate.state == JobState.RUNNING:
                if max_attempts is not None and candidate.attempts >= max_attempts:
                    _give_up(session, candidate, now)
                    continue
                logger.warning(
                    "%s: worker %s stopped sending heartbeats; taking the job over",
                    job_tag(session, candidate.id),
                    worker_label(candidate.worker),
                )
            result = session.execute(
                update(Job)
                .where(
                    Job.id == candidate.id,
                    Job.state == candidate.state,
                    Job.attempts == candidate.attempts,
                )
                .values(
                    state=JobState.RUNNING,
                    worker=worker,
                    attempts=candidate.attempts + 1,
                    started_at=now,
                    heartbeat_at=now,
                    next_attempt_at=None,
                )
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                session.flush()
                session.refresh(candidate)
                return candidate
    return None


def format_job_tag(job_id: int, study_uid: str, series_uid: str, version: int) -> str:
    """``job N study S series U vV``: how every log line about a job names it."""
    return f"job {job_id} study {study_uid} series {series_uid} v{version}"


def job_tag(session: Session, job_id: int) -> str:
    """The job's ``format_job_tag``, read from the index; ``job N`` alone when its series
    cannot be read."""
    row = session.execute(
        select(Study.study_instance_uid, Series.series_instance_uid, SeriesVersion.version)
        .select_from(Job)
        .join(SeriesVersion, SeriesVersion.id == Job.series_version_pk)
        .join(Series, Series.id == SeriesVersion.series_pk)
        .join(Study, Study.id == Series.study_pk)
        .where(Job.id == job_id)
    ).first()
    if row is None:
        return f"job {job_id}"
    return format_job_tag(job_id, row[0], row[1], row[2])


def index_job_tag(index: Index, job_id: int) -> str:
    """``job_tag`` in a session of its own; ``job N`` when the index cannot say (a log
    line about the job must not fail for want of its series)."""
    try:
        with index.session() as session:
            return job_tag(session, job_id)
    except Exception:  # the index away: the line still names the job
        return f"job {job_id}"


def worker_label(worker: str) -> str:
    """A worker's identity as log lines show it: ``host:pid``, without the token of its
    PID namespace and boot (``dicom_node.worker.worker_id``)."""
    return worker.partition("/")[0]


def _running(job_id: int, worker: str | None) -> list[Any]:
    """WHERE clauses: the job is running (and, with ``worker``, that worker's)."""
    clauses: list[Any] = [Job.id == job_id, Job.state == JobState.RUNNING]
    if worker is not None:
        clauses.append(Job.worker == worker)
    return clauses


def _give_up(session: Session, job: Job, now: dt.datetime) -> None:
    reason = (
        f"its worker {worker_label(job.worker)} stopped (died, or lost the index) in each of its "
        f"{job.attempts} attempts (workers.max_attempts)"
    )
    done = session.execute(
        update(Job)
        .where(*_running(job.id, None), Job.attempts == job.attempts)
        .values(state=JobState.FAILED, reason=reason, finished_at=now, next_attempt_at=None)
    )
    if done.rowcount == 1:  # type: ignore[attr-defined]
        logger.error("%s failed: %s", job_tag(session, job.id), reason)


def heartbeat(index: Index, job_id: int, worker: str) -> bool:
    """Refresh a running job's heartbeat; False when another worker took it over."""
    with index.session() as session, session.begin():
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker == worker, Job.state == JobState.RUNNING)
            .values(heartbeat_at=utcnow())
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


def finish_job(
    index: Index,
    job_id: int,
    *,
    seg_path: str,
    seg_sop_instance_uid: str,
    timings: dict[str, float],
    reason: str = "",
    deliveries: list[tuple[str, str]] | None = None,
    worker: str | None = None,
) -> bool:
    """Mark a running job succeeded and queue its deliveries (destination, resolved peer) at
    once. False, and nothing changed, when the job is no longer running (cancelled) or,
    with ``worker``, no longer that worker's (taken over after its heartbeat lapsed)."""
    now = utcnow()
    with index.session() as session, session.begin():
        # One conditional UPDATE, not a read then a write: SQLite ignores FOR UPDATE and
        # begins a transaction only at its first write, so a cancel committed between the
        # two would be overwritten.
        done = session.execute(
            update(Job)
            .where(*_running(job_id, worker))
            .values(
                state=JobState.SUCCEEDED,
                finished_at=now,
                seg_path=seg_path,
                seg_sop_instance_uid=seg_sop_instance_uid,
                timings=timings,
                reason=reason,
            )
        )
        if done.rowcount != 1:  # type: ignore[attr-defined]
            return False
        existing = {
            d.destination
            for d in session.scalars(select(Delivery).where(Delivery.job_pk == job_id))
        }
        for destination, resolved in deliveries or []:
            if destination in existing:
                # A re-run replaces the SEG (same UID); send it again.
                session.execute(
                    update(Delivery)
                    .where(Delivery.job_pk == job_id, Delivery.destination == destination)
                    .values(
                        state=DeliveryState.PENDING,
                        seg_path=seg_path,
                        sop_instance_uid=seg_sop_instance_uid,
                        resolved_peer=resolved,
                        next_attempt_at=now,
                        attempts=0,
                        last_error="",
                    )
                )
                continue
            session.add(
                Delivery(
                    job_pk=job_id,
                    destination=destination,
                    resolved_peer=resolved,
                    seg_path=seg_path,
                    sop_instance_uid=seg_sop_instance_uid,
                    next_attempt_at=now,
                )
            )
    return True


def fail_job(
    index: Index,
    job_id: int,
    reason: str,
    *,
    retry_in_s: float | None,
    max_attempts: int,
    worker: str | None = None,
) -> JobState:
    """Record a failure: wait and retry when allowed and attempts remain, else failed for good.
    A job no longer running (cancelled), or with ``worker`` no longer that worker's, keeps
    its state and reason."""
    now = utcnow()
    with index.session() as session, session.begin():
        job = session.get(Job, job_id)
        if job is None:
            return JobState.FAILED
        if job.state != JobState.RUNNING or (worker is not None and job.worker != worker):
            return job.state
        retry = retry_in_s is not None and job.attempts < max_attempts
        state = JobState.RETRY_WAIT if retry else JobState.FAILED
        done = session.execute(
            update(Job)
            # The attempts read: a takeover in between (a new attempt) is left alone.
            .where(*_running(job_id, worker), Job.attempts == job.attempts)
            .values(
                state=state,
                reason=reason,
                finished_at=now,
                next_attempt_at=now + dt.timedelta(seconds=retry_in_s or 0) if retry else None,
            )
        )
        if done.rowcount != 1:  # type: ignore[attr-defined]
            return session.scalar(select(Job.state).where(Job.id == job_id)) or JobState.FAILED
        return state


CANCELLED = "cancelled by the operator"


def cancel_job(index: Index, job_id: int) -> tuple[JobState, bool] | None:
    """Stop a queued, waiting or running job for good: (its state before, whether it was
    cancelled). A running job's worker is stopped by its pool (``cancel_requested``); a
    result it still reports is discarded (``finish_job`` leaves a cancelled job alone).
    None when there is no such job."""
    for _ in range(5):
        with index.session() as session, session.begin():
            before = session.scalar(select(Job.state).where(Job.id == job_id))
            if before is None:
                return None
            if before not in (JobState.QUEUED, JobState.RETRY_WAIT, JobState.RUNNING):
                return before, False
            done = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == before)  # not one finished meanwhile
                .values(
                    state=JobState.CANCELLED,
                    reason=f"{CANCELLED} (was {before.value})",
                    finished_at=utcnow(),
                    next_attempt_at=None,
                )
            )
            if done.rowcount == 1:  # type: ignore[attr-defined]
                return before, True
    raise DicomNodeError(f"job {job_id} kept changing state; try again")


def job_state(index: Index, job_id: int) -> JobState | None:
    """The job's state; None once it is gone (its series deleted or pruned)."""
    with index.session() as session:
        return session.scalar(select(Job.state).where(Job.id == job_id))


def taken_over(index: Index, job_id: int, worker: str) -> str | None:
    """The worker that holds a job ``worker`` was running, once another took it over (its
    heartbeat looked lapsed: an index outage, or a clock step); None while it is its own."""
    with index.session() as session:
        holder = session.scalar(select(Job.worker).where(Job.id == job_id))
    return holder if holder is not None and holder != worker else None


def cancel_requested(index: Index, job_id: int) -> bool:
    """Was this job cancelled by the operator (its worker should stop)?"""
    return job_state(index, job_id) == JobState.CANCELLED


SUPERSEDED = "job queued again: the new SEG is sent when it finishes"
_FINISHED_JOBS = (JobState.FAILED, JobState.SUCCEEDED, JobState.CANCELLED)


def retry_job(index: Index, job_id: int, spec: JobSpec | None = None) -> bool:
    """Operator's retry: queue a failed, cancelled or succeeded job again with fresh attempts; with
    ``spec``, under that model, profile and destinations (the rule as configured now). Its
    pending deliveries are cancelled (``SUPERSEDED``). False when the job is queued, running
    or waiting for a retry already."""
    values: dict[str, object] = {
        "state": JobState.QUEUED,
        "attempts": 0,
        "reason": "",
        "next_attempt_at": utcnow(),  # queued since (status: how long jobs wait)
    }
    if spec is not None:
        values |= {
            "model_name": spec.model_name,
            "profile": spec.profile,
            "destinations": spec.destinations,
        }
    with index.session() as session, session.begin():
        result = session.execute(
            update(Job).where(Job.id == job_id, Job.state.in_(_FINISHED_JOBS)).values(values)
        )
        if not result.rowcount:  # type: ignore[attr-defined]
            return False
        # A succeeded job's unsent deliveries would send the SEG the re-run replaces (its
        # worker removes the file first, so they would be dead-lettered as "missing"). They
        # stop here; finish_job queues them again with the new SEG.
        session.execute(
            update(Delivery)
            .where(Delivery.job_pk == job_id, Delivery.state == DeliveryState.PENDING)
            .values(state=DeliveryState.CANCELLED, last_error=SUPERSEDED)
        )
        return True


def job_for(index: Index, series_version_pk: int, rule_name: str) -> Job | None:
    with index.session() as session:
        return session.scalar(
            select(Job).where(
                Job.series_version_pk == series_version_pk, Job.rule_name == rule_name
            )
        )


# -- deliveries ------------------------------------------------------------------------------


def claim_delivery(index: Index, lease_s: float, *, sender: str | None = None) -> Delivery | None:
    """Take a due delivery: pending and due, or sending with a lapsed lease (sender killed).
    ``sender``, the claiming process (``dicom_node.worker.worker_id``), is recorded with it."""
    now = utcnow()
    due = and_(
        Delivery.state.in_([DeliveryState.PENDING, DeliveryState.SENDING]),
        Delivery.next_attempt_at <= now,
    )
    for _ in range(5):
        with index.session() as session, session.begin():
            candidate = session.scalar(
                select(Delivery).where(due).order_by(Delivery.next_attempt_at).limit(1)
            )
            if candidate is None:
                return None
            result = session.execute(
                update(Delivery)
                .where(
                    Delivery.id == candidate.id,
                    Delivery.state == candidate.state,
                    Delivery.next_attempt_at == candidate.next_attempt_at,
                )
                .values(
                    state=DeliveryState.SENDING,
                    attempts=candidate.attempts + 1,
                    next_attempt_at=now + dt.timedelta(seconds=lease_s),
                    sender=sender,
                )
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                session.flush()
                session.refresh(candidate)
                return candidate
    return None


def _sent(delivery_id: int, attempt: int | None, sender: str | None) -> list[Any]:
    """WHERE clauses: the delivery is being sent (and, with ``attempt``, by that claim). A
    re-run's finish_job sets it pending with the new SEG meanwhile: the old send's outcome
    must not mark the new SEG delivered, or dead. The re-run resets the attempt count, so
    another node's outbox claiming the new SEG meanwhile has the same count: the claim's
    ``sender`` tells them apart (one outbox sends one delivery at a time)."""
    clauses: list[Any] = [Delivery.id == delivery_id, Delivery.state == DeliveryState.SENDING]
    if attempt is not None:
        clauses.append(Delivery.attempts == attempt)
        clauses.append(Delivery.sender.is_(None) if sender is None else Delivery.sender == sender)
    return clauses


def delivery_done(
    index: Index,
    delivery_id: int,
    duration_s: float,
    note: str = "",
    *,
    attempt: int | None = None,
    sender: str | None = None,
) -> bool:
    """Mark a delivery sent; False, and nothing changed, when it is no longer this send's
    (the claim of ``attempt`` by ``sender``: see ``_sent``)."""
    with index.session() as session, session.begin():
        done = session.execute(
            update(Delivery)
            .where(*_sent(delivery_id, attempt, sender))
            .values(
                state=DeliveryState.DELIVERED,
                delivered_at=utcnow(),
                duration_s=duration_s,
                last_error=note,
            )
        )
        return bool(done.rowcount)  # type: ignore[attr-defined]


def delivery_failed(
    index: Index,
    delivery_id: int,
    error: str,
    *,
    retryable: bool,
    max_attempts: int,
    backoff_initial_s: float,
    backoff_max_s: float,
    attempt: int | None = None,
    sender: str | None = None,
) -> tuple[DeliveryState, float | None]:
    """Back off exponentially; dead-letter after ``max_attempts`` or a permanent error. A
    delivery no longer this send's (``attempt`` and ``sender``: see ``_sent``) keeps its
    state."""
    with index.session() as session, session.begin():
        delivery = session.get(Delivery, delivery_id)
        if delivery is None:
            return DeliveryState.DEAD, None
        attempts = delivery.attempts
        if not retryable or attempts >= max_attempts:
            state, delay, due = DeliveryState.DEAD, None, delivery.next_attempt_at
        else:
            # The exponent capped: 2**1024 s overflow a float (max_attempts has no bound).
            doublings = min(max(0, attempts - 1), 64)
            delay = min(backoff_max_s, backoff_initial_s * 2**doublings)
            state, due = DeliveryState.PENDING, utcnow() + dt.timedelta(seconds=delay)
        done = session.execute(
            update(Delivery)
            .where(*_sent(delivery_id, attempt, sender), Delivery.attempts == attempts)
            .values(state=state, last_error=error, next_attempt_at=due)
            .execution_options(synchronize_session=False)
        )
        if done.rowcount != 1:  # type: ignore[attr-defined]
            return session.scalar(
                select(Delivery.state).where(Delivery.id == delivery_id)
            ) or DeliveryState.DEAD, None
        return state, delay


def postpone_destination(index: Index, destination: str, until: dt.datetime) -> int:
    """Pending deliveries to ``destination`` (the peer a delivery resolved to, else the
    destination it names) due before ``until`` wait until then: it is down, and each
    attempt on it would cost a connection or association timeout while the deliveries to
    other destinations waited behind it. Returns how many."""
    with index.session() as session, session.begin():
        result = session.execute(
            update(Delivery)
            .where(
                Delivery.state == DeliveryState.PENDING,
                Delivery.next_attempt_at < until,
                or_(
                    Delivery.resolved_peer == destination,
                    and_(Delivery.resolved_peer == "", Delivery.destination == destination),
                ),
            )
            .values(next_attempt_at=until)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


def retry_delivery(index: Index, delivery_id: int | None = None) -> int:
    """Operator's retry: dead deliveries (one dead or cancelled when ``delivery_id`` is
    given) become pending now."""
    with index.session() as session, session.begin():
        query = update(Delivery).where(Delivery.state == DeliveryState.DEAD)
        if delivery_id is not None:
            query = update(Delivery).where(
                Delivery.id == delivery_id,
                Delivery.state.in_(
                    [DeliveryState.DEAD, DeliveryState.CANCELLED, DeliveryState.PENDING]
                ),
            )
        result = session.execute(
            query.values(
                state=DeliveryState.PENDING, attempts=0, next_attempt_at=utcnow(), last_error=""
            )
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


def cancel_delivery(index: Index, delivery_id: int) -> tuple[DeliveryState, bool] | None:
    """An operator's stop: a pending delivery (waiting for its first try or a retry) is
    cancelled and never sent. One being sent right now is left to finish. (its state
    before, whether it was cancelled), or None when there is no such delivery."""
    with index.session() as session, session.begin():
        done = session.execute(
            update(Delivery)
            # Conditional: one the outbox claimed meanwhile is being sent, and not cancelled.
            .where(Delivery.id == delivery_id, Delivery.state == DeliveryState.PENDING)
            .values(state=DeliveryState.CANCELLED, last_error=CANCELLED)
        )
        if done.rowcount == 1:  # type: ignore[attr-defined]
            return DeliveryState.PENDING, True
        before = session.scalar(select(Delivery.state).where(Delivery.id == delivery_id))
        return None if before is None else (before, False)
