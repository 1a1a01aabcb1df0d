"""Shared end-to-end helpers: phantom series, a node with the job pipeline, Orthanc as PACS."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import yaml
from dicom_phantoms import WrittenSeries, write_series
from peers import DICOM_NODE, NodeProcess, Orthanc, wait_until

from dicom_node.volume import volume_from_series
from inference.catalogue import load_catalogue
from inference.demo.phantoms import PhantomSpec, sample_phantom

STRUCTURES = ("liver", "spleen", "kidney_left", "kidney_right")
SEG_TIMEOUT_S = 240.0


# -- helpers -----------------------------------------------------------------------------------


def phantom_series(
    folder: Path, seed: int, *, shape: tuple[int, int, int] = (48, 64, 64),
    spacing: tuple[float, float, float] = (3.0, 2.0, 2.0), description: str = "phantom vibe",
) -> WrittenSeries:  # fmt: skip
    """A phantom on the demo model's training field of view, written as an axial MR series."""
    spec = PhantomSpec.from_seed(seed)
    written = write_series(
        folder,
        lambda points: sample_phantom(spec, points)[0],
        orientation="axial",
        shape=shape,
        spacing=spacing,
        seed=seed,
    )
    for path in written.paths:  # a description the routing rules can match on
        from pydicom import dcmread

        ds = dcmread(path)
        ds.SeriesDescription = description
        ds.save_as(path)
    return written


def offline_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`dicom-node ARGS` as a one-off command (no node running) on a data dir in tmp_path."""
    config = tmp_path / "config.yaml"
    config.write_text(
        f"storage:\n  data_dir: {tmp_path / 'var'}\ninference:\n  device: cpu\n  cpu_threads: 1\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run(
        [str(DICOM_NODE), "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def segment_json(
    series: Path, model: str, out: Path, tmp_path: Path, *extra: str
) -> dict[str, Any]:
    """`dicom-node segment SERIES --model MODEL --out OUT [EXTRA] --json`, which must
    succeed; its report."""
    args = ["segment", str(series), "--model", model, "--out", str(out), *extra, "--json"]
    completed = offline_cli(args, tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report: dict[str, Any] = json.loads(completed.stdout)
    return report


def dice_against_phantom(seg_path: Path, series: WrittenSeries, seed: int) -> dict[str, float]:
    """Decode the SEG with highdicom on the source grid and score it against the truth."""
    volume = volume_from_series(series.paths)
    seg = hd.seg.segread(seg_path)
    numbers = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[f.sop_instance_uid for f in volume.frames],
        combine_segments=True,
        relabel=False,
    )
    ids = {label.name: label.id for label in load_catalogue("demo").labels}
    predicted = np.zeros(pixels.shape, dtype=np.uint8)
    for number, name in numbers.items():
        if number:  # LABELMAP has a segment 0, "Background"
            predicted[pixels == number] = ids[name]
    z, y, x = np.meshgrid(*(np.arange(n) for n in volume.array.shape), indexing="ij")
    index = np.stack([x.ravel(), y.ravel(), z.ravel(), np.ones(x.size)], axis=1)
    points = (index @ volume.affine.T)[:, :3]
    truth = sample_phantom(PhantomSpec.from_seed(seed), points, noise=False)[1].reshape(
        pixels.shape
    )
    scores = {}
    for name in STRUCTURES:
        a, b = predicted == ids[name], truth == ids[name]
        scores[name] = float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))
    return scores


def seg_instances(orthanc: Orthanc) -> list[str]:
    series = orthanc.post_json("/tools/find", {"Level": "Series", "Query": {"Modality": "SEG"}})
    found: list[str] = []
    for series_id in series:
        found += [i["ID"] for i in orthanc.get_json(f"/series/{series_id}/instances")]
    return found


def wait_for_seg(orthanc: Orthanc, node: NodeProcess, timeout_s: float = SEG_TIMEOUT_S) -> str:
    def arrived() -> bool:
        if not node.running():
            raise RuntimeError(f"the node died:\n{node.log_text()[-4000:]}")
        return bool(seg_instances(orthanc))

    try:
        wait_until(arrived, timeout_s=timeout_s, interval_s=1.0, what="a SEG in Orthanc")
    except Exception:
        print(node.log_text()[-6000:])
        raise
    return seg_instances(orthanc)[0]


def fetch(orthanc: Orthanc, instance_id: str, target: Path) -> Path:
    target.write_bytes(orthanc.get_file(instance_id))
    return target


def configure(node: NodeProcess, **sections: Any) -> None:
    """Replace config sections of a node that is not running yet."""
    node.config.update(sections)
    node.config_path.write_text(yaml.safe_dump(node.config, sort_keys=False))


def pipeline(
    extra_rules: list[dict[str, Any]] | None = None, destinations: list[str] | None = None
) -> dict[str, Any]:
    return {
        "workers": {
            "processes": 1,
            "heartbeat_timeout_s": 10,
            "retry_delay_s": 1,
            "poll_interval_s": 0.3,
        },
        "inference": {"device": "cpu", "cpu_threads": 1},
        "outbox": {"backoff_initial_s": 1, "backoff_max_s": 2, "max_attempts": 50,
                   "poll_interval_s": 0.3, "lease_s": 300},
        "rules": (extra_rules or [])
        + [{"name": "phantom-mr", "match": {"modality": ["MR"]}, "model": "demo",
            "destinations": destinations or ["origin"]}],
    }  # fmt: skip


def scanner_and_pacs(pacs_port: int) -> list[dict[str, Any]]:
    """storescu as scanner SCANNER (it cannot receive), Orthanc as peer `pacs`."""
    return [
        {"name": "scanner", "ae_title": "SCANNER", "host": "127.0.0.1", "port": 1},
        {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port},
    ]


def scanner_node_and_pacs(
    node_factory: Callable[..., NodeProcess],
    orthanc_factory: Callable[..., Orthanc],
    settings: dict[str, Any] | None = None,
    **orthanc_options: Any,
) -> tuple[NodeProcess, Orthanc]:
    """A started node that takes series from storescu (AE SCANNER) and sends its SEGs to a
    started Orthanc (peer `pacs`); ``settings`` default to ``pipeline(destinations=["pacs"])``."""
    node = node_factory(start=False, overrides=settings or pipeline(destinations=["pacs"]))
    orthanc = orthanc_factory(**orthanc_options)
    configure(node, peers=scanner_and_pacs(orthanc.dicom_port))
    node.start()
    return node, orthanc


def upload_series(orthanc: Orthanc, series: WrittenSeries) -> str:
    ids = [orthanc.upload(path) for path in series.paths]
    return str(orthanc.get_json(f"/instances/{ids[0]}/study")["ID"])


def jobs(node: NodeProcess) -> list[dict[str, Any]]:
    return [dict(r) for r in node.query("SELECT id, state, reason, attempts FROM jobs ORDER BY id")]


def deliveries(node: NodeProcess) -> list[dict[str, Any]]:
    return [dict(r) for r in node.query("SELECT id, state, attempts, last_error FROM deliveries")]


def source_series_of(seg_path: Path) -> set[str]:
    seg = hd.seg.segread(seg_path)
    return {str(item.SeriesInstanceUID) for item in seg.ReferencedSeriesSequence}


def referenced_instances(seg_path: Path) -> set[str]:
    seg = hd.seg.segread(seg_path)
    return {
        str(instance.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for instance in series.ReferencedInstanceSequence
    }


def make_pacs_and_node(
    node_factory: Callable[..., NodeProcess],
    orthanc_factory: Callable[..., Orthanc],
    settings: dict[str, Any] | None = None,
) -> tuple[Orthanc, NodeProcess]:
    """Orthanc (AET ORTHANC) knows the node as modality NODE; the node knows Orthanc as peer
    `pacs` and, with ``settings`` defaulting to ``pipeline()``, segments every MR series with
    the demo model, returning it to its origin."""
    node = node_factory(start=False, overrides=settings or pipeline())
    orthanc = orthanc_factory(
        modalities={"NODE": {"AET": node.ae_title, "Host": "127.0.0.1", "Port": node.port}}
    )
    configure(node, peers=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                            "port": orthanc.dicom_port}])  # fmt: skip
    node.start()
    return orthanc, node
