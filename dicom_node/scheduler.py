"""Scheduler: completed series versions -> routing rules -> queued jobs.

Driven by the index, not by memory: a version is routed once (``routed_at``), so a node
killed between completion and routing routes it after restart.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import select

from dicom_node.config import Settings
from dicom_node.routing import SeriesFacts, route
from storage.database import Index
from storage.models import Series, SeriesState, SeriesVersion, utcnow
from storage.queue import JobSpec, create_job

logger = logging.getLogger(__name__)


def facts_from_index(series: Series, version: SeriesVersion) -> SeriesFacts:
    return SeriesFacts(
        series_instance_uid=series.series_instance_uid,
        modality=series.modality,
        series_description=series.series_description,
        protocol_name=series.protocol_name,
        image_type=tuple(v for v in series.image_type.split("\\") if v),
        body_part_examined=series.body_part_examined,
        calling_ae_title=series.calling_ae_title,
        image_count=version.instance_count,
    )


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        index: Index,
        on_queued: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.index = index
        self.on_queued = on_queued  # wakes idle workers
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def wake(self, *_: object) -> None:
        self._wake.set()

    def route_pending(self) -> int:
        """Route every completed, unrouted series version; returns how many jobs were queued."""
        queued = 0
        with self.index.session() as session:
            pending = session.execute(
                select(SeriesVersion, Series)
                .join(Series, SeriesVersion.series_pk == Series.id)
                .where(
                    SeriesVersion.state == SeriesState.COMPLETE, SeriesVersion.routed_at.is_(None)
                )
                .order_by(SeriesVersion.completed_at)
            ).all()
        for version, series in pending:
            facts = facts_from_index(series, version)
            decision = route(self.settings.rules, facts)
            rule = decision.rule
            if rule is None:
                logger.info(
                    "series %s version %d: no routing rule matches; kept, not processed (%s)",
                    series.series_instance_uid,
                    version.version,
                    " | ".join(f"{v.rule}: {'; '.join(v.reasons)}" for v in decision.verdicts)
                    or "no rules configured",
                )
            else:
                job_id = create_job(
                    self.index,
                    version.id,
                    JobSpec(
                        rule_name=rule.name,
                        model_name=rule.model,
                        profile=rule.profile.model_dump(),
                        destinations=list(rule.destinations),
                    ),
                )
                if job_id is not None:
                    queued += 1
                    if self.on_queued is not None:
                        self.on_queued()
                    logger.info(
                        "job %d queued: series %s version %d, rule %s, model %s",
                        job_id,
                        series.series_instance_uid,
                        version.version,
                        rule.name,
                        rule.model,
                    )
            with self.index.session() as session, session.begin():
                row = session.get(SeriesVersion, version.id)
                if row is not None:
                    row.routed_at = utcnow()
        return queued

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.route_pending()
            except Exception:  # keep scheduling; the index may be briefly locked
                logger.exception("routing completed series failed")
            self._wake.wait(self.settings.completion.check_interval_s)
            self._wake.clear()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
