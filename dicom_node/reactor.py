"""Event-driven waits for pynetdicom's acceptor associations.

pynetdicom polls: each association has two threads (the DUL reading the socket, the
reactor serving DIMSE messages) that sleep 1 ms whenever idle, so every C-STORE waits
for them to notice the request and then the response (~1.3 ms of a 512x512 image's ~5 ms),
and idle associations wake 2,000 times a second. Here both sleep until there is work: the
DUL in ``select()`` on its socket and a wake-up socket written whenever a primitive is
queued for sending, the reactor on an event set whenever a DIMSE message or an ACSE
primitive is queued for it. pynetdicom's loops and state machine run unchanged; only
their waits move (measured by ``benchmarks/receive.py``). PDUs are also read with a few
large ``recv_into`` calls instead of pynetdicom's 4 KiB ones.

This uses pynetdicom 3.0 internals (its queues, ``DULServiceProvider._is_transport_event``
and ``_run_loop_delay``). If they are missing, associations keep pynetdicom's polling
and a warning says so.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

logger = logging.getLogger(__name__)

# The longest sleep: bounds how late a thread sees a kill flag, a timer or a dead peer.
IDLE_WAIT_S = 0.05
_POLL_S = 0.001  # pynetdicom's own delay, kept where there is nothing to wait on

_REQUIRED = (
    (DULServiceProvider, "_is_transport_event"),
    (DULServiceProvider, "stop_dul"),
    (DULServiceProvider, "kill_dul"),
    (DIMSEServiceProvider, "get_msg"),
    (DIMSEServiceProvider, "send_msg"),
    (Association, "get_handlers"),
    (AssociationSocket, "recv"),
)
_COMMAND_LAST_FRAGMENT = b"\x03"  # PDV message control header: command, last fragment
_STATUS_OPTIONAL = ("ErrorComment", "OffendingElement")


class _SignallingQueue(queue.Queue[Any]):
    """A queue that calls ``signal`` after every put."""

    def __init__(self, signal: Callable[[], None]) -> None:
        super().__init__()
        self._signal = signal

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._signal()


class _EventDrivenDUL(DULServiceProvider):
    """Assigned as the class of an acceptor's DUL before its thread starts."""

    _waker: socket.socket
    _wakee: socket.socket

    def _prepare(self, on_user_item: Callable[[], None]) -> None:
        self._wakee, self._waker = socket.socketpair()
        self._wakee.setblocking(False)
        self._waker.setblocking(False)
        # The wait is in _is_transport_event: no extra sleep between loop turns.
        self._run_loop_delay = 0
        self.to_provider_queue = _SignallingQueue(self._wake)
        self.to_user_queue = _SignallingQueue(on_user_item)

    def _wake(self) -> None:
        # Full buffer: a wake-up is already pending. Closed: the thread has ended.
        with contextlib.suppress(OSError):
            self._waker.send(b"\0")

    def _wait_for_work(self) -> None:
        if self._kill_thread or not self.event_queue.empty() or not self.to_provider_queue.empty():
            return
        sock = getattr(self.socket, "socket", None)
        if sock is None or self.state_machine.current_state == "Sta1":
            time.sleep(_POLL_S)  # no connection to wait on: pynetdicom's own poll
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes already buffered: select() would not see them
        try:
            select.select([sock, self._wakee], [], [], IDLE_WAIT_S)
        except (OSError, ValueError):
            return  # the socket closed under us: pynetdicom's check below reports it
        with contextlib.suppress(OSError):
            while self._wakee.recv(4096):
                pass

    def _is_transport_event(self) -> bool:
        self._wait_for_work()
        return super()._is_transport_event()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        # stop_dul waits for the thread to end polling with _run_loop_delay: not a busy spin.
        self._run_loop_delay = _POLL_S
        return super().stop_dul()

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            self._waker.close()
            self._wakee.close()


class _LargeReadSocket(AssociationSocket):
    """Reads a PDU with as few system calls as the socket allows.

    pynetdicom's ``recv`` reads 4 KiB at a time into a growing bytearray: a 512x512
    image is ~130 calls and as many extends. ``recv_into`` one buffer of the PDU's size
    takes what the kernel has (usually the whole 256 KiB PDU) in a handful of calls.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        if sock is None:
            return super().recv(nr_bytes)
        buffer = bytearray(nr_bytes)
        with memoryview(buffer) as view:
            nr_read = 0
            while nr_read < nr_bytes:
                received = sock.recv_into(view[nr_read:], nr_bytes - nr_read)
                if not received:
                    break  # connection closed: the caller sees a short PDU, as before
                nr_read += received
        if nr_read < nr_bytes:
            del buffer[nr_read:]
        return buffer


def _implicit_element(group_element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, group_element, len(value)) + value


def _uid_value(uid: object) -> bytes:
    value = str(uid).encode("ascii")
    return value + b"\x00" if len(value) % 2 else value


def encode_store_success(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """The command set of a successful C-STORE-RSP, as pynetdicom encodes it (tested).

    Command sets are always Implicit VR Little Endian (PS3.7 6.3.1).
    """
    body = b"".join(
        (
            _implicit_element(0x0002, _uid_value(sop_class_uid)),
            _implicit_element(0x0100, struct.pack("<H", 0x8001)),  # C-STORE-RSP
            _implicit_element(0x0120, struct.pack("<H", message_id)),
            _implicit_element(0x0800, struct.pack("<H", 0x0101)),  # no dataset follows
            _implicit_element(0x0900, struct.pack("<H", 0x0000)),
            _implicit_element(0x1000, _uid_value(sop_instance_uid)),
        )
    )
    return _implicit_element(0x0000, struct.pack("<I", len(body))) + body


class _EventDrivenDIMSE(DIMSEServiceProvider):
    """Assigned as the class of an acceptor's DIMSE provider before its thread starts.

    Also sends the plain success answer to a C-STORE without pynetdicom's generic message
    encoder (~0.3 ms through pydicom datasets per image); everything else goes through it.
    """

    _work: threading.Event

    def _prepare(self, work: threading.Event) -> None:
        self._work = work
        self.msg_queue = _SignallingQueue(work.set)

    def get_msg(self, block: bool = False) -> Any:
        if not block:
            # The reactor's poll: sleep until a message or an ACSE primitive (release,
            # abort) is queued, instead of returning empty-handed every millisecond.
            self._work.clear()
            dul = self.assoc.dul
            if self.msg_queue.empty() and dul.to_user_queue.empty() and dul.is_alive():
                self._work.wait(IDLE_WAIT_S)
        return super().get_msg(block)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        if (
            type(primitive) is C_STORE
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.Status == 0x0000
            and all(getattr(primitive, name, None) is None for name in _STATUS_OPTIONAL)
            and primitive.AffectedSOPClassUID
            and primitive.AffectedSOPInstanceUID
            and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)  # someone logs messages
            and (self.maximum_pdu_size == 0 or self.maximum_pdu_size >= 1024)
        ):
            command = encode_store_success(
                primitive.MessageIDBeingRespondedTo,
                primitive.AffectedSOPClassUID,
                primitive.AffectedSOPInstanceUID,
            )
            pdata = P_DATA()
            # A list, not the annotated tuple: pynetdicom checks for a list at run time.
            pdata.presentation_data_value_list = [
                [context_id, _COMMAND_LAST_FRAGMENT + command]  # type: ignore[list-item]
            ]
            self.dul.send_pdu(pdata)
            return
        super().send_msg(primitive, context_id)


def _supported() -> bool:
    return all(callable(getattr(cls, name, None)) for cls, name in _REQUIRED)


_SUPPORTED = _supported()
if not _SUPPORTED:
    logger.warning(
        "this pynetdicom version lacks the internals dicom_node.reactor relies on: "
        "associations keep pynetdicom's 1 ms polling (slower receiving)"
    )


def make_event_driven(assoc: Association) -> None:
    """Switch a not yet started acceptor association to event-driven waits."""
    if not _SUPPORTED or assoc.dul.is_alive():
        return
    work = threading.Event()
    assoc.dul.__class__ = _EventDrivenDUL
    assoc.dimse.__class__ = _EventDrivenDIMSE
    if type(assoc.dul.socket) is AssociationSocket:
        assoc.dul.socket.__class__ = _LargeReadSocket
    dul: _EventDrivenDUL = assoc.dul  # type: ignore[assignment]
    dimse: _EventDrivenDIMSE = assoc.dimse  # type: ignore[assignment]
    dul._prepare(work.set)
    dimse._prepare(work)


class EventDrivenRequestHandler(RequestHandler):
    """pynetdicom's request handler, with event-driven acceptor associations."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        make_event_driven(assoc)
        return assoc
