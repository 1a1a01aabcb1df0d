"""Attribute values of a received dataset as index text, read from the raw bytes when safe.

Every C-STORE indexes some thirty attributes. pydicom converts each on first access
(~10 us: value validation, UID and DS objects), which is ~5% of an image's receive time.
Values in the default character repertoire are read straight from the encoded bytes; the
rest (binary VRs, other character sets) go through pydicom. Both give the same text
(tested).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from pydicom import Dataset
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.multival import MultiValue
from pydicom.tag import Tag

logger = logging.getLogger(__name__)

# Always in the default repertoire (PS3.5 6.2): the raw bytes are the value.
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})
# Character-set dependent: raw bytes are the value when they are plain ASCII (no ISO 2022
# escape). LT/ST/UT are left out: a backslash there is text, not a value delimiter.
_TEXT_VRS = frozenset({"LO", "SH", "PN"})
_IS_MIN, _IS_MAX = -(2**31), 2**31 - 1  # PS3.5 6.2
# A decimal number as DICOM writes IS and DS values (PS3.5 6.2).
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
# Stripped from both ends of each value: space padding, NUL padding (some devices pad UIs
# and text with it), and stray control whitespace, in whatever order they come.
_PADDING = " \t\n\r\v\f\x00"


def as_text(value: Any) -> str:
    """A converted pydicom value as index text: values joined by ``\\``, padding stripped."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(as_text(v) for v in value)
    return str(value).strip(_PADDING)


def as_int(value: Any) -> int | None:
    """An integer, or None; "3.0" is 3 (as pydicom reads IS), "3.5", "x" and "1_2" are None.

    So is a number outside the range DICOM allows an IS (a signed 32-bit integer): the
    index's integer columns could not hold it (SQLite: 64 bits, PostgreSQL: 32), and the
    store failed with 0xA700 on every retry.
    """
    if value is None or value == "":
        return None
    if isinstance(value, str) and not _NUMBER.fullmatch(value.strip()):
        return None  # Python's int() and float() also take "1_2" and other scripts' digits
    try:
        number = int(value)
    except (TypeError, ValueError):
        try:
            decimal = float(value)
        except (TypeError, ValueError):
            return None
        if not decimal.is_integer():
            return None
        number = int(decimal)
    return number if _IS_MIN <= number <= _IS_MAX else None


def _raw_text(elem: RawDataElement) -> str | None:
    raw = elem.value
    if raw is None:
        return ""
    vr = elem.VR
    if vr is None:  # implicit VR: the dictionary's
        try:
            vr = dictionary_VR(elem.tag)
        except KeyError:
            return None
    if not (vr in _ASCII_VRS or vr in _TEXT_VRS) or not raw.isascii() or b"\x1b" in raw:
        return None
    if vr == "PN" and b"=" in raw:
        return None  # component groups: pydicom drops empty ones and their padding
    return "\\".join(part.strip(_PADDING) for part in raw.decode("ascii").split("\\"))


def text(ds: Dataset, tag: int) -> str:
    """The element's value as text ("" when absent or empty)."""
    elem = ds.get_item(tag)
    if elem is None:
        return ""
    if isinstance(elem, RawDataElement):
        fast = _raw_text(elem)
        if fast is not None:
            return fast
    try:
        return as_text(ds[tag].value)
    except Exception as exc:
        # pydicom's decoders fail on some byte sequences (an IndexError in its ISO 2022
        # JIS decoder): the store must not fail for an index value. The file keeps it.
        logger.debug("value of %s cannot be decoded (%s: %s)", Tag(tag), type(exc).__name__, exc)
        raw = elem.value if isinstance(elem, RawDataElement) else None
        if not isinstance(raw, bytes):
            return ""
        return raw.decode("ascii", "replace").strip(_PADDING)


def integer(ds: Dataset, tag: int) -> int | None:
    """The element's value as an integer (None when absent, empty or not a number)."""
    elem = ds.get_item(tag)
    if elem is None:
        return None
    if isinstance(elem, RawDataElement) and elem.VR in ("IS", None):
        fast = _raw_text(elem)
        if fast is not None:
            return as_int(fast)
    try:
        return as_int(ds[tag].value)
    except Exception:  # pydicom refuses to convert a malformed IS: index it as absent
        return None
