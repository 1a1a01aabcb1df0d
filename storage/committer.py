"""Group commit: concurrent stores share one index transaction.

Each C-STORE calls :meth:`GroupCommitter.commit` on an index thread with a future for its
file, which the store's own thread is writing meanwhile (written, fdatasynced, renamed,
folder fsynced). The first caller to find no commit running becomes the leader: it takes
every record queued so far, runs the statements for all rows in one transaction while the
files are written, waits for every file, commits, and wakes the others, each with its own
result or error. Callers arriving meanwhile queue up for the next leader. A lone
association is its own leader at once: it never waits for another store's commit.
"""

from __future__ import annotations

import functools
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from dicom_node.errors import StorageError
from storage.database import Index
from storage.filestore import WrittenFile
from storage.instances import CommitOutcomeUnknown, InstanceRecord, InstanceWriter, Recorded

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    record: InstanceRecord
    ready: Future[Any] | None = None
    result: Recorded | None = None
    error: Exception | None = None
    done: bool = False


class GroupCommitter:
    def __init__(self, index: Index) -> None:
        self.writer = InstanceWriter(index)
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._committing = False

    def commit(self, record: InstanceRecord, ready: Future[Any] | None = None) -> Recorded:
        """Make ``record``'s row durable once its file is; raise on failure.

        ``ready``: the file being made durable on another thread; the row is committed only
        after it succeeded (its error fails this record), so an index row never names a
        file a power loss could undo. Returns only once both are durable (or raises the
        error of this record).
        """
        pending = _Pending(record, ready)
        with self._cond:
            self._queue.append(pending)
            while not pending.done:
                if self._committing:
                    self._cond.wait()
                    continue
                batch, self._queue = self._queue, []
                self._committing = True
                self._cond.release()
                try:
                    self._commit_batch(batch)
                finally:
                    self._cond.acquire()
                    self._committing = False
                    self._cond.notify_all()
        if pending.error is not None:
            raise pending.error
        if pending.result is None:  # unreachable: _commit_batch sets one or the other
            raise StorageError("the index commit returned no result")
        return pending.result

    def _commit_batch(self, batch: list[_Pending]) -> None:
        """Never raises: every pending item ends with a result or its error."""
        try:
            results = self.writer.record(
                [pending.record for pending in batch], lambda: _wait_ready(batch)
            )
        except Exception as exc:
            if len(batch) == 1 or isinstance(exc, CommitOutcomeUnknown):
                # Unknown: the batch's rows may have committed; recording them again one by
                # one, and failing, would tell each store its row surely did not.
                for pending in batch:
                    pending.error = exc
            else:
                # One bad record must not fail the others: record each on its own.
                logger.warning(
                    "group commit of %d records failed; recording one by one", len(batch)
                )
                for pending in batch:
                    try:
                        pending.result = self.writer.record(
                            [pending.record], functools.partial(_wait_ready, [pending])
                        )[0]
                    except Exception as own:
                        pending.error = own
        else:
            for pending, result in zip(batch, results, strict=True):
                pending.result = result
        for pending in batch:
            pending.done = True


def _wait_ready(batch: list[_Pending]) -> None:
    """Block until every file in ``batch`` is durable; raise the first failure."""
    for pending in batch:
        if pending.ready is not None:
            written = pending.ready.result()
            if isinstance(written, WrittenFile):
                # Checked after the statements, which waited for a removal's locks on the
                # series: a removal takes its images aside before it commits.
                written.check_still_there()
