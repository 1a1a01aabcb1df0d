"""The Storage SCP's application entity: presentation contexts, access control, TLS, sockets."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.config import Settings
from dicom_node.errors import ConfigError
from dicom_node.reactor import EventDrivenRequestHandler, mark_node_stopping
from dicom_node.receive import Receiver
from dicom_node.send import node_tls_context
from dicom_node.sop_classes import LABEL_MAP_SEGMENTATION_STORAGE

logger = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
# Per association already served: how long a receiver process lets idle ones accept first.
BUSY_ACCEPT_DELAY_S = 0.002
# node.tls.certificate expiring within this many days: a WARNING at start and twice a day.
CERTIFICATE_RENEWAL_DAYS = 30

# Accepted as sent: uncompressed, deflated, and the common compressed syntaxes.
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old devices)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
]


class _SharedUIDContext(PresentationContext):
    """A supported context whose deep copy shares its (immutable) UIDs.

    pynetdicom deep-copies the server's supported contexts for every association (~170
    here, 15 transfer syntaxes each); the generic deepcopy rebuilds every UID through
    pydicom's validation: ~22 ms of CPU per association, more than storing an image.
    The copy stays a separate object, as pynetdicom intends: only the strings are shared.
    """

    @classmethod
    def copy_of(cls, context: PresentationContext) -> _SharedUIDContext:
        clone = cls.__new__(cls)
        clone.__dict__.update(context.__dict__)
        clone._transfer_syntax = list(context._transfer_syntax)
        return clone

    def __deepcopy__(self, memo: dict[int, Any]) -> _SharedUIDContext:
        return self.copy_of(self)


class _NodeServer(ThreadedAssociationServer):
    """pynetdicom's server with TCP_NODELAY on every accepted socket, and the TLS handshake
    on the connection's own thread.

    Without TCP_NODELAY, Nagle's algorithm and delayed ACKs add ~40 ms to each C-STORE
    response exchange (see PEERS.md). pynetdicom does the handshake as it accepts, on the
    one thread that listens: a client that connects and sends nothing held the TLS port
    for every other sender, and a refused handshake left no log line.
    """

    # A request's thread ends once its association's own thread starts, or after the TLS
    # handshake's timeout: stopping the node must not wait for a silent TLS client.
    daemon_threads = True

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        with contextlib.suppress(OSError):
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A peer that stops inside a PDU (or stops reading our answer) held its association,
        # and a slot of node.max_associations, until it closed the connection: pynetdicom's
        # timeouts cannot end a read blocked in the kernel, and neither could a stop.
        client.settimeout(self.ae.network_timeout)
        if self.ssl_context is not None:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket) and not self._handshake(request, client_address):
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)

    def _handshake(self, request: ssl.SSLSocket, address: tuple[str, int]) -> bool:
        """Within the time a peer has to ask for an association; False (logged) if it fails."""
        timeout = request.gettimeout()
        request.settimeout(self.ae.acse_timeout)
        try:
            request.do_handshake()
        except ssl.SSLEOFError:
            # Closed before a word of TLS: a port probe, as on the plain port (not logged).
            logger.debug("TLS connection from %s:%s closed before its handshake", *address)
            return False
        except (OSError, ValueError) as exc:
            if isinstance(exc, TimeoutError):
                reason = f"no TLS handshake within {self.ae.acse_timeout:g} s"
            elif isinstance(exc, ssl.SSLCertVerificationError):
                # OpenSSL's reason alone is the same for an expired certificate and a stranger's.
                reason = f"{exc.reason}: {exc.verify_message}"
            else:
                reason = str(getattr(exc, "reason", None) or exc) or type(exc).__name__
            logger.warning(
                "DICOM TLS connection from %s:%s refused: %s%s",
                address[0],
                address[1],
                reason,
                _tls_hint(reason),
            )
            return False
        finally:
            with contextlib.suppress(OSError):
                request.settimeout(timeout)
        return True


def _tls_hint(reason: str) -> str:
    """What an administrator would check for OpenSSL's reason, where it is a common one."""
    if reason in (
        "WRONG_VERSION_NUMBER",
        "HTTP_REQUEST",
        "UNEXPECTED_RECORD",
        "RECORD_LAYER_FAILURE",
    ):
        return " (not TLS: a sender using the plain DICOM protocol on the TLS port?)"
    if reason.startswith("CERTIFICATE_VERIFY_FAILED"):
        return " (the sender's certificate, checked against node.tls.ca_certificate)"
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return (
            " (the sender sent no certificate; node.tls.require_client_certificate asks for"
            " one signed by node.tls.ca_certificate)"
        )
    if "ALERT" in reason and ("CERTIFICATE" in reason or "UNKNOWN_CA" in reason):
        return (
            " (the sender refused node.tls.certificate: does it trust the CA that signed it?"
            " is the certificate still valid?)"
        )
    if reason == "UNSUPPORTED_PROTOCOL":
        return " (the sender offers only TLS 1.1 or older; the node takes TLS 1.2 and 1.3)"
    if reason == "NO_SHARED_CIPHER":
        return (
            " (the sender offers no cipher suite the node takes: TLS 1.2 with ECDHE and"
            " AES-GCM or ChaCha20-Poly1305 (BCP 195), or TLS 1.3; node.tls.ciphers widens it)"
        )
    if "CERTIFICATE" in reason or "UNKNOWN_CA" in reason:
        return (
            " (the sender's certificate: none sent, or not signed by node.tls.ca_certificate;"
            " or the sender does not trust node.tls.certificate)"
        )
    return ""


class _SharedListenerServer(_NodeServer):
    """One listening socket shared by every receiver process (the pre-fork model).

    The kernel's SO_REUSEPORT hashing put two or three of four senders on one process while
    others idled. With one shared socket every process is woken for a connection and the
    first to accept takes it; the others get EAGAIN (the socket is non-blocking) and wait
    on. A process already serving associations waits a little before accepting, so an
    idle one takes the connection first.
    """

    adopted: socket.socket | None = None  # set on the per-process subclass of a child

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Accepted connections whose association thread is not started yet: not counted by
        # active_associations, and four senders starting together fall in that window.
        self._starting = 0
        self._starting_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.adopted is None:
            super().server_bind()
        else:  # a child: serve the parent's listening socket instead of binding a new one
            assert self.socket is not None
            self.socket.close()
            self.socket = self.adopted
            self.server_address = self.adopted.getsockname()
        assert self.socket is not None
        self.socket.setblocking(False)

    def server_activate(self) -> None:
        if self.adopted is None:  # the adopted socket is listening already
            super().server_activate()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        busy = len(self.active_associations) + self._starting
        if busy:
            time.sleep(min(busy, 5) * BUSY_ACCEPT_DELAY_S)
        return super().get_request()  # BlockingIOError when another process took it

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._starting_lock:
            self._starting += 1
        try:
            super().process_request(request, client_address)  # starts the request's thread
        except BaseException:
            self._started()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._started()  # the association's own thread runs (or it failed)

    def _started(self) -> None:
        with self._starting_lock:
            self._starting -= 1


class _NodeAE(AE):
    """pynetdicom's AE, not counting acceptors whose peer left before associating.

    After a bare TCP connect and close (a port probe, a load balancer's health check) the
    acceptor thread waits out the whole ACSE timeout for an A-ASSOCIATE-RQ that cannot
    come; counted, such threads would refuse real senders ("local limit exceeded").
    """

    @property
    def active_associations(self) -> list[Association]:
        return [
            assoc
            for assoc in super().active_associations
            if not (assoc.is_acceptor and not assoc.is_established and not assoc.dul.is_alive())
        ]


def build_ae(settings: Settings) -> AE:
    node = settings.node
    ae = _NodeAE(ae_title=node.ae_title)
    ae.maximum_associations = node.max_associations
    ae.maximum_pdu_size = node.max_pdu_bytes
    ae.network_timeout = node.network_timeout_s
    ae.acse_timeout = min(30.0, node.network_timeout_s)
    ae.dimse_timeout = node.network_timeout_s
    ae.require_called_aet = True
    if not node.accept_unknown_callers:
        titles = [peer.ae_title for peer in settings.peers]
        if not titles:
            logger.warning(
                "no peers configured and node.accept_unknown_callers is false: "
                "every association will be rejected; add the scanner/PACS under peers"
            )
        # The node's own title: its health check (`status --check`), which OwnTitleGuard
        # admits from this machine only. (It also keeps the list from being empty, which
        # pynetdicom would take for "anyone".)
        ae.require_calling_aet = [*titles, node.ae_title]
    ae.add_supported_context(VERIFICATION)
    storage_classes = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    if LABEL_MAP_SEGMENTATION_STORAGE not in storage_classes:
        storage_classes.append(LABEL_MAP_SEGMENTATION_STORAGE)
    for uid in storage_classes:
        ae.add_supported_context(uid, TRANSFER_SYNTAXES)
    return ae


def tls_context(settings: Settings) -> ssl.SSLContext:
    tls = settings.node.tls
    if tls.certificate is None or tls.key is None:
        raise ConfigError("node.tls needs certificate and key")
    try:
        context = node_tls_context(tls, ssl.Purpose.CLIENT_AUTH)
    except ValueError as exc:
        raise ConfigError(f"cannot load the TLS certificate/key/CA: {exc}") from exc
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
    return context


def check_certificate_dates(settings: Settings) -> datetime | None:
    """``node.tls.certificate``, where the node uses it (its TLS port, peers with ``tls``):
    ConfigError if expired or not yet valid; else its notAfter (None when it is not used,
    or not in the form read here). OpenSSL loads an expired certificate without a word, and
    every sender and PACS then refused the node's handshakes. That it expires soon is
    ``warn_of_certificate_expiry``'s to say, at start and while the node runs."""
    certificate = certificate_in_use(settings)
    if certificate is None:
        return None
    validity = certificate_validity(certificate)
    if validity is None:
        return None  # loaded by OpenSSL, but not in the form read here: its handshakes will tell
    not_before, not_after = validity
    now = datetime.now(UTC)
    if now > not_after:
        raise ConfigError(
            f"node.tls.certificate {certificate} expired on {not_after:%Y-%m-%d %H:%M} UTC:"
            " senders and peers refuse it; install a renewed certificate"
        )
    if now < not_before:
        raise ConfigError(
            f"node.tls.certificate {certificate} is valid only from"
            f" {not_before:%Y-%m-%d %H:%M} UTC (is this machine's clock right?)"
        )
    return not_after


def certificate_in_use(settings: Settings) -> Path | None:
    """``node.tls.certificate`` where the node uses it: its TLS port, peers with ``tls``."""
    tls = settings.node.tls
    if tls.certificate is None or not (tls.enabled or any(p.tls for p in settings.peers)):
        return None
    return tls.certificate


def warn_of_certificate_expiry(
    certificate: Path, not_after: datetime, now: datetime | None = None
) -> None:
    """A WARNING when the certificate the node loaded at start expires within
    ``CERTIFICATE_RENEWAL_DAYS``, an ERROR once it has expired: a node runs for months, and
    it reads its certificate only when it starts."""
    now = now or datetime.now(UTC)
    when = f"{not_after:%Y-%m-%d %H:%M}"
    if now > not_after:
        logger.error(
            "node.tls.certificate %s expired on %s UTC: senders and peers refuse the node's "
            "TLS handshakes; install a renewed certificate and restart the node",
            certificate,
            when,
        )
        return
    left = not_after - now
    if left < timedelta(days=CERTIFICATE_RENEWAL_DAYS):
        logger.warning(
            "node.tls.certificate %s expires on %s UTC, in %d days: renew it before then, "
            "and restart the node (it reads the certificate when it starts); senders and "
            "peers refuse an expired certificate",
            certificate,
            when,
            left.days,
        )


def certificate_validity(path: Path) -> tuple[datetime, datetime] | None:
    """notBefore and notAfter of the first certificate of a PEM file; None if unreadable
    (the ssl module decodes a peer's certificate, never a file's)."""
    from cryptography import x509

    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    return certificate.not_valid_before_utc, certificate.not_valid_after_utc


class CallerHostCheck:
    """``node.check_caller_host``: a configured peer's AE title only from its host's address.

    Runs on the association request, before pynetdicom's own AE title checks; AE titles no
    peer has are left to those. Host names are resolved for each association, so a changed
    DNS entry is followed without a restart.
    """

    def __init__(self, settings: Settings) -> None:
        self._hosts: dict[str, list[str]] = {}
        for peer in settings.peers:
            self._hosts.setdefault(peer.ae_title.strip(), []).append(peer.host)

    def on_requested(self, event: evt.Event) -> None:
        assoc, request = event.assoc, _request(event)
        if request is None:
            return
        calling = str(request.calling_ae_title).strip()
        hosts = self._hosts.get(calling)
        if not hosts:
            return
        address = _plain_address(str(assoc.requestor.address))
        allowed: set[str] = set()
        for host in hosts:
            allowed |= _addresses_of(host)
        if address in allowed:
            return
        _reject_caller(
            assoc,
            calling,
            f"the peer with this AE title is at {', '.join(hosts)} "
            f"({', '.join(sorted(allowed)) or 'does not resolve'}), not {address} "
            "(node.check_caller_host)",
        )


class OwnTitleGuard:
    """The node's own AE title as the caller: only its health check, from this machine.

    ``build_ae`` admits the title for that check; here an association request with it from
    another machine, or proposing more than Verification, is rejected and logged.
    """

    def __init__(self, ae_title: str) -> None:
        self.ae_title = ae_title.strip()

    def on_requested(self, event: evt.Event) -> None:
        assoc, request = event.assoc, _request(event)
        if request is None:
            return
        calling = str(request.calling_ae_title).strip()
        if calling != self.ae_title:
            return
        proposed = {str(cx.abstract_syntax) for cx in request.presentation_context_definition_list}
        if not from_this_machine(assoc):
            why = "only the node's health check on this machine may call with it"
        elif proposed - {VERIFICATION}:
            why = "the node's health check asks for Verification only, not for storage"
        else:
            return
        _reject_caller(assoc, calling, f"this is the node's own AE title; {why}")


def _request(event: evt.Event) -> A_ASSOCIATE | None:
    """The A-ASSOCIATE-RQ of an EVT_REQUESTED (None is not reached: pynetdicom sets it first)."""
    return event.assoc.requestor.primitive


def _reject_caller(assoc: Association, calling: str, why: str) -> None:
    """Reject an association request from an EVT_REQUESTED handler, with a log line.

    ``calling``: from the request; pynetdicom sets ``requestor.ae_title`` only afterwards.
    """
    logger.warning(
        "association rejected: calling AE %r at %s:%s: %s",
        calling,
        assoc.requestor.address,
        assoc.requestor.port,
        why,
    )
    # A-ASSOCIATE-RJ permanent, service user, calling AE title not recognised: what
    # pynetdicom sends for an unknown AE title, and what pynetdicom lets an EVT_REQUESTED
    # handler do in its place.
    assoc.acse.send_reject(0x01, 0x01, 0x03)
    assoc.kill()


def _plain_address(address: str) -> str:
    # An IPv4 peer of a dual-stack (::) listener shows as ::ffff:a.b.c.d.
    return address.removeprefix("::ffff:")


def from_this_machine(assoc: Association) -> bool:
    """The peer is this machine: a loopback address, or the address it called."""
    peer = _plain_address(str(assoc.requestor.address))
    try:
        if ipaddress.ip_address(peer.split("%")[0]).is_loopback:
            return True
    except ValueError:
        return False
    sock = getattr(assoc.dul.socket, "socket", None)
    try:
        local = sock.getsockname()[0] if sock is not None else None
    except OSError:
        return False
    return local is not None and _plain_address(str(local)) == peer


def _addresses_of(host: str) -> set[str]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return set()
    return {_plain_address(str(info[4][0])) for info in infos}


def _listen_hint(exc: OSError, port: int) -> str:
    if isinstance(exc, PermissionError) and port < 1024:
        # Not a port in use: only root, or a process granted the capability, binds below 1024.
        return (
            "ports below 1024 need root or CAP_NET_BIND_SERVICE, e.g. AmbientCapabilities= "
            "in scripts/dicom-node.service, or use a port of 1024 or more"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return "node.bind_address is not an address of this machine"
    return "is another node or PACS using the port?"


@dataclass
class RunningSCP:
    ae: AE
    servers: list[ThreadedAssociationServer]
    threads: list[threading.Thread]

    @property
    def sockets(self) -> list[socket.socket]:
        """The listening sockets, in listener order: what ``start_scp(adopt=...)`` takes."""
        return [server.socket for server in self.servers if server.socket is not None]

    def stop_accepting(self) -> None:
        for server in self.servers:
            server.shutdown()

    def abort_remaining(self) -> None:
        for assoc in self.ae.active_associations:
            # A read blocked on a silent peer returns at once (end of stream), so the abort
            # does not wait for it; the A-ABORT can still be written.
            sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
            mark_node_stopping(assoc)  # its read cut short is no fault to log as one
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RD)
            assoc.abort()


def start_scp(
    settings: Settings,
    receiver: Receiver,
    *,
    shared: bool = False,
    adopt: list[socket.socket] | None = None,
) -> RunningSCP:
    """Start listening (plain port, and the TLS port when enabled); returns at once.

    ``shared``: the listening sockets will be served by several processes as well
    (``RunningSCP.sockets`` to hand them over). ``adopt``: serve those sockets, handed
    over by the parent, in the order of the listeners.
    """
    ae = build_ae(settings)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, receiver.on_store),
        (evt.EVT_C_ECHO, receiver.on_echo),
        (evt.EVT_ACCEPTED, receiver.on_accepted),
        (evt.EVT_REJECTED, receiver.on_rejected),
        (evt.EVT_RELEASED, receiver.on_released),
        (evt.EVT_ABORTED, receiver.on_aborted),
        (evt.EVT_REQUESTED, OwnTitleGuard(settings.node.ae_title).on_requested),
    ]
    node = settings.node
    if node.check_caller_host:
        handlers.append((evt.EVT_REQUESTED, CallerHostCheck(settings).on_requested))
    listeners: list[tuple[int, ssl.SSLContext | None]] = [(node.port, None)]
    if node.tls.enabled:
        listeners.append((node.tls.port, tls_context(settings)))
    servers: list[ThreadedAssociationServer] = []
    threads: list[threading.Thread] = []
    for number, (port, context) in enumerate(listeners):
        server_class: type[_NodeServer] = _NodeServer
        if adopt is not None:
            server_class = type(
                "_AdoptedListenerServer", (_SharedListenerServer,), {"adopted": adopt[number]}
            )
        elif shared:
            server_class = _SharedListenerServer
        try:
            server = ae.make_server(
                (node.bind_address, port),
                ssl_context=context,
                evt_handlers=handlers,
                server_class=server_class,
                request_handler=EventDrivenRequestHandler,
            )
        except OSError as exc:
            for started in servers:
                started.shutdown()
            raise ConfigError(
                f"cannot listen on {node.bind_address}:{port}: {exc.strerror or exc} "
                f"({_listen_hint(exc, port)})"
            ) from exc
        server.contexts = [_SharedUIDContext.copy_of(cx) for cx in server.contexts]
        thread = threading.Thread(target=server.serve_forever, name=f"scp-{port}", daemon=True)
        thread.start()
        ae._servers.append(server)  # so ae.shutdown() finds it, as start_server does
        servers.append(server)
        threads.append(thread)
        logger.info(
            "listening as AE %s on %s:%d%s",
            node.ae_title,
            node.bind_address,
            port,
            " (DICOM TLS)" if context else "",
        )
    return RunningSCP(ae=ae, servers=servers, threads=threads)
