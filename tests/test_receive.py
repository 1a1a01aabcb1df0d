"""Receive: the node as a Storage SCP, driven by real peers (DCMTK, Orthanc, pynetdicom).

Every test starts ``dicom-node serve`` as a subprocess on a free port and talks DICOM to it
over real sockets; state is checked on disk, in the SQLite index and with the CLI.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pydicom
import pytest
import yaml
from conftest import NodeFactory, OrthancFactory
from peers import (
    SCU_AET,
    NodeProcess,
    TlsFiles,
    acknowledged_files,
    dataset_bytes,
    dcmtk_env,
    echoscu,
    free_port,
    make_mr_series,
    make_tls_files,
    port_open,
    refused_files,
    series_versions,
    storescu,
    storescu_background,
    storescu_command,
    wait_series_complete,
    wait_until,
)
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.association import Association

from storage.filestore import temporary_name
from storage.models import UID_LENGTH

pytestmark = pytest.mark.peers

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC210

REAL_MR_SERIES = (
    "mr_siemens_t1_fl2d_sag_HFS",
    "mr_siemens_t1_fl2d_sag_HFDL",
    "mr_siemens_xa30_enhanced_t1w",
)
CT_NO_UIDS = "ct_siemens_example_jpeg2000_no_uids"


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def raw_send() -> Iterator[None]:
    """pynetdicom sends a file path's dataset bytes as they are (no decode, no re-encode)."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = before


def associate(node: NodeProcess, *, aet: str = SCU_AET) -> tuple[AE, Association]:
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, JPEG2000Lossless)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established, "association with the node was not established"
    return ae, assoc


def crafted_file(
    path: Path, body: bytes, *, sop_class: str = MRImageStorage, sop_instance: str | None = None
) -> Path:
    """A Part 10 file with valid File Meta Information and ``body`` as the dataset bytes.

    Sent with ``raw_send``, the request names the meta's SOP Class and Instance UIDs.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid()
    buffer = io.BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path.write_bytes(buffer.getvalue() + body)
    return path


def dcm_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def assert_nothing_indexed(node: NodeProcess) -> None:
    assert node.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 0
    assert node.query("SELECT COUNT(*) AS n FROM series")[0]["n"] == 0
    assert node.stored_files() == []


def assert_stored_as_sent(node: NodeProcess, sources: list[Path]) -> None:
    """Each source is on disk under its UIDs, byte-identical after the File Meta or, where
    the sender re-encoded it, equal once decoded."""
    for source in sources:
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        stored = (
            node.store_dir
            / str(ds.StudyInstanceUID)
            / str(ds.SeriesInstanceUID)
            / f"{ds.SOPInstanceUID}.dcm"
        )
        assert stored.is_file(), f"{source.name} not stored at {stored}"
        stored_ds = pydicom.dcmread(stored)
        same_syntax = stored_ds.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        if not (same_syntax and dataset_bytes(stored) == dataset_bytes(source)):
            # storescu re-encodes what it sends (e.g. sequences of undefined length get
            # explicit lengths), so only the decoded content can be compared here.
            assert stored_ds == pydicom.dcmread(source), f"{source.name} decodes differently"


# -- echo, real data, generated series ---------------------------------------------------------


def test_echoscu_succeeds(node: NodeProcess) -> None:
    result = echoscu(node.port)
    assert result.returncode == 0, result.stderr
    node.wait_for_log(f"C-ECHO from AE {SCU_AET}")


def test_status_check_says_whether_the_node_listens(node: NodeProcess) -> None:
    """`status --check` (Docker's HEALTHCHECK): the index answers and the DICOM port answers
    a C-ECHO; the node logs its own check at DEBUG only, not once a minute at INFO."""

    logged = len(node.log_text())
    up = node.cli("status", "--check", "--json")
    assert up.returncode == 0, up.stderr
    checked = node.cli_json("status", "--check")
    assert checked["listening"] == {f"127.0.0.1:{node.port}": True}
    assert checked["answers"][f"127.0.0.1:{node.port}"].startswith("C-ECHO status 0x0000 in ")
    text = node.cli("status", "--check")
    assert f"answers on 127.0.0.1:{node.port}: yes, C-ECHO status 0x0000" in text.stdout
    time.sleep(0.5)  # time to log the probes, were they logged
    assert node.log_text()[logged:] == ""
    assert node.stop() == 0
    down = node.cli("status", "--check")
    assert down.returncode != 0
    assert f"nothing accepts connections on 127.0.0.1:{node.port}" in down.stderr
    assert node.cli("status").returncode == 0  # without --check: the index alone


def test_status_check_fails_for_a_node_that_takes_connections_but_does_not_answer(
    node: NodeProcess,
) -> None:
    """A stopped (or hung) node's port still completes TCP connections into its backlog;
    only a DICOM answer tells that it serves."""
    group = os.getpgid(node.pid)
    os.killpg(group, signal.SIGSTOP)
    try:
        assert port_open(node.port)  # what a TCP-level check would have taken for alive
        stopped = node.cli("status", "--check", "--timeout-s", "2")
    finally:
        os.killpg(group, signal.SIGCONT)
    assert stopped.returncode != 0
    assert f"no answer on 127.0.0.1:{node.port}: takes TCP connections but gave no" in (
        stopped.stderr
    )
    assert node.cli("status", "--check").returncode == 0  # serving again
    assert node.running()


def test_the_node_s_own_ae_title_is_for_its_health_check_only(
    node: NodeProcess, tmp_path: Path
) -> None:
    """Its own title is admitted for the check's Verification; not to store images."""
    logged = len(node.log_text())
    assert echoscu(node.port, aet=node.ae_title).returncode == 0
    series = make_mr_series(tmp_path / "gen", 1)
    sent = storescu(node.port, [series.folder], aet=node.ae_title)
    assert sent.returncode != 0
    line = node.wait_for_log("this is the node's own AE title")
    assert f"calling AE '{node.ae_title}'" in line and "Verification only" in line
    assert node.instance_rows(series.series_instance_uid) == []
    assert "C-ECHO from AE" not in node.log_text()[logged:]  # the check's echo: DEBUG


@pytest.mark.parametrize("name", REAL_MR_SERIES)
def test_storescu_real_series_stored_as_sent(
    node: NodeProcess, shared_data: Path, name: str
) -> None:
    folder = shared_data / name
    sources = dcm_files(folder)
    result = storescu(node.port, [folder], extra_args=["-v"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(acknowledged_files(result.stdout + result.stderr)) == len(sources)
    assert_stored_as_sent(node, sources)
    first = pydicom.dcmread(sources[0], stop_before_pixels=True)
    rows = node.instance_rows(str(first.SeriesInstanceUID))
    assert len(rows) == len(sources)
    assert {r["sop_instance_uid"] for r in rows} == {
        str(pydicom.dcmread(s, stop_before_pixels=True).SOPInstanceUID) for s in sources
    }
    assert {r["sop_class_uid"] for r in rows} == {str(first.SOPClassUID)}
    assert {r["modality"] for r in rows} == {"MR"}
    assert {r["calling_ae_title"] for r in rows} == {SCU_AET}


def test_ct_with_empty_uids_is_refused(
    node: NodeProcess, shared_data: Path, raw_send: None
) -> None:
    """The anonymised CT has empty SOP Instance/Series/Study UIDs (and SOP Class UID).

    storescu cannot even propose it (empty SOP Class UID); a pynetdicom SCU sends the
    file's dataset bytes under its File Meta's CT Image Storage: the node must answer
    0xA900 naming SOPInstanceUID, log it, and store nothing."""
    folder = shared_data / CT_NO_UIDS
    dcmtk = storescu(node.port, [folder], extra_args=["-v", "-xv"])
    assert dcmtk.returncode != 0 or refused_files(dcmtk.stdout + dcmtk.stderr), dcmtk.stdout
    assert acknowledged_files(dcmtk.stdout + dcmtk.stderr) == []

    ae, assoc = associate(node)
    try:
        for path in dcm_files(folder):
            rsp = assoc.send_c_store(path)
            assert rsp.Status == DATASET_DOES_NOT_MATCH_SOP_CLASS, (path.name, rsp)
            assert "SOPInstanceUID" in str(rsp.ErrorComment)
            assert rsp.OffendingElement == 0x00080018
    finally:
        assoc.release()
        ae.shutdown()
    node.wait_for_log("SOPInstanceUID is missing or empty (0xA900)")
    assert_nothing_indexed(node)
    assert node.running()


def test_generated_series_stored_byte_identical_and_indexed(
    node: NodeProcess, tmp_path: Path
) -> None:
    series = make_mr_series(tmp_path / "gen", 6, size=64, series_description="receive check")
    result = storescu(node.port, [series.folder], extra_args=["-v"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(acknowledged_files(result.stdout + result.stderr)) == sorted(
        str(p) for p in series.paths
    )
    for source in series.paths:  # sent in Explicit VR LE, stored in Explicit VR LE
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        stored = (
            node.store_dir
            / series.study_instance_uid
            / series.series_instance_uid
            / f"{ds.SOPInstanceUID}.dcm"
        )
        assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert dataset_bytes(stored) == dataset_bytes(source)

    shown = node.series_show(series.series_instance_uid)
    assert shown["study_instance_uid"] == series.study_instance_uid
    assert shown["modality"] == "MR"
    assert shown["series_description"] == "receive check"
    assert shown["calling_ae_title"] == SCU_AET
    assert len(shown["instances"]) == 6
    assert {i["sop_instance_uid"] for i in shown["instances"]} == set(series.sop_instance_uids)
    for item in shown["instances"]:
        assert item["sop_class_uid"] == MRImageStorage
        assert item["transfer_syntax_uid"] == ExplicitVRLittleEndian
        assert item["calling_ae_title"] == SCU_AET
        assert Path(item["path"]).is_file()

    rows = {r["instance_number"]: r for r in node.instance_rows(series.series_instance_uid)}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    for number, row in rows.items():
        assert (row["rows"], row["columns"]) == (64, 64)
        assert row["image_orientation"] == "1.0\\0.0\\0.0\\0.0\\1.0\\0.0"
        assert [float(v) for v in row["image_position"].split("\\")] == [
            -64.0,
            -64.0,
            2.0 * (number - 1),
        ]
        assert row["size_bytes"] == (node.store_dir / row["path"]).stat().st_size

    listed = node.series_json()
    assert [s["series_instance_uid"] for s in listed] == [series.series_instance_uid]
    assert listed[0]["instances"] == 6


def test_series_list_json_parses(node: NodeProcess, tmp_path: Path) -> None:
    assert node.series_json() == []
    a = make_mr_series(tmp_path / "a", 2)
    b = make_mr_series(tmp_path / "b", 3, study_instance_uid=a.study_instance_uid)
    assert storescu(node.port, [a.folder, b.folder]).returncode == 0
    listed = node.series_json()
    assert {s["series_instance_uid"]: s["instances"] for s in listed} == {
        a.series_instance_uid: 2,
        b.series_instance_uid: 3,
    }
    for item in listed:
        assert item["study_instance_uid"] == a.study_instance_uid
        assert item["state"] in {"receiving", "complete"}
        assert item["version"] == 1


# -- Orthanc as the sender ---------------------------------------------------------------------


def test_orthanc_pushes_study_to_node(
    node_factory: NodeFactory, orthanc_factory: OrthancFactory, tmp_path: Path
) -> None:
    node = node_factory(
        peers=[{"name": "pacs", "ae_title": "ORTHANCPACS", "host": "127.0.0.1", "port": 104}]
    )
    orthanc = orthanc_factory(
        aet="ORTHANCPACS",
        modalities={"NODE": {"AET": node.ae_title, "Host": "127.0.0.1", "Port": node.port}},
    )
    series = make_mr_series(tmp_path / "gen", 5)
    for path in series.paths:
        orthanc.upload(path)
    studies = orthanc.get_json("/studies")
    assert len(studies) == 1
    orthanc.store_to_modality("NODE", studies)

    rows = node.instance_rows(series.series_instance_uid)
    assert {r["sop_instance_uid"] for r in rows} == set(series.sop_instance_uids)
    assert {r["calling_ae_title"] for r in rows} == {"ORTHANCPACS"}
    assert len(node.stored_files()) == 5
    shown = node.series_show(series.series_instance_uid)
    assert shown["calling_ae_title"] == "ORTHANCPACS"
    for path in series.paths:
        stored = pydicom.dcmread(
            node.store_dir
            / series.study_instance_uid
            / series.series_instance_uid
            / f"{pydicom.dcmread(path).SOPInstanceUID}.dcm"
        )
        assert stored.pixel_array.tobytes() == pydicom.dcmread(path).pixel_array.tobytes()


# -- access control ----------------------------------------------------------------------------


def test_unknown_calling_ae_is_rejected(node: NodeProcess) -> None:
    result = echoscu(node.port, aet="UNKNOWN")
    assert result.returncode != 0
    assert "reject" in (result.stdout + result.stderr).lower()
    line = node.wait_for_log("association rejected")
    assert "'UNKNOWN'" in line and "is not a configured peer" in line


def test_wrong_called_ae_is_rejected(node: NodeProcess) -> None:
    result = echoscu(node.port, aec="NOTTHENODE")
    assert result.returncode != 0
    line = node.wait_for_log("association rejected")
    assert "'NOTTHENODE'" in line and "is not this node's" in line


def test_accept_unknown_callers(node_factory: NodeFactory) -> None:
    node = node_factory(overrides={"node": {"accept_unknown_callers": True}})
    result = echoscu(node.port, aet="UNKNOWN")
    assert result.returncode == 0, result.stderr
    node.wait_for_log("C-ECHO from AE UNKNOWN")


def test_a_peer_is_accepted_only_from_its_host_when_checked(node_factory: NodeFactory) -> None:
    peers = [  # the first peer is the one the test harness checks readiness as
        {"name": "local", "ae_title": "LOCALSCU", "host": "localhost", "port": 104},
        {"name": "moved", "ae_title": SCU_AET, "host": "127.0.0.2", "port": 104},
    ]
    node = node_factory(peers=peers, overrides={"node": {"check_caller_host": True}})
    refused = echoscu(node.port, aet=SCU_AET)  # echoscu connects from 127.0.0.1
    assert refused.returncode != 0
    assert "reject" in (refused.stdout + refused.stderr).lower()
    line = node.wait_for_log("association rejected")
    assert f"'{SCU_AET}'" in line and "at 127.0.0.2" in line and "not 127.0.0.1" in line
    assert "node.check_caller_host" in line
    # A host name is resolved: localhost is 127.0.0.1.
    assert echoscu(node.port, aet="LOCALSCU").returncode == 0
    node.wait_for_log("C-ECHO from AE LOCALSCU")
    # AE titles no peer has are still refused by the AE title check.
    assert echoscu(node.port, aet="UNKNOWN").returncode != 0
    assert "is not a configured peer" in node.wait_for_log("calling AE 'UNKNOWN'")


def test_the_caller_host_is_not_checked_by_default(node_factory: NodeFactory) -> None:
    """Senders behind NAT or a PACS cluster send from other addresses than results go to."""
    peers = [{"name": "moved", "ae_title": SCU_AET, "host": "127.0.0.2", "port": 104}]
    node = node_factory(peers=peers)
    assert echoscu(node.port).returncode == 0


# -- DICOM TLS ---------------------------------------------------------------------------------


def _tls_node(
    node_factory: NodeFactory,
    own: TlsFiles,
    clients: TlsFiles,
    processes: int = 1,
    peers: list[dict[str, object]] | None = None,
) -> tuple[NodeProcess, int]:
    """A started node with DICOM TLS: ``own``'s server certificate, ``clients``' CA."""
    node = node_factory(start=False, **({"peers": peers} if peers else {}))
    node.config["node"]["receiver_processes"] = processes
    tls_port = free_port()
    while tls_port == node.port:
        tls_port = free_port()
    node.config["node"]["tls"] = {
        "enabled": True,
        "port": tls_port,
        "certificate": node.relative(own.server_cert),
        "key": node.relative(own.server_key),
        "ca_certificate": node.relative(clients.ca_cert),
        "require_client_certificate": True,
    }
    node.config_path.write_text(yaml.safe_dump(node.config, sort_keys=False))
    node.start()
    return node, tls_port


@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "two-processes"])
def test_tls_echo_and_store(node_factory: NodeFactory, tmp_path: Path, processes: int) -> None:
    tls = make_tls_files(tmp_path / "pki")
    node, tls_port = _tls_node(node_factory, tls, tls, processes)
    # Every process serves both listeners (the TLS one handed over like the plain one).
    wait_until(
        lambda: node.log_text().count("(DICOM TLS)") >= processes,
        timeout_s=60,
        what=f"the TLS port in {processes} processes",
    )

    client = ["+tls", str(tls.client_key), str(tls.client_cert), "+cf", str(tls.ca_cert)]
    for _ in range(2 * processes):  # which process accepts is a race: give each a chance
        result = echoscu(tls_port, extra_args=client)
        assert result.returncode == 0, result.stdout + result.stderr

    series = make_mr_series(tmp_path / "gen", 2)
    stored = storescu(tls_port, [series.folder], extra_args=[*client, "-v"])
    assert stored.returncode == 0, stored.stdout + stored.stderr
    assert len(acknowledged_files(stored.stdout + stored.stderr)) == 2
    rows = node.instance_rows(series.series_instance_uid)
    assert {r["sop_instance_uid"] for r in rows} == set(series.sop_instance_uids)

    # The health check answers on both ports: over TLS with the node's own certificate.
    checked = node.cli_json("status", "--check")
    assert checked["listening"] == {f"127.0.0.1:{node.port}": True, f"127.0.0.1:{tls_port}": True}
    assert checked["answers"][f"127.0.0.1:{tls_port}"].startswith("C-ECHO status 0x0000")

    logged = len(node.log_text())
    plain = echoscu(tls_port)  # no TLS to the TLS port
    assert plain.returncode != 0
    no_cert = echoscu(tls_port, extra_args=["+tla", "-ic"])  # TLS without a client cert
    assert no_cert.returncode != 0
    # Each refused handshake says so in the log, with the peer and OpenSSL's reason.
    wait_until(
        lambda: node.log_text()[logged:].count("DICOM TLS connection from 127.0.0.1:") == 2,
        timeout_s=20,
        what="two refused TLS connections logged",
    )
    refused = [
        line
        for line in node.log_text()[logged:].splitlines()
        if "DICOM TLS connection from" in line
    ]
    assert all("WARNING" in line and " refused: " in line for line in refused), refused
    assert "not TLS: a sender using the plain DICOM protocol" in refused[0], refused
    assert "CERTIFICATE" in refused[1] and "node.tls.ca_certificate" in refused[1], refused
    assert node.running()


def test_orthanc_over_dicom_tls_both_ways(
    node_factory: NodeFactory, orthanc_factory: OrthancFactory, tmp_path: Path
) -> None:
    """A real PACS with DICOM TLS (Orthanc 1.9+): it pushes a study to the node's TLS port
    with its certificate, and the node reaches it over TLS (C-ECHO, by the path SEGs take)."""
    tls = make_tls_files(tmp_path / "pki")
    orthanc_port = free_port()
    node, tls_port = _tls_node(node_factory, tls, tls, peers=[
        {"name": "pacs", "ae_title": "ORTHANCPACS", "host": "127.0.0.1",
         "port": orthanc_port, "tls": True},
    ])  # fmt: skip
    orthanc = orthanc_factory(
        aet="ORTHANCPACS",
        modalities={
            "NODE": {"AET": node.ae_title, "Host": "127.0.0.1", "Port": tls_port,
                     "UseDicomTls": True},
        },
        extra={
            "DicomPort": orthanc_port,
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(tls.server_cert),
            "DicomTlsPrivateKey": str(tls.server_key),
            "DicomTlsTrustedCertificates": str(tls.ca_cert),
            "DicomTlsRemoteCertificateRequired": True,
        },
    )  # fmt: skip
    series = make_mr_series(tmp_path / "gen", 3)
    for path in series.paths:
        orthanc.upload(path)
    orthanc.store_to_modality("NODE", orthanc.get_json("/studies"))
    rows = node.instance_rows(series.series_instance_uid)
    assert {r["sop_instance_uid"] for r in rows} == set(series.sop_instance_uids)
    echoed = node.cli("echo", "pacs")
    assert echoed.returncode == 0, echoed.stdout + echoed.stderr
    assert "C-ECHO ORTHANCPACS@127.0.0.1" in echoed.stdout and "OK" in echoed.stdout


def test_a_silent_tls_client_holds_neither_the_tls_port_nor_the_stop(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    """A connection that never starts its TLS handshake (a port scanner, a stuck client):
    other senders are served meanwhile, and SIGTERM still stops the node at once."""
    tls = make_tls_files(tmp_path / "pki")
    node, tls_port = _tls_node(node_factory, tls, tls)
    client = ["+tls", str(tls.client_key), str(tls.client_cert), "+cf", str(tls.ca_cert)]
    with socket.create_connection(("127.0.0.1", tls_port)):
        time.sleep(0.5)  # the node has accepted it and waits for its handshake
        result = echoscu(tls_port, extra_args=client, timeout_s=15)
        assert result.returncode == 0, result.stdout + result.stderr
        assert node.stop(timeout_s=15) == 0  # not killed after waiting for the handshake


@pytest.mark.parametrize(
    ("peer", "local", "expected"),
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("::1", "::1", True),
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1", True),
        ("10.1.2.3", "10.1.2.3", True),  # the node's own address, bound to it
        ("::ffff:10.1.2.3", "10.1.2.3", True),
        ("10.1.2.4", "10.1.2.3", False),  # another machine
        ("fe80::1%eth0", "fe80::2%eth0", False),
    ],
)
def test_only_this_machine_may_call_with_the_node_s_own_title(
    peer: str, local: str, expected: bool
) -> None:
    from types import SimpleNamespace

    from dicom_node.scp import from_this_machine

    sock = SimpleNamespace(getsockname=lambda: (local, 11112))
    assoc = SimpleNamespace(
        requestor=SimpleNamespace(address=peer),
        dul=SimpleNamespace(socket=SimpleNamespace(socket=sock)),
    )
    assert from_this_machine(assoc) is expected  # type: ignore[arg-type]


def test_status_check_on_a_tls_port_that_refuses_the_node_s_own_certificate(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    """Clients' CA did not sign the node's certificate: the TLS port refuses the check's
    handshake. It answered all the same, which is what a health check asks."""
    own = make_tls_files(tmp_path / "own")
    node, tls_port = _tls_node(node_factory, own, make_tls_files(tmp_path / "clients"))
    checked = node.cli("status", "--check", "--json")
    assert checked.returncode == 0, checked.stderr
    answer = node.cli_json("status", "--check")["answers"][f"127.0.0.1:{tls_port}"]
    assert answer.startswith("answers TLS, but refused this check's certificate"), answer
    node.stop()
    down = node.cli("status", "--check")
    assert f"nothing accepts connections on 127.0.0.1:{tls_port}" in down.stderr


# -- crash safety, disk space, malformed input -------------------------------------------------


@pytest.mark.slow
def test_kill9_during_300_image_send(node_factory: NodeFactory, tmp_path: Path) -> None:
    # The quiet period outlasts crash + restart + resend: with 2 s, version 1 completes
    # with the pre-crash images right after the restart and the resend opens version 2.
    node = node_factory(quiet_period_s=15)
    series = make_mr_series(tmp_path / "gen", 300, size=64)
    log_path = tmp_path / "storescu.log"
    sender = storescu_background(node.port, [series.folder], log_path)
    try:
        wait_until(lambda: len(node.stored_files()) >= 100, timeout_s=120, what="100 images stored")
        node.kill9()
        sender.wait(timeout=60)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    acked = acknowledged_files(log_path.read_text())
    assert 0 < len(acked) < 300, "the crash should interrupt the send"

    node.start()  # sweeps temporaries left by the crash
    assert node.temporary_files() == []
    on_disk = node.stored_files()
    for path in on_disk:
        pydicom.dcmread(path)  # whole files only
    indexed = {r["sop_instance_uid"]: r for r in node.instance_rows(series.series_instance_uid)}
    for row in indexed.values():
        assert (node.store_dir / row["path"]).is_file(), "indexed instance without its file"
    sop_of = {str(p): u for p, u in zip(series.paths, series.sop_instance_uids, strict=True)}
    for path in acked:
        sop = sop_of[path]
        assert sop in indexed, f"acknowledged {path} not indexed after the crash"
        assert (node.store_dir / indexed[sop]["path"]).is_file()

    rest = [p for p in series.paths if str(p) not in set(acked)]
    resend = storescu(node.port, rest, extra_args=["-v"])
    assert resend.returncode == 0, resend.stdout[-2000:] + resend.stderr[-2000:]
    wait_series_complete(node, series.series_instance_uid, count=300, timeout_s=120)
    listed = {s["series_instance_uid"]: s for s in node.series_json()}
    assert listed[series.series_instance_uid]["state"] == "complete"
    assert listed[series.series_instance_uid]["instances"] == 300
    assert len(node.stored_files()) == 300


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs (needs root and mount permission); unmounted at teardown."""
    mountpoint = tmp_path / "small_disk"
    mountpoint.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)


def test_free_space_floor_refuses_with_a700(
    node_factory: NodeFactory, small_tmpfs: Path, tmp_path: Path
) -> None:
    node = node_factory(start=False)
    node.config["storage"] = {
        "data_dir": node.relative(small_tmpfs / "data"),
        "min_free_disk_mb": 8,
    }
    node.config_path.write_text(yaml.safe_dump(node.config, sort_keys=False))
    node.start()
    series = make_mr_series(tmp_path / "gen", 2, size=64)

    filler = small_tmpfs / "filler.bin"
    free = shutil.disk_usage(small_tmpfs).free
    with open(filler, "wb") as fh:  # leave 4 MiB: below the 8 MiB floor, room for the index
        fh.truncate(0)
        fh.write(b"\0" * (free - 4 * 1024 * 1024))
    assert shutil.disk_usage(small_tmpfs).free < 8 * 1024 * 1024

    refused = storescu(node.port, [series.paths[0]], extra_args=["-v"])
    output = refused.stdout + refused.stderr
    assert acknowledged_files(output) == []
    assert refused_files(output), output
    assert "OutOfResources" in refused_files(output)[0][1]
    line = node.wait_for_log("refused (0xA700)")
    assert "min_free_disk_mb" in line
    assert node.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 0
    assert echoscu(node.port).returncode == 0  # still serving

    filler.unlink()
    accepted = storescu(node.port, series.paths, extra_args=["-v"])
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert len(acknowledged_files(accepted.stdout + accepted.stderr)) == 2
    assert len(node.instance_rows(series.series_instance_uid)) == 2


def test_an_index_whose_own_disk_fills_refuses_with_a700_and_recovers(
    node_factory: NodeFactory, small_tmpfs: Path, tmp_path: Path
) -> None:
    """The SQLite index on a disk of its own (the store elsewhere, so the free-space floor
    does not see it) fills up: stores are refused with 0xA700 naming the cause, nothing of
    them is kept, and they succeed again once there is space."""
    index_file = small_tmpfs / "index.sqlite"
    node = node_factory(overrides={"storage": {"database_url": f"sqlite:///{index_file}"}})
    first = make_mr_series(tmp_path / "first", 2, size=32)
    assert storescu(node.port, first.paths).returncode == 0

    filler = small_tmpfs / "filler.bin"
    # Fill it to the last block (unbuffered: nothing left to flush when it is full).
    with open(filler, "wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 65536)
    later = make_mr_series(tmp_path / "later", 2, size=32)
    refused = storescu(node.port, later.paths, extra_args=["-v"])
    output = refused.stdout + refused.stderr
    assert acknowledged_files(output) == [], output[-2000:]
    assert "OutOfResources" in refused_files(output)[0][1]
    line = node.wait_for_log("refused (0xA700): index unavailable")
    assert "full" in line, line
    assert echoscu(node.port).returncode == 0  # still serving

    filler.unlink()
    accepted = storescu(node.port, later.paths, extra_args=["-v"])
    assert len(acknowledged_files(accepted.stdout + accepted.stderr)) == 2
    check = node.cli_json("store", "check", "--grace-s", "0")  # exits 1 if inconsistent
    assert check["consistent"] is True and check["report"]["instances_checked"] == 4, check


@pytest.mark.filterwarnings("ignore:.*VR UI:UserWarning")  # pydicom: not a valid UID, as meant
def test_malformed_input_is_refused(node: NodeProcess, tmp_path: Path, raw_send: None) -> None:
    good = make_mr_series(tmp_path / "gen", 1, size=64)
    body = dataset_bytes(good.paths[0])
    # Pixel Data longer than the node reads on receive (BULK_BYTES): only its bounds are checked
    large = dataset_bytes(make_mr_series(tmp_path / "large", 1, size=512).paths[0])
    no_sop = pydicom.dcmread(good.paths[0])
    del no_sop.SOPInstanceUID
    no_sop_path = tmp_path / "no_sop.dcm"
    no_sop.save_as(no_sop_path, enforce_file_format=True)
    nul_uid = pydicom.dcmread(good.paths[0])
    nul_uid.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1\x002"  # a NUL inside, not padding
    nul_uid_path = tmp_path / "nul_uid.dcm"
    nul_uid.save_as(nul_uid_path, enforce_file_format=True)
    overlong = pydicom.dcmread(good.paths[0])
    overlong.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498." + "3" * UID_LENGTH
    overlong_path = tmp_path / "overlong.dcm"
    overlong.save_as(overlong_path, enforce_file_format=True)
    other_class = pydicom.dcmread(good.paths[0])
    other_class.SOPClassUID = CTImageStorage
    other_class_path = tmp_path / "other_class_source.dcm"
    other_class.save_as(other_class_path, enforce_file_format=True)
    other_class_body = dataset_bytes(other_class_path)
    cases: list[tuple[str, Path, int, str]] = [
        # the request names another instance (or class) than the data set is: storing it
        # would acknowledge a UID the node does not hold
        ("another instance", crafted_file(tmp_path / "other_instance.dcm", body),
         DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOPInstanceUID differs from AffectedSOPInstanceUID"),
        ("another class", crafted_file(tmp_path / "other_class.dcm", other_class_body,
                                       sop_instance=other_class.SOPInstanceUID),
         DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID differs from AffectedSOPClassUID"),
        # the dataset's last element (Pixel Data) is cut short: its UIDs are all readable
        ("truncated", crafted_file(tmp_path / "truncated.dcm", body[:-100]), CANNOT_UNDERSTAND,
         "cannot decode"),
        ("truncated large", crafted_file(tmp_path / "truncated_large.dcm", large[:-1000]),
         CANNOT_UNDERSTAND, "cannot decode"),
        ("garbage", crafted_file(tmp_path / "garbage.dcm", b"\xde\xad\xbe\xef" * 64),
         CANNOT_UNDERSTAND, "cannot decode"),
        ("empty", crafted_file(tmp_path / "empty.dcm", b""), CANNOT_UNDERSTAND, "empty"),
        ("no SOPInstanceUID", no_sop_path, DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOPInstanceUID"),
        ("NUL in StudyInstanceUID", nul_uid_path, DATASET_DOES_NOT_MATCH_SOP_CLASS,
         "StudyInstanceUID holds a NUL character"),
        ("overlong SeriesInstanceUID", overlong_path, DATASET_DOES_NOT_MATCH_SOP_CLASS,
         f"SeriesInstanceUID is longer than {UID_LENGTH}"),
    ]  # fmt: skip
    ae, assoc = associate(node)
    statuses: dict[str, tuple[int, str]] = {}
    try:
        for name, path, _, _ in cases:
            rsp = assoc.send_c_store(path)
            statuses[name] = (int(rsp.Status), str(rsp.get("ErrorComment", "")))
    finally:
        assoc.release()
        ae.shutdown()
    log = node.log_text()
    assert "the dataset is empty (0xC210)" in log
    assert "SOPInstanceUID is missing or empty (0xA900)" in log
    assert (
        f"the data set's SOPInstanceUID {pydicom.dcmread(good.paths[0]).SOPInstanceUID} is not "
        "the AffectedSOPInstanceUID"
    ) in log
    assert f"the data set's SOPClassUID {CTImageStorage} is not the AffectedSOPClassUID" in log
    assert (
        "StudyInstanceUID holds a NUL character (0xA900): 1.2.826.0.1.3680043.8.498.1\\x002" in log
    )
    assert f"SeriesInstanceUID is 281 characters, more than the {UID_LENGTH} the index" in log
    assert_nothing_indexed(node)
    assert echoscu(node.port).returncode == 0  # the node keeps serving
    for name, _, status, comment in cases:
        got_status, got_comment = statuses[name]
        assert (hex(got_status), comment in got_comment) == (hex(status), True), (
            f"{name}: expected {status:#06x} with {comment!r}, got {got_status:#06x} "
            f"{got_comment!r}"
        )
    assert "dataset cannot be decoded (0xC210)" in log


@pytest.mark.filterwarnings("ignore:.*VR UI:UserWarning")  # pydicom: not valid UIDs, as meant
def test_malformed_uids_that_clean_up_alike_keep_their_own_files(
    node: NodeProcess, tmp_path: Path
) -> None:
    check_malformed_uids(node, tmp_path)


def check_malformed_uids(node: NodeProcess, tmp_path: Path) -> None:
    """UIDs no standard allows but devices send (longer than 64 characters, up to the 255
    the index holds; characters a path cannot hold; DCMTK's storescu sends them) are
    accepted; two that clean up to the same path must not share a file, or the second
    image silently overwrites the first. Also run on PostgreSQL, which enforces lengths."""
    long = "1.2.826.0.1.3680043.8.498." + "7" * 40  # 66 characters before the suffix
    longest = long + "." + "9" * (UID_LENGTH - len(long) - 1)
    sops = [
        f"{long}.1",
        f"{long}.2",
        "1.2.826.0.1.3680043.8.498.77/7",
        "1.2.826.0.1.3680043.8.498.77_7",
        longest,
    ]
    assert len(longest) == UID_LENGTH
    series_uids = [f"{long}.81", f"{long}.82", f"{long}.81", f"{long}.82", f"{long}.81"]
    series = make_mr_series(tmp_path / "gen", len(sops), size=32)
    sent: list[Path] = []
    for k, (path, sop, series_uid) in enumerate(zip(series.paths, sops, series_uids, strict=True)):
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SeriesInstanceUID = series_uid
        ds.ImageComments = f"image {k}"
        sent.append(tmp_path / f"odd{k}.dcm")
        ds.save_as(sent[-1], enforce_file_format=True)
    result = storescu(node.port, sent, extra_args=["-v"])
    assert len(acknowledged_files(result.stdout + result.stderr)) == len(sent), result.stderr

    rows = node.query_rows("SELECT sop_instance_uid, path FROM instances")
    assert sorted(row["sop_instance_uid"] for row in rows) == sorted(sops)
    assert len({row["path"] for row in rows}) == len(sops), [row["path"] for row in rows]
    assert len(node.stored_files()) == len(sops)
    by_uid = {row["sop_instance_uid"]: row["path"] for row in rows}
    for source, sop in zip(sent, sops, strict=True):  # each file holds its own image
        stored = pydicom.dcmread(node.store_dir / by_uid[sop])
        assert (stored.SOPInstanceUID, stored.ImageComments) == (sop, source_comment(source))
        assert stored == pydicom.dcmread(source)
    # Two series, whatever their folders are called: each holds its own two images.
    listed = {row["series_instance_uid"]: row["instances"] for row in node.series_json()}
    assert listed == {f"{long}.81": 3, f"{long}.82": 2}
    checked = node.cli("store", "check", "--grace-s", "0")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def source_comment(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).ImageComments)


# -- duplicates, versions, shutdown, prune, multi-process --------------------------------------


def test_duplicate_sop_instance_uid_is_replaced(node: NodeProcess, tmp_path: Path) -> None:
    series = make_mr_series(tmp_path / "first", 1, size=64)
    assert storescu(node.port, series.paths).returncode == 0
    changed = pydicom.dcmread(series.paths[0])
    changed.ImageComments = "second copy"
    second = tmp_path / "second.dcm"
    changed.save_as(second, enforce_file_format=True)
    assert storescu(node.port, [second]).returncode == 0

    sop = series.sop_instance_uids[0]
    rows = node.query("SELECT * FROM instances WHERE sop_instance_uid = ?", (sop,))
    assert len(rows) == 1
    assert len(node.stored_files()) == 1
    stored = pydicom.dcmread(node.store_dir / rows[0]["path"])
    assert stored.ImageComments == "second copy"
    line = node.wait_for_log(f"duplicate SOP Instance UID {sop}")
    assert "replaced" in line


def test_instances_after_completion_open_version_2(node: NodeProcess, tmp_path: Path) -> None:
    first = make_mr_series(tmp_path / "v1", 3, size=64)
    assert storescu(node.port, first.paths).returncode == 0
    wait_series_complete(node, first.series_instance_uid, count=3)
    late = make_mr_series(
        tmp_path / "v2",
        2,
        size=64,
        study_instance_uid=first.study_instance_uid,
        series_instance_uid=first.series_instance_uid,
        first_instance_number=4,
    )
    assert storescu(node.port, late.paths).returncode == 0
    wait_series_complete(node, first.series_instance_uid, count=2, version=2)

    shown = node.series_show(first.series_instance_uid)
    assert [(v["version"], v["state"]) for v in shown["versions"]] == [
        (1, "complete"),
        (2, "complete"),
    ]
    by_version = {
        v: {i["sop_instance_uid"] for i in shown["instances"] if i["version"] == v} for v in (1, 2)
    }
    assert by_version == {1: set(first.sop_instance_uids), 2: set(late.sop_instance_uids)}
    assert len(node.stored_files()) == 5
    node.wait_for_log("arrived after completion; version 2 opened")


def test_sigterm_during_send_exits_0_and_keeps_acknowledged(
    node: NodeProcess, tmp_path: Path
) -> None:
    series = make_mr_series(tmp_path / "gen", 150, size=64)
    log_path = tmp_path / "storescu.log"
    sender = storescu_background(node.port, [series.folder], log_path)
    try:
        wait_until(lambda: len(node.stored_files()) >= 20, timeout_s=120, what="20 images")
        node.signal(signal.SIGTERM)
        assert node.wait(timeout_s=60) == 0, node.log_text()[-3000:]
        sender.wait(timeout=60)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    acked = acknowledged_files(log_path.read_text())
    assert acked, "nothing acknowledged before SIGTERM"
    sop_of = {str(p): u for p, u in zip(series.paths, series.sop_instance_uids, strict=True)}
    indexed = {r["sop_instance_uid"]: r for r in node.instance_rows(series.series_instance_uid)}
    for path in acked:
        assert sop_of[path] in indexed, f"acknowledged {path} lost"
        assert (node.store_dir / indexed[sop_of[path]]["path"]).is_file()
    assert node.temporary_files() == []
    assert "stopped" in node.log_text()


def test_store_prune(node: NodeProcess, tmp_path: Path) -> None:
    series = make_mr_series(tmp_path / "gen", 3, size=64)
    assert storescu(node.port, series.paths).returncode == 0
    wait_series_complete(node, series.series_instance_uid, count=3)
    stored_bytes = sum(p.stat().st_size for p in node.stored_files())

    dry = node.cli_json("store", "prune", "--older-than", "0s", "--dry-run")
    assert dry["series"] == [series.series_instance_uid]
    assert dry["instances"] == 3
    assert dry["dry_run"] is True
    listed = node.cli("store", "prune", "--older-than", "0s", "--dry-run")
    assert f"series that would go: 1\n  {series.series_instance_uid}" in listed.stdout
    assert len(node.stored_files()) == 3
    assert len(node.instance_rows(series.series_instance_uid)) == 3

    done = node.cli_json("store", "prune", "--older-than", "0s")
    assert done["series"] == [series.series_instance_uid]
    assert done["bytes_freed"] == stored_bytes
    assert node.stored_files() == []
    assert node.instance_rows() == []
    assert series_versions(node, series.series_instance_uid) == []
    assert node.series_json() == []


def test_receiver_processes_share_the_associations(node_factory: NodeFactory) -> None:
    """Every receiver process serves the one listening socket; an idle one is preferred.

    Four associations held open one after the other must not all land on one process:
    they would if the spawned processes never accepted (or, with per-process SO_REUSEPORT
    sockets, whenever the kernel hashed them together).
    """
    node = node_factory(overrides={"node": {"receiver_processes": 2}})
    wait_until(
        lambda: node.log_text().count("listening as AE") >= 2, timeout_s=60, what="2 processes"
    )
    by_process = accepting_processes(node, 4)
    assert set(by_process) == {"MainProcess", "receiver-1"}, by_process
    assert node.stop() == 0


def accepting_processes(node: NodeProcess, count: int) -> list[str]:
    """Hold ``count`` associations open one after the other (each answers a C-ECHO), then
    release them; the name of the process that accepted each, from the node's log."""
    import re

    from pynetdicom import AE

    accepted = re.compile(r" (\S+) dicom_node\.receive: association \S+ accepted")
    before = len(accepted.findall(node.log_text()))
    scu = AE(ae_title=SCU_AET)
    scu.add_requested_context("1.2.840.10008.1.1")
    held = []
    try:
        for number in range(1, count + 1):
            assoc = scu.associate("127.0.0.1", node.port, ae_title=node.ae_title)
            assert assoc.is_established
            held.append(assoc)
            wait_until(
                lambda n=number: len(accepted.findall(node.log_text())) >= before + n,
                timeout_s=10,
                what=f"association {number} logged",
            )
        for assoc in held:
            assert assoc.send_c_echo().Status == 0
    finally:
        for assoc in held:
            assoc.release()
    return accepted.findall(node.log_text())[before:]


def the_receiver_child(node: NodeProcess) -> psutil.Process:
    """The one spawned receiver process of a node with ``receiver_processes: 2``."""
    assert node.proc is not None
    (receiver,) = [
        child
        for child in psutil.Process(node.proc.pid).children()
        if "spawn_main" in " ".join(child.cmdline())
        and "resource_tracker" not in " ".join(child.cmdline())
    ]
    return receiver


def test_a_receiver_process_that_dies_is_replaced(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    """A receiver process killed (the kernel's OOM killer, an operator) is started again;
    the node keeps answering meanwhile, and the new process serves associations."""
    node = node_factory(overrides={"node": {"receiver_processes": 2}})
    wait_until(
        lambda: node.log_text().count("listening as AE") >= 2, timeout_s=60, what="2 processes"
    )
    child = the_receiver_child(node)
    # What it leaves when killed mid-write, and what other live writers have under way.
    first = make_mr_series(tmp_path / "first", 2, size=32)
    assert storescu(node.port, first.paths).returncode == 0
    folder = next(node.data_dir.glob("store/*/*"))
    left = folder / temporary_name(child.pid)
    others = [folder / temporary_name(node.pid), folder / temporary_name(1, "other-machine")]
    for path in [left, *others]:
        path.write_bytes(b"partial")
    child.kill()
    node.wait_for_log("receiver process receiver-1 exited (code -9); starting a new one")
    wait_until(
        lambda: node.log_text().count("listening as AE") >= 3, timeout_s=60, what="the new one"
    )
    node.wait_for_log("removed 1 partial files of receiver process receiver-1")
    assert not left.exists() and all(path.exists() for path in others)
    # Associations held open: the idle new process takes one (as in the test above).
    assert "receiver-1" in accepting_processes(node, 4)
    series = make_mr_series(tmp_path / "after", 4, size=32)
    assert storescu(node.port, series.paths).returncode == 0
    wait_series_complete(node, series.series_instance_uid, count=4)
    assert node.stop() == 0


def test_receivers_die_with_the_main_process(node_factory: NodeFactory, tmp_path: Path) -> None:
    """``kill -9`` of the node's main process only (the OOM killer picks one process): its
    receiver processes go too, instead of serving the old socket with the old configuration
    beside the restarted node."""
    node = node_factory(overrides={"node": {"receiver_processes": 2}})
    wait_until(
        lambda: node.log_text().count("listening as AE") >= 2, timeout_s=60, what="2 processes"
    )
    assert node.proc is not None
    receiver = the_receiver_child(node)
    psutil.Process(node.proc.pid).kill()
    node.proc.wait(timeout=30)
    receiver.wait(timeout=10)  # psutil.TimeoutExpired if the orphan lives on
    assert not port_open(node.port)  # nobody answers on the node's port any more
    node.restart()
    series = make_mr_series(tmp_path / "after", 3, size=32)
    assert storescu(node.port, series.paths).returncode == 0
    wait_series_complete(node, series.series_instance_uid, count=3)


def test_two_receiver_processes_concurrent_senders(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node = node_factory(overrides={"node": {"receiver_processes": 2}})
    a = make_mr_series(tmp_path / "a", 40, size=64, seed=1)
    b = make_mr_series(tmp_path / "b", 40, size=64, seed=2)
    senders = [
        subprocess.Popen(
            storescu_command(node.port, [s.folder], extra_args=["-v"]),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dcmtk_env(),
        )
        for s in (a, b)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in senders]
    for proc, output in zip(senders, outputs, strict=True):
        assert proc.returncode == 0, output[-2000:]
        assert len(acknowledged_files(output)) == 40
    for series in (a, b):
        rows = node.instance_rows(series.series_instance_uid)
        assert sorted(r["sop_instance_uid"] for r in rows) == sorted(series.sop_instance_uids)
    total = node.query("SELECT COUNT(*) AS n, COUNT(DISTINCT sop_instance_uid) AS d FROM instances")
    assert (total[0]["n"], total[0]["d"]) == (80, 80)
    assert len(node.stored_files()) == 80
    counts = {
        r["series_instance_uid"]: r["instance_count"]
        for r in node.query(
            "SELECT s.series_instance_uid, v.instance_count FROM series_versions v "
            "JOIN series s ON v.series_pk = s.id"
        )
    }
    assert counts == {a.series_instance_uid: 40, b.series_instance_uid: 40}
    assert node.stop() == 0
