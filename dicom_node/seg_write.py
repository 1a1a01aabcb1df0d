"""Write an encoded SEG as a DICOM file, fast: the bytes the node stores and sends.

``seg_to_bytes`` returns exactly what ``seg.save_as(buffer, enforce_file_format=True)`` writes,
several times faster for a BINARY SEG with thousands of frames: the Per-Frame Functional Groups
Sequence is written directly, everything else by pydicom.
"""

from __future__ import annotations

import io
import logging
import struct

from pydicom import Dataset
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, dcmwrite, write_data_element, write_dataset
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pydicom.valuerep import AMBIGUOUS_VR, VR

logger = logging.getLogger(__name__)

__all__ = ["seg_to_bytes"]

_PER_FRAME_TAG = 0x52009230  # PerFrameFunctionalGroupsSequence
_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)
_ITEM_DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
_SEQUENCE_DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
_UNDEFINED_LENGTH = 0xFFFFFFFF


class _NeedsPydicom(Exception):
    """An element the fast writer does not reproduce byte for byte; pydicom writes the file."""


def seg_to_bytes(seg: Dataset) -> bytes:
    """``seg`` as a DICOM file: the bytes ``seg.save_as(buffer, enforce_file_format=True)`` writes.

    A BINARY SEG holds one Per-Frame Functional Groups item (eight nested items) per frame and
    segment, thousands of them; pydicom spends most of a save walking them, and re-runs its
    ambiguous VR correction on every nested item's subtree before writing it. Here pydicom
    writes everything else (file meta, ambiguous VRs resolved with the whole top level in view,
    Pixel Data), while the per-frame sequence is written directly: its leaf elements still
    through pydicom's own element writer, and each item object once, since highdicom shares the
    source-image and plane-position items of a plane between all segments' frames. Anything
    unusual in that sequence (ambiguous VR, raw element, an encoding other than explicit VR
    little endian) falls back to ``save_as``.
    """
    try:
        return _write_split(seg)
    except _NeedsPydicom as reason:
        logger.debug("writing SEG with pydicom alone: %s", reason)
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _write_split(seg: Dataset) -> bytes:
    tsyntax = seg.file_meta.get("TransferSyntaxUID") if hasattr(seg, "file_meta") else None
    if (
        tsyntax is None
        or tsyntax == DeflatedExplicitVRLittleEndian
        or tsyntax.is_implicit_VR
        or not tsyntax.is_little_endian
    ):
        raise _NeedsPydicom(f"transfer syntax {tsyntax}")
    per_frame = seg.get_item(_PER_FRAME_TAG)
    if not isinstance(per_frame, DataElement) or per_frame.VR != VR.SQ:
        raise _NeedsPydicom("no per-frame functional groups sequence")

    # Everything but the per-frame sequence, as shallow datasets sharing the elements (pydicom's
    # VR correction updates them in place, as save_as does). Tags are written in ascending
    # order, so head + per-frame + tail is the order pydicom writes.
    rest: dict[BaseTag, DataElement | RawDataElement] = {
        elem.tag: elem for elem in seg.elements() if elem.tag != _PER_FRAME_TAG
    }
    correct_ambiguous_vr(Dataset(rest), True)
    head = Dataset({tag: elem for tag, elem in rest.items() if tag < _PER_FRAME_TAG})
    tail = Dataset({tag: elem for tag, elem in rest.items() if tag > _PER_FRAME_TAG})
    head.file_meta = seg.file_meta
    head.preamble = getattr(seg, "preamble", None)
    if "PixelData" in tail:
        # What dcmwrite does for the Pixel Data it would have seen (PS3.5 A.4).
        tail["PixelData"].is_undefined_length = tsyntax.is_compressed

    writer = _PerFrameWriter()
    out = DicomBytesIO()
    out.is_implicit_VR, out.is_little_endian = False, True
    dcmwrite(out, head, enforce_file_format=True)
    encodings = seg.get("SpecificCharacterSet", default_encoding)
    out.write(writer.sequence(per_frame, encodings))
    write_dataset(out, tail, parent_encoding=encodings)
    return out.getvalue()


class _PerFrameWriter:
    """Explicit VR little endian bytes of nested sequences, each item object encoded once."""

    def __init__(self) -> None:
        # Items are shared between frames (one source-image and one plane-position item per
        # plane), so the object identity and the encoding handed down are the key. Every
        # object stays referenced by the SEG during the write, so no id is reused meanwhile.
        self._items: dict[tuple[int, tuple[str, ...]], bytes] = {}
        self._encodings: dict[str, list[str]] = {}

    def sequence(self, elem: DataElement, encodings: str | list[str]) -> bytes:
        # As pydicom's write_data_element + write_sequence: items get the normalised encoding
        # of their parent; an SQ has a 32-bit length, or undefined length and a delimiter.
        key = repr(encodings)
        item_encodings = self._encodings.get(key)
        if item_encodings is None:
            item_encodings = self._encodings[key] = convert_encodings(
                encodings or [default_encoding]
            )
        body = b"".join(self.item(item, item_encodings) for item in elem.value)
        undefined = elem.is_undefined_length
        header = struct.pack(
            "<HH2sHI",
            elem.tag.group,
            elem.tag.element,
            b"SQ",
            0,
            _UNDEFINED_LENGTH if undefined else len(body),
        )
        return header + body + (_SEQUENCE_DELIMITER if undefined else b"")

    def item(self, item: Dataset, parent_encodings: list[str]) -> bytes:
        key = (id(item), tuple(parent_encodings))
        cached = self._items.get(key)
        if cached is not None:
            return cached
        encodings = item.get("SpecificCharacterSet", parent_encodings)
        parts: list[bytes] = []
        for tag in sorted(item.keys()):
            if tag.element == 0 and tag.group > 6:
                continue  # retired group length, not written by pydicom either (PS3.5 7.2)
            elem = item.get_item(tag)
            if not isinstance(elem, DataElement):
                raise _NeedsPydicom(f"raw element {tag} in a per-frame item")
            if elem.VR == VR.SQ:
                parts.append(self.sequence(elem, encodings))
                continue
            if elem.VR in AMBIGUOUS_VR:
                raise _NeedsPydicom(f"ambiguous VR {elem.VR} of {tag} in a per-frame item")
            fp = DicomBytesIO()
            fp.is_implicit_VR, fp.is_little_endian = False, True
            write_data_element(fp, elem, encodings)
            parts.append(fp.getvalue())
        body = b"".join(parts)
        if getattr(item, "is_undefined_length_sequence_item", False):
            data = _ITEM + struct.pack("<I", _UNDEFINED_LENGTH) + body + _ITEM_DELIMITER
        else:
            data = _ITEM + struct.pack("<I", len(body)) + body
        self._items[key] = data
        return data
