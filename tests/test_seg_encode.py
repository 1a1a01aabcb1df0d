"""dicom_node.seg_encode against highdicom's reader and the independent validators/readers."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_phantoms import geometry_per_frame
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from seg_fixtures import (
    ANATOMY,
    CATALOGUE,
    OTHER_SHA256,
    PRESENT_IDS,
    WEIGHTS_SHA256,
    Catalogue,
    Code,
    Label,
    enhanced_mr,
    mr_series,
    small_label_map,
    write_series,
)
from validators import dcentvfy, dciodvfy

from dicom_node.errors import DicomNodeError
from dicom_node.seg_encode import (
    ALLOWED_COMPRESSIONS,
    EmptySegmentationError,
    SegCompression,
    SegFormat,
    encode_seg,
    label_volumes_ml,
    segment_mapping,
)
from dicom_node.seg_write import seg_to_bytes
from inference.catalogue import load_catalogue

COMBINATIONS = [(fmt, comp) for fmt, comps in ALLOWED_COMPRESSIONS.items() for comp in comps]
LABELMAP_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"
BINARY_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def _encode(
    label_map: np.ndarray, sources: list[Dataset] | Dataset, **kwargs: object
) -> hd.seg.Segmentation:
    args: dict[str, object] = {
        "model_name": "demo",
        "model_version": "1.0",
        "weights_sha256": WEIGHTS_SHA256,
    }
    args.update(kwargs)
    return encode_seg(label_map, sources, CATALOGUE, **args)  # type: ignore[arg-type]


def _expected_segments(label_map: np.ndarray) -> np.ndarray:
    """The label map with catalogue ids replaced by segment numbers 1..N."""
    expected = np.zeros_like(label_map)
    for number, label_id in enumerate(PRESENT_IDS, start=1):
        expected[label_map == label_id] = number
    return expected


@pytest.fixture(scope="module")
def series() -> list[Dataset]:
    return mr_series()


@pytest.fixture(scope="module")
def multiframe(series: list[Dataset]) -> Dataset:
    return enhanced_mr(series)


@pytest.fixture(scope="module")
def label_map() -> np.ndarray:
    return small_label_map()


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory: pytest.TempPathFactory, series: list[Dataset]) -> list[Path]:
    return write_series(series, tmp_path_factory.mktemp("source"))


# --- decoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "comp"), COMBINATIONS, ids=lambda v: v.value)
def test_every_supported_compression_decodes_to_the_label_map(
    tmp_path: Path,
    series: list[Dataset],
    label_map: np.ndarray,
    fmt: SegFormat,
    comp: SegCompression,
) -> None:
    seg = _encode(label_map, series, format=fmt, compression=comp)
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    back = hd.seg.segread(path)
    decoded = back.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in series], combine_segments=True, relabel=True
    )
    np.testing.assert_array_equal(decoded, _expected_segments(label_map))
    assert back.SOPClassUID == (
        LABELMAP_SOP_CLASS if fmt is SegFormat.LABELMAP else BINARY_SOP_CLASS
    )


@pytest.mark.parametrize("fmt", [SegFormat.BINARY, SegFormat.LABELMAP], ids=lambda v: v.value)
def test_images_too_small_for_jpeg2000_give_an_uncompressed_seg(
    fmt: SegFormat, caplog: pytest.LogCaptureFixture
) -> None:
    """openjpeg codes no frame with a side under 32 pixels: the job failed with highdicom's
    ValueError and the radiologist got no SEG."""
    small = mr_series(4, 20, 40)
    label_map = small_label_map((4, 20, 40))
    seg = _encode(label_map, small, format=fmt, compression=SegCompression.JPEG2000)
    assert seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    back = hd.seg.segread(io.BytesIO(seg_to_bytes(seg)))
    decoded = back.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in small], combine_segments=True, relabel=True
    )
    np.testing.assert_array_equal(decoded, _expected_segments(label_map))
    assert "20x40 images are too small for JPEG 2000; the SEG is uncompressed" in caplog.text


# 300 labels: more than a LABELMAP's 8-bit pixels hold
_MANY = Catalogue(
    labels=[
        Label(i, f"s{i}", ANATOMY, Code("SCT", "10200004", "Liver"), None, (i % 256, 0, 0))
        for i in range(1, 301)
    ]
)


def _random_label_map(rnd: random.Random) -> np.ndarray:
    shape = (rnd.randint(1, 5), rnd.randint(1, 80), rnd.randint(1, 80))
    labels = rnd.choice([1, 3, 40, 300])
    rng = np.random.default_rng(rnd.randrange(2**32))
    label_map = np.zeros(shape, np.uint16)
    mode = rnd.choice(["dense", "sparse", "one voxel", "one plane"])
    if mode == "dense":
        label_map[:] = rng.integers(0, labels + 1, size=shape)
    elif mode == "sparse":
        where = rng.random(shape) < 0.05
        label_map[where] = rng.integers(1, labels + 1, size=int(where.sum()))
    elif mode == "one voxel":
        label_map[tuple(rnd.randrange(n) for n in shape)] = rnd.randint(1, labels)
    else:
        label_map[rnd.randrange(shape[0])] = rng.integers(0, labels + 1, size=shape[1:])
    if label_map.max() <= 255 and rnd.random() < 0.5:
        label_map = label_map.astype(np.uint8)
    return label_map


def test_random_label_maps_encode_write_and_decode() -> None:
    """40 seeded label maps: shapes 1-5 x 1-80 x 1-80, 1-300 labels, dense to one voxel,
    every format and compression. The fast writer gives save_as's bytes and the SEG decodes
    to the label map. Before 8d13e11, 10 of them (images with a side under 32 pixels and
    JPEG 2000) failed."""
    failures: list[str] = []
    for seed in range(40):
        rnd = random.Random(seed)
        label_map = _random_label_map(rnd)
        fmt = rnd.choice(list(SegFormat))
        comp = rnd.choice(ALLOWED_COMPRESSIONS[fmt])
        case = f"seed {seed}: {label_map.shape} {fmt.value}/{comp.value}"
        series = mr_series(*label_map.shape, seed=seed)
        if not label_map.any():
            continue
        try:
            seg = encode_seg(
                label_map,
                series,
                _MANY,
                model_name="demo",
                model_version="1.0",
                weights_sha256=WEIGHTS_SHA256,
                format=fmt,
                compression=comp,
            )
        except Exception as exc:  # any failure is the finding
            failures.append(f"{case}: {type(exc).__name__}: {exc}")
            continue
        written = seg_to_bytes(seg)
        buffer = io.BytesIO()
        seg.save_as(buffer, enforce_file_format=True)
        assert written == buffer.getvalue(), case
        decoded = hd.seg.segread(io.BytesIO(written)).get_pixels_by_source_instance(
            [ds.SOPInstanceUID for ds in series], combine_segments=True, relabel=False
        )
        expected = np.zeros(label_map.shape, np.int64)
        for label_id, number in segment_mapping(label_map, _MANY).items():
            expected[label_map == label_id] = number
        np.testing.assert_array_equal(np.asarray(decoded, np.int64), expected, err_msg=case)
    assert failures == []


def _decoded_by_frame(seg: hd.seg.Segmentation, source: Dataset, planes: int) -> np.ndarray:
    return np.asarray(
        seg.get_pixels_by_source_frame(
            source.SOPInstanceUID,
            source_frame_numbers=range(1, planes + 1),
            combine_segments=True,
            relabel=True,
            # Empty planes have no frame, so the last source frames are never referenced.
            assert_missing_frames_are_empty=True,
        )
    )


def test_multiframe_source_decodes_and_references_frames(
    tmp_path: Path, multiframe: Dataset, label_map: np.ndarray
) -> None:
    seg = _encode(label_map, multiframe)
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    back = hd.seg.segread(path)
    decoded = _decoded_by_frame(back, multiframe, label_map.shape[0])
    np.testing.assert_array_equal(decoded, _expected_segments(label_map))
    referenced_frames = {
        int(item.ReferencedFrameNumber)
        for frame in back.PerFrameFunctionalGroupsSequence
        for derivation in frame.DerivationImageSequence
        for item in derivation.SourceImageSequence
    }
    assert referenced_frames == {z + 1 for z in range(label_map.shape[0]) if label_map[z].any()}


def _geometry_per_frame(multiframe: Dataset) -> Dataset:
    moved = copy.deepcopy(multiframe)
    geometry_per_frame(moved)
    return moved


def test_multiframe_source_with_geometry_per_frame(
    multiframe: Dataset, label_map: np.ndarray
) -> None:
    source = _geometry_per_frame(multiframe)
    before = copy.deepcopy(source)
    seg = hd.seg.Segmentation.from_dataset(_encode(label_map, source))
    decoded = _decoded_by_frame(seg, source, label_map.shape[0])
    np.testing.assert_array_equal(decoded, _expected_segments(label_map))
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert shared.PixelMeasuresSequence[0].PixelSpacing == (
        multiframe.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    )
    assert source == before  # the caller's dataset is left as it was


def test_multiframe_frames_of_different_pixel_spacing_are_refused(
    multiframe: Dataset, label_map: np.ndarray
) -> None:
    source = _geometry_per_frame(multiframe)
    source.PerFrameFunctionalGroupsSequence[3].PixelMeasuresSequence[0].PixelSpacing = [9, 9]
    with pytest.raises(ValueError, match="differ in PixelMeasuresSequence"):
        _encode(label_map, source)


def test_get_volume_matches_for_labelmap(series: list[Dataset], label_map: np.ndarray) -> None:
    seg = _encode(label_map, series, format="labelmap", compression="rle")
    volume = seg.get_volume(combine_segments=True, relabel=True)
    # Our arrays are (z, y, x) of an axial LPS series: superior, posterior, left increasing.
    volume = volume.to_patient_orientation("SPL")
    # The volume spans the non-empty slices only; compare that extent.
    non_empty = [z for z in range(label_map.shape[0]) if label_map[z].any()]
    expected = _expected_segments(label_map)[non_empty[0] : non_empty[-1] + 1]
    np.testing.assert_array_equal(volume.array, expected)


# --- metadata ---------------------------------------------------------------------------------


def test_segments_carry_catalogue_codes_colours_and_algorithm(
    series: list[Dataset], label_map: np.ndarray
) -> None:
    seg = _encode(label_map, series)
    labels = {label.id: label for label in CATALOGUE.labels}
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2, 3]
    for item, label_id in zip(seg.SegmentSequence, PRESENT_IDS, strict=True):
        label = labels[label_id]
        assert item.SegmentLabel == label.name
        assert item.SegmentDescription == f"{label.name} (label {label_id})"
        assert item.TrackingID == label.name
        assert item.TrackingUID.startswith("2.25.")
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        assert (category.CodingSchemeDesignator, category.CodeValue) == (
            label.category.scheme,
            label.category.code,
        )
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        assert (prop.CodingSchemeDesignator, prop.CodeValue, prop.CodeMeaning) == (
            label.type.scheme,
            label.type.code,
            label.type.meaning,
        )
        modifiers = prop.get("SegmentedPropertyTypeModifierCodeSequence", [])
        if label.modifier is None:
            assert not modifiers
        else:
            assert [m.CodeValue for m in modifiers] == [label.modifier.code]
        lab = hd.color.CIELabColor.from_dicom_value(tuple(item.RecommendedDisplayCIELabValue))
        assert lab.to_rgb() == label.color
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "demo"
        assert algorithm.AlgorithmVersion == f"1.0 sha256:{WEIGHTS_SHA256[:16]}"
        assert f"weights_sha256={WEIGHTS_SHA256}" in algorithm.AlgorithmParameters
        family = algorithm.AlgorithmFamilyCodeSequence[0]
        assert (family.CodingSchemeDesignator, family.CodeValue) == ("DCM", "123110")
    assert seg.SeriesDescription == "SEG demo 1.0"
    assert seg.ContentLabel == "DEMO"
    assert str(seg.ContentCreatorName) == "dicom-node^"
    assert seg.SeriesNumber == 9901
    assert seg.StudyInstanceUID == series[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == series[0].FrameOfReferenceUID


@pytest.mark.filterwarnings("ignore:The value length")  # the 80 characters of a source
@pytest.mark.parametrize(
    ("source_description", "expected"),
    [
        ("t1_vibe_dixon_tra_W", "SEG demo 1.0: t1_vibe_dixon_tra_W"),
        ("Schädel MRT", "SEG demo 1.0: Schadel MRT"),  # in the SEG's default characters
        ("x" * 80, "SEG demo 1.0: " + "x" * 50),  # LO: 64 characters
    ],
)
def test_the_seg_series_description_names_the_series_it_segments(
    series: list[Dataset], label_map: np.ndarray, source_description: str, expected: str
) -> None:
    """A study browser shows a series' description, not what it references: a study with
    SEGs of its T1 and its water image showed two alike 'SEG demo 1.0'."""
    described = copy.deepcopy(series)
    for source in described:
        source.SpecificCharacterSet = "ISO_IR 192"
        source.SeriesDescription = source_description
    seg = _encode(label_map, described)
    assert seg.SeriesDescription == expected


def test_labelmap_adds_background_segment_zero(
    series: list[Dataset], label_map: np.ndarray
) -> None:
    seg = _encode(label_map, series, format="labelmap")
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    assert numbers == [0, 1, 2, 3]
    assert seg.SegmentSequence[0].SegmentLabel == "Background"


def test_absent_label_is_not_a_segment(series: list[Dataset], label_map: np.ndarray) -> None:
    for fmt in SegFormat:
        seg = _encode(label_map, series, format=fmt)
        assert "spleen" not in {s.SegmentLabel for s in seg.SegmentSequence}
    assert segment_mapping(label_map, CATALOGUE) == {1: 1, 5: 2, 6: 3}


def test_binary_omits_empty_frames(series: list[Dataset], label_map: np.ndarray) -> None:
    seg = _encode(label_map, series)
    expected_frames = sum(
        int((label_map[z] == label_id).any())
        for label_id in PRESENT_IDS
        for z in range(label_map.shape[0])
    )
    assert seg.NumberOfFrames == expected_frames


def test_every_source_instance_is_referenced(series: list[Dataset], label_map: np.ndarray) -> None:
    seg = _encode(label_map, series)
    referenced = {
        item.ReferencedSOPInstanceUID
        for ref_series in seg.ReferencedSeriesSequence
        for item in ref_series.ReferencedInstanceSequence
    }
    assert referenced == {ds.SOPInstanceUID for ds in series}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series[0].SeriesInstanceUID


def test_sources_with_an_empty_sop_class_are_referenced_by_their_file_meta(
    series: list[Dataset], label_map: np.ndarray
) -> None:
    """Some devices write an empty SOP Class UID (the JPEG 2000 CT in ../shared); the node
    stores them under the class of their file meta. highdicom failed on them with a bare
    KeyError(''); the SEG references them by their file meta's class, a Type 1 value."""
    sources = copy.deepcopy(series)
    for ds in sources:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.SOPClassUID = ""
    seg = _encode(label_map, sources)
    classes = {
        item.ReferencedSOPClassUID
        for ref_series in seg.ReferencedSeriesSequence
        for item in ref_series.ReferencedInstanceSequence
    }
    assert classes == {series[0].SOPClassUID}
    assert all(ds.SOPClassUID == "" for ds in sources)  # the caller's datasets unchanged
    del sources[3].file_meta.MediaStorageSOPClassUID
    with pytest.raises(ValueError, match=f"{sources[3].SOPInstanceUID} has no SOP Class UID"):
        _encode(label_map, sources)


def test_uids_are_deterministic(series: list[Dataset], label_map: np.ndarray) -> None:
    first = _encode(label_map, series)
    again = _encode(label_map, series)
    recompressed = _encode(label_map, series, compression="jpeg2000")
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (
        again.SOPInstanceUID,
        again.SeriesInstanceUID,
    )
    assert first.SOPInstanceUID == recompressed.SOPInstanceUID
    labelmap = _encode(label_map, series, format="labelmap")
    other_weights = _encode(label_map, series, weights_sha256=OTHER_SHA256)
    other_model = _encode(label_map, series, model_name="vibe")
    for other in (labelmap, other_weights, other_model):
        assert other.SOPInstanceUID != first.SOPInstanceUID
        assert other.SeriesInstanceUID != first.SeriesInstanceUID
    assert first.SOPInstanceUID != first.SeriesInstanceUID
    # Tracking UIDs identify the structure, not the weights.
    assert [s.TrackingUID for s in first.SegmentSequence] == [
        s.TrackingUID for s in other_weights.SegmentSequence
    ]
    for uid in (first.SOPInstanceUID, first.SeriesInstanceUID):
        assert len(uid) <= 64


def test_other_content_is_a_new_instance_of_the_same_seg_series(
    series: list[Dataset], label_map: np.ndarray
) -> None:
    """Other voxels (other inference settings), a corrected code or colour, a new model
    version: other content, so a new SOP Instance UID. Before, they kept the UID, and a PACS
    keeping the first copy of a UID ignored the corrected SEG."""
    first = _encode(label_map, series)
    moved = label_map.copy()
    moved[moved == PRESENT_IDS[0]] = 0
    moved[0, 0, 0] = PRESENT_IDS[0]
    recoded = Catalogue(
        labels=[
            dataclasses.replace(lb, type=Code("SCT", "36765005", "Subclavian artery"))
            if lb.id == PRESENT_IDS[0]
            else lb
            for lb in CATALOGUE.labels
        ]
    )
    others = {
        "voxels": _encode(moved, series),
        "code": encode_seg(
            label_map,
            series,
            recoded,
            model_name="demo",
            model_version="1.0",
            weights_sha256=WEIGHTS_SHA256,
        ),
        "version": _encode(label_map, series, model_version="1.1"),
    }
    for what, other in others.items():
        assert other.SeriesInstanceUID == first.SeriesInstanceUID, what
        assert other.SOPInstanceUID != first.SOPInstanceUID, what
    assert _encode(label_map.copy(), series).SOPInstanceUID == first.SOPInstanceUID


def test_other_source_images_are_a_new_instance_of_the_same_seg_series(
    series: list[Dataset], label_map: np.ndarray, multiframe: Dataset
) -> None:
    """More images of a series (a later version) or another stack of it: other content, so a
    new SOP Instance UID (a PACS keeping the first copy of a UID would ignore the re-send)."""
    first = _encode(label_map, series)
    fewer = _encode(label_map[1:], series[1:], instance_number=2)
    assert fewer.SeriesInstanceUID == first.SeriesInstanceUID
    assert fewer.SOPInstanceUID != first.SOPInstanceUID
    assert (first.InstanceNumber, fewer.InstanceNumber) == (1, 2)
    # The frames of a multi-frame image segmented are part of what was segmented.
    n = label_map.shape[0]
    whole = _encode(label_map, multiframe)
    frames = _encode(label_map[1:], multiframe, source_frames=list(range(2, n + 1)))
    again = _encode(label_map[1:], multiframe, source_frames=list(range(2, n + 1)))
    assert frames.SOPInstanceUID != whole.SOPInstanceUID
    assert frames.SOPInstanceUID == again.SOPInstanceUID


# --- refusals ---------------------------------------------------------------------------------


def test_empty_label_map_raises_dedicated_error(
    series: list[Dataset], label_map: np.ndarray
) -> None:
    with pytest.raises(EmptySegmentationError) as info:
        _encode(np.zeros_like(label_map), series)
    assert isinstance(info.value, DicomNodeError)


@pytest.mark.parametrize("comp", ["rle", "jpegls"])
def test_binary_refuses_unsupported_compression(
    series: list[Dataset], label_map: np.ndarray, comp: str
) -> None:
    with pytest.raises(ValueError, match="use one of: none, jpeg2000"):
        _encode(label_map, series, compression=comp)


def test_refuses_unknown_names(series: list[Dataset], label_map: np.ndarray) -> None:
    with pytest.raises(ValueError):
        _encode(label_map, series, format="fractional")
    with pytest.raises(ValueError):
        _encode(label_map, series, compression="jpeg")


def test_refuses_mismatched_shape(series: list[Dataset], label_map: np.ndarray) -> None:
    with pytest.raises(ValueError, match="does not match the sources"):
        _encode(label_map[1:], series)
    with pytest.raises(ValueError, match="does not match the sources"):
        _encode(label_map[:, 1:], series)


def test_refuses_undescribed_label(series: list[Dataset], label_map: np.ndarray) -> None:
    bad = label_map.copy()
    bad[3, 0, 0] = 9
    with pytest.raises(ValueError, match=r"values \[9\]"):
        _encode(bad, series)


def test_refuses_bad_hash_and_dtype(series: list[Dataset], label_map: np.ndarray) -> None:
    with pytest.raises(ValueError, match="64 hexadecimal"):
        _encode(label_map, series, weights_sha256="abc")
    with pytest.raises(TypeError, match="unsigned"):
        _encode(label_map.astype(np.int16), series)


def test_label_volumes_ml_lists_every_label(label_map: np.ndarray) -> None:
    volumes = label_volumes_ml(label_map, 1.5 * 1.25 * 3.0, CATALOGUE)
    counts = np.bincount(label_map.ravel(), minlength=7)
    assert [(i, n) for i, n, _ in volumes] == [(lab.id, lab.name) for lab in CATALOGUE.labels]
    for label_id, _, ml in volumes:
        assert ml == pytest.approx(counts[label_id] * 5.625 / 1000.0)
    assert dict((i, ml) for i, _, ml in volumes)[2] == 0.0


def test_label_volumes_ml_counts_across_chunks() -> None:
    # More voxels than one counting chunk (1 Mi), with labels in the first and last voxels.
    label_map = np.zeros((17, 256, 256), dtype=np.uint16)
    label_map[0, 0, 0] = 1
    label_map[-1, -1, -2:] = 6
    label_map[8] = 5
    volumes = {i: ml for i, _, ml in label_volumes_ml(label_map, 1000.0, CATALOGUE)}
    assert volumes == {1: 1.0, 2: 0.0, 5: 65536.0, 6: 2.0}


def _save_as_bytes(seg: Dataset) -> bytes:
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("source", ["single-frame", "multi-frame"])
@pytest.mark.parametrize(("fmt", "comp"), COMBINATIONS, ids=lambda v: v.value)
def test_seg_to_bytes_writes_what_save_as_writes(
    series: list[Dataset],
    multiframe: Dataset,
    label_map: np.ndarray,
    fmt: SegFormat,
    comp: SegCompression,
    source: str,
) -> None:
    seg = _encode(
        label_map, series if source == "single-frame" else multiframe, format=fmt, compression=comp
    )
    # save_as corrects VRs in place: the reference is written from an untouched copy.
    reference = _save_as_bytes(copy.deepcopy(seg))
    assert seg_to_bytes(seg) == reference
    assert _save_as_bytes(seg) == reference


def test_seg_to_bytes_leaves_unusual_datasets_to_pydicom(
    series: list[Dataset], label_map: np.ndarray
) -> None:
    seg = _encode(label_map, series)
    # An ambiguous VR inside a per-frame item needs the top level's Pixel Representation.
    seg.PerFrameFunctionalGroupsSequence[0].add(DataElement(0x00280106, "US or SS", 0))
    assert seg_to_bytes(copy.deepcopy(seg)) == _save_as_bytes(copy.deepcopy(seg))
    seg.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    implicit = seg_to_bytes(copy.deepcopy(seg))
    assert implicit == _save_as_bytes(copy.deepcopy(seg))
    assert pydicom.dcmread(io.BytesIO(implicit)).NumberOfFrames == seg.NumberOfFrames


# --- independent validators and readers -------------------------------------------------------


@pytest.mark.peers
@pytest.mark.parametrize("source", ["single-frame", "multi-frame"])
def test_binary_seg_passes_dciodvfy(
    tmp_path: Path,
    series: list[Dataset],
    multiframe: Dataset,
    label_map: np.ndarray,
    source: str,
) -> None:
    seg = _encode(label_map, series if source == "single-frame" else multiframe)
    path = tmp_path / "seg.dcm"
    path.write_bytes(seg_to_bytes(seg))  # what the node sends
    output = dciodvfy(path)
    assert "Warning" not in output, output


@pytest.mark.peers
@pytest.mark.parametrize("how", ["absent", "empty"])
def test_source_without_slice_thickness(
    tmp_path: Path, series: list[Dataset], label_map: np.ndarray, how: str
) -> None:
    """Slice Thickness is Type 2 (may be empty) and some sources leave it out: highdicom
    failed on the absent one, and an empty one gave a SEG dciodvfy flags (its pixel measures
    need a thickness). The SEG's planes are as thick as the slices are apart."""
    sources = copy.deepcopy(series)
    for ds in sources:
        if how == "absent":
            del ds.SliceThickness
        else:
            ds.SliceThickness = None
    before = copy.deepcopy(sources)
    seg = _encode(label_map, sources)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == 3.0  # the slices lie 3 mm apart
    path = tmp_path / "seg.dcm"
    path.write_bytes(seg_to_bytes(seg))
    output = dciodvfy(path)
    assert "Warning" not in output and "Error" not in output, output
    assert sources == before  # the caller's datasets are left as they were


def _drop(*keywords: str) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for keyword in keywords:
            delattr(ds, keyword)

    return change


def _name(charset: str | list[str], name: str) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        ds.SpecificCharacterSet = charset
        ds.PatientName = name

    return change


HEADER_VARIANTS: dict[str, Callable[[Dataset], None]] = {
    # Type 2 attributes some sources leave out (anonymisers, research exports)
    "no-patient-id": _drop("PatientID"),
    "no-birth-date-or-sex": _drop("PatientBirthDate", "PatientSex"),
    "no-study-date-and-time": _drop("StudyDate", "StudyTime"),
    "no-accession-number-or-study-id": _drop("AccessionNumber", "StudyID"),
    # Patient names beyond ASCII, as German, Japanese and other sites send them
    "latin-1": _name("ISO_IR 100", "Müller^Jörg"),
    "utf-8": _name("ISO_IR 192", "Müller^Jörg=山田^太郎"),
    "iso-2022-japanese": _name(["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎"),
    # The JIS set alone, without the default repertoire (some devices): pydicom could not
    # code a name with an empty component in it
    "iso-2022-japanese-alone": _name("ISO 2022 IR 87", "Yamada^^Tarou"),
    # The default repertoire named rather than left empty: any multi-valued set whose first
    # value was not empty failed the job ("TypeError: unhashable type: 'MultiValue'")
    "iso-2022-japanese-named-default": _name(
        ["ISO 2022 IR 6", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎"
    ),
    # Korean, which highdicom's list of character sets lacks (ValueError)
    "iso-2022-korean": _name(["ISO 2022 IR 6", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동"),
    "iso-2022-japanese-katakana": _name(
        ["ISO 2022 IR 13", "ISO 2022 IR 87"], "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"
    ),
    "gb18030": _name("GB18030", "Wang^XiaoDong=王^小东="),
}


@pytest.mark.peers
@pytest.mark.parametrize("variant", HEADER_VARIANTS)
def test_source_headers_the_standard_allows(
    tmp_path: Path, series: list[Dataset], label_map: np.ndarray, variant: str
) -> None:
    """highdicom failed on sources without some Type 2 attributes (AttributeError) and on
    an ISO 2022 character set whose first value is empty (the default repertoire): the job
    failed and the radiologist got no SEG. The SEG carries the source's patient and study
    as they are (empty where absent), names decode to the same text, and dciodvfy finds no
    error."""
    sources = copy.deepcopy(series)
    for ds in sources:
        HEADER_VARIANTS[variant](ds)
    before = copy.deepcopy(sources)
    path = tmp_path / "seg.dcm"
    path.write_bytes(seg_to_bytes(_encode(label_map, sources)))
    back = pydicom.dcmread(path)
    source = sources[0]
    assert str(back.PatientName) == str(source.get("PatientName", ""))
    copied = ("PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime")
    for keyword in (*copied, "AccessionNumber", "StudyID"):
        assert str(back.get(keyword, "")) == str(source.get(keyword, "")), keyword
    assert back.StudyInstanceUID == source.StudyInstanceUID
    errors = [line for line in dciodvfy(path).splitlines() if line.startswith("Error")]
    assert not errors, errors
    assert sources == before  # the caller's datasets are left as they were


@pytest.mark.peers
def test_dcentvfy_finds_seg_consistent_with_sources(
    tmp_path: Path, series: list[Dataset], series_dir: list[Path], label_map: np.ndarray
) -> None:
    path = tmp_path / "seg.dcm"
    _encode(label_map, series).save_as(path)
    dcentvfy(path, series_dir)


def _segimage2itkimage() -> str:
    exe = shutil.which("segimage2itkimage") or str(
        Path(__file__).resolve().parents[1] / ".venv" / "bin" / "segimage2itkimage"
    )
    if not Path(exe).exists():
        pytest.skip("segimage2itkimage not installed (PyPI package dcmqi)")
    return exe


@pytest.mark.peers
@pytest.mark.parametrize(
    ("fmt", "comp"),
    [("binary", "none"), ("labelmap", "none"), ("labelmap", "rle")],
)
def test_dcmqi_reads_same_voxel_counts(
    tmp_path: Path, series: list[Dataset], label_map: np.ndarray, fmt: str, comp: str
) -> None:
    sitk = pytest.importorskip("SimpleITK")
    exe = _segimage2itkimage()
    path = tmp_path / "seg.dcm"
    _encode(label_map, series, format=fmt, compression=comp).save_as(path)
    out = tmp_path / "dcmqi"
    out.mkdir()
    run = subprocess.run(
        [exe, "--inputDICOM", str(path), "--outputDirectory", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ContentCreatorName" not in run.stdout + run.stderr  # no "absent" warning
    counts: dict[int, int] = {}
    for nrrd in sorted(out.glob("*.nrrd")):
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(nrrd)))
        values, n = np.unique(array[array > 0], return_counts=True)
        if fmt == "binary":
            # One file per segment, named by segment number, voxels set to that number or 1.
            counts[int(nrrd.stem)] = int(n.sum())
        else:
            counts.update({int(v): int(c) for v, c in zip(values, n, strict=True)})
    expected = {
        number: int((label_map == label_id).sum())
        for number, label_id in enumerate(PRESENT_IDS, start=1)
    }
    assert counts == expected
    meta = json.loads((out / "meta.json").read_text())
    labels = [seg["SegmentLabel"] for group in meta["segmentAttributes"] for seg in group]
    assert labels == ["liver", "kidney_right", "kidney_left"]


@pytest.mark.peers
def test_dcmqi_cannot_decode_jpegls_or_jpeg2000(
    tmp_path: Path, series: list[Dataset], label_map: np.ndarray
) -> None:
    """Documents a reader limit: dcmqi 1.5.7 (DCMTK) takes JPEG-LS/JPEG 2000 SEGs for lossy.

    If this starts failing, dcmqi learnt to read them: update docs/seg_output.md.
    """
    exe = _segimage2itkimage()
    for fmt, comp in [("labelmap", "jpegls"), ("binary", "jpeg2000")]:
        path = tmp_path / f"{fmt}-{comp}.dcm"
        _encode(label_map, series, format=fmt, compression=comp).save_as(path)
        out = tmp_path / f"out-{fmt}-{comp}"
        out.mkdir()
        run = subprocess.run(
            [exe, "--inputDICOM", str(path), "--outputDirectory", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode != 0


@pytest.mark.peers
@pytest.mark.parametrize("name", ["demo", "vibe", "total", "total_mr"])
def test_shipped_catalogue_with_every_label_passes_dciodvfy(
    tmp_path: Path, series: list[Dataset], name: str
) -> None:
    """Every shipped label's name, codes and colour make a valid segment."""
    catalogue = load_catalogue(name)
    label_map = np.zeros((8, 32, 32), dtype=np.uint8)
    flat = label_map.reshape(-1)
    for k, label in enumerate(catalogue.labels):
        flat[k * 60 : k * 60 + 40] = label.id
    seg = encode_seg(
        label_map,
        series,
        catalogue,
        model_name=name,
        model_version="2.0",
        weights_sha256=WEIGHTS_SHA256,
    )
    assert len(seg.SegmentSequence) == len(catalogue.labels)
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    dciodvfy(path)
    by_label = {item.SegmentLabel: item for item in seg.SegmentSequence}
    if name == "total":
        region = by_label["kidney_cyst_left"].AnatomicRegionSequence[0]
        assert region.CodeValue == "64033007"
        assert region.AnatomicRegionModifierSequence[0].CodeValue == "7771000"


def test_saved_file_reads_back_with_pydicom(
    tmp_path: Path, series: list[Dataset], label_map: np.ndarray
) -> None:
    path = tmp_path / "seg.dcm"
    _encode(label_map, series, format="labelmap", compression="jpegls").save_as(path)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLSLossless
    assert ds.Modality == "SEG"
