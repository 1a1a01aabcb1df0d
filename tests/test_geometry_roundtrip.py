"""Geometry is exact end to end: phantom -> DICOM series -> demo model -> SEG -> patient space.

One physical phantom (defined in LPS mm) is written as DICOM series on many grids: axial,
sagittal, coronal and double-oblique planes, both slice orders, patients lying HFS, FFS, HFP
and FFP, single-frame and enhanced multi-frame (frames stored out of order). Each series is
segmented by the built-in demo model (``segment_series`` in-process; one case through the real
``dicom-node segment`` command), and the SEG is read back three independent ways
(``tests/seg_truth.py``): highdicom by source reference, highdicom by plane position, and dcmqi's
``segimage2itkimage`` (NIfTI, RAS affines converted to LPS). The three must agree voxel for voxel
on the source grid, and each structure must match the phantom truth sampled at the same voxel
centres: Dice >= 0.90 and a centroid error below one voxel along every index axis of the grid.

A flipped, transposed or slice-shifted label map, or frames of an enhanced image put back in
the wrong order, fails these bars (``test_the_bars_catch_a_flip_and_a_one_slice_shift``);
model quality alone does not (the axial, training-like case scores Dice >= 0.96).

Every grid covers the training field of view (144 x 128 x 128 mm, S x P x L, around the origin)
at the training resolution, so the model sees in-distribution data whatever the orientation.
The phantom is a held-out one (training used seeds 0..43).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pydicom
import pytest
import seg_truth as st
import torch
from dicom_phantoms import (
    SeriesUids,
    WrittenSeries,
    orientation_cosines,
    write_series,
    write_stacked_series,
)
from e2e import offline_cli, segment_json
from validators import assert_valid_binary_seg

from dicom_node.config import InferenceSettings
from dicom_node.errors import ModelError
from dicom_node.segment import ModelCache, segment_series
from dicom_node.volume import StackChoice, Volume, volume_from_series
from inference.catalogue import Catalogue
from inference.demo.phantoms import PhantomSpec, default_origin, sample_phantom
from inference.demo.phantoms import grid_points as phantom_grid_points
from inference.model_store import BUILTIN_MODELS, ModelInfo
from inference.predictor import Segmenter

SEED = 10_021
MIN_DICE = 0.90
# (shape, spacing) in (slices, rows, columns) order giving the training field of view.
AXIAL_GRID = ((48, 64, 64), (3.0, 2.0, 2.0))  # slices along S, rows P, columns L
# Sagittal: slices along L, rows along S, columns along P; coronal: slices P, rows S, columns L.
SIDE_GRID = ((64, 48, 64), (2.0, 3.0, 2.0))

CASES: list[dict[str, Any]] = [
    {"orientation": "axial"},
    {"orientation": "sagittal"},
    {"orientation": "coronal"},
    {"orientation": "oblique20"},
    {"orientation": "axial", "reverse_order": True},
    {"orientation": "axial", "patient_position": "FFS"},
    {"orientation": "axial", "patient_position": "HFP"},
    {"orientation": "axial", "enhanced": True},
    {"orientation": "axial", "enhanced": True, "reverse_order": True, "patient_position": "FFS"},
    {"orientation": "sagittal", "enhanced": True, "patient_position": "HFP"},
    {"orientation": "coronal", "reverse_order": True, "patient_position": "FFS"},
    {"orientation": "oblique20", "enhanced": True, "reverse_order": True},
    # The LABELMAP SEG IOD round-trips too.
    {"orientation": "sagittal", "reverse_order": True, "format": "labelmap"},
]


def _case_id(case: dict[str, Any]) -> str:
    parts = [case["orientation"], case.get("patient_position", "HFS")]
    parts.append("enhanced" if case.get("enhanced") else "single")
    if case.get("per_frame_geometry"):
        parts.append("per-frame-geometry")
    if case.get("reverse_order"):
        parts.append("reversed")
    if "format" in case:
        parts.append(case["format"])
    return "-".join(parts)


@pytest.fixture(scope="module")
def spec() -> PhantomSpec:
    return PhantomSpec.from_seed(SEED)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModelInfo, Segmenter]]:
    """The demo model, loaded once for the module, on one CPU thread (the machine is shared)."""
    if not (BUILTIN_MODELS["demo"] / "model.yaml").is_file():
        pytest.skip("the demo model (inference/demo_model) is not in this checkout")
    threads = torch.get_num_threads()
    settings = InferenceSettings(device="cpu", cpu_threads=1)
    yield ModelCache(tmp_path_factory.mktemp("models"), settings).get("demo")
    torch.set_num_threads(threads)


def _rotation(orientation: str) -> np.ndarray | None:
    """For oblique planes the phantom lies turned with the plane, as a patient would be scanned.

    The demo model was trained without augmentation on upright phantoms: on an upright phantom
    cut by a 20-degree double-oblique plane it loses the spleen and left kidney (Dice 0.82, 0.91
    and centroids 2-5 voxels off, with the liver's centroid 0.04 voxel off), a model limit, not
    geometry. Turned with the plane, the image content is in-distribution while every DICOM
    position and orientation stays oblique, which is what this test checks.
    """
    if orientation != "oblique20":
        return None
    row, col = orientation_cosines(orientation)
    return np.stack([row, col, np.cross(row, col)], axis=1)


def _write(out_dir: Path, spec: PhantomSpec, case: dict[str, Any]) -> WrittenSeries:
    options = {k: v for k, v in case.items() if k != "format"}
    shape, spacing = AXIAL_GRID if case["orientation"] in ("axial", "oblique20") else SIDE_GRID

    rotation = _rotation(case["orientation"])

    def sampler(points: np.ndarray) -> np.ndarray:
        intensity, _ = sample_phantom(spec, points if rotation is None else points @ rotation)
        return intensity

    return write_series(out_dir, sampler, shape=shape, spacing=spacing, **options)


def _referenced_instances(seg: pydicom.Dataset) -> set[str]:
    return {
        str(instance.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for instance in series.ReferencedInstanceSequence
    }


def _check_roundtrip(
    seg_path: Path,
    volume: Volume,
    spec: PhantomSpec,
    catalogue: Catalogue,
    work_dir: Path,
    rotation: np.ndarray | None = None,
) -> list[str]:
    """Decode the SEG three ways, check they agree, score against the truth; a report."""
    seg = st.read_seg(seg_path)
    assert _referenced_instances(seg) == {str(ds.SOPInstanceUID) for ds in volume.source_datasets}
    assert str(seg.FrameOfReferenceUID) == volume.frame_of_reference_uid
    shape = volume.array.shape

    by_reference = st.decode_on_source(seg, volume, catalogue)
    assert by_reference.shape == shape
    by_position = st.resample_nearest(
        st.decode_by_position(seg, catalogue), volume.affine, shape, what="highdicom volume"
    )
    differ = int((by_position != by_reference).sum())
    assert differ == 0, f"highdicom by position and by reference differ in {differ} voxels"
    dcmqi = st.decode_with_dcmqi(seg_path, work_dir / "dcmqi", catalogue)
    dcmqi_on_source = st.resample_nearest(dcmqi, volume.affine, shape, what="dcmqi NIfTI")
    differ = int((dcmqi_on_source != by_reference).sum())
    assert differ == 0, f"dcmqi and highdicom differ in {differ} voxels"

    truth = st.truth_labels(spec, volume.affine, shape, rotation)
    scores = st.score(by_reference, truth, volume.affine, catalogue)
    assert len(scores) == len(catalogue.labels), "the phantom should show every structure"
    # dcmqi on its own grid, against the truth at its NIfTI voxel centres.
    dcmqi_scores = st.score(
        dcmqi.array,
        st.truth_labels(spec, dcmqi.affine, dcmqi.shape, rotation),
        dcmqi.affine,
        catalogue,
    )
    report = [str(s) for s in scores]
    problems = st.failures(scores, MIN_DICE) + [
        f"dcmqi grid: {p}" for p in st.failures(dcmqi_scores, MIN_DICE)
    ]
    assert not problems, "\n".join([*problems, "all:", *report])
    return report


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_phantom_series_roundtrip_in_patient_space(
    case: dict[str, Any],
    tmp_path: Path,
    spec: PhantomSpec,
    demo: tuple[ModelInfo, Segmenter],
) -> None:
    info, segmenter = demo
    written = _write(tmp_path / "series", spec, case)
    result = segment_series(written.paths, info, segmenter, format=case.get("format", "binary"))
    seg_path = tmp_path / "seg.dcm"
    result.seg.save_as(seg_path, enforce_file_format=True)
    volume = volume_from_series(written.paths)
    # The reader's grid is the writer's: the truth below does not depend on our reader alone.
    np.testing.assert_allclose(volume.affine, written.affine, atol=1e-4)
    if case.get("enhanced"):
        assert len(volume.source_datasets) == 1 and volume.frames[0].frame_number is not None
    expected_sop = {
        "binary": "1.2.840.10008.5.1.4.1.1.66.4",
        "labelmap": "1.2.840.10008.5.1.4.1.1.66.7",
    }
    assert result.seg.SOPClassUID == expected_sop[case.get("format", "binary")]
    if case.get("format", "binary") == "binary":
        assert_valid_binary_seg(seg_path, written.paths)
    rotation = _rotation(case["orientation"])
    report = _check_roundtrip(seg_path, volume, spec, info.catalogue, tmp_path, rotation)
    print(f"\n{_case_id(case)}:\n  " + "\n  ".join(report))


class _OracleSegmenter:
    """A perfect model of the training grid: labels the phantom on the grid it is given, read as
    the training grids were (identity direction, centred on the origin). Any flip, transpose or
    shift between the source grid and the model's input or output shows up exactly."""

    def __init__(self, spec: PhantomSpec) -> None:
        self.spec = spec

    def predict(self, volume: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
        points = phantom_grid_points(volume.shape, spacing_zyx)
        _, labels = sample_phantom(self.spec, points, noise=False)
        return labels.reshape(volume.shape)


def _oracle_info() -> SimpleNamespace:
    """What segment_series needs of a model, for the oracle: the demo model's catalogue."""
    from inference.catalogue import load_catalogue

    return SimpleNamespace(
        name="oracle",
        catalogue=load_catalogue("demo"),
        weights_sha256="0" * 64,
        descriptor=SimpleNamespace(
            modality="MR", version="1", input_channels=["MRI"], orientation="LPS", roi_model=None
        ),
    )


@pytest.mark.parametrize(
    "case",
    [
        {"orientation": "sagittal", "patient_position": "FFS", "enhanced": True},
        {"orientation": "coronal", "patient_position": "HFP", "reverse_order": True},
        {"orientation": "axial", "patient_position": "FFP", "enhanced": True, "format": "labelmap"},
        # Pixel measures and orientation in each frame's groups, as Siemens XA writes them.
        {
            "orientation": "coronal",
            "enhanced": True,
            "per_frame_geometry": True,
            "reverse_order": True,
        },
        {
            "orientation": "sagittal",
            "enhanced": True,
            "per_frame_geometry": True,
            "format": "labelmap",
        },
    ],
    ids=_case_id,
)
def test_exact_with_an_oracle_model(
    case: dict[str, Any], tmp_path: Path, spec: PhantomSpec
) -> None:
    """No trained model needed: with a perfect one the SEG equals the truth voxel for voxel."""
    info = _oracle_info()
    catalogue = info.catalogue
    written = _write(tmp_path / "series", spec, case)
    result = segment_series(
        written.paths, info, _OracleSegmenter(spec), format=case.get("format", "binary")
    )
    assert result.seg.ContentDescription == "oracle 1"  # one stack: the model alone
    seg_path = tmp_path / "seg.dcm"
    result.seg.save_as(seg_path, enforce_file_format=True)
    volume = volume_from_series(written.paths)
    _check_roundtrip(seg_path, volume, spec, catalogue, tmp_path)
    decoded = st.decode_on_source(st.read_seg(seg_path), volume, catalogue)
    truth = st.truth_labels(spec, written.affine, written.shape)
    assert int((decoded != truth).sum()) == 0


class _RasOracleSegmenter(_OracleSegmenter):
    """The oracle of a model trained on NIfTI's canonical (RAS) arrays, as TotalSegmentator's
    are: index x runs towards the patient's right, y towards anterior."""

    def predict(self, volume: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
        lps_origin = default_origin(volume.shape, spacing_zyx)
        points = phantom_grid_points(
            volume.shape,
            spacing_zyx,
            origin=(-lps_origin[0], -lps_origin[1], lps_origin[2]),
            direction=np.diag([-1.0, -1.0, 1.0]),
        )
        _, labels = sample_phantom(self.spec, points, noise=False)
        return labels.reshape(volume.shape)


@pytest.mark.parametrize("orientation", ["axial", "sagittal"])
def test_a_model_trained_on_ras_arrays_gets_ras_arrays(
    tmp_path: Path, spec: PhantomSpec, orientation: str
) -> None:
    """model.yaml's orientation turns the series to the axes the model was trained on: a RAS
    model fed the node's LPS array saw the patient rotated 180 degrees (left and right
    swapped), and its SEG was wrong; given RAS, its SEG equals the truth."""
    written = _write(tmp_path / "series", spec, {"orientation": orientation})
    volume = volume_from_series(written.paths)
    truth = st.truth_labels(spec, written.affine, written.shape)
    info = _oracle_info()
    wrong = segment_series(written.paths, info, _RasOracleSegmenter(spec))
    info.descriptor.orientation = "RAS"
    right = segment_series(written.paths, info, _RasOracleSegmenter(spec))
    for result, exact in ((wrong, False), (right, True)):
        seg_path = tmp_path / f"seg-{exact}.dcm"
        result.seg.save_as(seg_path, enforce_file_format=True)
        decoded = st.decode_on_source(st.read_seg(seg_path), volume, info.catalogue)
        assert (int((decoded != truth).sum()) == 0) is exact


@pytest.mark.parametrize(
    ("orientation", "model_axes"), [("axial", "RAS"), ("sagittal", "RAS"), ("axial", "LPS")]
)
def test_a_series_turned_for_its_model_is_not_held_twice(
    tmp_path: Path,
    spec: PhantomSpec,
    orientation: str,
    model_axes: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A job's volume turned to a RAS model's axes (TotalSegmentator's) is a float32 copy:
    the series' own array was held beside it through the whole prediction, one volume more at
    the peak (512x512x1000: 1 GB). It is dropped once the copy is made; the SEG is as exact.
    (An LPS model on an axial series: the input is a view of the same pixels, no copy.)"""
    import dicom_node.segment as segment

    written = _write(tmp_path / "series", spec, {"orientation": orientation})
    truth_volume = volume_from_series(written.paths)
    truth = st.truth_labels(spec, written.affine, written.shape)
    volumes: list[Volume] = []

    def kept(*args: object, **kwargs: object) -> Volume:
        volumes.append(volume_from_series(*args, **kwargs))  # type: ignore[arg-type]
        return volumes[-1]

    held: list[int] = []
    oracle = _RasOracleSegmenter if model_axes == "RAS" else _OracleSegmenter

    class Spying(oracle):  # type: ignore[misc, valid-type]
        def predict(
            self, volume: np.ndarray, spacing_zyx: tuple[float, float, float]
        ) -> np.ndarray:
            held.append(volumes[-1].array.size)  # the series' own array, as prediction runs
            return super().predict(volume, spacing_zyx)  # type: ignore[no-any-return]

    monkeypatch.setattr(segment, "volume_from_series", kept)
    info = _oracle_info()
    info.descriptor.orientation = model_axes
    result = segment_series(written.paths, info, Spying(spec))
    assert held == [0]
    seg_path = tmp_path / "seg.dcm"
    result.seg.save_as(seg_path, enforce_file_format=True)
    decoded = st.decode_on_source(st.read_seg(seg_path), truth_volume, info.catalogue)
    assert int((decoded != truth).sum()) == 0


def test_a_jobs_series_and_seg_lines_name_the_job(
    tmp_path: Path, spec: PhantomSpec, caplog: pytest.LogCaptureFixture
) -> None:
    """Reading the series and encoding its SEG log lines (images left out, the SEG encoded)
    that named neither the job nor, for some, the series: among several workers' lines an
    operator could not tell which job they were about."""
    from inference.log_context import log_label

    written = _write(tmp_path / "series", spec, {"orientation": "axial"})
    caplog.set_level(logging.INFO)
    with log_label("job 7 study 1.2 series 1.2.3 v1"):
        segment_series(written.paths, _oracle_info(), _OracleSegmenter(spec))
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name in ("dicom_node.volume", "dicom_node.seg_encode")
    ]
    assert any("encoded SEG" in line for line in lines), lines
    assert all(line.startswith("job 7 study 1.2 series 1.2.3 v1: ") for line in lines), lines
    caplog.clear()
    segment_series(written.paths, _oracle_info(), _OracleSegmenter(spec))  # no job: no label
    assert all(not r.getMessage().startswith("job ") for r in caplog.records)


class _TwoInputOracle(_OracleSegmenter):
    """A perfect model of two inputs: checks that its second channel is the ROI model's
    segmentation on its own (LPS) grid, then labels the phantom."""

    def predict(self, volume: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
        assert volume.ndim == 4 and volume.shape[0] == 2, volume.shape
        truth = super().predict(volume[0], spacing_zyx)
        np.testing.assert_array_equal(volume[1], truth.astype(np.float32))
        return truth


@pytest.mark.parametrize("orientation", ["axial", "sagittal"])
def test_a_model_taking_a_roi_models_segmentation_gets_it_on_its_own_grid(
    tmp_path: Path, spec: PhantomSpec, orientation: str
) -> None:
    """TotalVibeSegmentator takes, beside the image, its ROI model's segmentation of it: the
    ROI model runs first, in its own orientation (RAS here), and its label map reaches the
    main model (LPS) voxel for voxel on the image's grid."""
    written = _write(tmp_path / "series", spec, {"orientation": orientation})
    volume = volume_from_series(written.paths)
    truth = st.truth_labels(spec, written.affine, written.shape)
    roi_info = _oracle_info()
    roi_info.descriptor.orientation = "RAS"
    info = _oracle_info()
    info.descriptor.input_channels = ["MRI", "roi"]
    info.descriptor.roi_model = "roi"
    given: list[str] = []

    def input_models(name: str) -> tuple[Any, Any]:
        given.append(name)
        return roi_info, _RasOracleSegmenter(spec)

    result = segment_series(written.paths, info, _TwoInputOracle(spec), input_models=input_models)
    assert given == ["roi"]
    seg_path = tmp_path / "seg.dcm"
    result.seg.save_as(seg_path, enforce_file_format=True)
    decoded = st.decode_on_source(st.read_seg(seg_path), volume, info.catalogue)
    assert int((decoded != truth).sum()) == 0
    with pytest.raises(
        ModelError, match="takes the segmentation of model 'roi' as its second input"
    ):
        segment_series(written.paths, info, _TwoInputOracle(spec))


class _NeverCalled:
    def predict(self, volume: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
        raise AssertionError("a model the node cannot feed was run")


def test_a_model_of_several_input_channels_is_refused_by_name(
    tmp_path: Path, spec: PhantomSpec
) -> None:
    """The node feeds one series as one channel: a two-channel model's job fails saying so."""
    info = _oracle_info()
    info.descriptor.input_channels = ["water", "fat"]
    written = _write(tmp_path / "series", spec, {"orientation": "axial"})
    with pytest.raises(ModelError, match=r"needs 2 input channels \(water, fat\)"):
        segment_series(written.paths, info, _NeverCalled())


# ---- several stacks in one series -----------------------------------------------------


def _flat(points: np.ndarray) -> np.ndarray:
    """The other stack: no anatomy, so segmenting it instead would fail every bar."""
    return np.full(len(points), 40.0)


def test_first_echo_of_a_two_echo_series(
    tmp_path: Path, spec: PhantomSpec, demo: tuple[ModelInfo, Segmenter]
) -> None:
    """Two echoes in one series: the first is segmented, the SEG references its images only."""
    info, segmenter = demo
    shape, spacing = AXIAL_GRID

    def phantom(points: np.ndarray) -> np.ndarray:
        return sample_phantom(spec, points)[0]

    stacks = write_stacked_series(
        tmp_path / "series",
        [phantom, _flat],
        attributes=[{"EchoNumbers": 1, "EchoTime": 2.46}, {"EchoNumbers": 2, "EchoTime": 4.92}],
        shape=shape,
        spacing=spacing,
    )
    paths = sorted((tmp_path / "series").iterdir())
    result = segment_series(paths, info, segmenter)
    assert result.stack == "stack 1 of 2 (Echo Number 1: 48 images)"
    # A viewer lists a SEG of each stack in one SEG series: the description tells them apart.
    assert result.seg.ContentDescription == "demo 1.0; stack 1 of 2 (Echo Number 1: 48 images)"
    seg_path = tmp_path / "seg.dcm"
    result.seg.save_as(seg_path, enforce_file_format=True)
    assert _referenced_instances(result.seg) == set(stacks[0].sop_instance_uids)
    assert_valid_binary_seg(seg_path, paths)
    volume = volume_from_series(paths)
    np.testing.assert_allclose(volume.affine, stacks[0].affine, atol=1e-4)
    _check_roundtrip(seg_path, volume, spec, info.catalogue, tmp_path)


@pytest.mark.parametrize("fmt", ["binary", "labelmap"])
def test_last_time_point_of_an_enhanced_image(tmp_path: Path, spec: PhantomSpec, fmt: str) -> None:
    """One multi-frame object holding two time points: the SEG covers the chosen one's frames
    only (highdicom alone would refer each SEG frame to both time points' frames there)."""
    info = _oracle_info()
    catalogue = info.catalogue
    shape, spacing = AXIAL_GRID

    def phantom(points: np.ndarray) -> np.ndarray:
        return sample_phantom(spec, points)[0]

    stacks = write_stacked_series(
        tmp_path / "series", [_flat, phantom], enhanced=True, shape=shape, spacing=spacing
    )
    paths = stacks[1].paths
    result = segment_series(
        paths, info, _OracleSegmenter(spec), StackChoice(order="last"), format=fmt
    )
    assert result.stack == "stack 2 of 2 (Temporal Position 2: 48 images)"
    seg_path = tmp_path / "seg.dcm"
    result.seg.save_as(seg_path, enforce_file_format=True)
    referenced = [
        int(item.ReferencedFrameNumber)
        for frame in result.seg.PerFrameFunctionalGroupsSequence
        for derivation in frame.DerivationImageSequence
        for item in derivation.SourceImageSequence
    ]
    n = shape[0]
    assert referenced and all(n < number <= 2 * n for number in referenced)
    assert len(referenced) == int(result.seg.NumberOfFrames)  # one source frame each
    if fmt == "binary":
        assert_valid_binary_seg(seg_path, paths)
    volume = volume_from_series(paths, StackChoice(order="last"))
    _check_roundtrip(seg_path, volume, spec, catalogue, tmp_path)
    decoded = st.decode_on_source(st.read_seg(seg_path), volume, catalogue)
    truth = st.truth_labels(spec, stacks[1].affine, stacks[1].shape)
    assert int((decoded != truth).sum()) == 0


def test_one_of_two_enhanced_images_in_a_series(tmp_path: Path, spec: PhantomSpec) -> None:
    """Two multi-frame images at the same positions in one series: the SEG is of the first."""
    info = _oracle_info()
    catalogue = info.catalogue
    case = {"orientation": "sagittal", "enhanced": True, "reverse_order": True}
    first = _write(tmp_path / "series", spec, case)
    second = write_series(
        tmp_path / "series", _flat, enhanced=True, uids=first.uids, file_prefix="B",
        shape=SIDE_GRID[0], spacing=SIDE_GRID[1], orientation="sagittal",
    )  # fmt: skip
    later = pydicom.dcmread(second.paths[0])
    later.InstanceNumber = 2  # the scanner numbers the images of the series
    later.save_as(second.paths[0])
    paths = [*second.paths, *first.paths]  # arrival order does not decide
    result = segment_series(paths, info, _OracleSegmenter(spec))
    assert result.stack.startswith("stack 1 of 2 (SOP Instance UID ")
    seg_path = tmp_path / "seg.dcm"
    result.seg.save_as(seg_path, enforce_file_format=True)
    assert _referenced_instances(result.seg) == set(first.sop_instance_uids)
    assert_valid_binary_seg(seg_path, paths)
    volume = volume_from_series(paths)
    decoded = st.decode_on_source(st.read_seg(seg_path), volume, catalogue)
    truth = st.truth_labels(spec, first.affine, first.shape)
    assert int((decoded != truth).sum()) == 0


@pytest.mark.filterwarnings("ignore:.*VR UI:UserWarning")  # pydicom: not valid UIDs, as meant
def test_overlong_source_uids_are_segmented_with_one_log_line(
    tmp_path: Path, spec: PhantomSpec
) -> None:
    """UIDs longer than DICOM's 64 characters (the node stores up to 255) gave one pydicom
    log line per value while the series was read and its SEG written: 180 lines for 35
    images. One line now counts them; the SEG references the UIDs as sent."""
    long = "1.2.826.0.1.3680043.8.498." + "4" * 60
    uids = SeriesUids(study_instance_uid=f"{long}.1", series_instance_uid=f"{long}.2")
    _write(tmp_path / "series", spec, {"orientation": "axial", "uids": uids})
    done = offline_cli(
        ["segment", str(tmp_path / "series"), "--out", str(tmp_path / "out"), "--json"], tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (summary,) = [line for line in done.stderr.splitlines() if "exceeds the maximum" in line]
    assert "header values do not conform to their VR" in summary, summary
    assert "allowed for VR UI" in summary and "WARNING" in summary, summary
    seg = pydicom.dcmread(json.loads(done.stdout)["seg"])
    assert (seg.StudyInstanceUID, seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == (
        uids.study_instance_uid,
        uids.series_instance_uid,
    )


def test_cli_segment_roundtrip_in_patient_space(
    tmp_path: Path, spec: PhantomSpec, demo: tuple[ModelInfo, Segmenter]
) -> None:
    """The real command on an enhanced coronal FFP series (frames stored out of order)."""
    info, _ = demo
    case = {"orientation": "coronal", "patient_position": "FFP", "enhanced": True}
    written = _write(tmp_path / "series", spec, case)
    out = tmp_path / "out"
    data = segment_json(tmp_path / "series", "demo", out, tmp_path)
    seg_path = Path(data["seg"])
    assert seg_path.parent == out and seg_path.is_file()
    assert {label["name"] for label in data["labels"] if label["ml"] > 0} == {
        label.name for label in info.catalogue.labels
    }
    volume = volume_from_series(written.paths)
    np.testing.assert_allclose(volume.affine, written.affine, atol=1e-4)
    report = _check_roundtrip(seg_path, volume, spec, info.catalogue, tmp_path)
    print(f"\ncli {_case_id(case)}:\n  " + "\n  ".join(report))


def test_cli_segment_chooses_the_stack(tmp_path: Path, spec: PhantomSpec) -> None:
    """`--stack last` on a two-echo series: the command segments echo 2 and says so."""
    shape, spacing = AXIAL_GRID
    stacks = write_stacked_series(
        tmp_path / "series",
        [_flat, lambda points: sample_phantom(spec, points)[0]],
        attributes=[{"EchoNumbers": 1}, {"EchoNumbers": 2}],
        shape=shape,
        spacing=spacing,
    )
    out = tmp_path / "out"
    data = segment_json(tmp_path / "series", "demo", out, tmp_path, "--stack", "last")
    assert data["stack"] == "stack 2 of 2 (Echo Number 2: 48 images)"
    seg = pydicom.dcmread(data["seg"])
    assert _referenced_instances(seg) == set(stacks[1].sop_instance_uids)
    assert all(label["ml"] > 0 for label in data["labels"])

    args = ["segment", str(tmp_path / "series"), "--model", "demo", "--out", str(out)]
    wrong = offline_cli([*args, "--stack", "middle"], tmp_path)
    assert wrong.returncode != 0 and "--stack must be first or last" in wrong.stderr


def test_cli_segment_says_which_images_it_left_out_as_copies(
    tmp_path: Path, spec: PhantomSpec
) -> None:
    """A slice stored twice under two SOP Instance UIDs: segmented once, and the report
    says so (JSON and text)."""
    shape, spacing = AXIAL_GRID
    written = write_series(
        tmp_path / "series",
        lambda points: sample_phantom(spec, points)[0],
        shape=shape,
        spacing=spacing,
    )
    twin = pydicom.dcmread(written.paths[10])
    twin.SOPInstanceUID = pydicom.uid.generate_uid()
    twin.save_as(tmp_path / "series" / "twin.dcm")
    out = tmp_path / "out"
    data = segment_json(tmp_path / "series", "demo", out, tmp_path)
    assert data["notes"] == ["1 duplicate image(s) (same position and pixels) left out"]
    seg = pydicom.dcmread(data["seg"])
    assert len(_referenced_instances(seg)) == shape[0]
    text = offline_cli(["segment", str(tmp_path / "series"), "--out", str(out)], tmp_path)
    assert text.returncode == 0, text.stderr[-2000:]
    assert "1 duplicate image(s) (same position and pixels) left out" in text.stdout


@pytest.mark.parametrize(
    "name",
    [
        "mr_siemens_t1_fl2d_sag_HFS",
        # The same protocol, patient lying decubitus left: ~40 s more on a busy 2-core machine.
        pytest.param("mr_siemens_t1_fl2d_sag_HFDL", marks=pytest.mark.slow),
    ],
)
def test_cli_segment_on_a_real_siemens_sagittal_series(
    name: str, tmp_path: Path, shared_data: Path, demo: tuple[ModelInfo, Segmenter]
) -> None:
    """Mechanics only: the demo model knows no real anatomy, but it labels a good part of
    these series (100-104 frames of 4 segments), so a SEG must come back: a "no structure was
    found" here would mean a change on the way to the model (a turned volume, say)."""
    series = shared_data / name
    if not series.is_dir():
        pytest.skip(f"{series} is absent")
    sources = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in series.iterdir()
    }
    assert len(sources) == 35
    out = tmp_path / "out"
    completed = offline_cli(
        ["segment", str(series), "--model", "demo", "--out", str(out), "--json"], tmp_path
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    seg_path = Path(json.loads(completed.stdout)["seg"])
    seg = pydicom.dcmread(seg_path)
    assert _referenced_instances(seg) == sources
    decoded = st.read_seg(seg_path)
    assert len(decoded.get_segment_numbers()) >= 1


def test_the_bars_catch_a_flip_and_a_one_slice_shift(spec: PhantomSpec) -> None:
    """No model: the truth itself, mangled as geometry bugs would, must fail the bars."""
    from dicom_phantoms import uniform_grid

    from inference.catalogue import load_catalogue

    catalogue = load_catalogue("demo")
    shape, spacing = AXIAL_GRID
    affine = uniform_grid("axial", shape, spacing)
    truth = st.truth_labels(spec, affine, shape)
    assert not st.failures(st.score(truth, truth, affine, catalogue))
    flipped_lr = truth[:, :, ::-1]  # kidneys swap sides
    assert st.failures(st.score(flipped_lr, truth, affine, catalogue))
    flipped_ap = truth[:, ::-1, :]
    assert st.failures(st.score(flipped_ap, truth, affine, catalogue))
    # One slice off, as an off-by-one frame order would be: exactly at the centroid bar (1 voxel
    # along z), which a correct pipeline stays far below.
    shifted = np.roll(truth, 1, axis=0)
    for result in st.score(shifted, truth, affine, catalogue):
        assert result.error_voxels[2] == pytest.approx(1.0), result
        assert np.abs(result.error_voxels[:2]).max() < 1e-9, result
    # A grid half a voxel off does not line up with the source grid at all.
    moved = affine.copy()
    moved[:3, 3] += 0.5 * affine[:3, 0]
    with pytest.raises(AssertionError, match="voxel off"):
        st.resample_nearest(st.LabelGrid(truth, moved), affine, shape)


class _ThresholdSegmenter:
    """Labels by intensity alone (1 above the 60th percentile, 2 above the 90th): the answer
    does not depend on how the volume is turned, so its label map on the source grid is known."""

    def predict(self, volume: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
        return _threshold_labels(volume)


def _threshold_labels(volume: np.ndarray) -> np.ndarray:
    low, high = np.percentile(volume, [60, 90])
    return (volume > low).astype(np.uint8) + (volume > high).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["binary", "labelmap"])
def test_real_siemens_xa_enhanced_image_gets_a_seg(
    tmp_path: Path, shared_data: Path, fmt: str
) -> None:
    """The scanner's own enhanced MR (Siemens XA30, 96 frames), whose pixel spacing and
    orientation are in each frame's functional groups, not the shared ones: its SEG used to fail
    in highdicom. Read back by reference, by position and by dcmqi, it is the model's answer."""
    paths = sorted((shared_data / "mr_siemens_xa30_enhanced_t1w").iterdir())
    info = _oracle_info()
    result = segment_series(paths, info, _ThresholdSegmenter(), format=fmt)
    seg_path = tmp_path / "seg.dcm"
    result.seg.save_as(seg_path, enforce_file_format=True)
    if fmt == "binary":
        assert_valid_binary_seg(seg_path, paths)
    volume = volume_from_series(paths)
    expected = _threshold_labels(volume.array)
    seg = st.read_seg(seg_path)
    assert _referenced_instances(seg) == {str(volume.source_datasets[0].SOPInstanceUID)}
    by_reference = st.decode_on_source(seg, volume, info.catalogue)
    assert int((by_reference != expected).sum()) == 0
    shape = volume.array.shape
    by_position = st.resample_nearest(
        st.decode_by_position(seg, info.catalogue), volume.affine, shape, what="highdicom volume"
    )
    assert int((by_position != expected).sum()) == 0
    dcmqi = st.decode_with_dcmqi(seg_path, tmp_path / "dcmqi", info.catalogue)
    on_source = st.resample_nearest(dcmqi, volume.affine, shape, what="dcmqi NIfTI")
    assert int((on_source != expected).sum()) == 0
