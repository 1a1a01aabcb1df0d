"""Inference cost of a TotalSegmentator-sized nnU-Net v2 model through ``Segmenter.predict``.

The model folder has TotalSegmentator ``total``'s 3d_fullres architecture (nnU-Net v2 plans):
PlainConvUNet, 6 stages with 32-64-128-256-320-320 features, strides 1-2-2-2-2-2, 3x3x3 kernels,
2 convolutions per stage in encoder and decoder, patch 128^3, 1.5 mm isotropic spacing, CT
normalisation, and one output per label of the shipped ``total`` catalogue (117 + background).
Weights are random: the cost of a forward pass does not depend on them. It is installed with
the project's ``install_model`` and run as the worker runs it (step 0.8, no mirroring).

The input is a CT-like volume at the model's spacing (1.5 mm), so nnU-Net does not resample:
the figures are the sliding window itself plus nnU-Net's pre/post-processing. Printed: seconds,
peak resident memory (psutil sampling every 20 ms and ``ru_maxrss``), sliding-window tiles; with
``--device cuda`` also the GPU time and ``torch.cuda.max_memory_allocated``. With ``--extrapolate``
the time and memory for another shape are estimated from this run (time per tile, memory per
voxel above the baseline), for a shape too large for the machine.

    .venv/bin/python benchmarks/inference.py                          # 300 x 400 x 400 (z, y, x)
    .venv/bin/python benchmarks/inference.py --shape 160 224 224 --threads 2 \\
        --extrapolate 300 400 400
    .venv/bin/python benchmarks/inference.py --device cuda

Memory note: nnU-Net accumulates half-precision logits for every label over the whole volume
(118 x 2 bytes per voxel), so 300 x 400 x 400 needs ~11 GB for them alone, more for argmax.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.catalogue import load_catalogue
from inference.model_store import ModelInfo, install_model
from inference.predictor import Segmenter

PATCH = (128, 128, 128)
SPACING_MM = 1.5
STEP = 0.8
TRAINER_DIR = "nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres"
FEATURES = [32, 64, 128, 256, 320, 320]


def _plans() -> dict[str, Any]:
    n = len(FEATURES)
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n,
            "features_per_stage": FEATURES,
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * n,
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
            "n_conv_per_stage": [2] * n,
            "n_conv_per_stage_decoder": [2] * (n - 1),
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    resample = "resample_data_or_seg_to_shape"
    resampling = {"order_z": 0, "force_separate_z": None}
    config = {
        "data_identifier": "nnUNetPlans_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": list(PATCH),
        "median_image_size_in_voxels": [300, 400, 400],
        "spacing": [SPACING_MM] * 3,
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": resample,
        "resampling_fn_seg": resample,
        "resampling_fn_probabilities": resample,
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, **resampling},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, **resampling},
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, **resampling},
        "architecture": arch,
        "batch_dice": False,
    }
    return {
        "dataset_name": "Dataset291_TotalSegmentatorLike",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [SPACING_MM] * 3,
        "original_median_shape_after_transp": [300, 400, 400],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": config},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 3000.0,
                "mean": 100.0,
                "median": 60.0,
                "min": -1024.0,
                "percentile_00_5": -1000.0,
                "percentile_99_5": 1500.0,
                "std": 300.0,
            }
        },
    }


def build_model(base: Path) -> ModelInfo:
    """Write the trainer folder with random weights and install it as model ``total_like``."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    catalogue = load_catalogue("total")
    labels = {"background": 0, **{label.name: label.id for label in catalogue.labels}}
    dataset = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1200}
    dataset["file_ending"] = ".nii.gz"
    plans = _plans()
    folder = base / "src" / "Dataset291_TotalSegmentatorLike" / TRAINER_DIR
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(0)
    network = get_network_from_plans(
        arch["network_class_name"],
        arch["arch_kwargs"],
        arch["_kw_requires_import"],
        1,
        len(labels),
        allow_init=True,
        deep_supervision=False,
    )
    checkpoint = {
        "network_weights": network.state_dict(),
        "trainer_name": "nnUNetTrainerNoMirroring",
        "inference_allowed_mirroring_axes": None,
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0},
    }
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    parameters = sum(p.numel() for p in network.parameters())
    print(f"model: {parameters / 1e6:.1f} M parameters, {len(labels)} outputs")
    return install_model(
        folder.parent,
        base / "models",
        "total_like",
        catalogue="total",
        modality="CT",
        tile_step_size=STEP,
        use_mirroring=False,
    )


def ct_like_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Air around an elliptic body of soft tissue with some bone-bright blobs, HU, float32."""
    z, y, x = (np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape)
    body = (x[None, None, :] / 0.8) ** 2 + (y[None, :, None] / 0.6) ** 2 <= 1.0
    volume = np.where(body, np.float32(40.0), np.float32(-1000.0))
    volume = np.broadcast_to(volume, shape).copy()
    rng = np.random.default_rng(seed)
    volume += rng.normal(0.0, 20.0, size=shape).astype(np.float32)
    spine = (x[None, None, :] ** 2 + (y[None, :, None] - 0.35) ** 2) <= 0.01
    volume[np.broadcast_to(spine, shape)] += 600.0
    _ = z
    return volume


def sliding_window_tiles(shape: tuple[int, int, int]) -> int:
    """nnU-Net's compute_steps_for_sliding_window: tiles per axis multiplied."""
    tiles = 1
    for size, patch in zip(shape, PATCH, strict=True):
        tiles *= 1 if size <= patch else math.ceil((size - patch) / (patch * STEP)) + 1
    return tiles


class PeakRss:
    """Samples this process's resident memory in a thread (ru_maxrss covers the whole life)."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def measure(segmenter: Segmenter, shape: tuple[int, int, int], cuda: bool) -> dict[str, float]:
    """One ``predict`` of a CT-like volume: seconds, RSS before and at peak (bytes)."""
    volume = ct_like_volume(shape)
    tiles = sliding_window_tiles(shape)
    print(
        f"input {shape} (z, y, x) at {SPACING_MM} mm = {volume.size / 1e6:.1f} M voxels, "
        f"{tiles} tiles of {PATCH} at step {STEP}"
    )
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = psutil.Process().memory_info().rss
    with PeakRss() as rss:
        started = time.perf_counter()
        labels = segmenter.predict(volume, (SPACING_MM,) * 3)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    if labels.shape != shape:
        raise RuntimeError(f"label map shape {labels.shape} for input {shape}")
    gib = 1024.0**3
    print(f"  predict: {seconds:.1f} s ({seconds / tiles:.2f} s per tile)")
    print(
        f"  RSS: before {baseline / gib:.2f} GiB, peak {rss.peak / gib:.2f} GiB "
        f"(+{(rss.peak - baseline) / gib:.2f} GiB)"
    )
    if cuda:
        print(f"  GPU max_memory_allocated: {torch.cuda.max_memory_allocated() / gib:.2f} GiB")
    return {
        "seconds": seconds,
        "tiles": tiles,
        "voxels": float(volume.size),
        "baseline": float(baseline),
        "peak": float(rss.peak),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[300, 400, 400], help="z y x")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    parser.add_argument(
        "--extrapolate",
        type=int,
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="also run one 128^3 tile and estimate this shape from the two runs",
    )
    args = parser.parse_args(argv)
    shape = (args.shape[0], args.shape[1], args.shape[2])
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    gib = 1024.0**3

    with tempfile.TemporaryDirectory() as tmp:
        info = build_model(Path(tmp))
        started = time.perf_counter()
        segmenter = Segmenter(info, device=args.device, tile_step_size=STEP, use_mirroring=False)
        print(
            f"segmenter ready in {time.perf_counter() - started:.1f} s on {segmenter.device}; "
            f"torch threads {torch.get_num_threads()}, cpu cores {os.cpu_count()}"
        )
        if cuda:
            # One patch first: CUDA context, cuDNN algorithm choice and the allocator warm up.
            segmenter.predict(ct_like_volume(PATCH), (SPACING_MM,) * 3)
        small = measure(segmenter, PATCH, cuda) if args.extrapolate else None
        run = measure(segmenter, shape, cuda)
        max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB
        print(f"ru_maxrss (whole process): {max_rss / gib:.2f} GiB")
        if args.extrapolate and small is not None:
            target = (args.extrapolate[0], args.extrapolate[1], args.extrapolate[2])
            tiles = sliding_window_tiles(target)
            estimate_s = run["seconds"] / run["tiles"] * tiles
            # Peak above the baseline = network activations for one tile (constant) + buffers
            # proportional to the volume (logits per label, input, label map): a line through
            # the two runs.
            small_delta = small["peak"] - small["baseline"]
            per_voxel = (run["peak"] - run["baseline"] - small_delta) / (
                run["voxels"] - small["voxels"]
            )
            constant = small_delta - per_voxel * small["voxels"]
            estimate_rss = run["baseline"] + constant + per_voxel * float(np.prod(target))
            print(
                f"extrapolated to {target}: {tiles} tiles, ~{estimate_s:.0f} s "
                f"(~{estimate_s / 60:.1f} min); {per_voxel:.0f} bytes per voxel, "
                f"peak RSS ~{estimate_rss / gib:.1f} GiB"
            )


if __name__ == "__main__":
    main()
