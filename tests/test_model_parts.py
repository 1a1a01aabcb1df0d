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

import numpy as np
import pytest
import torch
import yaml
from e2e import dice_against_phantom, offline_cli, phantom_series, segment_json
from test_models import export_zip

from dicom_node.errors import ModelError
from inference.demo.phantoms import make_phantom
from inference.model_store import (
    BUILTIN_MODELS,
    combine_part_hashes,
    install_model,
    load_model_info,
)
from inference.predictor import Segmenter

DEMO_TRAINER = "nnUNetTrainerDemo__nnUNetPlans__3d_demo"
DEMO_IDS = {"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4}
SPACING = (3.0, 2.0, 2.0)
SEEDS = (10000, 10001)  # held out from the demo model's training (inference/demo)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def _parts(base: Path) -> tuple[Path, Path]:
    """Two parts as TotalSegmentator publishes them: each its own dataset and label ids. In
    this order: the cut kidneys part also calls the spleen's voxels kidney_left (it never
    learnt spleen as background), and the organs part after it labels them spleen again."""
    kidneys = demo_part(base, ["kidney_right", "kidney_left"], "Dataset902_Kidneys")
    organs = demo_part(base, ["spleen", "liver"], "Dataset903_Organs")
    return kidneys, organs


def test_parts_make_one_model_labelled_by_the_catalogue(tmp_path: Path) -> None:
    kidneys, organs = _parts(tmp_path / "src")
    models = tmp_path / "models"
    info = install_model([kidneys, organs], models, "combo")
    # Their names together are exactly the demo catalogue's: it is found without --catalogue.
    assert info.descriptor.catalogue == "demo" and info.has_parts
    parts = info.descriptor.parts
    assert parts is not None
    assert [(p.folder, p.source, p.label_map) for p in parts] == [
        ("1-kidneys", "Dataset902_Kidneys", {1: 4, 2: 3}),
        ("2-organs", "Dataset903_Organs", {1: 2, 2: 1}),
    ]
    alone = [install_model(p, models, p.name, catalogue="demo") for p in (kidneys, organs)]
    assert info.weights_sha256 == combine_part_hashes(a.weights_sha256 for a in alone)
    assert info.compute_sha256() == info.weights_sha256
    reversed_order = install_model([organs, kidneys], models, "combo-reversed")
    assert reversed_order.weights_sha256 != info.weights_sha256  # order decides overlaps

    combo = Segmenter(load_model_info("combo", models), device="cpu")
    backwards = Segmenter(reversed_order, device="cpu")
    singles = [Segmenter(a, device="cpu") for a in alone]
    for seed in SEEDS:
        image, truth = make_phantom(seed)
        seg = combo.predict(image, SPACING)
        first, second = (s.predict(image, SPACING) for s in singles)
        expected = first.copy()
        np.copyto(expected, second, where=second != 0)  # the later part wins
        np.testing.assert_array_equal(seg, expected)
        overlap = (first != 0) & (second != 0)
        expected_backwards = second.copy()
        np.copyto(expected_backwards, first, where=first != 0)
        np.testing.assert_array_equal(backwards.predict(image, SPACING), expected_backwards)
        assert (seg[overlap] == second[overlap]).all()
        for name, label in DEMO_IDS.items():
            assert dice(seg == label, truth == label) >= 0.9, (seed, name)


def test_part_labels_outside_the_catalogue_are_refused(tmp_path: Path) -> None:
    kidneys, organs = _parts(tmp_path / "src")
    vertebrae = demo_part(tmp_path / "src", ["liver", "spleen"], "Dataset904_Vertebrae")
    dataset = vertebrae / DEMO_TRAINER / "dataset.json"
    data = json.loads(dataset.read_text())
    data["labels"] = {"background": 0, "vertebrae_L1": 1, "spleen": 2}
    dataset.write_text(json.dumps(data))
    models = tmp_path / "models"
    with pytest.raises(ModelError, match=r"Dataset904_Vertebrae \(part 2\).*'vertebrae_L1'"):
        install_model([organs, vertebrae], models, "m", catalogue="demo")
    with pytest.raises(ModelError, match="needs a name"):
        install_model([organs, kidneys], models)
    with pytest.raises(ModelError, match="trust-label-ids"):
        install_model([organs, kidneys], models, "m", catalogue="demo", trust_label_ids=True)
    two_channels = json.loads((kidneys / DEMO_TRAINER / "dataset.json").read_text())
    two_channels["channel_names"] = {"0": "T1", "1": "T2"}
    (kidneys / DEMO_TRAINER / "dataset.json").write_text(json.dumps(two_channels))
    with pytest.raises(ModelError, match="different inputs"):
        install_model([organs, kidneys], models, "m")
    assert sorted(p.name for p in models.iterdir()) == []  # nothing half-installed
    # Without a catalogue, names no shipped catalogue has get one built in part order.
    built = install_model([organs, vertebrae], models, "built")
    assert [(lab.id, lab.name) for lab in built.catalogue.labels] == [
        (1, "spleen"),
        (2, "liver"),
        (3, "vertebrae_L1"),
    ]
    built_parts = built.descriptor.parts
    assert built_parts is not None
    assert [p.label_map for p in built_parts] == [{1: 1, 2: 2}, {1: 3, 2: 1}]


def test_a_model_yaml_mapping_to_unknown_ids_is_refused_at_load(tmp_path: Path) -> None:
    kidneys, organs = _parts(tmp_path / "src")
    info = install_model([kidneys, organs], tmp_path / "models", "combo")
    descriptor = info.root / "model.yaml"
    raw = yaml.safe_load(descriptor.read_text())
    raw["parts"][1]["label_map"] = {1: 2, 2: 9}
    descriptor.write_text(yaml.safe_dump(raw))
    with pytest.raises(ModelError, match=r"label_map of 2-organs maps to ids \[9\]"):
        load_model_info("combo", tmp_path / "models")
    raw["parts"] = raw["parts"][:1]
    descriptor.write_text(yaml.safe_dump(raw))
    with pytest.raises(ModelError, match="at least two"):
        load_model_info("combo", tmp_path / "models")


@pytest.mark.slow
def test_cli_installs_zipped_parts_and_segments_a_series_with_them(tmp_path: Path) -> None:
    """`models add` with two export zips, `models list/check`, a copy from the installed
    folder, then `segment` of a DICOM series: the SEG's segments sit on the right structures."""
    kidneys, organs = _parts(tmp_path / "src")
    zips = [export_zip(p, tmp_path / f"{p.name}.zip") for p in (kidneys, organs)]
    added = offline_cli(["models", "add", *map(str, zips), "--name", "combo", "--json"], tmp_path)
    assert added.returncode == 0, added.stderr[-3000:]
    summary = json.loads(added.stdout)
    assert summary["catalogue"] == "demo" and summary["labels"] == 4
    assert [p["source"] for p in summary["parts"]] == [z.name for z in zips]
    listed = offline_cli(["models", "list"], tmp_path)
    assert listed.returncode == 0 and "combo" in listed.stdout and "0 | 0" in listed.stdout
    checked = offline_cli(["models", "check", "combo", "--size", "16", "--json"], tmp_path)
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert json.loads(checked.stdout)["weights_sha256_ok"] is True
    installed = tmp_path / "var" / "models" / "combo"
    copied = offline_cli(["models", "add", str(installed), "--name", "copy", "--json"], tmp_path)
    assert copied.returncode == 0, copied.stderr[-3000:]
    assert json.loads(copied.stdout)["weights_sha256"] == summary["weights_sha256"]

    seed = SEEDS[0]
    series = phantom_series(tmp_path / "series", seed)
    out = tmp_path / "out"
    result = segment_json(tmp_path / "series", "copy", out, tmp_path)
    assert {label["name"] for label in result["labels"] if label["ml"] > 0} == set(DEMO_IDS)
    scores = dice_against_phantom(Path(result["seg"]), series, seed)
    assert all(value >= 0.9 for value in scores.values()), scores
