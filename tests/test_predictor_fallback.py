"""CUDA out-of-memory falls back to CPU logits, then to the CPU, instead of failing the job.

MOCK: there is no GPU on this machine or in CI, so nnU-Net's predictor running on a GPU is
replaced by a stand-in that raises torch.cuda.OutOfMemoryError the way it would. Everything
around it (the Segmenter's fallback logic) is the real code.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from test_models import make_model

from inference.log_context import log_label
from inference.model_store import install_model
from inference.predictor import Segmenter


class GpuPredictorStandIn:
    """Behaves like nnUNetPredictor on a GPU too small for the volume at the given step."""

    def __init__(self, *, fails_on_device: bool, fails_with_cpu_logits: bool) -> None:
        self.device = torch.device("cuda")
        self.perform_everything_on_device = True
        self.fails_on_device = fails_on_device
        self.fails_with_cpu_logits = fails_with_cpu_logits
        self.calls: list[tuple[str, bool]] = []
        self.network = self
        # As nnUNetPredictor's: the Segmenter sizes the scores brought back by it.
        self.label_manager = SimpleNamespace(num_segmentation_heads=2)

    def to(self, device: Any) -> GpuPredictorStandIn:  # network.to(device)
        return self

    def predict_single_npy_array(self, data: np.ndarray, props: dict[str, Any]) -> np.ndarray:
        self.calls.append((self.device.type, self.perform_everything_on_device))
        if self.device.type == "cuda":
            if self.perform_everything_on_device and self.fails_on_device:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (stand-in)")
            if not self.perform_everything_on_device and self.fails_with_cpu_logits:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (stand-in)")
        return np.ones(data.shape[1:], dtype=np.uint8)


@pytest.fixture
def segmenter(tmp_path: Path) -> Segmenter:
    info = install_model(make_model(tmp_path / "src"), tmp_path / "models")
    seg = Segmenter(info, device="cpu", cpu_threads=1)
    # As if built on a GPU machine (options are a frozen dataclass).
    seg.options = dataclasses.replace(seg.options, device=torch.device("cuda"))
    return seg


VOLUME = np.zeros((8, 8, 8), dtype=np.float32)


def _use(segmenter: Segmenter, stand_in: GpuPredictorStandIn) -> None:
    """Put the stand-in where the model's (only) nnU-Net predictor is."""
    segmenter._parts[0] = dataclasses.replace(segmenter._parts[0], predictor=stand_in)


def test_out_of_memory_retries_with_logits_on_the_cpu(
    segmenter: Segmenter, caplog: pytest.LogCaptureFixture
) -> None:
    stand_in = GpuPredictorStandIn(fails_on_device=True, fails_with_cpu_logits=False)
    _use(segmenter, stand_in)
    caplog.set_level(logging.INFO, logger="inference")
    with log_label("job 7 series 1.2.3 v1"):  # as the worker labels a job's inference
        assert segmenter.predict(VOLUME, (1.0, 1.0, 1.0)).shape == VOLUME.shape
    assert stand_in.calls == [("cuda", True), ("cuda", False)]
    assert stand_in.perform_everything_on_device is True  # restored for the next volume
    assert "job 7 series 1.2.3 v1: model tiny: CUDA out of memory" in caplog.text
    assert "job 7 series 1.2.3 v1: model tiny segmented" in caplog.text


def test_still_out_of_memory_runs_on_the_cpu_then_returns_to_the_gpu(segmenter: Segmenter) -> None:
    stand_in = GpuPredictorStandIn(fails_on_device=True, fails_with_cpu_logits=True)
    _use(segmenter, stand_in)
    assert segmenter.predict(VOLUME, (1.0, 1.0, 1.0)).shape == VOLUME.shape
    assert stand_in.calls == [("cuda", True), ("cuda", False), ("cpu", False)]
    assert stand_in.device.type == "cuda" and stand_in.perform_everything_on_device is True
