"""Send (SCU side): C-ECHO and C-STORE associations to configured peers, TCP_NODELAY on."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS

from dicom_node.config import DicomWebDestination, PeerSettings, Settings, TLSSettings
from dicom_node.errors import DeliveryError
from dicom_node.scu_responses import keep_responses_for_sender
from dicom_node.seg_source_text import keep_text_as_stored

logger = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"


def scu_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.node.ae_title)
    ae.network_timeout = settings.node.network_timeout_s
    ae.acse_timeout = min(30.0, settings.node.network_timeout_s)
    ae.dimse_timeout = settings.node.network_timeout_s
    ae.connection_timeout = 10
    return ae


# BCP 195 (RFC 9325, 4.2) for TLS 1.2: forward-secret AEAD suites only, those DCMTK's default
# profile proposes; Python's default list also takes CBC suites. TLS 1.3's suites are all AEAD.
TLS12_CIPHERS = (
    "@SECLEVEL=2:ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!aDSS"
)


class _KeyHasPassphrase(Exception):
    pass


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL asks for the passphrase on the terminal: `serve` waited there.
    raise _KeyHasPassphrase


def _file_problem(exc: OSError) -> str:
    if not isinstance(exc, ssl.SSLError):
        return str(exc.strerror or exc)
    hint = {
        "KEY_VALUES_MISMATCH": "the key is not this certificate's",
        "NO_CERTIFICATE_OR_CRL_FOUND": "no PEM certificate in it",
        None: "not a PEM certificate and its PEM private key",  # OpenSSL's "PEM lib"
    }.get(exc.reason)
    return f"{hint} ({exc})" if hint else str(exc)


def node_tls_context(tls: TLSSettings, purpose: ssl.Purpose) -> ssl.SSLContext:
    """A context with BCP 195's TLS 1.2 suites (or ``tls.ciphers``), ``tls.certificate`` and
    ``tls.key``, and ``tls.ca_certificate`` where set as the only CA trusted (else the
    system's CAs, for SERVER_AUTH). ValueError: which file, and what is wrong with it."""
    ca = str(tls.ca_certificate) if tls.ca_certificate is not None else None
    try:
        # Given a CA file it loads that one alone: with no host name check, the system's CAs
        # would let any holder of a public CA's certificate, for any name, pass as a peer.
        context = ssl.create_default_context(purpose, cafile=ca)
    except OSError as exc:
        raise ValueError(f"node.tls.ca_certificate {ca}: {_file_problem(exc)}") from exc
    context.set_ciphers(tls.ciphers or TLS12_CIPHERS)
    if tls.certificate is not None and tls.key is not None:
        try:
            context.load_cert_chain(str(tls.certificate), str(tls.key), password=_no_passphrase)
        except _KeyHasPassphrase:
            raise ValueError(
                f"node.tls.key {tls.key} is encrypted with a passphrase, which the node cannot "
                "be given: store it without one (openssl pkey -in KEY -out KEY.plain)"
            ) from None
        except OSError as exc:
            raise ValueError(
                f"node.tls.certificate {tls.certificate} with node.tls.key {tls.key}: "
                f"{_file_problem(exc)}"
            ) from exc
    return context


def client_tls(settings: Settings) -> ssl.SSLContext:
    """TLS for a peer marked ``tls: true``: always, never plain TCP in its place.

    The node's certificate is the client's where one is configured (``node.tls``); the
    peer's is checked against ``node.tls.ca_certificate`` alone where set, else against the
    system's CAs (``peer_tls`` adds the host name check those need). No host name check
    here: DICOM peers are addressed by IP, and the hospital's own CA vouches for them.
    """
    try:
        context = node_tls_context(settings.node.tls, ssl.Purpose.SERVER_AUTH)
    except ValueError as exc:
        raise DeliveryError(f"cannot load node.tls certificate, key or CA: {exc}") from exc
    context.check_hostname = False
    return context


def peer_tls(settings: Settings, peer: PeerSettings) -> tuple[ssl.SSLContext, str | None]:
    """The context and server name for a TLS association with ``peer``. Checked against the
    system's CAs (no ``node.tls.ca_certificate``), the peer's certificate must also name
    ``peer.host`` (a DNS name or IP address in its subjectAltName): any holder of a public
    CA's certificate for any name would otherwise pass as the PACS."""
    context = client_tls(settings)
    if settings.node.tls.ca_certificate is not None:
        return context, None
    context.check_hostname = True
    return context, peer.host


def tls_refusal(
    host: str, port: int, context: ssl.SSLContext, server_name: str | None, timeout_s: float
) -> str | None:
    """Why a TLS handshake with ``host:port`` fails; None if it succeeds or TCP fails.

    pynetdicom logs such a failure but reports only that there is no association; this
    repeats the handshake to name the cause. TLS 1.3 sends a refused client certificate's
    alert after the handshake, so one byte is read too (a peer content with the handshake
    waits for us, and the read ends at the timeout).
    """
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except OSError:
        return None
    done = False
    try:
        with raw, context.wrap_socket(raw, server_hostname=server_name) as wrapped:
            done = True
            wrapped.recv(1)
    except ssl.SSLCertVerificationError as exc:
        return f"{exc.reason}: {exc.verify_message}"
    except ssl.SSLError as exc:
        return str(exc.reason or exc)
    except TimeoutError:
        return None if done else f"no TLS handshake answer within {timeout_s:g} s"
    except OSError as exc:
        if done:
            return None
        return f"connection closed ({exc.strerror or exc}): does this port speak TLS?"
    return None


def _raw_socket(assoc: Association) -> socket.socket | None:
    """The association's TCP (or TLS) socket, once connected."""
    return getattr(getattr(assoc.dul, "socket", None), "socket", None)


def set_nodelay(assoc: Association) -> None:
    """Nagle's algorithm costs ~40 ms per C-STORE on loopback and LAN (PEERS.md)."""
    sock = _raw_socket(assoc)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def associate(ae: AE, settings: Settings, peer: PeerSettings) -> Association:
    kwargs: dict[str, Any] = {"ae_title": peer.ae_title}
    if peer.tls:
        kwargs["tls_args"] = peer_tls(settings, peer)
    assoc = keep_responses_for_sender(ae.associate(peer.host, peer.port, **kwargs))
    if assoc.is_established:
        set_nodelay(assoc)
        # pynetdicom clears the socket's timeout once connected: a peer that stops reading
        # (its storage hung, its TCP stack alive) then blocked the send, and the outbox
        # with it, for ever. A send or read stalled this long now ends the association.
        sock = _raw_socket(assoc)
        if sock is not None:
            sock.settimeout(settings.node.network_timeout_s)
    return assoc


def no_association(settings: Settings, peer: PeerSettings, assoc: Association) -> str:
    """Why ``associate`` gave no association: rejected, no TLS, or unreachable."""
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        reason = getattr(primitive, "reason_str", "") if primitive is not None else ""
        # "calling AE title not recognised": the PACS has not registered this node's AE title.
        return f"rejected the association: {reason}" if reason else "rejected the association"
    if peer.tls:
        context, server_name = peer_tls(settings, peer)
        refusal = tls_refusal(peer.host, peer.port, context, server_name, 5.0)
        if refusal is not None and server_name is not None and "mismatch" in refusal:
            refusal += (
                " (node.tls.ca_certificate is not set, so the certificate is checked against "
                f"the system's CAs and must name the peer's host {server_name} in its "
                "subjectAltName; or set node.tls.ca_certificate to the CA that signed it)"
            )
        if refusal is not None:
            return f"failed the TLS handshake: {refusal}"
    # pynetdicom reports a refused connection and an unanswered A-ASSOCIATE-RQ alike
    # (aborted). They send an administrator to different places: the network, or the PACS.
    try:
        with socket.create_connection((peer.host, peer.port), timeout=5.0):
            pass
    except OSError:
        return "is unreachable (connection refused or timed out: host, port, firewall?)"
    return (
        "accepts connections but did not answer the association request (its DICOM "
        "service hung or overloaded, or another service on that port?)"
    )


def echo_peer(settings: Settings, peer: PeerSettings) -> dict[str, Any]:
    ae = scu_ae(settings)
    ae.add_requested_context(VERIFICATION)
    started = time.monotonic()
    assoc = associate(ae, settings, peer)
    if not assoc.is_established:
        why = no_association(settings, peer, assoc)
        logger.warning("C-ECHO to %s@%s:%d: %s", peer.ae_title, peer.host, peer.port, why)
        return {"ok": False, "detail": why, "seconds": time.monotonic() - started}
    code = echo_status(assoc)
    ok = code == 0
    detail = f"status 0x{code:04X}" if code is not None else "no response"
    return {"ok": ok, "detail": detail, "seconds": time.monotonic() - started}


def echo_status(assoc: Association) -> int | None:
    """Send a C-ECHO on an established association and release it; the status, if any."""
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    return int(status.Status) if status and "Status" in status else None


SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
# The DICOM default, the one transfer syntax every Storage SCP must accept: older PACS
# accept nothing else.
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
_UNCOMPRESSED = (EXPLICIT_VR_LE, IMPLICIT_VR_LE)  # in order of preference


def store_seg(
    settings: Settings, peer: PeerSettings, path: Path, fallback: Path | None = None
) -> str:
    """C-STORE one SEG file to a peer; a peer refusing its SOP class gets ``fallback``.

    Returns a note for the delivery record; raises DeliveryError on failure.
    """
    header = dcmread(path, stop_before_pixels=True)
    sop_class = str(header.SOPClassUID)
    syntax = str(header.file_meta.TransferSyntaxUID)
    ae = scu_ae(settings)
    # One context per transfer syntax: offered together, the peer may pick an uncompressed
    # one and the file could then not be sent as encoded.
    for ts in _unique([syntax, *_UNCOMPRESSED]):
        ae.add_requested_context(sop_class, ts)
    fallback_syntax = None
    if fallback is not None and fallback.exists():
        fallback_header = dcmread(fallback, stop_before_pixels=True)
        fallback_syntax = str(fallback_header.file_meta.TransferSyntaxUID)
        for ts in _unique([fallback_syntax, *_UNCOMPRESSED]):
            ae.add_requested_context(SEGMENTATION_STORAGE, ts)
    assoc = associate(ae, settings, peer)
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    if not assoc.is_established:
        if assoc.acceptor.primitive is not None and not assoc.is_rejected:
            # It answered, but accepted none of the contexts (pynetdicom then aborts).
            raise DeliveryError(
                f"{where} does not accept SOP class {sop_class} (nor a fallback)",
                retryable=False,
            )
        raise DeliveryError(
            f"{where} {no_association(settings, peer, assoc)}", retryable=True, peer_down=True
        )
    note = ""
    try:
        # An accepted context carries its one transfer syntax as a one-item list.
        accepted_syntaxes: dict[str, set[str]] = {}
        for cx in assoc.accepted_contexts:
            accepted_syntaxes.setdefault(str(cx.abstract_syntax), set()).update(
                str(ts) for ts in cx.transfer_syntax
            )
        accepted = {
            sop
            for sop, syntaxes in accepted_syntaxes.items()
            if syntaxes & {syntax, *_UNCOMPRESSED, fallback_syntax or ""}
        }
        send, sent_syntax, sent_class = path, syntax, sop_class
        if sop_class not in accepted:
            if (
                fallback is not None
                and fallback_syntax is not None
                and SEGMENTATION_STORAGE in accepted
            ):
                send, sent_syntax, sent_class = fallback, fallback_syntax, SEGMENTATION_STORAGE
                # Logged by the outbox with the delivery's id, in its outcome line.
                note = f"{where} refuses SOP class {sop_class}; sent the BINARY SEG instead"
            else:
                raise DeliveryError(
                    f"{where} does not accept SOP class {sop_class} (nor a fallback)",
                    retryable=False,
                )
        code, status = _c_store(assoc, where, send, sent_syntax, sent_class, accepted_syntaxes)
        if (
            _refuses_the_sop_class(code)
            and send is path
            and fallback is not None
            and fallback_syntax is not None
            and SEGMENTATION_STORAGE in accepted
        ):
            # It accepted the Label Map context, then refused the instance itself (some
            # PACS negotiate every storage class they know of and store fewer).
            note = (
                f"{where} refused {sop_class} with 0x{code:04X} ({status_meaning(code)}); "
                "sent the BINARY SEG instead"
            )
            code, status = _c_store(
                assoc, where, fallback, fallback_syntax, SEGMENTATION_STORAGE, accepted_syntaxes
            )
        if code != 0 and not (0xB000 <= code <= 0xBFFF):
            comment = str(status.get("ErrorComment", ""))
            # After a fallback, say so: the refusal that led to it is part of the answer.
            raise DeliveryError(
                (f"{note}; " if note else "")
                + f"{where} answered C-STORE with 0x{code:04X} ({status_meaning(code)}) "
                f"{comment}".strip()
            )
        if code:
            note = (note + f"; warning status 0x{code:04X}").lstrip("; ")
    finally:
        if assoc.is_established:
            assoc.release()
    return note


def _c_store(
    assoc: Association,
    where: str,
    send: Path,
    syntax: str,
    sop_class: str,
    accepted_syntaxes: dict[str, set[str]],
) -> tuple[int, Dataset]:
    """C-STORE ``send`` on ``assoc``: (status code, status); raises when none came back."""
    item: Path | Dataset = send
    if syntax not in accepted_syntaxes.get(sop_class, set()):
        # Only an uncompressed syntax was accepted: send the pixel data uncompressed
        # (pynetdicom encodes the dataset in the context's explicit or implicit VR).
        dataset = dcmread(send)
        if dataset.file_meta.TransferSyntaxUID.is_compressed:
            dataset.decompress()
        keep_text_as_stored(dataset)  # the patient text the PACS files it by
        item = dataset
    status = assoc.send_c_store(item)
    if not status or "Status" not in status:
        raise DeliveryError(f"{where} sent no C-STORE response (connection lost)", peer_down=True)
    return int(status.Status), status


def _refuses_the_sop_class(code: int) -> bool:
    """Refused: SOP Class Not Supported, or Data Set Does Not Match SOP Class."""
    return code == 0x0122 or 0xA900 <= code <= 0xA9FF


def status_meaning(code: int) -> str:
    """What a C-STORE status means, as the standard names it (for the log and `deliveries
    list`): "Refused: Out of Resources", "Data Set Does Not Match SOP Class", ..."""
    found = STORAGE_SERVICE_CLASS_STATUS.get(code) or GENERAL_STATUS.get(code)
    if found is not None:
        return str(found[1])
    if 0xA700 <= code <= 0xA7FF:
        return "Refused: Out of Resources"
    if 0xA900 <= code <= 0xA9FF:
        return "Data Set Does Not Match SOP Class"
    if 0xC000 <= code <= 0xCFFF:
        return "Cannot Understand"
    return "unknown status"


@dataclass(frozen=True)
class _StowRefusal:
    """A STOW-RS request the server answered, but did not store the instance on."""

    text: str
    reason: int | None  # its FailureReason (0008,1197), where the answer gives one
    retryable: bool


def stow_seg(destination: DicomWebDestination, path: Path, fallback: Path | None = None) -> str:
    """STOW-RS one SEG file to a DICOMweb endpoint; a server refusing its SOP class gets
    ``fallback`` (the BINARY SEG), as ``store_seg`` does for a DICOM peer.

    One request per try: the outbox retries with its backoff. Returns a note for the
    delivery record; raises DeliveryError on failure.
    """
    where = f"STOW-RS to {destination.url}"
    outcome = _stow(destination, path, where)
    note = ""
    if (
        isinstance(outcome, _StowRefusal)
        and outcome.reason is not None
        and fallback is not None
        and _refuses_the_sop_class(outcome.reason)
    ):
        sop_class = str(dcmread(path, stop_before_pixels=True).SOPClassUID)
        if sop_class != SEGMENTATION_STORAGE:
            note = f"{where}: {sop_class} refused ({outcome.text}); sent the BINARY SEG instead"
            outcome = _stow(destination, fallback, where)
    if isinstance(outcome, _StowRefusal):
        # After a fallback, say so: the refusal that led to it is part of the answer.
        raise DeliveryError(
            (f"{note}; " if note else "") + f"{where} failed: {outcome.text}",
            retryable=outcome.retryable,
        )
    return "; ".join(part for part in (note, outcome) if part)


def _stow(destination: DicomWebDestination, path: Path, where: str) -> _StowRefusal | str:
    """POST ``path`` as it is stored (no decode and re-encode) to ``<url>/studies``.

    Stored: a note for the delivery record (a warning the server gave, or ""). Raises
    DeliveryError when no answer came or the server is down.
    """
    import requests

    ca = destination.ca_certificate
    if ca is not None and not ca.is_file():
        # requests raised a bare OSError for it, outside the errors the outbox handles.
        raise DeliveryError(
            f"{where}: dicomweb ca_certificate {ca} is not a readable file", retryable=False
        )
    boundary = uuid.uuid4().hex  # random: that the file holds it is out of the question
    body = b"".join(
        (
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
            path.read_bytes(),
            f"\r\n--{boundary}--\r\n".encode(),
        )
    )
    headers = {
        "Accept": "application/dicom+json",  # some servers answer XML unless asked
        **destination.headers,
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
    }
    try:
        response = requests.post(
            destination.url.rstrip("/") + "/studies",
            data=body,
            headers=headers,
            timeout=destination.timeout_s,
            verify=str(ca) if ca is not None else True,
        )
    except requests.exceptions.SSLError as exc:
        cause = _cause(exc)
        hint = (
            "is dicomweb ca_certificate the CA that signed the server's certificate?"
            if "CERTIFICATE_VERIFY_FAILED" in cause
            else "does this port speak https?"
        )
        raise DeliveryError(
            f"{where} failed the TLS handshake: {cause} ({hint})", peer_down=True
        ) from exc
    except requests.exceptions.Timeout as exc:
        raise DeliveryError(
            f"{where}: no answer within {destination.timeout_s:g} s (dicomweb timeout_s)",
            peer_down=True,
        ) from exc
    except requests.RequestException as exc:  # no answer: the server itself
        raise DeliveryError(
            f"{where} failed: {_cause(exc)} (host, port, firewall?)", peer_down=True
        ) from exc
    with response:
        return _stow_outcome(destination, response, where)


def _stow_outcome(
    destination: DicomWebDestination, response: Any, where: str
) -> _StowRefusal | str:
    """Read a STOW-RS answer (PS3.18 10.5.3): 200 stored, 202 some stored, 409 none; the
    instance listed in the Failed SOP Sequence is not stored, whatever the HTTP status."""
    code = int(response.status_code)
    answer = _dicom_json(response)
    failed = list(answer.get("FailedSOPSequence") or []) if answer is not None else []
    if 200 <= code < 300 and not failed:
        # Logged by the outbox with the delivery's id, in its outcome line (as a C-STORE
        # warning status is).
        for item in (answer.get("ReferencedSOPSequence") or []) if answer is not None else []:
            warning = item.get("WarningReason")
            if warning is not None:
                return f"WarningReason 0x{int(warning):04X} ({status_meaning(int(warning))})"
        return ""
    try:
        text = f"HTTP {code} {HTTPStatus(code).phrase}"
    except ValueError:
        text = f"HTTP {code}"
    reason = None
    if failed and failed[0].get("FailureReason") is not None:
        # One instance per request: a failed item is this one.
        reason = int(failed[0].FailureReason)
        text += f", FailureReason 0x{reason:04X} ({status_meaning(reason)})"
    elif failed:
        text += ", the instance is in its Failed SOP Sequence (no FailureReason)"
    elif code in (401, 403):
        text += ": check this destination's headers (credentials missing, wrong or expired)"
    elif answer is None:
        # The server's reason, where it gives one in words (a proxy's page, Orthanc's JSON).
        body = " ".join(response.text.split())[:300]
        text += f": {body}" if body else ""
    for secret in destination.headers.values():
        if len(secret) >= 4:
            text = text.replace(secret, "***")  # a server echoing a header into its page
    if reason is not None and 0xA700 <= reason <= 0xA7FF:
        return _StowRefusal(text, reason, retryable=True)  # out of resources: waiting helps
    # Client errors other than timeouts and throttling will not improve by waiting.
    retryable = code >= 500 or code in (408, 429)
    if code in (502, 503, 504):
        # The server, or its gateway, is down: its other deliveries wait as well.
        raise DeliveryError(f"{where} failed: {text}", retryable=True, peer_down=True)
    return _StowRefusal(text, reason, retryable=retryable)


def _dicom_json(response: Any) -> Dataset | None:
    """The answer's DICOM JSON data set; None if it has none (Orthanc's 409 has no
    Content-Type, hence the look at the body)."""
    media = str(response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    text = response.text.lstrip()
    if media not in ("application/dicom+json", "application/json") and not text.startswith("{"):
        return None
    try:
        return Dataset.from_json(text)
    except (ValueError, TypeError, KeyError, AttributeError):  # not DICOM JSON after all
        return None


def _cause(exc: BaseException) -> str:
    """What failed, without requests' and urllib3's wrappers (pool, retries, object ids)."""
    inner = exc.args[0] if exc.args else None
    return str(getattr(inner, "reason", None) or inner or exc)


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
