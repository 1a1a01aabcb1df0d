"""Compressed transfer syntaxes are accepted and stored as sent (no decompression)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from peers import NodeProcess, dataset_bytes, make_mr_series, storescu, wait_until
from pydicom import dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

pytestmark = pytest.mark.peers

# storescu's option proposing each syntax.
SYNTAXES = {
    RLELossless: "-xr",
    JPEGLSLossless: "-xt",
    JPEG2000Lossless: "-xv",
    DeflatedExplicitVRLittleEndian: "-xd",
}


@pytest.mark.parametrize("syntax", list(SYNTAXES), ids=lambda uid: uid.name)
def test_compressed_images_are_stored_as_sent(
    node_factory: Callable[..., NodeProcess], tmp_path: Path, syntax: str
) -> None:
    node = node_factory()
    series = make_mr_series(tmp_path / "plain", 3)
    folder = tmp_path / "sent"
    folder.mkdir()
    sent_files = []
    for path in series.paths:
        ds = dcmread(path)
        if syntax == DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = syntax  # pydicom deflates on writing
        else:
            ds.compress(syntax)
        target = folder / path.name
        ds.save_as(target, enforce_file_format=True)
        sent_files.append(target)
    result = storescu(node.port, [folder], extra_args=[SYNTAXES[syntax]])
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until(lambda: len(node.instance_rows()) == 3, timeout_s=30, what="3 stored instances")
    rows = {row["sop_instance_uid"]: row for row in node.instance_rows()}
    for path in sent_files:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        row = rows[uid]
        assert row["transfer_syntax_uid"] == syntax
        stored = node.store_dir / row["path"]
        assert dataset_bytes(stored) == dataset_bytes(path)  # the peer's bytes, not re-encoded
        assert dcmread(stored).pixel_array.shape == (64, 64)
