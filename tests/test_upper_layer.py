"""The DICOM upper layer as PS3.8 has it, with hand-made PDUs against the node in this process.

Each test stands for a defect found by an audit that compared the node with DCMTK's storescp
on the same PDUs: a data set stored from another presentation context than its command, a
PDU longer than the node's negotiated maximum read whole, and a peer stalled inside a PDU
holding its association slot (and a stop of the node) for as long as it kept the
connection open.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from inprocess import (
    InProcessNode,
    association_request,
    associations_ended,
    inprocess_node,
    mr_image,
    store_command_set,
)
from peers import wait_until
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dsutils import encode
from pynetdicom.presentation import build_context
from sqlalchemy import func, select

from dicom_node import reactor
from storage.models import Instance

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
MR_EXPLICIT, MR_IMPLICIT = 1, 3


@pytest.fixture
def quiet_pynetdicom(monkeypatch: pytest.MonkeyPatch) -> None:
    # As the node runs at its INFO log level: pynetdicom's per-message log handlers unbound.
    monkeypatch.setattr(pynetdicom_config, "LOG_HANDLER_LEVEL", "none")


@pytest.fixture
def node(tmp_path: Path, quiet_pynetdicom: None) -> Iterator[InProcessNode]:
    with inprocess_node(tmp_path / "data", node={"max_pdu_bytes": 16384}) as running:
        yield running


def _pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def _p_data(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BBI", 0x04, 0, len(body)) + body


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while len(data) < 6:
        chunk = sock.recv(6 - len(data))
        if not chunk:
            raise EOFError("closed")
        data += chunk
    pdu_type, _, length = struct.unpack(">BBI", data)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            raise EOFError("closed")
        body += chunk
    return pdu_type, body


@contextmanager
def _associate(node: InProcessNode) -> Iterator[socket.socket]:
    """A connection with an accepted association; closed after, and the node's side ended."""
    contexts = []
    for number, transfer in enumerate([EXPLICIT, IMPLICIT]):
        context = build_context(MR, [transfer])
        context.context_id = 2 * number + 1
        contexts.append(context)
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(association_request(contexts))
        pdu_type, _ = _read_pdu(sock)
        assert pdu_type == 0x02  # A-ASSOCIATE-AC
        yield sock
    associations_ended(node)


def _command(ds: Dataset) -> bytes:
    encoded = encode(store_command_set(ds), True, True)
    assert encoded is not None
    return encoded


def _explicit(ds: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def _indexed(node: InProcessNode) -> int:
    with node.index.session() as session:
        return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


def _answer(sock: socket.socket) -> int:
    """The next PDU's type: 0x04 an answer, 0x07 an A-ABORT; 0 the connection closed."""
    try:
        return _read_pdu(sock)[0]
    except (EOFError, ConnectionResetError):
        return 0


def _messages(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("path", ["fast", "pynetdicom"])
def test_a_data_set_on_another_context_than_its_command_is_aborted(
    node: InProcessNode,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    """PS3.8 9.3.1: a message travels on one presentation context. A command the node's
    fast path leaves to pynetdicom (one it does not parse, or every command when
    pynetdicom logs at DEBUG) was stored with the data set of another context, and the
    file's meta named the command's transfer syntax. storescp aborts; so does the node."""
    if path == "pynetdicom":
        monkeypatch.setattr(reactor._EventDrivenDUL, "_serves", lambda *_: False)
    caplog.set_level(logging.INFO, logger="dicom_node.receive")
    ds = mr_image(8, seed=1)
    with _associate(node) as sock:
        sock.sendall(_p_data(_pdv(MR_EXPLICIT, 0x03, _command(ds))))
        sock.sendall(_p_data(_pdv(MR_IMPLICIT, 0x02, _explicit(ds))))
        assert _answer(sock) == 0x07  # A-ABORT
    said = {
        "fast": "PDV of context 3 (control 0x02) inside the data set of C-STORE 1",
        "pynetdicom": "data set PDV of context 3, where its command came on context 1",
    }
    assert said[path] in _messages(caplog)
    # The node's thread sums the association up after the A-ABORT: in this test's log.
    assert "from AE PEER aborted: 0 stored, 0 failed" in _messages(caplog)
    assert _indexed(node) == 0


def test_command_fragments_on_two_contexts_are_aborted(
    node: InProcessNode, caplog: pytest.LogCaptureFixture
) -> None:
    ds = mr_image(8, seed=2)
    command = _command(ds)
    with _associate(node) as sock:
        sock.sendall(
            _p_data(_pdv(MR_IMPLICIT, 0x01, command[:20]), _pdv(MR_EXPLICIT, 0x03, command[20:]))
        )
        sock.sendall(_p_data(_pdv(MR_EXPLICIT, 0x02, _explicit(ds))))
        assert _answer(sock) == 0x07
    assert "command fragments on contexts 3 and 1" in _messages(caplog)
    assert _indexed(node) == 0


def test_a_pdu_longer_than_the_negotiated_maximum_is_aborted_unread(
    node: InProcessNode, caplog: pytest.LogCaptureFixture
) -> None:
    """PS3.8 D.1: a P-DATA-TF is never longer than the maximum its receiver offered. The
    node read any length whole (up to 4 GiB per association) and stored the image."""
    ds = mr_image(8, seed=3)
    ds.PixelData = b"\1" * 100_000
    ds.Rows, ds.Columns = 250, 200
    with _associate(node) as sock:
        sock.sendall(_p_data(_pdv(MR_EXPLICIT, 0x03, _command(ds))))
        sock.sendall(_p_data(_pdv(MR_EXPLICIT, 0x02, _explicit(ds))))
        assert _answer(sock) == 0x07
    assert "more than the 16384 bytes this node accepts" in _messages(caplog)
    assert _indexed(node) == 0
    # The same image in PDUs of the negotiated size is stored.
    data = _explicit(ds)
    with _associate(node) as sock:
        sock.sendall(_p_data(_pdv(MR_EXPLICIT, 0x03, _command(ds))))
        step = 16_000
        for start in range(0, len(data), step):
            last = 0x02 if start + step >= len(data) else 0x00
            sock.sendall(_p_data(_pdv(MR_EXPLICIT, last, data[start : start + step])))
        assert _answer(sock) == 0x04
    assert _indexed(node) == 1


def test_a_peer_stalled_inside_a_pdu_gives_its_slot_back(
    tmp_path: Path, quiet_pynetdicom: None
) -> None:
    """A connection that sent 3 bytes of a PDU header (before any AE title is checked) held
    one of node.max_associations until it closed: two such filled the node, and every
    sender was refused. After node.network_timeout_s (or the ARTIM timer, whichever ends
    first) the node closes it."""
    settings = {"network_timeout_s": 1.0, "max_associations": 2}
    with inprocess_node(tmp_path / "data", node=settings) as node:
        stalled = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(2)]
        try:
            for sock in stalled:
                sock.sendall(b"\x01\x00\x00")
            wait_until(
                lambda: len(node.running.ae.active_associations) == 2,
                timeout_s=5,
                what="both connections taking a slot",
            )
            wait_until(
                lambda: not node.running.ae.active_associations,
                timeout_s=10,
                what="the stalled associations closed",
            )
            with _associate(node) as sock:  # a sender gets a slot again
                sock.sendall(struct.pack(">BBI", 0x05, 0, 4) + b"\0" * 4)
                assert _answer(sock) == 0x06  # A-RELEASE-RP
        finally:
            for sock in stalled:
                sock.close()


def test_stopping_the_node_does_not_wait_for_a_stalled_peer(
    tmp_path: Path, quiet_pynetdicom: None, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM aborts the remaining associations: one whose peer stopped inside a PDU waited
    in the kernel for bytes that never came, and the node never exited. The cut PDU is not
    logged as an ERROR: the node's stop cut it (an ERROR at each restart with a sender
    active alarmed monitoring that watches for them)."""
    caplog.set_level(logging.INFO, logger="dicom_node.reactor")
    with inprocess_node(tmp_path / "data") as node, _associate(node) as sock:
        ds = mr_image(8, seed=4)
        sock.sendall(_p_data(_pdv(MR_EXPLICIT, 0x03, _command(ds)))[:20])
        wait_until(
            lambda: len(node.running.ae.active_associations) == 1,
            timeout_s=5,
            what="the association",
        )
        time.sleep(0.3)  # its thread now waits inside the PDU
        remaining = list(node.running.ae.active_associations)
        node.running.abort_remaining()
        for assoc in remaining:
            assoc.join(timeout=10)
        assert remaining and not any(assoc.is_alive() for assoc in remaining)
    cut = [r for r in caplog.records if "inside a PDU" in r.getMessage()]
    assert [(r.levelname, r.getMessage().endswith("(the node is stopping)")) for r in cut] == [
        ("INFO", True)
    ], [r.getMessage() for r in cut]


def _with_application_context(request: bytes, name: bytes) -> bytes:
    """The A-ASSOCIATE-RQ with ``name`` in its Application Context Item (PS3.8 9.3.2: the
    first variable item, at byte 74)."""
    item_type, _, length = struct.unpack_from(">BBH", request, 74)
    assert item_type == 0x10
    item = struct.pack(">BBH", 0x10, 0, len(name)) + name
    changed = request[:74] + item + request[78 + length :]
    return changed[:2] + struct.pack(">I", len(changed) - 6) + changed[6:]


@pytest.mark.parametrize("name", [b"1.2.3.4", b""])
def test_an_application_context_other_than_dicoms_is_rejected(
    node: InProcessNode, caplog: pytest.LogCaptureFixture, name: bytes
) -> None:
    """PS3.8 7.1.1.2: the acceptor rejects an application context it does not support with
    A-ASSOCIATE-RJ permanent, service user, reason 2 (as storescp does). The node accepted
    any name, an empty one too."""
    context = build_context(MR, [EXPLICIT])
    context.context_id = 1
    request = _with_application_context(association_request([context]), name)
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(request)
        pdu_type, body = _read_pdu(sock)
    assert (pdu_type, body[1:4]) == (0x03, bytes([0x01, 0x01, 0x02]))  # A-ASSOCIATE-RJ
    rejected = [r for r in caplog.records if "association rejected" in r.getMessage()]
    assert [r.levelname for r in rejected] == ["WARNING"]
    message = rejected[0].getMessage()
    assert "calling AE 'PEER' at 127.0.0.1:" in message
    assert f"application context name '{name.decode()}' is not DICOM's" in message


def test_the_dicom_application_context_padded_with_a_nul_is_accepted(node: InProcessNode) -> None:
    context = build_context(MR, [EXPLICIT])
    context.context_id = 1
    request = association_request([context])
    padded = _with_application_context(request, b"1.2.840.10008.3.1.1.1\0")
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(padded)
        assert _read_pdu(sock)[0] == 0x02  # A-ASSOCIATE-AC
        sock.sendall(struct.pack(">BBI", 0x05, 0, 4) + b"\0" * 4)
        assert _answer(sock) == 0x06  # A-RELEASE-RP
