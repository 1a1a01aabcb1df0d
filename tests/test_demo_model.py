"""The committed demo model: a real nnU-Net v2 model that segments held-out phantoms well."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
import yaml
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from inference.demo.evaluate_demo import (
    DEFAULT_MODEL_DIR,
    HELD_OUT_SEED,
    dice_per_label,
    load_demo_predictor,
    predict,
)
from inference.demo.phantoms import make_phantom

HELD_OUT_SEEDS = [HELD_OUT_SEED, HELD_OUT_SEED + 1, HELD_OUT_SEED + 2]
STRUCTURES = ["liver", "spleen", "kidney_left", "kidney_right"]


@pytest.fixture(scope="module")
def predictor() -> Iterator[nnUNetPredictor]:
    # One thread: the suite shares a small CPU, and nnU-Net would otherwise take every core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_demo_predictor()
    torch.set_num_threads(threads)


def test_model_folder_is_small_and_weights_only() -> None:
    model = yaml.safe_load((DEFAULT_MODEL_DIR / "model.yaml").read_text())
    assert model["name"] == "demo"
    assert model["use_mirroring"] is False
    assert model["input_channels"] == ["MRI"]
    (trained,) = (DEFAULT_MODEL_DIR / "nnunet").iterdir()
    assert sorted(p.name for p in trained.iterdir()) == ["dataset.json", "fold_0", "plans.json"]
    checkpoint_path = trained / "fold_0" / model["checkpoint"]
    assert checkpoint_path.stat().st_size < 6_000_000
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    assert set(checkpoint) == {
        "network_weights",
        "init_args",
        "trainer_name",
        "inference_allowed_mirroring_axes",
    }
    # Mirroring would swap the kidneys: the trainer must have recorded that it is not allowed.
    assert checkpoint["inference_allowed_mirroring_axes"] is None


def test_held_out_phantoms_reach_dice_090_per_structure(predictor: nnUNetPredictor) -> None:
    scores: dict[str, list[float]] = {name: [] for name in STRUCTURES}
    for seed in HELD_OUT_SEEDS:
        image, labels = make_phantom(seed)
        for name, value in dice_per_label(predict(predictor, image), labels).items():
            scores[name].append(value)
    means = {name: float(np.mean(values)) for name, values in scores.items()}
    assert all(mean >= 0.90 for mean in means.values()), scores
    # No single case may lose a structure (or confuse the kidneys' sides) outright.
    assert all(min(values) >= 0.80 for values in scores.values()), scores


def test_finer_rendering_of_the_same_field_of_view(predictor: nnUNetPredictor) -> None:
    # nnU-Net resamples the input to the training spacing; DICOM series come in many resolutions.
    shape, spacing = (72, 96, 96), (2.0, 4.0 / 3.0, 4.0 / 3.0)
    image, labels = make_phantom(HELD_OUT_SEED + 3, shape, spacing)
    segmentation = predict(predictor, image, spacing)
    assert segmentation.shape == shape
    dice = dice_per_label(segmentation, labels)
    assert all(value >= 0.85 for value in dice.values()), dice
