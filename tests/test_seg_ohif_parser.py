"""Our SEGs through OHIF's own parser (@cornerstonejs/adapters), run under node without a browser.

``tests/js/parse_seg.mjs`` calls ``adaptersSEG.Cornerstone3D.Segmentation.
createFromDICOMSegBuffer``, the function OHIF's SEG extension uses, and prints per segment the
label, colour and voxel count a viewer would overlay. The pinned npm packages are installed once
per session with ``npm ci`` into ``tests/js/node_modules`` (ignored by git).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dicom_phantoms import write_stacked_series
from pydicom import Dataset
from seg_fixtures import (
    CATALOGUE,
    PRESENT_IDS,
    WEIGHTS_SHA256,
    mr_series,
    small_label_map,
    write_series,
)

from dicom_node.seg_encode import encode_seg
from dicom_node.volume import StackChoice, volume_from_folder

JS_DIR = Path(__file__).resolve().parent / "js"

pytestmark = pytest.mark.peers


@pytest.fixture(scope="session")
def js_parser() -> Path:
    """tests/js with its node_modules installed from package-lock.json."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        pytest.skip("node/npm not installed: cannot run OHIF's SEG parser")
    installed = JS_DIR / "node_modules" / ".package-lock.json"
    lock = JS_DIR / "package-lock.json"
    # npm ci wipes and reinstalls (~10 s, network); do it only when the lock file changed.
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        run = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=JS_DIR,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if run.returncode != 0:
            pytest.skip(f"npm ci failed (offline registry?): {run.stderr.strip()[-500:]}")
    # Loading the parser says nothing about a SEG, only about this Node.js: older ones
    # (18, 20.0-20.18, 22.0-22.11 tried) cannot import dcmjs's CommonJS exports from it.
    probe = subprocess.run(
        [node, "--input-type=module", "-e", "await import('@cornerstonejs/adapters')"],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode != 0:
        version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout
        errors = [line for line in probe.stderr.splitlines() if "Error" in line]
        pytest.skip(
            f"Node.js {version.strip()} cannot load OHIF's SEG parser (it needs 20.19+ or "
            f"22.12+): {(errors or [probe.stderr.strip()])[-1][:300]}"
        )
    return JS_DIR / "parse_seg.mjs"


@pytest.fixture(scope="module")
def series() -> list[Dataset]:
    return mr_series()


@pytest.fixture(scope="module")
def series_files(tmp_path_factory: pytest.TempPathFactory, series: list[Dataset]) -> list[Path]:
    return write_series(series, tmp_path_factory.mktemp("source"))


def _parse(script: Path, seg_path: Path, sources: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["node", str(script), str(seg_path), *map(str, sources)],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _write_seg(tmp_path: Path, series: list[Dataset], fmt: str, comp: str) -> Path:
    seg = encode_seg(
        small_label_map(),
        series,
        CATALOGUE,
        model_name="demo",
        model_version="1.0",
        weights_sha256=WEIGHTS_SHA256,
        format=fmt,
        compression=comp,
    )
    path = tmp_path / f"{fmt}-{comp}.dcm"
    seg.save_as(path)
    return path


@pytest.mark.parametrize(
    ("fmt", "comp"),
    [("binary", "none"), ("labelmap", "none"), ("labelmap", "rle")],
)
def test_ohif_parser_sees_our_labels_colours_and_voxels(
    tmp_path: Path,
    js_parser: Path,
    series: list[Dataset],
    series_files: list[Path],
    fmt: str,
    comp: str,
) -> None:
    path = _write_seg(tmp_path, series, fmt, comp)
    run = _parse(js_parser, path, series_files)
    assert run.returncode == 0, run.stderr
    result: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    segments = result["segments"]
    if fmt == "labelmap":
        # highdicom's segment 0 describes the background; OHIF lists it with no voxels.
        background = segments.pop(0)
        assert (background["segmentNumber"], background["label"], background["voxels"]) == (
            0,
            "Background",
            0,
        )
    labels = {label.id: label for label in CATALOGUE.labels}
    label_map = small_label_map()
    expected = [
        {
            "segmentNumber": number,
            "label": labels[label_id].name,
            "rgb": list(labels[label_id].color),
            "voxels": int(np.count_nonzero(label_map == label_id)),
        }
        for number, label_id in enumerate(PRESENT_IDS, start=1)
    ]
    seen = [
        {key: segment[key] for key in ("segmentNumber", "label", "rgb", "voxels")}
        for segment in segments
    ]
    assert seen == expected
    assert result["overlappingSegments"] is False


@pytest.mark.parametrize("fmt", ["binary", "labelmap"])
def test_ohif_parser_puts_a_one_stack_seg_on_that_stack(
    tmp_path: Path, js_parser: Path, fmt: str
) -> None:
    """A two-echo series: the SEG of echo 2 is given to the parser with every image of the
    series (as a viewer holding the whole series would); its voxels land once, not on both
    echoes at the same positions."""
    stacks = write_stacked_series(
        tmp_path / "series",
        [lambda p: 100.0 + 0 * p[:, 0], lambda p: 200.0 + 0 * p[:, 0]],
        attributes=[{"EchoNumbers": 1}, {"EchoNumbers": 2}],
        shape=(8, 32, 32),
    )
    volume = volume_from_folder(tmp_path / "series", stack=StackChoice(order="last"))
    by_uid = {str(ds.SOPInstanceUID): ds for ds in volume.source_datasets}
    label_map = small_label_map()
    seg = encode_seg(
        label_map,
        [by_uid[ref.sop_instance_uid] for ref in volume.frames],
        CATALOGUE,
        model_name="demo",
        model_version="1.0",
        weights_sha256=WEIGHTS_SHA256,
        format=fmt,
    )
    seg_path = tmp_path / "seg.dcm"
    seg.save_as(seg_path)
    assert {ref.sop_instance_uid for ref in volume.frames} == set(stacks[1].sop_instance_uids)
    run = _parse(js_parser, seg_path, sorted((tmp_path / "series").iterdir()))
    assert run.returncode == 0, run.stderr
    segments = json.loads(run.stdout.strip().splitlines()[-1])["segments"]
    seen = {seg["label"]: seg["voxels"] for seg in segments if seg["label"] != "Background"}
    labels = {label.id: label.name for label in CATALOGUE.labels}
    assert seen == {labels[i]: int(np.count_nonzero(label_map == i)) for i in PRESENT_IDS}


@pytest.mark.parametrize(("fmt", "comp"), [("labelmap", "jpegls"), ("binary", "jpeg2000")])
def test_buffer_parser_cannot_decode_jpegls_or_jpeg2000(
    tmp_path: Path,
    js_parser: Path,
    series: list[Dataset],
    series_files: list[Path],
    fmt: str,
    comp: str,
) -> None:
    """Documents a limit of the buffer entry point (adapters 5.14): native and RLE only.

    In the browser OHIF decodes SEG frames through its image loader, which has the JPEG-LS and
    JPEG 2000 codecs; this entry point has none. RLE is therefore our LABELMAP compression of
    choice. If this starts failing, the adapter learnt to decode them: update
    docs/seg_output.md.
    """
    path = _write_seg(tmp_path, series, fmt, comp)
    run = _parse(js_parser, path, series_files)
    assert run.returncode != 0
    assert "cannot be converted" in run.stderr
