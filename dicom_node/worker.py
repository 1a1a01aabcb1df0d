"""Workers: inference in processes separate from the receiver, so C-STORE never stalls.

Each worker process keeps its models loaded, claims jobs from the index, heartbeats while
it runs one, and writes the SEG into the store. A supervising pool restarts dead workers
and kills a job that outruns ``workers.job_timeout_s``.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import Synchronized
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Protocol

import psutil
from sqlalchemy import func, select

from dicom_node.child_process import Restarts, die_with_parent
from dicom_node.config import OutputProfile, Settings
from dicom_node.errors import DicomNodeError, ModelError, SeriesError
from dicom_node.index_outage import IndexOutage
from dicom_node.logging_setup import configure_logging
from dicom_node.value_warnings import summarised_value_warnings
from inference.log_context import log_label
from storage.database import Index, unavailable_reason
from storage.filestore import FileStore, namespace_token
from storage.instances import up_to_version
from storage.models import Instance, Job, JobState, Series, SeriesVersion, utcnow
from storage.queue import (
    cancel_requested,
    claim_job,
    fail_job,
    finish_job,
    format_job_tag,
    heartbeat,
    index_job_tag,
    job_state,
    job_tag,
    taken_over,
    worker_label,
)

if TYPE_CHECKING:  # segment imports torch/nnU-Net: only worker processes load it
    from pydicom import Dataset

    from dicom_node.segment import ModelCache

logger = logging.getLogger(__name__)


class EventLike(Protocol):
    """threading.Event or multiprocessing.Event."""

    def set(self) -> None: ...

    def clear(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class PermanentJobError(DicomNodeError):
    """Retrying cannot help (bad series, unknown origin, missing model)."""


# Unexpected errors that the same series, model and code raise again on every attempt (an
# attribute a source lacks, a value of the wrong type or out of range): the job fails at once
# with the error, instead of after workers.max_attempts runs of the whole inference. Others
# (OSError, MemoryError, a CUDA error) may pass, and are retried.
SAME_AGAIN: tuple[type[Exception], ...] = (
    AttributeError,
    TypeError,
    ValueError,
    LookupError,
    ArithmeticError,
    NotImplementedError,
    AssertionError,
)


def worker_id(pid: int | None = None) -> str:
    """This process's identity in the index (a job's worker, a delivery's sender):
    ``host:pid/token``, or that of ``pid``, a process of this PID namespace. Log lines show
    ``host:pid`` (``storage.queue.worker_label``)."""
    token = namespace_token()
    name = f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"
    return f"{name}/{token}" if token else name


def gone_here(identity: str) -> bool:
    """Whether ``identity`` (``worker_id``) is a process of this host, PID namespace and
    boot that has ended. False for any other: this process cannot tell whether that one
    lives, so its row waits for its heartbeat or lease to lapse."""
    name, _, token = identity.partition("/")
    host, _, pid = name.rpartition(":")
    return (
        host == socket.gethostname()
        and token == namespace_token()
        and pid.isdigit()
        and not psutil.pid_exists(int(pid))
    )


def release_orphaned_jobs(index: Index, keep: Collection[int] = ()) -> int:
    """Jobs left RUNNING by dead worker processes of this host (and PID namespace) become
    claimable at once; not those in ``keep`` (stopped for the time limit: they are to be
    marked failed)."""
    released = 0
    with index.session() as session, session.begin():
        for job in session.scalars(select(Job).where(Job.state == JobState.RUNNING)):
            if job.id in keep or not gone_here(job.worker):
                continue
            job.heartbeat_at = utcnow().replace(year=2000)
            released += 1
            logger.info(
                "%s: its worker %s is gone; released for another",
                job_tag(session, job.id),
                worker_label(job.worker),
            )
    return released


@dataclass
class JobContext:
    settings: Settings
    index: Index
    store: FileStore
    worker: str
    results_ready: EventLike | None = None  # set when a SEG awaits delivery (wakes the outbox)
    # The running job's log prefix: job id, then study, series and version once run_job has
    # read them, so that process_one's failure lines name the series too.
    job_tag: str = ""


def resolve_destinations(
    settings: Settings, series: Series, destinations: list[str]
) -> list[tuple[str, str]]:
    resolved: list[tuple[str, str]] = []
    web = {d.name for d in settings.dicomweb}
    for destination in destinations:
        if destination == "origin":
            peer = settings.peer_by_ae(series.calling_ae_title)
            if peer is None:
                raise PermanentJobError(
                    f"origin AE title {series.calling_ae_title!r} "
                    f"(from {series.peer_address or '?'}) is not a configured peer: "
                    "add it under peers, or name a destination in the rule"
                )
            resolved.append((destination, peer.name))
        elif settings.peer_by_name(destination) is not None or destination in web:
            resolved.append((destination, destination))
        else:
            raise PermanentJobError(f"destination {destination!r} is not configured")
    return resolved


def run_job(ctx: JobContext, job: Job, models: ModelCache) -> None:
    """Segment one job's series version and queue its deliveries."""
    from dicom_node.seg_encode import EmptySegmentationError
    from dicom_node.segment import segment_series
    from dicom_node.volume import StackChoice

    started = time.monotonic()
    with ctx.index.session() as session:
        version = session.get(SeriesVersion, job.series_version_pk)
        if version is None:
            raise PermanentJobError("its series version is no longer in the index (pruned?)")
        series = session.get(Series, version.series_pk)
        if series is None:  # a foreign key prevents it; said plainly if it happens
            raise PermanentJobError("its series is no longer in the index")
        study_uid = series.study.study_instance_uid
        rows = session.execute(
            select(Instance.path, Instance.version)
            .where(*up_to_version(series.id, version.version))
            .order_by(Instance.id)
        ).all()
        paths = [ctx.store.absolute(row.path) for row in rows]
        newest = session.scalar(
            select(func.max(SeriesVersion.version)).where(SeriesVersion.series_pk == series.id)
        )
    tag = format_job_tag(job.id, study_uid, series.series_instance_uid, version.version)
    ctx.job_tag = tag
    if newest is not None and newest > version.version:
        # Images came after this version (it waited in the queue, or is retried): a later
        # version's job segments every image. This one would read the series without them,
        # or without images sent again (their rows now belong to the later version).
        reason = (
            f"superseded by version {newest} of the series, received after this one: "
            "its job segments every image; no SEG made here"
        )
        finish_job(ctx.index, job.id, seg_path="", seg_sop_instance_uid="", timings={},
                   reason=reason, worker=ctx.worker)  # fmt: skip
        logger.info("%s: %s", tag, reason)
        return
    logger.info(
        "%s: started (model %s, rule %s, attempt %d, %d images)",
        tag,
        job.model_name,
        job.rule_name,
        job.attempts,
        len(paths),
    )
    earlier = ctx.store.job_results(job.id)
    if earlier:
        # From an earlier attempt, or from a deleted job whose number SQLite gave again (a
        # crash between a prune's commit and its file removal): never to be sent as this
        # job's SEG or fallback.
        for name in earlier:
            ctx.store.remove(name)
        logger.info("%s: removed earlier result files %s", tag, ", ".join(earlier))
    deliveries = resolve_destinations(ctx.settings, series, list(job.destinations))
    timings: dict[str, float] = {
        "queue_s": max(0.0, (job.started_at - job.created_at).total_seconds())
        if job.started_at and job.created_at
        else 0.0
    }
    load_started = time.monotonic()
    try:
        with log_label(tag):  # the model's loading lines name the job that waited for it
            info, segmenter = models.get(job.model_name)
    except ModelError as exc:
        raise PermanentJobError(str(exc)) from exc
    timings["model_s"] = time.monotonic() - load_started
    # The rule's profile as queued with the job (keys added later take their defaults).
    profile = OutputProfile.model_validate(job.profile)
    try:
        with log_label(tag):  # inference's lines (and its CUDA fallbacks) name the job
            result = segment_series(
                paths,
                info,
                segmenter,
                StackChoice(profile.stack, profile.stack_image_type),
                # Images sent again in a later version replace the earlier copies.
                versions=[row.version for row in rows],
                format=profile.format,
                compression=profile.compression,
                binary_fallback=profile.format != "binary" and profile.fallback_to_binary,
                instance_number=version.version,
                input_models=models.get,  # a model taking another's segmentation (ROI)
            )
    except EmptySegmentationError:
        timings["total_s"] = time.monotonic() - started
        if not finish_job(
            ctx.index,
            job.id,
            seg_path="",
            seg_sop_instance_uid="",
            timings=timings,
            reason="the model found none of its structures in this series: no SEG produced",
            worker=ctx.worker,
        ):
            # Without worker=, a run taken over meanwhile marked the new run's job
            # succeeded, empty, under it.
            _not_recorded(ctx, job.id, tag)
            return
        logger.warning("%s: no structure found; nothing to send (%.2f s)", tag, timings["total_s"])
        return
    except (SeriesError, ModelError, ValueError) as exc:
        raise PermanentJobError(str(exc)) from exc
    timings.update(result.timings)
    seg_uid = str(result.seg.SOPInstanceUID)
    seg_rel = ctx.store.result_path(job.id, f"{seg_uid}.dcm")
    ctx.store.write_atomic(seg_rel, _encode(result.seg))
    if result.binary_fallback is not None:
        ctx.store.write_atomic(fallback_path(seg_rel), _encode(result.binary_fallback))
    timings["total_s"] = time.monotonic() - started
    notes = ([f"segmented {result.stack}"] if result.stack else []) + result.notes
    if not finish_job(
        ctx.index,
        job.id,
        seg_path=seg_rel,
        seg_sop_instance_uid=seg_uid,
        timings=timings,
        reason="; ".join(notes),
        deliveries=deliveries,
        worker=ctx.worker,
    ):
        _not_recorded(ctx, job.id, tag)
        return
    found = ", ".join(f"{name} {ml:.1f} ml" for _, name, ml in result.volumes_ml if ml > 0)
    logger.info(
        "%s: succeeded in %.2f s (load %.2f, inference %.2f, encode %.2f); SEG %s; %s%s",
        tag,
        timings["total_s"],
        timings.get("load_s", 0.0),
        timings.get("inference_s", 0.0),
        timings.get("encode_s", 0.0),
        seg_uid,
        found or "no structures",
        "".join(f"; {note}" for note in notes),
    )


def fallback_path(seg_path: str) -> str:
    """Where a job's BINARY fallback of the SEG at ``seg_path`` is: named after that SEG, so
    that a run taken over, whose SEG (other voxels) has another UID, cannot put its own
    fallback in place of the new run's."""
    return str(PurePosixPath(seg_path).with_suffix(".binary.dcm"))


def _not_recorded(ctx: JobContext, job_id: int, tag: str) -> None:
    """A finished run's result was not recorded: the job is no longer this worker's."""
    state = job_state(ctx.index, job_id)
    if state is None or state == JobState.CANCELLED:
        # Gone: `jobs cancel` then `series delete` (a wrong patient's series) before the pool
        # stopped this worker. Its SEG, written after the deletion, must not stay behind.
        for name in ctx.store.job_results(job_id):
            ctx.store.remove(name)
        logger.warning(
            "%s: %s; its SEG is discarded, nothing is sent",
            tag,
            "cancelled while running"
            if state is not None
            else "removed while it ran (its series deleted or pruned)",
        )
    else:
        # Taken over by another worker (this one's heartbeat lapsed, the index away).
        # Its files are left alone: a SEG's name is its UID, derived from the series, the
        # model and the content, so the new run may write (or have written, and be
        # sending) a file of the same name. The next run of the job clears the folder.
        logger.warning(
            "%s: another worker took the job over while this one ran it; its run's "
            "result stands, this one's is not recorded",
            tag,
        )


def _encode(ds: Dataset) -> bytes:
    # seg_to_bytes writes what save_as(enforce_file_format=True) writes, several times faster
    # for a BINARY SEG with thousands of frames.
    from dicom_node.seg_write import seg_to_bytes

    return seg_to_bytes(ds)


def process_one(
    ctx: JobContext, models: ModelCache, current: Synchronized[int] | None = None
) -> bool:
    """Claim and run one job; False when none was runnable."""
    job = claim_job(
        ctx.index,
        ctx.worker,
        ctx.settings.workers.heartbeat_timeout_s,
        max_attempts=ctx.settings.workers.max_attempts,
    )
    if job is None:
        return False
    if current is not None:
        current.value = job.id
    beat_stop = threading.Event()
    interval = max(0.5, ctx.settings.workers.heartbeat_timeout_s / 4)

    def beat() -> None:
        while not beat_stop.wait(interval):
            with contextlib.suppress(Exception):
                heartbeat(ctx.index, job.id, ctx.worker)

    beater = threading.Thread(target=beat, name=f"heartbeat-{job.id}", daemon=True)
    beater.start()
    started = time.monotonic()
    ctx.job_tag = f"job {job.id}"
    try:
        with summarised_value_warnings(lambda: ctx.job_tag):
            run_job(ctx, job, models)
        if ctx.results_ready is not None:
            ctx.results_ready.set()
    except PermanentJobError as exc:
        # Logged first: if the index is away, recording the failure raises, and the cause
        # would otherwise appear nowhere (the job runs again once the index answers).
        logger.error("%s: failed after %.2f s: %s", ctx.job_tag, time.monotonic() - started, exc)
        fail_job(ctx.index, job.id, str(exc), retry_in_s=None, max_attempts=0, worker=ctx.worker)
    except Exception as exc:
        reason = unavailable_reason(exc)
        if reason is not None:
            # Its row cannot be updated now. Its heartbeat stops, so once the index answers
            # and workers.heartbeat_timeout_s has passed, a worker runs it again.
            logger.error(
                "%s: index unavailable (%s); it runs again once the index answers",
                ctx.job_tag,
                reason,
            )
            raise
        same_again = isinstance(exc, SAME_AGAIN)
        try:
            state = fail_job(
                ctx.index,
                job.id,
                f"{type(exc).__name__}: {exc}",
                retry_in_s=None if same_again else ctx.settings.workers.retry_delay_s,
                max_attempts=0 if same_again else ctx.settings.workers.max_attempts,
                worker=ctx.worker,
            )
        except Exception:
            # The index went away meanwhile: the job's own error is logged here, or nowhere.
            logger.exception(
                "%s: error after %.2f s, not recorded (the index did not answer): %s",
                ctx.job_tag,
                time.monotonic() - started,
                exc,
            )
            raise
        if same_again:
            outcome = "not retried: it fails the same way each time"
        else:
            outcome = "will retry" if state == JobState.RETRY_WAIT else "no attempts left"
        # With its traceback: an unexpected error is worth a bug report.
        logger.exception(
            "%s: error after %.2f s (%s): %s", ctx.job_tag, time.monotonic() - started, outcome, exc
        )
    finally:
        beat_stop.set()
        if current is not None:
            current.value = 0
    return True


def worker_main(
    settings_json: str,
    current: Synchronized[int],
    stop: Synchronized[int],
    work_available: EventLike | None = None,
    results_ready: EventLike | None = None,
) -> None:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: setattr(stop, "value", 1))
    settings = Settings.model_validate_json(settings_json)
    configure_logging(settings.logging)
    if settings.inference.cpu_threads:
        import torch

        torch.set_num_threads(settings.inference.cpu_threads)
    from dicom_node.segment import ModelCache
    from inference.predictor import pick_device

    try:
        device = pick_device(settings.inference.device)
    except ModelError as exc:
        # Before claiming: every job would fail for good (a GPU driver broken by an update,
        # say). The jobs wait in the queue; the supervisor tries again, later and later.
        logger.error(
            "worker %s cannot run jobs: %s; they wait in the queue", worker_label(worker_id()), exc
        )
        sys.exit(3)
    index = Index(
        settings.storage.effective_database_url, migrate=False, fsync=settings.storage.fsync
    )
    store = FileStore(settings.storage.store_dir, 0, fsync=settings.storage.fsync)
    ctx = JobContext(settings, index, store, worker_id(), results_ready)
    models = ModelCache(settings.models_dir, settings.inference)
    label = worker_label(ctx.worker)  # host:pid, as log lines name workers
    logger.info("worker %s ready (inference on %s)", label, device)
    outage = IndexOutage(f"worker {label}", logger)
    while not stop.value:
        if work_available is not None:
            work_available.clear()  # before claiming: a job queued from now on wakes us
        try:
            busy = process_one(ctx, models, current)
        except Exception as exc:  # keep the worker alive
            if not outage.failed(exc):
                logger.exception("worker %s: claiming a job failed", label)
            busy = False
        else:
            outage.succeeded()
        if not busy:
            # Woken by the scheduler in `serve`; polling covers `dicom-node worker` elsewhere.
            if work_available is not None:
                work_available.wait(settings.workers.poll_interval_s)
            else:
                time.sleep(settings.workers.poll_interval_s)
    index.dispose()
    logger.info("worker %s stopped", label)


def _identity(slot: _Slot) -> str | None:
    """The identity (``worker_id``) the slot's worker process claims jobs under; None when
    it has no pid (never started)."""
    pid = slot.process.pid
    return None if pid is None else worker_id(pid)


@dataclass
class _Slot:
    process: multiprocessing.process.BaseProcess
    current: Synchronized[int]
    stop: Synchronized[int]
    job_seen: int = 0
    job_since: float = 0.0
    restarts: Restarts = field(default_factory=Restarts)


class WorkerPool:
    """Starts and supervises worker processes (used by ``serve`` and ``worker``)."""

    STOP_GRACE_S = 30.0

    def __init__(self, settings: Settings, index: Index, processes: int) -> None:
        self.settings = settings
        self.index = index
        self.processes = processes
        self._context = multiprocessing.get_context("spawn")
        # Wake-ups across processes: a job was queued / a SEG awaits delivery.
        self.work_available = self._context.Event()
        self.results_ready = self._context.Event()
        self._slots: list[_Slot] = []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # Jobs whose worker was killed for the time limit, or died under them (out of
        # memory, a crash in a native decoder), not yet marked: job -> (reason, retry_in_s,
        # max_attempts, that worker's identity). Each death costs an attempt, so such a job
        # ends failed instead of killing worker after worker ahead of every newer job.
        self._to_fail: dict[int, tuple[str, float | None, int, str | None]] = {}
        self._clock = time.monotonic

    def _spawn(self, number: int) -> _Slot:
        current = self._context.Value("i", 0)
        stop = self._context.Value("i", 0)
        process = self._context.Process(
            target=worker_main,
            args=(
                self.settings.model_dump_json(),
                current,
                stop,
                self.work_available,
                self.results_ready,
            ),
            name=f"worker-{number}",
        )
        process.start()
        return _Slot(process, current, stop)

    def _start(self, number: int, restarts: Restarts | None = None) -> _Slot:
        slot = self._spawn(number)
        slot.restarts = restarts or Restarts()
        slot.restarts.restarted(self._clock())
        return slot

    def start(self) -> None:
        released = release_orphaned_jobs(self.index)
        if released:
            logger.info("%d jobs of stopped workers will be run again", released)
        self._slots = [self._start(n) for n in range(1, self.processes + 1)]
        self._thread = threading.Thread(target=self._supervise, name="worker-pool", daemon=True)
        self._thread.start()

    def _supervise(self) -> None:
        outage = IndexOutage("worker supervisor", logger, announce_recovery=False)
        while not self._stopping.wait(1.0):
            try:
                self._supervise_once()
            except Exception as exc:  # an uncaught error would end supervision for good
                if not outage.failed(exc):
                    logger.exception("supervising the workers failed")
            else:
                outage.succeeded()
        self._stop_workers()

    def _supervise_once(self) -> None:
        timeout = self.settings.workers.job_timeout_s
        for number, slot in enumerate(self._slots, start=1):
            job = slot.current.value
            now = self._clock()
            if job != slot.job_seen:
                slot.job_seen, slot.job_since = job, now
            stopped = False  # by this supervisor, on purpose
            if job and self._cancelled(job):
                # The operator cancelled it (`jobs cancel`): free the worker now. The
                # respawn below starts a fresh one.
                if self._kill_running(slot, job):
                    # At INFO: the operator asked for it.
                    logger.info(
                        "%s was cancelled; stopping its worker", index_job_tag(self.index, job)
                    )
                    slot.current.value = 0
                    stopped = True
            elif job and (holder := self._taken_over(job, slot)) is not None:
                # Its heartbeat looked lapsed (the index was away, or a clock stepped): the
                # other run stands, this one's result would not be recorded. Run on, the
                # job would take two machines' time at once.
                if self._kill_running(slot, job):
                    logger.warning(
                        "%s was taken over by worker %s (this worker's heartbeat looked "
                        "lapsed: an index outage or a clock step); stopping this worker's run",
                        index_job_tag(self.index, job),
                        worker_label(holder),
                    )
                    slot.current.value = 0
                    stopped = True
            elif job and now - slot.job_since > timeout and self._kill_running(slot, job):
                logger.error(
                    "%s exceeded workers.job_timeout_s=%.0f s; stopping it",
                    index_job_tag(self.index, job),
                    timeout,
                )
                reason = f"timed out after {timeout:.0f} s (workers.job_timeout_s)"
                self._to_fail[job] = (reason, None, 0, _identity(slot))
                stopped = True
            if slot.process.is_alive() or self._stopping.is_set():
                continue
            if slot.restarts.due is None:
                self._handle_exit(slot, stopped, now)
            if now >= (slot.restarts.due or 0.0):
                # Started before its jobs are released: that needs the index, which
                # may be the reason it exited.
                self._slots[number - 1] = self._start(number, slot.restarts)
                release_orphaned_jobs(self.index, keep=self._to_fail.keys())
        # Marked after the replacement is started (and again next round while the index is
        # away), so that a stopped worker is replaced whatever the index does.
        for job, (reason, retry_in_s, max_attempts, worker) in sorted(self._to_fail.items()):
            # Only while it is still that worker's: once its heartbeat lapsed (the index
            # was away meanwhile) a worker elsewhere may run it, and that attempt stands.
            fail_job(
                self.index,
                job,
                reason,
                retry_in_s=retry_in_s,
                max_attempts=max_attempts,
                worker=worker,
            )
            del self._to_fail[job]

    @staticmethod
    def _kill_running(slot: _Slot, job: int) -> bool:
        """Kill the worker if it is still running ``job``. While the index was asked about
        it, the worker may have finished it and claimed the next; holding the lock of
        ``current`` keeps it from moving on (it sets ``current`` under that lock) until the
        kill is done."""
        with slot.current.get_lock():
            if slot.current.value != job:
                return False
            slot.process.kill()
            slot.process.join(5)
            return True

    def _handle_exit(self, slot: _Slot, stopped: bool, now: float) -> None:
        """Log a worker's exit once, mark the job it held, and choose when it starts again."""
        code = slot.process.exitcode
        held = slot.current.value
        slot.current.value = 0
        delay = slot.restarts.exited(now, on_purpose=stopped)
        again = f"starting it again in {delay:.0f} s" if delay else "starting a new worker"
        if held and held not in self._to_fail:
            logger.error(
                "%s: worker %s died (exit code %s) while running it; %s",
                index_job_tag(self.index, held),
                slot.process.name,
                code,
                again,
            )
            self._to_fail[held] = (
                f"its worker process died (exit code {code}) while running it",
                self.settings.workers.retry_delay_s,
                self.settings.workers.max_attempts,
                _identity(slot),
            )
        elif delay:
            logger.error(
                "worker %s exited (code %s) %s; %s",
                slot.process.name,
                code,
                slot.restarts.in_a_row(),
                again,
            )
        else:
            logger.warning("worker %s exited (code %s); %s", slot.process.name, code, again)

    def _taken_over(self, job_id: int, slot: _Slot) -> str | None:
        identity = _identity(slot)
        if identity is None:
            return None
        try:
            return taken_over(self.index, job_id, identity)
        except Exception:  # the index may be briefly locked: look again next round
            return None

    def _cancelled(self, job_id: int) -> bool:
        try:
            return cancel_requested(self.index, job_id)
        except Exception:  # the index may be briefly locked: look again next round
            return False

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=self.STOP_GRACE_S + 10)  # it stops the workers
        else:
            self._stop_workers()
        release_orphaned_jobs(self.index)

    def _stop_workers(self) -> None:
        """Let each worker finish its job for up to STOP_GRACE_S, then kill it.

        Run by the supervisor thread as it ends: a worker it started again dies with the
        thread that started it (PR_SET_PDEATHSIG), which must outlive that grace period.
        """
        for slot in self._slots:
            slot.stop.value = 1
        deadline = time.monotonic() + self.STOP_GRACE_S
        for slot in self._slots:
            slot.process.join(max(0.1, deadline - time.monotonic()))
            if slot.process.is_alive():
                logger.warning(
                    "worker %s still busy after %.0f s; killing it",
                    slot.process.name,
                    self.STOP_GRACE_S,
                )
                slot.process.kill()
                slot.process.join(5)
