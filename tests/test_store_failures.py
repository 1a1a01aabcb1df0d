"""A C-STORE whose file or index row cannot be made durable: 0xA700, and neither is left.

The node's real SCP in this process, pynetdicom as the sender; the failures are injected
(a disk or database that breaks on cue cannot be had otherwise).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_postgres
from inprocess import InProcessNode, inprocess_node, minimal_mr_dataset, mr_store_association
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import _config as pynetdicom_config
from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError

from dicom_node.errors import StorageError
from dicom_node.receive import Receiver
from storage.consistency import check_store
from storage.database import Index
from storage.filestore import FileStore, WrittenFile
from storage.instances import InstanceWriter, Recorded

# The throwaway PostgreSQL server and per-test database of test_postgres.
postgres_url = test_postgres.postgres_url
fresh_db = test_postgres.fresh_db


def _store(port: int, ds: Dataset) -> Dataset:
    with mr_store_association(port) as assoc:
        return assoc.send_c_store(ds)


def _storing(port: int, ds: Dataset, statuses: dict[str, Dataset], name: str) -> threading.Thread:
    """``_store`` on a thread of its own, started; its response in ``statuses[name]``."""
    thread = threading.Thread(target=lambda: statuses.__setitem__(name, _store(port, ds)))
    thread.start()
    return thread


def _files(store: FileStore) -> list[Path]:
    return [p for p in store.root.rglob("*") if p.is_file()]


def _rows(index: Index) -> int:
    with index.engine.connect() as conn:
        return int(conn.execute(text("SELECT COUNT(*) FROM instances")).scalar_one())


def test_a_file_that_cannot_be_written_leaves_no_row(
    scp_in_process: InProcessNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    port, index, store = scp_in_process.port, scp_in_process.index, scp_in_process.store

    def broken_disk(self: FileStore, relative: str, *parts: bytes) -> Path:
        raise StorageError("cannot write: Input/output error")

    monkeypatch.setattr(FileStore, "write_atomic", broken_disk)
    rsp = _store(port, minimal_mr_dataset())
    assert rsp.Status == 0xA700
    assert "Input/output error" in rsp.ErrorComment
    assert _rows(index) == 0
    assert _files(store) == []


def test_a_row_that_cannot_be_committed_leaves_no_file(
    scp_in_process: InProcessNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    port, index, store = scp_in_process.port, scp_in_process.index, scp_in_process.store
    written: list[Path] = []
    write_atomic = FileStore.write_atomic

    def recording(self: FileStore, relative: str, *parts: bytes) -> Path:
        written.append(write_atomic(self, relative, *parts))
        return written[-1]

    def broken_index(self: InstanceWriter, *args: object, **kwargs: object) -> None:
        raise StorageError("index unavailable: database is locked")

    monkeypatch.setattr(FileStore, "write_atomic", recording)
    monkeypatch.setattr(InstanceWriter, "record", broken_index)
    rsp = _store(port, minimal_mr_dataset())
    assert rsp.Status == 0xA700
    assert "index unavailable" in rsp.ErrorComment
    assert len(written) == 1  # the file was written, then taken back
    assert not written[0].exists()
    assert _files(store) == []
    assert _rows(index) == 0


def test_an_index_file_damaged_on_disk_refuses_stores_with_one_line_each(
    scp_in_process: InProcessNode, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite's "database disk image is malformed" is no OperationalError: it escaped the
    index writer, and each store was refused as an internal error with a traceback."""
    import random

    port, index = scp_in_process.port, scp_in_process.index
    for _ in range(20):  # rows on enough pages that damaging the later ones is seen
        assert _store(port, minimal_mr_dataset()).Status == 0x0000
    with index.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    index.engine.dispose()  # pooled connections would answer from their page cache
    path = Path(str(index.engine.url.database))
    size = path.stat().st_size
    with path.open("r+b") as damaged:  # every page but the first three
        damaged.seek(3 * 4096)
        damaged.write(random.Random(0).randbytes(size - 3 * 4096))
    with caplog.at_level(logging.INFO):
        rsp = _store(port, minimal_mr_dataset())
    assert rsp.Status == 0xA700
    assert rsp.ErrorComment.startswith("index unavailable: database disk image is malformed")
    (refusal,) = [r for r in caplog.records if "refused (0xA700)" in r.getMessage()]
    assert "the SQLite index file is damaged; stop the node and rebuild" in refusal.getMessage()
    assert not [r for r in caplog.records if r.exc_info], caplog.text  # no traceback


def test_both_durable_before_success(scp_in_process: InProcessNode) -> None:
    port, index, store = scp_in_process.port, scp_in_process.index, scp_in_process.store
    assert _store(port, minimal_mr_dataset()).Status == 0x0000
    assert _rows(index) == 1
    assert len(_files(store)) == 1


def test_one_image_sent_on_two_associations_at_once_is_never_lost(
    scp_in_process: InProcessNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same new image on two associations at once (a sender retrying on a new association,
    two PACS forwarding one study): B's statements ran first and waited for B's file; A's
    copy was renamed into place, then B's over it; B committed and acknowledged. A, finding
    another file at its path, was refused "taken by a removal" and removed the file there:
    B's acknowledged image. Now A removes only its own file, and says what happened."""
    port, index, store = scp_in_process.port, scp_in_process.index, scp_in_process.store
    image = minimal_mr_dataset()
    write_atomic = FileStore.write_atomic
    b_writing, a_renamed = threading.Event(), threading.Event()
    calls: list[str] = []

    def ordered(self: FileStore, relative: str, *parts: bytes) -> Path:
        calls.append("B" if not calls else "A")
        if calls[-1] == "B":
            b_writing.set()  # B's statements are running: A's commit queues behind them
            assert a_renamed.wait(30)
            return write_atomic(self, relative, *parts)
        written = write_atomic(self, relative, *parts)
        a_renamed.set()
        return written

    monkeypatch.setattr(FileStore, "write_atomic", ordered)
    statuses: dict[str, Dataset] = {}

    b = _storing(port, copy.deepcopy(image), statuses, "B")
    assert b_writing.wait(30)
    statuses["A"] = _store(port, copy.deepcopy(image))
    b.join(30)
    assert statuses["B"].Status == 0x0000
    assert statuses["A"].Status == 0xA700
    assert "removal" not in statuses["A"].ErrorComment, statuses["A"].ErrorComment
    (path,) = _files(store)  # B's copy, which B acknowledged
    assert _rows(index) == 1
    assert check_store(index, store, grace_s=0).consistent
    assert path.name == f"{image.SOPInstanceUID}.dcm"


def test_a_store_failing_removes_only_its_own_file_that_no_row_names(tmp_path: Path) -> None:
    """After its row failed, a store takes its file back (no unindexed new file), but not a
    file that is no longer its own (another copy renamed over it) nor its own copy when a
    committed row names the path (the same image committed by another association, whose
    file this copy replaced: removing it lost that acknowledged image)."""
    from storage.instances import InstanceRecord, record_instance

    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    store = FileStore(tmp_path / "store")
    receiver = Receiver(store, index)
    try:
        relative = store.relative_path("1.2", "1.2.3", "1.2.3.4")

        def write() -> WrittenFile:
            return WrittenFile.of(store.write_atomic(relative, b"copy"))

        mine = write()
        receiver._discard(mine, relative, "1.2.3.4")  # no row names it: taken back
        assert not store.absolute(relative).exists()

        mine = write()
        write()  # another copy renamed over it
        receiver._discard(mine, relative, "1.2.3.4")
        assert store.absolute(relative).exists()

        record_instance(
            index,
            InstanceRecord(
                sop_instance_uid="1.2.3.4",
                series_instance_uid="1.2.3",
                study_instance_uid="1.2",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=relative,
                size_bytes=4,
                calling_ae_title="A",
                peer_address="127.0.0.1:1",
            ),
        )
        mine = write()  # replaced the committed copy's file
        receiver._discard(mine, relative, "1.2.3.4")
        assert store.absolute(relative).read_bytes().endswith(b"copy")
    finally:
        receiver.close()
        index.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.peers)])
def scp_on_each_index(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[InProcessNode]:
    """The node's Storage SCP in this process on a SQLite index, then on PostgreSQL (the
    two hold a row against a concurrent store differently)."""
    monkeypatch.setattr(pynetdicom_config, "LOG_HANDLER_LEVEL", "none")
    url = request.getfixturevalue("fresh_db") if request.param == "postgresql" else None
    with inprocess_node(tmp_path / "data", database_url=url) as node:
        yield node


def test_a_row_whose_commit_failed_unknown_keeps_its_file_when_the_index_cannot_tell(
    scp_on_each_index: InProcessNode,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The connection to the index was lost during COMMIT, after the row had committed, and
    the look-up that would tell was refused too: the store took its file back, leaving a
    committed row naming no file. The sender got 0xA700 either way; the file now stays."""
    import dicom_node.receive as receive_module

    node = scp_on_each_index
    armed = threading.Event()
    statements = InstanceWriter._record

    def recording(self: InstanceWriter, *args: Any, **kwargs: Any) -> list[Recorded]:
        results = statements(self, *args, **kwargs)
        armed.set()  # the next COMMIT is this store's
        return results

    def commit_then_lose_the_connection(conn: Any) -> None:
        if armed.is_set():
            armed.clear()
            conn.connection.dbapi_connection.commit()  # the server committed it ...
            # ... and the answer never came back.
            raise OperationalError("COMMIT", None, Exception("server closed the connection"))

    def index_away(index: Index, sop_uid: str) -> Any:
        raise StorageError("index unavailable: connection refused")

    monkeypatch.setattr(InstanceWriter, "_record", recording)
    monkeypatch.setattr(receive_module, "row_held", index_away)
    event.listen(node.index.engine, "commit", commit_then_lose_the_connection)
    try:
        with caplog.at_level(logging.WARNING, logger="dicom_node.receive"):
            rsp = _store(node.port, minimal_mr_dataset())
    finally:
        event.remove(node.index.engine, "commit", commit_then_lose_the_connection)
    assert rsp.Status == 0xA700
    assert _rows(node.index) == 1
    assert len(_files(node.store)) == 1  # the file its committed row names
    assert check_store(node.index, node.store, grace_s=0).consistent
    assert "as it committed" in rsp.ErrorComment, rsp.ErrorComment
    assert any("is kept" in r.getMessage() for r in caplog.records), caplog.text


def _stored_then_moved(node: InProcessNode) -> tuple[Dataset, Dataset, str, str]:
    """An image stored (its first path), and a copy of it under another series (which
    moves its row to the second path)."""
    image = minimal_mr_dataset()
    assert _store(node.port, copy.deepcopy(image)).Status == 0x0000
    moved = copy.deepcopy(image)
    moved.SeriesInstanceUID = generate_uid()
    first, second = (
        node.store.relative_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        for ds in (image, moved)
    )
    return image, moved, first, second


def _indexed_paths(index: Index) -> list[str]:
    with index.engine.connect() as conn:
        return list(conn.execute(text("SELECT path FROM instances")).scalars())


def test_an_image_moved_to_another_series_leaves_a_copy_stored_at_its_old_path(
    scp_on_each_index: InProcessNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """X sends a stored image under another series (a corrected study, a sender re-using a
    UID): its row moves to the new path, and X removes the old file after its commit. Y
    sends the image under its first series at that moment: its copy is renamed to the old
    path and its row, committed after X's, names it again. X then removed the old path
    unconditionally: Y's acknowledged copy. Now X removes it only while no row names it."""
    node = scp_on_each_index
    image, moved, first, _ = _stored_then_moved(node)
    wait_for_index = Receiver._wait_for_index
    x_committed, y_done = threading.Event(), threading.Event()

    def x_pauses_after_its_commit(self: Receiver, committing: object) -> Recorded:
        recorded = wait_for_index(self, committing)  # type: ignore[arg-type]
        if recorded.replaced_path == first and not x_committed.is_set():
            x_committed.set()  # X's row names the new path; the old file is still there
            assert y_done.wait(30)
        return recorded

    monkeypatch.setattr(Receiver, "_wait_for_index", x_pauses_after_its_commit)
    statuses: dict[str, Dataset] = {}

    x = _storing(node.port, moved, statuses, "X")
    assert x_committed.wait(30)
    statuses["Y"] = _store(node.port, copy.deepcopy(image))  # its row names the old path
    y_done.set()
    x.join(30)
    assert statuses["X"].Status == 0x0000
    assert statuses["Y"].Status == 0x0000
    assert _indexed_paths(node.index) == [first]
    assert node.store.absolute(first).exists(), "Y's acknowledged copy is gone"
    assert _files(node.store) == [node.store.absolute(first)]
    assert check_store(node.index, node.store, grace_s=0).consistent


def test_a_copy_renamed_to_a_moved_images_old_path_as_it_is_removed_is_refused(
    scp_on_each_index: InProcessNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, but Y's copy is renamed to the old path just as X removes that path: X
    holds the image's row (its removal is no check-then-remove that Y's commit can slip
    between), so Y's row waits; X removes the file, and Y, finding its file gone before its
    commit, is refused (0xA700: the sender sends it again). Never acknowledged, then lost."""
    node = scp_on_each_index
    image, moved, first, second = _stored_then_moved(node)
    remove, write_atomic = FileStore.remove, FileStore.write_atomic
    x_removing, y_renamed, y_answered = threading.Event(), threading.Event(), threading.Event()

    def x_pauses_as_it_removes(self: FileStore, relative: str) -> None:
        if relative == first and not x_removing.is_set():
            x_removing.set()
            assert y_renamed.wait(30)
            y_answered.wait(1.0)  # Y's row waits for X's: no answer comes (bounded wait)
        remove(self, relative)

    def y_signals_its_rename(self: FileStore, relative: str, *parts: bytes) -> Path:
        written = write_atomic(self, relative, *parts)
        if x_removing.is_set():
            y_renamed.set()
        return written

    monkeypatch.setattr(FileStore, "remove", x_pauses_as_it_removes)
    monkeypatch.setattr(FileStore, "write_atomic", y_signals_its_rename)
    statuses: dict[str, Dataset] = {}

    x = _storing(node.port, moved, statuses, "X")
    assert x_removing.wait(30)
    statuses["Y"] = _store(node.port, copy.deepcopy(image))
    y_answered.set()
    x.join(30)
    assert statuses["X"].Status == 0x0000
    assert statuses["Y"].Status == 0xA700, "Y was acknowledged; its file went with X's removal"
    # Not "taken by a removal of its series (a prune or series delete)": there was none.
    assert statuses["Y"].ErrorComment.startswith("file removed as it was stored: not stored")
    assert _indexed_paths(node.index) == [second]
    assert _files(node.store) == [node.store.absolute(second)]
    assert check_store(node.index, node.store, grace_s=0).consistent


def test_a_refused_copy_never_removes_a_copy_whose_row_commits_meanwhile(
    scp_on_each_index: InProcessNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new image on two associations at once. A's row fails (the index refused it) while
    A's file is still being written; B's copy is renamed into place and checked, then A's
    is renamed over it (the same image). A, refused, found no row naming the path (B had not
    committed yet) and removed its own file: the one B's row, committed a moment later,
    names. Now A looks and removes holding what B's check and commit hold: the writer turn
    (SQLite), the image's lock (PostgreSQL: a new image has no row to lock yet)."""
    node = scp_on_each_index
    image = minimal_mr_dataset()
    path = node.store.relative_path(
        image.StudyInstanceUID, image.SeriesInstanceUID, image.SOPInstanceUID
    )
    record, write_atomic = InstanceWriter.record, FileStore.write_atomic
    check_still_there, discard = WrittenFile.check_still_there, Receiver._discard
    a_refused, a_writing = threading.Event(), threading.Event()
    b_checked, a_discarded = threading.Event(), threading.Event()

    def refusing_a(self: InstanceWriter, *args: object, **kwargs: object) -> list[Recorded]:
        if not a_refused.is_set():
            a_refused.set()
            raise StorageError("index unavailable: database is locked")
        return record(self, *args, **kwargs)  # type: ignore[arg-type]

    def a_renames_after_b_checked(self: FileStore, relative: str, *parts: bytes) -> Path:
        if not a_writing.is_set():  # A's: renamed over B's copy once B's check has passed
            a_writing.set()
            assert b_checked.wait(30)
        return write_atomic(self, relative, *parts)

    def b_commits_after_a_discarded(self: WrittenFile) -> None:
        check_still_there(self)
        b_checked.set()
        a_discarded.wait(1.0)  # A's cleanup waits for B's commit: it does not end (bounded)

    def a_discards(self: Receiver, *args: object, **kwargs: bool) -> None:
        discard(self, *args, **kwargs)  # type: ignore[arg-type]
        a_discarded.set()

    monkeypatch.setattr(InstanceWriter, "record", refusing_a)
    monkeypatch.setattr(FileStore, "write_atomic", a_renames_after_b_checked)
    monkeypatch.setattr(WrittenFile, "check_still_there", b_commits_after_a_discarded)
    monkeypatch.setattr(Receiver, "_discard", a_discards)
    statuses: dict[str, Dataset] = {}

    a = _storing(node.port, copy.deepcopy(image), statuses, "A")
    assert a_refused.wait(30) and a_writing.wait(30)
    statuses["B"] = _store(node.port, copy.deepcopy(image))
    a.join(30)
    assert statuses["A"].Status == 0xA700
    assert statuses["B"].Status == 0x0000
    assert _indexed_paths(node.index) == [path]
    assert node.store.absolute(path).exists(), "B's acknowledged image is gone"
    assert check_store(node.index, node.store, grace_s=0).consistent


class _Killed(BaseException):
    """The process dies here (kill -9): nothing after this point runs."""


def test_a_refused_store_killed_as_it_cleans_up_leaves_another_copy_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused store removes its file unless another copy was renamed over it (whose row
    names it). It renamed whatever was there aside under a temporary's name to look, then
    put another copy back: killed in between, the next start swept that temporary, the
    other copy, acknowledged. Now another file is never moved."""
    store = FileStore(tmp_path / "store")
    relative = store.relative_path("1.2", "1.2.3", "1.2.3.4")
    mine = WrittenFile.of(store.write_atomic(relative, b"mine"))
    store.write_atomic(relative, b"theirs")  # another association's copy, acknowledged

    def killed(*args: object, **kwargs: object) -> None:
        raise _Killed

    monkeypatch.setattr("storage.filestore.os.link", killed)  # before it is put back
    with contextlib.suppress(_Killed):
        assert not store.remove_unchanged(relative, mine.inode)
    store.sweep_temporaries()  # the next start
    assert store.absolute(relative).is_file(), "the acknowledged copy is gone"
    assert store.absolute(relative).read_bytes() == b"theirs"
