"""Every segment of every shipped catalogue, as PACS and viewers meet it.

For each catalogue a label map holding every label (one small block each) is encoded as a
BINARY and a LABELMAP SEG; dciodvfy checks the SEG, dcmqi reads it back (segment metadata and
voxels), and the catalogue's codes are compared with the published models' codes in
``../shared/reference``.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.sr.codedict import codes
from seg_fixtures import WEIGHTS_SHA256, mr_series, write_series
from test_seg_encode import _segimage2itkimage
from validators import dcentvfy, dciodvfy

from dicom_node.seg_encode import SegFormat, encode_seg, segment_mapping
from dicom_node.seg_write import seg_to_bytes
from inference.catalogue import Catalogue, Code, load_catalogue

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
SHIPPED = ["demo", "total", "total_mr", "vibe"]
SHAPE = (4, 32, 32)
CELL = 4  # each label: a 3x3 block in a 4x4 cell of one slice
# dciodvfy (2022) predates the Label Map SEG IOD: on a LABELMAP SEG it reports these two and
# checks nothing else (PEERS.md); the LABELMAP's segments are checked against the BINARY's.
LABELMAP_FALSE_POSITIVES = (
    "Error - Information Object Not found",
    "Error - SegmentNumber not monotonically increasing from one by one - have SegmentSequence "
    "item number 1 (from one) with SegmentNumber of 0",
)
# CID 7150 is baseline. Its "Anatomical Structure" is SCT 91723000 in pydicom's tables;
# TotalSegmentator's csv (and dcmqi) use 123037004 with that meaning.
CATEGORIES = {getattr(codes.cid7150, k).value for k in codes.cid7150.dir()} | {"123037004"}
CODE_FIELDS = {
    "category": "SegmentedPropertyCategoryCodeSequence",
    "type": "SegmentedPropertyTypeCodeSequence",
    "modifier": "SegmentedPropertyTypeModifierCodeSequence",
    "anatomic_region": "AnatomicRegionSequence",
    "anatomic_region_modifier": "AnatomicRegionModifierSequence",
}


def _every_label(catalogue: Catalogue) -> np.ndarray:
    """One 3x3 block per label, spread over all slices so no frame of the SEG is empty."""
    nz, ny, nx = SHAPE
    per_row = nx // CELL
    assert len(catalogue.labels) <= nz * per_row * (ny // CELL)
    dtype = np.uint8 if catalogue.max_id <= 255 else np.uint16
    label_map = np.zeros(SHAPE, dtype=dtype)
    for k, label in enumerate(catalogue.labels):
        cell = k // nz
        y, x = (cell // per_row) * CELL, (cell % per_row) * CELL
        label_map[k % nz, y : y + CELL - 1, x : x + CELL - 1] = label.id
    return label_map


@pytest.fixture(scope="module")
def series() -> list[Dataset]:
    return mr_series(*SHAPE)


@pytest.fixture(scope="module")
def series_dir(series: list[Dataset], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(series, tmp_path_factory.mktemp("catalogue_series"))


def _encode(catalogue: Catalogue, series: list[Dataset], fmt: SegFormat, path: Path) -> Dataset:
    seg = encode_seg(
        _every_label(catalogue),
        series,
        catalogue,
        model_name=catalogue.name,
        model_version="2.0",
        weights_sha256=WEIGHTS_SHA256,
        format=fmt,
    )
    path.write_bytes(seg_to_bytes(seg))
    return seg


def _labelmap_dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools)")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, timeout=300)
    output = (run.stdout + run.stderr).decode("utf-8", errors="replace")
    lines = output.splitlines()
    return [
        line
        for line in lines
        if line.startswith(("Error", "Abort")) and line not in LABELMAP_FALSE_POSITIVES
    ]


def _coded(item: Dataset) -> tuple[str, str, str]:
    return (str(item.CodingSchemeDesignator), str(item.CodeValue), str(item.CodeMeaning))


def _check_segment_text(segment: Dataset) -> None:
    """What dciodvfy 2022 does not check: the category's CID, and text a viewer shows."""
    label = str(segment.SegmentLabel)
    assert 0 < len(label) <= 64 and all(" " <= ch <= "~" and ch != "\\" for ch in label), label
    category = segment.SegmentedPropertyCategoryCodeSequence
    assert len(category) == 1 and category[0].CodeValue in CATEGORIES, label
    items = [category[0], *segment.SegmentedPropertyTypeCodeSequence]
    items += segment.SegmentedPropertyTypeCodeSequence[0].get(
        "SegmentedPropertyTypeModifierCodeSequence", []
    )
    for region in segment.get("AnatomicRegionSequence", []):
        items += [region, *region.get("AnatomicRegionModifierSequence", [])]
    for item in items:
        scheme, value, meaning = _coded(item)
        assert scheme == "SCT" and value.isdigit(), (label, value)
        assert 0 < len(meaning) <= 64 and "\\" not in meaning, (label, meaning)
    lab = [int(v) for v in segment.RecommendedDisplayCIELabValue]
    assert len(lab) == 3 and all(0 <= v <= 0xFFFF for v in lab), (label, lab)


def _described(segment: Dataset) -> dict[str, object]:
    """A SEG segment item in the shape of dcmqi's meta.json segment attributes."""
    out: dict[str, object] = {"SegmentLabel": str(segment.SegmentLabel)}
    type_item = segment.SegmentedPropertyTypeCodeSequence[0]
    items = {
        "category": segment.SegmentedPropertyCategoryCodeSequence[0],
        "type": type_item,
        "modifier": (type_item.get("SegmentedPropertyTypeModifierCodeSequence") or [None])[0],
        "anatomic_region": (segment.get("AnatomicRegionSequence") or [None])[0],
    }
    region = items["anatomic_region"]
    if region is not None:
        items["anatomic_region_modifier"] = (
            region.get("AnatomicRegionModifierSequence") or [None]
        )[0]
    for field, item in items.items():
        if item is not None:
            out[CODE_FIELDS[field]] = _coded(item)
    return out


def _expected(catalogue: Catalogue) -> dict[int, dict[str, object]]:
    """Segment number -> what dcmqi should report for it, from the catalogue."""
    numbers = segment_mapping(_every_label(catalogue), catalogue)
    expected: dict[int, dict[str, object]] = {}
    for label in catalogue.labels:
        described: dict[str, object] = {"SegmentLabel": label.name}
        for field, keyword in CODE_FIELDS.items():
            code: Code | None = getattr(label, field)
            if code is not None:
                described[keyword] = (code.scheme, code.code, code.meaning)
        expected[numbers[label.id]] = described
    return expected


def _dcmqi_read(path: Path, out: Path) -> tuple[dict[int, dict[str, object]], np.ndarray]:
    """dcmqi's segment attributes by segment number, and the voxels as segment numbers."""
    sitk = pytest.importorskip("SimpleITK")
    out.mkdir()
    run = subprocess.run(
        [_segimage2itkimage(), "--inputDICOM", str(path), "--outputDirectory", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    meta = json.loads((out / "meta.json").read_text())
    read: dict[int, dict[str, object]] = {}
    voxels = np.zeros(SHAPE, dtype=np.uint16)
    for index, group in enumerate(meta["segmentAttributes"], start=1):
        # One file per group: per segment for BINARY, one for all segments for LABELMAP.
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{index}.nrrd")))
        assert array.shape == SHAPE, array.shape
        for attrs in group:
            number = int(attrs["labelID"])
            # Not its recommendedDisplayRGBValue: dcmqi 1.5's CIELab -> RGB is off for a few
            # dark or saturated colours (stored (162, 0, 0) reads (160, 3, 39)) while the stored
            # CIELab is right (test_display_colours_are_the_catalogues).
            described: dict[str, object] = {"SegmentLabel": attrs["SegmentLabel"]}
            for keyword in CODE_FIELDS.values():
                if keyword in attrs:
                    item = attrs[keyword]
                    described[keyword] = (
                        item["CodingSchemeDesignator"],
                        item["CodeValue"],
                        item["CodeMeaning"],
                    )
            read[number] = described
            inside = array == number if len(group) > 1 else array > 0
            assert not voxels[inside].any(), f"segment {number} overlaps another"
            voxels[inside] = number
    return read, voxels


@pytest.mark.peers
@pytest.mark.parametrize("name", SHIPPED)
def test_every_segment_validates_and_reads_back(
    tmp_path: Path, series: list[Dataset], series_dir: list[Path], name: str
) -> None:
    catalogue = load_catalogue(name)
    binary_path, labelmap_path = tmp_path / "binary.dcm", tmp_path / "labelmap.dcm"
    binary = _encode(catalogue, series, SegFormat.BINARY, binary_path)
    labelmap = _encode(catalogue, series, SegFormat.LABELMAP, labelmap_path)

    # 1. dciodvfy checks the BINARY SEG; the LABELMAP's segments 1..N are the same items.
    assert len(binary.SegmentSequence) == len(catalogue.labels)
    dciodvfy(binary_path)
    dcentvfy(binary_path, series_dir)
    assert _labelmap_dciodvfy_errors(labelmap_path) == []
    labelmap_segments = [s for s in labelmap.SegmentSequence if s.SegmentNumber != 0]
    assert [_described(s) for s in labelmap_segments] == [
        _described(s) for s in binary.SegmentSequence
    ]
    for segment in binary.SegmentSequence:
        _check_segment_text(segment)

    # 2. dcmqi reads both back: same labels, codes and colours, same voxels.
    expected = _expected(catalogue)
    numbers = segment_mapping(_every_label(catalogue), catalogue)
    lut = np.zeros(catalogue.max_id + 1, dtype=np.uint16)
    for label_id, number in numbers.items():
        lut[label_id] = number
    expected_voxels = lut[_every_label(catalogue)]
    for fmt, path in (("binary", binary_path), ("labelmap", labelmap_path)):
        read, voxels = _dcmqi_read(path, tmp_path / f"dcmqi-{fmt}")
        assert read == expected, fmt
        np.testing.assert_array_equal(voxels, expected_voxels, err_msg=fmt)


def _cielab(rgb: list[int]) -> np.ndarray:
    """sRGB -> CIELab (D65), as PS3.3 C.10.7.1.1 and dcmqi take it, written out here rather
    than with highdicom's converter, which the encoder uses."""
    c = np.asarray(rgb, dtype=float) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array(
        [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]
    )
    t = to_xyz @ linear / np.array([0.95047, 1.0, 1.08883])
    d = 6 / 29
    fx, fy, fz = np.where(t > d**3, np.cbrt(t), t / (3 * d * d) + 4 / 29)
    return np.array([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)])


@pytest.mark.parametrize("name", SHIPPED)
def test_display_colours_are_the_catalogues(series: list[Dataset], name: str) -> None:
    catalogue = load_catalogue(name)
    numbers = segment_mapping(_every_label(catalogue), catalogue)
    for fmt in SegFormat:
        seg = encode_seg(
            _every_label(catalogue),
            series,
            catalogue,
            model_name=name,
            model_version="2.0",
            weights_sha256=WEIGHTS_SHA256,
            format=fmt,
        )
        by_number = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
        for label in catalogue.labels:
            stored = [int(v) for v in by_number[numbers[label.id]].RecommendedDisplayCIELabValue]
            # PS3.3 C.10.7.1.1: L* 0..100 and a*, b* -128..127 scaled to 0..0xFFFF.
            lab = np.array(
                [
                    stored[0] * 100 / 0xFFFF,
                    stored[1] * 255 / 0xFFFF - 128,
                    stored[2] * 255 / 0xFFFF - 128,
                ]
            )
            assert np.abs(lab - _cielab(label.color)).max() < 0.1, (name, fmt, label.name, lab)


def _reference_rows() -> dict[str, dict[str, str]]:
    with (REFERENCE / "totalsegmentator_snomed_mapping.csv").open(newline="") as f:
        return {row["Structure"]: row for row in csv.DictReader(f)}


@pytest.mark.skipif(
    not REFERENCE.is_dir(), reason=f"reference files absent ({REFERENCE}); codes not compared"
)
@pytest.mark.parametrize("name", SHIPPED)
def test_codes_agree_with_the_reference_or_say_why(name: str) -> None:
    """Each label's codes and colour are its reference row's, or its code_note says why not."""
    rows = _reference_rows()
    unexplained: list[tuple[object, ...]] = []
    for label in load_catalogue(name).labels:
        row = rows.get(label.name)
        if row is None:
            if not label.code_note:
                unexplained.append((label.name, "no reference row"))
            continue
        for field, prefix in CODE_FIELDS.items():
            code: Code | None = getattr(label, field)
            ours = ("", "", "") if code is None else (code.scheme, code.code, code.meaning)
            theirs = tuple(
                row[f"{prefix}.{part}"]
                for part in ("CodingSchemeDesignator", "CodeValue", "CodeMeaning")
            )
            if ours != theirs and not label.code_note:
                unexplained.append((label.name, field, ours, theirs))
        colour = [int(c) for c in row["DicomRGBColor"].split(",")]
        if colour != list(label.color) and not label.code_note:
            unexplained.append((label.name, "color", label.color, colour))
    assert unexplained == []
