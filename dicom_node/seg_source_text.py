"""The SEG's patient and study attributes: the first source's, as stored.

highdicom copies the Patient and Study modules from the first source image: it reads some
attributes as arguments, checks them, decodes text with pydicom and encodes it again when
the SEG is written. Jobs failed where a source held what those checks refuse (a Patient's Sex
of ``U``, a malformed date), what pydicom's decoders raise on (a person name in ISO 2022 JIS),
or a character set highdicom's list lacks (``ISO 2022 IR 149``, Korean, which the list
misnames, or ``ISO 2022 IR 58``); and bytes invalid in the source's character set came back
changed (U+FFFD). A PACS files the SEG by these values, so the SEG carries them exactly as
the source does: highdicom is handed empty stand-ins and the copied string elements are put
back as the source's bytes, under the source's character set.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from pydicom import Dataset
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.tag import BaseTag, Tag

__all__ = ["SourceText", "keep_text_as_stored", "restore_source_text", "source_text"]

# Value representations coded in the Specific Character Set (PS3.5 6.1.2.3): these are put
# back as the source's bytes. The other string VRs are in the default repertoire, which
# pydicom decodes and encodes again without a change.
_TEXT_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_DEFAULT_REPERTOIRE_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"})
# What highdicom reads from the first source as arguments (and checks), where it copies the
# other attributes of these modules as elements. It fails where a source leaves one of the
# Type 2 ones out, as some do: the copy it is handed holds each of them empty.
_ARGUMENTS = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
# ISO 2022 multi-byte sets: code extensions only, never the first value (PS3.3 C.12.1.1.2).
_MULTI_BYTE = frozenset({"ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 149", "ISO 2022 IR 58"})
# Handed to highdicom for the character set, which it checks against a list of its own;
# every text value is decoded before, and the SEG gets the source's set back.
_STAND_IN = "ISO_IR 192"


@dataclass
class SourceText:
    """What ``restore_source_text`` puts into the SEG after highdicom built it."""

    charset: str | list[str] | None = None
    # The first source's elements to put back, by tag: text elements as their bytes.
    elements: dict[BaseTag, DataElement | RawDataElement] = field(default_factory=dict)
    # The arguments the source has: the SEG gets each of them from the source.
    arguments: set[BaseTag] = field(default_factory=set)


def source_text(first: Dataset) -> tuple[dict[str, object], SourceText]:
    """The changes the copy of ``first`` handed to highdicom needs, and what to restore.

    Every attribute highdicom reads as an argument is empty in the copy, and put back from
    the source where the source has it. The SEG's character set is the source's, except
    that an ISO 2022 set whose first value is empty (the default repertoire) or multi-byte
    (a JIS set alone, as some devices write it) gets ``ISO 2022 IR 6`` first: the same
    meaning, in a form pydicom can code the SEG's own text in ("Doe^^John" in the JIS set
    alone: IndexError).
    """
    text = SourceText()
    charset = first.get("SpecificCharacterSet")
    values = [str(charset)] if isinstance(charset, str) else [str(v) for v in charset or []]
    if not any(values):
        values = []  # present but empty: the default repertoire, as if absent
    elif not values[0]:
        values[0] = "ISO 2022 IR 6"
    elif values[0] in _MULTI_BYTE:
        values.insert(0, "ISO 2022 IR 6")
    changes: dict[str, object] = {}
    if values:
        text.charset = values[0] if len(values) == 1 else values
        changes["SpecificCharacterSet"] = _STAND_IN
    elif charset is not None:
        changes["SpecificCharacterSet"] = None  # highdicom refuses an empty value

    for elem in list(first.elements()):
        if not isinstance(elem, RawDataElement):
            continue
        vr = _vr(elem)
        if vr in _TEXT_VRS:
            text.elements[elem.tag] = _as_stored(elem, vr)
        if vr in _TEXT_VRS or vr in _DEFAULT_REPERTOIRE_VRS or vr == "SQ":
            # Decoded now, with the source's character set, not with the stand-in of the
            # copy highdicom reads them from.
            with contextlib.suppress(Exception):  # undecodable text: put back as bytes
                first[elem.tag]
    for keyword in _ARGUMENTS:
        changes[keyword] = None
        tag = Tag(keyword)
        if tag in first:
            text.arguments.add(tag)
            text.elements.setdefault(tag, first.get_item(tag))
    return changes, text


def restore_source_text(seg: Dataset, given: Dataset, text: SourceText) -> None:
    """Put the source's elements back into ``seg`` where highdicom copied them from ``given``
    (the copy it was handed), and the source's character set."""
    if text.charset is not None:
        seg.SpecificCharacterSet = text.charset
    for tag, elem in text.elements.items():
        if tag in text.arguments or (
            tag in seg and tag in given and seg.get_item(tag) is given.get_item(tag)
        ):
            seg[tag] = elem


def keep_text_as_stored(ds: Dataset) -> None:
    """Give ``ds``'s top-level text elements, read from a file, their bytes as values, so that
    pydicom encoding it in another transfer syntax writes them as stored: it would decode
    them and encode them again, which changes bytes invalid in the character set (U+FFFD)."""
    for elem in list(ds.elements()):
        if isinstance(elem, RawDataElement):
            vr = _vr(elem)
            if vr in _TEXT_VRS:
                ds[elem.tag] = _as_stored(elem, vr)


def _vr(elem: DataElement | RawDataElement) -> str:
    """The element's VR; from the dictionary where the file is implicit VR ("" if unknown)."""
    if elem.VR:
        return str(elem.VR)
    if elem.tag.is_private:
        return ""
    try:
        return str(dictionary_VR(elem.tag))
    except KeyError:
        return ""


def _as_stored(elem: RawDataElement, vr: str) -> DataElement:
    # A bytes value: pydicom writes it as it is, in any transfer syntax and under any
    # character set, where it would decode a raw element to encode it again.
    return DataElement(elem.tag, vr, elem.value or b"")
