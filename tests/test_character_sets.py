"""Patient, study and series texts in the character sets sites send, through the node.

Latin-1 and UTF-8 (Europe), ISO 2022 with escape sequences (Japan, PS3.5 Annex H), Cyrillic,
and devices that declare no character set or another than they write: each image is stored
as sent, indexed and printed as the text meant, its problems logged once per job rather than
once per value and image, and its names copied into the SEG so that pydicom and dciodvfy
read the source's name back.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import sqlite3
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import test_cli
from inprocess import MR_IMAGE_STORAGE, inprocess_node, minimal_mr_dataset, mr_store_association
from peers import dataset_bytes, storescu
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.uid import generate_uid
from pynetdicom import _config as pynetdicom_config
from seg_fixtures import Charset, seg_file_of, stored_series, write_series
from validators import dciodvfy

from dicom_node.header_values import text as header_text
from dicom_node.routing import facts_from_folder
from dicom_node.store_check import repair_store
from dicom_node.value_warnings import quiet_value_warnings, summarised_value_warnings
from dicom_node.volume import volume_from_folder
from storage.consistency import check_store
from storage.database import Index
from storage.filestore import FileStore

DICOM_NODE = Path(sys.executable).parent / "dicom-node"

# PS3.5 H.3.2: half-width katakana (ISO 2022 IR 13), kanji and hiragana (IR 87).
YAMADA = (
    b"\xd4\xcf\xc0\xde^\xc0\xdb\xb3=\x1b$B;3ED\x1b(J^\x1b$BB@O:\x1b(J"
    b"=\x1b$B$d$^$@\x1b(J^\x1b$B$?$m$&\x1b(J"
)
# PS3.5 H.3.1: romaji in the default repertoire, kanji and hiragana (IR 87).
YAMADA_ROMAJI = (
    b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B"
)


@dataclass(frozen=True)
class Case:
    charset: Charset
    patient_name: bytes
    series_description: bytes
    protocol_name: bytes
    # What the index holds and the CLI prints: the text meant.
    name_text: str
    description_text: str
    protocol_text: str


def _schaedel_in_latin_1(character_set: Charset) -> Case:
    """Latin-1 name and description under ``character_set``, read as Latin-1 (as meant)."""
    return Case(
        character_set,
        "Müller^Jürgen".encode("latin-1"),
        "Schädel".encode("latin-1"),
        b"T1",
        "Müller^Jürgen",
        "Schädel",
        "T1",
    )


CASES: dict[str, Case] = {
    "latin-1": Case(
        "ISO_IR 100",
        "Müller^Jürgen".encode("latin-1"),
        "Schädel nativ".encode("latin-1"),
        "t1_mprage_sag_ü".encode("latin-1"),
        "Müller^Jürgen",
        "Schädel nativ",
        "t1_mprage_sag_ü",
    ),
    "utf-8": Case(
        "ISO_IR 192",
        "Müller^Jürgen".encode(),
        "頭部 T1".encode(),
        "Голова нативно".encode(),
        "Müller^Jürgen",
        "頭部 T1",
        "Голова нативно",
    ),
    "japanese-katakana-kanji": Case(
        ["ISO 2022 IR 13", "ISO 2022 IR 87"],
        YAMADA,
        b"\x1b$BF,It\x1b(J T1",
        b"\xc4\xb3\xcc\xde",
        "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう",
        "頭部 T1",
        "ﾄｳﾌﾞ",
    ),
    "japanese-romaji-kanji": Case(
        ["", "ISO 2022 IR 87"],
        YAMADA_ROMAJI,
        b"\x1b$BF,It\x1b(B T1",
        b"T1 \x1b$BF,It\x1b(B",
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
        "頭部 T1",
        "T1 頭部",
    ),
    "cyrillic": Case(
        "ISO_IR 144",
        "Иванов^Иван".encode("iso8859_5"),
        "Голова нативно".encode("iso8859_5"),
        "череп сагиттально".encode("iso8859_5"),
        "Иванов^Иван",
        "Голова нативно",
        "череп сагиттально",
    ),
    # A device that declares no character set and writes Latin-1, as pydicom reads it.
    "no-character-set-latin-1": _schaedel_in_latin_1(None),
    # ... and one that writes UTF-8: indexed as "MÃ¼ller^JÃ¼rgen" (Latin-1), so a rule
    # matching "Schädel" did not match its series.
    "no-character-set-utf-8": Case(
        None,
        "Müller^Jürgen".encode(),
        "Schädel".encode(),
        b"T1",
        "Müller^Jürgen",
        "Schädel",
        "T1",
    ),
    # UTF-8 declared, Latin-1 written: indexed as "M\ufffdller^J\ufffdrgen".
    "utf-8-declared-latin-1-written": Case(
        "ISO_IR 192",
        "Müller^Jürgen".encode("latin-1"),
        "Schädel".encode("latin-1"),
        "Kopf ü".encode("latin-1"),
        "Müller^Jürgen",
        "Schädel",
        "Kopf ü",
    ),
}
# A kanji run not switched back to ASCII before the padding: pydicom's decoder gives up and
# leaves the escape sequence in the text, which `series show` wrote to the terminal.
UNDECODED_ESCAPE = Case(
    ["", "ISO 2022 IR 87"], b"Yamada^Tarou", b"\x1b$BF,It", b"T1", "Yamada^Tarou", "", "T1"
)


def _image_file(folder: Path, case: Case, study: str, series: str, number: int) -> Path:
    """One MR image holding ``case``'s texts as these bytes, written as a Part 10 file."""
    ds = minimal_mr_dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.InstanceNumber = number
    ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if case.charset is not None:
        ds.SpecificCharacterSet = case.charset
    values = {
        "PatientName": case.patient_name,
        "PatientID": b"CS-1",
        "SeriesDescription": case.series_description,
        "ProtocolName": case.protocol_name,
    }
    for keyword, value in values.items():
        tag = tag_for_keyword(keyword)
        assert tag is not None
        ds[tag] = DataElement(tag, dictionary_VR(tag), value)  # bytes: written as they are
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _series_files(folder: Path, case: Case, count: int = 2) -> tuple[str, list[Path]]:
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    return series, [_image_file(folder, case, study, series, n + 1) for n in range(count)]


@dataclass(frozen=True)
class Received:
    data_dir: Path
    series: dict[str, str]  # case -> Series Instance UID
    sent: dict[str, list[Path]]


@pytest.fixture(scope="module")
def received(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Received]:
    """Every case's series, sent by pynetdicom as its files' bytes to a node."""
    root = tmp_path_factory.mktemp("charsets")
    series: dict[str, str] = {}
    sent: dict[str, list[Path]] = {}
    cases = {**CASES, "undecoded-escape": UNDECODED_ESCAPE}
    for name, case in cases.items():
        series[name], sent[name] = _series_files(root / name, case)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pynetdicom_config, "LOG_HANDLER_LEVEL", "none")
        patch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)  # as they are
        with (
            warnings.catch_warnings(),  # pydicom's on the undecodable text, once per place
            inprocess_node(root / "data") as node,
            mr_store_association(node.port) as assoc,
        ):
            warnings.simplefilter("ignore")
            for paths in sent.values():
                for path in paths:
                    assert assoc.send_c_store(path).Status == 0x0000, path
    yield Received(root / "data", series, sent)


def _index_rows(data_dir: Path) -> dict[str, tuple[str, str, str]]:
    """Series Instance UID -> (patient name, series description, protocol) in the index."""
    with sqlite3.connect(f"file:{data_dir / 'index.sqlite'}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT se.series_instance_uid, p.patient_name, se.series_description, "
            "se.protocol_name FROM series se JOIN studies st ON se.study_pk = st.id "
            "JOIN patients p ON st.patient_pk = p.id"
        ).fetchall()
    return {uid: (name, description, protocol) for uid, name, description, protocol in rows}


def _dicom_node(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """``dicom-node ARGS``'s standard output, on the node whose data is in ``data_dir``."""
    run = test_cli._dicom_node(data_dir, *args, env=env)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    return run.stdout


@pytest.mark.parametrize("case", [*CASES, "undecoded-escape"])
def test_each_image_is_stored_as_sent(received: Received, case: str) -> None:
    stored = sorted((received.data_dir / "store").rglob("*.dcm"))
    by_bytes = {dataset_bytes(path) for path in stored}
    for path in received.sent[case]:
        assert dataset_bytes(path) in by_bytes, path


@pytest.mark.parametrize("case", CASES)
def test_the_index_holds_the_text_meant(received: Received, case: str) -> None:
    expected = CASES[case]
    row = _index_rows(received.data_dir)[received.series[case]]
    assert row == (expected.name_text, expected.description_text, expected.protocol_text)


def test_an_escape_sequence_left_undecoded_is_neither_indexed_nor_printed(
    received: Received,
) -> None:
    uid = received.series["undecoded-escape"]
    name, description, _ = _index_rows(received.data_dir)[uid]
    assert name == "Yamada^Tarou"
    assert description.endswith("$BF,It") and "\x1b" not in description, repr(description)
    shown = _dicom_node(received.data_dir, "series", "show", uid)
    assert f"series_description: {description}" in shown
    assert "\x1b" not in shown, repr(shown)


def test_series_list_and_show_print_the_text_meant(received: Received) -> None:
    listed = json.loads(_dicom_node(received.data_dir, "series", "list", "--json"))
    descriptions = {item["series_instance_uid"]: item["series_description"] for item in listed}
    table = _dicom_node(received.data_dir, "series", "list")
    assert "\x1b" not in table, repr(table)
    for name, case in CASES.items():
        assert descriptions[received.series[name]] == case.description_text, name
        assert case.description_text in table, name
    uid = received.series["japanese-katakana-kanji"]
    shown = _dicom_node(received.data_dir, "series", "show", uid)
    assert "series_description: 頭部 T1\nprotocol_name: ﾄｳﾌﾞ\n" in shown, shown


@pytest.mark.peers
def test_storescu_sends_are_stored_as_sent_and_indexed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DCMTK as the sending modality, one series of each case in one association."""
    monkeypatch.setattr(pynetdicom_config, "LOG_HANDLER_LEVEL", "none")
    series: dict[str, str] = {}
    sent: list[Path] = []
    for name, case in CASES.items():
        series[name], paths = _series_files(tmp_path / "sent" / name, case, count=1)
        sent += paths
    with inprocess_node(tmp_path / "data") as node:
        run = storescu(node.port, [tmp_path / "sent"])
        assert run.returncode == 0, run.stdout + run.stderr
    stored = {dataset_bytes(path) for path in (tmp_path / "data" / "store").rglob("*.dcm")}
    assert {dataset_bytes(path) for path in sent} == stored
    rows = _index_rows(tmp_path / "data")
    for name, case in CASES.items():
        assert rows[series[name]] == (case.name_text, case.description_text, case.protocol_text)


# ISO 2022 IR 87 declared, a Latin-1 name written: pydicom cannot decode it.
NOT_IN_ITS_CHARACTER_SET = Case(
    "ISO 2022 IR 87",
    "Müller^Jürgen".encode("latin-1"),
    "Schädel".encode("latin-1"),
    "Kopf ü".encode("latin-1"),
    "M\ufffdller^J\ufffdrgen",
    "Sch\ufffddel",
    "Kopf \ufffd",
)


@pytest.mark.filterwarnings("ignore")  # pydicom warns too: shown once per place by Python
def _store_in_process(data_dir: Path, paths: list[Path]) -> None:
    """Each file sent on one association to the node's SCP in this process: all stored."""
    with inprocess_node(data_dir) as node, mr_store_association(node.port) as assoc:
        for path in paths:
            assert assoc.send_c_store(path).Status == 0x0000


def test_the_receiver_logs_no_line_per_value_and_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """pydicom logged a WARNING for each text value of each image it could not decode
    while the index read it (three per image here). The file keeps the bytes, and the job
    says it once for the series."""
    monkeypatch.setattr(pynetdicom_config, "LOG_HANDLER_LEVEL", "none")
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    uid, paths = _series_files(tmp_path / "sent", NOT_IN_ITS_CHARACTER_SET, count=5)
    with caplog.at_level(logging.WARNING):
        _store_in_process(tmp_path / "data", paths)
    assert [r.getMessage() for r in caplog.records if r.name == "pydicom"] == []
    case = NOT_IN_ITS_CHARACTER_SET
    expected = (case.name_text, case.description_text, case.protocol_text)
    assert _index_rows(tmp_path / "data")[uid] == expected


def test_quiet_value_warnings_keeps_the_lines_of_other_threads(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pydicom_logger = logging.getLogger("pydicom")
    entered, logged = threading.Event(), threading.Event()
    heard_there: list[str] = []

    def quiet_thread() -> None:
        with quiet_value_warnings() as heard:
            pydicom_logger.warning("in the quiet thread")
            entered.set()
            logged.wait(10)
        heard_there.extend(heard)

    thread = threading.Thread(target=quiet_thread)
    with caplog.at_level(logging.WARNING):
        thread.start()
        assert entered.wait(10)
        pydicom_logger.warning("in another thread meanwhile")
        logged.set()
        thread.join(10)
    assert [r.getMessage() for r in caplog.records] == ["in another thread meanwhile"]
    assert heard_there == ["in the quiet thread"]


@pytest.mark.filterwarnings("ignore")
def test_a_job_sums_up_text_its_character_set_does_not_describe(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A misspelled character set ("ISO-IR 100"; pydicom reads it as ISO_IR 100): each
    value pydicom decoded logged a line, dozens per image while a job read the series and
    encoded its SEG."""
    sources = stored_series(
        "ISO-IR 100", {"PatientName": "Müller^Jürgen".encode("latin-1")}
    )  # read back as a job reads its files
    folder = tmp_path / "series"
    write_series(sources, folder)
    caplog.clear()  # what writing the files logged
    with caplog.at_level(logging.WARNING), summarised_value_warnings("job 7 series 1.2"):
        volume_from_folder(folder)
        seg = pydicom.dcmread(
            io.BytesIO(seg_file_of([pydicom.dcmread(p) for p in sorted(folder.iterdir())]))
        )
    assert [r.getMessage() for r in caplog.records if r.name == "pydicom"] == []
    (summary,) = [
        r.getMessage()
        for r in caplog.records
        if r.name == "dicom_node.value_warnings" and "Specific Character Set" in r.getMessage()
    ]
    assert summary.startswith("job 7 series 1.2: "), summary
    assert "reads of header text that does not match its Specific Character Set" in summary
    assert "Incorrect value for Specific Character Set 'ISO-IR 100'" in summary
    assert str(seg.PatientName) == "Müller^Jürgen"


@pytest.mark.filterwarnings("ignore")
def test_a_job_sums_up_what_it_read_as_the_index_reads_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A job reads some header text as the index does (the SEG's Series Description):
    pydicom's complaint then reached ``quiet_value_warnings``, which dropped it, before the
    job's count saw it, once anything in the process had been quiet before (an earlier
    job's SEG, an image received): only a worker's first job summed it up."""
    ds = pydicom.Dataset()
    ds.SpecificCharacterSet = "ISO 2022 IR 87"
    ds.add_new(0x0008103E, "LO", b"T1 \x1b$)Zabc")  # an escape sequence of no set
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True)
    read = pydicom.dcmread(io.BytesIO(buffer.getvalue()), force=True)
    with quiet_value_warnings():
        pass  # as an earlier job did in this process
    with caplog.at_level(logging.WARNING), summarised_value_warnings("job 7 series 1.2"):
        assert header_text(read, 0x0008103E) == "T1 \ufffdabc"
    assert _pydicom_lines(caplog) == []
    (summary,) = [r.getMessage() for r in caplog.records if r.name == "dicom_node.value_warnings"]
    assert summary.startswith("job 7 series 1.2: 1 reads of header text"), summary
    assert "Found unknown escape sequence" in summary


# A device that misspells its character set, and one that names a set DICOM does not have:
# pydicom reads both as Latin-1 and complains of the value each time it reads the dataset.
MISNAMED_CHARACTER_SETS = {
    "misspelled": _schaedel_in_latin_1("ISO-IR 100"),
    "unknown": _schaedel_in_latin_1("ISO_IR 999"),
}


def _pydicom_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("pydicom")]


@pytest.mark.filterwarnings("ignore")  # pydicom warns too: shown once per place by Python
@pytest.mark.parametrize("case", MISNAMED_CHARACTER_SETS)
def test_a_misnamed_character_set_logs_no_line_per_received_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    """pynetdicom's decoding of each received dataset logged pydicom's complaints about
    its Specific Character Set: two lines per image."""
    monkeypatch.setattr(pynetdicom_config, "LOG_HANDLER_LEVEL", "none")
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    sent = MISNAMED_CHARACTER_SETS[case]
    uid, paths = _series_files(tmp_path / "sent", sent, count=3)
    caplog.clear()  # what writing the files logged
    with caplog.at_level(logging.WARNING):
        _store_in_process(tmp_path / "data", paths)
    assert _pydicom_lines(caplog) == []
    expected = (sent.name_text, sent.description_text, sent.protocol_text)
    assert _index_rows(tmp_path / "data")[uid] == expected


@pytest.mark.filterwarnings("ignore")
def test_store_check_logs_no_line_per_image_of_a_misnamed_character_set(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`store check --repair` reads each file the index lost: pydicom's complaints about
    a misspelled character set gave lines per image."""
    sent = MISNAMED_CHARACTER_SETS["misspelled"]
    uid, paths = _series_files(tmp_path / "sent", sent, count=3)
    store = FileStore(tmp_path / "data" / "store", fsync=False)
    for path in paths:  # files as the receiver wrote them, no row names them
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        stored = store.absolute(
            store.relative_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        )
        stored.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, stored)
    index = Index(f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}", fsync=False)
    try:
        report = check_store(index, store, grace_s=0)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            repaired = repair_store(index, store, report)
    finally:
        index.dispose()
    assert _pydicom_lines(caplog) == []
    assert (repaired.indexed, repaired.unreadable) == (3, [])
    expected = (sent.name_text, sent.description_text, sent.protocol_text)
    assert _index_rows(tmp_path / "data")[uid] == expected


@pytest.mark.parametrize("case", CASES)
def test_rules_test_of_a_folder_sees_the_text_the_node_indexes(
    received: Received, case: str
) -> None:
    """`rules test FOLDER` read the files' texts with pydicom ("SchÃ¤del" for UTF-8 where
    no character set is declared): a rule on "Schädel" matched the series received, not
    its folder."""
    folder = received.sent[case][0].parent
    facts = facts_from_folder(folder)
    _, description, protocol = _index_rows(received.data_dir)[received.series[case]]
    assert (facts.series_description, facts.protocol_name) == (description, protocol)
    assert facts.series_instance_uid == received.series[case]
    assert facts.modality == "MR"


@pytest.mark.filterwarnings("ignore")
def test_rules_test_of_a_folder_logs_no_line_per_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sent = MISNAMED_CHARACTER_SETS["misspelled"]
    _series_files(tmp_path / "series", sent, count=3)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        facts = facts_from_folder(tmp_path / "series")
    assert _pydicom_lines(caplog) == []
    assert (facts.series_description, facts.image_count) == ("Schädel", 3)


def test_the_log_file_is_utf_8_whatever_the_locale(tmp_path: Path) -> None:
    """Under the C locale (no UTF-8 mode) the log file was opened as ASCII: a line holding
    a patient's name was lost with "--- Logging error ---". The console (stderr) keeps it,
    escaped."""
    log_file = tmp_path / "node.log"
    message = "series Schädel of Müller^Jürgen, 頭部"
    script = (  # ASCII: the command line is read in the locale's encoding too
        "import logging\n"
        "from dicom_node.config import LoggingSettings\n"
        "from dicom_node.logging_setup import configure_logging\n"
        f"configure_logging(LoggingSettings(file={str(log_file)!r}))\n"
        f"logging.getLogger('dicom_node.jobs').warning({message!a})\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        timeout=60,
        check=True,
        env={"LC_ALL": "C", "PYTHONUTF8": "0", "PATH": "/usr/bin:/bin"},
    )
    assert b"Logging error" not in run.stderr, run.stderr
    assert b"series Sch\\xe4del of M\\xfcller^J\\xfcrgen, \\u982d\\u90e8" in run.stderr
    (line,) = log_file.read_text(encoding="utf-8").splitlines()
    assert line.endswith(f"dicom_node.jobs: {message}"), line


def test_series_list_and_show_name_the_patient(received: Received) -> None:
    """A PACS administrator finds a series by patient name, study date and description:
    `series list` and `series show` gave none of the patient's name."""
    listed = json.loads(_dicom_node(received.data_dir, "series", "list", "--json"))
    names = {item["series_instance_uid"]: item["patient_name"] for item in listed}
    for name, case in CASES.items():
        assert names[received.series[name]] == case.name_text, name
    assert all("study_date" in item for item in listed)
    uid = received.series["utf-8"]
    shown = _dicom_node(received.data_dir, "series", "show", uid)
    assert "\npatient_name: Müller^Jürgen\n" in shown, shown
    data = json.loads(_dicom_node(received.data_dir, "series", "show", uid, "--json"))
    assert data["patient_name"] == "Müller^Jürgen"
    assert "study_date" in data
    assert data["versions"][0]["patient_name"] == "Müller^Jürgen"


def test_the_cli_prints_text_its_terminal_cannot_encode_escaped(received: Received) -> None:
    """A terminal whose locale cannot encode a description (the C locale without Python's
    UTF-8 mode): `series list`'s table was a UnicodeEncodeError traceback."""
    ascii_terminal = {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    listed = _dicom_node(received.data_dir, "series", "list", env=ascii_terminal)
    assert "\\x" in listed or "\\u" in listed, listed  # escaped, e.g. Sch\xe4del
    shown = _dicom_node(
        received.data_dir, "series", "show", received.series["utf-8"], env=ascii_terminal
    )
    # click writes UTF-8 to an ASCII terminal; escaped would do as well.
    assert "patient_name: Müller^Jürgen" in shown or "M\\xfcller^J\\xfcrgen" in shown, shown


# What the SEG's patient and study texts read as, with the SEG's character set.
SEG_CASES: dict[str, tuple[Charset, bytes, bytes, Charset, str]] = {
    "latin-1": (
        "ISO_IR 100",
        "Müller^Jürgen".encode("latin-1"),
        "Schädel MRT".encode("latin-1"),
        "ISO_IR 100",
        "Müller^Jürgen",
    ),
    "utf-8": ("ISO_IR 192", "山田^太郎".encode(), "頭部 MRI".encode(), "ISO_IR 192", "山田^太郎"),
    "japanese-katakana-kanji": (
        ["ISO 2022 IR 13", "ISO 2022 IR 87"],
        YAMADA,
        b"\x1b$BF,It\x1b(J MRI",
        ["ISO 2022 IR 13", "ISO 2022 IR 87"],
        "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう",
    ),
    "japanese-romaji-kanji": (
        ["", "ISO 2022 IR 87"],
        YAMADA_ROMAJI,
        b"\x1b$BF,It\x1b(B MRI",
        ["ISO 2022 IR 6", "ISO 2022 IR 87"],
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
    ),
    "cyrillic": (
        "ISO_IR 144",
        "Иванов^Иван".encode("iso8859_5"),
        "Голова нативно".encode("iso8859_5"),
        "ISO_IR 144",
        "Иванов^Иван",
    ),
}


@pytest.mark.peers
@pytest.mark.parametrize("case", SEG_CASES)
def test_the_seg_reads_as_its_source_in_pydicom_and_dciodvfy(tmp_path: Path, case: str) -> None:
    charset, name, study_description, seg_charset, name_text = SEG_CASES[case]
    sources = stored_series(charset, {"PatientName": name, "StudyDescription": study_description})
    path = tmp_path / "seg.dcm"
    path.write_bytes(seg_file_of(sources))
    output = dciodvfy(path)
    # dciodvfy prints the name as its bytes: the source's, under the source's character set.
    assert "Character invalid" not in output, output
    seg = pydicom.dcmread(path)
    assert seg.get("SpecificCharacterSet") == seg_charset
    assert str(seg.PatientName) == name_text == str(sources[0].PatientName)
    assert seg.StudyDescription == sources[0].StudyDescription
    # The SEG's own texts: LO values of at most 64 characters, without a backslash.
    for text in (
        seg.SeriesDescription,
        seg.ContentDescription,
        seg.SegmentSequence[0].SegmentLabel,
    ):
        assert len(text) <= 64 and "\\" not in text, text
