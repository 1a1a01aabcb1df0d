"""Scheduler: completed series versions -> routing rules -> queued jobs.

Driven by the index, not by memory: a version is routed once (``routed_at``), so a node
killed between completion and routing routes it after restart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_node.config import RuleSettings, Settings
from dicom_node.errors import DicomNodeError
from dicom_node.periodic import Periodic
from dicom_node.routing import SeriesFacts, route
from dicom_node.rule_models import (
    rule_caller_problems,
    rule_match_problems,
    rule_model_problems,
)
from storage.database import Index
from storage.instances import up_to_version
from storage.models import Instance, Job, JobState, Series, SeriesState, SeriesVersion, utcnow
from storage.queue import JobSpec, create_job, job_for, retry_job

logger = logging.getLogger(__name__)


def facts_from_index(session: Session, series: Series, version: SeriesVersion) -> SeriesFacts:
    """What the rules see of ``version``: the series as its job will read it, every image
    up to this version (a later version's job segments the whole series, not its own late
    images, so a rule's image count must not see only those)."""
    sop_classes = session.scalars(
        select(Instance.sop_class_uid).where(Instance.series_pk == series.id).distinct()
    ).all()
    image_count = session.scalar(
        select(func.count(Instance.id)).where(*up_to_version(series.id, version.version))
    )
    return SeriesFacts(
        series_instance_uid=series.series_instance_uid,
        modality=series.modality,
        series_description=series.series_description,
        protocol_name=series.protocol_name,
        image_type=tuple(v for v in series.image_type.split("\\") if v),
        body_part_examined=series.body_part_examined,
        calling_ae_title=series.calling_ae_title,
        image_count=int(image_count or 0),
        sop_class_uids=tuple(sorted(sop_classes)),
    )


@dataclass(frozen=True)
class QueuedJob:
    job_id: int
    rule_name: str
    model_name: str
    version: int
    again: bool  # an earlier job of this version and rule was queued again


def _spec(rule: RuleSettings) -> JobSpec:
    return JobSpec(
        rule_name=rule.name,
        model_name=rule.model,
        profile=rule.profile.model_dump(),
        destinations=list(rule.destinations),
    )


def queue_series(
    settings: Settings, index: Index, series_instance_uid: str, rule_name: str | None = None
) -> QueuedJob:
    """An operator's request: process a stored series now, by the rule that matches it or
    by the rule named, e.g. one added after the series arrived and was kept unprocessed.

    Takes the newest complete version. A finished job of that version and rule is queued
    again with the rule as configured now (model, profile, destinations).
    """
    with index.session() as session:
        row = session.execute(
            select(SeriesVersion, Series)
            .join(Series, SeriesVersion.series_pk == Series.id)
            .where(
                Series.series_instance_uid == series_instance_uid,
                SeriesVersion.state == SeriesState.COMPLETE,
            )
            .order_by(SeriesVersion.version.desc())
            .limit(1)
        ).first()
        if row is None:
            raise DicomNodeError(
                f"series {series_instance_uid} has no complete version in the index "
                "(not received, or still receiving: see `dicom-node series show`)"
            )
        version, series = row
        decision = route(settings.rules, facts_from_index(session, series, version))
    if decision.not_images is not None:  # by any rule: no model reads them
        raise DicomNodeError(f"series {series_instance_uid}: {decision.not_images}")
    if rule_name is not None:
        rule = next((r for r in settings.rules if r.name == rule_name), None)
        if rule is None:
            names = ", ".join(r.name for r in settings.rules) or "none configured"
            raise DicomNodeError(f"no rule named {rule_name!r} (rules: {names})")
    else:
        if decision.rule is None:
            raise DicomNodeError(
                f"no routing rule matches series {series_instance_uid} "
                f"({decision.summary()}); name one with --rule"
            )
        rule = decision.rule
    spec = _spec(rule)
    job_id = create_job(index, version.id, spec)
    again = False
    if job_id is None:  # this version already has a job for this rule
        existing = job_for(index, version.id, rule.name)
        assert existing is not None
        if not retry_job(index, existing.id, spec):
            raise DicomNodeError(
                f"job {existing.id} (series {series_instance_uid} version {version.version}, "
                f"rule {rule.name}) is {existing.state.value} already"
            )
        job_id, again = existing.id, True
    with index.session() as session, session.begin():
        row_version = session.get(SeriesVersion, version.id)
        if row_version is not None and row_version.routed_at is None:
            row_version.routed_at = utcnow()  # the scheduler need not route it as well
    logger.info(
        "job %d queued%s by an operator: series %s version %d, rule %s, model %s",
        job_id,
        " again" if again else "",
        series_instance_uid,
        version.version,
        rule.name,
        rule.model,
    )
    return QueuedJob(job_id, rule.name, rule.model, version.version, again)


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
        self._rounds = Periodic(
            "scheduler",
            self.route_pending,
            settings.completion.check_interval_s,
            failure="routing completed series failed",
            log=logger,
        )

    def wake(self, *_: object) -> None:
        self._rounds.wake()

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
            with self.index.session() as session:
                facts = facts_from_index(session, series, version)
            decision = route(self.settings.rules, facts)
            spec: JobSpec | None = None
            if decision.not_images is not None:
                logger.info(
                    "series %s version %d: kept, not processed: %s",
                    series.series_instance_uid,
                    version.version,
                    decision.not_images,
                )
            elif decision.rule is None:
                spec = self._continued(series, version, decision.summary())
            else:
                spec = _spec(decision.rule)
            if spec is not None:
                job_id = create_job(self.index, version.id, spec)
                if job_id is not None:
                    queued += 1
                    if self.on_queued is not None:
                        self.on_queued()
                    logger.info(
                        "job %d queued: series %s version %d, rule %s, model %s",
                        job_id,
                        series.series_instance_uid,
                        version.version,
                        spec.rule_name,
                        spec.model_name,
                    )
            with self.index.session() as session, session.begin():
                row = session.get(SeriesVersion, version.id)
                if row is not None:
                    row.routed_at = utcnow()
        return queued

    def _continued(self, series: Series, version: SeriesVersion, reasons: str) -> JobSpec | None:
        """The job a version that no rule matches gets all the same: the rule of the series'
        previous job when that job made no SEG and was not cancelled. A later version
        supersedes a job that has not run yet (see ``worker.run_job``); without this, a
        version that matches no rule any more (sent again from another AE title, past a
        rule's max_images) left the series without any SEG. After a SEG it stays kept: a
        PACS forwarding the study back must not start a round trip."""
        with self.index.session() as session:
            row = session.execute(
                select(Job, SeriesVersion.version)
                .join(SeriesVersion, Job.series_version_pk == SeriesVersion.id)
                .where(
                    SeriesVersion.series_pk == series.id, SeriesVersion.version < version.version
                )
                .order_by(SeriesVersion.version.desc(), Job.id.desc())
                .limit(1)
            ).first()
        previous, before = row if row is not None else (None, 0)
        if previous is None or previous.state == JobState.CANCELLED or previous.seg_path:
            logger.info(
                "series %s version %d: no routing rule matches; kept, not processed (%s)",
                series.series_instance_uid,
                version.version,
                reasons,
            )
            return None
        rule = next((r for r in self.settings.rules if r.name == previous.rule_name), None)
        logger.info(
            "series %s version %d: no routing rule matches (%s); processed under rule %s all "
            "the same, as was version %d's job %d, which has made no SEG (%s)",
            series.series_instance_uid,
            version.version,
            reasons,
            previous.rule_name,
            before,
            previous.id,
            previous.reason or previous.state.value,
        )
        if rule is not None:  # the rule as configured now
            return _spec(rule)
        return JobSpec(  # queued by an operator with a rule since removed: as it was queued
            previous.rule_name, previous.model_name, previous.profile, previous.destinations
        )

    def start(self) -> None:
        for problem in rule_model_problems(self.settings):
            if not self.settings.workers.processes:  # the workers are elsewhere: theirs count
                logger.info(
                    "%s (this node runs no inference workers: the machines running "
                    "`dicom-node worker` need the model)",
                    problem,
                )
            elif problem.stops_jobs:
                logger.warning("%s: its jobs will fail", problem)
            else:
                logger.warning("%s", problem)
        for problem in rule_caller_problems(self.settings) + rule_match_problems(self.settings):
            logger.warning("%s", problem)
        self._rounds.start()

    def stop(self) -> None:
        self._rounds.stop()
