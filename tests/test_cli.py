"""The CLI as an administrator uses it: what it prints, and what it says of bad options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from inprocess import inprocess_node, mr_image, mr_store_association

# As a site may name a series; rich read "[...]" as markup: "[/x]" stopped `series list`
# with MarkupError, "[red]" vanished from the table.
DESCRIPTION = "AX T1 [Post] [red]C+[/red] [/x]"
DICOM_NODE = Path(sys.executable).parent / "dicom-node"


def test_series_list_shows_a_description_with_brackets(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    image = mr_image(16, seed=1)
    image.SeriesDescription = DESCRIPTION
    with inprocess_node(data_dir) as node, mr_store_association(node.port) as assoc:
        status = assoc.send_c_store(image)
        assert status.Status == 0x0000
    listed = _dicom_node(data_dir, "series", "list")
    assert listed.returncode == 0, listed.stderr
    assert DESCRIPTION in listed.stdout, listed.stdout


@pytest.mark.parametrize(
    ("noun", "choices"),
    [
        ("jobs", "'queued', 'running', 'succeeded', 'failed', 'retry_wait', 'cancelled'"),
        ("deliveries", "'pending', 'sending', 'delivered', 'dead', 'cancelled'"),
    ],
)
def test_an_unknown_state_is_refused_with_the_choices(
    tmp_path: Path, noun: str, choices: str
) -> None:
    """It ended in a ValueError traceback, exit code 1."""

    def listed(state: str) -> subprocess.CompletedProcess[str]:
        return _dicom_node(tmp_path / "data", noun, "list", "--state", state, "--json")

    refused = listed("bogus")
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr
    assert f"'bogus' is not one of {choices}" in refused.stderr, refused.stderr
    accepted = listed("cancelled")
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # Tracebacks before: an id or limit over SQLite's integer range (OverflowError), a
        # port over 65535 (ValidationError), a compression the format cannot take or an
        # --out that is a file (both only after the series was read and segmented), size 0.
        (["jobs", "show", "99999999999999999999999"], "less than or equal to 9223372036854775807"),
        (["deliveries", "cancel", "99999999999999999999"], "less than or equal to"),
        (["series", "list", "--limit", "99999999999999999999"], "less than or equal to"),
        (["echo", "AE@localhost:99999"], "port 99999 is not between 1 and 65535"),
        (["echo", "A\\B@localhost:104"], "AE title 'A\\\\B' is invalid"),
        (["segment", "{series}", "--compression", "rle"], "cannot be used with --format binary"),
        (["segment", "{series}", "--out", "{file}"], "is a file: give the folder"),
        # Before: a stack named by a value no image carries, then a warning and another stack.
        (["segment", "{series}", "--stack-image-type", "W\\F"], "holds several Image Type"),
        (["models", "check", "demo", "--size", "0"], "greater than or equal to 8"),
        # Exit 0 before: a delivery that does not exist "retried", no worker started at all.
        (["deliveries", "retry", "999"], "delivery 999 does not exist, or is being sent"),
        (["worker", "--processes", "-2"], "greater than or equal to 1"),
        # Unclear before: an empty UID read as the current folder, or printed as nothing.
        (["rules", "test", ""], "give a Series Instance UID or a folder (the argument is empty)"),
        (["series", "show", ""], "no series '' in the index"),
        (["jobs", "retry", "7"], "no job 7"),
        # A box drawn around click's usage errors, beside the one-line errors of the rest.
        (["jobs", "show", "abc"], "Error: Invalid value for 'job_id'"),
        # The last --config silently won: a command meant for one node run on another's.
        (["-c", "{file}", "status"], "--config given 2 times"),
    ],
)
def test_bad_arguments_get_an_error_not_a_traceback(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    series = tmp_path / "series"
    series.mkdir()
    (series / "1.dcm").write_bytes(b"not read: the arguments are refused first")
    (tmp_path / "file").write_text("")
    filled = [a.format(series=series, file=tmp_path / "file") for a in args]
    run = _dicom_node(tmp_path / "data", *filled)
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    assert "Traceback" not in run.stderr, run.stderr
    assert "╭" not in run.stderr, run.stderr  # no boxes: one line a log or script can read
    assert expected in " ".join(run.stderr.split()), run.stderr


def test_a_data_dir_that_is_a_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("")
    run = _dicom_node(tmp_path / "data", "store", "check")
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert f"storage.data_dir {tmp_path / 'data'} is a file, not a folder" in run.stderr


def _dicom_node(
    data_dir: Path, *args: str, storage: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``dicom-node ARGS`` as an administrator runs it, on a node whose data is in
    ``data_dir`` (``storage``: more ``storage:`` lines), in a wide terminal (``env``: more
    environment)."""
    config = data_dir.parent / "config.yaml"
    config.write_text(f"storage:\n  data_dir: {data_dir}\n{storage}")
    return subprocess.run(
        [str(DICOM_NODE), "-c", str(config), *args],
        capture_output=True,
        encoding="utf-8",
        timeout=120,
        check=False,
        env={"COLUMNS": "400", "PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_the_health_check_on_a_node_without_its_index(tmp_path: Path) -> None:
    """A wrong or unmounted storage.data_dir: `status` made an empty index there and
    reported all well; the health check now fails (exit 1, what Docker's HEALTHCHECK reads
    as unhealthy; 2 is reserved there), still checks the ports, and --json says why."""
    data = tmp_path / "data"
    checked = _dicom_node(data, "status", "--check", "--json", "--timeout-s", "1")
    assert checked.returncode == 1, (checked.stdout, checked.stderr)
    report = json.loads(checked.stdout)
    assert report["index_up"] is False
    assert f"no index at {data / 'index.sqlite'}" in report["index_error"]
    assert report["listening"]  # the ports were checked all the same
    assert "Traceback" not in checked.stderr
    assert not (data / "index.sqlite").exists()  # nothing made where the index should be
    # Without --check, status on a node not started yet makes its index, as every command.
    assert _dicom_node(data, "status").returncode == 0
