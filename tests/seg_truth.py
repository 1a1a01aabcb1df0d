"""Ground truth for SEG round trips: decode a SEG, sample the phantom, score in patient space.

A SEG is decoded into a label map of *catalogue* ids (not segment numbers) together with the
affine of the grid it lies on, three independent ways:

- ``decode_on_source``: by reference, the frames highdicom finds for each source instance
  (single-frame) or source frame (enhanced multi-frame), in the source volume's slice order;
- ``decode_by_position``: by geometry, highdicom's ``get_volume`` (the SEG's own plane positions
  and orientation), on whatever grid highdicom builds;
- ``decode_with_dcmqi``: by dcmqi ``segimage2itkimage`` (an independent C++ reader), whose NIfTI
  files carry RAS affines that are converted to LPS here.

``resample_nearest`` moves a decoded grid onto another grid that shares its voxel centres (the
source volume's) and refuses grids that do not line up, so a half-voxel shift cannot hide.
The phantom truth is point-sampled at voxel centres (``truth_labels``), as the phantom images
are, and scores (``score``) are Dice and the centroid error, the latter expressed in voxels of
the grid's own index frame, so "below one voxel" means the same on any orientation.

Conventions as in ``dicom_node.volume``: arrays are (z, y, x) and an affine maps
(x=column, y=row, z=slice, 1) to LPS millimetres.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import numpy.typing as npt
from pydicom import Dataset

from dicom_node.volume import Volume
from inference.catalogue import Catalogue, Label
from inference.demo.phantoms import PhantomSpec, sample_phantom

REPO_ROOT = Path(__file__).resolve().parents[1]
SEGIMAGE2ITKIMAGE = REPO_ROOT / ".venv" / "bin" / "segimage2itkimage"
#: RAS (NIfTI) <-> LPS (DICOM): negate x and y.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: How far (in voxels) a voxel centre of one grid may lie from one of another to "line up":
#: positions travel as decimal strings and float32 NIfTI affines, never off by more than ~1e-4.
ALIGN_TOL_VOXELS = 0.01

LabelArray = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class LabelGrid:
    """A label map of catalogue ids, (z, y, x), and its affine (x, y, z, 1) -> LPS mm."""

    array: LabelArray
    affine: npt.NDArray[np.float64]

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.array.shape
        return int(z), int(y), int(x)


# ---- grids --------------------------------------------------------------------------


def voxel_centres(affine: np.ndarray, shape: Sequence[int]) -> npt.NDArray[np.float64]:
    """LPS mm of every voxel centre of a (z, y, x) grid, in C order, shaped (N, 3)."""
    nz, ny, nx = (int(n) for n in shape)
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    index = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1).astype(np.float64)
    points: npt.NDArray[np.float64] = index @ affine[:3, :3].T + affine[:3, 3]
    return points


def truth_labels(
    spec: PhantomSpec,
    affine: np.ndarray,
    shape: Sequence[int],
    rotation: np.ndarray | None = None,
) -> LabelArray:
    """The phantom's labels point-sampled at the grid's voxel centres, (z, y, x).

    ``rotation`` (3x3) turns the phantom about the origin: the point p shows what the upright
    phantom has at ``rotation.T @ p``.
    """
    points = voxel_centres(affine, shape)
    if rotation is not None:
        points = points @ np.asarray(rotation, dtype=np.float64)
    _, labels = sample_phantom(spec, points, noise=False)
    return labels.reshape(tuple(int(n) for n in shape))


def resample_nearest(
    grid: LabelGrid, affine: np.ndarray, shape: Sequence[int], *, what: str = "grid"
) -> LabelArray:
    """``grid`` on the target grid (affine, shape) whose voxel centres it shares; 0 outside.

    Raises ``AssertionError`` when a target voxel centre inside ``grid`` is not within
    ``ALIGN_TOL_VOXELS`` of one of its voxel centres: the two grids do not line up.
    """
    points = voxel_centres(affine, shape)
    index = (points - grid.affine[:3, 3]) @ np.linalg.inv(grid.affine[:3, :3]).T
    rounded = np.rint(index)
    size = np.array(grid.shape[::-1])  # x, y, z
    inside = np.all((rounded >= 0) & (rounded < size), axis=1)
    off = np.abs(index - rounded)[inside]
    worst = float(off.max()) if off.size else 0.0
    assert worst <= ALIGN_TOL_VOXELS, (
        f"{what}: voxel centres lie up to {worst:.3f} voxel off the target grid's centres"
    )
    out = np.zeros(len(points), dtype=np.uint8)
    ijk = rounded[inside].astype(np.int64)
    out[inside] = grid.array[ijk[:, 2], ijk[:, 1], ijk[:, 0]]
    return out.reshape(tuple(int(n) for n in shape))


# ---- segments -> catalogue ids ------------------------------------------------------


def _code_key(item: Any) -> tuple[str, str] | None:
    """(scheme, value) of a pydicom code item or a dcmqi JSON code dict."""
    if item is None:
        return None
    if isinstance(item, Mapping):
        return str(item["CodingSchemeDesignator"]), str(item["CodeValue"])
    return str(item.CodingSchemeDesignator), str(item.CodeValue)


def _label_key(label: Label) -> tuple[tuple[str, str], tuple[str, str] | None]:
    modifier = (label.modifier.scheme, label.modifier.code) if label.modifier else None
    return (label.type.scheme, label.type.code), modifier


def catalogue_id(
    catalogue: Catalogue,
    segment_label: str,
    property_type: tuple[str, str] | None,
    modifier: tuple[str, str] | None,
) -> int:
    """The catalogue id a segment stands for, by its label and by its coded type + modifier.

    Both must name the same catalogue entry: a SEG whose text and codes disagree is wrong.
    """
    by_name = [label.id for label in catalogue.labels if label.name == segment_label]
    by_code = [
        label.id for label in catalogue.labels if _label_key(label) == (property_type, modifier)
    ]
    assert by_name or by_code, f"segment {segment_label!r} {property_type} matches no label"
    if by_name and by_code:
        assert by_name == by_code, (
            f"segment {segment_label!r}: label says {by_name}, codes {property_type} "
            f"{modifier} say {by_code}"
        )
    return (by_name or by_code)[0]


def segment_ids(seg: Dataset, catalogue: Catalogue) -> dict[int, int]:
    """SEG segment number -> catalogue id, from the Segment Sequence.

    A LABELMAP SEG may describe segment 0 (highdicom names it "Background"); it is background.
    """
    mapping: dict[int, int] = {}
    for item in seg.SegmentSequence:
        if int(item.SegmentNumber) == 0:
            continue
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        modifiers = prop.get("SegmentedPropertyTypeModifierCodeSequence") or [None]
        mapping[int(item.SegmentNumber)] = catalogue_id(
            catalogue, str(item.SegmentLabel), _code_key(prop), _code_key(modifiers[0])
        )
    return mapping


def _relabel(segment_numbers: np.ndarray, mapping: Mapping[int, int]) -> LabelArray:
    lut = np.zeros(max([*mapping, int(segment_numbers.max(initial=0))]) + 1, dtype=np.uint8)
    for number, label_id in mapping.items():
        lut[number] = label_id
    unknown = set(np.unique(segment_numbers).tolist()) - {0, *mapping}
    assert not unknown, f"pixel values {sorted(unknown)} are no segment of the SEG"
    result: LabelArray = lut[segment_numbers.astype(np.int64)]
    return result


# ---- decoders -----------------------------------------------------------------------


def read_seg(path_or_dataset: str | Path | Dataset) -> hd.seg.Segmentation:
    if isinstance(path_or_dataset, Dataset):
        return hd.seg.Segmentation.from_dataset(path_or_dataset, copy=True)
    return hd.seg.segread(str(path_or_dataset))


def decode_on_source(seg: hd.seg.Segmentation, volume: Volume, catalogue: Catalogue) -> LabelArray:
    """Catalogue-id label map aligned with ``volume`` slice by slice, found by reference."""
    numbers = [int(n) for n in seg.get_segment_numbers()]
    refs = volume.frames
    if all(ref.frame_number is None for ref in refs):
        pixels = seg.get_pixels_by_source_instance(
            [ref.sop_instance_uid for ref in refs],
            segment_numbers=numbers,
            combine_segments=True,
            skip_overlap_checks=False,
        )
    else:
        (source_uid,) = {ref.sop_instance_uid for ref in refs}
        pixels = seg.get_pixels_by_source_frame(
            source_uid,
            [int(ref.frame_number) for ref in refs if ref.frame_number is not None],
            segment_numbers=numbers,
            combine_segments=True,
            # Frames without any segment are omitted from the SEG (and not referenced by it).
            assert_missing_frames_are_empty=True,
        )
    return _relabel(np.asarray(pixels), segment_ids(seg, catalogue))


def decode_by_position(seg: hd.seg.Segmentation, catalogue: Catalogue) -> LabelGrid:
    """highdicom's own volume of the SEG (from plane positions), as a LabelGrid."""
    volume = seg.get_volume(combine_segments=True, relabel=False)
    affine = np.asarray(volume.affine, dtype=np.float64)
    ours = np.eye(4)
    # highdicom's affine maps (array axis 0, 1, 2) indices; ours maps (x=axis 2, y=1, z=0).
    ours[:3, 0], ours[:3, 1], ours[:3, 2] = affine[:3, 2], affine[:3, 1], affine[:3, 0]
    ours[:3, 3] = affine[:3, 3]
    return LabelGrid(_relabel(np.asarray(volume.array), segment_ids(seg, catalogue)), ours)


def _nifti_grid(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI file as ((z, y, x) integer array, LPS affine of (x, y, z, 1))."""
    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    assert data.ndim == 3, f"{path.name}: expected a 3D image, got shape {data.shape}"
    # nibabel indexes (i, j, k) = (x, y, z); its affine maps them to RAS mm.
    affine = RAS_TO_LPS @ np.asarray(image.affine, dtype=np.float64)
    return np.transpose(data, (2, 1, 0)).astype(np.int64), affine


def decode_with_dcmqi(seg_path: Path, work_dir: Path, catalogue: Catalogue) -> LabelGrid:
    """Run dcmqi's ``segimage2itkimage`` (NIfTI output) and merge its files into one grid.

    dcmqi writes ``<n>.nii.gz`` per group of non-overlapping segments and ``meta.json`` whose
    ``segmentAttributes[n - 1]`` lists that file's segments with their pixel value
    (``labelID``). All files must share one grid.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    completed = subprocess.run(
        [
            str(SEGIMAGE2ITKIMAGE),
            "--inputDICOM",
            str(seg_path),
            "--outputDirectory",
            str(work_dir),
            "--outputType",
            "nifti",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    meta = json.loads((work_dir / "meta.json").read_text(encoding="utf-8"))
    merged: np.ndarray | None = None
    grid_affine: np.ndarray | None = None
    for n, group in enumerate(meta["segmentAttributes"], start=1):
        data, affine = _nifti_grid(work_dir / f"{n}.nii.gz")
        if merged is None or grid_affine is None:
            merged, grid_affine = np.zeros(data.shape, dtype=np.uint8), affine
        assert data.shape == merged.shape and np.allclose(affine, grid_affine, atol=1e-3), (
            f"dcmqi file {n}.nii.gz is on another grid than 1.nii.gz"
        )
        for segment in group:
            modifier = segment.get("SegmentedPropertyTypeModifierCodeSequence")
            label_id = catalogue_id(
                catalogue,
                str(segment["SegmentLabel"]),
                _code_key(segment["SegmentedPropertyTypeCodeSequence"]),
                _code_key(modifier),
            )
            mask = data == int(segment["labelID"])
            assert not (merged[mask] != 0).any(), f"dcmqi segments overlap at {label_id}"
            merged[mask] = label_id
    assert merged is not None and grid_affine is not None, "dcmqi wrote no segment"
    return LabelGrid(merged, grid_affine)


# ---- scores -------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    """One structure: Dice, and the centroid error (predicted - truth)."""

    name: str
    dice: float
    error_mm: npt.NDArray[np.float64]  # LPS vector
    error_voxels: npt.NDArray[np.float64]  # the same vector in the grid's (x, y, z) index frame

    def ok(self, min_dice: float) -> bool:
        return self.dice >= min_dice and bool(np.all(np.abs(self.error_voxels) < 1.0))

    def __str__(self) -> str:
        voxels = ", ".join(f"{v:+.2f}" for v in self.error_voxels)
        return (
            f"{self.name}: Dice {self.dice:.3f}, centroid error "
            f"{float(np.linalg.norm(self.error_mm)):.2f} mm = ({voxels}) voxels (x, y, z)"
        )


def centroid_lps(mask: np.ndarray, affine: np.ndarray) -> npt.NDArray[np.float64]:
    """Mean LPS position of the voxel centres in ``mask`` (z, y, x)."""
    z, y, x = np.nonzero(mask)
    mean_index = np.array([x.mean(), y.mean(), z.mean()])
    centroid: npt.NDArray[np.float64] = affine[:3, :3] @ mean_index + affine[:3, 3]
    return centroid


def score(
    predicted: np.ndarray, truth: np.ndarray, affine: np.ndarray, catalogue: Catalogue
) -> list[Score]:
    """Per catalogue structure present in the truth: Dice and centroid error on this grid."""
    assert predicted.shape == truth.shape, (predicted.shape, truth.shape)
    inverse = np.linalg.inv(affine[:3, :3])
    scores = []
    for label in catalogue.labels:
        want, got = truth == label.id, predicted == label.id
        if not want.any():
            continue
        overlap = int(np.logical_and(want, got).sum())
        dice = 2.0 * overlap / (int(want.sum()) + int(got.sum()))
        if got.any():
            error = centroid_lps(got, affine) - centroid_lps(want, affine)
        else:
            error = np.full(3, np.inf)
        scores.append(Score(label.name, dice, error, inverse @ error))
    return scores


def failures(scores: Sequence[Score], min_dice: float = 0.90) -> list[str]:
    return [str(s) for s in scores if not s.ok(min_dice)]
