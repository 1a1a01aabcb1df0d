"""Write synthetic volumes as DICOM MR series on any grid, for tests.

A phantom is a *sampler*: a callable ``f(points_lps_mm: (N, 3)) -> (N,)`` defined in
physical LPS millimetres. ``write_series`` evaluates it at the voxel centres of a grid
(orientation, shape, spacing, centre), so the same physical object can be rendered
axial, sagittal, coronal or oblique and compared in patient space. An array shaped
(slices, rows, columns) may be given instead of a sampler.

Conventions (the same as ``dicom_node.volume``):

- arrays are (z, y, x) = (slice, row, column);
- a grid affine maps (x=column, y=row, z=slice, 1) to LPS mm;
- ``shape`` is (slices, rows, columns) and ``spacing`` is (slice spacing, row spacing,
  column spacing) in mm, i.e. z, y, x order;
- slice index z runs along the slice normal ``row_cosines x column_cosines``.

Bad inputs are made with the keyword arguments (``drop_slices`` for a gap,
``shear_mm_per_slice`` for a tilted/sheared grid) or by writing several calls into one
series with shared ``SeriesUids`` (mixed orientations, localizers); thin helpers below
name the usual cases.
"""

from __future__ import annotations

import copy
import datetime
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

EnhancedMRImageStorage = UID("1.2.840.10008.5.1.4.1.1.4.1")

Sampler = Callable[[np.ndarray], np.ndarray]

ORIENTATIONS = ("axial", "sagittal", "coronal", "oblique20")
PATIENT_POSITIONS = ("HFS", "HFP", "FFS", "FFP", "HFDL", "HFDR", "FFDL", "FFDR")

# Row / column direction cosines (LPS) as scanners commonly write them for HFS.
_BASE_COSINES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}

# In-plane rotation (degrees) and mirroring applied per patient position. Scanners show
# images as the patient lies, so other positions give other direction cosines for the
# same plane; the reader must handle every orthonormal pair, which this exercises.
_POSITION_IN_PLANE: dict[str, tuple[float, bool]] = {
    "HFS": (0.0, False),
    "HFP": (180.0, False),
    "HFDR": (90.0, False),
    "HFDL": (-90.0, False),
    "FFS": (0.0, True),
    "FFP": (180.0, True),
    "FFDR": (90.0, True),
    "FFDL": (-90.0, True),
}


def _rotation(axis: Sequence[float], degrees: float) -> np.ndarray:
    """Rodrigues rotation matrix about ``axis``."""
    a = np.asarray(axis, dtype=float)
    a = a / np.linalg.norm(a)
    t = math.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * (k @ k)


def orientation_cosines(
    orientation: str, patient_position: str = "HFS"
) -> tuple[np.ndarray, np.ndarray]:
    """Row and column direction cosines (LPS unit vectors) of a named plane."""
    if orientation == "oblique20":
        # Double oblique: axial tilted 20 deg about L-R, then turned 20 deg about S-I.
        rot = _rotation((0, 0, 1), 20.0) @ _rotation((1, 0, 0), 20.0)
        row = rot @ np.array([1.0, 0.0, 0.0])
        col = rot @ np.array([0.0, 1.0, 0.0])
    elif orientation in _BASE_COSINES:
        row = np.array(_BASE_COSINES[orientation][0])
        col = np.array(_BASE_COSINES[orientation][1])
    else:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, not {orientation!r}")
    if patient_position not in _POSITION_IN_PLANE:
        raise ValueError(f"patient_position must be one of {PATIENT_POSITIONS}")
    degrees, mirror = _POSITION_IN_PLANE[patient_position]
    normal = np.cross(row, col)
    turn = _rotation(normal, degrees)
    row, col = turn @ row, turn @ col
    if mirror:
        row = -row
    return row, col


def uniform_grid(
    orientation: str,
    shape: Sequence[int],
    spacing: Sequence[float],
    centre: Sequence[float] = (0.0, 0.0, 0.0),
    patient_position: str = "HFS",
) -> np.ndarray:
    """4x4 affine of a grid: (x=column, y=row, z=slice, 1) -> LPS mm.

    ``shape`` and ``spacing`` are (z, y, x); the grid's voxel centres are centred on
    ``centre`` (LPS mm). z runs along ``row x column``.
    """
    nz, ny, nx = (int(n) for n in shape)
    dz, dy, dx = (float(s) for s in spacing)
    row, col = orientation_cosines(orientation, patient_position)
    normal = np.cross(row, col)
    affine = np.eye(4)
    affine[:3, 0] = row * dx
    affine[:3, 1] = col * dy
    affine[:3, 2] = normal * dz
    half = np.array([(nx - 1) / 2, (ny - 1) / 2, (nz - 1) / 2])
    affine[:3, 3] = np.asarray(centre, dtype=float) - affine[:3, :3] @ half
    return affine


def grid_points(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """LPS mm of every voxel centre, shaped (z, y, x, 3)."""
    nz, ny, nx = (int(n) for n in shape)
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    idx = np.stack([x, y, z], axis=-1).reshape(-1, 3).astype(float)
    pts = idx @ affine[:3, :3].T + affine[:3, 3]
    return pts.reshape(nz, ny, nx, 3)


@dataclass(frozen=True)
class Ellipsoid:
    centre_lps_mm: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    label: int


@dataclass(frozen=True)
class SimplePhantom:
    """A few labelled ellipsoids over a smooth, asymmetric intensity ramp.

    The ramp differs along L, P and S, so any axis swap or flip changes voxel values;
    intensities are continuous (Gaussian blobs, no hard edges) and rounded to integers,
    so sampling at positions off by float rounding changes a value by at most 1.
    """

    ellipsoids: tuple[Ellipsoid, ...] = (
        Ellipsoid((-30.0, 10.0, 20.0), (18.0, 25.0, 30.0), 1),  # "left" lobe
        Ellipsoid((32.0, 12.0, 15.0), (15.0, 20.0, 25.0), 2),  # smaller "right" lobe
        Ellipsoid((0.0, -35.0, -30.0), (12.0, 12.0, 20.0), 3),  # anterior, inferior
    )

    def intensity(self, points_lps_mm: np.ndarray) -> np.ndarray:
        p = np.asarray(points_lps_mm, dtype=float).reshape(-1, 3)
        value = 1000.0 + 2.0 * p[:, 0] + 3.0 * p[:, 1] + 4.0 * p[:, 2]
        for e in self.ellipsoids:
            r2 = (((p - np.array(e.centre_lps_mm)) / np.array(e.radii_mm)) ** 2).sum(axis=1)
            value += 150.0 * e.label * np.exp(-r2)
        return np.rint(value)

    def labels(self, points_lps_mm: np.ndarray) -> np.ndarray:
        p = np.asarray(points_lps_mm, dtype=float).reshape(-1, 3)
        out = np.zeros(len(p), dtype=np.uint8)
        for e in self.ellipsoids:
            r2 = (((p - np.array(e.centre_lps_mm)) / np.array(e.radii_mm)) ** 2).sum(axis=1)
            out[r2 <= 1.0] = e.label
        return out

    def __call__(self, points_lps_mm: np.ndarray) -> np.ndarray:
        return self.intensity(points_lps_mm)


@dataclass(frozen=True)
class SeriesUids:
    """Patient/study/series identity; share one between calls to build odd series."""

    study_instance_uid: str = field(default_factory=generate_uid)
    series_instance_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    patient_id: str = "PHANTOM-001"
    patient_name: str = "Phantom^Test"
    accession_number: str = "ACC0001"
    series_number: int = 7


@dataclass
class WrittenSeries:
    """What ``write_series`` wrote, and the truth a reader must reproduce."""

    paths: list[Path]
    affine: np.ndarray  # grid affine, z along +normal, before drop/shear
    array: np.ndarray  # (z, y, x) float32 as a decoder must read it (rescale applied)
    uids: SeriesUids
    sop_instance_uids: list[str]  # per z for single-frame; one entry for enhanced
    orientation: str
    patient_position: str

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.array.shape
        return int(z), int(y), int(x)


def _quantize(values: np.ndarray, rescale: tuple[float, float]) -> np.ndarray:
    slope, intercept = rescale
    stored = np.rint((values - intercept) / slope)
    if stored.min() < 0 or stored.max() > 65535:
        raise ValueError(
            f"phantom values {values.min()}..{values.max()} do not fit uint16 with "
            f"rescale {rescale}; choose another intercept"
        )
    return stored.astype(np.uint16)


def _base_dataset(
    uids: SeriesUids, sop_class: str, sop_uid: str, modality: str, patient_position: str
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    today = datetime.date(2024, 5, 17).strftime("%Y%m%d")
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = uids.accession_number
    ds.Modality = modality
    ds.Manufacturer = "dicom-node test phantoms"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Phantom study"
    ds.SeriesDescription = "Phantom series"
    ds.PatientName = uids.patient_name
    ds.PatientID = uids.patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = uids.study_instance_uid
    ds.SeriesInstanceUID = uids.series_instance_uid
    ds.StudyID = "1"
    ds.SeriesNumber = uids.series_number
    ds.FrameOfReferenceUID = uids.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = patient_position
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if modality == "MR":
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.MagneticFieldStrength = 3
    return ds


def _save(ds: Dataset, path: Path, transfer_syntax: str, stored: np.ndarray) -> None:
    if UID(transfer_syntax).is_compressed:
        # generate_instance_uid=False: the test's bookkeeping relies on our UIDs.
        ds.compress(transfer_syntax, stored, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def _ds_list(values: np.ndarray) -> list[float]:
    # DS holds at most 16 characters; 10 significant digits keep sub-micrometre accuracy.
    return [0.0 if abs(v) < 1e-9 else float(f"{v:.10g}") for v in values]


def write_series(
    out_dir: Path,
    source: Sampler | np.ndarray,
    *,
    orientation: str = "axial",
    shape: Sequence[int] = (20, 24, 28),
    spacing: Sequence[float] = (5.0, 5.5, 5.0),
    centre: Sequence[float] = (0.0, 0.0, 0.0),
    patient_position: str = "HFS",
    reverse_order: bool = False,
    shuffle_instance_numbers: bool = True,
    enhanced: bool = False,
    per_frame_geometry: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    rescale: tuple[float, float] = (1.0, 0.0),
    drop_slices: Sequence[int] = (),
    shear_mm_per_slice: tuple[float, float] = (0.0, 0.0),
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "M", "ND"),
    uids: SeriesUids | None = None,
    modality: str = "MR",
    file_prefix: str = "IM",
    seed: int = 0,
) -> WrittenSeries:
    """Render ``source`` on a grid and write it as one DICOM series.

    source: a sampler ``f(points_lps_mm (N,3)) -> (N,)`` or an array (z, y, x) whose
        shape then overrides ``shape``.
    reverse_order: number instances (or frames) from the far end of the normal, as a
        scanner acquiring feet-to-head vs head-to-feet would.
    shuffle_instance_numbers: permute InstanceNumber so only positions give the order.
    enhanced: one Enhanced MR Image Storage multi-frame object instead of single frames.
    per_frame_geometry: (enhanced) pixel measures and orientation in every frame's functional
        groups instead of the shared ones, as Siemens XA writes them.
    drop_slices: grid slice indices not written (a gap).
    shear_mm_per_slice: in-plane shift per slice along (row, column) direction, the
        geometry of a gantry tilt (column direction) or a sheared stack.
    rescale: (slope, intercept); stored = round((value - intercept) / slope) as uint16.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    uids = uids or SeriesUids()
    if isinstance(source, np.ndarray):
        if source.ndim != 3:
            raise ValueError("an array source must be (z, y, x)")
        shape = source.shape
    affine = uniform_grid(orientation, shape, spacing, centre, patient_position)
    nz, ny, nx = (int(n) for n in shape)
    if isinstance(source, np.ndarray):
        values = np.asarray(source, dtype=float)
    else:
        values = np.asarray(source(grid_points(affine, shape).reshape(-1, 3)), dtype=float)
        values = values.reshape(nz, ny, nx)
    stored = _quantize(values, rescale)
    decoded = (stored.astype(np.float64) * rescale[0] + rescale[1]).astype(np.float32)

    row = affine[:3, 0] / np.linalg.norm(affine[:3, 0])
    col = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    shear = shear_mm_per_slice[0] * row + shear_mm_per_slice[1] * col
    positions = [affine[:3, 3] + z * affine[:3, 2] + z * shear for z in range(nz)]
    kept = [z for z in range(nz) if z not in set(drop_slices)]

    rng = np.random.default_rng(seed)
    acquisition_order = kept[::-1] if reverse_order else list(kept)
    numbers = np.arange(1, len(kept) + 1)
    if shuffle_instance_numbers:
        numbers = rng.permutation(numbers)
    number_of = {z: int(n) for z, n in zip(acquisition_order, numbers, strict=True)}
    iop = _ds_list(np.concatenate([row, col]))
    dz, dy, dx = (float(s) for s in spacing)

    if enhanced:
        sop_uid = generate_uid()
        ds = _base_dataset(uids, EnhancedMRImageStorage, sop_uid, modality, patient_position)
        path = out_dir / f"{file_prefix}_enhanced.dcm"
        _fill_enhanced(ds, iop, (dz, dy, dx), rescale, image_type)
        # Frames are stored in (possibly shuffled) InstanceNumber order, not by position.
        frame_order = sorted(kept, key=lambda z: number_of[z])
        _fill_enhanced_per_frame(ds, positions, frame_order, number_of)
        if per_frame_geometry:
            geometry_per_frame(ds)
        ds.Rows, ds.Columns = ny, nx
        ds.NumberOfFrames = len(frame_order)
        _save(ds, path, transfer_syntax, np.ascontiguousarray(stored[frame_order]))
        return WrittenSeries(
            [path], affine, decoded, uids, [sop_uid], orientation, patient_position
        )

    paths: list[Path] = []
    sop_uids: list[str] = []
    for z in range(nz):
        sop_uid = generate_uid()
        sop_uids.append(sop_uid)
        if z not in number_of:
            continue
        ds = _base_dataset(uids, MRImageStorage, sop_uid, modality, patient_position)
        ds.ImageType = list(image_type)
        ds.InstanceNumber = number_of[z]
        ds.AcquisitionNumber = 1
        ds.ImagePositionPatient = _ds_list(positions[z])
        ds.ImageOrientationPatient = iop
        ds.PixelSpacing = [dy, dx]  # (between rows, between columns)
        ds.SliceThickness = dz
        ds.SpacingBetweenSlices = dz
        ds.SliceLocation = float(f"{float(np.dot(positions[z], np.cross(row, col))):.10g}")
        ds.Rows, ds.Columns = ny, nx
        if rescale != (1.0, 0.0):
            ds.RescaleSlope = rescale[0]
            ds.RescaleIntercept = rescale[1]
            ds.RescaleType = "US"
        # Random file names so directory order tells nothing either.
        path = out_dir / f"{file_prefix}_{rng.integers(1 << 40):012x}.dcm"
        _save(ds, path, transfer_syntax, np.ascontiguousarray(stored[z]))
        paths.append(path)
    return WrittenSeries(paths, affine, decoded, uids, sop_uids, orientation, patient_position)


def _item(**attrs: object) -> Dataset:
    item = Dataset()
    for keyword, value in attrs.items():
        setattr(item, keyword, value)
    return item


def _fill_enhanced(
    ds: Dataset,
    iop: list[float],
    spacing_zyx: tuple[float, float, float],
    rescale: tuple[float, float],
    image_type: Sequence[str],
) -> None:
    dz, dy, dx = spacing_zyx
    ds.ImageType = [*image_type[:2], "VOLUME", "NONE"]
    ds.InstanceNumber = 1
    ds.ContentQualification = "PRODUCT"
    ds.AcquisitionDateTime = ds.ContentDate + ds.ContentTime
    ds.ImageComments = ""
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = "T1"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.ImagingFrequency = 123.2
    ds.MagneticFieldStrength = 3
    ds.DimensionOrganizationType = "3D"
    dim_org_uid = generate_uid()
    ds.DimensionOrganizationSequence = DicomSequence([_item(DimensionOrganizationUID=dim_org_uid)])
    ds.DimensionIndexSequence = DicomSequence(
        [
            _item(
                DimensionOrganizationUID=dim_org_uid,
                DimensionIndexPointer=0x00209056,  # StackID
                FunctionalGroupPointer=0x00209111,  # FrameContentSequence
            ),
            _item(
                DimensionOrganizationUID=dim_org_uid,
                DimensionIndexPointer=0x00209057,  # InStackPositionNumber
                FunctionalGroupPointer=0x00209111,
            ),
        ]
    )
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence(
        [_item(PixelSpacing=[dy, dx], SliceThickness=dz, SpacingBetweenSlices=dz)]
    )
    shared.PlaneOrientationSequence = DicomSequence([_item(ImageOrientationPatient=iop)])
    shared.PixelValueTransformationSequence = DicomSequence(
        [_item(RescaleSlope=rescale[0], RescaleIntercept=rescale[1], RescaleType="US")]
    )
    shared.MRImageFrameTypeSequence = DicomSequence(
        [
            _item(
                FrameType=[*image_type[:2], "VOLUME", "NONE"],
                PixelPresentation="MONOCHROME",
                VolumetricProperties="VOLUME",
                VolumeBasedCalculationTechnique="NONE",
                ComplexImageComponent="MAGNITUDE",
                AcquisitionContrast="T1",
            )
        ]
    )
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])


def _fill_enhanced_per_frame(
    ds: Dataset, positions: list[np.ndarray], frame_order: list[int], number_of: dict[int, int]
) -> None:
    # In-stack position follows space (1 = first along the normal), whatever the
    # storage order, as the standard asks.
    in_stack = {z: i + 1 for i, z in enumerate(sorted(frame_order))}
    frames = []
    for z in frame_order:
        frame = Dataset()
        frame.FrameContentSequence = DicomSequence(
            [
                _item(
                    StackID="1",
                    InStackPositionNumber=in_stack[z],
                    FrameAcquisitionNumber=number_of[z],
                    DimensionIndexValues=[1, in_stack[z]],
                )
            ]
        )
        frame.PlanePositionSequence = DicomSequence(
            [_item(ImagePositionPatient=_ds_list(positions[z]))]
        )
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)


def geometry_per_frame(ds: Dataset) -> None:
    """Move pixel measures and orientation from the shared functional groups into every
    frame's, as Siemens XA enhanced MR writes them."""
    shared = ds.SharedFunctionalGroupsSequence[0]
    for keyword in ("PixelMeasuresSequence", "PlaneOrientationSequence"):
        for frame in ds.PerFrameFunctionalGroupsSequence:
            setattr(frame, keyword, copy.deepcopy(shared[keyword].value))
        del shared[keyword]


# ---- named bad series ---------------------------------------------------------------


def write_gap_series(
    out_dir: Path, source: Sampler, missing: int = 5, **kw: object
) -> WrittenSeries:
    """A series with one slice missing in the middle."""
    return write_series(out_dir, source, drop_slices=(missing,), **kw)  # type: ignore[arg-type]


def write_sheared_series(
    out_dir: Path, source: Sampler, tilt_degrees: float = 12.0, **kw: object
) -> WrittenSeries:
    """A gantry-tilt-like stack: each slice shifted along the column direction."""
    spacing = kw.get("spacing", (5.0, 5.5, 5.0))
    shift = math.tan(math.radians(tilt_degrees)) * float(spacing[0])  # type: ignore[index]
    return write_series(out_dir, source, shear_mm_per_slice=(0.0, shift), **kw)  # type: ignore[arg-type]


def add_localizers(
    out_dir: Path,
    series: WrittenSeries,
    source: Sampler,
    *,
    count: int = 3,
    orientation: str = "sagittal",
    mark_localizer: bool = True,
) -> WrittenSeries:
    """Add ``count`` images of another plane to ``series`` (same Series Instance UID)."""
    image_type = (
        ("ORIGINAL", "PRIMARY", "LOCALIZER") if mark_localizer else ("ORIGINAL", "PRIMARY", "M")
    )
    return write_series(
        out_dir,
        source,
        orientation=orientation,
        shape=(count, 32, 32),
        spacing=(10.0, 4.0, 4.0),
        image_type=image_type,
        uids=series.uids,
        file_prefix="LOC",
        seed=1,
    )


def write_mixed_orientation_series(out_dir: Path, source: Sampler) -> WrittenSeries:
    """One series holding a full axial stack and a full sagittal stack."""
    axial = write_series(out_dir, source, orientation="axial", file_prefix="AX")
    write_series(
        out_dir,
        source,
        orientation="sagittal",
        shape=(12, 24, 28),
        uids=axial.uids,
        file_prefix="SAG",
        seed=2,
    )
    return axial


def write_stacked_series(
    out_dir: Path,
    sources: Sequence[Sampler],
    *,
    attributes: Sequence[dict[str, object]] = (),
    enhanced: bool = False,
    **kw: object,
) -> list[WrittenSeries]:
    """Several stacks of the same slices in one series, as multi-echo, dynamic or Dixon
    acquisitions write them: one stack per source, on one grid.

    Single-frame: stack k's images get the attributes ``attributes[k]`` (e.g.
    ``{"EchoNumbers": 2, "EchoTime": 9.8}`` or ``{"ImageType": [..., "W"]}``) and Instance
    Numbers after those of stack k - 1. Enhanced: one multi-frame object holding every
    stack's frames, stack after stack; stack k's frames carry Temporal Position Index k + 1
    (``attributes`` is not used). Returns one ``WrittenSeries`` per stack (enhanced: the
    same single path in each).
    """
    out_dir = Path(out_dir)
    uids = SeriesUids()
    stacks: list[WrittenSeries] = []
    for k, source in enumerate(sources):
        target = out_dir if not enhanced else out_dir / f".stack{k}"
        written = write_series(
            target,
            source,
            uids=uids,
            enhanced=enhanced,
            file_prefix=f"S{k}",
            seed=k,
            **kw,  # type: ignore[arg-type]
        )
        if not enhanced:
            for path in written.paths:
                ds = pydicom.dcmread(path)
                ds.InstanceNumber = int(ds.InstanceNumber) + k * len(written.paths)
                for keyword, value in (attributes[k] if k < len(attributes) else {}).items():
                    setattr(ds, keyword, value)
                ds.save_as(path, enforce_file_format=True)
        stacks.append(written)
    if not enhanced:
        return stacks

    parts = [pydicom.dcmread(s.paths[0]) for s in stacks]
    merged = parts[0]
    frames: list[Dataset] = []
    pixels: list[np.ndarray] = []
    for k, part in enumerate(parts):
        for frame in part.PerFrameFunctionalGroupsSequence:
            content = frame.FrameContentSequence[0]
            content.TemporalPositionIndex = k + 1
            content.DimensionIndexValues = [k + 1, int(content.InStackPositionNumber)]
            frames.append(frame)
        pixels.append(part.pixel_array.reshape(-1, int(part.Rows), int(part.Columns)))
    merged.DimensionIndexSequence[0].DimensionIndexPointer = 0x00209128  # TemporalPositionIndex
    merged.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    merged.NumberOfFrames = len(frames)
    merged.PixelData = np.ascontiguousarray(np.concatenate(pixels)).tobytes()
    path = out_dir / "MULTISTACK_enhanced.dcm"
    merged.save_as(path, enforce_file_format=True)
    for part_series in stacks:
        for stale in part_series.paths:
            stale.unlink()
        stale.parent.rmdir()
    return [
        WrittenSeries(
            [path],
            s.affine,
            s.array,
            s.uids,
            [str(merged.SOPInstanceUID)],
            s.orientation,
            s.patient_position,
        )
        for s in stacks
    ]
