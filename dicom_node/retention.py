"""Automatic retention: prune finished series older than ``storage.retention``, hourly.

The node's store is a working copy (the PACS keeps the originals and the SEG): without
retention it grows until the free-space floor refuses new images.
"""

from __future__ import annotations

import logging

from dicom_node.config import Settings
from dicom_node.periodic import Periodic
from storage.database import Index
from storage.filestore import FileStore
from storage.retention import finish_removals, parse_duration, prune

logger = logging.getLogger(__name__)


class RetentionSweeper:
    """A service component: prunes at start and every ``storage.retention_check_interval_s``."""

    def __init__(self, settings: Settings, index: Index, store: FileStore) -> None:
        assert settings.storage.retention is not None
        self.retention = settings.storage.retention
        self.older_than = parse_duration(self.retention)
        self.interval_s = settings.storage.retention_check_interval_s
        self.index = index
        self.store = store
        self._rounds = Periodic(
            "retention",
            self.sweep,
            self.interval_s,
            failure="retention: pruning failed",
            log=logger,
            join_timeout_s=30,
        )

    def sweep(self) -> None:
        # First the removals left unfinished: by this process (a prune whose transaction
        # failed), by a process gone since, or by a machine whose record is stale (one
        # that never came back, a container restarted in a new PID namespace). Otherwise
        # only a restart finished them, and `store check` listed them meanwhile.
        finish_removals(self.index, self.store)
        result = prune(self.index, self.store, self.older_than)
        if result.series:
            logger.info(
                "retention: pruned %d series (%d images, %.1f MB) finished more than %s ago",
                len(result.series),
                result.instances,
                result.bytes_freed / 1e6,
                self.retention,
            )

    def start(self) -> None:
        logger.info(
            "retention: series finished more than %s ago are pruned every %g s",
            self.retention,
            self.interval_s,
        )
        self._rounds.start()

    def stop(self) -> None:
        self._rounds.stop()
