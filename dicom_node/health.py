"""The node's health check (`status --check`): does each DICOM port answer at the DICOM level?

A TCP connection alone proves little: the kernel completes it into the listen backlog while
the node is stopped, or its acceptor hangs, and a sender then waits for an answer that never
comes. So the check opens a Verification association under the node's own AE title and
sends a C-ECHO. The node accepts its own title only from this machine and only for
Verification (:class:`OwnTitleGuard`), and logs these associations at DEBUG.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any

from pynetdicom.association import Association

from dicom_node.config import Settings
from dicom_node.scu_responses import keep_responses_for_sender
from dicom_node.send import (
    VERIFICATION,
    client_tls,
    echo_status,
    scu_ae,
    set_nodelay,
    tls_refusal,
)


@dataclass(frozen=True)
class PortAnswer:
    answered: bool
    refused: bool  # nothing accepted the TCP connection at all
    detail: str


def is_own_check(assoc: Association) -> bool:
    """An association the node itself opened to check its ports (its own AE title calls)."""
    calling = str(assoc.requestor.ae_title).strip()
    return calling == str(assoc.acceptor.ae_title).strip()


def check_ports(settings: Settings, timeout_s: float) -> dict[str, PortAnswer]:
    """Ask each of the node's DICOM ports (plain, and TLS when enabled) for a C-ECHO."""
    node = settings.node
    host = "127.0.0.1" if node.bind_address in ("", "0.0.0.0", "::") else node.bind_address
    answers = {f"{host}:{node.port}": _check_port(settings, host, node.port, None, timeout_s)}
    if node.tls.enabled:
        context = _check_tls_context(settings)
        answers[f"{host}:{node.tls.port}"] = _check_port(
            settings, host, node.tls.port, context, timeout_s
        )
    return answers


def _check_tls_context(settings: Settings) -> ssl.SSLContext:
    # The node's own certificate as the client's, for a node that requires one; the node's
    # own port on this machine: what matters is that it answers, not who it is.
    context = client_tls(settings)
    context.verify_mode = ssl.CERT_NONE
    return context


def _check_port(
    settings: Settings, host: str, port: int, tls: ssl.SSLContext | None, timeout_s: float
) -> PortAnswer:
    started = time.monotonic()
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        return PortAnswer(False, True, f"no connection: {exc.strerror or exc}")
    ae = scu_ae(settings)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.add_requested_context(VERIFICATION)
    kwargs: dict[str, Any] = {"ae_title": settings.node.ae_title}
    if tls is not None:
        kwargs["tls_args"] = (tls, None)  # no server name: the node's own port
    assoc = keep_responses_for_sender(ae.associate(host, port, **kwargs))
    if assoc.is_rejected:
        # Alive: e.g. at node.max_associations, which the next check may find free again.
        rejection = assoc.acceptor.primitive
        reason = rejection.reason_str if rejection is not None else "no reason given"
        return PortAnswer(True, False, f"answers, association rejected: {reason}")
    if not assoc.is_established:
        if tls is not None:
            # A node requiring client certificates from a CA that did not sign its own
            # refuses the check's handshake: it answers, which is what the check asks.
            refusal = tls_refusal(host, port, tls, None, timeout_s)
            if refusal is not None:
                why = "answers TLS, but refused this check's certificate (node.tls.certificate)"
                return PortAnswer(True, False, f"{why}: {refusal}")
        return PortAnswer(
            False,
            False,
            f"takes TCP connections but gave no association answer in {timeout_s:g} s "
            "(the node is stopped, hung or overloaded)",
        )
    set_nodelay(assoc)
    code = echo_status(assoc)
    seconds = time.monotonic() - started
    if code is None:
        why = f"accepted the association but gave no C-ECHO answer in {timeout_s:g} s"
        return PortAnswer(False, False, why)
    return PortAnswer(code == 0, False, f"C-ECHO status 0x{code:04X} in {seconds:.3f} s")
