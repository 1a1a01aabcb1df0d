"""Series completion: a persisted quiet period, or the sender's release with the count met.

All state lives in the index, so a restarted node resumes every pending series.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from dicom_node.config import CompletionSettings
from dicom_node.periodic import Periodic
from storage.database import Index
from storage.instances import CompletedSeries, complete_due_series

logger = logging.getLogger(__name__)

CompletionListener = Callable[[CompletedSeries], None]


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
        self._rounds = Periodic(
            "completion",
            self.check_once,
            settings.check_interval_s,
            failure="series completion check failed",
            log=logger,
        )

    def check_once(self) -> list[CompletedSeries]:
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
