"""Attribute values of a received dataset as index text, read from the raw bytes when safe.

Every C-STORE indexes some thirty attributes. pydicom converts each on first access
(~10 us: value validation, UID and DS objects), which is ~5% of an image's receive time.
Values in the default character repertoire are read straight from the encoded bytes; the
rest (binary VRs, other character sets) go through pydicom. Both give the same text
(tested).

Text whose bytes its declared character set cannot be is read as the device meant it, where
that is plain: UTF-8 where no character set is declared, Latin-1 where UTF-8 is declared
but the bytes are not UTF-8. pydicom read the first as Latin-1 ("MÃ¼ller") and the second
with replacement characters, and rules matching a series description did not match.
A control character left in LO, SH or PN text becomes U+FFFD. pydicom's complaints about
the values it reads here are not logged one by one (a line per value of every image): the
file keeps the value, and a job sums them up for its series.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from pydicom import Dataset
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from dicom_node.value_warnings import quiet_value_warnings

logger = logging.getLogger(__name__)

# Always in the default repertoire (PS3.5 6.2): the raw bytes are the value.
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})
# Character-set dependent: raw bytes are the value when they are plain ASCII (no ISO 2022
# escape). LT/ST/UT are left out: a backslash there is text, not a value delimiter.
_TEXT_VRS = frozenset({"LO", "SH", "PN"})
_BINARY_INTEGER_VRS = frozenset({"US", "UL", "SS", "SL", "SV", "UV"})
_IS_MIN, _IS_MAX = -(2**31), 2**31 - 1  # PS3.5 6.2
# A decimal number as DICOM writes IS and DS values (PS3.5 6.2).
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
# Stripped from both ends of each value: space padding, NUL padding (some devices pad UIs
# and text with it), and stray control whitespace, in whatever order they come.
_PADDING = " \t\n\r\v\f\x00"
_SPECIFIC_CHARACTER_SET = 0x00080005
# Specific Character Set values that declare the default repertoire (ASCII) alone.
_DEFAULT_REPERTOIRE = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})
_UTF8, _LATIN1 = python_encoding["ISO_IR 192"], python_encoding["ISO_IR 100"]
# LO, SH and PN hold no control character but ESC (PS3.5 6.2), and decoding consumes the
# ESCs. One left (an escape sequence pydicom's decoder gave up on, undeclared ISO 2022) would
# drive the terminal of whoever prints the index (`series show`): a replacement character,
# as for other undecodable bytes. NUL is left to the index, which drops it.
_CONTROL = re.compile("[\x01-\x1f\x7f]")


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


def _vr(elem: DataElement | RawDataElement) -> str | None:
    if elem.VR is not None:
        return str(elem.VR)
    try:  # implicit VR: the dictionary's
        return str(dictionary_VR(elem.tag))
    except KeyError:
        return None


def _raw_text(elem: RawDataElement, vr: str | None) -> str | None:
    raw = elem.value
    if raw is None:
        return ""
    if not (vr in _ASCII_VRS or vr in _TEXT_VRS) or not raw.isascii() or b"\x1b" in raw:
        return None
    if vr == "PN" and b"=" in raw:
        return None  # component groups: pydicom drops empty ones and their padding
    return "\\".join(part.strip(_PADDING) for part in raw.decode("ascii").split("\\"))


def _declared_character_set(ds: Dataset) -> str | None:
    """The one value of the Specific Character Set, as written ("" when absent); None
    for several (ISO 2022 code extensions). Read without pydicom, which complains of a
    malformed value each time it reads one."""
    elem = ds.get_item(_SPECIFIC_CHARACTER_SET)
    value = None if elem is None else elem.value
    if isinstance(value, bytes):
        values = value.decode("ascii", "replace").split("\\")
    elif isinstance(value, MultiValue | list | tuple):
        values = [str(v) for v in value]
    else:
        values = [str(value or "")]
    return values[0].strip(_PADDING) if len(values) == 1 else None


def _meant_encoding(ds: Dataset, raw: bytes | None) -> str | None:
    """The encoding the device meant for text whose bytes the declared character set
    cannot be, where that is plain; None: read it as declared (pydicom reads bytes beyond
    ASCII as Latin-1 where no set is declared)."""
    if not raw or raw.isascii() or b"\x1b" in raw:
        return None
    declared = _declared_character_set(ds)
    if declared is None:
        return None
    try:
        raw.decode(_UTF8)
        utf8 = True
    except UnicodeDecodeError:
        utf8 = False
    # Latin-1 text is hardly ever valid UTF-8 too (it would need "Ã" before a symbol);
    # UTF-8 declared and not written: Latin-1 is the set such devices use otherwise.
    if declared in _DEFAULT_REPERTOIRE and utf8:
        return _UTF8
    if declared == "ISO_IR 192" and not utf8:
        return _LATIN1
    return None


def text(ds: Dataset, tag: int) -> str:
    """The element's value as text ("" when absent or empty)."""
    elem = ds.get_item(tag)
    if elem is None:
        return ""
    vr = _vr(elem)
    value = _raw_text(elem, vr) if isinstance(elem, RawDataElement) else None
    if value is None:
        with quiet_value_warnings() as complaints:
            value = _decoded(ds, tag, elem, vr)
        if complaints:
            logger.debug("value of %s: %s", Tag(tag), "; ".join(complaints))
    return _CONTROL.sub("\ufffd", value) if vr in _TEXT_VRS else value


def _decoded(ds: Dataset, tag: int, elem: DataElement | RawDataElement, vr: str | None) -> str:
    try:
        if isinstance(elem, RawDataElement) and vr in _TEXT_VRS:
            encoding = _meant_encoding(ds, elem.value)
            if encoding is not None:
                return as_text(convert_raw_data_element(elem, encoding=[encoding], ds=ds).value)
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
        fast = _raw_text(elem, _vr(elem))
        if fast is not None:
            return as_int(fast)
    try:
        if elem.VR in _BINARY_INTEGER_VRS:  # Rows, Columns: no text, nothing to complain of
            return as_int(ds[tag].value)
        with quiet_value_warnings():
            return as_int(ds[tag].value)
    except Exception:  # pydicom refuses to convert a malformed IS: index it as absent
        return None
