"""dicom_node.volume: synthetic round trips, real scanner data against dcm2niix, refusals."""

from __future__ import annotations

import copy
import errno
import itertools
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import JPEGLSLossless, RLELossless, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dicom_phantoms as dp

from dicom_node.errors import SeriesError
from dicom_node.volume import (
    StackChoice,
    Volume,
    reorient_to_closest_canonical,
    volume_from_folder,
    volume_from_series,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"
PHANTOM = dp.SimplePhantom()
RESCALE = (2.0, -100.0)
# Rescale quantisation (slope / 2) plus the sampler's own integer rounding.
SAMPLE_TOLERANCE = RESCALE[0] / 2 + 1.0


def voxel_points(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return dp.grid_points(affine, shape[:3])


def write(tmp_path: Path, name: str = "s", **kw: object) -> dp.WrittenSeries:
    kw.setdefault("rescale", RESCALE)
    return dp.write_series(tmp_path / name, PHANTOM, **kw)  # type: ignore[arg-type]


# ---- (a) synthetic round trips ------------------------------------------------------

ROUND_TRIPS = list(
    itertools.product(dp.ORIENTATIONS, (False, True), ("HFS", "FFS", "HFP"), (False, True))
)


@pytest.mark.parametrize(
    ("orientation", "reverse", "position", "enhanced"),
    ROUND_TRIPS,
    ids=[
        f"{o}-{'rev' if r else 'fwd'}-{p}-{'enh' if e else 'single'}" for o, r, p, e in ROUND_TRIPS
    ],
)
def test_round_trip_geometry_and_values(
    tmp_path: Path, orientation: str, reverse: bool, position: str, enhanced: bool
) -> None:
    written = write(
        tmp_path,
        orientation=orientation,
        reverse_order=reverse,
        patient_position=position,
        enhanced=enhanced,
    )
    volume = volume_from_series(written.paths)

    assert volume.array.dtype == np.float32
    assert volume.array.shape == written.shape
    np.testing.assert_allclose(volume.affine, written.affine, atol=1e-4)
    np.testing.assert_array_equal(volume.array, written.array)
    # The phantom sampled at our voxel centres reproduces what we read.
    sampled = PHANTOM(voxel_points(volume.affine, volume.array.shape).reshape(-1, 3))
    assert np.abs(sampled.reshape(volume.array.shape) - volume.array).max() <= SAMPLE_TOLERANCE

    assert volume.spacing_zyx == pytest.approx((5.0, 5.5, 5.0), abs=1e-6)
    np.testing.assert_allclose(volume.direction @ volume.direction.T, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(volume.origin, written.affine[:3, 3], atol=1e-4)
    assert volume.modality == "MR"
    assert volume.frame_of_reference_uid == written.uids.frame_of_reference_uid
    assert volume.series_instance_uid == written.uids.series_instance_uid
    assert all("PixelData" not in ds for ds in volume.source_datasets)
    assert volume.source_datasets[0].PatientID == written.uids.patient_id
    assert len(volume.frames) == written.shape[0]
    _check_frame_refs(volume, written, enhanced)


def _check_frame_refs(volume: Volume, written: dp.WrittenSeries, enhanced: bool) -> None:
    if not enhanced:
        assert [f.sop_instance_uid for f in volume.frames] == written.sop_instance_uids
        assert all(f.frame_number is None for f in volume.frames)
        assert len(volume.source_datasets) == len(written.paths)
        return
    assert len(volume.source_datasets) == 1
    assert {f.sop_instance_uid for f in volume.frames} == set(written.sop_instance_uids)
    assert {f.sop_class_uid for f in volume.frames} == {dp.EnhancedMRImageStorage}
    # Frame number k (1-based) of the file must lie where slice z says it does.
    per_frame = pydicom.dcmread(written.paths[0]).PerFrameFunctionalGroupsSequence
    for z, ref in enumerate(volume.frames):
        assert ref.frame_number is not None
        position = per_frame[ref.frame_number - 1].PlanePositionSequence[0].ImagePositionPatient
        expected = volume.affine @ np.array([0.0, 0.0, z, 1.0])
        np.testing.assert_allclose([float(v) for v in position], expected[:3], atol=1e-4)


def test_instance_numbers_are_ignored(tmp_path: Path) -> None:
    """Datasets given in InstanceNumber order with shuffled numbers still sort by position."""
    written = write(tmp_path, shuffle_instance_numbers=True, seed=5)
    datasets = sorted(
        (pydicom.dcmread(p) for p in written.paths), key=lambda ds: int(ds.InstanceNumber)
    )
    assert [ds.SOPInstanceUID for ds in datasets] != written.sop_instance_uids
    volume = volume_from_series(datasets)
    np.testing.assert_array_equal(volume.array, written.array)
    assert [f.sop_instance_uid for f in volume.frames] == written.sop_instance_uids


ORIENT_CASES = list(itertools.product(dp.ORIENTATIONS, ("HFS", "FFS", "HFP", "HFDL")))


@pytest.mark.parametrize(
    ("orientation", "position"), ORIENT_CASES, ids=[f"{o}-{p}" for o, p in ORIENT_CASES]
)
def test_reorient_to_closest_canonical(tmp_path: Path, orientation: str, position: str) -> None:
    written = write(tmp_path, orientation=orientation, patient_position=position)
    volume = volume_from_series(written.paths)
    canonical, affine, inverse = reorient_to_closest_canonical(volume.array, volume.affine)

    # Axes now point L, P, S: each index axis' strongest LPS component is its own, positive.
    direction = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    for axis in range(3):
        assert int(np.argmax(np.abs(direction[:, axis]))) == axis
        assert direction[axis, axis] > 0.8  # oblique20 keeps its two 20-degree tilts
    # Same voxels, same places: only the indexing changed.
    sampled = PHANTOM(voxel_points(affine, canonical.shape).reshape(-1, 3))
    assert np.abs(sampled.reshape(canonical.shape) - canonical).max() <= SAMPLE_TOLERANCE
    assert sorted(canonical.shape) == sorted(volume.array.shape)
    # Exact inverse, for intensities and for a label map predicted on the canonical grid.
    np.testing.assert_array_equal(inverse(canonical), volume.array)
    labels_canonical = PHANTOM.labels(voxel_points(affine, canonical.shape).reshape(-1, 3))
    labels_source = PHANTOM.labels(voxel_points(volume.affine, volume.array.shape).reshape(-1, 3))
    back = inverse(labels_canonical.reshape(canonical.shape))
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, labels_source.reshape(volume.array.shape))
    assert set(np.unique(back)) >= {0, 1, 2, 3}


@pytest.mark.parametrize("orientation", ["axial", "sagittal", "coronal"])
def test_canonical_matches_simpleitk_dicomorient(tmp_path: Path, orientation: str) -> None:
    """An independent implementation gives the same array and origin for orthogonal grids."""
    written = write(tmp_path, orientation=orientation, patient_position="HFDR")
    volume = volume_from_series(written.paths)
    canonical, affine, _ = reorient_to_closest_canonical(volume.array, volume.affine)

    image = sitk.GetImageFromArray(volume.array)
    image.SetSpacing(volume.spacing_zyx[::-1])
    image.SetOrigin(tuple(volume.origin))
    image.SetDirection(tuple(volume.direction.flatten()))
    oriented = sitk.DICOMOrient(image, "LPS")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(oriented), canonical)
    np.testing.assert_allclose(oriented.GetOrigin(), affine[:3, 3], atol=1e-6)
    np.testing.assert_allclose(
        np.array(oriented.GetDirection()).reshape(3, 3), np.eye(3), atol=1e-9
    )


AXES_CASES = list(itertools.product(["RAS", "LAS", "PIR", "SAL"], ["axial", "sagittal", "coronal"]))


@pytest.mark.parametrize(
    ("axes", "orientation"), AXES_CASES, ids=[f"{a}-{o}" for a, o in AXES_CASES]
)
def test_other_model_axes_match_simpleitk_dicomorient(
    tmp_path: Path, axes: str, orientation: str
) -> None:
    """A model trained on NIfTI's canonical orientation (TotalSegmentator: x towards the
    patient's right, y anterior) gets its array that way: the node's LPS array is rotated
    180 degrees for it. SimpleITK turns the same image to the same axes independently."""
    written = write(tmp_path, orientation=orientation, patient_position="FFS")
    volume = volume_from_series(written.paths)
    turned, affine, inverse = reorient_to_closest_canonical(volume.array, volume.affine, axes)

    image = sitk.GetImageFromArray(volume.array)
    image.SetSpacing(volume.spacing_zyx[::-1])
    image.SetOrigin(tuple(volume.origin))
    image.SetDirection(tuple(volume.direction.flatten()))
    oriented = sitk.DICOMOrient(image, axes)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(oriented), turned)
    np.testing.assert_allclose(oriented.GetOrigin(), affine[:3, 3], atol=1e-6)
    direction = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    np.testing.assert_allclose(
        np.array(oriented.GetDirection()).reshape(3, 3), direction, atol=1e-9
    )
    np.testing.assert_array_equal(inverse(turned), volume.array)


@pytest.mark.parametrize("axes", ["LPX", "LLS", "RA", "LPSS", ""])
def test_invalid_model_axes_are_refused(tmp_path: Path, axes: str) -> None:
    volume = volume_from_series(write(tmp_path).paths)
    with pytest.raises(ValueError, match="one of L/R, one of P/A and one of S/I"):
        reorient_to_closest_canonical(volume.array, volume.affine, axes)


def test_canonical_is_identity_for_axial_hfs(tmp_path: Path) -> None:
    volume = volume_from_series(write(tmp_path).paths)
    canonical, affine, _ = reorient_to_closest_canonical(volume.array, volume.affine)
    np.testing.assert_array_equal(canonical, volume.array)
    np.testing.assert_array_equal(affine, volume.affine)


def test_inverse_refuses_wrong_shape(tmp_path: Path) -> None:
    volume = volume_from_series(write(tmp_path, orientation="sagittal").paths)
    _, _, inverse = reorient_to_closest_canonical(volume.array, volume.affine)
    with pytest.raises(ValueError, match="canonical shape"):
        inverse(volume.array[:, :, :-1])


# ---- compressed transfer syntaxes ----------------------------------------------------


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless], ids=["rle", "jpeg-ls"])
@pytest.mark.parametrize("enhanced", [False, True], ids=["single", "enhanced"])
def test_compressed_reads_equal_to_uncompressed(
    tmp_path: Path, syntax: str, enhanced: bool
) -> None:
    plain = volume_from_series(write(tmp_path, "plain", enhanced=enhanced).paths)
    written = write(tmp_path, "packed", enhanced=enhanced, transfer_syntax=syntax)
    assert pydicom.dcmread(written.paths[0]).file_meta.TransferSyntaxUID == syntax
    packed = volume_from_series(written.paths)
    np.testing.assert_array_equal(packed.array, plain.array)
    np.testing.assert_allclose(packed.affine, plain.affine, atol=1e-9)


# ---- (b) real scanner data against dcm2niix -----------------------------------------

REAL_SERIES = [
    "mr_siemens_t1_fl2d_sag_HFS",
    "mr_siemens_t1_fl2d_sag_HFDL",
    "mr_siemens_xa30_enhanced_t1w",
]


def _dcm2niix() -> str:
    local = Path(sys.executable).parent / "dcm2niix"
    found = str(local) if local.exists() else shutil.which("dcm2niix")
    if found is None:
        pytest.skip("dcm2niix is not installed (pip install dcm2niix)")
    return found


@pytest.mark.parametrize("name", REAL_SERIES)
def test_real_series_matches_dcm2niix(tmp_path: Path, name: str) -> None:
    folder = DATA / name
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent (shared test data is not part of a checkout)")
    nib = pytest.importorskip("nibabel")
    result = subprocess.run(
        [_dcm2niix(), "-z", "n", "-b", "n", "-f", "ref", "-o", str(tmp_path), str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    niftis = sorted(tmp_path.glob("*.nii"))
    assert len(niftis) == 1, [p.name for p in niftis]

    volume = volume_from_folder(folder)
    image = nib.load(niftis[0])
    reference = np.asarray(image.get_fdata(dtype=np.float64))  # scl_slope/inter applied
    ras_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    nifti_lps = ras_to_lps @ image.affine
    assert reference.size == volume.array.size

    # Map each of our voxel centres into the NIfTI's index space: it must land on a voxel
    # centre (dcm2niix may flip or permute axes), within 1e-3 mm, and hold the same value.
    ours = voxel_points(volume.affine, volume.array.shape).reshape(-1, 3)
    ijk = (np.c_[ours, np.ones(len(ours))] @ np.linalg.inv(nifti_lps).T)[:, :3]
    ijk_round = np.rint(ijk)
    theirs = np.c_[ijk_round, np.ones(len(ours))] @ nifti_lps.T
    assert np.abs(theirs[:, :3] - ours).max() < 1e-3
    index = ijk_round.astype(int)
    for axis in range(3):
        assert index[:, axis].min() == 0
        assert index[:, axis].max() == reference.shape[axis] - 1
    values = reference[index[:, 0], index[:, 1], index[:, 2]]
    np.testing.assert_array_equal(values, volume.array.reshape(-1).astype(np.float64))
    assert len(np.unique(index, axis=0)) == len(index)  # one to one


def test_real_hfs_and_hfdl_series_are_sorted_and_described() -> None:
    folder = DATA / "mr_siemens_t1_fl2d_sag_HFDL"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent (shared test data is not part of a checkout)")
    volume = volume_from_folder(folder)
    assert volume.array.shape == (35, 256, 256)
    assert volume.spacing_zyx == pytest.approx((4.8, 1.015625, 1.015625), abs=1e-5)
    assert volume.source_datasets[0].PatientPosition == "HFDL"
    # Sagittal: slices along the L-R axis, +normal points to the patient's right.
    np.testing.assert_allclose(volume.direction[:, 2], [-1.0, 0.0, 0.0], atol=1e-6)


def test_real_enhanced_frame_refs() -> None:
    folder = DATA / "mr_siemens_xa30_enhanced_t1w"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent (shared test data is not part of a checkout)")
    volume = volume_from_folder(folder)
    assert volume.array.shape == (96, 128, 128)
    assert sorted(f.frame_number or 0 for f in volume.frames) == list(range(1, 97))
    assert {f.sop_class_uid for f in volume.frames} == {"1.2.840.10008.5.1.4.1.1.4.1"}


def _as_class(path: Path, out: Path, sop_class_uid: str) -> Path:
    """A copy of an image with another SOP class and its own SOP Instance UID."""
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out, enforce_file_format=True)
    return out


def test_objects_no_model_reads_are_refused_or_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A series of a SEG (the node's own, sent back by a PACS forwarding whole studies) is
    refused by name; an odd non-image object among the images is left out, and said."""
    written = write(tmp_path, shuffle_instance_numbers=False)
    seg = _as_class(written.paths[0], tmp_path / "seg.dcm", "1.2.840.10008.5.1.4.1.1.66.4")
    with pytest.raises(SeriesError, match="Segmentation Storage objects are not images a model"):
        volume_from_series([seg])
    report = _as_class(written.paths[0], tmp_path / "sr.dcm", "1.2.840.10008.5.1.4.1.1.88.33")
    caplog.set_level("INFO")
    volume = volume_from_series([*written.paths, report])
    np.testing.assert_allclose(volume.array, written.array, atol=SAMPLE_TOLERANCE)
    assert len(volume.source_datasets) == len(written.paths)
    assert "1 object(s) left out, not images a model reads: Comprehensive SR Storage" in caplog.text


# ---- (c) the JPEG 2000 CT with empty UIDs -------------------------------------------

CT = DATA / "ct_siemens_example_jpeg2000_no_uids"


def test_ct_with_empty_uids_is_refused_by_name() -> None:
    if not CT.is_dir():
        pytest.skip(f"{CT} is absent (shared test data is not part of a checkout)")
    with pytest.raises(SeriesError) as caught:
        volume_from_folder(CT)
    message = str(caught.value)
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        assert keyword in message
    with pytest.raises(SeriesError, match="SOPInstanceUID"):
        volume_from_series(sorted(CT.iterdir()))


def test_ct_jpeg2000_decodes_once_uids_are_filled() -> None:
    if not CT.is_dir():
        pytest.skip(f"{CT} is absent (shared test data is not part of a checkout)")
    study, series = generate_uid(), generate_uid()
    datasets = []
    for path in sorted(CT.iterdir()):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        datasets.append(ds)
    volume = volume_from_series(datasets)
    assert volume.array.shape == (20, 512, 512)
    assert volume.modality == "CT"
    # Rescale applied: air about -1000 HU, and bone well above water.
    assert volume.array.min() <= -900
    assert volume.array.max() >= 500
    reference = sitk.GetArrayFromImage(sitk.ReadImage([str(p) for p in _sitk_sorted(CT)]))
    np.testing.assert_array_equal(volume.array, reference.astype(np.float32))


def _sitk_sorted(folder: Path) -> list[str]:
    reader = sitk.ImageSeriesReader()
    return list(reader.GetGDCMSeriesFileNames(str(folder)))


# ---- (d) refusals and filtering ------------------------------------------------------


def test_mixed_orientations_are_refused(tmp_path: Path) -> None:
    written = dp.write_mixed_orientation_series(tmp_path / "mixed", PHANTOM)
    with pytest.raises(SeriesError, match="mixed orientations"):
        volume_from_folder(tmp_path / "mixed")
    assert written.paths


BAD_VALUES = {
    # (keyword, value, on one slice or all): what the refusal names
    "position not a number": ("ImagePositionPatient", ["nan", "0", "0"], "not a finite number"),
    "pixel spacing infinite": ("PixelSpacing", ["inf", "2"], "Pixel Spacing is not a finite"),
    "slope not a number": ("RescaleSlope", "nan", "Rescale Slope is not a finite number"),
    "slope with two values": ("RescaleSlope", "1\\2", "Rescale Slope has 2 values"),
    "intercept with two values": ("RescaleIntercept", "0\\1", "Rescale Intercept has 2"),
    "slope beyond float32": ("RescaleSlope", "1e300", "give values no volume can hold"),
    # Not allowed: the slice became a constant (the intercept) in the model's input
    "slope zero": ("RescaleSlope", "0", "Rescale Slope is 0"),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom: invalid DS values, as meant
@pytest.mark.parametrize("case", BAD_VALUES)
def test_geometry_and_rescale_values_that_are_no_numbers_are_refused(
    tmp_path: Path, case: str
) -> None:
    """Found by building volumes from series with random values: NaN positions gave a
    volume with NaN in its affine, NaN or overflowing rescales NaN or inf voxels for the
    model, and multi-valued rescales a TypeError instead of a reason."""
    keyword, value, reason = BAD_VALUES[case]
    written = write(tmp_path, shape=(6, 16, 16))
    ds = pydicom.dcmread(written.paths[3])
    setattr(ds, keyword, value)
    ds.save_as(written.paths[3])
    with pytest.raises(SeriesError, match=reason):
        volume_from_folder(tmp_path / "s")


def test_gap_is_refused(tmp_path: Path) -> None:
    dp.write_gap_series(tmp_path / "gap", PHANTOM, missing=7)
    with pytest.raises(SeriesError, match="slices are missing"):
        volume_from_folder(tmp_path / "gap")


def _place_slices(paths: list[Path], steps: list[float]) -> None:
    """Move the axial slices (in their order along z) to the positions these steps give."""
    order = sorted(paths, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    z = np.concatenate([[0.0], np.cumsum(steps)])
    for path, position in zip(order, z, strict=True):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [
            ds.ImagePositionPatient[0],
            ds.ImagePositionPatient[1],
            round(float(position), 4),
        ]
        ds.save_as(path)


@pytest.mark.parametrize(
    "steps",
    [[1.0] * 20 + [1.12] * 19, list(np.linspace(1.0, 1.14, 39))],
    ids=["two-spacings", "gradual"],
)
def test_spacing_that_drifts_from_an_even_grid_is_refused(
    tmp_path: Path, steps: list[float]
) -> None:
    """Each step within 15% of the median, yet the even grid the volume is put the far
    slices millimetres from their headers' positions: the model saw stretched anatomy."""
    written = write(tmp_path, shape=(40, 8, 8))
    _place_slices(written.paths, steps)
    with pytest.raises(SeriesError, match=r"lies \d+\.\d+ mm from where an even spacing"):
        volume_from_folder(tmp_path / "s")


def test_positions_rounded_by_the_scanner_are_an_even_grid(tmp_path: Path) -> None:
    written = write(tmp_path, shape=(40, 8, 8))
    jitter = np.random.default_rng(0).uniform(-0.02, 0.02, 39)
    _place_slices(written.paths, list(1.0 + np.diff(np.concatenate([[0.0], jitter]))))
    volume = volume_from_folder(tmp_path / "s")
    assert volume.spacing_zyx[0] == pytest.approx(1.0, abs=0.01)


def _copy(path: Path, target: Path, *, other_pixels: bool) -> str:
    """``path`` saved again as ``target`` with a new SOP Instance UID (returned), its
    pixels changed or not."""
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = generate_uid()
    if other_pixels:
        ds.PixelData = (ds.pixel_array + 1).astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(target)
    return str(ds.SOPInstanceUID)


def test_duplicate_positions_are_refused(tmp_path: Path) -> None:
    """Two different images at one place, nothing telling them apart."""
    written = write(tmp_path)
    _copy(written.paths[0], tmp_path / "s" / "duplicate.dcm", other_pixels=True)
    with pytest.raises(SeriesError, match="share a position"):
        volume_from_folder(tmp_path / "s")


def test_an_image_stored_twice_is_used_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same image under a second SOP Instance UID (a series sent again before it was
    complete, an export that duplicated it): whichever copy is read, the slice is the same."""
    written = write(tmp_path)
    copy = tmp_path / "s" / "duplicate.dcm"
    copy_uid = _copy(written.paths[4], copy, other_pixels=False)
    with caplog.at_level("INFO", logger="dicom_node.volume"):
        volume = volume_from_series([*written.paths, copy])
    np.testing.assert_array_equal(volume.array, written.array)
    assert volume.notes == ["1 duplicate image(s) (same position and pixels) left out"]
    assert "1 image(s) left out: copies of other images at the same position" in caplog.text
    uids = [ref.sop_instance_uid for ref in volume.frames]
    assert copy_uid in uids and written.sop_instance_uids[4] not in uids  # the later kept
    assert len(uids) == written.shape[0]


def test_a_whole_series_stored_twice_is_used_once(tmp_path: Path) -> None:
    uids = dp.SeriesUids()
    first = write(tmp_path, uids=uids, file_prefix="A")
    second = write(tmp_path, uids=uids, file_prefix="B")  # same pixels, new SOP UIDs
    volume = volume_from_folder(tmp_path / "s")
    np.testing.assert_array_equal(volume.array, first.array)
    assert volume.notes == [
        f"{first.shape[0]} duplicate image(s) (same position and pixels) left out"
    ]
    assert len(_frame_uids(volume)) == first.shape[0]
    assert _frame_uids(volume) <= set(first.sop_instance_uids) | set(second.sop_instance_uids)


def _resent(count: int) -> str:
    return f"{count} image(s) sent again in a later version replaced their earlier copies"


def _sent_twice(tmp_path: Path, **kw: object) -> tuple[dp.WrittenSeries, dp.WrittenSeries]:
    """One series written twice with the same Study/Series UIDs and new SOP Instance UIDs
    (an anonymiser or archive that re-issues them): the second copy's pixels differ."""
    uids = dp.SeriesUids()
    first = write(tmp_path, uids=uids, file_prefix="A", **kw)
    second = dp.write_series(
        tmp_path / "s", _other, uids=uids, file_prefix="B", rescale=RESCALE, **kw
    )
    return first, second


@pytest.mark.parametrize("enhanced", [False, True], ids=["single", "enh"])
def test_a_series_sent_again_in_a_later_version_replaces_its_copies(
    tmp_path: Path, enhanced: bool, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = _sent_twice(tmp_path, enhanced=enhanced)
    # Arrival order interleaved: the version decides, not the order of the list.
    items = [p for pair in itertools.zip_longest(second.paths, first.paths) for p in pair if p]
    versions = [2 if p in second.paths else 1 for p in items]
    if enhanced:  # two multi-frame images at one place: two stacks, nothing says which is newer
        assert volume_from_series(items).stack.startswith("stack 1 of 2 (SOP Instance UID")
    else:
        with pytest.raises(SeriesError, match="share a position"):
            volume_from_series(items)

    with caplog.at_level("INFO", logger="dicom_node.volume"):
        volume = volume_from_series(items, versions=versions)
    np.testing.assert_array_equal(volume.array, second.array)
    np.testing.assert_allclose(volume.affine, second.affine, atol=1e-4)
    assert {str(d.SOPInstanceUID) for d in volume.source_datasets} == set(second.sop_instance_uids)
    assert _frame_uids(volume) == set(second.sop_instance_uids)
    assert volume.notes == [_resent(second.shape[0])]
    assert volume.stack == ""
    assert f"{second.shape[0]} image(s) of version(s) 1 left out" in caplog.text


def test_a_partial_resend_replaces_only_the_positions_it_covers(tmp_path: Path) -> None:
    uids = dp.SeriesUids()
    first = write(tmp_path, uids=uids, file_prefix="A")
    n = first.shape[0]
    again = list(range(5, 9))
    second = dp.write_series(
        tmp_path / "s",
        _other,
        uids=uids,
        file_prefix="B",
        rescale=RESCALE,
        drop_slices=[z for z in range(n) if z not in again],
    )
    volume = volume_from_series(
        first.paths + second.paths, versions=[1] * n + [2] * len(second.paths)
    )
    expected = first.array.copy()
    expected[again] = second.array[again]
    np.testing.assert_array_equal(volume.array, expected)
    assert volume.notes == [_resent(len(again))]
    assert [ref.sop_instance_uid for ref in volume.frames] == [
        (second if z in again else first).sop_instance_uids[z] for z in range(n)
    ]


def test_copies_within_one_version_are_still_refused(tmp_path: Path) -> None:
    """Two different images at one place that arrived together are not a resend: nothing
    says which one a radiologist means."""
    uids = dp.SeriesUids()
    first = write(tmp_path, uids=uids, file_prefix="A")
    _copy(first.paths[3], tmp_path / "s" / "copy.dcm", other_pixels=True)
    late = dp.write_series(
        tmp_path / "late", PHANTOM, uids=uids, rescale=RESCALE, drop_slices=range(1, 20)
    )
    items = [*first.paths, tmp_path / "s" / "copy.dcm", *late.paths]
    with pytest.raises(SeriesError, match="share a position"):
        volume_from_series(items, versions=[1] * (len(first.paths) + 1) + [2])


def test_versions_must_match_the_images(tmp_path: Path) -> None:
    written = write(tmp_path)
    with pytest.raises(ValueError, match="2 versions for 20 images"):
        volume_from_series(written.paths, versions=[1, 2])


def test_a_later_echo_replaces_only_its_own_stack(tmp_path: Path) -> None:
    """A resend of the second echo alone leaves the first echo's images as they were."""
    stacks = dp.write_stacked_series(
        tmp_path / "s", [PHANTOM, _other], attributes=ECHOES, rescale=RESCALE
    )
    uids = stacks[0].uids
    again = dp.write_series(tmp_path / "again", PHANTOM, uids=uids, rescale=RESCALE)
    for path in again.paths:
        ds = pydicom.dcmread(path)
        ds.update({"EchoNumbers": 2, "EchoTime": 4.92})
        ds.save_as(path)
    items = [*stacks[0].paths, *stacks[1].paths, *again.paths]
    versions = [1] * (len(items) - len(again.paths)) + [2] * len(again.paths)
    first = volume_from_series(items, versions=versions)
    assert _frame_uids(first) == set(stacks[0].sop_instance_uids)
    last = volume_from_series(items, StackChoice(order="last"), versions=versions)
    assert _frame_uids(last) == set(again.sop_instance_uids)
    np.testing.assert_array_equal(last.array, again.array)
    assert last.notes == first.notes == [_resent(len(again.paths))]


# ---- (e) several stacks in one series ------------------------------------------------


def _other(points: np.ndarray) -> np.ndarray:
    """A second stack's content, different from the phantom everywhere it matters."""
    return PHANTOM(points) * 0.5 + 300.0


def _frame_uids(volume: Volume) -> set[str]:
    return {ref.sop_instance_uid for ref in volume.frames}


ECHOES = [{"EchoNumbers": 1, "EchoTime": 2.46}, {"EchoNumbers": 2, "EchoTime": 4.92}]


def test_echoes_in_one_series_give_the_first_echo(tmp_path: Path) -> None:
    stacks = dp.write_stacked_series(
        tmp_path / "s", [PHANTOM, _other], attributes=ECHOES, rescale=RESCALE
    )
    volume = volume_from_folder(tmp_path / "s")
    np.testing.assert_array_equal(volume.array, stacks[0].array)
    np.testing.assert_allclose(volume.affine, stacks[0].affine, atol=1e-4)
    assert _frame_uids(volume) == set(stacks[0].sop_instance_uids)
    assert {str(ds.SOPInstanceUID) for ds in volume.source_datasets} == _frame_uids(volume)
    assert volume.stack.startswith("stack 1 of 2 (Echo Number 1")
    assert "20 images" in volume.stack

    last = volume_from_folder(tmp_path / "s", stack=StackChoice(order="last"))
    np.testing.assert_array_equal(last.array, stacks[1].array)
    assert _frame_uids(last) == set(stacks[1].sop_instance_uids)
    assert last.stack.startswith("stack 2 of 2 (Echo Number 2")


def test_stacks_are_not_split_by_a_per_slice_acquisition_number(tmp_path: Path) -> None:
    """Some scanners number every slice of a 2D series as an acquisition of its own."""
    stacks = dp.write_stacked_series(
        tmp_path / "s", [PHANTOM, _other], attributes=ECHOES, rescale=RESCALE
    )
    for path in (tmp_path / "s").iterdir():
        ds = pydicom.dcmread(path)
        ds.AcquisitionNumber = int(ds.InstanceNumber)
        ds.save_as(path)
    volume = volume_from_folder(tmp_path / "s")
    assert volume.array.shape == stacks[0].shape
    assert _frame_uids(volume) == set(stacks[0].sop_instance_uids)


def test_dixon_stack_chosen_by_image_type(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    types = [{"ImageType": ["DERIVED", "PRIMARY", "DIXON", t]} for t in ("F", "W", "IP")]
    stacks = dp.write_stacked_series(
        tmp_path / "s", [_other, PHANTOM, _other], attributes=types, rescale=RESCALE
    )
    water = volume_from_folder(tmp_path / "s", stack=StackChoice(image_type="w"))
    np.testing.assert_array_equal(water.array, stacks[1].array)
    assert "Image Type DERIVED\\PRIMARY\\DIXON\\W" in water.stack

    with caplog.at_level("WARNING", logger="dicom_node.volume"):
        fallback = volume_from_folder(tmp_path / "s", stack=StackChoice(image_type="OP"))
    assert _frame_uids(fallback) == set(stacks[0].sop_instance_uids)
    assert "no stack has Image Type OP" in caplog.text


@pytest.mark.parametrize("order", ["first", "last"])
def test_time_points_of_an_enhanced_image(tmp_path: Path, order: str) -> None:
    stacks = dp.write_stacked_series(
        tmp_path / "s", [PHANTOM, _other], enhanced=True, rescale=RESCALE
    )
    volume = volume_from_folder(tmp_path / "s", stack=StackChoice(order=order))  # type: ignore[arg-type]
    k = 0 if order == "first" else 1
    np.testing.assert_array_equal(volume.array, stacks[k].array)
    np.testing.assert_allclose(volume.affine, stacks[k].affine, atol=1e-4)
    n = stacks[0].shape[0]
    numbers = sorted(ref.frame_number or 0 for ref in volume.frames)
    assert numbers == list(range(k * n + 1, (k + 1) * n + 1))
    assert f"Temporal Position {k + 1}" in volume.stack


def test_two_enhanced_images_of_one_series_are_two_stacks(tmp_path: Path) -> None:
    """Some scanners write each echo or contrast as its own multi-frame image in one series."""
    uids = dp.SeriesUids()
    first = write(tmp_path, enhanced=True, uids=uids, file_prefix="A")
    second = dp.write_series(
        tmp_path / "s", _other, enhanced=True, uids=uids, file_prefix="B", rescale=RESCALE
    )
    ds = pydicom.dcmread(second.paths[0])
    ds.InstanceNumber = 2
    ds.save_as(second.paths[0])
    volume = volume_from_folder(tmp_path / "s")
    np.testing.assert_array_equal(volume.array, first.array)
    assert _frame_uids(volume) == set(first.sop_instance_uids)
    assert [str(d.SOPInstanceUID) for d in volume.source_datasets] == first.sop_instance_uids
    last = volume_from_folder(tmp_path / "s", stack=StackChoice(order="last"))
    np.testing.assert_array_equal(last.array, second.array)
    assert f"SOP Instance UID {second.sop_instance_uids[0]}" in last.stack


def test_the_chosen_stack_is_checked_like_any_series(tmp_path: Path) -> None:
    dp.write_stacked_series(tmp_path / "s", [PHANTOM, _other], attributes=ECHOES, rescale=RESCALE)
    first_echo = [p for p in (tmp_path / "s").iterdir() if int(pydicom.dcmread(p).EchoNumbers) == 1]
    middle = sorted(first_echo, key=lambda p: float(pydicom.dcmread(p).SliceLocation))[10]
    middle.unlink()
    with pytest.raises(SeriesError, match="slices are missing"):
        volume_from_folder(tmp_path / "s")


@pytest.mark.parametrize("tilt", [12.0, 2.0])
def test_tilted_or_sheared_stack_is_refused(tmp_path: Path, tilt: float) -> None:
    dp.write_sheared_series(tmp_path / "tilt", PHANTOM, tilt_degrees=tilt)
    with pytest.raises(SeriesError, match="gantry-tilted or sheared"):
        volume_from_folder(tmp_path / "tilt")


def test_shear_along_rows_is_refused(tmp_path: Path) -> None:
    dp.write_series(tmp_path / "shear", PHANTOM, orientation="coronal", shear_mm_per_slice=(1.0, 0))
    with pytest.raises(SeriesError, match="not along the slice normal"):
        volume_from_folder(tmp_path / "shear")


def test_single_image_is_refused(tmp_path: Path) -> None:
    written = write(tmp_path, shape=(1, 24, 28))
    with pytest.raises(SeriesError, match="single image"):
        volume_from_series(written.paths)


def test_missing_pixel_data_is_refused(tmp_path: Path) -> None:
    written = write(tmp_path)
    stripped = pydicom.dcmread(written.paths[3])
    del stripped.PixelData
    stripped.save_as(written.paths[3])
    with pytest.raises(SeriesError, match="no pixel data"):
        volume_from_series(written.paths)
    datasets = [pydicom.dcmread(p) for p in written.paths]
    with pytest.raises(SeriesError, match="no pixel data"):
        volume_from_series(datasets)


def test_colour_images_are_refused(tmp_path: Path) -> None:
    """An RGB series (a fused or screenshot series routed by mistake) is named, not decoded."""
    written = write(tmp_path)
    for path in written.paths:
        ds = pydicom.dcmread(path)
        grey = ds.pixel_array.astype(np.uint8)
        ds.PixelData = np.repeat(grey[..., np.newaxis], 3, axis=-1).tobytes()
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.save_as(path)
    with pytest.raises(SeriesError, match=r"colour images \(3 samples\) are not supported"):
        volume_from_series(written.paths)


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"])
def test_one_missing_uid_is_named(tmp_path: Path, keyword: str) -> None:
    datasets = [pydicom.dcmread(p) for p in write(tmp_path).paths]
    setattr(datasets[4], keyword, "")
    with pytest.raises(SeriesError) as caught:
        volume_from_series(datasets)
    assert keyword in str(caught.value)
    others = {"SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"} - {keyword}
    assert not any(other in str(caught.value) for other in others)


def test_localizers_are_dropped(tmp_path: Path) -> None:
    written = write(tmp_path)
    dp.add_localizers(tmp_path / "s", written, PHANTOM, count=3, mark_localizer=True)
    dp.add_localizers(tmp_path / "s", written, PHANTOM, count=2, orientation="coronal",
                      mark_localizer=False)  # fmt: skip
    (tmp_path / "s" / "notes.txt").write_text("not DICOM")
    volume = volume_from_folder(tmp_path / "s")
    np.testing.assert_array_equal(volume.array, written.array)
    assert [f.sop_instance_uid for f in volume.frames] == written.sop_instance_uids


def test_many_localizer_marked_images_are_dropped(tmp_path: Path) -> None:
    written = write(tmp_path)
    dp.add_localizers(tmp_path / "s", written, PHANTOM, count=6, mark_localizer=True)
    volume = volume_from_folder(tmp_path / "s")
    assert volume.array.shape == written.shape


def test_images_of_another_size_are_dropped_like_scouts(tmp_path: Path) -> None:
    written = write(tmp_path)
    dp.add_localizers(tmp_path / "s", written, PHANTOM, count=2, orientation="axial",
                      mark_localizer=False)  # fmt: skip
    volume = volume_from_folder(tmp_path / "s")
    assert volume.array.shape == written.shape


def test_an_image_of_another_size_inside_the_stack_is_named_not_called_missing(
    tmp_path: Path,
) -> None:
    """A slice of the stack stored at half the matrix was set aside as a scout, and the job
    failed saying slices were missing although every slice had been sent."""
    written = write(tmp_path)
    middle = sorted(written.paths, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))[
        len(written.paths) // 2
    ]
    ds = pydicom.dcmread(middle)
    half = np.ascontiguousarray(ds.pixel_array[::2, ::2])
    ds.Rows, ds.Columns = half.shape
    ds.PixelSpacing = [float(v) * 2 for v in ds.PixelSpacing]
    ds.PixelData = half.tobytes()
    ds.save_as(middle)
    with pytest.raises(SeriesError, match="mixes image sizes") as caught:
        volume_from_folder(tmp_path / "s")
    assert f"{half.shape[0]}x{half.shape[1]}" in str(caught.value)


def test_folder_with_two_series_lists_them(tmp_path: Path) -> None:
    first = dp.write_series(tmp_path / "a", PHANTOM)
    dp.write_series(tmp_path / "b", PHANTOM, orientation="sagittal")
    with pytest.raises(SeriesError, match="holds 2 series") as caught:
        volume_from_folder(tmp_path)
    assert first.uids.series_instance_uid in str(caught.value)
    chosen = volume_from_folder(tmp_path, series_instance_uid=first.uids.series_instance_uid)
    np.testing.assert_array_equal(chosen.array, first.array)
    with pytest.raises(SeriesError, match="belong to 2 series"):
        volume_from_series([*first.paths, *sorted((tmp_path / "b").iterdir())])


def test_empty_inputs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SeriesError):
        volume_from_series([])
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(SeriesError, match="no DICOM files"):
        volume_from_folder(tmp_path)


def test_enhanced_phantom_is_readable_by_highdicom(tmp_path: Path) -> None:
    hd = pytest.importorskip("highdicom")
    written = write(tmp_path, enhanced=True, orientation="coronal")
    image = hd.Image.from_dataset(pydicom.dcmread(written.paths[0]))
    assert image.number_of_frames == written.shape[0]


# Values pydicom lets a DS hold (it refuses to set "abc"), and that no geometry can use.
_NOT_NUMBERS = ["nan", "inf", "-inf", "1e308", "0", "-0", "1e-30", ""]


def _damage(series: list[pydicom.Dataset], rng: random.Random) -> None:
    """One to three random changes to geometry, rescale or pixel attributes, each on one
    image or on all."""
    for _ in range(rng.randrange(1, 4)):
        targets = [rng.choice(series)] if rng.random() < 0.5 else series
        change = rng.randrange(11)
        for ds in targets:
            if change == 0:
                ds.ImagePositionPatient = [rng.choice([*_NOT_NUMBERS, "1"]) for _ in range(3)]
            elif change == 1:
                ds.ImageOrientationPatient = [
                    rng.choice([*_NOT_NUMBERS, "1", "0"]) for _ in range(6)
                ]
            elif change == 2:
                ds.PixelSpacing = [rng.choice([*_NOT_NUMBERS, "2"]) for _ in range(2)]
            elif change == 3:
                ds.RescaleSlope = rng.choice([*_NOT_NUMBERS, "1\\2"])  # two values too
            elif change == 4:
                ds.RescaleIntercept = rng.choice([*_NOT_NUMBERS, "0", "0\\1"])
            elif change == 5:
                ds.Rows = rng.choice([0, 1, 15, 17, 65535])
            elif change == 6:
                ds.PixelData = ds.PixelData[: rng.randrange(len(ds.PixelData))]
            elif change == 7:
                ds.BitsAllocated = rng.choice([1, 8, 12, 32, 64])
            elif change == 8:
                ds.ImageOrientationPatient = rng.choice([[1, 0, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0]])
            elif change == 9:
                ds.SamplesPerPixel = 3
                ds.PhotometricInterpretation = "RGB"
            else:
                ds.NumberOfFrames = rng.choice(["0", "2", "-1"])


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom: invalid values, as meant
def test_random_header_damage_gives_a_finite_volume_or_a_reason(tmp_path: Path) -> None:
    """200 seeded series with random damage: each is a volume with a finite affine, voxel
    size and voxels, or refused with a SeriesError; never another exception (the job would
    fail with a Python type instead of a reason) and never NaN geometry or voxels (the SEG
    would be placed nowhere, or the model fed NaN). Before the finite-number checks 33 of
    400 such series gave one or the other."""
    written = write(tmp_path, shape=(8, 16, 16))
    clean = [pydicom.dcmread(path) for path in written.paths]
    rng = random.Random(20261206)
    outcomes = {"volume": 0, "refused": 0}
    for case in range(200):
        series = copy.deepcopy(clean)
        _damage(series, rng)
        try:
            volume = volume_from_series(series)
        except SeriesError:
            outcomes["refused"] += 1
            continue
        assert np.isfinite(volume.affine).all(), case
        assert all(size > 0 for size in volume.spacing_zyx), case
        assert np.isfinite(volume.array).all(), case
        outcomes["volume"] += 1
    assert outcomes["volume"] > 0 and outcomes["refused"] > 0, outcomes


# ---- failures that are not the series' fault ------------------------------------------


def test_an_io_error_reading_the_series_is_not_called_a_bad_series(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SeriesError fails the job for good; an I/O error (a failing disk, a stale network
    mount, too many open files) may pass, so it propagates and the job is retried."""
    written = write(tmp_path)

    def failing(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("dicom_node.volume.pydicom.dcmread", failing)
    with pytest.raises(OSError, match="Input/output error"):
        volume_from_series(written.paths)
    monkeypatch.undo()
    gone = written.paths[0]
    gone.unlink()
    with pytest.raises(SeriesError, match=f"cannot read .*{gone.name}"):
        volume_from_series(written.paths)


def test_running_out_of_memory_decoding_pixels_is_not_called_undecodable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = write(tmp_path)

    def no_memory(_self: pydicom.Dataset) -> np.ndarray:
        raise MemoryError

    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(no_memory))
    with pytest.raises(MemoryError):
        volume_from_series(written.paths)
