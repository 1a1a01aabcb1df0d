"""Automatic retention: prune finished series older than ``storage.retention``, hourly.

The node's store is a working copy (the PACS keeps the originals and the SEG): without
retention it grows until the free-space floor refuses new images.
"""

from __future__ import annotations

import logging
import threading

from dicom_node.config import Settings
from storage.database import Index
from storage.filestore import FileStore
from storage.retention import parse_duration, prune

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
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> None:
        result = prune(self.index, self.store, self.older_than)
        if result.series:
            logger.info(
                "retention: pruned %d series (%d images, %.1f MB) finished more than %s ago",
                len(result.series),
                result.instances,
                result.bytes_freed / 1e6,
                self.retention,
            )

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception:  # keep the node running; the next sweep tries again
                logger.exception("retention: pruning failed")
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        logger.info(
            "retention: series finished more than %s ago are pruned every %g s",
            self.retention,
            self.interval_s,
        )
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
