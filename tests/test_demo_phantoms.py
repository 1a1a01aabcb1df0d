"""The synthetic phantoms: deterministic, complete, and anatomically oriented in LPS."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from inference.demo.phantoms import (
    DEFAULT_SHAPE,
    DEFAULT_SPACING,
    FIELD_OF_VIEW_MM,
    LABELS,
    PhantomSpec,
    grid_points,
    make_phantom,
    make_phantom_on_grid,
    sample_phantom,
    write_phantom_nifti,
)


def test_same_seed_same_phantom_and_different_seeds_differ() -> None:
    image_a, labels_a = make_phantom(7)
    image_b, labels_b = make_phantom(7)
    np.testing.assert_array_equal(image_a, image_b)
    np.testing.assert_array_equal(labels_a, labels_b)
    _, labels_c = make_phantom(8)
    assert not np.array_equal(labels_a, labels_c)
    assert PhantomSpec.from_seed(7) == PhantomSpec.from_seed(7)


@pytest.mark.parametrize("seed", [0, 1, 10000, 12345])
def test_default_grid_has_all_labels_on_their_sides(seed: int) -> None:
    image, labels = make_phantom(seed)
    assert image.shape == labels.shape == DEFAULT_SHAPE
    assert image.dtype == np.float32
    assert labels.dtype == np.uint8
    assert set(np.unique(labels)) == set(LABELS.values())

    points = grid_points(DEFAULT_SHAPE, DEFAULT_SPACING).reshape(*DEFAULT_SHAPE, 3)
    centroid = {name: points[labels == value].mean(axis=0) for name, value in LABELS.items()}
    # LPS: x grows to the patient's left, y to posterior, z to superior.
    assert centroid["liver"][0] < 0 < centroid["spleen"][0]
    assert centroid["kidney_right"][0] < 0 < centroid["kidney_left"][0]
    assert centroid["kidney_left"][1] > centroid["liver"][1]
    assert centroid["kidney_right"][1] > centroid["liver"][1]
    assert centroid["kidney_left"][2] < centroid["spleen"][2]
    assert centroid["kidney_right"][2] < centroid["liver"][2]
    assert (labels == LABELS["liver"]).sum() > 3 * (labels == LABELS["spleen"]).sum()
    # Nothing labelled touches the edge of the field of view.
    for axis in range(3):
        assert not labels.take([0, -1], axis=axis).any()


def test_other_resolution_renders_the_same_anatomy() -> None:
    fine_shape = (72, 128, 128)
    fine_spacing = (2.0, 1.0, 1.0)
    assert np.allclose(np.multiply(fine_shape, fine_spacing), FIELD_OF_VIEW_MM)
    _, coarse = make_phantom(3)
    _, fine = make_phantom(3, fine_shape, fine_spacing)
    voxel_coarse = float(np.prod(DEFAULT_SPACING))
    voxel_fine = float(np.prod(fine_spacing))
    for value in range(1, 5):
        volume_coarse = (coarse == value).sum() * voxel_coarse
        volume_fine = (fine == value).sum() * voxel_fine
        assert volume_fine == pytest.approx(volume_coarse, rel=0.1)


def test_rotated_grid_samples_the_same_labels_at_the_same_points() -> None:
    spec = PhantomSpec.from_seed(4)
    # A sagittal-like oblique grid: its array axes run along y, z and x of the patient.
    direction = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    shape, spacing, origin = (32, 40, 36), (4.0, 3.0, 3.5), (-50.0, -60.0, -70.0)
    _, labels = make_phantom_on_grid(spec, shape, spacing, origin, direction, noise=False)
    points = grid_points(shape, spacing, origin, direction)
    _, expected = sample_phantom(spec, points, noise=False)
    np.testing.assert_array_equal(labels.ravel(), expected)
    # First array axis (index i, x in ITK terms) walks along the patient's y axis.
    assert np.allclose(points[1] - points[0], [0.0, 3.5, 0.0])


def test_sample_phantom_rejects_bad_points() -> None:
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        sample_phantom(PhantomSpec.from_seed(0), np.zeros((5, 2)))


def test_nifti_has_lps_geometry(tmp_path: Path) -> None:
    write_phantom_nifti(2, tmp_path / "image.nii.gz", tmp_path / "labels.nii.gz")
    image = sitk.ReadImage(str(tmp_path / "image.nii.gz"))
    labels = sitk.ReadImage(str(tmp_path / "labels.nii.gz"))
    assert image.GetSpacing() == pytest.approx(DEFAULT_SPACING[::-1])
    assert image.GetDirection() == pytest.approx(np.eye(3).ravel())
    # The voxel centres are centred on the LPS origin.
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    assert centre == pytest.approx((0.0, 0.0, 0.0))
    expected_image, expected_labels = make_phantom(2)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), expected_labels)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), expected_image)
