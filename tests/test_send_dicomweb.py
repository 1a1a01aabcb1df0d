"""STOW-RS to a DICOMweb destination: what a server's answers mean for the delivery.

A real Orthanc (DICOMweb plugin, HTTP basic authentication) for the success path and a
refused login; a small HTTP server in a thread for what Orthanc cannot be made to answer:
a partial success, a refused instance, a server down or hung, a certificate of a private CA.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from peers import Orthanc, PeerUnavailable, free_port, make_tls_files
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from seg_fixtures import CATALOGUE, mr_series, small_label_map

from dicom_node.config import DicomWebDestination, Settings, load_settings
from dicom_node.errors import ConfigError, DeliveryError
from dicom_node.seg_encode import encode_seg
from dicom_node.send import SEGMENTATION_STORAGE, stow_seg

LABEL_MAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"
SECRET = "Bearer s3cr3t-t0ken"

# A server's answer to one POST: status, DICOM JSON (or None), extra seconds before it.
Answer = tuple[int, dict[str, Any] | None, float]


@dataclass
class Received:
    headers: dict[str, str]
    sop_class: str


@dataclass
class StowServer:
    """A STOW-RS endpoint on a free loopback port; ``answer`` decides each reply."""

    answer: Callable[[Received], Answer]
    tls: ssl.SSLContext | None = None
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                message = BytesParser().parsebytes(
                    f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body
                )
                (part,) = message.get_payload()  # type: ignore[misc]
                dataset = dcmread(io.BytesIO(part.get_payload(decode=True)))
                got = Received(dict(self.headers), str(dataset.SOPClassUID))
                server.received.append(got)
                status, answer, delay = server.answer(got)
                time.sleep(delay)
                data = json.dumps(answer).encode() if answer is not None else b""
                self.send_response(status)
                if answer is not None:
                    self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if self.tls is not None:
            self.httpd.socket = self.tls.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.httpd.server_port}/dicom-web"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _answer(
    sop_class: str, *, failed: int | None = None, warning: int | None = None
) -> dict[str, Any]:
    """A STOW-RS answer in DICOM JSON naming the instance as stored or as failed."""
    item: dict[str, Any] = {
        "00081150": {"vr": "UI", "Value": [sop_class]},
        "00081155": {"vr": "UI", "Value": ["2.25.1"]},
    }
    if failed is not None:
        item["00081197"] = {"vr": "US", "Value": [failed]}
        return {"00081198": {"vr": "SQ", "Value": [item]}}
    if warning is not None:
        item["00081196"] = {"vr": "US", "Value": [warning]}
    return {"00081199": {"vr": "SQ", "Value": [item]}}


@pytest.fixture
def stow_server() -> Iterator[Callable[..., StowServer]]:
    made: list[StowServer] = []

    def make(answer: Callable[[Received], Answer], tls: ssl.SSLContext | None = None) -> StowServer:
        server = StowServer(answer, tls)
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def segs(tmp_path: Path) -> tuple[Path, Path]:
    """A LABELMAP SEG and its BINARY fallback, as a job writes them."""
    series = mr_series()
    common = {"model_name": "demo", "model_version": "1.0", "weights_sha256": "ab" * 32}
    labelmap = encode_seg(small_label_map(), series, CATALOGUE, format="labelmap", **common)
    binary = encode_seg(small_label_map(), series, CATALOGUE, **common)
    paths = tmp_path / "seg.dcm", tmp_path / "seg.binary.dcm"
    labelmap.save_as(paths[0], enforce_file_format=True)
    binary.save_as(paths[1], enforce_file_format=True)
    return paths


def _web(url: str, **kwargs: Any) -> DicomWebDestination:
    return DicomWebDestination(name="web", url=url, headers={"Authorization": SECRET}, **kwargs)


def _failure(destination: DicomWebDestination, path: Path) -> DeliveryError:
    with pytest.raises(DeliveryError) as caught:
        stow_seg(destination, path)
    assert SECRET not in str(caught.value)
    return caught.value


def test_the_seg_is_stored_with_the_configured_headers(
    stow_server: Callable[..., StowServer], segs: tuple[Path, Path]
) -> None:
    server = stow_server(lambda got: (200, _answer(got.sop_class), 0.0))
    assert stow_seg(_web(server.url), segs[0]) == ""
    (got,) = server.received
    assert got.headers["Authorization"] == SECRET
    assert got.sop_class == LABEL_MAP_SEG
    assert got.headers["Content-Type"].startswith('multipart/related; type="application/dicom"')


@pytest.mark.parametrize("status", [200, 202])
def test_an_instance_in_the_failed_sop_sequence_is_not_delivered(
    stow_server: Callable[..., StowServer], segs: tuple[Path, Path], status: int
) -> None:
    """A 2xx whose Failed SOP Sequence lists the instance was recorded as delivered."""
    server = stow_server(lambda got: (status, _answer(got.sop_class, failed=0xC000), 0.0))
    error = _failure(_web(server.url), segs[1])
    assert "FailureReason 0xC000 (Cannot Understand)" in str(error), error
    assert error.retryable is False


def test_a_409_names_the_failure_reason_and_is_not_retried(
    stow_server: Callable[..., StowServer], segs: tuple[Path, Path]
) -> None:
    """The reason was 300 characters of raw DICOM JSON, the code in decimal."""
    server = stow_server(lambda got: (409, _answer(got.sop_class, failed=0xA900), 0.0))
    error = _failure(_web(server.url), segs[1])
    assert str(error) == (
        f"STOW-RS to {server.url} failed: HTTP 409 Conflict, FailureReason 0xA900 "
        "(Data Set Does Not Match SOP Class)"
    )
    assert error.retryable is False


def test_a_server_out_of_resources_is_retried(
    stow_server: Callable[..., StowServer], segs: tuple[Path, Path]
) -> None:
    server = stow_server(lambda got: (409, _answer(got.sop_class, failed=0xA700), 0.0))
    error = _failure(_web(server.url), segs[1])
    assert "FailureReason 0xA700 (Refused: Out of Resources)" in str(error)
    assert error.retryable is True


def test_a_stored_instance_with_a_warning_is_delivered_with_the_warning_noted(
    stow_server: Callable[..., StowServer], segs: tuple[Path, Path]
) -> None:
    server = stow_server(lambda got: (200, _answer(got.sop_class, warning=0xB000), 0.0))
    note = stow_seg(_web(server.url), segs[1])
    assert note == "WarningReason 0xB000 (Coercion of Data Elements)", note


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_login_is_not_retried_and_names_the_headers_not_their_values(
    stow_server: Callable[..., StowServer], segs: tuple[Path, Path], status: int
) -> None:
    server = stow_server(lambda got: (status, None, 0.0))
    error = _failure(_web(server.url), segs[1])
    assert f"HTTP {status}" in str(error) and "check this destination's headers" in str(error)
    assert error.retryable is False


def test_a_server_unavailable_is_tried_once_per_attempt_and_retried_later(
    stow_server: Callable[..., StowServer], segs: tuple[Path, Path]
) -> None:
    """dicomweb-client tried 5 times (2+4+8+16 s apart) inside one delivery attempt, holding
    the outbox half a minute, then raised its RetryError, which the outbox logged with a
    traceback as an unexpected error."""
    server = stow_server(lambda got: (503, None, 0.0))
    started = time.monotonic()
    error = _failure(_web(server.url), segs[1])
    assert time.monotonic() - started < 5
    assert len(server.received) == 1
    assert "HTTP 503 Service Unavailable" in str(error)
    assert error.retryable is True and error.peer_down is True


def test_a_hung_server_fails_the_attempt_after_timeout_s(
    stow_server: Callable[..., StowServer], segs: tuple[Path, Path]
) -> None:
    """A server that reads the request and never answers held the outbox 5 x 20 s."""
    server = stow_server(lambda got: (200, _answer(got.sop_class), 30.0))
    started = time.monotonic()
    error = _failure(_web(server.url, timeout_s=1), segs[1])
    assert time.monotonic() - started < 5
    assert len(server.received) == 1
    assert "no answer within 1 s (dicomweb timeout_s)" in str(error)
    assert error.retryable is True and error.peer_down is True


def test_an_unreachable_server_is_retried_later(segs: tuple[Path, Path]) -> None:
    started = time.monotonic()
    error = _failure(_web(f"http://127.0.0.1:{free_port()}/dicom-web"), segs[1])
    assert time.monotonic() - started < 5  # not 30 s of the client's own retries
    assert "Connection refused" in str(error) and "HTTPConnectionPool" not in str(error)
    assert error.retryable is True and error.peer_down is True


def test_a_server_refusing_the_label_map_gets_the_binary_fallback(
    stow_server: Callable[..., StowServer], segs: tuple[Path, Path]
) -> None:
    """``fallback_to_binary`` only ever applied to DICOM peers."""

    def answer(got: Received) -> Answer:
        if got.sop_class == LABEL_MAP_SEG:
            return 409, _answer(got.sop_class, failed=0x0122), 0.0
        return 200, _answer(got.sop_class), 0.0

    server = stow_server(answer)
    note = stow_seg(_web(server.url), segs[0], fallback=segs[1])
    assert [got.sop_class for got in server.received] == [LABEL_MAP_SEG, SEGMENTATION_STORAGE]
    assert note.endswith("sent the BINARY SEG instead") and "0x0122" in note, note


def test_the_outbox_gives_a_dicomweb_destination_the_fallback(
    stow_server: Callable[..., StowServer], segs: tuple[Path, Path], tmp_path: Path
) -> None:
    from dicom_node.outbox import Outbox
    from dicom_node.worker import fallback_path
    from storage.database import Index
    from storage.filestore import FileStore
    from storage.models import Delivery

    def answer(got: Received) -> Answer:
        if got.sop_class == LABEL_MAP_SEG:
            return 409, _answer(got.sop_class, failed=0x0122), 0.0
        return 200, _answer(got.sop_class), 0.0

    server = stow_server(answer)
    settings = Settings(dicomweb=[{"name": "web", "url": server.url}])
    store = FileStore(tmp_path / "store", 0, fsync=False)
    seg = store.result_path(1, "seg.dcm")
    store.write_atomic(seg, segs[0].read_bytes())
    store.write_atomic(fallback_path(seg), segs[1].read_bytes())  # as a job writes it
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    try:
        delivery = Delivery(job_pk=1, destination="web", resolved_peer="web", seg_path=seg)
        note = Outbox(settings, index, store).send(delivery)
    finally:
        index.dispose()
    assert "sent the BINARY SEG instead" in note
    assert server.received[-1].sop_class == SEGMENTATION_STORAGE


def test_a_refused_fallback_names_the_refusal_that_led_to_it(
    stow_server: Callable[..., StowServer], segs: tuple[Path, Path]
) -> None:
    server = stow_server(lambda got: (409, _answer(got.sop_class, failed=0x0122), 0.0))
    with pytest.raises(DeliveryError) as caught:
        stow_seg(_web(server.url), segs[0], fallback=segs[1])
    error = caught.value
    assert len(server.received) == 2
    assert str(error).count("0x0122") == 2 and "sent the BINARY SEG instead" in str(error)
    assert error.retryable is False


@pytest.fixture
def tls_server(stow_server: Callable[..., StowServer], tmp_path: Path) -> tuple[StowServer, Path]:
    """An https STOW-RS server whose certificate a private CA signed; that CA's file."""
    try:
        files = make_tls_files(tmp_path / "tls")
    except PeerUnavailable as exc:
        pytest.skip(str(exc))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.server_cert, files.server_key)
    return stow_server(lambda got: (200, _answer(got.sop_class), 0.0), context), files.ca_cert


def test_an_https_server_of_a_private_ca_needs_its_ca_certificate(
    tls_server: tuple[StowServer, Path], segs: tuple[Path, Path]
) -> None:
    server, ca = tls_server
    error = _failure(_web(server.url), segs[1])
    assert "failed the TLS handshake" in str(error) and "CERTIFICATE_VERIFY_FAILED" in str(error)
    assert error.retryable is True
    assert stow_seg(_web(server.url, ca_certificate=ca), segs[1]) == ""
    assert len(server.received) == 1


def test_a_missing_ca_certificate_file_is_a_permanent_error(
    tls_server: tuple[StowServer, Path], segs: tuple[Path, Path], tmp_path: Path
) -> None:
    server, _ca = tls_server
    error = _failure(_web(server.url, ca_certificate=tmp_path / "nowhere.pem"), segs[1])
    assert "nowhere.pem is not a readable file" in str(error)
    assert error.retryable is False


def test_a_relative_ca_certificate_is_taken_from_the_config_folder(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "config.yaml"
    config.parent.mkdir()
    config.write_text(
        "dicomweb: [{name: web, url: 'https://pacs/dicom-web', ca_certificate: ca.pem}]\n"
    )
    (web,) = load_settings(config).dicomweb
    assert web.ca_certificate == tmp_path / "etc" / "ca.pem"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://user:secret@pacs/dicom-web", "user or password"),
        ("https://pacs/dicom-web?token=secret", "query"),
    ],
)
def test_credentials_in_the_url_are_refused(tmp_path: Path, url: str, problem: str) -> None:
    """They went into every failure's text: the log and `deliveries list --json`."""
    config = tmp_path / "config.yaml"
    config.write_text(f"dicomweb: [{{name: web, url: '{url}'}}]\n")
    with pytest.raises(ConfigError, match=problem) as caught:
        load_settings(config)
    assert "headers" in str(caught.value)


def test_headers_are_never_logged(
    stow_server: Callable[..., StowServer],
    segs: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    stored = stow_server(lambda got: (200, _answer(got.sop_class), 0.0))
    refused = stow_server(lambda got: (401, None, 0.0))
    with caplog.at_level(logging.DEBUG):
        stow_seg(_web(stored.url), segs[1])
        _failure(_web(refused.url), segs[1])
    assert caplog.records and SECRET not in caplog.text
    assert "s3cr3t" not in caplog.text


# -- a real Orthanc with its DICOMweb plugin and HTTP basic authentication ----------------


class LoginOrthanc(Orthanc):
    """Orthanc with ``AuthenticationEnabled``: the tests' own REST calls log in too."""

    LOGIN = "Basic " + base64.b64encode(b"node:pa55word").decode()
    rest_headers = {"Authorization": LOGIN}


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[LoginOrthanc]:
    made = LoginOrthanc(
        tmp_path / "orthanc",
        extra={
            "AuthenticationEnabled": True,
            "RegisteredUsers": {"node": "pa55word"},
            "UnknownSopClassAccepted": False,
        },
    )
    try:
        made.start()
    except PeerUnavailable as exc:
        pytest.skip(str(exc))
    if not made.get_json("/plugins").count("dicom-web"):
        made.stop()
        pytest.skip("Orthanc's DICOMweb plugin is not installed")
    yield made
    made.stop()


def _big_seg(path: Path) -> Path:
    """A SEG header with 3 MB of pixel data: more than dicomweb-client's 1 MB chunk size."""
    big = Dataset()
    big.SOPClassUID = SEGMENTATION_STORAGE
    big.SOPInstanceUID = "2.25.778"
    big.StudyInstanceUID = "2.25.779"
    big.SeriesInstanceUID = "2.25.780"
    big.PatientID = "P"
    big.PixelData = bytes(3 * 1024 * 1024)
    big["PixelData"].VR = "OB"
    big.file_meta = FileMetaDataset()
    big.file_meta.MediaStorageSOPClassUID = SEGMENTATION_STORAGE
    big.file_meta.MediaStorageSOPInstanceUID = big.SOPInstanceUID
    big.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    big.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.peers
def test_orthanc_stores_the_segs_sent_with_its_login(
    orthanc: LoginOrthanc, segs: tuple[Path, Path], tmp_path: Path
) -> None:
    """Label Map SEG over STOW-RS even where Orthanc 1.10's C-STORE refuses it."""
    web = DicomWebDestination(
        name="web", url=f"{orthanc.url}/dicom-web", headers={"Authorization": orthanc.LOGIN}
    )
    for path in (segs[0], _big_seg(tmp_path / "big.dcm")):
        assert stow_seg(web, path) == ""
    stored = {orthanc.instance_tags(i)["SOPInstanceUID"] for i in orthanc.instances()}
    assert stored == {str(dcmread(segs[0]).SOPInstanceUID), "2.25.778"}


@pytest.mark.peers
def test_orthanc_refusing_the_login_is_a_permanent_error(
    orthanc: LoginOrthanc, segs: tuple[Path, Path]
) -> None:
    wrong = "Basic " + base64.b64encode(b"node:wrong").decode()
    web = DicomWebDestination(name="web", url=f"{orthanc.url}/dicom-web",
                              headers={"Authorization": wrong})  # fmt: skip
    with pytest.raises(DeliveryError) as caught:
        stow_seg(web, segs[1])
    assert str(caught.value).startswith(f"STOW-RS to {orthanc.url}/dicom-web failed: HTTP 401")
    assert wrong not in str(caught.value)
    assert caught.value.retryable is False
    assert orthanc.instances() == []
