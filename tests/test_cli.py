"""The CLI as an administrator uses it: what it prints, and what it says of bad options."""

from __future__ import annotations

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


def _dicom_node(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``dicom-node ARGS`` as an administrator runs it, on a node whose data is in
    ``data_dir``, in a wide terminal."""
    config = data_dir.parent / "config.yaml"
    config.write_text(f"storage:\n  data_dir: {data_dir}\n")
    return subprocess.run(
        [str(DICOM_NODE), "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"COLUMNS": "400", "PATH": "/usr/bin:/bin"},
    )
