"""Series completion: a persisted quiet period, or the sender's release with the count met.

All state lives in the index, so a restarted node resumes every pending series.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable

from sqlalchemy import and_, select, update

from dicom_node.config import CompletionSettings
from dicom_node.periodic import Periodic
from storage.database import Index, retried_on_conflict
from storage.instances import CompletedSeries, complete_due_series
from storage.models import SeriesState, SeriesVersion, utcnow

logger = logging.getLogger(__name__)

CompletionListener = Callable[[CompletedSeries], None]

# A machine sharing the index whose clock runs ahead stamps every image ahead: the line
# would come every check while it receives.
_AHEAD_WARNING_EVERY_S = 600.0

# Stamps ahead of this clock by less are left alone: another machine on the index whose
# clock runs a little ahead (warned of at its start) measures its own series' quiet period
# from them, and a stamp moved back to this machine's "now" completed its series early.
AHEAD_AT_LEAST_S = 60.0


def restart_quiet_periods_ahead(index: Index, quiet_period_s: float = 0.0) -> int:
    """Receiving versions whose last image is stamped ahead of this clock by more than
    ``max(AHEAD_AT_LEAST_S, quiet_period_s)`` count as quiet from now; returns how many.

    The clock was set back since (NTP): a version would otherwise wait out the step as well
    as its quiet period. A smaller step costs at most that much more waiting. The image
    arrived before now, so the quiet period it waits from now is never shorter than the one
    it is owed."""
    now = utcnow()
    margin = max(AHEAD_AT_LEAST_S, quiet_period_s)
    ahead = and_(
        SeriesVersion.state == SeriesState.RECEIVING,
        SeriesVersion.last_received_at > now + dt.timedelta(seconds=margin),
    )
    with index.session() as session:
        # Read first: an UPDATE at each check would take SQLite's write lock from receivers.
        if session.scalar(select(SeriesVersion.id).where(ahead).limit(1)) is None:
            return 0

    def restart() -> int:
        with index.session() as session, session.begin():
            result = session.execute(
                update(SeriesVersion)
                .where(ahead)
                .values(last_received_at=now)
                .execution_options(synchronize_session=False)
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    return retried_on_conflict(restart)


class CompletionMonitor:
    def __init__(
        self,
        index: Index,
        settings: CompletionSettings,
        listeners: list[CompletionListener] | None = None,
    ) -> None:
        self.index = index
        self.settings = settings
        self.listeners = list(listeners or [])
        self._ahead_warned_at: float | None = None
        self._rounds = Periodic(
            "completion",
            self.check_once,
            settings.check_interval_s,
            failure="series completion check failed",
            log=logger,
        )

    def check_once(self) -> list[CompletedSeries]:
        restarted = restart_quiet_periods_ahead(self.index, self.settings.quiet_period_s)
        if restarted:
            now = time.monotonic()
            quiet = self._ahead_warned_at is not None and (
                now - self._ahead_warned_at < _AHEAD_WARNING_EVERY_S
            )
            if not quiet:
                self._ahead_warned_at = now
            logger.log(
                logging.DEBUG if quiet else logging.WARNING,
                "%d receiving series have images stamped ahead of this machine's clock (it "
                "was set back, or another machine's runs ahead): their quiet period counts "
                "from now",
                restarted,
            )
        done = complete_due_series(
            self.index,
            self.settings.quiet_period_s,
            on_release=self.settings.complete_on_release_when_count_matches,
        )
        for item in done:
            logger.info(
                "series %s (study %s) version %d complete: %d instances, %s",
                item.series_instance_uid,
                item.study_instance_uid,
                item.version,
                item.instance_count,
                item.reason,
            )
            if item.short:
                logger.warning(
                    "series %s version %d complete with %d of the %d images its headers "
                    "announce: the sender stopped early (an aborted transfer?); what arrived is "
                    "processed, and images sent later open version %d",
                    item.series_instance_uid,
                    item.version,
                    item.instance_count,
                    item.expected_count,
                    item.version + 1,
                )
            for listener in self.listeners:
                try:
                    listener(item)
                except Exception:  # one listener's fault must not stop completion
                    logger.exception(
                        "completion listener failed for series %s", item.series_instance_uid
                    )
        return done

    def start(self) -> None:
        self._rounds.start()

    def stop(self) -> None:
        self._rounds.stop()
