"""Synthetic MR-like torso phantoms for the demo model, its tests and the DICOM round-trip tests.

A phantom is defined analytically in patient coordinates (LPS, millimetres: x to the patient's
Left, y to Posterior, z to Superior), so the same phantom can be sampled on any grid: the default
axial grid the demo model was trained on, a finer one, or the voxel centres of a sagittal, coronal
or oblique DICOM series. Segmentations of those renderings are then comparable in patient space.

The field of view is a box of about 128 x 128 x 144 mm (x, y, z) centred on the origin. Inside it:
a torso (soft tissue with a fat rim, a spine) and four labelled organs:

==  ============  =====================================================================
 1  liver         large, two lobes, patient's right (x < 0), upper abdomen
 2  spleen        small, crescent-shaped, patient's left (x > 0), posterior-lateral
 3  kidney_left   ellipsoid, patient's left, posterior, below the spleen
 4  kidney_right  ellipsoid, patient's right, posterior, below the liver
==  ============  =====================================================================

The two kidneys have the same shape and intensity, mirrored: a model can only tell them apart
by position, which is why the demo model is trained and run without mirroring.

Arrays follow the SimpleITK convention: ``sitk.GetArrayFromImage`` order ``(z, y, x)``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.uint8]

#: Label values of the phantom organs (and of the demo model's output).
LABELS: dict[str, int] = {
    "background": 0,
    "liver": 1,
    "spleen": 2,
    "kidney_left": 3,
    "kidney_right": 4,
}

#: Default grid: shape and spacing in array order (z, y, x); it covers FIELD_OF_VIEW_MM exactly.
DEFAULT_SHAPE: tuple[int, int, int] = (48, 64, 64)
DEFAULT_SPACING: tuple[float, float, float] = (3.0, 2.0, 2.0)
#: Extent of the field of view in array order (z, y, x), mm, centred on the LPS origin.
FIELD_OF_VIEW_MM: tuple[float, float, float] = (144.0, 128.0, 128.0)

# Points are evaluated in chunks so that a fine grid (tens of millions of voxels) does not
# need several (N, 3) float64 temporaries at once.
_CHUNK_POINTS = 1 << 21


@dataclasses.dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid in LPS mm, rotated by ``angle_deg`` about the z (superior) axis."""

    center: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    angle_deg: float = 0.0

    def normalised_radius2(self, points: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Squared normalised radius: < 1 inside, 1 on the surface."""
        d = points - np.asarray(self.center)
        cos_a = math.cos(math.radians(self.angle_deg))
        sin_a = math.sin(math.radians(self.angle_deg))
        # Rotate the points into the ellipsoid's own frame (inverse rotation about z).
        u = cos_a * d[:, 0] + sin_a * d[:, 1]
        v = -sin_a * d[:, 0] + cos_a * d[:, 1]
        a, b, c = self.semi_axes
        result: npt.NDArray[np.float64] = (u / a) ** 2 + (v / b) ** 2 + (d[:, 2] / c) ** 2
        return result

    def contains(self, points: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
        return self.normalised_radius2(points) <= 1.0


@dataclasses.dataclass(frozen=True)
class PhantomSpec:
    """The random parameters of one phantom; ``PhantomSpec.from_seed(seed)`` is deterministic."""

    seed: int
    #: Torso: an elliptic cylinder along z (centre x, y and semi-axes x, y in mm).
    body_center_xy: tuple[float, float]
    body_semi_axes_xy: tuple[float, float]
    fat_thickness_mm: float
    spine_center_xy: tuple[float, float]
    spine_radius_mm: float
    liver_right_lobe: Ellipsoid
    liver_left_lobe: Ellipsoid
    spleen: Ellipsoid
    #: Removed from the spleen to make its medial surface concave (a crescent, not an ellipsoid).
    spleen_notch: Ellipsoid
    kidney_left: Ellipsoid
    kidney_right: Ellipsoid
    #: Mean intensities (arbitrary MR units) per tissue.
    intensities: dict[str, float]
    #: Multiplicative bias field: 1 + linear terms (per 100 mm, x, y, z) + a radial term.
    bias_linear: tuple[float, float, float]
    bias_radial: float
    #: Standard deviation of each of the two Gaussian channels of the Rician noise.
    noise_sigma: float

    @classmethod
    def from_seed(cls, seed: int) -> PhantomSpec:
        """Draw an anatomically consistent phantom: organs keep their side, level and order."""
        rng = np.random.default_rng(seed)

        def jitter(scale: float) -> float:
            return float(rng.uniform(-scale, scale))

        def factor(spread: float) -> float:
            return float(rng.uniform(1.0 - spread, 1.0 + spread))

        body_cx, body_cy = jitter(3.0), jitter(3.0)
        body_a, body_b = 56.0 * factor(0.04), 44.0 * factor(0.06)
        size = factor(0.08)  # a global organ scale: bigger patients have bigger organs

        liver_right = Ellipsoid(
            center=(
                -24.0 + body_cx + jitter(4.0),
                -4.0 + body_cy + jitter(4.0),
                26.0 + jitter(6.0),
            ),
            semi_axes=(26.0 * size * factor(0.08), 29.0 * size * factor(0.08), 30.0 * factor(0.1)),
            angle_deg=jitter(12.0),
        )
        liver_left = Ellipsoid(
            center=(
                4.0 + body_cx + jitter(4.0),
                -20.0 + body_cy + jitter(3.0),
                liver_right.center[2] + 6.0 + jitter(4.0),
            ),
            semi_axes=(20.0 * size * factor(0.1), 12.0 * size * factor(0.1), 17.0 * factor(0.1)),
            angle_deg=-15.0 + jitter(10.0),
        )
        spleen_center = (
            36.0 + body_cx + jitter(3.0),
            14.0 + body_cy + jitter(4.0),
            28.0 + jitter(6.0),
        )
        spleen_angle = 35.0 + jitter(10.0)
        spleen = Ellipsoid(
            center=spleen_center,
            semi_axes=(12.0 * size * factor(0.1), 22.0 * size * factor(0.1), 24.0 * factor(0.1)),
            angle_deg=spleen_angle,
        )
        # The notch sits medially (towards -x) of the spleen's centre, rotated with it.
        notch_offset = 13.0 * size
        spleen_notch = Ellipsoid(
            center=(
                spleen_center[0] - notch_offset * math.cos(math.radians(spleen_angle)),
                spleen_center[1] - notch_offset * math.sin(math.radians(spleen_angle)),
                spleen_center[2],
            ),
            semi_axes=(7.0 * size, 13.0 * size, 40.0),
            angle_deg=spleen_angle,
        )

        kidney_z = -20.0 + jitter(5.0)
        kidney_axes = (12.0 * size * factor(0.08), 14.0 * size * factor(0.08), 26.0 * factor(0.1))
        kidney_angle = 25.0 + jitter(8.0)
        kidneys: list[Ellipsoid] = []
        for side in (+1.0, -1.0):  # left (x > 0) first, then right
            kidneys.append(
                Ellipsoid(
                    center=(
                        side * (29.0 + jitter(3.0)) + body_cx,
                        17.0 + body_cy + jitter(3.0),
                        kidney_z + (4.0 if side < 0 else 0.0) + jitter(4.0),
                    ),
                    # Kidneys are different in size a little, as in patients.
                    semi_axes=tuple(a * factor(0.05) for a in kidney_axes),  # type: ignore[arg-type]
                    # The upper poles tilt medially: a mirror-symmetric rotation.
                    angle_deg=side * kidney_angle + jitter(5.0),
                )
            )

        base = factor(0.1)
        intensities = {
            "soft_tissue": 100.0 * base,
            "fat": 230.0 * base * factor(0.05),
            "spine": 190.0 * base * factor(0.05),
            "liver": 70.0 * base * factor(0.08),
            "spleen": 125.0 * base * factor(0.06),
            "kidney": 160.0 * base * factor(0.06),
        }
        return cls(
            seed=seed,
            body_center_xy=(body_cx, body_cy),
            body_semi_axes_xy=(body_a, body_b),
            fat_thickness_mm=float(rng.uniform(4.0, 8.0)),
            spine_center_xy=(body_cx + jitter(1.5), body_cy + body_b - 16.0 + jitter(2.0)),
            spine_radius_mm=float(rng.uniform(8.0, 10.0)),
            liver_right_lobe=liver_right,
            liver_left_lobe=liver_left,
            spleen=spleen,
            spleen_notch=spleen_notch,
            kidney_left=kidneys[0],
            kidney_right=kidneys[1],
            intensities=intensities,
            bias_linear=(jitter(0.15), jitter(0.15), jitter(0.15)),
            bias_radial=jitter(0.15),
            noise_sigma=float(rng.uniform(5.0, 9.0)),
        )


def _chunks(n: int) -> Iterator[slice]:
    for start in range(0, n, _CHUNK_POINTS):
        yield slice(start, min(n, start + _CHUNK_POINTS))


def _sample_chunk(
    spec: PhantomSpec, points: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], LabelArray]:
    x, y = points[:, 0], points[:, 1]
    cx, cy = spec.body_center_xy
    a, b = spec.body_semi_axes_xy
    body_r = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
    body = body_r <= 1.0
    # The fat rim: the outer fat_thickness_mm of the torso (approximately, along the radius).
    rim = body & (body_r > 1.0 - spec.fat_thickness_mm / min(a, b))
    sx, sy = spec.spine_center_xy
    spine = (x - sx) ** 2 + (y - sy) ** 2 <= spec.spine_radius_mm**2

    labels = np.zeros(points.shape[0], dtype=np.uint8)
    liver = spec.liver_right_lobe.contains(points) | spec.liver_left_lobe.contains(points)
    spleen = spec.spleen.contains(points) & ~spec.spleen_notch.contains(points)
    # Painted in this order, so kidneys win where an organ tip touches them; all stay inside the
    # body, out of the fat rim and off the spine.
    interior = body & ~rim & ~spine
    labels[liver & interior] = LABELS["liver"]
    labels[spleen & interior] = LABELS["spleen"]
    labels[spec.kidney_left.contains(points) & interior] = LABELS["kidney_left"]
    labels[spec.kidney_right.contains(points) & interior] = LABELS["kidney_right"]

    tissue = spec.intensities
    intensity = np.zeros(points.shape[0], dtype=np.float64)
    intensity[body] = tissue["soft_tissue"]
    intensity[rim] = tissue["fat"]
    intensity[spine & body] = tissue["spine"]
    intensity[labels == LABELS["liver"]] = tissue["liver"]
    intensity[labels == LABELS["spleen"]] = tissue["spleen"]
    intensity[labels >= LABELS["kidney_left"]] = tissue["kidney"]

    bx, by, bz = spec.bias_linear
    radius2 = (points**2).sum(axis=1) / 100.0**2
    bias = 1.0 + (bx * x + by * y + bz * points[:, 2]) / 100.0 + spec.bias_radial * radius2
    intensity *= np.clip(bias, 0.5, 1.5)
    return intensity, labels


def sample_phantom(
    spec: PhantomSpec, points_lps_mm: npt.ArrayLike, *, noise: bool = True
) -> tuple[FloatArray, LabelArray]:
    """Sample a phantom at points ``(N, 3)`` given in LPS mm (columns x, y, z).

    Returns the intensity ``(N,)`` float32 and the label ``(N,)`` uint8 at each point. Labels are
    point samples (no partial volume). With ``noise`` the intensity gets MR-like Rician noise,
    deterministic for a given spec and number of points (the noise is not a function of
    position, so two grids of the same phantom have different noise, as two scans would).
    """
    points = np.asarray(points_lps_mm, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points_lps_mm must have shape (N, 3), got {points.shape}")
    n = points.shape[0]
    intensity = np.empty(n, dtype=np.float32)
    labels = np.empty(n, dtype=np.uint8)
    rng = np.random.default_rng([spec.seed, 0x5EED])
    for part in _chunks(n):
        chunk_intensity, labels[part] = _sample_chunk(spec, points[part])
        if noise:
            # Magnitude of a complex signal with Gaussian noise in both channels: Rician, like
            # MR magnitude images (the background is not zero-mean noise but a positive floor).
            real = chunk_intensity + rng.normal(0.0, spec.noise_sigma, chunk_intensity.shape)
            imag = rng.normal(0.0, spec.noise_sigma, chunk_intensity.shape)
            chunk_intensity = np.hypot(real, imag)
        intensity[part] = chunk_intensity
    return intensity, labels


def default_origin(
    shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> tuple[float, float, float]:
    """LPS origin (x, y, z) that centres an identity-direction grid of ``shape`` (z, y, x)."""
    return tuple(-(n - 1) / 2.0 * s for n, s in zip(shape[::-1], spacing[::-1], strict=True))  # type: ignore[return-value]


def grid_points(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float] | None = None,
    direction: npt.ArrayLike | None = None,
) -> npt.NDArray[np.float64]:
    """LPS mm of every voxel centre of a grid, in C order of an array of ``shape`` (z, y, x).

    ``spacing`` is (z, y, x) like ``shape``; ``origin`` (x, y, z) and ``direction`` (3x3, columns
    are the directions of the i, j, k = x, y, z array axes, as SimpleITK's GetDirection reshaped
    row-major) follow ITK. Defaults: centred on the LPS origin, identity direction.
    """
    if origin is None:
        origin = default_origin(shape, spacing)
    matrix = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    if matrix.shape != (3, 3):
        raise ValueError(f"direction must be a 3x3 matrix, got shape {matrix.shape}")
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    index_xyz = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1)
    scaled = index_xyz * np.asarray(spacing[::-1], dtype=np.float64)
    points: npt.NDArray[np.float64] = scaled @ matrix.T + np.asarray(origin, dtype=np.float64)
    return points


def make_phantom_on_grid(
    spec: PhantomSpec | int,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    origin: tuple[float, float, float] | None = None,
    direction: npt.ArrayLike | None = None,
    *,
    noise: bool = True,
) -> tuple[FloatArray, LabelArray]:
    """Render a phantom on any ITK-style grid; arrays have ``shape`` (z, y, x). See grid_points."""
    if isinstance(spec, int):
        spec = PhantomSpec.from_seed(spec)
    points = grid_points(shape, spacing, origin, direction)
    intensity, labels = sample_phantom(spec, points, noise=noise)
    return intensity.reshape(shape), labels.reshape(shape)


def make_phantom(
    seed: int,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
) -> tuple[FloatArray, LabelArray]:
    """Phantom ``seed`` on an axial, identity-direction grid centred on the LPS origin.

    Returns ``(image float32, labels uint8)``, both ``(z, y, x)``. To cover the same field of view
    at another resolution, keep ``shape * spacing`` near FIELD_OF_VIEW_MM (144, 128, 128).
    """
    return make_phantom_on_grid(seed, shape, spacing)


def write_phantom_nifti(
    seed: int,
    image_path: str | Path,
    labels_path: str | Path | None = None,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
) -> None:
    """Write phantom ``seed`` as NIfTI (image, and labels if a path is given) with SimpleITK.

    Spacing and origin are set so that voxel centres are where make_phantom sampled them
    (identity direction, LPS centred on the origin); the NIfTI writer stores the RAS form.
    """
    image, labels = make_phantom(seed, shape, spacing)
    origin = default_origin(shape, spacing)
    for array, path in ((image, image_path), (labels, labels_path)):
        if path is None:
            continue
        itk_image = sitk.GetImageFromArray(array)
        # SimpleITK ships no type hints for these setters.
        itk_image.SetSpacing(tuple(float(s) for s in spacing[::-1]))  # type: ignore[no-untyped-call]
        itk_image.SetOrigin(origin)  # type: ignore[no-untyped-call]
        itk_image.SetDirection(np.eye(3).ravel().tolist())  # type: ignore[no-untyped-call]
        sitk.WriteImage(itk_image, str(path), useCompression=True)
    logger.debug("Wrote phantom %d to %s", seed, image_path)
