"""Event-driven waits for pynetdicom's acceptor associations, and C-STOREs served off the socket.

pynetdicom polls: each association has two threads (the DUL reading the socket, the
reactor serving DIMSE messages) that sleep 1 ms whenever idle, so every C-STORE waits
for them to notice the request and then the response (~1.3 ms of a 512x512 image's ~5 ms),
and idle associations wake 2,000 times a second. Here both sleep until there is work: the
DUL in ``select()`` on its socket and a wake-up socket written whenever a primitive is
queued for sending, the reactor on an event set whenever a DIMSE message or an ACSE
primitive is queued for it. pynetdicom's state machine and the reactor's loop run
unchanged; the DUL runs pynetdicom's loop less its sleep after a turn that queued no
event (``_EventDrivenDUL._run_loop``), since it waits in ``select()`` (measured by
``benchmarks/receive.py``). PDUs are also read with a few large ``recv_into`` calls
instead of pynetdicom's 4 KiB ones.

A plain C-STORE-RQ in an established association is assembled from the P-DATA-TF bytes
and served on the DUL's thread by pynetdicom's own Storage service class (see
``_EventDrivenDUL._read_pdu_data``); every other PDU and message takes pynetdicom's path.

This uses pynetdicom 3.0 internals (its queues, ``DULServiceProvider._is_transport_event``,
``_read_pdu_data``, ``_decode_pdu`` and ``_process_recv_primitive``).
If they are missing, associations keep pynetdicom's polling and a warning says so.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from pydicom.uid import UID
from pynetdicom import _config, evt
from pynetdicom._globals import APPLICATION_CONTEXT_NAME
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_ECHO, C_STORE, DIMSEPrimitive, DimseServiceType
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import ServiceClass, StorageServiceClass, VerificationServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import AssociationSocket, RequestHandler

from dicom_node.pdata import (
    P_DATA_TF,
    PDU_HEADER,
    PDV,
    PDV_COMMAND,
    PDV_LAST,
    MalformedPDU,
    StoreRequest,
    command_pdu,
    encode_store_success,
    parse_store_request,
    pdv_pdu,
    split_pdvs,
)
from dicom_node.sop_classes import class_names

logger = logging.getLogger(__name__)

# The longest sleep: bounds how late a thread sees a kill flag, a timer or a dead peer.
IDLE_WAIT_S = 0.05
_POLL_S = 0.001  # pynetdicom's own delay, kept where there is nothing to wait on

_REQUIRED = (
    (DULServiceProvider, "_is_transport_event"),
    (DULServiceProvider, "_process_recv_primitive"),
    (DULServiceProvider, "kill_dul"),
    (DULServiceProvider, "_read_pdu_data"),
    (DULServiceProvider, "_decode_pdu"),
    (DIMSEServiceProvider, "get_msg"),
    (DIMSEServiceProvider, "send_msg"),
    (Association, "get_handlers"),
    (AssociationSocket, "recv"),
)
_COMMAND_LAST_FRAGMENT = bytes([PDV_COMMAND | PDV_LAST])  # PDV message control header
_STATUS_OPTIONAL = ("ErrorComment", "OffendingElement")
_PDU_TYPES = frozenset(range(0x01, 0x08))
# Any PDU but a P-DATA-TF of an established association is small: an A-ASSOCIATE-RQ of
# 128 presentation contexts is ~10 KB from storescu, ~60 KB with every transfer syntax. A
# bigger one is refused before it is read: until the association is accepted anyone may
# send, and pynetdicom decodes a request at ~0.8 s of CPU per MB (20,000 contexts: 1.3 s).
MAX_CONTROL_PDU = 1024 * 1024
# A PDU's buffer grows by at most this much ahead of the bytes received: its header's
# length alone must not make the node allocate (a 6-byte header announced 3.75 GiB).
READ_CHUNK = 4 * 1024 * 1024
# Bytes a second that move a PDU's deadline on as they arrive: a large PDU (node.max_pdu_bytes
# 0 puts a whole image in one) arriving steadily over a slow link is not cut off, and a peer
# trickling bytes is, network_timeout_s after its first.
MIN_PDU_RATE = 16 * 1024
# Handlers that watch PDUs or DIMSE messages go by if a C-STORE bypasses pynetdicom's
# decoding: with any bound, every message takes pynetdicom's own path.
_OBSERVERS = (
    evt.EVT_DATA_RECV,
    evt.EVT_PDU_RECV,
    evt.EVT_DIMSE_RECV,
    evt.EVT_DATA_SENT,
    evt.EVT_PDU_SENT,
    evt.EVT_DIMSE_SENT,
)
# The one request each service class the node offers takes (PS3.4 A.4, B.2).
_REQUEST_OF: dict[type[ServiceClass], type[DIMSEPrimitive]] = {
    VerificationServiceClass: C_ECHO,
    StorageServiceClass: C_STORE,
}
# PS3.7 C.5: the operation is not one agreed on the context; the node has no such SOP class.
UNRECOGNIZED_OPERATION = 0x0211
SOP_CLASS_NOT_SUPPORTED = 0x0122
_ECHOED = (
    ("AffectedSOPInstanceUID", "AffectedSOPInstanceUID"),
    ("RequestedSOPInstanceUID", "AffectedSOPInstanceUID"),
    ("ActionTypeID", "ActionTypeID"),
    ("EventTypeID", "EventTypeID"),
)


@dataclass
class _IncomingStore:
    """A C-STORE-RQ whose data set is arriving."""

    context_id: int
    request: C_STORE
    fragments: list[memoryview] = field(default_factory=list)


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
    _command: list[PDV]
    _store: _IncomingStore | None
    # The context of the message last left to pynetdicom: its data set must come on it.
    _message_context: int | None
    # Set by the node's stop (RunningSCP.abort_remaining) before it cuts the connection.
    node_stopping = False

    def _prepare(self, on_user_item: Callable[[], None]) -> None:
        self._command = []
        self._store = None
        self._message_context = None
        self._wakee, self._waker = socket.socketpair()
        self._wakee.setblocking(False)
        self._waker.setblocking(False)
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
        if not self.event_queue.empty():
            # The events of the PDU read last go first (one per PDV handed to pynetdicom):
            # a C-STORE served off the next PDU must not overtake a message before it.
            return False
        self._wait_for_work()
        return super()._is_transport_event()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    # -- C-STORE requests taken off the socket ----------------------------------------
    # pynetdicom decodes each P-DATA-TF into PDU objects, assembles the DIMSE message from
    # copies of its fragments and hands it to the association's thread, which calls the
    # handler and hands the answer back to this one: ~2 ms of CPU per 512x512 image and two
    # thread switches. Here a plain C-STORE-RQ is assembled from the PDU's bytes and served
    # on this thread by pynetdicom's own Storage service class (handler, status checks,
    # response), and its success answer goes straight to the socket. Anything else (C-ECHO,
    # other requests, odd command sets, other PDUs and states) goes to pynetdicom as before.

    def _read_pdu_data(self) -> None:
        read = self._read_pdu()
        if read is None:
            return
        head, body = read
        if head[0] != P_DATA_TF or self.state_machine.current_state != "Sta6":
            self._command, self._store = [], None
            self._to_pynetdicom(head + body)
            return
        try:
            rest = self._take_pdvs(memoryview(body))
        except MalformedPDU as exc:
            logger.error("aborting association: malformed P-DATA-TF: %s", exc)
            self._command, self._store = [], None
            self.event_queue.put("Evt19")  # invalid PDU: the state machine sends A-ABORT
            return
        # One P-DATA-TF per PDV: pynetdicom's DIMSE decoder stops at a message's last
        # fragment and drops the PDVs after it in the same PDU (the next request's command).
        for item in rest:
            self._to_pynetdicom(pdv_pdu(item))

    def _read_pdu(self) -> tuple[bytearray, bytearray] | None:
        """Header and body of the next PDU; ``None`` with the event queued if there is none.

        The checks and events are pynetdicom's ``_read_pdu_data``'s.
        """
        sock = self.socket
        if sock is None:
            self.event_queue.put("Evt17")
            return None
        if self.state_machine.current_state == "Sta13":
            # An A-ABORT (or rejection) was sent: what the peer still sends is not read (its
            # bytes, parsed as PDU headers, logged an error each 6 bytes); the connection is
            # closed, as the ARTIM timer would close it.
            self.event_queue.put("Evt17")
            return None
        # Its first byte is here: not idle. The association's thread checks the network
        # timeout from the last PDU at any moment, also while this one arrives.
        self._idle_timer.restart()
        requesting = self.state_machine.current_state == "Sta2"  # an association request
        deadline = self._pdu_deadline(requesting)
        try:
            rate = None if requesting else MIN_PDU_RATE
            # Bytes coming: not idle (the association's thread would abort a long PDU's
            # arrival for its network timeout).
            arriving = self._idle_timer.restart
            head = _receive(sock, PDU_HEADER.size, deadline, rate, arriving)
            if len(head) < PDU_HEADER.size:
                self.event_queue.put("Evt17")  # transport connection closed
                return None
            pdu_type, _, length = PDU_HEADER.unpack(head)
            if pdu_type not in _PDU_TYPES:
                logger.error("unknown PDU type 0x%02X received: aborting association", pdu_type)
                self.event_queue.put("Evt19")
                return None
            established = pdu_type == P_DATA_TF and self.state_machine.current_state == "Sta6"
            if length > MAX_CONTROL_PDU and not established:
                logger.error(
                    "PDU of type 0x%02X announces %d bytes, more than any such PDU needs "
                    "(%d) outside an established association's data: aborting association",
                    pdu_type,
                    length,
                    MAX_CONTROL_PDU,
                )
                self.event_queue.put("Evt19")
                return None
            limit = self.assoc.acceptor.maximum_length
            if established and limit and length > limit:
                # PS3.8 D.1: never longer than the maximum this node negotiated. Read whole,
                # a peer could make the node hold up to 4 GiB per association.
                logger.error(
                    "P-DATA-TF of %d bytes, more than the %d bytes this node accepts (the "
                    "maximum PDU length it offered the peer): aborting association",
                    length,
                    limit,
                )
                self.event_queue.put("Evt19")
                return None
            body = _receive(sock, length, deadline, rate, arriving)
        except _PDUTooSlow as exc:
            logger.error(
                "the peer did not send a whole %s within %g s of %s (%s; %d bytes of it "
                "came): aborting association",
                "association request" if requesting else "PDU",
                (self.artim_timer if requesting else self._idle_timer).timeout,
                "connecting" if requesting else "its first byte",
                "min(30 s, node.network_timeout_s)"
                if requesting
                else f"node.network_timeout_s, and a second more for each "
                f"{MIN_PDU_RATE // 1024} KiB that came",
                exc.received,
            )
            self.event_queue.put("Evt17")
            return None
        except TimeoutError:
            logger.error(
                "the peer sent nothing for %g s inside a PDU (node.network_timeout_s): "
                "aborting association",
                self.assoc.network_timeout,
            )
            self.event_queue.put("Evt17")
            return None
        except OSError as exc:
            self._log_cut("connection closed before the entire PDU was received: %s", exc)
            self.event_queue.put("Evt17")
            return None
        if len(body) != length:
            self._log_cut(
                "connection closed inside a PDU (%d of %d bytes received)", len(body), length
            )
            self.event_queue.put("Evt17")
            return None
        return head, body

    def _pdu_deadline(self, requesting: bool) -> float | None:
        """When the PDU about to be read must have arrived whole (``time.monotonic()``): an
        association request within the ARTIM timer (the ACSE timeout from the connection),
        any other PDU within the network timeout from its first byte (an association kept
        open between images may have been quiet for most of it: its next image gets the
        whole timeout).

        pynetdicom checks its timers only between PDUs: a peer sending a byte now and then
        (slowloris) held its connection and association slot for as long as it liked, and
        ``node.max_associations`` such peers shut every sender out, before any AE title was
        checked. ``None``: no timeout set.
        """
        if requesting:
            if self.artim_timer.timeout is None:
                return None
            return time.monotonic() + max(0.0, self.artim_timer.remaining)
        timeout = self._idle_timer.timeout
        return None if timeout is None else time.monotonic() + timeout

    def _log_cut(self, message: str, *args: object) -> None:
        """A connection cut mid-PDU: an ERROR, unless the node's own stop cut it."""
        if self.node_stopping:
            logger.info(message + " (the node is stopping)", *args)
        else:
            logger.error(message, *args)

    def _to_pynetdicom(self, pdu: bytearray) -> None:
        try:
            decoded, event = self._decode_pdu(pdu)
        except Exception as exc:
            logger.error("unable to decode the received PDU: %s", exc)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(decoded)

    def _take_pdvs(self, body: memoryview) -> list[memoryview]:
        """Serve the C-STORE requests in a P-DATA-TF; return the PDVs left to pynetdicom."""
        rest: list[memoryview] = []
        for pdv in split_pdvs(body):
            store = self._store
            if store is not None:
                if pdv.is_command or pdv.context_id != store.context_id:
                    raise MalformedPDU(
                        f"PDV of context {pdv.context_id} (control 0x{pdv.control:02X}) "
                        f"inside the data set of C-STORE {store.request.MessageID}"
                    )
                store.fragments.append(pdv.data)
                if pdv.is_last:
                    self._store = None
                    self._serve_store(store)
            elif not pdv.is_command:
                # The data set of a message pynetdicom is assembling, which never compares
                # contexts: it stored a data set sent on another context than its command,
                # under the command's transfer syntax (PS3.8 9.3.1: one context per message).
                if pdv.context_id != self._message_context:
                    raise MalformedPDU(
                        f"data set PDV of context {pdv.context_id}, where its command came "
                        + (
                            f"on context {self._message_context}"
                            if self._message_context is not None
                            else "not at all"
                        )
                    )
                rest.append(pdv.raw)
            else:
                if self._command and pdv.context_id != self._command[0].context_id:
                    raise MalformedPDU(
                        f"command fragments on contexts {self._command[0].context_id} and "
                        f"{pdv.context_id}"
                    )
                self._message_context = None
                self._command.append(pdv)
                if pdv.is_last:
                    self._store = self._take_command(rest)
        return rest

    def _take_command(self, rest: list[memoryview]) -> _IncomingStore | None:
        """Take a complete command set: a C-STORE to serve here, or left to pynetdicom."""
        pdvs, self._command = self._command, []
        context_id = pdvs[-1].context_id  # every fragment's: _take_pdvs refuses a mixture
        request = None
        parsed = parse_store_request(b"".join(pdv.data for pdv in pdvs))
        if parsed is not None and self._serves(parsed, context_id):
            request = _store_primitive(parsed, context_id)
        if request is None:
            rest.extend(pdv.raw for pdv in pdvs)
            self._message_context = context_id  # its data set, if any, comes on it
            return None
        return _IncomingStore(context_id, request)

    def _serves(self, request: StoreRequest, context_id: int) -> bool:
        assoc = self.assoc
        return (
            context_id in assoc._accepted_cx
            # A C-STORE on another context (Verification) is refused by _GuardedAssociation.
            and uid_to_service_class(str(assoc._accepted_cx[context_id].abstract_syntax))
            is StorageServiceClass
            and not assoc._sent_release
            and uid_to_service_class(request.sop_class_uid) is StorageServiceClass
            and request.sop_class_uid not in assoc.acceptor.accepted_common_extended
            and not _config.STORE_RECV_CHUNKED_DATASET
            and not any(assoc.get_handlers(event) for event in _OBSERVERS)
        )

    def _serve_store(self, store: _IncomingStore) -> None:
        store.request.DataSet = BytesIO(b"".join(store.fragments))
        store.fragments.clear()
        context = self.assoc._accepted_cx[store.context_id]
        # pynetdicom's own: calls the EVT_C_STORE handler, checks its status, answers.
        StorageServiceClass(self.assoc).SCP(store.request, context)

    def send_now(self, pdu: bytes) -> bool:
        """Send a PDU from this thread, if called on it with the association established."""
        if threading.get_ident() != self.ident or self.state_machine.current_state != "Sta6":
            return False
        sock = self.socket
        if sock is None:
            return False
        sock.send(pdu)
        return True

    def run(self) -> None:
        # pynetdicom's thread target is the run_reactor bound before this class was assigned.
        self.run_reactor()

    def run_reactor(self) -> None:
        try:
            self._run_loop()
        finally:
            self._waker.close()
            self._wakee.close()
            if self.assoc.requestor.primitive is None:
                # The association's thread waits up to the ACSE timeout (30 s) for a
                # request that cannot come now: the peer hung up, or sent something else.
                # None is what pynetdicom's wait returns on its timeout: the thread ends.
                self.to_user_queue.put(None)  # type: ignore[arg-type]

    def _run_loop(self) -> None:
        """pynetdicom 3.0's DUL loop (``DULServiceProvider.run_reactor``) without its sleep
        after a turn that queued no event. A C-STORE served here queues none, so each PDU of
        an image paid a ``time.sleep(0)``: a system call, a thread switch and a GIL hand-off
        (~6 switches per 512x512 image; one association 316 against 268 images/s). The
        wait for work is ``_wait_for_work``'s select()."""
        self._idle_timer.start()
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception:
                logger.exception("error in the association's network loop: aborting it")
                self._abort_at_once()
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                continue
            try:
                self.state_machine.do_action(event)
            except Exception as exc:
                # pynetdicom's loop lets this end the thread: the peer is left without an
                # A-ABORT, and the cause goes to stderr. A command set pynetdicom cannot
                # decode (an unknown Command Field, a missing element) raises here.
                # pynetdicom's state machine has logged the traceback already.
                logger.error(
                    "aborting the association with %s: %s (%s in state %s): %s: %s",
                    _describe_peer(self.assoc),
                    "a received message could not be decoded"
                    if event == "Evt10"  # a P-DATA-TF received
                    else "a network event could not be handled",
                    event,
                    self.state_machine.current_state,
                    type(exc).__name__,
                    exc,
                )
                self._abort_at_once()
                return

    def _abort_at_once(self) -> None:
        # As pynetdicom does: the state machine may be broken, so bypass it.
        abort = A_ABORT_RQ()
        abort.source = 0x02
        abort.reason_diagnostic = 0x00
        with contextlib.suppress(OSError, AttributeError):
            self.socket.send(abort.encode())  # type: ignore[union-attr]
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True


class _PDUTooSlow(TimeoutError):
    """A PDU did not arrive whole by its deadline (``_EventDrivenDUL._pdu_deadline``)."""

    def __init__(self, received: int) -> None:
        super().__init__(f"{received} bytes received by the deadline")
        self.received = received


def _receive(
    sock: AssociationSocket,
    nr_bytes: int,
    deadline: float | None,
    rate: float | None,
    arriving: Callable[[], None] | None = None,
) -> bytearray:
    if isinstance(sock, _LargeReadSocket):
        return sock.recv_by(nr_bytes, deadline, rate, arriving)
    return sock.recv(nr_bytes)


class _LargeReadSocket(AssociationSocket):
    """Reads a PDU with as few system calls as the socket allows.

    pynetdicom's ``recv`` reads 4 KiB at a time into a growing bytearray: a 512x512
    image is ~130 calls and as many extends. ``recv_into`` one buffer of the PDU's size
    takes what the kernel has (usually the whole 256 KiB PDU) in a handful of calls.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        return self.recv_by(nr_bytes, None, None)

    def recv_by(
        self,
        nr_bytes: int,
        deadline: float | None,
        rate: float | None,
        arriving: Callable[[], None] | None = None,
    ) -> bytearray:
        """``nr_bytes`` (fewer if the connection closes); ``_PDUTooSlow`` if they have not
        all come by ``deadline`` (``time.monotonic()``; ``None``: the socket's own timeout
        for each read only), moved on by a second for each ``rate`` bytes received.
        ``arriving`` is called as bytes come."""
        sock = self.socket
        if sock is None:
            return super().recv(nr_bytes)
        timeout = sock.gettimeout()
        buffer = bytearray(min(nr_bytes, READ_CHUNK))
        nr_read = 0
        try:
            while nr_read < nr_bytes:
                if nr_read == len(buffer):  # more than READ_CHUNK: grow as the bytes arrive
                    buffer.extend(bytes(min(nr_bytes - nr_read, READ_CHUNK)))
                due = deadline
                if due is not None and rate:
                    due += nr_read / rate
                if due is not None:
                    left = due - time.monotonic()
                    if left <= 0:
                        raise _PDUTooSlow(nr_read)
                    sock.settimeout(left if timeout is None else min(timeout, left))
                try:
                    with memoryview(buffer) as view:
                        received = sock.recv_into(view[nr_read:], len(buffer) - nr_read)
                except TimeoutError:
                    if due is not None and time.monotonic() >= due:
                        raise _PDUTooSlow(nr_read) from None
                    raise
                if not received:
                    break  # connection closed: the caller sees a short PDU, as before
                nr_read += received
                if arriving is not None:
                    arriving()
        finally:
            if deadline is not None:
                sock.settimeout(timeout)
        if nr_read < nr_bytes:
            del buffer[nr_read:]
        return buffer


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
            dul = self.dul
            if isinstance(dul, _EventDrivenDUL) and dul.send_now(command_pdu(context_id, command)):
                return  # a C-STORE served on the DUL's thread: no hand-off to send it
            pdata = P_DATA()
            # A list, not the annotated tuple: pynetdicom checks for a list at run time.
            pdata.presentation_data_value_list = [
                [context_id, _COMMAND_LAST_FRAGMENT + command]  # type: ignore[list-item]
            ]
            self.dul.send_pdu(pdata)
            return
        super().send_msg(primitive, context_id)


def _describe_peer(assoc: Association) -> str:
    requestor = assoc.requestor
    return f"AE {requestor.ae_title!r} at {requestor.address}:{requestor.port}"


def _store_primitive(request: StoreRequest, context_id: int) -> C_STORE | None:
    """The C-STORE request primitive pynetdicom would build; ``None`` if it refuses a value."""
    primitive = C_STORE()
    try:
        primitive.MessageID = request.message_id
        primitive.AffectedSOPClassUID = request.sop_class_uid
        primitive.AffectedSOPInstanceUID = request.sop_instance_uid
        primitive.Priority = request.priority
        if request.move_originator_ae is not None:
            primitive.MoveOriginatorApplicationEntityTitle = request.move_originator_ae
        if request.move_originator_id is not None:
            primitive.MoveOriginatorMessageID = request.move_originator_id
    except (ValueError, TypeError):
        return None
    primitive._context_id = context_id
    return primitive


def _supported() -> bool:
    return all(callable(getattr(cls, name, None)) for cls, name in _REQUIRED)


_SUPPORTED = _supported()
if not _SUPPORTED:
    logger.warning(
        "this pynetdicom version lacks the internals dicom_node.reactor relies on: "
        "associations keep pynetdicom's 1 ms polling (slower receiving)"
    )


def mark_node_stopping(assoc: Association) -> None:
    """The node's stop is about to cut ``assoc``'s connection (logged as such, not as an
    ERROR)."""
    if isinstance(assoc.dul, _EventDrivenDUL):
        assoc.dul.node_stopping = True


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


class _GuardedACSE(ACSE):
    """An acceptor's ACSE: a request it cannot negotiate ends with an A-ABORT and a log line,
    one for another application context than DICOM's with an A-ASSOCIATE-RJ.

    pynetdicom raises out of its negotiation for some malformed A-ASSOCIATE-RQs (a
    presentation context without a transfer syntax, or without an abstract syntax). The
    association's thread then ended: the requestor got no answer, and its connection and
    network thread stayed until it hung up. pynetdicom never looks at the application
    context name: it accepted any (PS3.8 7.1.1.2 has the acceptor reject it).
    """

    def negotiate_association(self) -> None:
        request = self.requestor.primitive
        if request is not None and not is_dicom_application_context(request):
            self.requestor.ae_title = request.calling_ae_title  # as pynetdicom's negotiation
            # Permanent, service user, application context name not supported (PS3.8
            # 9.3.4), as storescp answers; Receiver.on_rejected logs it.
            self.send_reject(0x01, 0x01, 0x02)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        try:
            super().negotiate_association()
        except Exception as exc:
            logger.warning(
                "association request from %s aborted: it cannot be negotiated "
                "(a malformed A-ASSOCIATE-RQ): %s: %s",
                _describe_peer(self.assoc),
                type(exc).__name__,
                exc,
            )
            self.send_abort(0x02)  # as the service provider: the request was invalid
            self.assoc.kill()


def is_dicom_application_context(request: A_ASSOCIATE) -> bool:
    """The request names the DICOM Application Context (a NUL or space padding tolerated)."""
    name = str(request.application_context_name or "").rstrip("\0 ")
    return name == APPLICATION_CONTEXT_NAME


class _GuardedAssociation(Association):
    """An acceptor association that answers a request its presentation context does not take
    (a C-FIND on the Verification context, an N-ACTION on a storage one) with the response
    of the same command and a failure status, and a log line; the association goes on.

    pynetdicom picks the service class by the message's SOP class UID, never the context's:
    it answered a C-FIND of the Verification SOP class with a C-ECHO-RSP (Success), an
    N-ACTION of a storage class with a C-STORE-RSP 0xA700 after the node's C-STORE handler
    failed on it, stored a C-STORE sent on the Verification context, and aborted the
    association for a SOP class it has no service class for (a C-FIND for Study Root).
    """

    def _serve_request(self, msg: DimseServiceType, context_id: int) -> None:
        context = self._accepted_cx.get(context_id)
        if context is None or self._sent_release or not msg.is_valid_request:
            super()._serve_request(msg, context_id)  # pynetdicom logs, aborts or ignores it
            return
        sop_class = str(
            getattr(msg, "AffectedSOPClassUID", None) or getattr(msg, "RequestedSOPClassUID", "")
        )
        service = self._service_class(str(context.abstract_syntax))
        taken = _REQUEST_OF.get(service)
        if taken is None or (type(msg) is taken and self._service_class(sop_class) is service):
            super()._serve_request(msg, context_id)
            return
        supported = any(cx.abstract_syntax == sop_class for cx in self.acceptor.supported_contexts)
        self._refuse(msg, context_id, context, sop_class, taken, supported)

    def _service_class(self, uid: str) -> type[ServiceClass]:
        """pynetdicom's choice for a SOP class, SOP Class Common Extended Negotiation included."""
        extended = self.acceptor.accepted_common_extended.get(UID(uid))
        return uid_to_service_class(str(extended[0]) if extended else uid)

    def _refuse(
        self,
        msg: DimseServiceType,
        context_id: int,
        context: PresentationContext,
        sop_class: str,
        taken: type[DIMSEPrimitive],
        supported: bool,
    ) -> None:
        status = UNRECOGNIZED_OPERATION if supported else SOP_CLASS_NOT_SUPPORTED
        logger.warning(
            "refused %s-RQ from %s (message ID %s, %s) on presentation context %s (%s), "
            "which takes %s only: answered with status 0x%04X (%s)",
            msg.msg_type,
            _describe_peer(self),
            msg.MessageID,
            class_names([sop_class]),
            context_id,
            class_names([str(context.abstract_syntax)]),
            taken().msg_type,
            status,
            "unrecognized operation" if supported else "SOP class not supported",
        )
        response = type(msg)()
        response.MessageIDBeingRespondedTo = msg.MessageID
        response.AffectedSOPClassUID = sop_class
        response.Status = status
        # U(=) and C(=) in these responses: the request's values (PS3.7 9.3, 10.3).
        for request_name, response_name in _ECHOED:
            value = getattr(msg, request_name, None)
            if value is not None:
                setattr(response, response_name, value)
        self.dimse.send_msg(response, context_id)


class EventDrivenRequestHandler(RequestHandler):
    """pynetdicom's request handler, with event-driven acceptor associations that refuse
    requests their presentation context does not take."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        assoc.__class__ = _GuardedAssociation
        assoc.acse.__class__ = _GuardedACSE
        make_event_driven(assoc)
        return assoc
