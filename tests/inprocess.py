"""The node's real Storage SCP started in the test process, and a minimal MR image to send it.

For tests that inject failures or look at pynetdicom's objects: a node in a subprocess
(``peers.NodeProcess``) cannot be patched or inspected.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from peers import free_port
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

from dicom_node.config import Settings
from dicom_node.receive import Receiver
from dicom_node.scp import RunningSCP, start_scp
from dicom_node.service import open_store
from storage.database import Index
from storage.filestore import FileStore

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@dataclass(frozen=True)
class InProcessNode:
    running: RunningSCP
    port: int
    index: Index
    store: FileStore


@contextmanager
def inprocess_node(
    data_dir: Path, node: dict[str, object] | None = None, database_url: str | None = None
) -> Iterator[InProcessNode]:
    """A Storage SCP accepting any calling AE on a free port, its store under ``data_dir``.

    ``node``: more ``node:`` settings (``max_pdu_bytes``, ...); ``database_url``: an index
    other than the SQLite one under ``data_dir``.
    """
    port = free_port()
    storage: dict[str, object] = {"data_dir": str(data_dir)}
    if database_url is not None:
        storage["database_url"] = database_url
    settings = Settings.model_validate(
        {
            "node": {"port": port, "accept_unknown_callers": True, **(node or {})},
            "storage": storage,
        }
    )
    index, store = open_store(settings)
    running = start_scp(settings, Receiver(store, index))
    try:
        yield InProcessNode(running, port, index, store)
    finally:
        remaining = list(running.ae.active_associations)
        running.abort_remaining()
        # Their threads log the release or abort: let them, before the test's log capture
        # closes (a line written after that is a "Logging error" in the test output).
        for assoc in remaining:
            assoc.join(timeout=5)
        running.stop_accepting()
        index.dispose()


def minimal_mr_dataset() -> Dataset:
    """An MR image with new UIDs and no pixels: what the receive path needs to store it."""
    ds = Dataset()
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


@contextmanager
def mr_store_association(port: int) -> Iterator[Association]:
    """An established association (calling AE PEER) for MR Image Storage; released after."""
    ae = AE(ae_title="PEER")
    ae.add_requested_context(MR_IMAGE_STORAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        yield assoc
    finally:
        assoc.release()


def acceptor_threads(node: InProcessNode) -> list[threading.Thread]:
    """The node's association threads and their network threads, alive now (the test's
    own requestor associations and other nodes' threads left out)."""
    ae = node.running.ae

    def owner(thread: threading.Thread) -> object:
        return thread.assoc if isinstance(thread, DULServiceProvider) else thread

    return [
        thread
        for thread in threading.enumerate()
        if isinstance(assoc := owner(thread), Association)
        and assoc.is_acceptor
        and assoc.ae is ae
        and thread.is_alive()
    ]
