"""``logging.file`` as an operator's logrotate and disks meet it: a file that cannot be written
(a full disk, a rotated file the node may not open again) costs the file its lines, never
the node an image, and says so once on stderr instead of a traceback per line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NodeFactory
from peers import acknowledged_files, make_mr_series, storescu


def _run_logging(script: str, log_file: Path | str) -> subprocess.CompletedProcess[str]:
    head = (
        "import logging, os\n"
        "from dicom_node.config import LoggingSettings\n"
        "from dicom_node.logging_setup import configure_logging\n"
        f"configure_logging(LoggingSettings(file={str(log_file)!r}))\n"
        "log = logging.getLogger('dicom_node.receive')\n"
    )
    return subprocess.run(
        [sys.executable, "-c", head + script], capture_output=True, text=True, timeout=60
    )


def test_a_rotated_log_file_that_cannot_be_opened_again_fails_no_caller(tmp_path: Path) -> None:
    """After a rotation the handler opens the file anew; when it could not (logrotate's
    ``create`` with an owner the node is not, a read-only volume; here a folder in its
    place), every logging call raised: the node aborted every association it was offered.
    Now the lines go to stderr only, said once, until the file can be opened again."""
    log_file = tmp_path / "node.log"
    done = _run_logging(
        f"log.info('before')\n"
        f"os.rename({str(log_file)!r}, {str(log_file)!r} + '.1')\n"
        f"os.mkdir({str(log_file)!r})\n"
        "for n in range(3):\n"
        "    log.info('during %d', n)\n"
        f"os.rmdir({str(log_file)!r})\n"
        "log.info('after')\n",
        log_file,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Logging error" not in done.stderr, done.stderr
    stderr = done.stderr.splitlines()
    assert len(stderr) == 1 + 3 + 1 + 1 + 1, done.stderr  # every line, and two notices
    assert sum("cannot be written (IsADirectoryError" in line for line in stderr) == 1
    assert "before" in (tmp_path / "node.log.1").read_text()
    after = log_file.read_text().splitlines()
    assert len(after) == 2, after
    assert after[0].endswith("written again; 3 line(s) before this one are on stderr only")
    assert after[1].endswith("dicom_node.receive: after")


def test_a_full_log_disk_is_one_line_on_stderr(tmp_path: Path) -> None:
    """Each line the full disk refused printed a 20-line "--- Logging error ---" traceback
    to stderr (the journal), burying the lines themselves."""
    done = _run_logging("for n in range(20):\n    log.info('C-STORE %d', n)\n", "/dev/full")
    assert done.returncode == 0, done.stderr
    assert "Logging error" not in done.stderr, done.stderr[:2000]
    lines = done.stderr.splitlines()
    assert len(lines) == 21, done.stderr[:2000]
    (notice,) = [line for line in lines if "C-STORE" not in line]
    assert " ERROR " in notice and "No space left on device" in notice, notice


@pytest.mark.peers
def test_the_node_receives_while_its_rotated_log_file_cannot_be_opened(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    log_file = tmp_path / "log" / "node.log"
    node = node_factory(overrides={"logging": {"file": str(log_file)}})
    log_file.rename(log_file.with_name("node.log.1"))
    log_file.mkdir()  # stands for a new file the node may not open
    series = make_mr_series(tmp_path / "series", 3, size=16)
    sent = storescu(node.port, [series.folder], extra_args=["-v"], timeout_s=20)
    assert len(acknowledged_files(sent.stdout + sent.stderr)) == 3, sent.stdout + sent.stderr
    assert len(list(node.store_dir.rglob("*.dcm"))) == 3
    assert "cannot be written (IsADirectoryError" in node.log_text()
