"""Memory and time of bringing a TotalSegmentator-sized model's scores back to a CT's grid.

nnU-Net's ``predict_single_npy_array`` (the peer, measured in the same run) resamples every
label's scores from the model's grid (1.5 mm) to the series' at once; the node, above
``inference.scores_back_limit_mb``, does it one label at a time (``inference.scores_back``).
Both run on the model of ``benchmarks/inference.py`` (118 outputs, 1.5 mm), with the sliding
window replaced by seeded random half-precision scores of the right shape: the step measured
comes after it, and a CPU forward pass of that network over a whole CT takes many minutes
(``benchmarks/inference.py`` measures it). Each way runs in its own process; printed: seconds
and peak resident memory above the loaded model, and whether the label maps are identical.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scores_back.py                 # 240 x 384 x 384
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scores_back.py --shape 300 512 512
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import multiprocessing
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

from inference.model_store import load_model_info
from inference.predictor import Segmenter
from inference.scores_back import predict_by_label

# benchmarks/inference.py, whose name the project's package takes.
_spec = importlib.util.spec_from_file_location(
    "inference_benchmark", Path(__file__).resolve().parent / "inference.py"
)
assert _spec is not None and _spec.loader is not None
_inference_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_inference_benchmark)
build_model, ct_like_volume = _inference_benchmark.build_model, _inference_benchmark.ct_like_volume

SPACING_ZYX = (1.0, 0.8, 0.8)  # a usual thin-slice abdominal CT


def _peak_rss(stop: threading.Event, peak: list[int]) -> None:
    process = psutil.Process()
    while not stop.wait(0.02):
        peak[0] = max(peak[0], process.memory_info().rss)


def _run(way: str, models: str, shape: list[int], out: Any) -> None:
    torch.set_num_threads(1)
    info = load_model_info("total_like", Path(models))
    predictor = Segmenter(info, device="cpu")._parts[0].predictor
    heads = int(predictor.label_manager.num_segmentation_heads)

    def random_scores(data: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return torch.randn((heads, *data.shape[1:]), generator=generator, dtype=torch.half)

    predictor.predict_logits_from_preprocessed_data = random_scores
    volume = ct_like_volume((shape[0], shape[1], shape[2]))[np.newaxis]
    baseline = psutil.Process().memory_info().rss
    stop, peak = threading.Event(), [baseline]
    sampler = threading.Thread(target=_peak_rss, args=(stop, peak), daemon=True)
    sampler.start()
    started = time.perf_counter()
    if way == "nnU-Net":
        labels = np.asarray(
            predictor.predict_single_npy_array(volume, {"spacing": list(SPACING_ZYX)})
        )
    else:
        labels = predict_by_label(predictor, volume, list(SPACING_ZYX))
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    peak[0] = max(peak[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    out.put(
        {
            "seconds": seconds,
            "peak_above_gib": (peak[0] - baseline) / 1024**3,
            "labels_sha256": hashlib.sha256(np.ascontiguousarray(labels).tobytes()).hexdigest(),
            "labels_found": len(np.unique(labels)),
        }
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[240, 384, 384], help="z y x")
    args = parser.parse_args(argv)
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp))
        results = {}
        for way in ("nnU-Net", "node"):
            queue = context.Queue()
            child = context.Process(target=_run, args=(way, f"{tmp}/models", args.shape, queue))
            child.start()
            results[way] = queue.get()
            child.join()
    voxels = int(np.prod(args.shape))
    print(f"CT {tuple(args.shape)} at {SPACING_ZYX} mm ({voxels / 1e6:.1f} M voxels), 118 labels")
    for way, result in results.items():
        print(
            f"{way:8s} {result['seconds']:7.1f} s  peak +{result['peak_above_gib']:.2f} GiB  "
            f"({result['labels_found']} labels found)"
        )
    theirs, ours = results["nnU-Net"], results["node"]
    print(
        f"node / nnU-Net: memory {ours['peak_above_gib'] / theirs['peak_above_gib']:.2f}x, "
        f"time {ours['seconds'] / theirs['seconds']:.2f}x; label maps "
        + ("identical" if ours["labels_sha256"] == theirs["labels_sha256"] else "DIFFER")
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
