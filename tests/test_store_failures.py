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
