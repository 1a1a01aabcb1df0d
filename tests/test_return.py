"""End to end: a series reaches the node, the demo model segments it, the SEG returns.

Real peers only: Orthanc (Debian) as the PACS, DCMTK storescu as the scanner, the node as
a subprocess with its worker processes, the real demo nnU-Net model on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from dicom_phantoms import write_mixed_orientation_series, write_stacked_series
from e2e import (
    SEG_TIMEOUT_S,
    configure,
    deliveries,
    dice_against_phantom,
    fetch,
    jobs,
    make_pacs_and_node,
    phantom_series,
    pipeline,
    referenced_instances,
    scanner_and_pacs,
    scanner_node_and_pacs,
    seg_instances,
    source_series_of,
    upload_series,
    wait_for_seg,
)
from peers import NodeProcess, Orthanc, echoscu, storescu, wait_until
from validators import assert_valid_binary_seg

from inference.demo.phantoms import PhantomSpec, sample_phantom

pytestmark = pytest.mark.peers

# -- tests -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_orthanc_sends_a_series_and_gets_its_seg_back(
    pacs_and_node: tuple[Orthanc, NodeProcess], tmp_path: Path
) -> None:
    orthanc, node = pacs_and_node
    series = phantom_series(tmp_path / "series", seed=7001)
    study = upload_series(orthanc, series)
    orthanc.store_to_modality("NODE", [study])

    seg_id = wait_for_seg(orthanc, node)
    seg_path = fetch(orthanc, seg_id, tmp_path / "seg.dcm")
    assert source_series_of(seg_path) == {series.uids.series_instance_uid}
    assert_valid_binary_seg(seg_path, series.paths)  # Orthanc's copy
    scores = dice_against_phantom(seg_path, series, seed=7001)
    assert all(score >= 0.90 for score in scores.values()), scores
    (job,) = jobs(node)
    assert job["state"] == "succeeded"
    wait_until(lambda: deliveries(node)[0]["state"] == "delivered", timeout_s=30, what="delivered")
    log = node.log_text()
    uids = series.uids
    job_line = f"job {job['id']} study {uids.study_instance_uid} series {uids.series_instance_uid}"
    assert job_line in log
    assert "succeeded in" in log and "delivered in" in log
    assert f"{job_line} v1: model demo segmented" in log  # inference's own line names the job


@pytest.mark.slow
def test_storescu_scanner_with_orthanc_as_its_destination(
    node_factory: Callable[..., NodeProcess],
    orthanc_factory: Callable[..., Orthanc],
    tmp_path: Path,
) -> None:
    node, orthanc = scanner_node_and_pacs(node_factory, orthanc_factory)
    series = phantom_series(tmp_path / "series", seed=7002)
    sent = storescu(node.port, [series.paths[0].parent], aet="SCANNER", aec=node.ae_title)
    assert sent.returncode == 0, sent.stdout + sent.stderr

    seg_path = fetch(orthanc, wait_for_seg(orthanc, node), tmp_path / "seg.dcm")
    assert source_series_of(seg_path) == {series.uids.series_instance_uid}
    scores = dice_against_phantom(seg_path, series, seed=7002)
    assert all(score >= 0.90 for score in scores.values()), scores


@pytest.mark.slow
def test_the_water_stack_of_a_dixon_series_is_segmented(
    node_factory: Callable[..., NodeProcess],
    orthanc_factory: Callable[..., Orthanc],
    tmp_path: Path,
) -> None:
    """Fat and water images in one series (as some Dixon exports send them), the rule asks
    for water: the SEG covers the water images only and the job says which stack it used."""
    settings = pipeline(destinations=["pacs"])
    settings["rules"][0]["profile"] = {"stack_image_type": "W"}
    node, orthanc = scanner_node_and_pacs(node_factory, orthanc_factory, settings)
    spec = PhantomSpec.from_seed(7012)
    fat, water = write_stacked_series(
        tmp_path / "series",
        [lambda p: np.full(len(p), 40.0), lambda p: sample_phantom(spec, p)[0]],
        attributes=[{"ImageType": ["DERIVED", "PRIMARY", "DIXON", t]} for t in ("F", "W")],
        shape=(48, 64, 64),
        spacing=(3.0, 2.0, 2.0),
    )
    sent = storescu(node.port, [tmp_path / "series"], aet="SCANNER", aec=node.ae_title)
    assert sent.returncode == 0, sent.stdout + sent.stderr

    seg_path = fetch(orthanc, wait_for_seg(orthanc, node), tmp_path / "seg.dcm")
    assert referenced_instances(seg_path) == set(water.sop_instance_uids)
    assert_valid_binary_seg(seg_path, sorted((tmp_path / "series").iterdir()))
    scores = dice_against_phantom(seg_path, water, seed=7012)
    assert all(score >= 0.90 for score in scores.values()), scores
    (job,) = jobs(node)
    stack = "stack 2 of 2 (Image Type DERIVED\\PRIMARY\\DIXON\\W: 48 images)"
    assert job["state"] == "succeeded" and job["reason"] == f"segmented {stack}", job
    assert f"segmented {stack}" in node.log_text()
    assert len(fat.sop_instance_uids) == 48


@pytest.mark.slow
def test_images_arriving_after_the_seg_give_a_new_seg_that_the_pacs_keeps(
    node_factory: Callable[..., NodeProcess],
    orthanc_factory: Callable[..., Orthanc],
    tmp_path: Path,
) -> None:
    """Half a series, its SEG sent, then the other half (a late reconstruction, a resend):
    the SEG of the whole series must reach a PACS that keeps the first copy of a SOP Instance
    UID and ignores a re-send (Orthanc's default, OverwriteInstances false)."""
    node, orthanc = scanner_node_and_pacs(
        node_factory, orthanc_factory, extra={"OverwriteInstances": False}
    )
    series = phantom_series(tmp_path / "series", seed=7021)
    by_uid = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in series.paths
    }
    # Every other slice first: the whole field of view at twice the spacing.
    for part, slices in (("first", slice(0, None, 2)), ("rest", slice(1, None, 2))):
        (tmp_path / part).mkdir()
        for uid in series.sop_instance_uids[slices]:
            (tmp_path / part / by_uid[uid].name).hardlink_to(by_uid[uid])
    first_half = set(series.sop_instance_uids[::2])

    sent = storescu(node.port, [tmp_path / "first"], aet="SCANNER", aec=node.ae_title)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    first_seg = fetch(orthanc, wait_for_seg(orthanc, node), tmp_path / "seg1.dcm")
    assert referenced_instances(first_seg) == first_half
    sent = storescu(node.port, [tmp_path / "rest"], aet="SCANNER", aec=node.ae_title)
    assert sent.returncode == 0, sent.stdout + sent.stderr

    def both_delivered() -> bool:
        states = [d["state"] for d in deliveries(node)]
        return states == ["delivered", "delivered"]

    wait_until(both_delivered, timeout_s=SEG_TIMEOUT_S, interval_s=1.0, what="two deliveries")
    segs = {
        int(ds.InstanceNumber): (ds, path)
        for path in (fetch(orthanc, i, tmp_path / f"{i}.dcm") for i in seg_instances(orthanc))
        for ds in [pydicom.dcmread(path, stop_before_pixels=True)]
    }
    assert sorted(segs) == [1, 2], "the PACS holds both SEGs, the later numbered 2"
    (earlier, _), (later, later_path) = segs[1], segs[2]
    assert earlier.SeriesInstanceUID == later.SeriesInstanceUID  # one SEG series per model
    assert earlier.SOPInstanceUID != later.SOPInstanceUID
    assert referenced_instances(later_path) == set(series.sop_instance_uids)
    assert_valid_binary_seg(later_path, series.paths)
    scores = dice_against_phantom(later_path, series, seed=7021)
    assert all(score >= 0.90 for score in scores.values()), scores
    assert [j["state"] for j in jobs(node)] == ["succeeded", "succeeded"]


@pytest.mark.slow
def test_a_series_sent_again_with_new_uids_gets_a_seg_of_the_new_copy(
    node_factory: Callable[..., NodeProcess],
    orthanc_factory: Callable[..., Orthanc],
    tmp_path: Path,
) -> None:
    """The whole series again after its SEG, same Study and Series UIDs but new SOP Instance
    UIDs (an archive or anonymiser that re-issues them): version 2 is segmented from the new
    copies, not refused for images sharing positions with the first."""
    node, orthanc = scanner_node_and_pacs(node_factory, orthanc_factory)
    series = phantom_series(tmp_path / "series", seed=7022)
    sent = storescu(node.port, [tmp_path / "series"], aet="SCANNER", aec=node.ae_title)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    first_seg = fetch(orthanc, wait_for_seg(orthanc, node), tmp_path / "seg1.dcm")
    assert referenced_instances(first_seg) == set(series.sop_instance_uids)

    (tmp_path / "again").mkdir()
    new_uids: set[str] = set()
    for path in series.paths:
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        new_uids.add(str(ds.SOPInstanceUID))
        ds.save_as(tmp_path / "again" / path.name)
    sent = storescu(node.port, [tmp_path / "again"], aet="SCANNER", aec=node.ae_title)
    assert sent.returncode == 0, sent.stdout + sent.stderr

    wait_until(
        lambda: [d["state"] for d in deliveries(node)] == ["delivered", "delivered"],
        timeout_s=SEG_TIMEOUT_S,
        interval_s=1.0,
        what="two deliveries",
    )
    second = [
        path
        for path in (fetch(orthanc, i, tmp_path / f"{i}.dcm") for i in seg_instances(orthanc))
        if int(pydicom.dcmread(path, stop_before_pixels=True).InstanceNumber) == 2
    ]
    assert len(second) == 1
    assert referenced_instances(second[0]) == new_uids
    again = dataclasses.replace(series, paths=sorted((tmp_path / "again").iterdir()))
    assert_valid_binary_seg(second[0], again.paths)
    assert all(score >= 0.90 for score in dice_against_phantom(second[0], again, 7022).values())
    done = jobs(node)
    assert [j["state"] for j in done] == ["succeeded", "succeeded"]
    n = len(series.paths)
    assert done[1]["reason"] == (
        f"{n} image(s) sent again in a later version replaced their earlier copies"
    )
    node.wait_for_log(f"{n} image(s) of version(s) 1 left out")


@pytest.mark.slow
def test_delivery_waits_for_a_stopped_pacs_then_arrives_exactly_once(
    pacs_and_node: tuple[Orthanc, NodeProcess], tmp_path: Path
) -> None:
    orthanc, node = pacs_and_node
    series = phantom_series(tmp_path / "series", seed=7003)
    orthanc.store_to_modality("NODE", [upload_series(orthanc, series)])
    wait_until(
        lambda: bool(node.query("SELECT id FROM series_versions")), timeout_s=60, what="received"
    )
    orthanc.stop()  # the PACS goes down before the SEG is ready

    def failing_attempts() -> bool:
        rows = deliveries(node)
        return (
            bool(rows) and rows[0]["attempts"] >= 2 and rows[0]["state"] in ("pending", "sending")
        )

    wait_until(
        failing_attempts, timeout_s=SEG_TIMEOUT_S, interval_s=0.5, what="failed delivery attempts"
    )
    assert "retry in" in node.log_text()
    orthanc.start()
    wait_for_seg(orthanc, node)
    wait_until(lambda: deliveries(node)[0]["state"] == "delivered", timeout_s=60, what="delivered")
    assert len(seg_instances(orthanc)) == 1


@pytest.mark.slow
def test_kill9_during_inference_then_exactly_one_seg(
    pacs_and_node: tuple[Orthanc, NodeProcess], tmp_path: Path
) -> None:
    orthanc, node = pacs_and_node
    # Finer grid, same field of view: inference takes seconds, a window to kill in.
    series = phantom_series(
        tmp_path / "series", seed=7004, shape=(96, 128, 128), spacing=(1.5, 1.0, 1.0)
    )
    orthanc.store_to_modality("NODE", [upload_series(orthanc, series)])
    wait_until(
        lambda: any(j["state"] == "running" for j in jobs(node)),
        timeout_s=SEG_TIMEOUT_S,
        interval_s=0.05,
        what="a running job",
    )
    node.kill9()
    assert not seg_instances(orthanc)
    node.start()
    wait_for_seg(orthanc, node)
    wait_until(lambda: deliveries(node) and deliveries(node)[0]["state"] == "delivered",
               timeout_s=60, what="delivered")  # fmt: skip
    (job,) = jobs(node)
    assert job["state"] == "succeeded" and job["attempts"] == 2
    assert len(seg_instances(orthanc)) == 1


class BlackHole:
    """A TCP listener that accepts and never answers: a PACS hung mid-association."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(8)
        self.clients: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.sock.accept()
                self.clients.append(client)

    def close(self) -> None:
        # Reset rather than close: a FIN would leave the port in TIME_WAIT and Orthanc,
        # started next on it, could not bind.
        linger = struct.pack("ii", 1, 0)
        for client in self.clients:
            with contextlib.suppress(OSError):
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            client.close()
        with contextlib.suppress(OSError):  # wakes the accept() blocked in the thread
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(timeout=5)


@pytest.mark.slow
def test_kill9_during_sending_then_exactly_one_seg(
    node_factory: Callable[..., NodeProcess],
    orthanc_factory: Callable[..., Orthanc],
    tmp_path: Path,
) -> None:
    node = node_factory(start=False, overrides=pipeline(destinations=["pacs"]))
    orthanc = Orthanc(tmp_path / "orthanc")  # not started: its port is held by a black hole
    configure(node, peers=scanner_and_pacs(orthanc.dicom_port))
    hole = BlackHole(orthanc.dicom_port)
    try:
        node.start()
        series = phantom_series(tmp_path / "series", seed=7005)
        sent = storescu(node.port, [series.paths[0].parent], aet="SCANNER", aec=node.ae_title)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_until(
            lambda: any(d["state"] == "sending" for d in deliveries(node)),
            timeout_s=SEG_TIMEOUT_S,
            interval_s=0.1,
            what="a delivery in the middle of sending",
        )
        node.kill9()
    finally:
        hole.close()
    orthanc.start()
    try:
        node.start()
        wait_for_seg(orthanc, node)
        wait_until(
            lambda: deliveries(node)[0]["state"] == "delivered", timeout_s=60, what="delivered"
        )
        assert len(seg_instances(orthanc)) == 1
        assert "interrupted by a restart are due again" in node.log_text()
    finally:
        orthanc.stop()


@pytest.mark.slow
def test_two_origins_at_once_each_gets_its_own_seg(
    node_factory: Callable[..., NodeProcess],
    orthanc_factory: Callable[..., Orthanc],
    tmp_path: Path,
) -> None:
    node = node_factory(start=False, overrides=pipeline())
    modality = {"NODE": {"AET": node.ae_title, "Host": "127.0.0.1", "Port": node.port}}
    pacs_a = orthanc_factory("a", aet="PACSA", modalities=modality)
    pacs_b = orthanc_factory("b", aet="PACSB", modalities=modality)
    configure(node, peers=[
        {"name": "a", "ae_title": "PACSA", "host": "127.0.0.1", "port": pacs_a.dicom_port},
        {"name": "b", "ae_title": "PACSB", "host": "127.0.0.1", "port": pacs_b.dicom_port},
    ])  # fmt: skip
    node.start()
    series_a = phantom_series(tmp_path / "a", seed=7006)
    series_b = phantom_series(tmp_path / "b", seed=7007)
    study_a, study_b = upload_series(pacs_a, series_a), upload_series(pacs_b, series_b)
    senders = [
        threading.Thread(target=pacs.store_to_modality, args=("NODE", [study]))
        for pacs, study in ((pacs_a, study_a), (pacs_b, study_b))
    ]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(timeout=120)
    seg_a = fetch(pacs_a, wait_for_seg(pacs_a, node), tmp_path / "seg_a.dcm")
    seg_b = fetch(pacs_b, wait_for_seg(pacs_b, node), tmp_path / "seg_b.dcm")
    assert source_series_of(seg_a) == {series_a.uids.series_instance_uid}
    assert source_series_of(seg_b) == {series_b.uids.series_instance_uid}
    assert len(seg_instances(pacs_a)) == 1 and len(seg_instances(pacs_b)) == 1


def test_a_series_that_cannot_be_processed_fails_readably(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = node_factory(overrides=pipeline())
    written = write_mixed_orientation_series(tmp_path / "mixed", lambda p: 100.0 + 0 * p[:, 0])
    sent = storescu(node.port, [written.paths[0].parent])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_until(lambda: any(j["state"] == "failed" for j in jobs(node)), timeout_s=SEG_TIMEOUT_S,
               interval_s=0.5, what="a failed job")  # fmt: skip
    (job,) = jobs(node)
    assert "orientation" in job["reason"], job
    assert job["attempts"] == 1  # a permanent error is not retried
    assert deliveries(node) == []  # nothing is sent
    # The job's line names the series (and the study), not the job id alone.
    failing = [
        line
        for line in node.log_text().splitlines()
        if f"job {job['id']} study " in line and ": failed after" in line
    ]
    assert len(failing) == 1, node.log_text()[-3000:]
    assert f"series {written.uids.series_instance_uid} v1: failed after" in failing[0]
    assert echoscu(node.port).returncode == 0  # and the node keeps serving
    shown = node.cli_json("jobs", "show", str(job["id"]), "--json")
    assert shown["state"] == "failed" and "orientation" in shown["reason"]
    status = node.cli_json("status", "--json")
    assert status["jobs"].get("failed") == 1 and status["last_job_errors"]
    # What an operator reads: the failure with its reason and time, no Python reprs.
    text = node.cli("status").stdout
    assert "jobs:               1 failed" in text, text
    (line,) = [line for line in text.splitlines() if line.startswith(f"  job {job['id']} at ")]
    assert line.endswith(f"UTC: {job['reason']}"), line
    assert "datetime" not in text and "{" not in text, text
    shown_text = node.cli("jobs", "show", str(job["id"])).stdout
    assert f"reason: {job['reason']}" in shown_text, shown_text
    assert re.search(r"^finished_at: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$", shown_text, re.M)
    assert "None" not in shown_text and "[" not in shown_text, shown_text


def test_a_kept_series_is_processed_on_request(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    """A series no rule matched is kept; `series process --rule` has the running node's
    worker segment it."""
    settings = pipeline()
    settings["rules"][0]["match"]["series_description"] = "^not this one$"
    node = node_factory(overrides=settings)
    series = phantom_series(tmp_path / "series", seed=7013)
    uid = series.uids.series_instance_uid
    sent = storescu(node.port, [series.paths[0].parent])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    node.wait_for_log("kept, not processed", timeout_s=SEG_TIMEOUT_S)
    assert jobs(node) == []

    refused = node.cli("series", "process", uid)
    assert refused.returncode != 0 and "no routing rule matches" in refused.stderr, refused
    queued = node.cli_json("series", "process", uid, "--rule", "phantom-mr", "--json")
    assert queued["rule"] == "phantom-mr" and queued["version"] == 1 and not queued["again"]
    wait_until(lambda: [j["state"] for j in jobs(node)] == ["succeeded"],
               timeout_s=SEG_TIMEOUT_S, interval_s=0.5, what="the job to succeed")  # fmt: skip
    (job,) = jobs(node)
    assert job["id"] == queued["job"]
    assert f"job {job['id']} study {series.uids.study_instance_uid} series {uid} v1: " \
        "started (model demo, rule phantom-mr" in node.log_text()  # fmt: skip


@pytest.mark.slow
def test_its_own_seg_forwarded_back_is_kept_not_segmented(
    node_factory: Callable[..., NodeProcess],
    orthanc_factory: Callable[..., Orthanc],
    tmp_path: Path,
) -> None:
    """A PACS that forwards what it receives sends the node its own SEG back. Even under a
    rule matching every series it is stored and kept, never segmented: a SEG of the SEG
    would go to the PACS, and round again."""
    settings = pipeline()
    settings["rules"][0]["match"] = {}  # every series
    orthanc, node = make_pacs_and_node(node_factory, orthanc_factory, settings)
    series = phantom_series(tmp_path / "series", seed=7014)
    orthanc.store_to_modality("NODE", [upload_series(orthanc, series)])
    seg_id = wait_for_seg(orthanc, node)
    seg_series = str(
        pydicom.dcmread(fetch(orthanc, seg_id, tmp_path / "seg.dcm")).SeriesInstanceUID
    )

    orthanc.store_to_modality("NODE", [seg_id])  # the PACS forwards its new object
    node.wait_for_log(
        f"series {seg_series} version 1: kept, not processed: Segmentation Storage objects "
        "are not images a model reads",
        timeout_s=SEG_TIMEOUT_S,
    )
    assert node.series_show(seg_series)["versions"][0]["instances"] == 1  # stored
    assert [j["state"] for j in jobs(node)] == ["succeeded"]  # the phantom's job alone
    assert seg_instances(orthanc) == [seg_id]


def test_unknown_origin_is_an_error_on_the_job(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = node_factory(
        peers=[], overrides={**pipeline(), "node": {"accept_unknown_callers": True}}
    )
    series = phantom_series(tmp_path / "series", seed=7008)
    sent = storescu(node.port, [series.paths[0].parent], aet="STRANGER", aec=node.ae_title)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_until(lambda: any(j["state"] == "failed" for j in jobs(node)), timeout_s=SEG_TIMEOUT_S,
               interval_s=0.5, what="a failed job")  # fmt: skip
    (job,) = jobs(node)
    assert "STRANGER" in job["reason"] and "not a configured peer" in job["reason"]
    assert deliveries(node) == []


@pytest.mark.slow
def test_a_pacs_refusing_label_map_seg_gets_binary(
    node_factory: Callable[..., NodeProcess],
    orthanc_factory: Callable[..., Orthanc],
    tmp_path: Path,
) -> None:
    """Orthanc 1.10 predates Label Map SEG: without UnknownSopClassAccepted it refuses it."""
    settings = pipeline(destinations=["pacs"])
    settings["rules"][0]["profile"] = {"format": "labelmap", "compression": "rle",
                                       "fallback_to_binary": True}  # fmt: skip
    node, orthanc = scanner_node_and_pacs(
        node_factory, orthanc_factory, settings, extra={"UnknownSopClassAccepted": False}
    )
    series = phantom_series(tmp_path / "series", seed=7009)
    sent = storescu(node.port, [series.paths[0].parent], aet="SCANNER", aec=node.ae_title)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    seg_path = fetch(orthanc, wait_for_seg(orthanc, node), tmp_path / "seg.dcm")
    seg = hd.seg.segread(seg_path)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # BINARY Segmentation Storage
    assert seg.SegmentationType == "BINARY"
    scores = dice_against_phantom(seg_path, series, seed=7009)
    assert all(score >= 0.90 for score in scores.values()), scores
    wait_until(lambda: deliveries(node)[0]["state"] == "delivered", timeout_s=30, what="delivered")
    assert "sent the BINARY SEG instead" in deliveries(node)[0]["last_error"]


@pytest.mark.slow
def test_stow_rs_destination_takes_the_label_map(
    node_factory: Callable[..., NodeProcess],
    orthanc_factory: Callable[..., Orthanc],
    tmp_path: Path,
) -> None:
    settings = pipeline(destinations=["web"])
    settings["rules"][0]["profile"] = {"format": "labelmap", "compression": "none"}
    node = node_factory(start=False, overrides=settings)
    orthanc = orthanc_factory(extra={"UnknownSopClassAccepted": False})
    configure(
        node,
        peers=[{"name": "scanner", "ae_title": "SCANNER", "host": "127.0.0.1", "port": 1}],
        dicomweb=[{"name": "web", "url": f"{orthanc.url}/dicom-web"}],
    )
    node.start()
    series = phantom_series(tmp_path / "series", seed=7010)
    sent = storescu(node.port, [series.paths[0].parent], aet="SCANNER", aec=node.ae_title)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    seg_path = fetch(orthanc, wait_for_seg(orthanc, node), tmp_path / "seg.dcm")
    seg = hd.seg.segread(seg_path)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"  # Label Map Segmentation Storage
    scores = dice_against_phantom(seg_path, series, seed=7010)
    assert all(score >= 0.90 for score in scores.values()), scores


@pytest.mark.slow
def test_a_job_over_its_time_limit_is_stopped_and_failed(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    settings = pipeline()
    settings["workers"]["job_timeout_s"] = 1
    node = node_factory(overrides=settings)
    series = phantom_series(
        tmp_path / "series", seed=7011, shape=(96, 128, 128), spacing=(1.5, 1.0, 1.0)
    )
    sent = storescu(node.port, [series.paths[0].parent])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_until(lambda: any(j["state"] == "failed" for j in jobs(node)), timeout_s=SEG_TIMEOUT_S,
               interval_s=0.5, what="a failed job")  # fmt: skip
    (job,) = jobs(node)
    assert "timed out after 1 s" in job["reason"]
    assert "exceeded workers.job_timeout_s" in node.log_text()
    assert echoscu(node.port).returncode == 0  # a fresh worker took the dead one's place
    wait_until(
        lambda: len(re.findall(r"worker \S+ ready", node.log_text())) >= 2,
        timeout_s=120,
        what="a new worker",
    )


@pytest.mark.slow
def test_a_job_whose_worker_process_dies_fails_with_the_exit_code(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    """As the kernel's out-of-memory killer would: the job is failed with the cause (after
    workers.max_attempts deaths), not run again for ever ahead of every newer job."""
    settings = pipeline()
    settings["workers"]["max_attempts"] = 1
    node = node_factory(overrides=settings)
    series = phantom_series(
        tmp_path / "series", seed=7012, shape=(96, 128, 128), spacing=(1.5, 1.0, 1.0)
    )
    sent = storescu(node.port, [series.paths[0].parent])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    (running,) = wait_until(
        lambda: node.query("SELECT id, worker FROM jobs WHERE state = 'running'"),
        timeout_s=SEG_TIMEOUT_S,
        interval_s=0.2,
        what="a running job",
    )
    # host:pid, or host:pid/<namespace token>
    os.kill(int(running["worker"].partition("/")[0].rpartition(":")[2]), signal.SIGKILL)
    wait_until(lambda: any(j["state"] == "failed" for j in jobs(node)), timeout_s=60,
               interval_s=0.5, what="the job failed")  # fmt: skip
    (job,) = jobs(node)
    assert job["reason"] == "its worker process died (exit code -9) while running it", job
    node.wait_for_log(": worker worker-1 died (exit code -9) while running it")
    died = next(line for line in node.log_text().splitlines() if "worker-1 died" in line)
    assert f"job {running['id']} study " in died and " series " in died  # named in full


@pytest.mark.slow
@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks a machine without the configured CUDA device"
)
def test_a_worker_without_its_configured_device_leaves_jobs_queued(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    """A GPU driver broken by an update: each job used to fail for good at model load, to be
    retried one by one. The worker says why it cannot start; the jobs wait."""
    settings = pipeline()
    settings["inference"]["device"] = "cuda"
    node = node_factory(overrides=settings)
    series = phantom_series(tmp_path / "series", seed=7013)
    sent = storescu(node.port, [series.paths[0].parent])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    node.wait_for_log(
        "cannot run jobs: inference.device is 'cuda' but no CUDA device is available; use "
        "'auto'; they wait in the queue"
    )
    node.wait_for_log("worker worker-1 exited (code 3) 2 times in a row within 60 s of starting")
    wait_until(lambda: bool(jobs(node)), timeout_s=60, what="a queued job")
    time.sleep(2)  # a worker that could claim it would have
    assert [job["state"] for job in jobs(node)] == ["queued"]
    assert "ready (inference on" not in node.log_text()
    assert echoscu(node.port).returncode == 0  # receiving goes on
    status = node.cli_json("status", "--json")  # what monitoring alerts on
    assert status["queue_depth"] == 1 and status["oldest_waiting_job_s"] >= 2


@pytest.mark.slow
def test_an_extra_worker_process_runs_the_jobs(
    node_factory: Callable[..., NodeProcess],
    orthanc_factory: Callable[..., Orthanc],
    tmp_path: Path,
) -> None:
    """`serve` with no workers of its own; `dicom-node worker` on the same index and store."""
    import subprocess

    from peers import DICOM_NODE

    settings = pipeline(destinations=["pacs"])
    settings["workers"]["processes"] = 0
    node, orthanc = scanner_node_and_pacs(node_factory, orthanc_factory, settings)
    series = phantom_series(tmp_path / "series", seed=7012)
    sent = storescu(node.port, [series.paths[0].parent], aet="SCANNER", aec=node.ae_title)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_until(lambda: bool(jobs(node)), timeout_s=60, what="a queued job")
    assert jobs(node)[0]["state"] == "queued"
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen(
            [str(DICOM_NODE), "-c", str(node.config_path), "worker", "--processes", "1"],
            cwd=node.workdir, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        fetch(orthanc, wait_for_seg(orthanc, node), tmp_path / "seg.dcm")
        assert jobs(node)[0]["state"] == "succeeded"
    finally:
        worker.terminate()
        assert worker.wait(timeout=60) == 0
