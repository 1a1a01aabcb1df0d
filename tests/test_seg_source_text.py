"""The SEG carries the source's patient and study attributes as stored, byte for byte.

Sources here are read back from the bytes they were stored as, as a job reads them: their
elements are raw until pydicom decodes them, as in the node. Each case failed the job or
changed the value before ``seg_source_text``.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.datadict import tag_for_keyword
from seg_fixtures import Charset, seg_file_of, stored_series
from validators import dciodvfy


def _stored_bytes(ds: Dataset, keyword: str) -> bytes:
    tag = tag_for_keyword(keyword)
    assert tag is not None
    elem = ds.get_item(tag)
    assert elem is not None
    value = elem.value
    assert isinstance(value, bytes), f"{keyword} was decoded: {elem!r}"
    return value


def _seg_of(sources: list[Dataset]) -> Dataset:
    """That SEG, read back: its values stay raw until decoded."""
    return pydicom.dcmread(io.BytesIO(seg_file_of(sources)))


KOREAN = (
    b"Hong^Gildong=\x1b$)C\xfb\xf3^\x1b$)C\xd1\xce\xd4\xd7=\x1b$)C\xc8\xab^\x1b$)C\xb1\xe6\xb5\xbf"
)
CHINESE = b"Zhang^XiaoDong=\x1b$)A\xd5\xc5^\x1b$)A\xd0\xa1\xb6\xab= "
CASES: dict[str, tuple[Charset, dict[str, bytes | str], Charset]] = {
    # Not one of DICOM's M, F, O, but common: highdicom refused it (ValueError)
    "patient-sex-u": (None, {"PatientSex": "U"}, None),
    # A malformed date: highdicom refused to convert it (ValueError)
    "study-date-malformed": (None, {"StudyDate": "20241345"}, None),
    # A name pydicom's ISO 2022 JIS decoder raises IndexError on
    "jis-name-pydicom-cannot-decode": (
        "ISO 2022 IR 87",
        {"PatientName": b"=\xe9. "},
        ["ISO 2022 IR 6", "ISO 2022 IR 87"],
    ),
    # UTF-8 declared, Latin-1 written (a common misconfiguration): it came back as U+FFFD
    "utf-8-declared-latin-1-written": (
        "ISO_IR 192",
        {"PatientName": b"M\xfcller^J\xf6rg ", "PatientID": b"M\xfc-0042 "},
        "ISO_IR 192",
    ),
    # Korean and Chinese ISO 2022 sets, which highdicom's list lacks (ValueError)
    # (the names of PS3.5 Annex I.2 and K.2, as coded there)
    "korean-alone": (
        "ISO 2022 IR 149",
        {"PatientName": KOREAN},
        ["ISO 2022 IR 6", "ISO 2022 IR 149"],
    ),
    "chinese-iso-2022": (
        ["ISO 2022 IR 6", "ISO 2022 IR 58"],
        {"PatientName": CHINESE},
        ["ISO 2022 IR 6", "ISO 2022 IR 58"],
    ),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", CASES)
def test_the_seg_keeps_the_source_bytes(case: str) -> None:
    charset, values, seg_charset = CASES[case]
    sources = stored_series(charset, values)
    stored = {keyword: _stored_bytes(sources[0], keyword) for keyword in values}
    seg = _seg_of(sources)
    for keyword in values:
        assert _stored_bytes(seg, keyword) == stored[keyword], keyword
    assert seg.get("SpecificCharacterSet") == seg_charset
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", CASES)
def test_a_second_seg_of_the_same_sources_keeps_the_bytes(case: str) -> None:
    """A job encodes twice from one set of sources: the Label Map SEG, then its binary
    fallback. The first encode decoded the source's elements in place, so the fallback
    re-encoded the decoded text (U+FFFD for bytes invalid in the character set)."""
    charset, values, _ = CASES[case]
    sources = stored_series(charset, values)
    stored = {keyword: _stored_bytes(sources[0], keyword) for keyword in values}
    _seg_of(sources)
    for keyword in values:
        assert _stored_bytes(sources[0], keyword) == stored[keyword], keyword
    second = _seg_of(sources)
    for keyword in values:
        assert _stored_bytes(second, keyword) == stored[keyword], keyword


@pytest.mark.peers
@pytest.mark.parametrize("case", ["korean-alone", "chinese-iso-2022"])
def test_dciodvfy_finds_no_error_in_the_seg_of_an_iso_2022_source(
    tmp_path: Path, case: str
) -> None:
    charset, values, _ = CASES[case]
    path = tmp_path / "seg.dcm"
    path.write_bytes(seg_file_of(stored_series(charset, values)))
    dciodvfy(path)
    assert _stored_bytes(pydicom.dcmread(path), "PatientName") == values["PatientName"]


_TEXT = ["PatientName", "ReferringPhysicianName", "PatientID", "IssuerOfPatientID"]
_TEXT += ["AccessionNumber", "StudyID", "StudyDescription", "PatientComments"]
_DEFAULT_REPERTOIRE = ["PatientBirthDate", "StudyDate", "StudyTime", "PatientSex", "PatientAge"]
_CHARSETS: list[Charset] = [
    None,
    "ISO_IR 100",
    "ISO_IR 192",
    "GB18030",
    "ISO 2022 IR 87",
    "ISO 2022 IR 149",
    ["", "ISO 2022 IR 87"],
    ["ISO 2022 IR 6", "ISO 2022 IR 58"],
    ["ISO 2022 IR 87", "ISO 2022 IR 6"],  # a multi-byte set first: not allowed, but seen
    "ISO_IR 6",
    "ISO-IR 100",  # malformed
    "ISO_IR 999",  # unknown
]
_BYTES = b"AB^=. \x1b$B()\xe9\xa4\x80\xff\x000"


@pytest.mark.filterwarnings("ignore")  # pydicom warns of each invalid value
def test_random_patient_and_study_values_are_kept() -> None:
    """120 seeded sources with random bytes in one patient or study attribute and a random
    character set: before, 80 of them failed the job and 18 came back changed."""
    outcomes: dict[str, list[int]] = {"failed": [], "changed": []}
    for seed in range(120):
        rnd = random.Random(seed)
        keyword = rnd.choice(_TEXT + _DEFAULT_REPERTOIRE)
        value = bytes(rnd.choice(_BYTES) for _ in range(rnd.randint(1, 12)))
        stored: bytes | str = value if keyword in _TEXT else value.decode("latin-1")
        sources = stored_series(rnd.choice(_CHARSETS), {keyword: stored})
        tag = tag_for_keyword(keyword)
        assert tag is not None
        want = sources[0].get_item(tag)
        assert want is not None
        want_value = want.value
        if keyword in _DEFAULT_REPERTOIRE:
            # pydicom reads these without their trailing padding and pads with a space
            want_value = want_value.rstrip(b" \x00")
        try:
            seg = _seg_of(sources)
        except Exception:  # any failure is the finding
            outcomes["failed"].append(seed)
            continue
        got = seg.get_item(tag)
        got_value = got.value if got is not None else None
        if keyword in _DEFAULT_REPERTOIRE and isinstance(got_value, bytes):
            got_value = got_value.rstrip(b" \x00")
        if got_value != want_value:
            outcomes["changed"].append(seed)
    assert outcomes == {"failed": [], "changed": []}
