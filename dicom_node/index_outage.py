"""Index outages in the node's log: a line when the index goes, one when it is back.

A PostgreSQL restart or failover, or a SQLite file on a failing disk, makes every round of
every loop fail (completion, routing, the outbox, each worker: twice a second). A traceback
per round buried everything else in the log; a loop now says once that the index is
unavailable and why, keeps trying, and says when it answers again. Any other error is a
defect and keeps its traceback.
"""

from __future__ import annotations

import logging
import time

from storage.database import unavailable_reason


class IndexOutage:
    """What one loop (``what``) has said about the index; call after every round.

    ``announce_recovery``: False for a loop whose rounds do not all use the index (the
    worker supervisor), where a round that succeeds says nothing about the index.
    """

    def __init__(self, what: str, log: logging.Logger, *, announce_recovery: bool = True) -> None:
        self.what = what
        self.log = log
        self.announce_recovery = announce_recovery
        self._since: float | None = None

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    def failed(self, exc: BaseException) -> bool:
        """True if ``exc`` is the index being unavailable (logged once per outage); False
        for any other error, which the caller logs itself."""
        reason = unavailable_reason(exc)
        if reason is None:
            return False
        if self._since is None:
            self._since = time.monotonic()
            self.log.error(
                "%s: index unavailable, retrying until it answers: %s", self.what, reason
            )
        return True

    def succeeded(self) -> None:
        if self._since is not None and self.announce_recovery:
            self.log.warning(
                "%s: index available again after %.0f s", self.what, time.monotonic() - self._since
            )
        self._since = None


def log_failure(log: logging.Logger, exc: BaseException, message: str, *args: object) -> None:
    """Log a one-off failure (call from its ``except`` block): one ERROR line ending in
    ``: index unavailable: <reason>`` when the index is away, the traceback otherwise."""
    reason = unavailable_reason(exc)
    if reason is None:
        log.exception(message, *args)
    else:
        log.error(message + ": index unavailable: %s", *args, reason)
