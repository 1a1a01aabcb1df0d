"""Models whose label ids are not the catalogue's, on real networks cut from the demo model.

A "part" here is the demo network with only some of its output channels kept (the seg
layers sliced), saved as its own nnU-Net v2 model with its own dataset.json: a real model
with its own label ids, as each part of TotalSegmentator is. The parts were not trained with
the other structures as background, so near a structure they lost, they are less sure than
a trained part would be; the thresholds below allow for that, not for a wrong label.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from inference.demo.phantoms import make_phantom
from inference.model_store import BUILTIN_MODELS, install_model
from inference.predictor import Segmenter

DEMO_TRAINER = "nnUNetTrainerDemo__nnUNetPlans__3d_demo"
DEMO_IDS = {"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4}
SPACING = (3.0, 2.0, 2.0)
SEEDS = (10000, 10001)  # held out from the demo model's training (inference/demo)


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def demo_part(out: Path, names: Sequence[str], dataset_name: str) -> Path:
    """``<out>/<dataset_name>/<trainer folder>``: the demo network predicting ``names`` only,
    as labels 1..n in the order given. Returns ``<out>/<dataset_name>``."""
    source = BUILTIN_MODELS["demo"] / "nnunet" / DEMO_TRAINER
    folder = out / dataset_name / DEMO_TRAINER
    (folder / "fold_0").mkdir(parents=True)
    shutil.copyfile(source / "plans.json", folder / "plans.json")
    dataset = json.loads((source / "dataset.json").read_text())
    dataset["labels"] = {"background": 0, **{n: i + 1 for i, n in enumerate(names)}}
    dataset["name"] = dataset_name
    (folder / "dataset.json").write_text(json.dumps(dataset))
    checkpoint = torch.load(
        source / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False
    )
    keep = torch.tensor([0, *(DEMO_IDS[n] for n in names)])
    weights = checkpoint["network_weights"]
    for key in [k for k in weights if ".seg_layers." in k]:
        weights[key] = weights[key][keep].clone()
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    return folder.parent


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum() + b.sum())
    return 2.0 * float((a & b).sum()) / total if total else 1.0


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the structure's voxels given its label: a cut part's extra voxels next to a
    structure it lost do not lower it, a wrong label does."""
    return float((found & truth).sum()) / max(1, int(truth.sum()))


def test_one_part_with_the_full_catalogue_gets_the_catalogues_ids(tmp_path: Path) -> None:
    # The kidneys' part says 1 = kidney_right, 2 = kidney_left; in the demo catalogue 1 and 2
    # are liver and spleen. Installed with that catalogue, the SEG must still say kidney.
    part = demo_part(tmp_path / "src", ["kidney_right", "kidney_left"], "Dataset902_Kidneys")
    info = install_model(part, tmp_path / "models", "kidneys", catalogue="demo")
    assert info.descriptor.label_map == {1: 4, 2: 3}
    segmenter = Segmenter(info, device="cpu")
    for seed in SEEDS:
        image, truth = make_phantom(seed)
        seg = segmenter.predict(image, SPACING)
        assert set(np.unique(seg)) == {0, 3, 4}
        for name in ("kidney_left", "kidney_right"):
            label = DEMO_IDS[name]
            assert recall(seg == label, truth == label) >= 0.9, (seed, name)
            assert dice(seg == label, truth == label) >= 0.6, (seed, name)
