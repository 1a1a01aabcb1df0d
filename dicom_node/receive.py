"""Receive: the C-STORE and C-ECHO handlers of the Storage SCP.

A handler never raises: every failure becomes a DICOM status and a log line naming the
cause. Success (0x0000) goes out only after the file and its index row are durable.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import weakref
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from pydicom import Dataset
from pynetdicom._globals import APPLICATION_CONTEXT_NAME
from pynetdicom.association import Association
from pynetdicom.events import Event

from dicom_node.errors import StorageError
from dicom_node.header_values import text
from dicom_node.health import is_own_check
from dicom_node.index_outage import log_failure
from dicom_node.instance_attributes import REQUIRED_UIDS, TAG, check_complete, instance_record
from dicom_node.part10 import file_header
from dicom_node.reactor import is_dicom_application_context
from dicom_node.value_warnings import quiet_value_warnings
from storage.committer import GroupCommitter
from storage.database import Index
from storage.filestore import FileStore, WrittenFile
from storage.instances import (
    CommitOutcomeUnknown,
    InstanceRecord,
    Recorded,
    mark_association_released,
    row_held,
)
from storage.models import UID_LENGTH

logger = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC210
_DICOM_UID_LENGTH = 64


# The request names the instance the sender records as stored: the data set must be that
# instance, or the node would acknowledge a UID it does not hold. DCMTK's storescp and
# Orthanc refuse a mismatch with 0xA900 too.
_NAMED_IN_REQUEST = (
    ("SOPInstanceUID", dict(REQUIRED_UIDS)["SOPInstanceUID"], "AffectedSOPInstanceUID"),
    ("SOPClassUID", TAG["SOPClassUID"], "AffectedSOPClassUID"),
)


@dataclass
class _AssociationStats:
    association_id: str
    calling_ae_title: str
    address: str
    # The node's own health check (`status --check`): logged at DEBUG, once a minute.
    own_check: bool = False
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    failed: int = 0
    series: set[str] = field(default_factory=set)


class Receiver:
    """Holds what the handlers need; passed to them explicitly (no globals)."""

    def __init__(
        self,
        store: FileStore,
        index: Index,
        max_associations: int = 16,
        *,
        index_timeout_s: float = 20.0,
    ) -> None:
        self.store = store
        self.index = index
        self.index_timeout_s = index_timeout_s
        self.committer = GroupCommitter(index)
        # Runs each store's index statements while the store's own thread writes the file;
        # one per association at most (threads start only as stores overlap).
        self._index_threads = ThreadPoolExecutor(
            max_workers=max_associations, thread_name_prefix="index-write"
        )
        self._lock = threading.Lock()
        self._associations: weakref.WeakKeyDictionary[Association, _AssociationStats] = (
            weakref.WeakKeyDictionary()
        )
        self._in_flight = 0
        self._committing = 0  # index transactions under way (a hung index keeps them)
        self._closing = False
        self._idle = threading.Condition(self._lock)

    # -- association bookkeeping ---------------------------------------------------------
    def _stats(self, assoc: Association) -> _AssociationStats:
        with self._lock:
            stats = self._associations.get(assoc)
            if stats is None:
                requestor = assoc.requestor
                stats = _AssociationStats(
                    association_id=uuid.uuid4().hex,
                    calling_ae_title=str(requestor.ae_title).strip(),
                    address=f"{requestor.address}:{requestor.port}",
                    own_check=is_own_check(assoc),
                )
                self._associations[assoc] = stats
            return stats

    def wait_idle(self, timeout_s: float) -> bool:
        """Refuse new C-STOREs and wait until none is being written (for a graceful SIGTERM).

        Refusing first matters: a store starting after the wait would be cut off mid-write
        when the process exits, leaving a temporary file behind.
        """
        deadline = time.monotonic() + timeout_s
        with self._idle:
            self._closing = True
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self) -> int:
        """Let go of the index threads; returns how many still wait for the index.

        Those cannot be interrupted (a hung database call): the caller should exit without
        waiting for them, as Python would at exit.
        """
        self._index_threads.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            return self._committing

    def _commit(self, record: InstanceRecord, file_done: Future[WrittenFile]) -> Recorded:
        with self._lock:
            self._committing += 1
        try:
            return self.committer.commit(record, file_done)
        finally:
            with self._lock:
                self._committing -= 1

    # -- event handlers --------------------------------------------------------------------
    def on_accepted(self, event: Event) -> None:
        stats = self._stats(event.assoc)
        logger.log(
            logging.DEBUG if stats.own_check else logging.INFO,
            "association %s accepted from AE %s at %s",
            stats.association_id,
            stats.calling_ae_title,
            stats.address,
        )

    def on_rejected(self, event: Event) -> None:
        ae = event.assoc.ae
        requestor = event.assoc.requestor
        calling = str(requestor.ae_title).strip()
        called = str(getattr(requestor.primitive, "called_ae_title", "")).strip()
        allowed = [str(t).strip() for t in ae.require_calling_aet]
        level = logging.WARNING
        # pynetdicom does not hand the reason over; these are the node's check (made first,
        # by dicom_node.reactor) and pynetdicom's, in their order.
        if requestor.primitive is not None and not is_dicom_application_context(
            requestor.primitive
        ):
            name = str(requestor.primitive.application_context_name or "")
            why = f"application context name {name!r} is not DICOM's ({APPLICATION_CONTEXT_NAME})"
        elif ae.require_called_aet and called != str(ae.ae_title).strip():
            why = f"called AE title {called!r} is not this node's ({str(ae.ae_title).strip()!r})"
        elif allowed and calling not in allowed:
            why = (
                f"calling AE title {calling!r} is not a configured peer "
                "(add it under peers, or set node.accept_unknown_callers)"
            )
        else:
            why = f"association limit reached (node.max_associations = {ae.maximum_associations})"
            if is_own_check(event.assoc):  # the health check learns that the node answers
                level = logging.DEBUG
        logger.log(
            level,
            "association rejected: calling AE %r at %s:%s: %s",
            calling,
            requestor.address,
            requestor.port,
            why,
        )

    def on_released(self, event: Event) -> None:
        self._finish_association(event.assoc, "released")

    def on_aborted(self, event: Event) -> None:
        self._finish_association(event.assoc, "aborted")

    def _finish_association(self, assoc: Association, how: str) -> None:
        with self._lock:
            stats = self._associations.pop(assoc, None)
        if stats is None:
            return
        elapsed = time.monotonic() - stats.started
        logger.log(
            logging.DEBUG if stats.own_check else logging.INFO,
            "association %s from AE %s %s: %d stored, %d failed, series %s, %.2f s",
            stats.association_id,
            stats.calling_ae_title,
            how,
            stats.stored,
            stats.failed,
            ",".join(sorted(stats.series)) or "-",
            elapsed,
        )
        if how == "released" and stats.stored:
            try:
                mark_association_released(self.index, stats.association_id)
            except Exception as exc:  # the quiet period still completes the series
                log_failure(
                    logger, exc, "could not record release of association %s", stats.association_id
                )

    def on_echo(self, event: Event) -> int:
        stats = self._stats(event.assoc)
        logger.log(
            logging.DEBUG if stats.own_check else logging.INFO,
            "C-ECHO from AE %s",
            stats.calling_ae_title,
        )
        return SUCCESS

    def on_store(self, event: Event) -> int | Dataset:
        with self._lock:
            if self._closing:
                logger.warning("C-STORE refused (0xA700): the node is shutting down")
                return _failure(OUT_OF_RESOURCES, "the node is shutting down")
            self._in_flight += 1
        try:
            return self._store(event)
        except Exception as exc:  # a handler never raises: answer and keep serving
            logger.exception("C-STORE failed unexpectedly: %s", exc)
            return _failure(OUT_OF_RESOURCES, f"internal error: {exc}")
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def _store(self, event: Event) -> int | Dataset:
        stats = self._stats(event.assoc)
        who = f"AE {stats.calling_ae_title} ({stats.address})"
        raw = event.encoded_dataset(include_meta=False)
        if not raw:
            stats.failed += 1
            logger.warning("C-STORE from %s refused: the dataset is empty (0xC210)", who)
            return _failure(CANNOT_UNDERSTAND, "empty dataset")
        try:
            self.store.check_free_space(len(raw))
        except StorageError as exc:
            stats.failed += 1
            logger.error("C-STORE from %s refused (0xA700): %s", who, exc)
            return _failure(OUT_OF_RESOURCES, "out of disk space")
        try:
            # pydicom complains of a misspelled or unknown Specific Character Set on each
            # read: a line per image of such a device. The job sums it up for its series.
            with quiet_value_warnings() as complaints:
                ds = event.dataset
                check_complete(ds)
                uids = {name: text(ds, tag) for name, tag in REQUIRED_UIDS}
            if complaints:
                logger.debug("C-STORE from %s: %s", who, "; ".join(dict.fromkeys(complaints)))
        except Exception as exc:
            stats.failed += 1
            logger.warning(
                "C-STORE from %s refused: dataset cannot be decoded (0xC210): %s", who, exc
            )
            return _failure(CANNOT_UNDERSTAND, f"cannot decode dataset: {exc}")
        for name, tag in REQUIRED_UIDS:
            value = uids[name]
            if not value:
                why, comment = "is missing or empty", f"{name} is missing or empty"
            elif len(value) > UID_LENGTH:
                # Up to UID_LENGTH is kept although DICOM allows 64: some devices write more.
                why = (
                    f"is {len(value)} characters, more than the {UID_LENGTH} the index holds "
                    "(DICOM allows 64)"
                )
                comment = f"{name} is longer than {UID_LENGTH} characters"
            elif "\x00" in value:
                # Not padding (that is stripped): no index can key on it (PostgreSQL
                # refuses NUL in text, so every retry would fail with 0xA700).
                why, comment = "holds a NUL character", f"{name} holds a NUL character"
                value = value.replace("\x00", "\\x00")
            else:
                continue
            stats.failed += 1
            logger.warning(
                "C-STORE from %s refused: %s %s (0xA900)%s",
                who,
                name,
                why,
                f": {value}" if value else "",
            )
            return _failure(DATASET_DOES_NOT_MATCH_SOP_CLASS, comment, tag)
        for name, tag, affected in _NAMED_IN_REQUEST:
            in_data_set = text(ds, tag)
            in_request = str(getattr(event.request, affected) or "")
            if not in_data_set or _same_uid(in_data_set, in_request):
                continue  # a data set without a SOP Class UID is stored as before
            stats.failed += 1
            logger.warning(
                "C-STORE from %s refused: the data set's %s %s is not the %s %s of the "
                "request (0xA900); the sender would record an instance the node does not hold",
                who,
                name,
                in_data_set,
                affected,
                in_request,
            )
            return _failure(
                DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{name} differs from {affected}", tag
            )
        try:
            message = self._record(event, ds, raw, uids, stats)
        except StorageError as exc:
            stats.failed += 1
            logger.error(
                "C-STORE of %s from %s refused (0xA700): %s", uids["SOPInstanceUID"], who, exc
            )
            return _failure(OUT_OF_RESOURCES, str(exc)[:64])
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            stats.failed += 1
            logger.warning(
                "C-STORE of %s from %s refused: unreadable attribute (0xC210): %s",
                uids["SOPInstanceUID"],
                who,
                exc,
            )
            return _failure(CANNOT_UNDERSTAND, f"cannot decode dataset: {exc}")
        stats.stored += 1
        stats.series.add(uids["SeriesInstanceUID"])
        if message:
            logger.info("%s", message)
        return SUCCESS

    def _wait_for_index(self, committing: Future[Recorded]) -> Recorded:
        try:
            return committing.result(timeout=self.index_timeout_s)
        except TimeoutError:
            if committing.done():  # the commit itself timed out: an ordinary failure
                raise
            raise IndexNotAnswering(
                f"the index did not answer within {self.index_timeout_s:g} s"
            ) from None

    def _record(
        self,
        event: Event,
        ds: Dataset,
        raw: bytes,
        uids: dict[str, str],
        stats: _AssociationStats,
    ) -> str | None:
        study_uid, series_uid, sop_uid = (
            uids["StudyInstanceUID"],
            uids["SeriesInstanceUID"],
            uids["SOPInstanceUID"],
        )
        relative = self.store.relative_path(study_uid, series_uid, sop_uid)
        existed = self.store.absolute(relative).exists()
        sop_class_uid = text(ds, TAG["SOPClassUID"]) or str(event.context.abstract_syntax)
        transfer_syntax_uid = str(event.context.transfer_syntax)
        header = file_header(sop_class_uid, sop_uid, transfer_syntax_uid, stats.calling_ae_title)
        record = instance_record(
            ds,
            uids,
            sop_class_uid,
            transfer_syntax_uid,
            relative,
            len(header) + len(raw),
            calling_ae_title=stats.calling_ae_title,
            peer_address=stats.address,
            association_id=stats.association_id,
        )
        # An index thread runs the statements (Python: it needs the interpreter) while this
        # thread writes and syncs the file (system calls: they let go of it); the COMMIT
        # waits for the file. This way round the file starts at once; a thread woken to write
        # it waited ~0.4 ms for the interpreter while the statements ran.
        file_done: Future[WrittenFile] = Future()
        try:
            committing = self._index_threads.submit(self._commit, record, file_done)
        except RuntimeError as exc:  # the interpreter is exiting: no thread takes it
            raise StorageError("the node is shutting down") from exc
        written: WrittenFile | None = None
        try:
            try:
                written = WrittenFile.of(self.store.write_atomic(relative, header, raw))
            except BaseException as exc:
                file_done.set_exception(exc)  # the index thread rolls the row back
                raise
            file_done.set_result(written)
            recorded = self._wait_for_index(committing)
        except IndexNotAnswering:
            # Its transaction may still commit, naming the file: the file stays. If none
            # does, `store check` reports it unindexed and `--repair` indexes it. (Removing
            # it once the transaction fails could remove a resent copy a later row names.)
            raise
        except BaseException as exc:
            wait([committing])  # its transaction has ended, one way or the other
            if written is not None and not existed:
                self._discard(
                    written,
                    relative,
                    sop_uid,
                    committed_maybe=isinstance(exc, CommitOutcomeUnknown),
                )
            raise
        if recorded.replaced_path:
            self._remove_replaced(recorded.replaced_path, sop_uid)
        message = None
        if recorded.replaced:
            message = (
                f"duplicate SOP Instance UID {sop_uid} from AE {stats.calling_ae_title}: "
                f"file and index row replaced (series {series_uid})"
            )
        if recorded.new_version_opened:
            logger.info(
                "series %s: instance %s arrived after completion; version %d opened",
                series_uid,
                sop_uid,
                recorded.version,
            )
        return message

    def _remove_replaced(self, replaced: str, sop_uid: str) -> None:
        """Remove the file the image's row named before this store moved it (to another
        series or study), unless a row names that path again: a copy sent under the old
        series at the same moment, whose row committed after this one's and was
        acknowledged. Checked and removed with the row held, so none commits in between
        (one renamed there meanwhile finds its file gone before its commit: refused)."""
        try:
            with row_held(self.index, sop_uid) as named:
                if named is not None and named != replaced:
                    self.store.remove(replaced)
        except Exception as exc:  # the image is stored; store check lists the old file
            log_failure(
                logger, exc, "could not remove %s, the earlier file of %s", replaced, sop_uid
            )

    def _discard(
        self, written: WrittenFile, relative: str, sop_uid: str, *, committed_maybe: bool = False
    ) -> None:
        """Remove a file whose row did not commit (store and index in step), unless it is
        no longer this store's: another copy of the image renamed over it (whose row names
        it), or a copy whose committed row names the path and whose file this one replaced
        (the same image on another association at the same moment). Looked up and removed
        with the row held: a copy checked but not yet committed would otherwise commit
        right after the look-up, naming the file removed (SQLite; on PostgreSQL a new
        image's row is not held until it commits). ``committed_maybe``: the row's COMMIT
        failed with its outcome unknown; if the look-up fails too, the file stays."""
        looked_up = False
        try:
            with row_held(self.index, sop_uid) as named:
                looked_up = True
                if named != relative:
                    self.store.remove_unchanged(relative, written.inode)
        except StorageError as exc:
            if looked_up:  # acted on what it found; only ending the look-up failed
                return
            if committed_maybe:
                # Its row may name the file: removing it could lose an indexed image.
                logger.warning(
                    "%s: its index COMMIT failed and the index cannot be read to tell whether "
                    "it took effect (%s); its file %s is kept: `dicom-node store check` "
                    "lists it if no row names it, and `--repair` indexes it",
                    sop_uid,
                    exc,
                    relative,
                )
                return
            # The index is away, and the row surely did not commit: no row names the file.
            logger.debug("could not look up %s before removing its file: %s", sop_uid, exc)
            self.store.remove_unchanged(relative, written.inode)


class IndexNotAnswering(StorageError):
    """The index has not committed a store's row within ``storage.index_timeout_s``."""


def _same_uid(in_data_set: str, in_request: str) -> bool:
    # DCMTK's storescu cuts a longer UID (which the node keeps) to the 64 characters DICOM
    # allows in the request.
    return in_data_set == in_request or (
        len(in_request) == _DICOM_UID_LENGTH and in_data_set.startswith(in_request)
    )


def _failure(status: int, comment: str, offending_tag: int | None = None) -> Dataset:
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = comment[:64]
    if offending_tag is not None:
        rsp.OffendingElement = [offending_tag]
    return rsp
