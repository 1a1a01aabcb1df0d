"""The node's real Storage SCP started in the test process, and a minimal MR image to send it.

For tests that inject failures or look at pynetdicom's objects: a node in a subprocess
(``peers.NodeProcess``) cannot be patched or inspected.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from _pytest.logging import LogCaptureHandler
from peers import free_port, wait_until
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import PresentationContext

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
        running.stop_accepting()
        # The associations' threads log their release or abort: let them, before the test's
        # log capture closes (a line written after that is a "Logging error" in the test
        # output). A connection accepted just before the stop starts its association's
        # thread from a request thread that nothing joins: wait until none has appeared
        # for a moment.
        deadline = time.monotonic() + 15
        quiet_since = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - quiet_since < 0.3:
            remaining = list(running.ae.active_associations)
            if remaining:
                running.abort_remaining()
                for assoc in remaining:
                    assoc.join(timeout=5)
                quiet_since = time.monotonic()
            time.sleep(0.02)
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


def mr_image(size: int, seed: int) -> Dataset:
    """A ``size`` x ``size`` 16-bit MR image of random pixels (``seed``), with new UIDs."""
    ds = minimal_mr_dataset()
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    pixels = np.random.default_rng(seed).integers(0, 4096, (size, size), np.uint16)
    ds.PixelData = pixels.tobytes()
    return ds


def echo_command_set(message_id: int) -> bytes:
    """The encoded command set of a C-ECHO-RQ (Implicit VR Little Endian)."""
    echo = C_ECHO()
    echo.MessageID = message_id
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    message = C_ECHO_RQ()
    message.primitive_to_message(echo)
    ((_, first),) = next(iter(message.encode_msg(1, 0))).presentation_data_value_list
    return bytes(first[1:])  # less the message control header


def store_command_set(ds: Dataset, message_id: int = 1) -> Dataset:
    """The command set of a C-STORE-RQ of ``ds`` (medium priority), to encode as it is or
    after a test changed it."""
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = ds.SOPClassUID
    primitive.AffectedSOPInstanceUID = ds.SOPInstanceUID
    primitive.Priority = 0
    primitive.DataSet = BytesIO(b"\0\0")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    command: Dataset = message.command_set
    return command


def association_request(contexts: list[PresentationContext]) -> bytes:
    """An encoded A-ASSOCIATE-RQ from PEER to DICOMNODE proposing ``contexts``, as they are
    (a test may make them malformed)."""
    request = A_ASSOCIATE()
    request.application_context_name = "1.2.840.10008.3.1.1.1"
    request.calling_ae_title = "PEER"
    request.called_ae_title = "DICOMNODE"
    request.presentation_context_definition_list = contexts
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    request.user_information = [length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(request)
    return pdu.encode()


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


def associations_ended(node: InProcessNode) -> None:
    """Wait until the node's association threads have ended: they log the association's end
    (released, aborted) after the peer has its answer, and a test that ends first leaves
    that line to be written after its log capture closed."""
    wait_until(
        lambda: not acceptor_threads(node), timeout_s=10, what="the node's associations to end"
    )


@contextmanager
def logging_kept(*, capture_handlers: bool = True) -> Iterator[None]:
    """Logging as it was before the block, whatever ``configure_logging`` (a CLI command run
    in this process) changed in it: the root logger's handlers, every logger's level,
    pynetdicom's log handler level and the capture of warnings.

    ``capture_handlers=False`` for a block that spans a test's phases (a fixture): pytest's
    capture handlers of the phase it began in are gone when it ends, and put back they
    would stay on the root for the rest of the run."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    loggers = [root, *root.manager.loggerDict.values()]
    levels = {logger: logger.level for logger in loggers if isinstance(logger, logging.Logger)}
    handler_level = pynetdicom_config.LOG_HANDLER_LEVEL
    showwarning = warnings.showwarning
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:  # pytest's own, which configure_logging removed
            if capture_handlers or not isinstance(handler, LogCaptureHandler):
                root.addHandler(handler)  # (a no-op for one still there)
        for logger, level in levels.items():
            if logger.level != level:
                logger.setLevel(level)  # (and clears the loggers' cached levels)
        pynetdicom_config.LOG_HANDLER_LEVEL = handler_level
        if warnings.showwarning is not showwarning:
            logging.captureWarnings(False)
