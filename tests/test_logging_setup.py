"""Logging set-up: pynetdicom's per-message log handlers are bound only when the node logs at
DEBUG; libraries' warnings become log lines."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from inprocess import logging_kept
from pynetdicom import _config as pynetdicom_config
from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.config import LoggingSettings
from dicom_node.errors import ConfigError
from dicom_node.logging_setup import configure_logging


@pytest.mark.parametrize(
    ("level", "handlers"),
    [("INFO", "none"), ("WARNING", "none"), ("DEBUG", "standard")],
)
def test_pynetdicom_message_handlers_follow_the_log_level(level: str, handlers: str) -> None:
    """At DEBUG pynetdicom's handlers decode every PDU to log it: its logger must then let
    those lines through (it stayed at WARNING, and the decoding was for nothing)."""
    configure_logging(LoggingSettings(level=level))  # type: ignore[arg-type]
    assert handlers == pynetdicom_config.LOG_HANDLER_LEVEL
    pynetdicom = logging.getLogger("pynetdicom")
    assert pynetdicom.isEnabledFor(logging.DEBUG) is (level == "DEBUG")
    assert not pynetdicom.isEnabledFor(logging.INFO) or level == "DEBUG"


@pytest.mark.parametrize(
    ("level", "network", "handlers", "pynetdicom_from"),
    [
        ("DEBUG", "WARNING", "none", logging.WARNING),  # a job chased, no PDU dumps
        ("INFO", "DEBUG", "standard", logging.DEBUG),  # a sender's PDUs alone
        ("WARNING", "INFO", "standard", logging.INFO),  # a line per DIMSE message
        ("INFO", None, "none", logging.WARNING),
    ],
)
def test_pynetdicom_lines_have_their_own_level(
    level: str, network: str | None, handlers: str, pynetdicom_from: int
) -> None:
    """DEBUG for the node's own lines always brought every PDU of every association with
    it: chasing a job on a busy node meant reading through the PDU dumps."""
    configure_logging(LoggingSettings(level=level, network_level=network))  # type: ignore[arg-type]
    assert handlers == pynetdicom_config.LOG_HANDLER_LEVEL
    assert logging.getLogger("pynetdicom").getEffectiveLevel() == pynetdicom_from
    assert (
        logging.getLogger("dicom_node").getEffectiveLevel() == logging.getLevelNamesMapping()[level]
    )


@pytest.mark.parametrize("journal", [True, False])
def test_lines_to_the_journal_carry_their_priority(tmp_path: Path, journal: bool) -> None:
    """Under systemd, journald stored every stderr line at priority info: `journalctl -p
    warning` showed none of the node's warnings. Elsewhere stderr lines stay as they were."""
    stderr = tmp_path / "stderr"
    stderr.touch()
    st = stderr.stat()
    script = (
        "import logging\n"
        "from dicom_node.config import LoggingSettings\n"
        "from dicom_node.logging_setup import configure_logging\n"
        "configure_logging(LoggingSettings(level='DEBUG', network_level='WARNING'))\n"
        "log = logging.getLogger('dicom_node.x')\n"
        "log.debug('d'); log.info('i'); log.warning('w'); log.error('e'); log.critical('c')\n"
    )
    env = {"PATH": "/usr/bin:/bin"}
    if journal:
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    with stderr.open("w") as err:
        subprocess.run([sys.executable, "-c", script], stderr=err, timeout=60, check=True, env=env)
    lines = stderr.read_text().splitlines()
    assert [line.rsplit(": ", 1)[1] for line in lines] == ["d", "i", "w", "e", "c"]
    prefixes = [line[:3] for line in lines]
    if journal:
        assert prefixes == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    else:
        assert all(line[0].isdigit() for line in lines)  # the time first, as before


def test_json_lines_keep_the_traceback(tmp_path: Path) -> None:
    """An unexpected error's traceback, which the text format prints below its line, was
    dropped from JSON lines: the operator had the message and nothing of where it came from."""
    log_file = tmp_path / "node.log"
    script = (
        "import logging\n"
        "from dicom_node.config import LoggingSettings\n"
        "from dicom_node.logging_setup import configure_logging\n"
        f"configure_logging(LoggingSettings(json_lines=True, file={str(log_file)!r}))\n"
        "try:\n"
        "    1 / 0\n"
        "except ZeroDivisionError:\n"
        "    logging.getLogger('dicom_node.receive').exception('C-STORE failed unexpectedly')\n"
    )
    subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60, check=True)
    (line,) = log_file.read_text().splitlines()
    record = json.loads(line)
    assert record["message"] == "C-STORE failed unexpectedly"
    assert "ZeroDivisionError: division by zero" in record["exc_info"]
    assert "Traceback" in record["exc_info"]


@pytest.mark.parametrize("json_lines", [False, True])
def test_log_times_carry_their_utc_offset(tmp_path: Path, json_lines: bool) -> None:
    """Lines were stamped in local time without an offset: the hour that repeats when
    daylight saving time ends (Berlin, 25 October 2026: 02:30 twice) read the same twice,
    and lines could not be set beside the CLI's UTC times."""
    log_file = tmp_path / "node.log"
    script = (
        "import logging\n"
        "from dicom_node.config import LoggingSettings\n"
        "from dicom_node.logging_setup import configure_logging\n"
        f"configure_logging(LoggingSettings(json_lines={json_lines}, file={str(log_file)!r}))\n"
        "for utc in (1792888200.25, 1792891800.25):  # 00:30 and 01:30 UTC\n"
        "    record = logging.makeLogRecord({'name': 'dicom_node.x', 'levelno': 20,\n"
        "        'levelname': 'INFO', 'msg': 'm', 'created': utc, 'msecs': 250.0})\n"
        "    logging.getLogger().handle(record)\n"
    )
    env = {"TZ": "Europe/Berlin", "PATH": "/usr/bin:/bin"}
    subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=60, check=True, env=env
    )
    lines = log_file.read_text().splitlines()
    if json_lines:
        stamps = [json.loads(line)["time"] for line in lines]
        assert stamps == ["2026-10-25T02:30:00.250+02:00", "2026-10-25T02:30:00.250+01:00"]
    else:
        stamps = [line.split(" INFO ")[0] for line in lines]
        assert stamps == ["2026-10-25 02:30:00,250+0200", "2026-10-25 02:30:00,250+0100"]


def test_a_log_file_that_cannot_be_written_is_a_config_error(tmp_path: Path) -> None:
    """Every command logs, the health check too: a log folder on a read-only volume (or
    under a file) stopped each with a raw traceback."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"logging.file .*node.log cannot be written"):
        configure_logging(LoggingSettings(file=blocker / "node.log"))


def test_library_warnings_become_log_lines(tmp_path: Path) -> None:
    """A library's warning (highdicom warns of a source's one-part Patient Name while the
    worker encodes) is a JSON log line like any other, in the log file too, not a raw
    two-line message on stderr that breaks a log shipper's parsing."""
    log_file = tmp_path / "node.log"
    script = (
        "import warnings\n"
        "from dicom_node.config import LoggingSettings\n"
        "from dicom_node.logging_setup import configure_logging\n"
        f"configure_logging(LoggingSettings(json_lines=True, file={str(log_file)!r}))\n"
        "warnings.warn('The string \"HFS\" is unlikely to represent a person name', UserWarning)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    for text in (done.stderr, log_file.read_text()):
        lines = text.splitlines()
        assert len(lines) == 1, text
        record = json.loads(lines[0])
        assert record["level"] == "WARNING"
        assert record["logger"] == "py.warnings"
        assert "HFS" in record["message"]


def test_pydicom_value_warnings_are_summed_up_in_one_line(tmp_path: Path) -> None:
    """One line per series, with the job's tag, instead of one per non-conforming value;
    outside the block pydicom's lines are left alone."""
    log_file = tmp_path / "node.log"
    script = (
        "from pydicom import Dataset\n"
        "from dicom_node.config import LoggingSettings\n"
        "from dicom_node.logging_setup import configure_logging\n"
        "from dicom_node.value_warnings import summarised_value_warnings\n"
        f"configure_logging(LoggingSettings(json_lines=True, file={str(log_file)!r}))\n"
        "ds = Dataset()\n"
        "tag = 'job 7'\n"
        "with summarised_value_warnings(lambda: tag):\n"
        "    for n in range(20):\n"
        "        ds.SOPInstanceUID = '1.2.' + '3' * (70 + n)\n"
        "    ds.PatientName = 'A=B=C=D'\n"
        "    tag = 'job 7 series 1.2'\n"
        "ds.SeriesInstanceUID = '1.2.' + '4' * 70\n"
    )
    subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    (summary,) = [r for r in records if r["logger"] == "dicom_node.value_warnings"]
    assert summary["message"].startswith(
        "job 7 series 1.2: 21 header values do not conform to their VR, kept as sent: "
        "The value length (N) exceeds the maximum length of 64 allowed for VR UI (20x); "
    ), summary
    assert "number of PN components length (4) exceeds" in summary["message"]
    after = [r for r in records if r["logger"] in ("pydicom", "py.warnings")]
    assert len(after) >= 1 and all("(74)" in r["message"] for r in after), after


def test_logging_is_as_it_was_after_a_cli_command_run_in_this_process(tmp_path: Path) -> None:
    """A CLI command run in the tests' process configures logging on typer's CliRunner's
    stderr, closed when the command ends: left so, a later test's association thread
    logging its end printed "--- Logging error ---" (I/O operation on closed file) in the
    suite's output. conftest's ``logging_restored`` puts logging back after each test."""
    root = logging.getLogger()
    before = (list(root.handlers), root.level, logging.getLogger("pynetdicom").level)
    config = tmp_path / "config.yaml"
    config.write_text(f"storage:\n  data_dir: {tmp_path / 'var'}\n")
    with logging_kept():
        listed = CliRunner().invoke(app, ["--config", str(config), "models", "list"])
        assert listed.exit_code == 0, listed.output
        (handler,) = root.handlers  # the command's own, on the runner's closed stderr
        assert isinstance(handler, logging.StreamHandler) and handler.stream.closed
    assert (list(root.handlers), root.level, logging.getLogger("pynetdicom").level) == before
