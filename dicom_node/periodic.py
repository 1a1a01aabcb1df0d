"""A round of background work every few seconds on a daemon thread, until stopped.

The service's pollers (series completion, the scheduler, retention) are each one of these.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from dicom_node.index_outage import IndexOutage


class Periodic:
    """Calls ``work`` every ``interval_s`` until ``stop()``; ``wake()`` starts a round early.

    An exception is logged (with ``failure``, on the owner's logger) and the next round tries
    again: the node keeps running. An unavailable index is logged once, not every round.
    """

    def __init__(
        self,
        name: str,
        work: Callable[[], object],
        interval_s: float,
        *,
        failure: str,
        log: logging.Logger,
        join_timeout_s: float = 10.0,
    ) -> None:
        self.name = name
        self.work = work
        self.interval_s = interval_s
        self.failure = failure
        self.log = log
        self.join_timeout_s = join_timeout_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._outage = IndexOutage(name, log)

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.work()
            except Exception as exc:
                if not self._outage.failed(exc):
                    self.log.exception(self.failure)
            else:
                self._outage.succeeded()
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.join_timeout_s)
