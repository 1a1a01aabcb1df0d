"""A C-STORE whose file or index row cannot be made durable: 0xA700, and neither is left.

The node's real SCP in this process, pynetdicom as the sender; the failures are injected
(a disk or database that breaks on cue cannot be had otherwise).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from inprocess import InProcessNode, minimal_mr_dataset, mr_store_association
from pydicom import Dataset
from sqlalchemy import text

from dicom_node.errors import StorageError
from storage.database import Index
from storage.filestore import FileStore
from storage.instances import InstanceWriter


def _store(port: int, ds: Dataset) -> Dataset:
    with mr_store_association(port) as assoc:
        return assoc.send_c_store(ds)


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
    import copy
    import threading

    from storage.consistency import check_store

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

    def send(name: str) -> None:
        statuses[name] = _store(port, copy.deepcopy(image))

    b = threading.Thread(target=send, args=("B",))
    b.start()
    assert b_writing.wait(30)
    send("A")
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
    from dicom_node.receive import Receiver
    from storage.filestore import WrittenFile
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
