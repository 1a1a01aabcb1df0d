"""Synthetic MR series, label maps and a stand-in label catalogue for the SEG encoder tests.

Shared by ``test_seg_encode.py`` and ``test_seg_ohif_parser.py``; the catalogue classes mirror
the fields of ``inference.catalogue`` that ``dicom_node.seg_encode`` reads.
"""

from __future__ import annotations

import datetime
import io
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

WEIGHTS_SHA256 = "0123456789abcdef" * 4
OTHER_SHA256 = "fedcba9876543210" * 4


@dataclass(frozen=True)
class Code:
    scheme: str
    code: str
    meaning: str


@dataclass(frozen=True)
class Label:
    id: int
    name: str
    category: Code
    type: Code
    modifier: Code | None
    color: tuple[int, int, int]


@dataclass(frozen=True)
class Catalogue:
    labels: list[Label] = field(default_factory=list)


ANATOMY = Code("SCT", "123037004", "Anatomical Structure")
LEFT = Code("SCT", "7771000", "Left")
RIGHT = Code("SCT", "24028007", "Right")

# Ids are not contiguous and one label (spleen) is absent from the label maps below, so the
# tests see the id -> segment number mapping at work.
CATALOGUE = Catalogue(
    labels=[
        Label(1, "liver", ANATOMY, Code("SCT", "10200004", "Liver"), None, (221, 130, 101)),
        Label(2, "spleen", ANATOMY, Code("SCT", "78961009", "Spleen"), None, (157, 108, 162)),
        Label(5, "kidney_right", ANATOMY, Code("SCT", "64033007", "Kidney"), RIGHT, (185, 102, 83)),
        Label(6, "kidney_left", ANATOMY, Code("SCT", "64033007", "Kidney"), LEFT, (185, 102, 83)),
    ]
)
PRESENT_IDS = [1, 5, 6]  # segment numbers 1, 2, 3


def mr_series(nz: int = 8, ny: int = 32, nx: int = 32, *, seed: int = 0) -> list[Dataset]:
    """An axial single-frame MR series with pixel data, sorted by slice position."""
    rng = np.random.default_rng(seed)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    now = datetime.datetime(2024, 5, 6, 7, 8, 9)
    images: list[Dataset] = []
    for z in range(nz):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = "ACC1"
        ds.Modality = "MR"
        ds.Manufacturer = "Synthetic"
        ds.ReferringPhysicianName = ""
        ds.PatientName = "Test^Patient"
        ds.PatientID = "P001"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.SliceThickness = 3.0
        ds.RepetitionTime = 5.0
        ds.EchoTime = 2.0
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = 3.0
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.StudyID = "1"
        ds.SeriesNumber = 3
        ds.InstanceNumber = z + 1
        ds.PatientOrientation = ["L", "P"]
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [-48.0, -40.0, 10.0 + 3.0 * z]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SliceLocation = 10.0 + 3.0 * z
        ds.PixelSpacing = [1.5, 1.25]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ny
        ds.Columns = nx
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = 2000
        ds.WindowWidth = 4000
        ds.PixelData = rng.integers(0, 4000, (ny, nx), dtype=np.uint16).tobytes()
        images.append(ds)
    return images


def enhanced_mr(series: list[Dataset]) -> Dataset:
    """The same series converted to one multi-frame (Legacy Converted Enhanced MR) image."""
    return hd.legacy.LegacyConvertedEnhancedMRImage(
        series,
        series_instance_uid=generate_uid(),
        series_number=4,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )


def ellipsoid(
    shape: tuple[int, int, int], centre: tuple[float, ...], radii: tuple[float, ...]
) -> np.ndarray:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    inside = (
        ((z - centre[0]) / radii[0]) ** 2
        + ((y - centre[1]) / radii[1]) ** 2
        + ((x - centre[2]) / radii[2]) ** 2
    ) <= 1.0
    return np.asarray(inside, dtype=bool)


def small_label_map(shape: tuple[int, int, int] = (8, 32, 32)) -> np.ndarray:
    """Liver plus a right/left kidney pair (ids 1, 5, 6); spleen (2) absent; slice 0 empty."""
    nz, ny, nx = shape
    label_map = np.zeros(shape, dtype=np.uint8)
    label_map[
        ellipsoid(shape, (nz * 0.5, ny * 0.35, nx * 0.3), (nz * 0.35, ny * 0.25, nx * 0.25))
    ] = 1
    # Patient right is image left for an axial LPS image.
    label_map[
        ellipsoid(shape, (nz * 0.6, ny * 0.7, nx * 0.25), (nz * 0.2, ny * 0.12, nx * 0.1))
    ] = 5
    label_map[
        ellipsoid(shape, (nz * 0.6, ny * 0.7, nx * 0.75), (nz * 0.2, ny * 0.12, nx * 0.1))
    ] = 6
    label_map[0] = 0
    return label_map


def write_series(images: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(images):
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


Charset = str | list[str] | None


def stored_series(charset: Charset, values: dict[str, bytes | str]) -> list[Dataset]:
    """The phantom series with these values, as a job reads it from the store."""
    sources: list[Dataset] = []
    for ds in mr_series():
        if charset is None:
            ds.pop("SpecificCharacterSet", None)
        else:
            ds.SpecificCharacterSet = charset
        for keyword, value in values.items():
            tag = tag_for_keyword(keyword)
            assert tag is not None
            # A bytes value is written as it is: the source holds exactly these bytes.
            ds[tag] = DataElement(tag, dictionary_VR(tag), value)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        sources.append(pydicom.dcmread(io.BytesIO(buffer.getvalue())))
    return sources


def seg_file_of(sources: list[Dataset]) -> bytes:
    """The SEG file a job writes for ``sources`` (the demo model, the small label map)."""
    from dicom_node.seg_encode import encode_seg
    from dicom_node.seg_write import seg_to_bytes

    seg = encode_seg(
        small_label_map(),
        sources,
        CATALOGUE,
        model_name="demo",
        model_version="1.0",
        weights_sha256=WEIGHTS_SHA256,
    )
    return seg_to_bytes(seg)
