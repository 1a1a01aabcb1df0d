"""Series -> volume: sort, check and stack the images of one DICOM series.

Geometry comes only from Image Position/Orientation (Patient), so patient position
(HFS, FFS, HFDL, ...) needs no special case. Slices are ordered by their position along
the slice normal (row cosines x column cosines), never by InstanceNumber, and index z of
the volume always runs along +normal.

Conventions: ``Volume.array`` is float32 shaped (z, y, x) = (slice, row, column), and
``Volume.affine`` maps (x=column, y=row, z=slice, 1) to LPS millimetres, the DICOM
patient coordinate system.

Headers are read first with ``stop_before_pixels`` to group, filter and sort; pixel data
is read only for the frames kept.

A series may hold several stacks of the same slices (echoes, time points, Dixon contrasts,
b-values). They are told apart by the attributes that differ between them (``_STACK_KEYS``)
and one stack is segmented, chosen by ``StackChoice``; images at one position that no such
attribute tells apart are refused.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from dicom_node.errors import SeriesError
from dicom_node.sop_classes import SEGMENTABLE, class_names, not_segmentable
from inference.log_context import LabelFilter
from inference.model_store import orientation_problem

logger = logging.getLogger(__name__)
# In a job, each line names it (job, study, series, version): the worker's label.
logger.addFilter(LabelFilter())

PathOrDataset = str | Path | Dataset

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")

# Tolerances. Positions come as decimal strings (DS) rounded by scanners to ~1e-3..1e-5 mm.
_ORIENTATION_TOL = 1e-3  # difference of direction cosines meaning "same plane"
_SPACING_REL_TOL = 0.15  # a step this much off the median step is a gap or overlap
_OFF_GRID_STEPS = 0.25  # how far a slice may lie from the even grid, in steps
_IN_PLANE_TOL_PIXELS = 0.1  # drift off the normal, in pixels, before refusing as tilt
_MAX_SCOUTS = 3  # other-plane images dropped silently; more means a mixed series
_SAME_POSITION_MM = 1e-3  # closer than this along the normal: the same slice position

# What tells the stacks of one series apart, in the order they are tried: a name for
# people, the single-frame attribute, and the functional group (sequence, attribute) of
# an enhanced multi-frame image. Acquisition Number comes last: some scanners number each
# slice of a 2D series as its own acquisition.
_STACK_KEYS: tuple[tuple[str, str | None, tuple[str, str] | None], ...] = (
    ("Stack ID", None, ("FrameContentSequence", "StackID")),
    (
        "Temporal Position",
        "TemporalPositionIdentifier",
        ("FrameContentSequence", "TemporalPositionIndex"),
    ),
    ("Echo Number", "EchoNumbers", None),
    ("Echo Time", "EchoTime", ("MREchoSequence", "EffectiveEchoTime")),
    ("Image Type", "ImageType", None),  # enhanced: the MR or CT Frame Type, read once
    ("b-value", "DiffusionBValue", ("MRDiffusionSequence", "DiffusionBValue")),
    (
        "Trigger Time",
        "TriggerTime",
        ("CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime"),
    ),
    # Several multi-frame images of one series at the same positions: one stack each.
    ("SOP Instance UID", None, None),
    ("Acquisition Number", "AcquisitionNumber", None),
)


@dataclass(frozen=True)
class StackChoice:
    """Which stack to segment when a series holds several.

    ``order``: the stacks are ordered by where their images come in the series' own
    numbering (Instance Number, then frame number), then by the values that tell them
    apart; ``first`` or ``last`` is taken. ``image_type``: when given, only stacks whose
    Image Type (Frame Type) has this value are considered, e.g. ``W`` for the water image
    of a Dixon series; when no stack has it, ``order`` decides among all, with a warning.
    """

    order: Literal["first", "last"] = "first"
    image_type: str | None = None


@dataclass(frozen=True)
class FrameRef:
    """Where slice z came from: a source instance, and its frame for multi-frame."""

    sop_instance_uid: str
    sop_class_uid: str
    frame_number: int | None = None  # 1-based; None for single-frame instances


@dataclass
class Volume:
    """One series as a 3D array with its position in patient space."""

    array: np.ndarray  # float32, (z, y, x), rescale applied
    affine: np.ndarray  # 4x4: (x=column, y=row, z=slice, 1) -> LPS mm
    frames: list[FrameRef]  # one per z
    source_datasets: list[Dataset]  # headers without pixel data, one per source instance
    frame_of_reference_uid: str
    modality: str
    stack: str = ""  # which stack of several was used, for people; empty for one stack
    # For people: images left out as copies of others, and why (the job's reason shows them).
    notes: list[str] = field(default_factory=list)

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel size in mm: (slice step, row spacing, column spacing)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(norms[2]), float(norms[1]), float(norms[0])

    @property
    def direction(self) -> np.ndarray:
        """3x3 unit vectors of the x, y, z index axes as columns (SimpleITK's layout)."""
        result: np.ndarray = self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)
        return result

    @property
    def origin(self) -> np.ndarray:
        """LPS mm of the centre of voxel (0, 0, 0)."""
        result: np.ndarray = self.affine[:3, 3].copy()
        return result

    @property
    def study_instance_uid(self) -> str:
        return str(self.source_datasets[0].StudyInstanceUID)

    @property
    def series_instance_uid(self) -> str:
        return str(self.source_datasets[0].SeriesInstanceUID)


@dataclass
class _Frame:
    """One 2D image of the series: a single-frame instance or one frame of a multi-frame."""

    source: int  # index into the list of instances
    frame_number: int | None
    position: np.ndarray
    row_cosines: np.ndarray
    column_cosines: np.ndarray
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    rows: int
    columns: int
    slope: float
    intercept: float
    localizer: bool
    # The values of _STACK_KEYS (by name) and where the frame comes in the series' order.
    stack_values: dict[str, Any] = field(default_factory=dict)
    order: tuple[float, int] = (0.0, 0)


@dataclass
class _Instance:
    header: Dataset
    path: Path | None
    dataset: Dataset | None  # the caller's dataset, pixels included, when given one
    name: str
    frames: list[_Frame] = field(default_factory=list)
    version: int = 0  # the version of the series it arrived in (the node's index), if known


def volume_from_series(
    items: Sequence[PathOrDataset],
    stack: StackChoice = StackChoice(),
    versions: Sequence[int] | None = None,
) -> Volume:
    """Build a ``Volume`` from the files (or datasets) of one series.

    A series of several stacks (echoes, time points, ...) gives the stack ``stack`` picks.
    ``versions``: for each item, the version of the series it arrived in. An image of a
    later version at the position of an earlier one, with the same stack attributes,
    replaces it: the series was sent again (with new SOP Instance UIDs, or the same UIDs
    would have replaced the file).
    Raises ``SeriesError`` with a message for a human when the series cannot be a volume:
    missing UIDs or pixel data, several series, mixed orientations, a gap, positions
    repeated with nothing telling the stacks apart, a tilted or sheared grid, fewer than
    two slices.
    """
    if not items:
        raise SeriesError("no images were given for the series")
    if versions is not None and len(versions) != len(items):
        raise ValueError(f"{len(versions)} versions for {len(items)} images")
    instances = [_read_header(item) for item in items]
    for instance, version in zip(instances, versions or (), strict=False):
        instance.version = version
    return _build_volume(instances, stack)


def _build_volume(instances: list[_Instance], stack: StackChoice) -> Volume:
    _check_identity(instances)
    instances = _images_only(instances)
    for index, instance in enumerate(instances):
        instance.frames = _frames_of(instance, index)
    notes = _drop_copies(instances)
    frames, set_aside = _select_frames(instances)
    frames, stack_description = _choose_stack(
        frames, stack, str(instances[0].header.SeriesInstanceUID)
    )
    frames, affine = _sort_and_check_geometry(frames, set_aside)
    array = _read_pixels(instances, frames)

    used: list[int] = []
    for frame in frames:
        if frame.source not in used:
            used.append(frame.source)
    refs = [
        FrameRef(
            str(instances[f.source].header.SOPInstanceUID),
            str(instances[f.source].header.SOPClassUID),
            f.frame_number,
        )
        for f in frames
    ]
    first = instances[frames[0].source].header
    volume = Volume(
        array=array,
        affine=affine,
        frames=refs,
        source_datasets=[instances[i].header for i in used],
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        modality=str(first.get("Modality", "")),
        stack=stack_description,
        notes=notes,
    )
    logger.info(
        "series %s: volume %s (z, y, x), spacing %s mm, from %d instance(s)",
        volume.series_instance_uid,
        array.shape,
        tuple(round(s, 4) for s in volume.spacing_zyx),
        len(used),
    )
    return volume


def volume_from_folder(
    folder: str | Path,
    series_instance_uid: str | None = None,
    stack: StackChoice = StackChoice(),
) -> Volume:
    """Read every DICOM file under ``folder`` (recursively) and build one ``Volume``.

    Non-DICOM files are ignored. When the folder holds several series, give
    ``series_instance_uid``; otherwise ``SeriesError`` lists the series found.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SeriesError(f"{folder} is not a folder")
    by_series: dict[str, list[_Instance]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            logger.debug("ignoring %s: not a DICOM file", path)
            continue
        if "SOPClassUID" not in header:
            continue  # DICOMDIR and other non-image files
        instance = _Instance(header, path, None, path.name)
        by_series.setdefault(str(header.get("SeriesInstanceUID", "")), []).append(instance)
    if not by_series:
        raise SeriesError(f"no DICOM files found under {folder}")
    if series_instance_uid is not None:
        if series_instance_uid not in by_series:
            raise SeriesError(
                f"series {series_instance_uid} is not under {folder}; found: "
                + ", ".join(_describe_series(uid, h) for uid, h in by_series.items())
            )
        chosen = by_series[series_instance_uid]
    elif len(by_series) > 1:
        raise SeriesError(
            f"{folder} holds {len(by_series)} series; choose one by Series Instance UID: "
            + "; ".join(_describe_series(uid, h) for uid, h in by_series.items())
        )
    else:
        chosen = next(iter(by_series.values()))
    return _build_volume(chosen, stack)


def _describe_series(uid: str, instances: list[_Instance]) -> str:
    first = instances[0].header
    description = first.get("SeriesDescription", "")
    modality = first.get("Modality", "?")
    return f"{uid or '(empty UID)'} ({modality} '{description}', {len(instances)} files)"


# ---- headers ------------------------------------------------------------------------

# A file that is not there or not readable fails the job for good (its reason says which);
# any other OSError (an I/O error, too many open files, a stale network mount) may pass,
# and propagates for the job to be retried.
_GONE: tuple[type[OSError], ...] = (FileNotFoundError, IsADirectoryError, PermissionError)
_UNREADABLE: tuple[type[Exception], ...] = (InvalidDicomError, EOFError, ValueError, *_GONE)


def _read_header(item: PathOrDataset) -> _Instance:
    if isinstance(item, Dataset):
        header = Dataset()
        for element in item:
            if element.keyword not in _PIXEL_KEYWORDS:
                header.add(element)
        if hasattr(item, "file_meta"):
            header.file_meta = item.file_meta
        name = str(item.get("SOPInstanceUID", "") or getattr(item, "filename", "") or "dataset")
        has_pixels = any(k in item for k in _PIXEL_KEYWORDS)
        if not has_pixels:
            raise SeriesError(f"image {name} has no pixel data")
        return _Instance(header, None, item, name)
    path = Path(item)
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, ValueError) as exc:
        raise SeriesError(f"{path.name} is not a readable DICOM file: {exc}") from exc
    except _GONE as exc:
        raise SeriesError(f"cannot read {path}: {exc}") from exc
    return _Instance(header, path, None, path.name)


def _images_only(instances: list[_Instance]) -> list[_Instance]:
    """The images a model reads; other objects in the series are left out (logged), and a
    series of none is refused (e.g. a SEG sent back by a PACS that forwards whole studies)."""
    classes = {str(i.header.get("SOPClassUID", "")) for i in instances}
    why = not_segmentable(classes - {""})
    if why is not None:
        raise SeriesError(why)
    kept = [i for i in instances if str(i.header.get("SOPClassUID", "")) in SEGMENTABLE | {""}]
    if len(kept) < len(instances):
        logger.info(
            "series %s: %d object(s) left out, not images a model reads: %s",
            instances[0].header.SeriesInstanceUID,
            len(instances) - len(kept),
            class_names(classes - SEGMENTABLE - {""}),
        )
    return kept


def _check_identity(instances: list[_Instance]) -> None:
    for instance in instances:
        missing = [k for k in _REQUIRED_UIDS if not str(instance.header.get(k, "") or "").strip()]
        if missing:
            raise SeriesError(
                f"{instance.name}: {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} missing or empty; an image without "
                "its UIDs cannot be referenced by a segmentation. Fix the export "
                "(anonymisers must replace UIDs, not blank them)"
            )
    series = {str(i.header.SeriesInstanceUID) for i in instances}
    if len(series) > 1:
        raise SeriesError(
            f"the images belong to {len(series)} series ({', '.join(sorted(series))}); "
            "give the images of one series"
        )
    sop_uids = Counter(str(i.header.SOPInstanceUID) for i in instances)
    repeated = [uid for uid, n in sop_uids.items() if n > 1]
    if repeated:
        raise SeriesError(f"SOP Instance UID {repeated[0]} occurs {sop_uids[repeated[0]]} times")
    frames_of_ref = {str(i.header.get("FrameOfReferenceUID", "") or "") for i in instances}
    if "" in frames_of_ref:
        raise SeriesError(
            "FrameOfReferenceUID is missing or empty; without it image positions cannot "
            "be related to a segmentation"
        )
    if len(frames_of_ref) > 1:
        raise SeriesError("the images of the series have different Frame of Reference UIDs")


def _floats(value: object, count: int, what: str, name: str) -> list[float]:
    try:
        numbers = [float(v) for v in value]  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"{name}: {what} is not numeric ({value!r})") from exc
    if len(numbers) != count:
        raise SeriesError(f"{name}: {what} has {len(numbers)} values, expected {count}")
    if not all(math.isfinite(n) for n in numbers):
        # "nan" and "inf" convert: a volume placed or scaled by them is no volume.
        raise SeriesError(f"{name}: {what} is not a finite number ({value!r})")
    return numbers


def _rescale(value: object, default: float, what: str, name: str) -> float:
    if value is None or value == "":
        return default
    values = value if isinstance(value, MultiValue | list | tuple) else [value]
    return _floats(values, 1, what, name)[0]


def _slope(value: object, name: str) -> float:
    slope = _rescale(value, 1.0, "Rescale Slope", name)
    if slope == 0:
        # Not allowed (PS3.3 C.11.1.1.2 maps stored values to output units): every pixel of
        # the image would become the intercept, a blank slice the model reads as anatomy.
        raise SeriesError(f"{name}: Rescale Slope is 0, which makes every pixel the same")
    return slope


def _group_value(header: Dataset, per_frame: Dataset | None, sequence: str, keyword: str) -> Any:
    """An attribute from a functional group, per-frame first, then shared."""
    shared = header.get("SharedFunctionalGroupsSequence")
    for groups in (per_frame, shared[0] if shared else None):
        if groups is None or sequence not in groups or not groups[sequence].value:
            continue
        item = groups[sequence][0]
        if keyword in item and item[keyword].value not in (None, ""):
            return item[keyword].value
    return None


def _upper_values(value: Any) -> list[str]:
    """A CS attribute's values, upper case; a single value comes as a plain str."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value.upper()]
    return [str(v).upper() for v in value]


def _frames_of(instance: _Instance, index: int) -> list[_Frame]:
    header, name = instance.header, instance.name
    if int(header.get("SamplesPerPixel", 1) or 1) != 1:
        raise SeriesError(
            f"{name}: colour images ({header.SamplesPerPixel} samples) are not supported"
        )
    if "Rows" not in header or "Columns" not in header:
        raise SeriesError(f"{name} has no pixel data (Rows/Columns absent)")
    rows, columns = int(header.Rows), int(header.Columns)
    image_type = _upper_values(header.get("ImageType"))
    localizer = "LOCALIZER" in image_type

    if "PerFrameFunctionalGroupsSequence" in header:
        per_frames = header.PerFrameFunctionalGroupsSequence
        count = int(header.get("NumberOfFrames", len(per_frames)) or len(per_frames))
        if len(per_frames) != count:
            raise SeriesError(
                f"{name}: {count} frames but {len(per_frames)} per-frame functional groups"
            )
        frames = []
        for number, groups in enumerate(per_frames, start=1):
            where = f"{name} frame {number}"
            position = _group_value(header, groups, "PlanePositionSequence", "ImagePositionPatient")
            orientation = _group_value(
                header, groups, "PlaneOrientationSequence", "ImageOrientationPatient"
            )
            spacing = _group_value(header, groups, "PixelMeasuresSequence", "PixelSpacing")
            if position is None or orientation is None or spacing is None:
                raise SeriesError(
                    f"{where} lacks Plane Position, Plane Orientation or Pixel Measures; "
                    "its place in space is unknown"
                )
            slope = _group_value(header, groups, "PixelValueTransformationSequence", "RescaleSlope")
            intercept = _group_value(
                header, groups, "PixelValueTransformationSequence", "RescaleIntercept"
            )
            frame_type = _upper_values(
                _group_value(header, groups, "MRImageFrameTypeSequence", "FrameType")
                or _group_value(header, groups, "CTImageFrameTypeSequence", "FrameType")
            )
            frame = _make_frame(
                index,
                number,
                position,
                orientation,
                spacing,
                rows,
                columns,
                slope,
                intercept,
                localizer or "LOCALIZER" in frame_type,
                where,
            )
            frame.stack_values = {
                key: _stack_value(_group_value(header, groups, *group) if group else None)
                for key, _, group in _STACK_KEYS
            }
            frame.stack_values["Image Type"] = tuple(frame_type) or None
            frame.stack_values["SOP Instance UID"] = str(header.SOPInstanceUID)
            frame.order = (_instance_number(header), number)
            frames.append(frame)
        return frames

    if "ImagePositionPatient" not in header or "ImageOrientationPatient" not in header:
        raise SeriesError(
            f"{name} lacks Image Position/Orientation (Patient); its place in space is unknown"
        )
    if "PixelSpacing" not in header:
        raise SeriesError(f"{name} lacks Pixel Spacing; voxel size is unknown")
    if int(header.get("NumberOfFrames", 1) or 1) != 1:
        raise SeriesError(
            f"{name}: multi-frame image without per-frame functional groups is not supported"
        )
    frame = _make_frame(
        index,
        None,
        header.ImagePositionPatient,
        header.ImageOrientationPatient,
        header.PixelSpacing,
        rows,
        columns,
        header.get("RescaleSlope"),
        header.get("RescaleIntercept"),
        localizer,
        name,
    )
    frame.stack_values = {
        key: _stack_value(header.get(keyword) if keyword else None)
        for key, keyword, _ in _STACK_KEYS
    }
    frame.order = (_instance_number(header), 0)
    return [frame]


def _instance_number(header: Dataset) -> float:
    try:
        return float(header.get("InstanceNumber"))
    except (TypeError, ValueError):
        return float("inf")  # absent or not a number: after the numbered ones


def _stack_value(value: Any) -> Any:
    """A comparable, hashable form of an attribute that may tell stacks apart."""
    if value is None or value == "":
        return None
    if isinstance(value, str | bytes):
        return str(value).strip().upper()
    if isinstance(value, Sequence):
        return tuple(str(v).strip().upper() for v in value)
    try:
        return round(float(value), 4)
    except (TypeError, ValueError):
        return str(value)


def _make_frame(
    index: int,
    number: int | None,
    position: object,
    orientation: object,
    spacing: object,
    rows: int,
    columns: int,
    slope: object,
    intercept: object,
    localizer: bool,
    where: str,
) -> _Frame:
    iop = np.array(_floats(orientation, 6, "Image Orientation (Patient)", where))
    row, col = iop[:3], iop[3:]
    if not (
        np.all(np.abs(iop) <= 1.01)  # a cosine; also keeps the norms below from overflowing
        and abs(np.linalg.norm(row) - 1) < 1e-2
        and abs(np.linalg.norm(col) - 1) < 1e-2
        and abs(float(np.dot(row, col))) < 1e-2
    ):
        raise SeriesError(
            f"{where}: Image Orientation (Patient) is not two orthogonal unit vectors"
        )
    # Re-orthonormalise: DS rounding leaves the cosines slightly off unit length.
    row = row / np.linalg.norm(row)
    col = col - np.dot(col, row) * row
    col = col / np.linalg.norm(col)
    pixel_spacing = _floats(spacing, 2, "Pixel Spacing", where)
    if min(pixel_spacing) <= 0:
        raise SeriesError(f"{where}: Pixel Spacing {pixel_spacing} is not positive")
    return _Frame(
        source=index,
        frame_number=number,
        position=np.array(_floats(position, 3, "Image Position (Patient)", where)),
        row_cosines=row,
        column_cosines=col,
        pixel_spacing=(pixel_spacing[0], pixel_spacing[1]),
        rows=rows,
        columns=columns,
        slope=_slope(slope, where),
        intercept=_rescale(intercept, 0.0, "Rescale Intercept", where),
        localizer=localizer,
    )


# ---- selection and geometry ---------------------------------------------------------


def _drop_copies(instances: list[_Instance]) -> list[str]:
    """Leave out frames that copy another frame's place; return notes for people.

    Frames are copies when ``_copy_key`` agrees (plane, position, matrix and the stack
    attributes). Of copies from several versions of the series, the latest version's stay:
    the series was sent again (with new SOP Instance UIDs; the same ones would have replaced
    the files). Copies left that have the same pixel values are one image stored twice (a
    series sent twice before it was complete, an export that duplicated instances): the
    last in the given order (the last to arrive, for the node's jobs) stays, and a model
    reads the same slice either way. Copies whose pixels differ all stay, and the stack
    split refuses them when nothing tells them apart.
    """
    groups: dict[tuple[Any, ...], list[tuple[int, _Frame]]] = {}
    for instance in instances:
        for frame in instance.frames:
            groups.setdefault(_copy_key(frame), []).append((instance.version, frame))
    shared = [group for group in groups.values() if len(group) > 1]
    if not shared:
        return []
    superseded: Counter[int] = Counter()
    dropped: set[int] = set()
    left: list[list[_Frame]] = []
    for group in shared:
        newest = max(version for version, _ in group)
        for version, frame in group:
            if version < newest:
                superseded[version] += 1
                dropped.add(id(frame))
        kept = [frame for version, frame in group if version == newest]
        if len(kept) > 1:
            left.append(kept)
    duplicates = _identical_copies(instances, left)
    dropped |= duplicates
    for instance in instances:
        instance.frames = [frame for frame in instance.frames if id(frame) not in dropped]
    uid = instances[0].header.SeriesInstanceUID
    notes: list[str] = []
    if superseded:
        logger.info(
            "series %s: %d image(s) of version(s) %s left out: a later version sent images "
            "again at their positions",
            uid,
            superseded.total(),
            ", ".join(str(v) for v in sorted(superseded)),
        )
        notes.append(
            f"{superseded.total()} image(s) sent again in a later version replaced their "
            "earlier copies"
        )
    if duplicates:
        logger.info(
            "series %s: %d image(s) left out: copies of other images at the same position "
            "with the same pixel values",
            uid,
            len(duplicates),
        )
        notes.append(f"{len(duplicates)} duplicate image(s) (same position and pixels) left out")
    return notes


def _identical_copies(instances: list[_Instance], groups: list[list[_Frame]]) -> set[int]:
    """The ids of the frames in ``groups`` (each of copies) to leave out: all but the last
    of a group whose pixel values are all the same. Compared by digest: copies of a whole
    4D series would not fit in memory as planes."""
    frames = [frame for group in groups for frame in group]
    digests: dict[int, bytes] = {
        id(frames[z]): hashlib.blake2b(plane.tobytes(), digest_size=16).digest()
        for z, plane in _planes(instances, frames)
    }
    dropped: set[int] = set()
    for group in groups:
        if len({digests[id(frame)] for frame in group}) == 1:
            dropped.update(id(frame) for frame in group[:-1])
    return dropped


def _copy_key(frame: _Frame) -> tuple[Any, ...]:
    # Positions come from the same scanner values when a series is sent again: rounding to
    # a hundredth of a millimetre only absorbs float noise.
    return (
        tuple(np.round(frame.position, 2)),
        tuple(np.round(frame.row_cosines, 4)),
        tuple(np.round(frame.column_cosines, 4)),
        frame.rows,
        frame.columns,
        frame.localizer,
        repr(sorted((k, v) for k, v in frame.stack_values.items() if k != "SOP Instance UID")),
    )


def _same_plane(a: _Frame, b: _Frame) -> bool:
    return bool(
        np.abs(a.row_cosines - b.row_cosines).max() < _ORIENTATION_TOL
        and np.abs(a.column_cosines - b.column_cosines).max() < _ORIENTATION_TOL
    )


def _select_frames(instances: list[_Instance]) -> tuple[list[_Frame], list[_Frame]]:
    """Drop localizers and a few other-plane scouts; refuse genuinely mixed series.
    Returns the frames kept and the scouts set aside."""
    frames = [f for inst in instances for f in inst.frames]
    localizers = [f for f in frames if f.localizer]
    if localizers:
        logger.info(
            "series %s: dropping %d localizer image(s)",
            instances[0].header.SeriesInstanceUID,
            len(localizers),
        )
    frames = [f for f in frames if not f.localizer]
    if not frames:
        raise SeriesError("the series holds only localizer images")

    groups: list[list[_Frame]] = []
    for frame in frames:
        for group in groups:
            ref = group[0]
            if (frame.rows, frame.columns) == (ref.rows, ref.columns) and _same_plane(frame, ref):
                group.append(frame)
                break
        else:
            groups.append([frame])
    groups.sort(key=len, reverse=True)
    kept, others = groups[0], [f for g in groups[1:] for f in g]
    if others:
        if len(others) > _MAX_SCOUTS or len(others) >= len(kept):
            raise SeriesError(
                f"mixed orientations or image sizes in one series: {len(groups)} groups of "
                f"{', '.join(str(len(g)) for g in groups)} images; the series must be one "
                "stack of parallel slices"
            )
        logger.info(
            "series %s: dropping %d image(s) of another plane or size (scouts); keeping %d",
            instances[0].header.SeriesInstanceUID,
            len(others),
            len(kept),
        )
    spacings = {f.pixel_spacing for f in kept}
    if (
        max(abs(a - b) for s in spacings for a, b in zip(s, kept[0].pixel_spacing, strict=True))
        > 1e-4
    ):
        raise SeriesError(f"the slices have different Pixel Spacing: {sorted(spacings)}")
    return kept, others


def _shares_positions(frames: list[_Frame]) -> bool:
    normal = np.cross(frames[0].row_cosines, frames[0].column_cosines)
    distances = np.sort([float(np.dot(f.position, normal)) for f in frames])
    return bool(len(distances) > 1 and np.diff(distances).min() < _SAME_POSITION_MM)


def _split_stacks(frames: list[_Frame]) -> tuple[list[str], list[list[_Frame]]]:
    """The stacks of a series whose images repeat positions, and the attributes used.

    Attributes are added in ``_STACK_KEYS`` order until no stack repeats a position, so a
    value that varies for another reason (a per-slice acquisition number) is not used
    when an earlier one already separates the stacks. No split: ([], [frames]).
    """
    if not _shares_positions(frames):
        return [], [frames]
    used: list[str] = []
    for key, _, _ in _STACK_KEYS:
        if len({f.stack_values.get(key) for f in frames}) < 2:
            continue
        used.append(key)
        stacks: dict[tuple[Any, ...], list[_Frame]] = {}
        for frame in frames:
            stacks.setdefault(tuple(frame.stack_values.get(k) for k in used), []).append(frame)
        if not any(_shares_positions(stack) for stack in stacks.values()):
            return used, list(stacks.values())
    return used, [frames]


def _describe_stack(keys: list[str], stack: list[_Frame]) -> str:
    def show(value: Any) -> str:
        if isinstance(value, tuple):
            return "\\".join(value)
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return "none" if value is None else str(value)

    values = ", ".join(f"{k} {show(stack[0].stack_values.get(k))}" for k in keys)
    return f"{values}: {len(stack)} images"


def _choose_stack(
    frames: list[_Frame], choice: StackChoice, series_uid: str
) -> tuple[list[_Frame], str]:
    """One stack of a series that holds several; (frames, description). One stack: as is."""
    keys, stacks = _split_stacks(frames)
    if len(stacks) == 1:
        return stacks[0], ""

    def sort_key(stack: list[_Frame]) -> tuple[Any, ...]:
        values = tuple(_sortable(stack[0].stack_values.get(k)) for k in keys)
        return (min(f.order for f in stack), values)

    stacks.sort(key=sort_key)
    candidates = stacks
    if choice.image_type:
        wanted = choice.image_type.strip().upper()
        candidates = [s for s in stacks if wanted in (s[0].stack_values.get("Image Type") or ())]
        if not candidates:
            logger.warning(
                "series %s: no stack has Image Type %s (stacks: %s); taking the %s",
                series_uid,
                wanted,
                "; ".join(_describe_stack(keys, s) for s in stacks),
                choice.order,
            )
            candidates = stacks
    chosen = candidates[0] if choice.order == "first" else candidates[-1]
    number = stacks.index(chosen) + 1
    description = f"stack {number} of {len(stacks)} ({_describe_stack(keys, chosen)})"
    logger.info(
        "series %s holds %d stacks told apart by %s; segmenting %s",
        series_uid,
        len(stacks),
        ", ".join(keys),
        description,
    )
    return chosen, description


def _sortable(value: Any) -> tuple[int, Any]:
    # Numbers before text before nothing, so mixed or missing values still sort.
    if isinstance(value, float):
        return (0, value)
    if value is None:
        return (2, "")
    return (1, str(value))


def _sort_and_check_geometry(
    frames: list[_Frame], set_aside: Sequence[_Frame] = ()
) -> tuple[list[_Frame], np.ndarray]:
    if len(frames) < 2:
        raise SeriesError(
            "the series has a single image; a 2D image cannot be segmented in 3D "
            "(send the whole stack of slices)"
        )
    row, col = frames[0].row_cosines, frames[0].column_cosines
    normal = np.cross(row, col)
    frames = sorted(frames, key=lambda f: float(np.dot(f.position, normal)))
    positions = np.array([f.position for f in frames])
    distance = positions @ normal
    steps = np.diff(distance)
    if steps.min() < _SAME_POSITION_MM:
        raise SeriesError(
            f"{int((steps < _SAME_POSITION_MM).sum()) + 1} images share a position along the "
            "slice normal and no attribute tells their stacks apart (Echo Number or Time, "
            "Temporal Position, Image Type, Stack ID, b-value, Trigger Time, Acquisition "
            "Number); the series cannot form one volume"
        )
    median = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - median) > _SPACING_REL_TOL * median)
    if bad.size:
        i = int(bad[0])
        where = f"between slices {i} and {i + 1} (of {len(frames)})"
        # An image set aside as a scout for its size alone may be the slice that is missing.
        inside = [
            f
            for f in set_aside
            if _same_plane(f, frames[0])
            and distance[i] < float(np.dot(f.position, normal)) < distance[i + 1]
        ]
        if inside:
            sizes = sorted({f"{f.rows}x{f.columns}" for f in inside})
            raise SeriesError(
                f"the series mixes image sizes: {len(inside)} image(s) of "
                f"{', '.join(sizes)} lie {where}, where the other images are "
                f"{frames[0].rows}x{frames[0].columns}; it cannot form one volume"
            )
        raise SeriesError(
            f"uneven slice spacing: step {steps[i]:.3f} mm {where} where the usual step is "
            f"{median:.3f} mm; slices are missing or the series is incomplete"
        )
    # Every position must lie on the line through the first one along the normal;
    # otherwise the stack is tilted (CT gantry tilt) or sheared and not a regular grid.
    offsets = positions - positions[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    drift = float(np.linalg.norm(in_plane, axis=1).max())
    tolerance = _IN_PLANE_TOL_PIXELS * min(frames[0].pixel_spacing)
    if drift > tolerance:
        angle = float(np.degrees(np.arctan2(drift, distance[-1] - distance[0])))
        raise SeriesError(
            f"slice positions are not along the slice normal (drift {drift:.2f} mm, about "
            f"{angle:.1f} degrees): a gantry-tilted or sheared stack is not supported; "
            "resample it on the scanner or send an untilted reconstruction"
        )
    step = float(distance[-1] - distance[0]) / (len(frames) - 1)
    # Each step within 15% of the median still lets a spacing that changes gradually (or in
    # two parts) stray from the even grid the volume is: the model would see the anatomy
    # stretched, by millimetres at the far end. A quarter of a step is far above rounding.
    off_grid = np.abs(distance - (distance[0] + step * np.arange(len(frames))))
    worst = int(np.argmax(off_grid))
    if off_grid[worst] > _OFF_GRID_STEPS * step:
        raise SeriesError(
            f"uneven slice spacing: the steps range from {steps.min():.3f} to "
            f"{steps.max():.3f} mm, and slice {worst} (of {len(frames)}) lies "
            f"{off_grid[worst]:.2f} mm from where an even spacing of {step:.3f} mm puts it; "
            "the series cannot form one volume (send a reconstruction with even spacing)"
        )
    spacing_between_rows, spacing_between_columns = frames[0].pixel_spacing
    affine = np.eye(4)
    affine[:3, 0] = row * spacing_between_columns
    affine[:3, 1] = col * spacing_between_rows
    affine[:3, 2] = normal * step
    affine[:3, 3] = positions[0]
    return frames, affine


# ---- pixels -------------------------------------------------------------------------


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _read_pixels(instances: list[_Instance], frames: list[_Frame]) -> np.ndarray:
    array = np.empty((len(frames), frames[0].rows, frames[0].columns), dtype=np.float32)
    for z, plane in _planes(instances, frames):
        array[z] = plane
    return array


def _planes(instances: list[_Instance], frames: list[_Frame]) -> Iterator[tuple[int, np.ndarray]]:
    """(index into ``frames``, its plane with the rescale applied), each source decoded once."""
    by_source: dict[int, list[tuple[int, _Frame]]] = {}
    for z, frame in enumerate(frames):
        by_source.setdefault(frame.source, []).append((z, frame))
    for source, members in by_source.items():
        pixels = _decode(instances[source])
        if pixels.ndim == 2:
            pixels = pixels[np.newaxis]
        for z, frame in members:
            index = 0 if frame.frame_number is None else frame.frame_number - 1
            if index >= pixels.shape[0] or pixels.shape[1:] != (frame.rows, frame.columns):
                raise SeriesError(
                    f"{instances[source].name}: pixel data shape {pixels.shape} does not match "
                    f"Rows/Columns/NumberOfFrames"
                )
            plane = pixels[index].astype(np.float64)
            if frame.slope != 1.0 or frame.intercept != 0.0:
                with np.errstate(over="ignore", invalid="ignore"):  # checked just below
                    plane = plane * frame.slope + frame.intercept
                if not np.all(np.abs(plane) <= _FLOAT32_MAX):  # False for inf and NaN too
                    raise SeriesError(
                        f"{instances[source].name}: Rescale Slope {frame.slope:g} and "
                        f"Intercept {frame.intercept:g} give values no volume can hold"
                    )
            yield z, plane


def _decode(instance: _Instance) -> np.ndarray:
    dataset = instance.dataset
    if dataset is None:
        try:
            dataset = pydicom.dcmread(str(instance.path))
        except _UNREADABLE as exc:
            raise SeriesError(f"cannot read {instance.name}: {exc}") from exc
        if not any(k in dataset for k in _PIXEL_KEYWORDS):
            raise SeriesError(f"image {instance.name} has no pixel data")
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    try:
        pixels: np.ndarray = dataset.pixel_array
    except MemoryError:
        raise  # not the image's fault: the job is retried (several workers decoding at once)
    except Exception as exc:  # decoders raise many types; all mean "cannot decode"
        syntax_name = getattr(syntax, "name", syntax) or "unknown transfer syntax"
        raise SeriesError(
            f"cannot decode the pixel data of {instance.name} ({syntax_name}): {exc}"
        ) from exc
    return pixels


# ---- reorientation ------------------------------------------------------------------


@dataclass(frozen=True)
class AxisReorientation:
    """An exact permutation/flip of index axes (no resampling) and its inverse.

    ``permutation[j]`` is the source index axis (0=x, 1=y, 2=z) that becomes output index
    axis j; ``flips[j]`` says whether it is reversed. ``source_shape`` is (z, y, x).
    """

    permutation: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    source_shape: tuple[int, int, int]

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Source-grid array (z, y, x, ...) -> canonical-grid array."""
        # Array axis a holds index axis 2 - a; output array axis 2 - j takes source 2 - perm[j].
        axes = [2 - self.permutation[2 - a] for a in range(3)] + list(range(3, array.ndim))
        out = np.transpose(array, axes)
        flip_axes = [2 - j for j in range(3) if self.flips[j]]
        return np.ascontiguousarray(np.flip(out, axis=tuple(flip_axes)) if flip_axes else out)

    def invert(self, array: np.ndarray) -> np.ndarray:
        """Canonical-grid array (e.g. a predicted label map) -> the source grid, exactly."""
        flip_axes = [2 - j for j in range(3) if self.flips[j]]
        out = np.flip(array, axis=tuple(flip_axes)) if flip_axes else array
        forward = [2 - self.permutation[2 - a] for a in range(3)]
        axes = [forward.index(a) for a in range(3)] + list(range(3, array.ndim))
        result = np.ascontiguousarray(np.transpose(out, axes))
        if result.shape[:3] != self.source_shape:
            raise ValueError(
                f"array shape {array.shape[:3]} is not the canonical shape of this volume"
            )
        return result

    def transform(self) -> np.ndarray:
        """4x4 mapping canonical (x, y, z, 1) indices to source (x, y, z, 1) indices."""
        sizes = (self.source_shape[2], self.source_shape[1], self.source_shape[0])
        t = np.zeros((4, 4))
        t[3, 3] = 1.0
        for j in range(3):
            i = self.permutation[j]
            if self.flips[j]:
                t[i, j] = -1.0
                t[i, 3] = sizes[i] - 1
            else:
                t[i, j] = 1.0
        return t


# Each axis code letter: the patient axis (DICOM's x, y, z: towards L, P, S) and its sign.
_AXIS_LETTERS = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}


def axis_targets(axes: str) -> list[tuple[int, int]]:
    """(patient axis, sign) each index axis x, y, z points to, from codes such as "LPS" (the
    node's own) or "RAS" (NIfTI's canonical, what TotalSegmentator's models were trained on)."""
    # The rule is model.yaml's (orientation_problem): one check for both.
    problem = orientation_problem(axes.upper())
    if problem is not None:
        raise ValueError(problem)
    return [_AXIS_LETTERS[letter] for letter in axes.upper()]


def closest_canonical_reorientation(
    affine: np.ndarray, shape_zyx: Sequence[int], axes: str = "LPS"
) -> AxisReorientation:
    """The axis permutation/flip making index axes x, y, z point closest to the patient
    directions ``axes`` names (L, P, S by default)."""
    targets = axis_targets(axes)
    direction = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    best: tuple[float, tuple[int, int, int]] | None = None
    # Try all 6 assignments; the best maximises the summed |cosine| (unique for any
    # grid less than 45 degrees oblique; ties broken by the first found).
    for perm in itertools.permutations(range(3)):
        score = sum(abs(direction[targets[j][0], perm[j]]) for j in range(3))
        if best is None or score > best[0] + 1e-9:
            best = (score, (perm[0], perm[1], perm[2]))
    permutation = best[1] if best is not None else (0, 1, 2)
    flips = tuple(
        bool(targets[j][1] * direction[targets[j][0], permutation[j]] < 0) for j in range(3)
    )
    z, y, x = (int(n) for n in shape_zyx)
    return AxisReorientation(permutation, (flips[0], flips[1], flips[2]), (z, y, x))


def reorient_to_closest_canonical(
    volume_array: np.ndarray, affine: np.ndarray, axes: str = "LPS"
) -> tuple[np.ndarray, np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Permute/flip a (z, y, x) array so x, y, z point as closely as possible to the patient
    directions ``axes`` names: L, P, S by default; R, A, S for a model trained on NIfTI's
    canonical orientation.

    Returns the canonical array, its affine, and a function mapping an array on the
    canonical grid (a predicted label map) back onto the source grid exactly.
    No resampling: an oblique grid stays oblique, only its axes are reordered.
    """
    reorientation = closest_canonical_reorientation(affine, volume_array.shape[:3], axes)
    canonical = reorientation.apply(volume_array)
    canonical_affine = affine @ reorientation.transform()
    return canonical, canonical_affine, reorientation.invert
