"""Segment: one series' files -> volume -> model -> label map on the source grid -> DICOM-SEG.

The whole flow in one short function (:func:`segment_series`); each stage lives in its own
module (``volume``, ``inference.predictor``, ``seg_encode``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import Dataset

from dicom_node.config import InferenceSettings
from dicom_node.errors import ModelError, SeriesError
from dicom_node.rule_models import unfeedable
from dicom_node.seg_encode import encode_seg, label_volumes_ml
from dicom_node.volume import (
    StackChoice,
    Volume,
    closest_canonical_reorientation,
    volume_from_series,
)
from inference.log_context import LabelFilter
from inference.model_store import DESCRIPTOR, ModelInfo, load_model_info
from inference.predictor import Segmenter

logger = logging.getLogger(__name__)
logger.addFilter(LabelFilter())  # in a job, each line names it (the worker's label)


@dataclass
class SegmentResult:
    seg: Dataset
    binary_fallback: Dataset | None
    volumes_ml: list[tuple[int, str, float]]
    study_instance_uid: str
    series_instance_uid: str
    timings: dict[str, float] = field(default_factory=dict)
    stack: str = ""  # which stack of several was segmented; empty for one stack
    notes: list[str] = field(default_factory=list)  # images left out as copies, and why


# Which version of an installed model is on disk: `models add --replace` renames another
# folder in, a hand edit changes model.yaml; None where none is installed (a built-in one).
Installed = tuple[int, int, int, int, int] | None

LOAD_ATTEMPTS = 5  # a replace while loading is rare; one swapping without end is refused


def installed_version(root: Path) -> Installed:
    try:
        folder = root.stat()
        descriptor = (root / DESCRIPTOR).stat()
    except OSError:
        return None
    return (
        folder.st_dev,
        folder.st_ino,
        descriptor.st_ino,
        descriptor.st_mtime_ns,
        descriptor.st_size,
    )


class ModelCache:
    """Models loaded once per worker process and kept (nnU-Net predictors are slow to build),
    until the model on disk changes: each job runs the model installed when it started, read
    whole from one version of its folder."""

    def __init__(self, models_dir: Path, settings: InferenceSettings) -> None:
        self.models_dir = models_dir
        self.settings = settings
        self._loaded: dict[str, tuple[Installed, ModelInfo, Segmenter]] = {}

    def get(self, name: str) -> tuple[ModelInfo, Segmenter]:
        root = self.models_dir / name
        version = installed_version(root)
        cached = self._loaded.get(name)
        if cached is not None:
            if cached[0] == version:
                return cached[1], cached[2]
            # Dropped before loading again: two versions of a large model may not fit.
            del self._loaded[name]
            logger.info("model %s changed on disk (replaced, edited or removed): loading it", name)
        for _ in range(LOAD_ATTEMPTS):
            try:
                info = load_model_info(name, self.models_dir)
                segmenter = Segmenter(info, self.settings)  # it logs the load, device and time
            except (ModelError, OSError):
                # Read while `models add --replace` swapped the folders: load the new one.
                after = installed_version(root)
                if after == version:
                    raise
                version = after
                continue
            after = installed_version(root)
            if after == version:  # model.yaml, plans and weights all of one version
                self._loaded[name] = (version, info, segmenter)
                return info, segmenter
            logger.info("model %s was replaced while it loaded: loading the new version", name)
            version = after
        raise ModelError(
            f"model {name!r} changed on disk during each of {LOAD_ATTEMPTS} loads: "
            "wait for its installs to end"
        )


def _sources_in_slice_order(volume: Volume) -> Sequence[Dataset] | Dataset:
    """The source datasets aligned with the volume's slices, as the SEG encoder wants them."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in volume.source_datasets}
    if all(ref.frame_number is None for ref in volume.frames):
        return [by_uid[ref.sop_instance_uid] for ref in volume.frames]
    if len(volume.source_datasets) != 1:
        raise SeriesError("a series of several multi-frame images cannot be segmented yet")
    return volume.source_datasets[0]


def _to_frame_order(label_map: np.ndarray, volume: Volume, source: Dataset) -> np.ndarray:
    """Reorder planes from slice order (by position) to the multi-frame source's frame order."""
    out = np.empty_like(label_map)
    for z, ref in enumerate(volume.frames):
        assert ref.frame_number is not None
        out[ref.frame_number - 1] = label_map[z]
    return out


def _uses_every_frame(volume: Volume, source: Dataset) -> bool:
    numbers = sorted(ref.frame_number or 0 for ref in volume.frames)
    return numbers == list(range(1, int(source.get("NumberOfFrames", 1)) + 1))


InputModels = Callable[[str], tuple[ModelInfo, Segmenter]]


def _segment_in(
    volume: Volume,
    segmenter: Segmenter,
    axes: str,
    second: np.ndarray | None = None,
    *,
    release_pixels: bool = False,
) -> np.ndarray:
    """``segmenter``'s label map of ``volume`` (with ``second``, a label map on the volume's
    grid, as its second channel), on the volume's grid: the volume is turned to the patient
    directions ``axes`` its array axes x, y, z were trained on, and the result back.
    ``release_pixels``: the volume's own array is dropped once a turned copy is made (the
    caller needs only its geometry after): one float32 volume less at the peak."""
    turn = closest_canonical_reorientation(volume.affine, volume.array.shape[:3], axes)
    data = turn.apply(volume.array)
    if release_pixels and data is not volume.array:
        volume.array = np.empty((0, 0, 0), dtype=volume.array.dtype)
    if second is not None:
        data = np.stack([data, turn.apply(second).astype(np.float32)])
    affine = volume.affine @ turn.transform()
    z, y, x = (float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)[::-1])
    return turn.invert(segmenter.predict(data, (z, y, x)))


def _roi_segmentation(
    volume: Volume, model_name: str, roi_model: str, input_models: InputModels | None
) -> np.ndarray:
    """The ROI model's label map of ``volume``, on the volume's own grid: what a model of
    two inputs (TotalVibeSegmentator) takes beside the image, as TotalVibeSegmentator's own
    pipeline gives it (the ROI model's label values, in its orientation)."""
    if input_models is None:
        raise ModelError(
            f"model {model_name!r} takes the segmentation of model {roi_model!r} as its "
            "second input; segment with a model cache that can load it"
        )
    roi_info, roi_segmenter = input_models(roi_model)
    return _segment_in(volume, roi_segmenter, roi_info.descriptor.orientation)


def segment_volume(
    volume: Volume,
    info: ModelInfo,
    segmenter: Segmenter,
    *,
    format: str = "binary",
    compression: str = "none",
    binary_fallback: bool = False,
    weights_sha256: str | None = None,
    instance_number: int = 1,
    input_models: InputModels | None = None,
    release_pixels: bool = False,
) -> SegmentResult:
    """``input_models``: gives a model by name, for a model whose second input is another
    model's segmentation of the image (``roi_model`` in its model.yaml). ``release_pixels``:
    the volume's pixels may be dropped while it is segmented (the caller does not read them
    after)."""
    if volume.modality and volume.modality != info.descriptor.modality:
        logger.warning(
            "series %s is %s but model %s was trained on %s",
            volume.series_instance_uid,
            volume.modality,
            info.name,
            info.descriptor.modality,
        )
    timings: dict[str, float] = {}
    started = time.monotonic()
    roi_model = getattr(info.descriptor, "roi_model", None)
    roi = (
        None if roi_model is None else _roi_segmentation(volume, info.name, roi_model, input_models)
    )
    # Turned to the patient directions the model was trained on (model.yaml orientation).
    label_map = _segment_in(
        volume,
        segmenter,
        str(getattr(info.descriptor, "orientation", "LPS")),
        roi,
        release_pixels=release_pixels,
    )
    timings["inference_s"] = time.monotonic() - started

    started = time.monotonic()
    sources = _sources_in_slice_order(volume)
    label_map_for_seg = label_map
    source_frames: list[int] | None = None
    if isinstance(sources, Dataset):
        if _uses_every_frame(volume, sources):
            label_map_for_seg = _to_frame_order(label_map, volume, sources)
        else:
            # One stack (or the non-localizer frames) of the image: reference those frames.
            source_frames = [ref.frame_number or 0 for ref in volume.frames]
    sha = weights_sha256 or info.weights_sha256

    def encode(fmt: str, comp: str) -> Dataset:
        return encode_seg(
            label_map_for_seg,
            sources,
            info.catalogue,
            model_name=info.name,
            model_version=info.descriptor.version,
            weights_sha256=sha,
            format=fmt,
            compression=comp,
            source_frames=source_frames,
            instance_number=instance_number,
            stack=volume.stack,
        )

    seg = encode(format, compression)
    fallback = encode("binary", "none") if binary_fallback and format != "binary" else None
    timings["encode_s"] = time.monotonic() - started
    spacing_zyx = volume.spacing_zyx
    voxel_mm3 = float(spacing_zyx[0] * spacing_zyx[1] * spacing_zyx[2])
    return SegmentResult(
        seg=seg,
        binary_fallback=fallback,
        volumes_ml=[
            (i, n, ml) for i, n, ml in label_volumes_ml(label_map, voxel_mm3, info.catalogue)
        ],
        study_instance_uid=volume.study_instance_uid,
        series_instance_uid=volume.series_instance_uid,
        timings=timings,
        stack=volume.stack,
        notes=volume.notes,
    )


def segment_series(
    paths: Sequence[Path],
    info: ModelInfo,
    segmenter: Segmenter,
    stack: StackChoice | None = None,
    versions: Sequence[int] | None = None,
    **options: object,
) -> SegmentResult:
    """The whole flow for one series' files (``versions``: see ``volume_from_series``)."""
    if not paths:
        raise SeriesError("the series has no images")
    unfed = unfeedable(info)
    if unfed:  # before reading the series: no series can feed it
        raise ModelError(unfed)
    started = time.monotonic()
    volume = volume_from_series(list(paths), stack or StackChoice(), versions)
    load_s = time.monotonic() - started
    # Its own volume: its pixels go once turned to the model's axes (a copy), one float32
    # volume less at the peak for a non-axial series or a RAS model (TotalSegmentator's).
    result = segment_volume(volume, info, segmenter, release_pixels=True, **options)  # type: ignore[arg-type]
    result.timings["load_s"] = load_s
    return result
