"""Models changed on a running node: replaced, removed or edited while workers hold them.

Each test stands for one defect found in an audit of changing models under a running node;
the worker runs each job on ``ModelCache.get``, as these tests do.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_models import TRAINER_DIR, _weights, make_model
from typer.testing import CliRunner, Result

import dicom_node.segment as segment
import inference.model_store as model_store
from dicom_node.config import InferenceSettings
from dicom_node.errors import ModelError
from dicom_node.segment import ModelCache
from inference.model_store import install_model, load_model_info
from inference.predictor import Segmenter


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two versions of one model: the same files but for the weights."""
    base = tmp_path_factory.mktemp("sources")
    old, new = make_model(base / "old"), make_model(base / "new")
    checkpoint = new / TRAINER_DIR / "fold_0" / "checkpoint_final.pth"
    saved = torch.load(checkpoint, weights_only=False)
    saved["network_weights"] = _weights(seed=7)
    torch.save(saved, checkpoint)
    return old, new


def _first_weights(segmenter: Segmenter) -> torch.Tensor:
    return next(iter(segmenter._parts[0].predictor.list_of_parameters[0].values()))


NEW_FIRST_WEIGHTS = next(iter(_weights(seed=7).values()))


def _cache(models: Path) -> ModelCache:
    return ModelCache(models, InferenceSettings(device="cpu"))


def _once_before_load(monkeypatch: pytest.MonkeyPatch, action: Callable[[], None]) -> None:
    """``action`` runs between the worker's read of model.yaml and its read of the weights."""

    def building(info: model_store.ModelInfo, settings: InferenceSettings) -> Segmenter:
        monkeypatch.setattr(segment, "Segmenter", Segmenter)
        action()
        return Segmenter(info, settings)

    monkeypatch.setattr(segment, "Segmenter", building)


def test_a_replace_while_a_worker_loads_never_mixes_versions(
    tmp_path: Path, sources: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old model.yaml (its weights hash, written into the SEG) with the new weights:
    the SEG named weights it was not made with."""
    old, new = sources
    models = tmp_path / "models"
    install_model(old, models, "m")
    installed: list[str] = []
    _once_before_load(
        monkeypatch,
        lambda: installed.append(install_model(new, models, "m", overwrite=True).weights_sha256),
    )
    info, segmenter = _cache(models).get("m")
    assert info.weights_sha256 == installed[0]
    assert torch.equal(_first_weights(segmenter), NEW_FIRST_WEIGHTS)


def test_a_load_during_the_swap_of_folders_does_not_fail_the_job(
    tmp_path: Path, sources: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between `--replace`'s two renames no folder is there: the job failed for good
    (``cannot read plans/dataset json``), though the new version came a moment later."""
    old, new = sources
    models = tmp_path / "models"
    install_model(old, models, "m")
    real = segment.Segmenter

    def in_the_gap(info: model_store.ModelInfo, settings: InferenceSettings) -> Segmenter:
        monkeypatch.setattr(segment, "Segmenter", real)
        (models / "m").rename(tmp_path / "aside")  # the old version set aside
        try:
            return real(info, settings)
        finally:
            install_model(new, models, "m")  # the new one renamed in
            shutil.rmtree(tmp_path / "aside")

    monkeypatch.setattr(segment, "Segmenter", in_the_gap)
    info, segmenter = _cache(models).get("m")
    assert info.weights_sha256 == load_model_info("m", models).weights_sha256
    assert torch.equal(_first_weights(segmenter), NEW_FIRST_WEIGHTS)


def test_the_next_job_after_a_replace_runs_the_new_version(
    tmp_path: Path, sources: tuple[Path, Path]
) -> None:
    """Workers kept the weights they had loaded until restarted, while a worker started later
    (another process, one restarted after a crash) ran the new ones: two versions at once."""
    old, new = sources
    models = tmp_path / "models"
    before = install_model(old, models, "m").weights_sha256
    cache = _cache(models)
    held_info, held = cache.get("m")
    assert cache.get("m")[1] is held  # unchanged on disk: kept loaded
    after = install_model(new, models, "m", overwrite=True).weights_sha256
    info, segmenter = cache.get("m")
    assert (held_info.weights_sha256, info.weights_sha256) == (before, after)
    assert torch.equal(_first_weights(segmenter), NEW_FIRST_WEIGHTS)
    assert not torch.equal(_first_weights(held), NEW_FIRST_WEIGHTS)  # a running job's stays


def test_a_removed_model_fails_the_next_job_with_why(
    tmp_path: Path, sources: tuple[Path, Path]
) -> None:
    models = tmp_path / "models"
    install_model(sources[0], models, "m")
    cache = _cache(models)
    cache.get("m")
    shutil.rmtree(models / "m")
    with pytest.raises(ModelError, match="model 'm' is not installed in "):
        cache.get("m")


def test_a_model_yaml_broken_by_hand_fails_the_next_job_with_why(
    tmp_path: Path, sources: tuple[Path, Path]
) -> None:
    """A loaded model went on running as if its model.yaml were whole; the next worker to
    start failed on it."""
    models = tmp_path / "models"
    install_model(sources[0], models, "m")
    cache = _cache(models)
    cache.get("m")
    (models / "m" / "model.yaml").write_text("name: [m\n")
    with pytest.raises(ModelError, match=r"model\.yaml cannot be read"):
        cache.get("m")


def test_two_installs_of_one_name_at_once_one_is_refused(
    tmp_path: Path, sources: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --replace, the install that finished last replaced the other's model (both
    said `installed`): the operator of the first was told of weights no longer there."""
    old, new = sources
    models = tmp_path / "models"
    real = model_store._make_readable
    others: list[str] = []

    def readable(folder: Path) -> None:
        monkeypatch.setattr(model_store, "_make_readable", real)
        # The second shell's install ends while this one still copies.
        others.append(install_model(new, models, "m").weights_sha256)
        real(folder)

    monkeypatch.setattr(model_store, "_make_readable", readable)
    with pytest.raises(ModelError, match=r"installed at .* by another install while this one"):
        install_model(old, models, "m")
    assert load_model_info("m", models).weights_sha256 == others[0]
    assert sorted(p.name for p in models.iterdir()) == ["m"]  # nothing half-made left


def _models_cli(config: Path, *args: str) -> Result:
    from dicom_node.cli import app

    return CliRunner().invoke(app, ["--config", str(config), "models", *args])


def test_models_remove_takes_a_model_out_unless_rules_or_jobs_need_it(
    tmp_path: Path, sources: tuple[Path, Path]
) -> None:
    """There was no way to remove a model but deleting its folder by hand, which no check
    stood before: the rules routing to it and the jobs waiting for it failed unannounced."""
    from test_jobs_and_routing import _complete_series

    from storage.database import Index
    from storage.queue import JobSpec, create_job

    data = tmp_path / "var"
    config = tmp_path / "config.yaml"
    config.write_text(
        f"storage: {{data_dir: {data}}}\n"
        "rules:\n  - {name: liver, model: m, match: {modality: [MR]}}\n"
    )
    install_model(sources[0], data / "models", "m")
    install_model(sources[0], data / "models", "spare")

    refused = _models_cli(config, "remove", "m")
    assert refused.exit_code == 1
    assert "model m not removed: rule(s) liver route series to it" in refused.output
    assert (data / "models" / "m" / "model.yaml").is_file()

    index = Index(f"sqlite:///{data / 'index.sqlite'}")
    assert create_job(index, _complete_series(index), JobSpec("r", "spare", {}, [])) is not None
    waiting = _models_cli(config, "remove", "spare")
    assert waiting.exit_code == 1
    assert "1 job(s) are queued, running or waiting to retry on it" in waiting.output
    assert (data / "models" / "spare").is_dir()

    forced = _models_cli(config, "remove", "m", "--force")
    assert forced.exit_code == 0, forced.output
    assert f"removed m from {data / 'models' / 'm'}" in forced.output
    assert "note: rule(s) liver route series to it: they fail" in forced.output
    assert sorted(p.name for p in (data / "models").iterdir()) == ["spare"]  # nothing hidden
    with pytest.raises(ModelError, match="'m' is not installed"):
        load_model_info("m", data / "models")

    gone = _models_cli(config, "remove", "m")
    assert (
        gone.exit_code != 0
        and "model 'm' is not installed" in str(gone.exception or "") + gone.output
    )
    builtin = _models_cli(config, "remove", "demo")
    assert "it is built in, and cannot be removed" in str(builtin.exception or "") + builtin.output


def test_a_stopped_removal_is_finished_by_the_next_install(
    tmp_path: Path, sources: tuple[Path, Path]
) -> None:
    """Renamed aside, then killed before its deletion: it must not come back, as a model a
    stopped --replace set aside does."""
    models = tmp_path / "models"
    install_model(sources[0], models, "m")
    left = models / f"{model_store.REMOVING_PREFIX}m-{model_store._host_tag()}-999999999-abcd1234"
    (models / "m").rename(left)
    install_model(sources[0], models, "other")
    assert sorted(p.name for p in models.iterdir()) == ["other"]


def test_models_remove_refuses_a_model_another_runs_first_as_its_roi_model(
    tmp_path: Path, sources: tuple[Path, Path]
) -> None:
    """TotalVibeSegmentator runs its ROI model first on each job: removing that one failed
    every job of the other, and nothing said so."""
    data = tmp_path / "var"
    config = tmp_path / "config.yaml"
    config.write_text(f"storage: {{data_dir: {data}}}\n")
    install_model(sources[0], data / "models", "roi")
    install_model(
        make_model(tmp_path / "two", channels=2), data / "models", "vibe2", roi_model="roi"
    )
    refused = _models_cli(config, "remove", "roi")
    assert refused.exit_code == 1
    assert "model(s) vibe2 run it first as their ROI model" in refused.output
    assert (data / "models" / "roi").is_dir()
    assert _models_cli(config, "remove", "roi", "--force").exit_code == 0
