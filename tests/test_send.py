"""Sending a SEG (C-STORE SCU) to a real pynetdicom Storage SCP, with the Label Map fallback."""

from __future__ import annotations

import logging
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from peers import (
    DICOM_NODE,
    free_port,
    make_tls_files,
    storescp_to,
    wait_until,
)
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from seg_fixtures import CATALOGUE, mr_series, seg_file_of, small_label_map, stored_series

from dicom_node.config import NodeSettings, PeerSettings, Settings, TLSSettings
from dicom_node.errors import DeliveryError
from dicom_node.health import check_ports
from dicom_node.seg_encode import encode_seg
from dicom_node.send import SEGMENTATION_STORAGE, echo_peer, store_seg

LABEL_MAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"
SHA = "ab" * 32
DEFAULT_TS = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5")
IMPLICIT_VR_LE = "1.2.840.10008.1.2"


class Pacs:
    """A Storage SCP accepting the given SOP classes; remembers what it received."""

    def __init__(
        self,
        sop_classes: list[str],
        syntaxes: tuple[str, ...] = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5"),
    ) -> None:
        self.received: list[Dataset] = []
        # Set by a test: each C-STORE waits there for the others before it is answered.
        self.together: threading.Barrier | None = None
        self.port = free_port()
        ae = AE(ae_title="PACS")
        for uid in sop_classes:
            ae.add_supported_context(uid, list(syntaxes))

        def on_store(event: evt.Event) -> int:
            if self.together is not None:
                self.together.wait()  # raises when the others never come: a failure status
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.received.append(ds)
            return 0

        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )
        self.ae = ae

    def peer(self) -> PeerSettings:
        return PeerSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=self.port)

    def stop(self) -> None:
        self.ae.shutdown()


@pytest.fixture
def segs(tmp_path: Path) -> tuple[Path, Path]:
    """A LABELMAP SEG (RLE) and its BINARY fallback, as a job writes them."""
    series = mr_series()
    label_map = small_label_map()
    catalogue = CATALOGUE
    common = {"model_name": "demo", "model_version": "1.0", "weights_sha256": SHA}
    labelmap = encode_seg(
        label_map, series, catalogue, format="labelmap", compression="rle", **common
    )
    binary = encode_seg(label_map, series, catalogue, **common)
    paths = tmp_path / "seg.dcm", tmp_path / "fallback-binary.dcm"
    labelmap.save_as(paths[0], enforce_file_format=True)
    binary.save_as(paths[1], enforce_file_format=True)
    return paths


@pytest.fixture
def pacs_factory() -> Iterator[type[Pacs]]:
    made: list[Pacs] = []

    class _Pacs(Pacs):
        def __init__(self, sop_classes: list[str], syntaxes: tuple[str, ...] = DEFAULT_TS) -> None:
            super().__init__(sop_classes, syntaxes)
            made.append(self)

    yield _Pacs
    for pacs in made:
        pacs.stop()


def test_binary_seg_is_stored(pacs_factory: type[Pacs], segs: tuple[Path, Path]) -> None:
    pacs = pacs_factory([SEGMENTATION_STORAGE])
    note = store_seg(Settings(), pacs.peer(), segs[1])
    assert note == ""
    (got,) = pacs.received
    assert got.SOPClassUID == SEGMENTATION_STORAGE


def test_label_map_goes_as_is_where_accepted(
    pacs_factory: type[Pacs], segs: tuple[Path, Path]
) -> None:
    pacs = pacs_factory([SEGMENTATION_STORAGE, LABEL_MAP_SEG])
    assert store_seg(Settings(), pacs.peer(), segs[0], segs[1]) == ""
    (got,) = pacs.received
    assert got.SOPClassUID == LABEL_MAP_SEG
    assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"  # RLE, as encoded


def test_an_uncompressed_only_pacs_gets_the_label_map_decompressed(
    pacs_factory: type[Pacs], segs: tuple[Path, Path]
) -> None:
    pacs = pacs_factory([LABEL_MAP_SEG], ("1.2.840.10008.1.2.1",))
    assert store_seg(Settings(), pacs.peer(), segs[0]) == ""
    (got,) = pacs.received
    assert got.SOPClassUID == LABEL_MAP_SEG
    assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert got.pixel_array.max() > 0


def test_an_implicit_only_pacs_gets_the_seg(
    pacs_factory: type[Pacs], segs: tuple[Path, Path]
) -> None:
    """Implicit VR Little Endian is the one syntax every Storage SCP must accept, and older
    PACS accept no other: the SEG used to be dead-lettered as "does not accept SOP class"."""
    pacs = pacs_factory([LABEL_MAP_SEG], (IMPLICIT_VR_LE,))
    assert store_seg(Settings(), pacs.peer(), segs[0]) == ""
    (got,) = pacs.received
    assert got.SOPClassUID == LABEL_MAP_SEG
    assert got.file_meta.TransferSyntaxUID == IMPLICIT_VR_LE
    np.testing.assert_array_equal(got.pixel_array, dcmread(segs[0]).pixel_array)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    ("charset", "keyword", "stored"),
    [
        ("ISO 2022 IR 87", "PatientName", b"=\xe9. "),  # pydicom's JIS decoder raises on it
        ("ISO_IR 192", "PatientID", b"M\xfc-0042 "),  # Latin-1 where UTF-8 is declared
    ],
    ids=["jis-name-pydicom-cannot-decode", "utf-8-declared-latin-1-written"],
)
def test_an_implicit_only_pacs_gets_the_source_text_as_stored(
    pacs_factory: type[Pacs], tmp_path: Path, charset: str, keyword: str, stored: bytes
) -> None:
    """Sent in another transfer syntax, the SEG is encoded again; its patient text must still
    be the source's bytes, as the PACS files it by them."""
    path = tmp_path / "seg.dcm"
    path.write_bytes(seg_file_of(stored_series(charset, {keyword: stored})))
    pacs = pacs_factory([SEGMENTATION_STORAGE], (IMPLICIT_VR_LE,))
    assert store_seg(Settings(), pacs.peer(), path) == ""
    (got,) = pacs.received
    assert got.file_meta.TransferSyntaxUID == IMPLICIT_VR_LE
    assert got.get_item(keyword).value == stored


@pytest.mark.peers
def test_dcmtk_storescp_accepting_implicit_vr_only_gets_the_binary_seg(
    tmp_path: Path, segs: tuple[Path, Path]
) -> None:
    """The same with DCMTK's storescp +xi (implicit VR little endian only) as the old PACS."""
    folder = tmp_path / "received"
    with storescp_to(folder, "+xi") as port:
        peer = PeerSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
        assert store_seg(Settings(), peer, segs[1]) == ""
    (received,) = folder.iterdir()
    got = dcmread(received)
    assert got.file_meta.TransferSyntaxUID == IMPLICIT_VR_LE
    assert got.SOPClassUID == SEGMENTATION_STORAGE
    np.testing.assert_array_equal(got.pixel_array, dcmread(segs[1]).pixel_array)


def test_a_pacs_refusing_label_map_gets_the_binary_fallback(
    pacs_factory: type[Pacs], segs: tuple[Path, Path]
) -> None:
    pacs = pacs_factory([SEGMENTATION_STORAGE])
    note = store_seg(Settings(), pacs.peer(), segs[0], segs[1])
    assert "sent the BINARY SEG instead" in note
    (got,) = pacs.received
    assert got.SOPClassUID == SEGMENTATION_STORAGE


def test_no_fallback_is_a_permanent_error(
    pacs_factory: type[Pacs], segs: tuple[Path, Path]
) -> None:
    pacs = pacs_factory([SEGMENTATION_STORAGE])
    with pytest.raises(DeliveryError, match="does not accept") as caught:
        store_seg(Settings(), pacs.peer(), segs[0])
    assert caught.value.retryable is False
    assert pacs.received == []


def test_an_unreachable_pacs_is_retryable(segs: tuple[Path, Path]) -> None:
    peer = PeerSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=free_port())
    with pytest.raises(DeliveryError, match="unreachable") as caught:
        store_seg(Settings(), peer, segs[1])
    assert caught.value.retryable is True


def _stalling_proxy(target_port: int) -> int:
    """A port that forwards to ``target_port`` until the association is accepted, then
    stops reading what the sender writes: a PACS whose storage hung while its TCP stack
    still answers."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        client, _ = listener.accept()
        server = socket.create_connection(("127.0.0.1", target_port))
        accepted = threading.Event()

        def upstream() -> None:
            while not accepted.is_set():
                data = client.recv(65536)
                if not data:
                    return
                server.sendall(data)

        def downstream() -> None:
            while data := server.recv(65536):
                client.sendall(data)
                accepted.set()

        threading.Thread(target=upstream, daemon=True).start()
        threading.Thread(target=downstream, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return int(listener.getsockname()[1])


def test_a_pacs_that_stops_reading_ends_the_send_after_the_network_timeout(
    pacs_factory: type[Pacs], tmp_path: Path
) -> None:
    """pynetdicom clears the socket timeout once connected: the send blocked for ever, and
    the node's one outbox thread with it (no SEG went anywhere until a restart)."""
    big = Dataset()  # larger than every socket buffer on the way
    big.SOPClassUID = SEGMENTATION_STORAGE
    big.SOPInstanceUID = "2.25.77"
    big.PixelData = bytes(40 * 1024 * 1024)
    big["PixelData"].VR = "OB"
    big.file_meta = FileMetaDataset()
    big.file_meta.MediaStorageSOPClassUID = SEGMENTATION_STORAGE
    big.file_meta.MediaStorageSOPInstanceUID = big.SOPInstanceUID
    big.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "big.dcm"
    big.save_as(path, enforce_file_format=True)
    pacs = pacs_factory([SEGMENTATION_STORAGE])
    peer = PeerSettings(name="pacs", ae_title="PACS", host="127.0.0.1",
                        port=_stalling_proxy(pacs.port))  # fmt: skip
    outcome: list[BaseException | str] = []

    def send() -> None:
        try:
            outcome.append(store_seg(Settings(node={"network_timeout_s": 2}), peer, path))
        except BaseException as exc:  # returned to the test
            outcome.append(exc)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    sender.join(60)
    assert not sender.is_alive(), "the send still hangs"
    (error,) = outcome
    assert isinstance(error, DeliveryError) and error.retryable, error


def test_a_refusal_says_what_the_status_means_and_why_the_association_was_rejected(
    segs: tuple[Path, Path],
) -> None:
    """A bare '0xA700' or 'rejected the association' sent the administrator to the
    standard; pynetdicom has the meaning of the status and the rejection's reason."""
    ae = AE(ae_title="PACS")
    ae.add_supported_context(SEGMENTATION_STORAGE, DEFAULT_TS)
    ae.require_calling_aet = ["SOMEONE"]  # not this node
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        peer = PeerSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
        with pytest.raises(DeliveryError, match="rejected the association: Calling AE title"):
            store_seg(Settings(), peer, segs[1])
        ae.require_calling_aet = []
        server.bind(evt.EVT_C_STORE, lambda event: 0xA700)
        with pytest.raises(DeliveryError, match=r"with 0xA700 \(Refused: Out of Resources\)"):
            store_seg(Settings(), peer, segs[1])
    finally:
        server.shutdown()


def test_a_destination_that_is_down_does_not_hold_up_the_others(
    pacs_factory: type[Pacs], segs: tuple[Path, Path], tmp_path: Path
) -> None:
    """One outbox sends in order of due time: each SEG for an archive that is down cost a
    connection (or association) timeout before the reading PACS got its SEG. After the
    first failure, the others for that archive wait with it."""
    import datetime as dt

    from sqlalchemy import select as sql_select
    from sqlalchemy import update

    from dicom_node.outbox import Outbox
    from storage.database import Index
    from storage.filestore import FileStore
    from storage.instances import InstanceRecord, complete_due_series, record_instance
    from storage.models import Delivery, DeliveryState, utcnow
    from storage.queue import JobSpec, claim_job, create_job, finish_job

    pacs = pacs_factory([SEGMENTATION_STORAGE])
    settings = Settings(
        storage={"data_dir": tmp_path / "data"},
        peers=[pacs.peer(), {"name": "archive", "ae_title": "VNA", "host": "127.0.0.1",
                             "port": free_port()}],
    )  # fmt: skip
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    store = FileStore(tmp_path / "store", 0, fsync=False)
    seg = store.result_path(1, "seg.dcm")
    store.write_atomic(seg, segs[1].read_bytes())
    for series in ("1.2.3", "1.2.4"):
        record_instance(index, InstanceRecord(
            sop_instance_uid=f"{series}.1", series_instance_uid=series, study_instance_uid="1.2",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.4", transfer_syntax_uid="1.2.840.10008.1.2.1",
            path=f"x/{series}.dcm", size_bytes=1,
        ))  # fmt: skip
    versions = complete_due_series(index, 0.0, on_release=False)
    for version, destinations in zip(versions, (["archive"], ["archive", "pacs"]), strict=True):
        job_id = create_job(index, version.series_version_pk, JobSpec("r", "demo", {}, []))
        assert job_id is not None and claim_job(index, "host:1", 60) is not None
        assert finish_job(index, job_id, seg_path=seg, seg_sop_instance_uid="2.25.5", timings={},
                          deliveries=[(d, d) for d in destinations])  # fmt: skip
    due = utcnow() - dt.timedelta(minutes=1)
    with index.session() as session, session.begin():  # archive, archive, then the PACS
        for order, (job_pk, destination) in enumerate(
            [(1, "archive"), (2, "archive"), (2, "pacs")]
        ):
            session.execute(
                update(Delivery)
                .where(Delivery.job_pk == job_pk, Delivery.destination == destination)
                .values(next_attempt_at=due + dt.timedelta(seconds=order))
            )
    outbox = Outbox(settings, index, store)
    assert outbox.deliver_one()  # the archive: refused connection
    assert outbox.deliver_one()  # the PACS next, not the archive's second SEG
    with index.session() as session:
        rows = session.scalars(sql_select(Delivery))
        states = {(d.job_pk, d.destination): d.state for d in rows}
    assert states[(2, "pacs")] == DeliveryState.DELIVERED
    assert states[(2, "archive")] == DeliveryState.PENDING  # waits with the first
    assert len(pacs.received) == 1
    index.dispose()


@pytest.mark.parametrize("refusal", [0x0122, 0xA900])
def test_a_pacs_refusing_the_label_map_it_negotiated_gets_the_binary_fallback(
    segs: tuple[Path, Path], refusal: int
) -> None:
    """Some PACS accept every storage context they know of, then refuse the instance: the
    BINARY fallback was chosen at negotiation only, so the result never arrived (retried,
    then dead-lettered)."""
    ae = AE(ae_title="PACS")
    for uid in (SEGMENTATION_STORAGE, LABEL_MAP_SEG):
        ae.add_supported_context(uid, DEFAULT_TS)
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        if event.request.AffectedSOPClassUID == LABEL_MAP_SEG:
            return refusal
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0

    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])  # fmt: skip
    try:
        peer = PeerSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
        note = store_seg(Settings(), peer, segs[0], segs[1])
    finally:
        server.shutdown()
    assert received == [str(dcmread(segs[1], stop_before_pixels=True).SOPInstanceUID)]
    assert f"with 0x{refusal:04X}" in note and "sent the BINARY SEG instead" in note


def test_a_refused_binary_fallback_is_reported_with_the_refusal_that_led_to_it(
    segs: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A PACS refusing the Label Map SEG and then its BINARY fallback: the delivery's error
    said only that the BINARY SEG was refused, as if the Label Map one was never tried, and
    the fallback was logged on a line of its own without the delivery it belonged to."""
    ae = AE(ae_title="PACS")
    for uid in (SEGMENTATION_STORAGE, LABEL_MAP_SEG):
        ae.add_supported_context(uid, DEFAULT_TS)

    def on_store(event: evt.Event) -> int:
        return 0x0122 if event.request.AffectedSOPClassUID == LABEL_MAP_SEG else 0xA700

    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])  # fmt: skip
    try:
        peer = PeerSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
        with (
            caplog.at_level(logging.INFO, logger="dicom_node.send"),
            pytest.raises(DeliveryError) as e,
        ):
            store_seg(Settings(), peer, segs[0], segs[1])
    finally:
        server.shutdown()
    message = str(e.value)
    assert f"refused {LABEL_MAP_SEG} with 0x0122" in message
    assert "sent the BINARY SEG instead" in message
    assert message.endswith("answered C-STORE with 0xA700 (Refused: Out of Resources)")
    # The outbox logs the outcome once, with the delivery's id; no untagged line here.
    assert not [r for r in caplog.records if "BINARY SEG" in r.getMessage()]


def test_a_pacs_that_never_answers_the_association_is_not_called_unreachable(
    segs: tuple[Path, Path],
) -> None:
    """A hung PACS service accepts the TCP connection and never answers: 'is unreachable'
    sent the administrator to the network and firewall instead of the PACS."""
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody answers
    peer = PeerSettings(name="pacs", ae_title="PACS", host="127.0.0.1",
                        port=silent.getsockname()[1])  # fmt: skip
    try:
        with pytest.raises(DeliveryError, match="did not answer the association request") as e:
            store_seg(Settings(node={"network_timeout_s": 2}), peer, segs[1])
    finally:
        silent.close()
    assert e.value.retryable and e.value.peer_down
    assert "unreachable" not in str(e.value)


def test_sends_run_in_parallel_threads(pacs_factory: type[Pacs], segs: tuple[Path, Path]) -> None:
    pacs = pacs_factory([SEGMENTATION_STORAGE])
    # Answered only once all three are in the PACS at once: sends serialised would time out.
    pacs.together = threading.Barrier(3, timeout=20)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            store_seg(Settings(), pacs.peer(), segs[1])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(pacs.received) == 3


# -- DICOM TLS to a peer marked tls: true, DCMTK's storescp +tls as the PACS --------------------


def _tls_settings(certificate: Path, key: Path, ca: Path) -> Settings:
    """The node's certificate (its client certificate too) and the CA it trusts; the node's
    own TLS port stays off: sending over TLS does not need it."""
    tls = TLSSettings(certificate=certificate, key=key, ca_certificate=ca)
    return Settings(node=NodeSettings(tls=tls))


def _tls_peer(port: int) -> PeerSettings:
    return PeerSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=port, tls=True)


def test_a_tls_peer_gets_the_seg_over_tls(tmp_path: Path, segs: tuple[Path, Path]) -> None:
    """storescp requires a client certificate (its default) from the same CA."""
    pki = make_tls_files(tmp_path / "pki")
    settings = _tls_settings(pki.client_cert, pki.client_key, pki.ca_cert)
    server = ["+tls", str(pki.server_key), str(pki.server_cert), "+cf", str(pki.ca_cert)]
    with storescp_to(tmp_path / "received", *server) as port:
        assert echo_peer(settings, _tls_peer(port))["ok"]
        assert store_seg(settings, _tls_peer(port), segs[1]) == ""
    (received,) = (tmp_path / "received").iterdir()
    assert dcmread(received).SOPClassUID == SEGMENTATION_STORAGE


def test_a_tls_peer_is_never_sent_to_over_plain_tcp(
    tmp_path: Path, segs: tuple[Path, Path]
) -> None:
    """No node.tls certificate configured: a peer marked tls still gets TLS (without a client
    certificate), never the SEG in the clear; a peer that does not speak TLS gets nothing."""
    with storescp_to(tmp_path / "received") as port:  # plain DICOM on the peer's port
        with pytest.raises(DeliveryError, match="failed the TLS handshake") as caught:
            store_seg(Settings(), _tls_peer(port), segs[1])
        assert "does this port speak TLS?" in str(caught.value)
        echo = echo_peer(Settings(), _tls_peer(port))
        assert not echo["ok"] and "failed the TLS handshake" in echo["detail"]
    assert list((tmp_path / "received").iterdir()) == []


def test_a_tls_peer_whose_certificate_the_node_does_not_trust(
    tmp_path: Path, segs: tuple[Path, Path]
) -> None:
    pacs_pki, node_pki = make_tls_files(tmp_path / "pacs"), make_tls_files(tmp_path / "node")
    settings = _tls_settings(node_pki.client_cert, node_pki.client_key, node_pki.ca_cert)
    server = ["+tls", str(pacs_pki.server_key), str(pacs_pki.server_cert), "-ic"]
    with (
        storescp_to(tmp_path / "received", *server) as port,
        pytest.raises(DeliveryError, match="failed the TLS handshake: CERTIFICATE_VERIFY"),
    ):
        store_seg(settings, _tls_peer(port), segs[1])
    assert list((tmp_path / "received").iterdir()) == []


def test_a_tls_peer_without_loadable_client_files_stops_the_start(tmp_path: Path) -> None:
    """Found at start, not by every delivery to the peer after the first series."""
    config = tmp_path / "config.yaml"
    config.write_text(
        f"node: {{port: {free_port()}, bind_address: 127.0.0.1,"
        " tls: {certificate: node.pem, key: node.key}}\n"
        "storage: {data_dir: var, min_free_disk_mb: 0}\n"
        "workers: {processes: 0}\n"
        "peers: [{name: pacs, ae_title: PACS, host: 127.0.0.1, port: 2762, tls: true}]\n"
    )
    run = subprocess.run(
        [str(DICOM_NODE), "-c", str(config), "serve"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2, run.stderr
    assert "error: cannot load node.tls certificate, key or CA" in run.stderr, run.stderr
    assert "(needed to send to pacs)" in run.stderr, run.stderr
    assert "listening as AE" not in run.stderr, run.stderr


# -- pynetdicom's SCU race: the reactor takes the response a send_* call waits for ---------------


class _RacedCheckpoint(threading.Event):
    """An association's reactor checkpoint that loses pynetdicom's race once.

    The first time a ``send_*`` call clears it, the reactor goes on as if it had passed just
    before (the call already sees its flag set) and is held there until the response is on
    the queue, as when the scheduler parks that thread; ``taken`` is set once the reactor
    has then read the queue. Later clears pause it as pynetdicom intends."""

    def __init__(self, assoc: Any) -> None:
        super().__init__()
        self.set()
        self.queue = assoc.dimse.msg_queue
        self.raced = False
        self.taken = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        if self.is_set() or self.raced:
            return super().wait(timeout)
        self.raced = True
        wait_until(lambda: self.queue.qsize(), timeout_s=10, interval_s=0.001, what="a response")
        return True


@pytest.fixture
def raced(monkeypatch: pytest.MonkeyPatch) -> list[_RacedCheckpoint]:
    """Every association requested from here on loses the race on its first ``send_*``;
    the list holds their checkpoints. pynetdicom's own ``associate``: not the tests' guard."""
    associate = getattr(AE.associate, "__wrapped__", AE.associate)
    checkpoints: list[_RacedCheckpoint] = []

    def racing_associate(self: AE, *args: Any, **kwargs: Any) -> Any:
        assoc = associate(self, *args, **kwargs)
        if assoc.is_established:
            checkpoint = _RacedCheckpoint(assoc)
            assoc._reactor_checkpoint = checkpoint
            get_msg = assoc.dimse.get_msg

            def reactor_first(block: bool = False) -> Any:
                if block:  # the send_* call: parked until the reactor has had its go
                    checkpoint.taken.wait(10)
                item = get_msg(block=block)
                if not block and checkpoint.raced:
                    checkpoint.taken.set()
                return item

            assoc.dimse.get_msg = reactor_first
            checkpoints.append(checkpoint)
        return assoc

    monkeypatch.setattr(AE, "associate", racing_associate)
    return checkpoints


def test_a_response_the_reactor_takes_still_reaches_the_node_s_scu(
    tmp_path: Path, segs: tuple[Path, Path], raced: list[_RacedCheckpoint]
) -> None:
    """CI once saw a C-STORE get no status: the association's reactor thread took the
    response and dropped it ("Received unexpected C-STORE service message"). The node's
    deliveries, echoes and health checks must get it all the same."""
    settings = Settings(node=NodeSettings(network_timeout_s=5))
    with storescp_to(tmp_path / "received") as port:
        peer = PeerSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
        echo = echo_peer(settings, peer)
        assert echo["ok"], echo
        assert store_seg(settings, peer, segs[1]) == ""
        own = Settings(node=NodeSettings(port=port, network_timeout_s=5))
        (check,) = check_ports(own, timeout_s=5).values()  # status --check's C-ECHO
        assert check.answered and "0x0000" in check.detail, check
    assert [checkpoint.raced and checkpoint.taken.is_set() for checkpoint in raced] == [True] * 3
    (received,) = (tmp_path / "received").iterdir()
    assert dcmread(received).SOPClassUID == SEGMENTATION_STORAGE
