"""The CLI's tables show header values as they are, brackets included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
    config = tmp_path / "config.yaml"
    config.write_text(f"storage:\n  data_dir: {data_dir}\n")
    listed = subprocess.run(
        [str(DICOM_NODE), "-c", str(config), "series", "list"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert listed.returncode == 0, listed.stderr
    assert DESCRIPTION in listed.stdout, listed.stdout
