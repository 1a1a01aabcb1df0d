"""Send (SCU side): C-ECHO and C-STORE associations to configured peers, TCP_NODELAY on."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from dicom_node.config import PeerSettings, Settings

logger = logging.getLogger(__name__)


def scu_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.node.ae_title)
    ae.network_timeout = settings.node.network_timeout_s
    ae.acse_timeout = min(30.0, settings.node.network_timeout_s)
    ae.dimse_timeout = settings.node.network_timeout_s
    ae.connection_timeout = 10
    return ae


def client_tls(settings: Settings) -> tuple[ssl.SSLContext, None] | None:
    tls = settings.node.tls
    if tls.certificate is None or tls.key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False  # DICOM peers are addressed by IP; the CA vouches
    context.load_cert_chain(certfile=str(tls.certificate), keyfile=str(tls.key))
    if tls.ca_certificate is not None:
        context.load_verify_locations(cafile=str(tls.ca_certificate))
    return context, None


def set_nodelay(assoc: Association) -> None:
    """Nagle's algorithm costs ~40 ms per C-STORE on loopback and LAN (PEERS.md)."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def associate(ae: AE, settings: Settings, peer: PeerSettings) -> Association:
    kwargs: dict[str, Any] = {"ae_title": peer.ae_title}
    if peer.tls:
        tls_args = client_tls(settings)
        if tls_args is not None:
            kwargs["tls_args"] = tls_args
    assoc = ae.associate(peer.host, peer.port, **kwargs)
    if assoc.is_established:
        set_nodelay(assoc)
    return assoc


def echo_peer(settings: Settings, peer: PeerSettings) -> dict[str, Any]:
    ae = scu_ae(settings)
    ae.add_requested_context(Verification)
    started = time.monotonic()
    assoc = associate(ae, settings, peer)
    if not assoc.is_established:
        why = (
            "association rejected"
            if assoc.is_rejected
            else "no association (unreachable or aborted)"
        )
        logger.warning("C-ECHO to %s@%s:%d: %s", peer.ae_title, peer.host, peer.port, why)
        return {"ok": False, "detail": why, "seconds": time.monotonic() - started}
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = int(status.Status) if status and "Status" in status else None
    ok = code == 0
    detail = f"status 0x{code:04X}" if code is not None else "no response"
    return {"ok": ok, "detail": detail, "seconds": time.monotonic() - started}
