"""Index text read from raw bytes equals pydicom's converted value, in every encoding."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pydicom
import pytest
from inprocess import (
    MR_IMAGE_STORAGE,
    InProcessNode,
    inprocess_node,
    minimal_mr_dataset,
    mr_store_association,
)
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import _config as pynetdicom_config
from random_headers import check_random_headers_are_stored
from sqlalchemy import text as sql

from dicom_node.header_values import as_int, as_text, integer, text

KEYWORDS = [
    "SOPInstanceUID",
    "PatientName",
    "PatientID",
    "PatientSex",
    "StudyDate",
    "StudyDescription",
    "Modality",
    "SeriesNumber",
    "ImageType",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "InstanceNumber",
    "Rows",
    "Columns",
    "AccessionNumber",
    "ProtocolName",
    "BodyPartExamined",
    "NumberOfFrames",
]


def _dataset(charset: str | None, name: str) -> Dataset:
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPInstanceUID = "1.2.3.4.567"  # odd length: NUL padded
    ds.PatientName = name
    ds.PatientID = " ID 7 "
    ds.PatientSex = "F"  # odd length: space padded
    ds.StudyDate = "20261121"
    ds.StudyDescription = "Abdomen\\second value"
    ds.Modality = "MR"
    ds.SeriesNumber = " 12"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.ImagePositionPatient = ["-125.5 ", "-0.25", "1e2"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.InstanceNumber = "3.0"  # an integer written as a decimal: pydicom reads 3
    ds.Rows = 512
    ds.Columns = 384
    ds.AccessionNumber = ""
    ds.BodyPartExamined = "ABDOMEN"
    return ds


def _reread(ds: Dataset, *, implicit: bool, little: bool) -> Dataset:
    out = io.BytesIO()
    ds.save_as(out, implicit_vr=implicit, little_endian=little)
    return pydicom.dcmread(io.BytesIO(out.getvalue()), force=True)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    ("implicit", "little"), [(False, True), (True, True), (False, False)], ids=["ELE", "ILE", "EBE"]
)
@pytest.mark.parametrize(
    ("charset", "name"),
    [(None, "Doe^Jane"), ("ISO_IR 100", "Müller^Jürgen"), ("ISO_IR 192", "山田^太郎")],
)
def test_raw_reading_equals_pydicom(
    implicit: bool, little: bool, charset: str | None, name: str
) -> None:
    ds = _dataset(charset, name)
    for keyword in KEYWORDS:
        tag = tag_for_keyword(keyword)
        assert tag is not None
        fast = _reread(ds, implicit=implicit, little=little)  # raw elements, unconverted
        slow = _reread(ds, implicit=implicit, little=little)
        expected = as_text(slow[tag].value) if tag in slow else ""
        assert text(fast, tag) == expected, keyword
        expected_int = as_int(slow[tag].value) if tag in slow else None
        assert integer(_reread(ds, implicit=implicit, little=little), tag) == expected_int, keyword
    assert text(_reread(ds, implicit=implicit, little=little), 0x00100010) == name


def test_absent_is_empty() -> None:
    ds = _reread(Dataset(), implicit=False, little=True)
    assert text(ds, 0x00080060) == ""
    assert integer(ds, 0x00280010) is None


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")
def test_malformed_number_is_indexed_as_absent() -> None:
    element = struct.pack("<HH2sH", 0x0028, 0x0008, b"IS", 2) + b"x1"
    ds = pydicom.dcmread(io.BytesIO(element), force=True)
    assert integer(ds, 0x00280008) is None
    assert text(pydicom.dcmread(io.BytesIO(element), force=True), 0x00280008) == "x1"


def _raw(tag: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    ("keyword", "vr", "value"),
    [
        ("BodyPartExamined", b"CS", b"LIVER\t\x00"),  # control whitespace, then NUL padding
        ("PatientID", b"LO", b"\x00 ID7 \x00"),  # NUL on both ends
        ("StudyDate", b"DA", b"20261121 \x00 "),
        ("ImagePositionPatient", b"DS", b"1.5\t\x00\\-2 "),
        ("PatientName", b"PN", b"Doe^Jane="),  # an empty second component group
        ("PatientName", b"PN", b"Doe^Jane = "),
    ],
)
def test_padding_in_any_order_reads_as_pydicom_reads_it(
    keyword: str, vr: bytes, value: bytes
) -> None:
    """Found by comparing the two readers on random values: the raw one stripped spaces
    before NULs only, and kept a PN's empty component groups."""
    tag = tag_for_keyword(keyword)
    assert tag is not None
    element = _raw(tag, vr, value)
    expected = as_text(pydicom.dcmread(io.BytesIO(element), force=True)[tag].value)
    assert text(pydicom.dcmread(io.BytesIO(element), force=True), tag) == expected


def test_numbers_python_reads_but_dicom_does_not_are_absent() -> None:
    assert as_int("1_2") is None  # int("1_2") is 12
    assert as_int("\u0661\u0662") is None  # Arabic-Indic digits: int() reads 12
    assert as_int(" 12 ") == 12
    assert as_int("1e2") == 100  # DS-style exponent: pydicom reads IS "1e2" as 100
    element = _raw(0x00280008, b"IS", b"1_2 ")
    assert integer(pydicom.dcmread(io.BytesIO(element), force=True), 0x00280008) is None


def test_numbers_outside_the_is_range_are_absent() -> None:
    assert as_int("2147483647") == 2**31 - 1
    assert as_int("-2147483648") == -(2**31)
    assert as_int("2147483648") is None  # PostgreSQL's integer column ends here
    assert as_int("1e+20") is None  # SQLite's ends at 2**63
    assert as_int(10**20) is None


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("keyword", ["InstanceNumber", "SeriesNumber", "NumberOfFrames"])
def test_an_out_of_range_number_is_stored_and_indexed_as_absent(
    scp_in_process: InProcessNode, keyword: str
) -> None:
    """It was refused with 0xA700 'internal error: Python int too large to convert to
    SQLite INTEGER' on every retry (on PostgreSQL from 2**31 on)."""
    ds = minimal_mr_dataset()
    setattr(ds, keyword, "99999999999999999999")  # pydicom writes it as 1e+20
    with mr_store_association(scp_in_process.port) as assoc:
        assert assoc.send_c_store(ds).Status == 0x0000
    with scp_in_process.index.engine.connect() as conn:
        row = conn.execute(
            sql(
                "SELECT i.instance_number, i.number_of_frames, se.series_number "
                "FROM instances i JOIN series se ON i.series_pk = se.id "
                "WHERE i.sop_instance_uid = :uid"
            ),
            {"uid": ds.SOPInstanceUID},
        ).one()
    assert tuple(row) == (None, 1, None)


def _pn_pydicom_cannot_decode() -> bytes:
    """Explicit VR LE elements: a person name pydicom 3's ISO 2022 JIS decoder fails on."""
    return _raw(0x00080005, b"CS", b"ISO 2022 IR 87") + _raw(0x00100010, b"PN", b"=\xe9. ")


@pytest.mark.filterwarnings("ignore")
def test_a_value_pydicom_cannot_decode_is_indexed_best_effort() -> None:
    with pytest.raises(IndexError):  # pydicom's own failure, which the index must survive
        str(pydicom.dcmread(io.BytesIO(_pn_pydicom_cannot_decode()), force=True).PatientName)
    ds = pydicom.dcmread(io.BytesIO(_pn_pydicom_cannot_decode()), force=True)
    assert text(ds, 0x00100010) == "=\ufffd."


@pytest.mark.filterwarnings("ignore")
def test_a_store_with_a_value_pydicom_cannot_decode_succeeds(
    scp_in_process: InProcessNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was refused with 0xA700 'internal error: string index out of range', which a
    sender retries forever; the file keeps the name as sent."""
    sop_uid = "1.2.826.0.1.3680043.8.498.4242"
    body = b"".join(
        (
            _raw(0x00080005, b"CS", b"ISO 2022 IR 87"),
            _raw(0x00080016, b"UI", MR_IMAGE_STORAGE.encode() + b"\0"),
            _raw(0x00080018, b"UI", sop_uid.encode()),
            _raw(0x00080060, b"CS", b"MR"),
            _raw(0x00100010, b"PN", b"=\xe9. "),
            _raw(0x0020000D, b"UI", b"1.2.826.0.1.3680043.8.498.42"),
            _raw(0x0020000E, b"UI", b"1.2.826.0.1.3680043.8.498.4200"),
        )
    )
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid()
    header = io.BytesIO()
    header.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(header, meta, enforce_standard=True)
    path = tmp_path / "name.dcm"
    path.write_bytes(header.getvalue() + body)
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)  # as it is
    with mr_store_association(scp_in_process.port) as assoc:
        assert assoc.send_c_store(path).Status == 0x0000
    with scp_in_process.index.engine.connect() as conn:
        name = conn.execute(sql("SELECT patient_name FROM patients")).scalar_one()
    assert name == "=\ufffd."


@pytest.mark.filterwarnings("ignore")
def test_images_with_random_header_values_are_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pynetdicom_config, "LOG_HANDLER_LEVEL", "none")  # as at INFO
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)  # as they are
    with inprocess_node(tmp_path / "data") as node:
        check_random_headers_are_stored(node, tmp_path, range(120))
