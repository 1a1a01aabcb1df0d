"""Installing models: permissions, interrupted installs, zip layouts, options, orientation.

Each test stands for one defect found in an audit of ``models add`` (or the orientation key
added with it), on the tiny model of ``test_models``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_models import TRAINER_DIR, export_zip, make_model
from typer.testing import CliRunner, Result

from dicom_node.errors import ModelError
from inference.catalogue import load_catalogue
from inference.model_store import install_model, list_models, load_model_info

REPO = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def _leftovers(models: Path) -> list[str]:
    return sorted(p.name for p in models.iterdir() if p.name.startswith("."))


def _cli(tmp_path: Path, *args: str) -> Result:
    from dicom_node.cli import app

    config = tmp_path / "config.yaml"
    if not config.exists():
        config.write_text("storage:\n  data_dir: var\ninference:\n  device: cpu\n")
    return CliRunner().invoke(app, ["--config", str(config), "models", *args])


def _edit_json(file: Path, **changes: Any) -> None:
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


# --- 1: permissions, unreadable folders ----------------------------------------------------


def test_installed_model_is_readable_by_the_service_user(tmp_path: Path) -> None:
    info = install_model(make_model(tmp_path / "src"), tmp_path / "models")
    for path in (info.root, *info.root.rglob("*")):
        mode = stat.S_IMODE(path.stat().st_mode)
        wanted = 0o055 if path.is_dir() else 0o044  # group and others read (and enter)
        assert mode & wanted == wanted, f"{path} is {oct(mode)}"


def test_a_models_folder_made_by_models_add_is_reachable_by_the_service_user(
    tmp_path: Path,
) -> None:
    """Commands run with umask 027 (patient data): `sudo dicom-node models add` into a new
    inference.models_dir made it and its parents 0750, owned by root, and the service's
    user could reach no model, though each model folder was readable by all."""
    config = tmp_path / "config.yaml"
    shared = tmp_path / "shared"
    config.write_text(
        f"storage: {{data_dir: {tmp_path / 'var'}}}\n"
        f"inference: {{models_dir: {shared / 'models'}, device: cpu}}\n"
    )
    src = make_model(tmp_path / "src")
    command = [str(Path(sys.executable).with_name("dicom-node")), "-c", str(config)]
    run = subprocess.run(
        ["sh", "-c", 'umask 022 && exec "$@"', "sh", *command, "models", "add", str(src)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    for folder in (shared, shared / "models"):
        mode = stat.S_IMODE(folder.stat().st_mode)
        assert mode & 0o055 == 0o055, f"{folder} is {oct(mode)}"


def test_an_unreadable_model_folder_is_reported_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "var" / "models"
    src = make_model(tmp_path / "src")
    install_model(src, models, "locked")
    install_model(src, models, "open")
    real_is_file = Path.is_file

    def is_file(self: Path) -> bool:  # what a 0700 folder of another user does
        if self.parent == models / "locked":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_is_file(self)

    monkeypatch.setattr(Path, "is_file", is_file)
    assert [m.name for m in list_models(models) if not m.builtin] == ["open"]
    from inference.model_store import scan_models

    found, problems = scan_models(models)
    assert [m.name for m in found if not m.builtin] == ["open"]
    assert len(problems) == 1 and "locked cannot be read (Permission denied)" in problems[0]
    assert "chmod -R a+rX" in problems[0]
    with pytest.raises(ModelError, match="cannot be read"):
        load_model_info("locked", models)
    listed = _cli(tmp_path, "list")
    assert listed.exit_code == 0, listed.output
    assert "problem: " in listed.output and "open" in listed.output


# --- 2: the trained-model folder after nnUNetv2_find_best_configuration -------------------


def test_crossval_results_and_a_stray_dataset_json_are_not_models(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    trainer = src / TRAINER_DIR
    crossval = trainer / "crossval_results_folds_0_1_2_3_4"
    crossval.mkdir()
    shutil.copy(trainer / "dataset.json", crossval)
    shutil.copy(trainer / "plans.json", crossval)
    (crossval / "summary.json").write_text("{}")
    assert install_model(trainer, tmp_path / "models", "trainer").folds == [0]
    assert install_model(src, tmp_path / "models", "dataset").folds == [0]
    zipped = export_zip(src, tmp_path / "m.zip")
    with zipfile.ZipFile(zipped, "a") as zf:  # as TotalVibeSegmentator's zips hold one
        zf.write(trainer / "dataset.json", "dataset.json")
    assert install_model(zipped, tmp_path / "models", "zipped").folds == [0]


# --- 3, 4: interrupted installs -------------------------------------------------------------


def test_replace_killed_midway_keeps_the_installed_model(tmp_path: Path) -> None:
    models = tmp_path / "models"
    old = install_model(make_model(tmp_path / "old"), models, "m")
    new_src = make_model(tmp_path / "new", folds=(1,))
    # Killed (power cut, OOM killer) right after the old version was moved out of the way.
    result = _run(f"""
import os, shutil, signal
from pathlib import Path
import inference.model_store as ms
final = Path({str(models / "m")!r})
def then_die(fn):
    def wrapper(path, *args, **kwargs):
        out = fn(path, *args, **kwargs)
        if Path(path) == final:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    return wrapper
shutil.rmtree = then_die(shutil.rmtree)
Path.rename = then_die(Path.rename)
ms.install_model(Path({str(new_src)!r}), final.parent, "m", overwrite=True)
""")
    assert result.returncode == -9, result.stderr[-2000:]
    install_model(make_model(tmp_path / "other"), models, "other")  # the next install tidies
    assert load_model_info("m", models).weights_sha256 == old.weights_sha256
    assert _leftovers(models) == []
    replaced = install_model(new_src, models, "m", overwrite=True)
    assert load_model_info("m", models).weights_sha256 == replaced.weights_sha256
    assert replaced.weights_sha256 != old.weights_sha256
    assert _leftovers(models) == []


def test_a_killed_install_leaves_no_staging_folder_behind(tmp_path: Path) -> None:
    models = tmp_path / "models"
    src = make_model(tmp_path / "src")
    result = _run(f"""
import os, signal
from pathlib import Path
import inference.model_store as ms
copy = ms.copy_model_files
def copy_then_die(found, dest):
    copy(found, dest)
    os.kill(os.getpid(), signal.SIGKILL)
ms.copy_model_files = copy_then_die
ms.install_model(Path({str(src)!r}), Path({str(models)!r}), "m")
""")
    assert result.returncode == -9, result.stderr[-2000:]
    assert [n for n in _leftovers(models) if n.startswith(".install-")]
    install_model(src, models, "m")
    assert _leftovers(models) == []
    # A running install's folders (this process is alive) are not touched.
    from inference.model_store import ASIDE_PREFIX, STAGING_PREFIX, _host_tag

    running = [
        models / f"{prefix}x-{_host_tag()}-{os.getpid()}-0123abcd"
        for prefix in (STAGING_PREFIX, ASIDE_PREFIX)
    ]
    for folder in running:
        folder.mkdir()
    install_model(src, models, "m", overwrite=True)
    assert _leftovers(models) == sorted(p.name for p in running)


# --- 5: --checkpoint --------------------------------------------------------------------


def test_cli_installs_checkpoint_best(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    fold = src / TRAINER_DIR / "fold_0"
    (fold / "checkpoint_final.pth").rename(fold / "checkpoint_best.pth")
    added = _cli(tmp_path, "add", str(src), "--name", "best", "--checkpoint", "checkpoint_best.pth")
    assert added.exit_code == 0, added.output
    info = load_model_info("best", tmp_path / "var" / "models")
    assert info.descriptor.checkpoint == "checkpoint_best.pth"
    with pytest.raises(ModelError, match="file name inside fold_N"):
        install_model(src, tmp_path / "models", checkpoint="../checkpoint_best.pth")


# --- 6: zip members that are links, damaged checkpoints --------------------------------------


def test_a_zip_member_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    zipped = tmp_path / "links.zip"
    inner = f"Dataset999_Tiny/{TRAINER_DIR}"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.write(src / TRAINER_DIR / "dataset.json", f"{inner}/dataset.json")
        zf.write(src / TRAINER_DIR / "plans.json", f"{inner}/plans.json")
        link = zipfile.ZipInfo(f"{inner}/fold_0/checkpoint_final.pth")
        link.create_system = 3  # unix: the high bits are the file's mode
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(ModelError, match="is a symbolic link in the zip"):
        install_model(zipped, tmp_path / "models", "m")
    assert not (tmp_path / "models" / "m").exists() and _leftovers(tmp_path / "models") == []


def test_a_checkpoint_that_is_not_a_torch_file_is_refused(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    checkpoint = src / TRAINER_DIR / "fold_0" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # an interrupted copy
    with pytest.raises(ModelError, match="is not a PyTorch checkpoint"):
        install_model(src, tmp_path / "models")
    assert not (tmp_path / "models" / "tiny").exists()


# --- 7: zip layouts ---------------------------------------------------------------------


def test_zips_with_a_wrapping_folder_or_backslashes_install(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    direct = install_model(src, tmp_path / "models", "direct")
    files = [f for f in sorted(src.parent.rglob("*")) if f.is_file()]
    wrapped = tmp_path / "wrapped.zip"
    windows = tmp_path / "windows.zip"
    with zipfile.ZipFile(wrapped, "w") as zw, zipfile.ZipFile(windows, "w") as zb:
        for f in files:
            rel = f.relative_to(src.parent).as_posix()
            zw.write(f, f"my_model_v1/{rel}")  # zipping the folder holding the results
            zb.writestr(rel.replace("/", "\\"), f.read_bytes())  # some Windows tools
    for zipped in (wrapped, windows):
        info = install_model(zipped, tmp_path / "models", zipped.stem)
        assert info.weights_sha256 == direct.weights_sha256
        assert info.descriptor.configuration == "3d_fullres"


# --- 8: --replace says when workers take the new version ----------------------------------


def test_replace_says_when_workers_take_the_new_version(tmp_path: Path) -> None:
    """Workers load a replaced model at their next job of it (tests/test_model_changes.py);
    the note used to say a restart was needed."""
    src = make_model(tmp_path / "src")
    assert _cli(tmp_path, "add", str(src), "--name", "m").exit_code == 0
    replaced = _cli(tmp_path, "add", str(src), "--name", "m", "--replace")
    assert replaced.exit_code == 0, replaced.output
    assert "jobs running now finish with the previous version" in replaced.output
    assert "each worker loads this one for its next job of the model" in replaced.output


# --- 9: disk full -----------------------------------------------------------------------


def test_disk_full_is_a_model_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_model(tmp_path / "src")
    models = tmp_path / "models"
    install_model(src, models, "m")

    def full(source: Any, target: Any, **_: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full)
    with pytest.raises(ModelError, match=r"No space left on device.*larger disk"):
        install_model(src, models, "m", overwrite=True)
    with pytest.raises(ModelError, match="No space left on device"):
        install_model(src, models, "n")
    assert _leftovers(models) == [] and not (models / "n").exists()
    monkeypatch.undo()
    assert load_model_info("m", models).folds == [0]


# --- 10: models list without a terminal ---------------------------------------------------


def test_models_list_without_a_terminal_prints_whole_rows(tmp_path: Path) -> None:
    name = "a_model_with_a_rather_long_name_for_a_narrow_table_" + "x" * 10
    src = make_model(tmp_path / "src")
    assert _cli(tmp_path, "add", str(src), "--name", name).exit_code == 0
    listed = _cli(tmp_path, "list")
    assert listed.exit_code == 0, listed.output
    root = (tmp_path / "var" / "models" / name).resolve()
    assert name in listed.output and str(root) in listed.output
    assert "…" not in listed.output


# --- 11: TotalSegmentator's tile step ------------------------------------------------------


def _as_total(src: Path, spacing: list[float]) -> Path:
    labels = {lab.name: lab.id for lab in load_catalogue("total").labels}
    _edit_json(src / TRAINER_DIR / "dataset.json", labels={"background": 0, **labels})
    plans = json.loads((src / TRAINER_DIR / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["spacing"] = spacing
    (src / TRAINER_DIR / "plans.json").write_text(json.dumps(plans))
    return src


def test_totalsegmentator_total_gets_its_tile_step_and_ras(tmp_path: Path) -> None:
    fine = install_model(_as_total(make_model(tmp_path / "a"), [1.5] * 3), tmp_path / "m", "t")
    assert fine.descriptor.catalogue == "total"
    assert fine.descriptor.tile_step_size == 0.8  # totalsegmentator/nnunet.py, "total" < 3 mm
    assert fine.descriptor.orientation == "RAS"
    coarse = install_model(_as_total(make_model(tmp_path / "b"), [3.0] * 3), tmp_path / "m", "f")
    assert coarse.descriptor.tile_step_size == 0.5  # its 3 mm model
    other = install_model(make_model(tmp_path / "c"), tmp_path / "m")
    assert other.descriptor.tile_step_size == 0.5


def test_a_totalsegmentator_install_from_before_the_key_is_ras(tmp_path: Path) -> None:
    """Installed before model.yaml had an orientation: TotalSegmentator's networks learnt
    RAS arrays, so its model.yaml without the key loads as RAS; others stay LPS."""
    info = install_model(_as_total(make_model(tmp_path / "a"), [1.5] * 3), tmp_path / "m", "t")
    other = install_model(make_model(tmp_path / "b"), tmp_path / "m", "o")
    for root in (info.root, other.root):
        descriptor = yaml.safe_load((root / "model.yaml").read_text())
        del descriptor["orientation"]
        (root / "model.yaml").write_text(yaml.safe_dump(descriptor))
    assert load_model_info("t", tmp_path / "m").descriptor.orientation == "RAS"
    assert load_model_info("o", tmp_path / "m").descriptor.orientation == "LPS"


# --- 13: folds and parts given twice --------------------------------------------------------


def test_a_fold_or_a_part_given_twice_is_refused(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src", folds=(0, 1))
    with pytest.raises(ModelError, match="fold 0 is given more than once"):
        install_model(src, tmp_path / "models", folds=[0, 0, 1])
    with pytest.raises(ModelError, match="is given twice"):
        install_model([src, src], tmp_path / "models", "parts")
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    with pytest.raises(ModelError, match="hold the same weights"):
        install_model([src, copy], tmp_path / "models", "parts")
    assert _leftovers(tmp_path / "models") == []


# --- orientation -------------------------------------------------------------------------


def test_orientation_defaults_to_lps_and_says_it_was_assumed(tmp_path: Path) -> None:
    info = install_model(make_model(tmp_path / "src"), tmp_path / "models")
    assert info.descriptor.orientation == "LPS"
    assert any("LPS assumed" in n and "--orientation" in n for n in info.notes)
    written = yaml.safe_load((info.root / "model.yaml").read_text())
    assert written["orientation"] == "LPS"
    assert load_model_info("demo", tmp_path / "models").descriptor.orientation == "LPS"


def test_orientation_from_the_models_files(tmp_path: Path) -> None:
    reorient = make_model(tmp_path / "a")
    _edit_json(reorient / TRAINER_DIR / "plans.json", image_reader_writer="NibabelIOWithReorient")
    info = install_model(reorient, tmp_path / "models", "reorient")
    assert info.descriptor.orientation == "RAS" and info.notes == ()
    for name, declared, expected in (("vibe", ["R", "A", "S"], "RAS"), ("las", "las", "LAS")):
        src = make_model(tmp_path / name)
        _edit_json(src / TRAINER_DIR / "dataset.json", orientation=declared)
        assert install_model(src, tmp_path / "models", name).descriptor.orientation == expected
    bad = make_model(tmp_path / "bad")
    _edit_json(bad / TRAINER_DIR / "dataset.json", orientation=["R", "L", "S"])
    with pytest.raises(ModelError, match=r"dataset\.json orientation: 'RLS' is not an orientation"):
        install_model(bad, tmp_path / "models", "bad")
    overridden = install_model(bad, tmp_path / "models", "bad", orientation="ras")
    assert overridden.descriptor.orientation == "RAS"


def test_orientation_option_and_listing(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    added = _cli(tmp_path, "add", str(src), "--name", "m", "--orientation", "RAS", "--json")
    assert added.exit_code == 0, added.output
    assert json.loads(added.stdout)["orientation"] == "RAS"
    refused = _cli(tmp_path, "add", str(src), "--name", "n", "--orientation", "LLS")
    assert refused.exit_code != 0
    assert "'LLS' is not an orientation" in str(refused.exception) + refused.output
    listed = _cli(tmp_path, "list", "--json")
    by_name = {m["name"]: m for m in json.loads(listed.stdout)}
    assert by_name["m"]["orientation"] == "RAS" and by_name["demo"]["orientation"] == "LPS"
    table = _cli(tmp_path, "list")
    assert "orientation" in table.output and "RAS" in table.output


def test_model_yaml_orientation_is_validated_and_defaults_to_lps(tmp_path: Path) -> None:
    info = install_model(make_model(tmp_path / "src"), tmp_path / "models", orientation="RAS")
    descriptor = info.root / "model.yaml"
    data = yaml.safe_load(descriptor.read_text())
    del data["orientation"]  # a model installed before the key existed
    descriptor.write_text(yaml.safe_dump(data))
    assert load_model_info("tiny", tmp_path / "models").descriptor.orientation == "LPS"
    for wrong in ("ras", "RAP", "LPSI"):
        descriptor.write_text(yaml.safe_dump({**data, "orientation": wrong}))
        with pytest.raises(ModelError, match=r"orientation: .* is not an orientation"):
            load_model_info("tiny", tmp_path / "models")


def test_a_version_outside_dicoms_default_characters_is_refused(tmp_path: Path) -> None:
    """The version goes into every SEG (Algorithm Version): under a source without a
    character set, "ü" was invalid there (dciodvfy) or came out as "?"."""
    src = make_model(tmp_path / "src")
    with pytest.raises(ModelError, match="DICOM's default character set"):
        install_model(src, tmp_path / "models", "m", version="2.0 f\u00fcr Leber")
    info = install_model(src, tmp_path / "models", "m", version="2.0-nako")
    descriptor = yaml.safe_load((info.root / "model.yaml").read_text())
    descriptor["version"] = "v\u00e9"
    (info.root / "model.yaml").write_text(yaml.safe_dump(descriptor, allow_unicode=True))
    with pytest.raises(ModelError, match=r"version.*DICOM's default character set"):
        load_model_info("m", tmp_path / "models")


def test_a_model_of_two_input_channels_is_installed_with_a_note(tmp_path: Path) -> None:
    """TotalVibeSegmentator's newer releases take the ROI model's segmentation as a second
    input channel, which the node cannot feed: models add says so, and that its jobs fail."""
    src = make_model(tmp_path / "src")
    _edit_json(
        src / TRAINER_DIR / "dataset.json", channel_names={"0": "MRI", "1": "noNorm"}, roi=278
    )
    added = _cli(tmp_path, "add", str(src), "--name", "two", "--json")
    assert added.exit_code == 0, added.output
    notes = json.loads(added.stdout)["notes"]
    assert any("needs 2 input channels (MRI, noNorm)" in n and "jobs routed" in n for n in notes)


# --- models of two inputs (TotalVibeSegmentator and its ROI model) ----------------------------


def test_a_model_taking_a_roi_models_segmentation_is_fed_it(tmp_path: Path) -> None:
    """TotalVibeSegmentator's main model takes the segmentation of its ROI model (Dataset278)
    as a second input. Installed with --roi-model, its jobs run the ROI model first; the
    label map reaches the network resampled by nearest neighbour to the model's spacing
    (nnU-Net would interpolate label values as intensities), and the result comes back on
    the series' grid."""
    import numpy as np

    from dicom_node.config import InferenceSettings
    from dicom_node.rule_models import unfeedable
    from dicom_node.segment import ModelCache
    from inference.predictor import Segmenter

    src = make_model(tmp_path / "src", channels=2)
    models = tmp_path / "models"
    with pytest.raises(ModelError, match="model 'nosuch' is not installed"):
        install_model(src, models, "vibe2", roi_model="nosuch")
    noted = install_model(src, models, "vibe2")
    assert any("--roi-model" in note and "Dataset278" in note for note in noted.notes)
    assert unfeedable(noted) is not None  # its jobs would fail: said at install and start
    info = install_model(src, models, "vibe2", roi_model="demo", overwrite=True)
    assert info.descriptor.roi_model == "demo" and unfeedable(info) is None

    cache = ModelCache(models, InferenceSettings(device="cpu"))
    _, segmenter = cache.get("vibe2")
    seen: list[tuple[np.ndarray, list[float]]] = []
    run = Segmenter._run

    def spy(predictor: Any, data: np.ndarray, spacing: list[float]) -> np.ndarray:
        seen.append((data.copy(), list(spacing)))
        return run(predictor, data, spacing)

    image = np.random.default_rng(0).normal(300, 100, (20, 30, 30)).astype(np.float32)
    roi = np.zeros(image.shape, np.float32)
    roi[5:15, 10:20, 10:25] = 3.0
    roi[8:12, 12:18, 12:18] = 1.0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Segmenter, "_run", staticmethod(spy))
        labels = segmenter.predict(np.stack([image, roi]), (3.0, 1.0, 1.0))
    assert labels.shape == image.shape
    ((data, spacing),) = seen
    assert spacing == [2.0, 2.0, 2.0]  # the model's, from plans.json: nnU-Net resamples nothing
    assert data.shape == (2, 30, 15, 15)
    assert set(np.unique(data[1])) <= {0.0, 1.0, 3.0}  # labels, not interpolated values


def test_a_rule_whose_model_lacks_its_roi_model_is_reported(tmp_path: Path) -> None:
    """Said at start and by `rules test`, not only as one failed job per series."""
    from dicom_node.config import RuleSettings
    from dicom_node.rule_models import rule_problems

    models = tmp_path / "models"
    install_model(make_model(tmp_path / "roi"), models, "roi")
    install_model(make_model(tmp_path / "src", channels=2), models, "vibe2", roi_model="roi")
    rule = RuleSettings(name="vibe", model="vibe2")
    assert rule_problems(rule, models) == []
    shutil.rmtree(models / "roi")
    (problem,) = rule_problems(rule, models)
    assert problem.stops_jobs
    assert str(problem).startswith("rule 'vibe': model 'vibe2' needs ROI model 'roi' first: ")
