"""What the index records of a received image, read from its dataset.

Shared by the Storage SCP (each C-STORE) and ``store check`` (files the index lost).
"""

from __future__ import annotations

from pydicom import Dataset
from pydicom.datadict import tag_for_keyword

from dicom_node.header_values import integer, text
from storage.instances import InstanceRecord

REQUIRED_UIDS = (
    ("SOPInstanceUID", 0x00080018),
    ("SeriesInstanceUID", 0x0020000E),
    ("StudyInstanceUID", 0x0020000D),
)


def check_complete(ds: Dataset) -> None:
    """Raise if an element's value is shorter than its declared length.

    pydicom reads a truncated or garbled dataset without error (it warns and keeps the short
    value), so a dataset cut inside its Pixel Data would otherwise be stored as a success.
    """
    for elem in ds.elements():  # raw elements: no value conversion needed
        length = getattr(elem, "length", None)
        value = elem.value
        if (
            isinstance(length, int)
            and length != 0xFFFFFFFF
            and isinstance(value, bytes | bytearray)
            and len(value) != length
        ):
            raise ValueError(
                f"element {elem.tag} is truncated: {len(value)} of {length} bytes present"
            )


TAG: dict[str, int] = {
    keyword: tag
    for keyword in (
        "SOPClassUID",
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyDescription",
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "ProtocolName",
        "BodyPartExamined",
        "ImageType",
        "FrameOfReferenceUID",
        "ImageOrientationPatient",
        "ImagePositionPatient",
        "InstanceNumber",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "NumberOfSeriesRelatedInstances",
    )
    if (tag := tag_for_keyword(keyword)) is not None
}


def expected_count(ds: Dataset) -> int | None:
    # Only an announcement of the whole series. Not Images in Acquisition: it counts one
    # acquisition, and a series of several sent one acquisition per association would
    # complete on the first release and be segmented on part of its images.
    return integer(ds, TAG["NumberOfSeriesRelatedInstances"]) or None


def instance_record(
    ds: Dataset,
    uids: dict[str, str],
    sop_class_uid: str,
    transfer_syntax_uid: str,
    relative: str,
    size: int,
    *,
    calling_ae_title: str,
    peer_address: str,
    association_id: str,
) -> InstanceRecord:
    def txt(keyword: str) -> str:
        return text(ds, TAG[keyword])

    def num(keyword: str) -> int | None:
        return integer(ds, TAG[keyword])

    return InstanceRecord(
        sop_instance_uid=uids["SOPInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        sop_class_uid=sop_class_uid,
        transfer_syntax_uid=transfer_syntax_uid,
        path=relative,
        size_bytes=size,
        patient_id=txt("PatientID"),
        patient_name=txt("PatientName"),
        patient_birth_date=txt("PatientBirthDate"),
        patient_sex=txt("PatientSex"),
        study_date=txt("StudyDate"),
        study_time=txt("StudyTime"),
        accession_number=txt("AccessionNumber"),
        study_description=txt("StudyDescription"),
        modality=txt("Modality"),
        series_number=num("SeriesNumber"),
        series_description=txt("SeriesDescription"),
        protocol_name=txt("ProtocolName"),
        body_part_examined=txt("BodyPartExamined"),
        image_type=txt("ImageType"),
        frame_of_reference_uid=txt("FrameOfReferenceUID"),
        image_orientation=txt("ImageOrientationPatient"),
        image_position=txt("ImagePositionPatient"),
        instance_number=num("InstanceNumber"),
        rows=num("Rows"),
        columns=num("Columns"),
        number_of_frames=num("NumberOfFrames") or 1,
        expected_count=expected_count(ds),
        calling_ae_title=calling_ae_title,
        peer_address=peer_address,
        association_id=association_id,
    )
