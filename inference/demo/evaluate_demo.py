"""Evaluate the exported demo model on held-out phantoms: per-structure Dice, mean and worst.

    .venv/bin/python -m inference.demo.evaluate_demo [--model-dir inference/demo_model] [--cases 10]

The predictor is built from the exported files alone (plans, dataset.json, weights-only
checkpoint) with ``get_network_from_plans`` and ``nnUNetPredictor.manual_initialization``:
nnU-Net's ``initialize_from_trained_model_folder`` looks the trainer up by name, which imports
``primus/`` and crashes on this machine (shared/PEERS.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import yaml
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from inference.demo.phantoms import DEFAULT_SPACING, LABELS, make_phantom

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo_model"
#: Training used seeds 0..43; held-out evaluation starts far away from them.
HELD_OUT_SEED = 10000


def load_demo_predictor(model_dir: Path = DEFAULT_MODEL_DIR) -> nnUNetPredictor:
    """Build a CPU predictor for the model in ``model_dir`` (model.yaml + nnunet/<trainer dir>)."""
    model = yaml.safe_load((model_dir / "model.yaml").read_text())
    (trained,) = sorted((model_dir / "nnunet").iterdir())  # exactly one trained configuration
    plans = json.loads((trained / "plans.json").read_text())
    dataset_json = json.loads((trained / "dataset.json").read_text())
    (fold,) = model["folds"]
    checkpoint: dict[str, Any] = torch.load(
        trained / f"fold_{fold}" / model["checkpoint"], map_location="cpu", weights_only=True
    )
    configuration = checkpoint["init_args"]["configuration"]
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    label_manager = plans_manager.get_label_manager(dataset_json)
    network = get_network_from_plans(
        configuration_manager.network_arch_class_name,
        configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        label_manager.num_segmentation_heads,
        allow_init=False,
        deep_supervision=False,
    )
    network.load_state_dict(checkpoint["network_weights"])
    predictor = nnUNetPredictor(
        tile_step_size=float(model["tile_step_size"]),
        use_mirroring=bool(model["use_mirroring"]),
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    predictor.manual_initialization(
        network,
        plans_manager,
        configuration_manager,
        [checkpoint["network_weights"]],
        dataset_json,
        checkpoint["trainer_name"],
        checkpoint["inference_allowed_mirroring_axes"],
    )
    return predictor


def predict(
    predictor: nnUNetPredictor,
    image: npt.NDArray[np.float32],
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
) -> npt.NDArray[np.uint8]:
    """Segment a (z, y, x) image with (z, y, x) spacing, as SimpleITK arrays come."""
    segmentation = predictor.predict_single_npy_array(
        image[np.newaxis].astype(np.float32), {"spacing": list(spacing)}
    )
    return np.asarray(segmentation, dtype=np.uint8)


def dice_per_label(
    prediction: npt.NDArray[np.uint8], reference: npt.NDArray[np.uint8]
) -> dict[str, float]:
    """Dice of each foreground label; 1.0 when a label is absent from both."""
    scores = {}
    for name, value in LABELS.items():
        if value == 0:
            continue
        predicted, expected = prediction == value, reference == value
        total = int(predicted.sum() + expected.sum())
        scores[name] = 1.0 if total == 0 else 2.0 * float((predicted & expected).sum()) / total
    return scores


def evaluate(predictor: nnUNetPredictor, seeds: list[int]) -> dict[str, list[float]]:
    """Dice per structure for each held-out seed."""
    scores: dict[str, list[float]] = {name: [] for name in LABELS if name != "background"}
    for seed in seeds:
        image, labels = make_phantom(seed)
        started = time.monotonic()
        dice = dice_per_label(predict(predictor, image), labels)
        logger.info(
            "seed %d (%.1f s): %s",
            seed,
            time.monotonic() - started,
            " ".join(f"{k}={v:.3f}" for k, v in dice.items()),
        )
        for name, value in dice.items():
            scores[name].append(value)
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--cases", type=int, default=10)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)

    predictor = load_demo_predictor(args.model_dir)
    seeds = list(range(HELD_OUT_SEED, HELD_OUT_SEED + args.cases))
    scores = evaluate(predictor, seeds)
    # The result is the point of this script: print it, whatever the logging configuration.
    print(f"Held-out phantoms: seeds {seeds[0]}..{seeds[-1]}")
    print(f"{'structure':<14}{'mean':>8}{'worst':>8}")
    for name, values in scores.items():
        print(f"{name:<14}{np.mean(values):>8.3f}{np.min(values):>8.3f}")


if __name__ == "__main__":
    main()
