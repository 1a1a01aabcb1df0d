"""What the service does as it starts, in this process (a node in a subprocess cannot be
inspected)."""

from __future__ import annotations

import gc
from pathlib import Path

from peers import echoscu, free_port

from dicom_node.config import Settings
from dicom_node.service import Service


def test_start_up_objects_are_kept_out_of_the_collectors_way(tmp_path: Path) -> None:
    """gc.freeze() once started: a full collection scanned every module, setting and engine
    made at start-up again, ~55 ms of a fresh receiver's first association (benchmarks/
    receive.py starts fresh nodes; a node in service pays it again at each full collection)."""
    port = free_port()
    settings = Settings.model_validate(
        {
            "node": {"port": port, "bind_address": "127.0.0.1", "accept_unknown_callers": True},
            "storage": {"data_dir": str(tmp_path / "var"), "min_free_disk_mb": 0},
            "workers": {"processes": 0},
        }
    )
    gc.unfreeze()
    service = Service(settings)
    try:
        service.start()
        frozen = gc.get_freeze_count()
        assert frozen > 10_000, frozen  # modules, pydicom's dictionaries, SQLAlchemy, ...
        assert echoscu(port).returncode == 0  # and it serves
    finally:
        service.stop()
        gc.unfreeze()  # the rest of the test session collects as usual
