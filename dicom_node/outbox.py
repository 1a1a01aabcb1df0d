"""Outbox: deliver each SEG to each destination, with backoff, surviving restarts.

Exactly once at the PACS: a SEG's SOP Instance UID is derived from its inputs, so a send
repeated after a crash replaces rather than duplicates.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time

from sqlalchemy import select, update

from dicom_node.config import Settings
from dicom_node.errors import DeliveryError
from dicom_node.index_outage import IndexOutage
from dicom_node.send import store_seg, stow_seg
from dicom_node.worker import EventLike, fallback_path, gone_here, worker_id
from storage.database import Index
from storage.filestore import FileStore
from storage.models import Delivery, DeliveryState, Job, utcnow
from storage.queue import (
    claim_delivery,
    delivery_done,
    delivery_failed,
    postpone_destination,
    worker_label,
)

logger = logging.getLogger(__name__)


def release_interrupted(index: Index) -> int:
    """Sends cut off by this node's crash are due again now; returns how many.

    On SQLite, every delivery being sent: one machine holds the index and runs its one
    outbox (`serve`), which is starting. On PostgreSQL, several machines' outboxes share
    the index: only those whose sender (``worker_id``) was a process of this host and PID
    namespace that has ended. Releasing every one sent another machine's send in progress
    a second time, at once; those, and sends of a container since restarted (a new PID
    namespace), are taken again once their lease (outbox.lease_s) lapses."""
    mine_only = index.engine.dialect.name != "sqlite"
    released = 0
    others: list[str] = []
    with index.session() as session, session.begin():
        sending = session.execute(
            select(Delivery.id, Delivery.sender).where(Delivery.state == DeliveryState.SENDING)
        ).all()
        for delivery_id, sender in sending:
            if mine_only and not (sender and gone_here(sender)):
                others.append(f"delivery {delivery_id} by {worker_label(sender or '?')}")
                continue
            result = session.execute(
                update(Delivery)
                # Its sender unchanged: not one another outbox took over meanwhile.
                .where(
                    Delivery.id == delivery_id,
                    Delivery.state == DeliveryState.SENDING,
                    Delivery.sender.is_(None) if sender is None else Delivery.sender == sender,
                )
                .values(state=DeliveryState.PENDING, next_attempt_at=utcnow())
            )
            released += int(result.rowcount)  # type: ignore[attr-defined]
    if others:
        logger.info(
            "%d deliveries are being sent by other processes, left to them (sent again if "
            "their lease, outbox.lease_s, lapses): %s",
            len(others),
            ", ".join(others),
        )
    return released


class Outbox:
    def __init__(
        self,
        settings: Settings,
        index: Index,
        store: FileStore,
        wake: EventLike | None = None,
    ) -> None:
        self.settings = settings
        self.index = index
        self.store = store
        self.wake = wake  # set by workers when a SEG is ready
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._outage = IndexOutage("outbox", logger)
        self.sender = worker_id()  # recorded on each claim: see release_interrupted

    def send(self, delivery: Delivery) -> str:
        path = self.store.absolute(delivery.seg_path)
        if not path.exists():
            raise DeliveryError(
                f"SEG file {path} is missing: `dicom-node jobs retry {delivery.job_pk}` makes "
                "it again and sends it",
                retryable=False,
            )
        name = delivery.resolved_peer or delivery.destination
        fallback = self.store.absolute(fallback_path(delivery.seg_path))
        if not fallback.exists():  # written by a release before 2026-12: one per job
            fallback = path.parent / "fallback-binary.dcm"
        binary = fallback if fallback.exists() else None
        peer = self.settings.peer_by_name(name)
        if peer is not None:
            return store_seg(self.settings, peer, path, binary)
        for web in self.settings.dicomweb:
            if web.name == name:
                return stow_seg(web, path, binary)
        raise DeliveryError(f"destination {name!r} is no longer configured", retryable=False)

    def deliver_one(self) -> bool:
        delivery = claim_delivery(self.index, self.settings.outbox.lease_s, sender=self.sender)
        if delivery is None:
            return False
        with self.index.session() as session:
            job = session.get(Job, delivery.job_pk)
            version = job.series_version if job else None
            series = version.series if version else None
            study_uid = series.study.study_instance_uid if series else "?"
            series_uid = series.series_instance_uid if series else "?"
        tag = (
            f"delivery {delivery.id} job {delivery.job_pk} study {study_uid} series {series_uid} "
            f"-> {delivery.resolved_peer or delivery.destination}"
        )
        started = time.monotonic()
        try:
            note = self.send(delivery)
        except DeliveryError as exc:
            outbox = self.settings.outbox
            try:
                state, delay = delivery_failed(
                    self.index,
                    delivery.id,
                    str(exc),
                    retryable=exc.retryable,
                    max_attempts=outbox.max_attempts,
                    backoff_initial_s=outbox.backoff_initial_s,
                    backoff_max_s=outbox.backoff_max_s,
                    attempt=delivery.attempts,
                    sender=delivery.sender,
                )
            except Exception:
                # The peer's answer is in no row: the log is where the operator finds it.
                logger.error(
                    "%s: attempt %d failed: %s; the index could not record it (tried "
                    "again once its lease, outbox.lease_s, lapses)",
                    tag,
                    delivery.attempts,
                    exc,
                )
                raise
            if state == DeliveryState.DEAD:
                logger.error(
                    "%s: attempt %d failed, dead-lettered: %s", tag, delivery.attempts, exc
                )
            else:
                logger.warning(
                    "%s: attempt %d failed, retry in %.0f s: %s",
                    tag,
                    delivery.attempts,
                    delay or 0,
                    exc,
                )
                if exc.peer_down and delay:
                    name = delivery.resolved_peer or delivery.destination
                    waiting = postpone_destination(
                        self.index, name, utcnow() + dt.timedelta(seconds=delay)
                    )
                    if waiting:
                        logger.warning(
                            "%s is down: its %d other pending deliveries wait %.0f s too, "
                            "so deliveries to other destinations go first",
                            name,
                            waiting,
                            delay,
                        )
            return True
        except Exception as exc:  # unexpected: keep the outbox alive, retry later
            logger.exception("%s: unexpected error", tag)
            delivery_failed(
                self.index,
                delivery.id,
                f"{type(exc).__name__}: {exc}",
                retryable=True,
                max_attempts=self.settings.outbox.max_attempts,
                backoff_initial_s=self.settings.outbox.backoff_initial_s,
                backoff_max_s=self.settings.outbox.backoff_max_s,
                attempt=delivery.attempts,
                sender=delivery.sender,
            )
            return True
        elapsed = time.monotonic() - started
        try:
            done = delivery_done(
                self.index,
                delivery.id,
                elapsed,
                note,
                attempt=delivery.attempts,
                sender=delivery.sender,
            )
        except Exception:
            logger.error(
                "%s: SEG %s sent in %.2f s, but the index could not record it: it is sent "
                "again once its lease lapses (the PACS holds one copy of a UID)",
                tag,
                delivery.sop_instance_uid,
                elapsed,
            )
            raise
        if not done:
            # Its job ran again meanwhile and queued its new SEG on this delivery.
            logger.info(
                "%s: SEG %s sent in %.2f s, superseded meanwhile by a new run of the job; "
                "its new SEG goes next",
                tag,
                delivery.sop_instance_uid,
                elapsed,
            )
            return True
        logger.info(
            "%s: SEG %s delivered in %.2f s%s",
            tag,
            delivery.sop_instance_uid,
            elapsed,
            f" ({note})" if note else "",
        )
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.wake is not None:
                self.wake.clear()  # before looking: a SEG finished from now on wakes us
            try:
                busy = self.deliver_one()
            except Exception as exc:
                if not self._outage.failed(exc):
                    logger.exception("outbox loop error")
                busy = False
            else:
                self._outage.succeeded()
            if not busy:
                if self.wake is not None:
                    self.wake.wait(self.settings.outbox.poll_interval_s)
                else:
                    self._stop.wait(self.settings.outbox.poll_interval_s)

    def start(self) -> None:
        released = release_interrupted(self.index)
        if released:
            logger.info("%d deliveries interrupted by a restart are due again", released)
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
