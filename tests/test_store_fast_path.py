"""C-STORE requests are taken off the socket on the DUL's thread; the rest reaches pynetdicom.

The node's real SCP in this process; the peer is pynetdicom, and where PDU boundaries
matter, P-DATA-TF PDUs built here and written to the peer's socket.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from inprocess import (
    MR_IMAGE_STORAGE,
    InProcessNode,
    echo_command_set,
    inprocess_node,
    mr_image,
    mr_store_association,
)
from peers import wait_until
from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.events import Event
from pynetdicom.pdu import P_DATA_TF
from sqlalchemy import select

from dicom_node import pdata
from dicom_node.reactor import _EventDrivenDUL, _IncomingStore
from storage.models import Instance

VERIFICATION = "1.2.840.10008.1.1"


@pytest.fixture
def served_here(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Message IDs of the C-STOREs the node served on its DUL thread."""
    served: list[int] = []
    serve = _EventDrivenDUL._serve_store

    def spy(self: _EventDrivenDUL, store: _IncomingStore) -> None:
        served.append(store.request.MessageID or 0)
        serve(self, store)

    monkeypatch.setattr(_EventDrivenDUL, "_serve_store", spy)
    return served


def _image(rows: int = 64) -> Dataset:
    return mr_image(rows, seed=rows)


def _data_set(ds: Dataset) -> bytes:
    encoded = encode(ds, False, True)  # Explicit VR Little Endian, as the context says
    assert encoded is not None
    return encoded


def _command(message_id: int, ds: Dataset) -> bytes:
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = ds.SOPClassUID
    primitive.AffectedSOPInstanceUID = ds.SOPInstanceUID
    primitive.Priority = 0
    primitive.DataSet = BytesIO(b"\0\0")  # only "a data set follows" matters here
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    ((_, first),) = next(iter(message.encode_msg(1, 0))).presentation_data_value_list
    assert first[0] == 0x03  # the whole command in one PDV
    return first[1:]


def _pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def _pdu(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BBI", 0x04, 0, len(body)) + body


def _stored_bytes(node: InProcessNode, ds: Dataset) -> bytes:
    relative = node.store.relative_path(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )
    return node.store.absolute(relative).read_bytes()


def _indexed(node: InProcessNode, sop_uid: str) -> bool:
    with node.index.session() as session:
        found = session.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_uid))
    return found is not None


def _response(assoc: Association) -> C_STORE | C_ECHO:
    _, message = assoc.dimse.get_msg(block=True)
    assert isinstance(message, C_STORE | C_ECHO), message
    return message


def _pause(assoc: Association) -> None:
    """Stop the peer's own reactor taking messages: the test reads the responses itself."""
    assoc._reactor_checkpoint.clear()
    wait_until(lambda: assoc._is_paused, timeout_s=5, what="the peer's reactor to pause")


def _resume(assoc: Association) -> None:
    """Let the peer's reactor run again (it is what notices an A-ABORT)."""
    assoc._reactor_checkpoint.set()


@pytest.fixture
def raw_peer(scp_in_process: InProcessNode) -> Iterator[tuple[Association, int]]:
    """An MR storage association whose P-DATA-TF PDUs the test writes itself."""
    with mr_store_association(scp_in_process.port) as assoc:
        (context,) = assoc.accepted_contexts
        assert context.context_id is not None
        _pause(assoc)
        try:
            yield assoc, context.context_id
        finally:
            _resume(assoc)


# -- PDV items and command sets --------------------------------------------------------


def test_split_pdvs_returns_each_item_and_refuses_an_overrun() -> None:
    body = _pdu(_pdv(1, 0x03, b"cmd!"), _pdv(3, 0x00, b"data"), _pdv(3, 0x02, b"end."))[6:]
    items = pdata.split_pdvs(memoryview(body))
    assert [(i.context_id, i.is_command, i.is_last, bytes(i.data)) for i in items] == [
        (1, True, True, b"cmd!"),
        (3, False, False, b"data"),
        (3, False, True, b"end."),
    ]
    assert b"".join(bytes(i.raw) for i in items) == body
    with pytest.raises(pdata.MalformedPDU):
        pdata.split_pdvs(memoryview(body[:-1]))
    with pytest.raises(pdata.MalformedPDU):
        pdata.split_pdvs(memoryview(struct.pack(">IBB", 1, 1, 3)))  # length below 2


def test_store_command_parsed_as_pynetdicom_encodes_it() -> None:
    ds = _image(8)
    request = pdata.parse_store_request(_command(42, ds))
    assert request == pdata.StoreRequest(42, 0, MR_IMAGE_STORAGE, ds.SOPInstanceUID)


def test_other_commands_are_not_taken() -> None:
    echo = C_ECHO()
    echo.MessageID = 5
    echo.AffectedSOPClassUID = VERIFICATION
    message = C_ECHO_RQ()
    message.primitive_to_message(echo)
    ((_, pdv),) = next(iter(message.encode_msg(1, 0))).presentation_data_value_list
    assert pdata.parse_store_request(pdv[1:]) is None
    store = _command(1, _image(8))
    # Unknown element (0000,0600): left to pynetdicom rather than guessed at.
    assert pdata.parse_store_request(store + struct.pack("<HHI", 0, 0x0600, 2) + b"\0\0") is None
    assert pdata.parse_store_request(store[:-3]) is None  # cut inside a value


def test_command_pdu_is_what_pynetdicom_decodes() -> None:
    pdu = P_DATA_TF()
    pdu.decode(pdata.command_pdu(5, b"\x01\x02"))
    assert pdu.presentation_data_value_items[0].presentation_data_value == b"\x03\x01\x02"
    assert pdu.presentation_data_value_items[0].presentation_context_id == 5


# -- through the node ------------------------------------------------------------------


def test_store_served_on_the_dul_thread_byte_identical_and_indexed(
    scp_in_process: InProcessNode, served_here: list[int]
) -> None:
    ds, second = _image(), _image(32)
    ae = AE(ae_title="PEER")
    ae.add_requested_context(MR_IMAGE_STORAGE, "1.2.840.10008.1.2.1")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", scp_in_process.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds, msg_id=1).Status == 0x0000
        echo = assoc.send_c_echo(msg_id=2)  # not a C-STORE: pynetdicom's path
        assert echo.Status == 0x0000
        assert assoc.send_c_store(second, msg_id=3).Status == 0x0000
    finally:
        assoc.release()
    assert served_here == [1, 3]
    for sent in (ds, second):
        assert _stored_bytes(scp_in_process, sent).endswith(_data_set(sent))
        assert _indexed(scp_in_process, sent.SOPInstanceUID)


def test_data_set_in_many_small_pdus(
    tmp_path: Path, served_here: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pynetdicom_config, "LOG_HANDLER_LEVEL", "none")  # as at INFO
    with inprocess_node(tmp_path, node={"max_pdu_bytes": 4096}) as node:
        ds = _image(128)  # 32 KiB of pixels: nine PDUs or more
        with mr_store_association(node.port) as assoc:
            assert assoc.acceptor.maximum_length == 4096
            assert assoc.send_c_store(ds).Status == 0x0000
        assert served_here == [1]
        assert _stored_bytes(node, ds).endswith(_data_set(ds))


def test_pdvs_of_two_messages_share_pdus(
    scp_in_process: InProcessNode, raw_peer: tuple[Association, int], served_here: list[int]
) -> None:
    assoc, cx = raw_peer
    first, second = _image(16), _image(24)
    one, two = _data_set(first), _data_set(second)
    send = assoc.dul.socket.send  # type: ignore[union-attr]
    # Command and the start of its data set in one PDU, the rest of the data set with
    # the next request's command in the next, the second data set in three pieces.
    send(_pdu(_pdv(cx, 0x03, _command(1, first)), _pdv(cx, 0x00, one[:100])))
    send(
        _pdu(
            _pdv(cx, 0x02, one[100:]), _pdv(cx, 0x03, _command(2, second)), _pdv(cx, 0x00, two[:7])
        )
    )
    send(_pdu(_pdv(cx, 0x00, two[7:500])))
    send(_pdu(_pdv(cx, 0x02, two[500:])))
    responses = sorted(
        (r.MessageIDBeingRespondedTo, r.Status) for r in (_response(assoc), _response(assoc))
    )
    assert responses == [(1, 0x0000), (2, 0x0000)]
    assert served_here == [1, 2]
    assert _stored_bytes(scp_in_process, first).endswith(one)
    assert _stored_bytes(scp_in_process, second).endswith(two)


def test_command_inside_a_data_set_aborts_and_stores_nothing(
    scp_in_process: InProcessNode, raw_peer: tuple[Association, int], served_here: list[int]
) -> None:
    assoc, cx = raw_peer
    ds = _image(16)
    data = _data_set(ds)
    send = assoc.dul.socket.send  # type: ignore[union-attr]
    send(_pdu(_pdv(cx, 0x03, _command(1, ds)), _pdv(cx, 0x00, data[:50])))
    send(_pdu(_pdv(cx, 0x03, _command(2, _image(8)))))  # a new request mid data set
    _resume(assoc)
    wait_until(lambda: assoc.is_aborted, timeout_s=10, what="the node's A-ABORT")
    assert served_here == []
    assert not _indexed(scp_in_process, ds.SOPInstanceUID)


def test_watched_associations_keep_pynetdicoms_path(
    scp_in_process: InProcessNode, served_here: list[int]
) -> None:
    seen: list[str] = []

    def watch(event: Event) -> None:
        seen.append(type(event.message).__name__)

    for server in scp_in_process.running.servers:
        server.bind(evt.EVT_DIMSE_RECV, watch)
    try:
        ds = _image(16)
        with mr_store_association(scp_in_process.port) as assoc:
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        for server in scp_in_process.running.servers:
            server.unbind(evt.EVT_DIMSE_RECV, watch)
    assert served_here == []
    assert seen == ["C_STORE_RQ"]
    assert _stored_bytes(scp_in_process, ds).endswith(_data_set(ds))


def test_storage_class_not_negotiated_on_the_context_still_answered(
    scp_in_process: InProcessNode, served_here: list[int]
) -> None:
    """pynetdicom serves a store whose SOP class differs from its context's: so does this path."""
    ds = _image(16)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage, on the MR context
    ae = AE(ae_title="PEER")
    ae.add_requested_context(MR_IMAGE_STORAGE, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", scp_in_process.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        (cx,) = assoc.accepted_contexts
        assert cx.context_id is not None
        _pause(assoc)
        assoc.dul.socket.send(  # type: ignore[union-attr]
            _pdu(
                _pdv(cx.context_id, 0x03, _command(9, ds)), _pdv(cx.context_id, 0x02, _data_set(ds))
            )
        )
        response = _response(assoc)
        assert (response.MessageIDBeingRespondedTo, response.Status) == (9, 0x0000)
    finally:
        _resume(assoc)
        assoc.release()
    assert served_here == [9]
    assert _indexed(scp_in_process, ds.SOPInstanceUID)


def test_unknown_context_left_to_pynetdicom(
    scp_in_process: InProcessNode, raw_peer: tuple[Association, int], served_here: list[int]
) -> None:
    assoc, cx = raw_peer
    ds = _image(8)
    wrong = cx + 2  # never proposed
    assoc.dul.socket.send(  # type: ignore[union-attr]
        _pdu(_pdv(wrong, 0x03, _command(1, ds)), _pdv(wrong, 0x02, _data_set(ds)))
    )
    # pynetdicom aborts an association that uses a context it did not accept.
    _resume(assoc)
    wait_until(lambda: assoc.is_aborted, timeout_s=10, what="the node's A-ABORT")
    assert served_here == []
    assert not _indexed(scp_in_process, ds.SOPInstanceUID)


def _answers(assoc: Association, count: int) -> list[tuple[int, int]]:
    """(message ID, status) of the next ``count`` responses, sorted; up to 5 s for each."""
    assoc.dimse_timeout = 5
    answers: list[tuple[int, int]] = []
    for _ in range(count):
        _, message = assoc.dimse.get_msg(block=True)
        assert message is not None, f"{len(answers)} of {count} requests answered"
        answers.append((message.MessageIDBeingRespondedTo, message.Status))
    return sorted(answers)


@pytest.fixture
def store_and_echo_peer(scp_in_process: InProcessNode) -> Iterator[tuple[Association, int, int]]:
    """An association for MR storage and Verification whose PDUs the test writes itself."""
    ae = AE(ae_title="PEER")
    ae.add_requested_context(MR_IMAGE_STORAGE, "1.2.840.10008.1.2.1")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", scp_in_process.port, ae_title="DICOMNODE")
    assert assoc.is_established
    ids = {cx.abstract_syntax: cx.context_id for cx in assoc.accepted_contexts}
    _pause(assoc)
    try:
        yield assoc, ids[MR_IMAGE_STORAGE], ids[VERIFICATION]
    finally:
        _resume(assoc)
        assoc.release()


def test_requests_for_pynetdicom_sharing_a_pdu_are_each_answered(
    store_and_echo_peer: tuple[Association, int, int],
) -> None:
    """pynetdicom's decoder drops the PDVs after a message's last fragment in its PDU."""
    assoc, _, echo_cx = store_and_echo_peer
    assoc.dul.socket.send(  # type: ignore[union-attr]
        _pdu(_pdv(echo_cx, 0x03, echo_command_set(1)), _pdv(echo_cx, 0x03, echo_command_set(2)))
    )
    assert _answers(assoc, 2) == [(1, 0x0000), (2, 0x0000)]


def test_watched_stores_sharing_pdus_are_each_stored(
    scp_in_process: InProcessNode, served_here: list[int]
) -> None:
    """With an observer bound (DEBUG logging), stores take pynetdicom's path: same result."""
    for server in scp_in_process.running.servers:
        server.bind(evt.EVT_DIMSE_RECV, _ignore)
    try:
        with mr_store_association(scp_in_process.port) as assoc:
            (context,) = assoc.accepted_contexts
            cx = context.context_id
            assert cx is not None
            _pause(assoc)
            first, second = _image(16), _image(24)
            one, two = _data_set(first), _data_set(second)
            send = assoc.dul.socket.send  # type: ignore[union-attr]
            send(_pdu(_pdv(cx, 0x03, _command(1, first)), _pdv(cx, 0x00, one[:100])))
            send(_pdu(_pdv(cx, 0x02, one[100:]), _pdv(cx, 0x03, _command(2, second))))
            send(_pdu(_pdv(cx, 0x02, two)))
            try:
                assert _answers(assoc, 2) == [(1, 0x0000), (2, 0x0000)]
            finally:
                _resume(assoc)
    finally:
        for server in scp_in_process.running.servers:
            server.unbind(evt.EVT_DIMSE_RECV, _ignore)
    assert served_here == []
    assert _stored_bytes(scp_in_process, second).endswith(two)


def _ignore(event: Event) -> None:
    pass


def test_a_command_set_pynetdicom_cannot_decode_gets_an_a_abort(
    scp_in_process: InProcessNode,
    store_and_echo_peer: tuple[Association, int, int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """pynetdicom's own loop let the error end its thread: no A-ABORT, a bare close."""
    assoc, store_cx, _ = store_and_echo_peer
    received: list[str] = []
    assoc.bind(evt.EVT_PDU_RECV, lambda event: received.append(type(event.pdu).__name__))
    command = bytearray(_command(1, _image(8)))
    field = command.index(struct.pack("<HHIH", 0, 0x0100, 2, 0x0001))
    command[field + 8 : field + 10] = struct.pack("<H", 0xD601)  # no such Command Field
    assoc.dul.socket.send(_pdu(_pdv(store_cx, 0x03, bytes(command))))  # type: ignore[union-attr]
    _resume(assoc)
    wait_until(lambda: assoc.is_aborted, timeout_s=10, what="the association to end")
    assert "A_ABORT_RQ" in received
    assert any(
        "aborting the association with AE 'PEER' at 127.0.0.1:" in r.getMessage()
        and "a received message could not be decoded" in r.getMessage()
        for r in caplog.records
    )
    wait_until(
        lambda: not scp_in_process.running.ae.active_associations,
        timeout_s=10,
        what="the node's association to end",
    )
    with mr_store_association(scp_in_process.port) as again:
        assert again.send_c_store(_image(8)).Status == 0x0000


def test_an_invalid_request_ends_the_association_before_the_next_is_stored(
    scp_in_process: InProcessNode,
    raw_peer: tuple[Association, int],
    served_here: list[int],
) -> None:
    """The node reads no further PDU while events of the last one wait (one per PDV)."""
    assoc, cx = raw_peer
    invalid, valid = _image(8), _image(8)
    command = bytearray(_command(1, invalid))
    priority = command.index(struct.pack("<HHIH", 0, 0x0700, 2, 0))
    command[priority + 8 : priority + 10] = struct.pack("<H", 3)  # pynetdicom refuses it
    send = assoc.dul.socket.send  # type: ignore[union-attr]
    send(
        _pdu(_pdv(cx, 0x03, bytes(command)), _pdv(cx, 0x02, _data_set(invalid)))
        + _pdu(_pdv(cx, 0x03, _command(2, valid)), _pdv(cx, 0x02, _data_set(valid)))
    )
    _resume(assoc)
    wait_until(lambda: assoc.is_aborted, timeout_s=10, what="the node's A-ABORT")
    assert served_here == []
    assert not _indexed(scp_in_process, valid.SOPInstanceUID)
