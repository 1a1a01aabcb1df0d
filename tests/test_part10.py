"""The hand-encoded file header equals pydicom's, and the stored file reads back."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from dicom_node.part10 import file_header


def _pydicom_header(sop_class: str, sop_instance: str, syntax: str, ae: str) -> bytes:
    meta = FileMetaDataset()
    meta.FileMetaInformationGroupLength = 0
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    if ae:
        meta.SourceApplicationEntityTitle = ae
    out = io.BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue()


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax", "ae"),
    [
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4", "1.2.840.10008.1.2.1", "STORESCU"),  # even
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.45", "1.2.840.10008.1.2", "ODD"),  # odd lengths
        ("1.2.840.10008.5.1.4.1.1.66.4", "2.25.1" + "0" * 58, "1.2.840.10008.1.2.5", ""),
    ],
)
def test_header_is_what_pydicom_writes(
    sop_class: str, sop_instance: str, syntax: str, ae: str
) -> None:
    assert file_header(sop_class, sop_instance, syntax, ae) == _pydicom_header(
        sop_class, sop_instance, syntax, ae
    )


def test_header_and_dataset_read_back() -> None:
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.PatientName = "Doe^Jane"
    body = io.BytesIO()
    ds.save_as(body, implicit_vr=False, little_endian=True)  # dataset only, no header
    data = file_header(ds.SOPClassUID, ds.SOPInstanceUID, "1.2.840.10008.1.2.1", "CT01")
    back = pydicom.dcmread(io.BytesIO(data + body.getvalue()))
    assert back.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"
    assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert back.file_meta.SourceApplicationEntityTitle == "CT01"
    assert back.PatientName == "Doe^Jane"
