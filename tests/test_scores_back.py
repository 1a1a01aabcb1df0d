"""Large series: every label's scores come back to the series' grid one label at a time.

nnU-Net brings the scores of every label back from the model's grid to the input's before its
argmax: labels x voxels x 2 bytes, 37 GB for TotalSegmentator's `total` (118 labels) on a
512x512x600 CT, after a float64 copy of them all on the model's grid; a job on a usual CT
died of memory. Above ``inference.scores_back_limit_mb`` the node brings them back one label
at a time (``inference.scores_back``). The label map must be nnU-Net's, voxel for voxel: the
built-in demo model, a tiny random model (many ties and borders; anisotropic spacing, so the
separate-z resampling), a region-trained one and one with transposed axes stand for the
published models here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from test_model_folder_variants import REGIONS, _catalogue_file, _edit_dataset
from test_models import TRAINER_DIR, make_model

from dicom_node.config import InferenceSettings
from inference.demo.evaluate_demo import HELD_OUT_SEED
from inference.demo.phantoms import make_phantom
from inference.model_store import ModelInfo, install_model, load_model_info
from inference.predictor import Segmenter
from inference.scores_back import predict_by_label

SWITCHED = "brought back one label at a time"


def _same_as_nnunet(info: ModelInfo, volume: np.ndarray, spacing: tuple[float, ...]) -> None:
    segmenter = Segmenter(info, device="cpu", cpu_threads=1)
    predictor = segmenter._parts[0].predictor
    data = volume[np.newaxis].astype(np.float32)
    theirs = np.asarray(predictor.predict_single_npy_array(data, {"spacing": list(spacing)}))
    ours = predict_by_label(predictor, data, list(spacing))
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape == volume.shape
    assert len(np.unique(theirs)) > 1  # labels to tell apart, not an empty map
    assert np.array_equal(ours, theirs), int((ours != theirs).sum())


def test_the_demo_model_on_a_finer_grid(tmp_path: Path) -> None:
    shape, spacing = (72, 96, 96), (2.0, 4.0 / 3.0, 4.0 / 3.0)
    image, _ = make_phantom(HELD_OUT_SEED + 3, shape, spacing)
    _same_as_nnunet(load_model_info("demo", tmp_path / "models"), image, spacing)


def _random(shape: tuple[int, int, int]) -> np.ndarray:
    return np.random.default_rng(0).normal(300, 100, size=shape).astype(np.float32)


def test_a_random_model_on_an_anisotropic_grid(tmp_path: Path) -> None:
    info = install_model(make_model(tmp_path / "src"), tmp_path / "models")
    _same_as_nnunet(info, _random((10, 40, 36)), (6.5, 1.25, 1.5))  # z resampled apart


def test_a_region_trained_model(tmp_path: Path) -> None:
    src = _edit_dataset(make_model(tmp_path / "src"), labels=REGIONS, regions_class_order=[1, 2, 3])
    catalogue = _catalogue_file(tmp_path / "brats.yaml", ["edema", "necrosis", "enhancing"])
    info = install_model(src, tmp_path / "models", "brats", catalogue=str(catalogue))
    _same_as_nnunet(info, _random((20, 30, 26)), (3.0, 1.25, 1.5))


def test_a_model_with_transposed_axes(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    plans_file = src / TRAINER_DIR / "plans.json"
    plans = json.loads(plans_file.read_text())
    plans["transpose_forward"], plans["transpose_backward"] = [2, 0, 1], [1, 2, 0]
    plans_file.write_text(json.dumps(plans))
    info = install_model(src, tmp_path / "models")
    _same_as_nnunet(info, _random((18, 30, 26)), (3.0, 1.25, 1.5))


def test_the_node_switches_above_the_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    info = load_model_info("demo", tmp_path / "models")
    image, _ = make_phantom(HELD_OUT_SEED, (40, 48, 48), (3.6, 2.67, 2.67))
    caplog.set_level(logging.INFO, logger="inference.predictor")
    # 5 labels x 40 x 48 x 48 voxels x 2 bytes = 0.9 MB: within 100 MB, over 0.
    within = Segmenter(info, InferenceSettings(device="cpu", scores_back_limit_mb=100))
    usual = within.predict(image, (3.6, 2.67, 2.67))
    assert SWITCHED not in caplog.text
    over = Segmenter(info, InferenceSettings(device="cpu", scores_back_limit_mb=0))
    by_label = over.predict(image, (3.6, 2.67, 2.67))
    assert SWITCHED in caplog.text
    assert np.array_equal(usual, by_label)
