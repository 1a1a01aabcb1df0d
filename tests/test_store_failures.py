"""A C-STORE whose file or index row cannot be made durable: 0xA700, and neither is left.

The node's real SCP in this process, pynetdicom as the sender; the failures are injected
(a disk or database that breaks on cue cannot be had otherwise).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import free_port
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from sqlalchemy import text

from dicom_node.config import Settings
from dicom_node.errors import StorageError
from dicom_node.receive import Receiver
from dicom_node.scp import start_scp
from dicom_node.service import open_store
from storage.database import Index
from storage.filestore import FileStore
from storage.instances import InstanceWriter

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, Index, FileStore]]:
    monkeypatch.setattr(pynetdicom_config, "LOG_HANDLER_LEVEL", "none")
    port = free_port()
    settings = Settings.model_validate(
        {
            "node": {"port": port, "accept_unknown_callers": True},
            "storage": {"data_dir": str(tmp_path / "data")},
        }
    )
    index, store = open_store(settings)
    running = start_scp(settings, Receiver(store, index))
    yield port, index, store
    running.abort_remaining()
    running.stop_accepting()
    index.dispose()


def _dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _store(port: int, ds: Dataset) -> Dataset:
    ae = AE(ae_title="PEER")
    ae.add_requested_context(MR_IMAGE_STORAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def _files(store: FileStore) -> list[Path]:
    return [p for p in store.root.rglob("*") if p.is_file()]


def _rows(index: Index) -> int:
    with index.engine.connect() as conn:
        return int(conn.execute(text("SELECT COUNT(*) FROM instances")).scalar_one())


def test_a_file_that_cannot_be_written_leaves_no_row(
    node: tuple[int, Index, FileStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, index, store = node

    def broken_disk(self: FileStore, relative: str, *parts: bytes) -> Path:
        raise StorageError("cannot write: Input/output error")

    monkeypatch.setattr(FileStore, "write_atomic", broken_disk)
    rsp = _store(port, _dataset())
    assert rsp.Status == 0xA700
    assert "Input/output error" in rsp.ErrorComment
    assert _rows(index) == 0
    assert _files(store) == []


def test_a_row_that_cannot_be_committed_leaves_no_file(
    node: tuple[int, Index, FileStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, index, store = node
    written: list[Path] = []
    write_atomic = FileStore.write_atomic

    def recording(self: FileStore, relative: str, *parts: bytes) -> Path:
        written.append(write_atomic(self, relative, *parts))
        return written[-1]

    def broken_index(self: InstanceWriter, *args: object, **kwargs: object) -> None:
        raise StorageError("index unavailable: database is locked")

    monkeypatch.setattr(FileStore, "write_atomic", recording)
    monkeypatch.setattr(InstanceWriter, "record", broken_index)
    rsp = _store(port, _dataset())
    assert rsp.Status == 0xA700
    assert "index unavailable" in rsp.ErrorComment
    assert len(written) == 1  # the file was written, then taken back
    assert not written[0].exists()
    assert _files(store) == []
    assert _rows(index) == 0


def test_both_durable_before_success(node: tuple[int, Index, FileStore]) -> None:
    port, index, store = node
    assert _store(port, _dataset()).Status == 0x0000
    assert _rows(index) == 1
    assert len(_files(store)) == 1
