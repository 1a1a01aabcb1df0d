"""Counts over the index for `dicom-node status` and the metrics endpoint."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, or_, select

from storage.database import Index
from storage.models import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    SeriesState,
    SeriesVersion,
    utcnow,
)


@dataclass(frozen=True)
class IndexCounts:
    instances: int
    series_versions: dict[str, int]  # by state: receiving, complete
    jobs: dict[str, int]  # by state; states without jobs are 0
    deliveries: dict[str, int]  # by state; states without deliveries are 0
    jobs_failed_24h: int
    # How long the job waiting longest for a worker has waited (queued, or due for a retry),
    # in seconds; None when none waits. Grows while no worker can run jobs.
    oldest_waiting_job_s: float | None = None

    @property
    def queue_depth(self) -> int:
        return self.jobs[JobState.QUEUED.value] + self.jobs[JobState.RETRY_WAIT.value]


def index_counts(index: Index) -> IndexCounts:
    """One read of every count (a few grouped COUNTs; cheap enough for each scrape)."""
    since = utcnow() - dt.timedelta(hours=24)
    with index.session() as session:

        def by_state(column: Any, key: Any) -> dict[str, int]:
            rows = session.execute(select(column, func.count(key)).group_by(column)).all()
            return {str(getattr(state, "value", state)): int(n) for state, n in rows}

        versions = by_state(SeriesVersion.state, SeriesVersion.id)
        jobs = by_state(Job.state, Job.id)
        deliveries = by_state(Delivery.state, Delivery.id)
        instances = int(session.scalar(select(func.count(Instance.id))) or 0)
        failed = session.scalar(
            select(func.count(Job.id)).where(Job.state == JobState.FAILED, Job.finished_at >= since)
        )
        now = utcnow()
        # Waiting since: queued (retry_job sets next_attempt_at to when), or due for a retry.
        waiting_since = session.scalar(
            select(func.min(func.coalesce(Job.next_attempt_at, Job.created_at))).where(
                or_(
                    Job.state == JobState.QUEUED,
                    and_(Job.state == JobState.RETRY_WAIT, Job.next_attempt_at <= now),
                )
            )
        )
    return IndexCounts(
        instances=instances,
        series_versions={s.value: versions.get(s.value, 0) for s in SeriesState},
        jobs={s.value: jobs.get(s.value, 0) for s in JobState},
        deliveries={s.value: deliveries.get(s.value, 0) for s in DeliveryState},
        jobs_failed_24h=int(failed or 0),
        oldest_waiting_job_s=None
        if waiting_since is None
        else max(0.0, (now - waiting_since).total_seconds()),
    )
