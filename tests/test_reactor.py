"""Acceptor associations wait for work instead of polling, and still end every way.

Talks to the node's real SCP (in this process) with pynetdicom as the peer.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
import tracemalloc

import pynetdicom.dul
import pytest
from inprocess import (
    InProcessNode,
    acceptor_threads,
    association_request,
    associations_ended,
    minimal_mr_dataset,
    mr_store_association,
)
from peers import wait_until
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import PresentationContext

from dicom_node import reactor
from dicom_node.pdata import encode_store_success
from dicom_node.reactor import (
    IDLE_WAIT_S,
    _EventDrivenDIMSE,
    _EventDrivenDUL,
)
from dicom_node.scp import RunningSCP

VERIFICATION = "1.2.840.10008.1.1"


def _scu() -> AE:
    ae = AE(ae_title="PEER")
    ae.add_requested_context(VERIFICATION)
    return ae


def _associate(running: RunningSCP, port: int) -> tuple[Association, Association]:
    """An established association: the peer's side and the node's acceptor."""
    assoc = _scu().associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    (server_side,) = wait_until(lambda: running.ae.active_associations, timeout_s=5)
    return assoc, server_side


def test_idle_association_sleeps_instead_of_polling(
    scp_in_process: InProcessNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    running, port = scp_in_process.running, scp_in_process.port
    turns = {"dul": 0, "reactor": 0}
    dul_check = _EventDrivenDUL._is_transport_event
    get_msg = _EventDrivenDIMSE.get_msg

    def counted_check(self: _EventDrivenDUL) -> bool:
        turns["dul"] += 1
        return dul_check(self)

    def counted_get(self: _EventDrivenDIMSE, block: bool = False) -> object:
        turns["reactor"] += 1
        return get_msg(self, block)

    monkeypatch.setattr(_EventDrivenDUL, "_is_transport_event", counted_check)
    monkeypatch.setattr(_EventDrivenDIMSE, "get_msg", counted_get)
    assoc, server_side = _associate(running, port)
    try:
        assert isinstance(server_side.dul, _EventDrivenDUL)
        assert isinstance(server_side.dimse, _EventDrivenDIMSE)
        assert assoc.send_c_echo().Status == 0x0000
        turns.update(dul=0, reactor=0)
        idle_s = 1.0
        time.sleep(idle_s)
        # Polling turns each loop every ~1 ms (~1,000 turns); waiting turns once per
        # IDLE_WAIT_S. The bound leaves 5x headroom for a slow machine.
        bound = 5 * idle_s / IDLE_WAIT_S
        assert 0 < turns["dul"] <= bound, turns  # 0: the counters are not on the loops
        assert 0 < turns["reactor"] <= bound, turns
        assert assoc.send_c_echo().Status == 0x0000  # and it still answers at once
    finally:
        assoc.release()
    wait_until(lambda: not running.ae.active_associations, timeout_s=5, what="release")


def test_abort_ends_the_acceptor(scp_in_process: InProcessNode) -> None:
    running, port = scp_in_process.running, scp_in_process.port
    assoc, _ = _associate(running, port)
    assoc.abort()
    wait_until(lambda: not running.ae.active_associations, timeout_s=5, what="abort")


def test_peer_vanishing_ends_the_acceptor(scp_in_process: InProcessNode) -> None:
    """The connection drops mid-association (cable pulled, sender killed)."""
    running, port = scp_in_process.running, scp_in_process.port
    assoc, server_side = _associate(running, port)
    raw = assoc.dul.socket.socket
    assert raw is not None
    raw.shutdown(socket.SHUT_RDWR)
    wait_until(lambda: not server_side.is_alive(), timeout_s=5, what="acceptor end")
    assoc.abort()


@pytest.mark.parametrize(
    ("message_id", "sop_class", "sop_instance"),
    [
        (7, "1.2.840.10008.5.1.4.1.1.4", "1.2.3.45"),
        (65535, "1.2.840.10008.5.1.4.1.1.66.4", "1.2.3.456"),  # odd: NUL padded
    ],
)
def test_store_success_response_is_what_pynetdicom_encodes(
    message_id: int, sop_class: str, sop_instance: str
) -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Status = 0x0000
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    (pdata,) = message.encode_msg(1, 16384)
    ((context_id, pdv),) = pdata.presentation_data_value_list
    assert context_id == 1
    assert pdv == b"\x03" + encode_store_success(message_id, sop_class, sop_instance)


def test_store_success_answered_by_the_direct_encoder(
    scp_in_process: InProcessNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = scp_in_process.port
    used: list[int] = []

    def counting(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
        used.append(message_id)
        return encode_store_success(message_id, sop_class_uid, sop_instance_uid)

    monkeypatch.setattr(reactor, "encode_store_success", counting)
    ds = minimal_mr_dataset()
    with mr_store_association(port) as assoc:
        assert assoc.send_c_store(ds).Status == 0x0000
        ds.SOPInstanceUID = generate_uid()
        del ds.SeriesInstanceUID  # refused: answered by pynetdicom's encoder, status intact
        assert assoc.send_c_store(ds).Status == 0xA900
    assert used == [1]
    associations_ended(scp_in_process)


def test_the_acceptor_runs_its_own_loop_and_never_sleeps_between_pdus(
    scp_in_process: InProcessNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom's loop sleeps (``time.sleep(0)``) after each turn that queued no event,
    which is every PDU of a C-STORE served off the socket: a system call and a thread
    switch each. The acceptor runs the node's loop instead, and closes its wake-up pair."""
    sleeps: list[int] = []
    real_time = pynetdicom.dul.time

    class CountingTime:
        def __getattr__(self, name: str) -> object:
            return getattr(real_time, name)

        def sleep(self, seconds: float) -> None:
            sleeps.append(threading.get_ident())
            real_time.sleep(seconds)

    monkeypatch.setattr(pynetdicom.dul, "time", CountingTime())
    running, port = scp_in_process.running, scp_in_process.port
    ds = minimal_mr_dataset()
    ds.BitsAllocated, ds.PixelRepresentation = 16, 0
    ds.PixelData = bytes(300_000)  # several PDUs: the peer's maximum PDU is 16 KiB
    with mr_store_association(port) as assoc:
        (server_side,) = wait_until(lambda: running.ae.active_associations, timeout_s=5)
        dul = server_side.dul
        assert isinstance(dul, _EventDrivenDUL)
        for _ in range(3):
            ds.SOPInstanceUID = generate_uid()
            assert assoc.send_c_store(ds).Status == 0x0000
        assert dul.ident not in sleeps
        # The spy works: this test's own requestor runs pynetdicom's loop, which sleeps.
        assert assoc.dul.ident in sleeps
    wait_until(lambda: not dul.is_alive(), timeout_s=5, what="acceptor end")
    assert dul._waker.fileno() == -1 and dul._wakee.fileno() == -1


def _reader(sock: socket.socket) -> reactor._LargeReadSocket:
    """The node's PDU reader on one end of a socket pair (no association needed)."""
    reader = reactor._LargeReadSocket.__new__(reactor._LargeReadSocket)
    reader.socket = sock
    return reader


def test_large_read_returns_a_pdu_sent_in_pieces() -> None:
    ours, peer = socket.socketpair()
    payload = bytes(range(256)) * 1200  # 300 KiB, more than one socket buffer
    with ours, peer:

        def send_in_pieces() -> None:
            for i in range(0, len(payload), 7000):
                peer.sendall(payload[i : i + 7000])

        sender = threading.Thread(target=send_in_pieces)
        sender.start()
        received = _reader(ours).recv(len(payload))
        sender.join()
    assert isinstance(received, bytearray)
    assert received == payload


def test_large_read_stops_short_when_the_peer_closes() -> None:
    ours, peer = socket.socketpair()
    with ours:
        peer.sendall(b"x" * 1000)
        peer.close()
        received = _reader(ours).recv(5000)
    assert received == b"x" * 1000  # short: pynetdicom's caller reports the broken PDU


def test_large_read_grows_with_the_bytes_not_with_the_announced_length(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A PDU header's length alone must not allocate: 6 bytes announcing 3.75 GiB took the
    node's RSS from 116 MB to 3.1 GB. The buffer grows as bytes arrive, chunk by chunk."""
    ours, peer = socket.socketpair()
    with ours, peer:
        peer.sendall(b"x" * 1000)
        peer.shutdown(socket.SHUT_WR)
        tracemalloc.start()
        try:
            received = _reader(ours).recv(0xF0000000)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert received == b"x" * 1000
    assert peak < 2 * reactor.READ_CHUNK, peak
    # A PDU longer than a chunk still comes back whole.
    monkeypatch.setattr(reactor, "READ_CHUNK", 1000)
    test_large_read_returns_a_pdu_sent_in_pieces()


def test_an_oversized_pdu_before_association_is_aborted_unread(
    scp_in_process: InProcessNode, caplog: pytest.LogCaptureFixture
) -> None:
    """Before an association is accepted anyone may send: an A-ASSOCIATE-RQ announcing
    3.75 GiB is answered with an A-ABORT, not read."""
    with socket.create_connection(("127.0.0.1", scp_in_process.port), timeout=10) as raw:
        raw.sendall(struct.pack(">BBI", 0x01, 0, 0xF0000000))
        answer = raw.recv(10)
    assert answer[:1] == b"\x07"  # A-ABORT
    assert any(
        "PDU of type 0x01 announces 4026531840 bytes" in r.getMessage() for r in caplog.records
    )
    wait_until(
        lambda: not scp_in_process.running.ae.active_associations,
        timeout_s=5,
        what="the aborted acceptor gone",
    )


def test_acceptor_reads_with_the_large_reader(scp_in_process: InProcessNode) -> None:
    running, port = scp_in_process.running, scp_in_process.port
    assoc, server_side = _associate(running, port)
    try:
        assert type(server_side.dul.socket) is reactor._LargeReadSocket
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    associations_ended(scp_in_process)


def _request_without_transfer_syntax() -> bytes:
    context = PresentationContext()
    context.context_id = 1
    context.abstract_syntax = VERIFICATION  # and no transfer syntax: malformed
    return association_request([context])


def test_a_request_pynetdicom_cannot_negotiate_gets_an_a_abort(
    scp_in_process: InProcessNode, caplog: pytest.LogCaptureFixture
) -> None:
    """pynetdicom raised out of its negotiation: the requestor got no answer, and the
    connection and its network thread stayed until the requestor hung up."""
    with socket.create_connection(("127.0.0.1", scp_in_process.port), timeout=10) as raw:
        raw.sendall(_request_without_transfer_syntax())
        answer = raw.recv(10)
        assert answer[:1] == b"\x07"  # A-ABORT
        wait_until(
            lambda: not acceptor_threads(scp_in_process), timeout_s=10, what="the acceptor to end"
        )
    assert any(
        "association request from AE 'PEER' at 127.0.0.1:" in r.getMessage()
        and "aborted: it cannot be negotiated" in r.getMessage()
        for r in caplog.records
    )
    again = _scu().associate("127.0.0.1", scp_in_process.port, ae_title="DICOMNODE")
    assert again.is_established  # the node keeps serving
    again.release()
    associations_ended(scp_in_process)


def test_a_connection_that_ends_before_its_request_leaves_no_thread(
    scp_in_process: InProcessNode,
) -> None:
    """The association's thread waited the ACSE timeout (30 s) for a request that could
    no longer come: a port scanner or a TCP health check held a thread per connection."""
    for payload in (b"", b"\x01\x00\x00\x00"):  # nothing; half a PDU header
        with socket.create_connection(("127.0.0.1", scp_in_process.port), timeout=10) as raw:
            raw.sendall(payload)
            wait_until(
                lambda: acceptor_threads(scp_in_process),
                timeout_s=5,
                what="the node to take the connection",
            )
        wait_until(
            lambda: not acceptor_threads(scp_in_process), timeout_s=5, what="the acceptor to end"
        )
