r"""Train the demo model: a tiny real nnU-Net v2 model on synthetic phantoms, exported weights-only.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m inference.demo.train_demo \
        --out /tmp/demo_train [--iterations 2000]

Steps: write Dataset901_DemoPhantom (nnU-Net raw layout) from phantoms.py, plan and preprocess it
with nnU-Net's own pipeline, add a small configuration to the plans, train fold 0 with a trainer
defined here, and export the result into ``inference/demo_model`` (``--model-dir``).

Three workarounds for this CPU machine (see shared/PEERS.md): the trainer is instantiated
directly, because nnU-Net's lookup by name imports ``primus/`` (timm -> a broken torchvision);
mirroring is off, because the kidneys differ only by side; and torch runs on one thread, because
nnU-Net's default (one per core) stalls on a shared 2-core machine. Start it with
``OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE`` in the environment: OpenMP reads them when torch is
imported, before this module can set them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoDA import (
    nnUNetTrainerNoDA,
)

from inference.demo.phantoms import LABELS, write_phantom_nifti

logger = logging.getLogger(__name__)

DATASET_ID = 901
DATASET_NAME = f"Dataset{DATASET_ID:03d}_DemoPhantom"
CHANNEL_NAME = "MRI"
PLANS_NAME = "nnUNetPlans"
CONFIGURATION = "3d_demo"
#: Training phantoms use seeds 0..N-1 and validation phantoms the next few; held-out evaluation
#: uses seeds from 10000 on, so nothing evaluated was seen in training.
N_TRAIN = 40
N_VAL = 4
ITERATIONS_PER_EPOCH = 25
DEFAULT_ITERATIONS = 2000
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo_model"
#: The whole default phantom (z, y, x) in one patch: left/right is decided by position, so the
#: network sees both sides of the body at once (PEERS.md: a 32^3 patch lost left/right context).
PATCH_SIZE = [48, 64, 64]
#: Four stages with few features: ~0.9 s per iteration on one CPU thread, a 1.5 MB checkpoint.
#: (Five stages, 8-128, learnt far slower here: liver 0.75 and nothing else after 725 iterations.)
FEATURES_PER_STAGE = [8, 16, 32, 64]
CHECKPOINT_KEYS = (
    "network_weights",
    "init_args",
    "trainer_name",
    "inference_allowed_mirroring_axes",
)

MODEL_YAML = """\
name: demo
version: "1.0"
description: "Tiny nnU-Net v2 model trained on synthetic MR-like phantoms (4 structures); \
for demos and tests only, not for clinical use"
modality: MR
input_channels: ["MRI"]
folds: [0]
checkpoint: checkpoint_final.pth
tile_step_size: 0.5
use_mirroring: false
catalogue: demo
"""


def configure_environment(work_dir: Path) -> None:
    """Point nnU-Net at work_dir and keep it to one thread; nnunetv2 reads its paths lazily."""
    for variable, sub in (
        ("nnUNet_raw", "raw"),
        ("nnUNet_preprocessed", "preprocessed"),
        ("nnUNet_results", "results"),
    ):
        (work_dir / sub).mkdir(parents=True, exist_ok=True)
        os.environ[variable] = str(work_dir / sub)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # One data-loading worker: it runs beside the training thread, on the second core.
    os.environ.setdefault("nnUNet_n_proc_DA", "1")
    os.environ.setdefault("nnUNet_compile", "false")
    torch.set_num_threads(1)


def write_raw_dataset(raw_dir: Path, seeds: list[int]) -> list[str]:
    """Write phantoms in nnU-Net's raw layout; returns the case identifiers."""
    dataset_dir = raw_dir / DATASET_NAME
    if dataset_dir.exists():
        shutil.rmtree(dataset_dir)
    (dataset_dir / "imagesTr").mkdir(parents=True)
    (dataset_dir / "labelsTr").mkdir()
    cases = []
    for seed in seeds:
        case = f"phantom_{seed:05d}"
        write_phantom_nifti(
            seed,
            dataset_dir / "imagesTr" / f"{case}_0000.nii.gz",
            dataset_dir / "labelsTr" / f"{case}.nii.gz",
        )
        cases.append(case)
    dataset_json = {
        "channel_names": {"0": CHANNEL_NAME},
        "labels": LABELS,
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "name": DATASET_NAME,
        "description": "Synthetic MR-like torso phantoms (inference/demo/phantoms.py)",
    }
    (dataset_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    logger.info("Wrote %d phantoms to %s", len(cases), dataset_dir)
    return cases


def plan_and_preprocess() -> None:
    """The Python equivalent of ``nnUNetv2_plan_and_preprocess -d 901 -c 3d_fullres -np 2``."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    extract_fingerprints([DATASET_ID], num_processes=2, check_dataset_integrity=True)
    plan_experiments([DATASET_ID])
    preprocess([DATASET_ID], PLANS_NAME, configurations=("3d_fullres",), num_processes=(2,))


def add_demo_configuration(plans_path: Path) -> dict[str, Any]:
    """Add CONFIGURATION to the plans: 3d_fullres data, a 4-stage network with few features."""
    plans: dict[str, Any] = json.loads(plans_path.read_text())
    fullres = plans["configurations"]["3d_fullres"]
    arch = json.loads(json.dumps(fullres["architecture"]))  # a deep copy
    kwargs = arch["arch_kwargs"]
    n_stages = len(FEATURES_PER_STAGE)
    # Keep nnU-Net's planned kernels and strides (anisotropy-aware) for the first stages only.
    kwargs["n_stages"] = n_stages
    kwargs["features_per_stage"] = FEATURES_PER_STAGE
    kwargs["kernel_sizes"] = kwargs["kernel_sizes"][:n_stages]
    kwargs["strides"] = kwargs["strides"][:n_stages]
    kwargs["n_conv_per_stage"] = kwargs["n_conv_per_stage"][:n_stages]
    kwargs["n_conv_per_stage_decoder"] = kwargs["n_conv_per_stage_decoder"][: n_stages - 1]
    plans["configurations"][CONFIGURATION] = {
        "inherits_from": "3d_fullres",
        "patch_size": PATCH_SIZE,
        "batch_size": 2,
        "architecture": arch,
    }
    plans_path.write_text(json.dumps(plans, indent=2))
    logger.info("Added configuration %s: %s", CONFIGURATION, kwargs)
    return plans


def write_split(preprocessed_dir: Path, train: list[str], val: list[str]) -> None:
    """Fold 0 trains on all training phantoms and validates on a few extra ones."""
    splits = [{"train": train, "val": val}]
    (preprocessed_dir / "splits_final.json").write_text(json.dumps(splits, indent=2))


class nnUNetTrainerDemo(nnUNetTrainerNoDA):  # type: ignore[misc]
    """nnU-Net without data augmentation (and so without mirroring), in short epochs.

    No augmentation because held-out phantoms come from the same generator as the training ones
    and, on this CPU, it converges in far fewer iterations (PEERS.md: 0.95 pseudo-Dice after 1,000
    iterations, against ~0.9 after 1,500 with the default augmentation). The base class also
    sets ``inference_allowed_mirroring_axes = None``: mirroring would swap the kidneys.
    """

    def __init__(
        self,
        plans: dict[str, Any],
        configuration: str,
        fold: int,
        dataset_json: dict[str, Any],
        device: torch.device = torch.device("cpu"),  # noqa: B008 - nnU-Net's signature
    ) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        # Short epochs: progress and pseudo-Dice in the log every ~30 s on this CPU.
        self.num_iterations_per_epoch = ITERATIONS_PER_EPOCH
        self.num_val_iterations_per_epoch = 5
        self.save_every = 10


def train(
    plans: dict[str, Any], dataset_json: dict[str, Any], iterations: int, *, resume: bool = False
) -> Path:
    """Train fold 0 up to ``iterations`` in all; returns the folder with checkpoint_final.pth.

    With ``resume`` it continues the run already in the results folder (interrupted, or finished
    with fewer iterations): the learning rate then follows the schedule of the new total.
    """
    # The CLI sets this key; the trainer pops it (True also appends to the existing logs).
    plans = {**plans, "continue_training": resume}
    trainer = nnUNetTrainerDemo(plans, CONFIGURATION, 0, dataset_json, device=torch.device("cpu"))
    # Before initialize(): the learning-rate schedule is built from num_epochs.
    trainer.num_epochs = max(1, math.ceil(iterations / ITERATIONS_PER_EPOCH))
    fold_dir = Path(trainer.output_folder)
    if resume:
        # checkpoint_latest.pth exists only while a run is unfinished (deleted at its end).
        latest = fold_dir / "checkpoint_latest.pth"
        checkpoint = latest if latest.exists() else fold_dir / "checkpoint_final.pth"
        trainer.load_checkpoint(str(checkpoint))
        logger.info("Resuming from %s at epoch %d", checkpoint.name, trainer.current_epoch)
    logger.info("Training %s for %d epochs", type(trainer).__name__, trainer.num_epochs)
    trainer.run_training()
    return fold_dir


def export_model(results_fold_dir: Path, model_dir: Path) -> Path:
    """Copy plans, dataset.json and a weights-only checkpoint into the project's model layout."""
    source = results_fold_dir.parent
    target = model_dir / "nnunet" / source.name
    if target.exists():
        shutil.rmtree(target)
    (target / "fold_0").mkdir(parents=True)
    shutil.copyfile(source / "plans.json", target / "plans.json")
    shutil.copyfile(source / "dataset.json", target / "dataset.json")
    checkpoint = torch.load(
        results_fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False
    )
    slim = {key: checkpoint[key] for key in CHECKPOINT_KEYS}
    # A plain string instead of torch.device keeps the file loadable with weights_only=True.
    slim["init_args"] = {**slim["init_args"], "device": "cpu"}
    torch.save(slim, target / "fold_0" / "checkpoint_final.pth")
    (model_dir / "model.yaml").write_text(MODEL_YAML)
    logger.info("Exported the model to %s", target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="nnU-Net working directory")
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out (same data and plans) up to --iterations in all",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    started = time.monotonic()
    work_dir: Path = args.out.resolve()
    configure_environment(work_dir)
    preprocessed = work_dir / "preprocessed" / DATASET_NAME
    plans_path = preprocessed / f"{PLANS_NAME}.json"
    if args.resume:
        plans = json.loads(plans_path.read_text())
    else:
        cases = write_raw_dataset(work_dir / "raw", list(range(N_TRAIN + N_VAL)))
        plan_and_preprocess()
        plans = add_demo_configuration(plans_path)
        write_split(preprocessed, cases[:N_TRAIN], cases[N_TRAIN:])
        logger.info("Prepared the dataset in %.0f s", time.monotonic() - started)
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())

    fold_dir = train(plans, dataset_json, args.iterations, resume=args.resume)
    export_model(fold_dir, args.model_dir)
    logger.info("Done in %.0f s", time.monotonic() - started)


if __name__ == "__main__":
    main()
