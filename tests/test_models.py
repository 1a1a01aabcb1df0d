"""Model folders, install and the segmenter, on a tiny real nnU-Net v2 model with random weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from dicom_node.errors import ModelError
from inference.model_folder import compute_weights_sha256, find_nnunet_folder
from inference.model_store import install_model, list_models, load_model_info
from inference.predictor import Segmenter

TRAINER_DIR = "nnUNetTrainer__nnUNetPlans__3d_fullres"
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _plans(channels: int = 1) -> dict[str, Any]:
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": 3,
            "features_per_stage": [4, 8, 16],
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * 3,
            "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
            "n_conv_per_stage": [2, 2, 2],
            "n_conv_per_stage_decoder": [2, 2],
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
    config = {
        "data_identifier": "nnUNetPlans_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": [16, 16, 16],
        "median_image_size_in_voxels": [24, 24, 24],
        "spacing": [2.0, 2.0, 2.0],
        # A second channel is a label map (TotalVibeSegmentator's ROI input): not normalised.
        "normalization_schemes": ["ZScoreNormalization"] + ["NoNormalization"] * (channels - 1),
        "use_mask_for_norm": [False] * channels,
        "resampling_fn_data": resample,
        "resampling_fn_seg": resample,
        "resampling_fn_probabilities": resample,
        "resampling_fn_data_kwargs": {
            "is_seg": False,
            "order": 3,
            "order_z": 0,
            "force_separate_z": None,
        },
        "resampling_fn_seg_kwargs": {
            "is_seg": True,
            "order": 1,
            "order_z": 0,
            "force_separate_z": None,
        },
        "resampling_fn_probabilities_kwargs": {
            "is_seg": False,
            "order": 1,
            "order_z": 0,
            "force_separate_z": None,
        },
        "architecture": arch,
        "batch_dice": False,
    }
    return {
        "dataset_name": "Dataset999_Tiny",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [2.0, 2.0, 2.0],
        "original_median_shape_after_transp": [24, 24, 24],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": config},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(c): {
                "max": 1000.0,
                "mean": 300.0,
                "median": 300.0,
                "min": 0.0,
                "percentile_00_5": 10.0,
                "percentile_99_5": 900.0,
                "std": 100.0,
            }
            for c in range(channels)
        },
    }


DATASET = {
    "channel_names": {"0": "MRI"},
    "labels": {"background": 0, "liver": 1, "spleen": 2},
    "numTraining": 1,
    "file_ending": ".nii.gz",
}


def _weights(seed: int, channels: int = 1) -> dict[str, torch.Tensor]:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(seed)
    kw = _plans()["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    net = PlainConvUNet(
        input_channels=channels,
        num_classes=3,
        n_stages=3,
        features_per_stage=kw["features_per_stage"],
        conv_op=torch.nn.Conv3d,
        kernel_sizes=kw["kernel_sizes"],
        strides=kw["strides"],
        n_conv_per_stage=kw["n_conv_per_stage"],
        n_conv_per_stage_decoder=kw["n_conv_per_stage_decoder"],
        conv_bias=True,
        norm_op=torch.nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=torch.nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=True,  # as trained; the keys are the same without it
    )
    return net.state_dict()


def make_model(
    base: Path, folds: tuple[int, ...] = (0,), weights_only: bool = False, channels: int = 1
) -> Path:
    """Write Dataset999_Tiny/<trainer>__<plans>__3d_fullres under ``base``; return its parent.
    ``channels`` 2: the second input is a label map (as TotalVibeSegmentator's ROI input)."""
    folder = base / "Dataset999_Tiny" / TRAINER_DIR
    folder.mkdir(parents=True)
    plans = _plans(channels)
    dataset = dict(DATASET)
    if channels == 2:
        dataset["channel_names"] = {"0": "MRI", "1": "noNorm"}
        dataset["roi"] = 278
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    for fold in folds:
        (folder / f"fold_{fold}").mkdir()
        ckpt: dict[str, Any] = {
            "network_weights": _weights(seed=fold, channels=channels),
            "trainer_name": "nnUNetTrainer",
            "inference_allowed_mirroring_axes": (0, 1, 2),
            "init_args": {
                "plans": plans,
                "configuration": "3d_fullres",
                "fold": fold,
                "dataset_json": dataset,
            },
        }
        if not weights_only:
            # nnU-Net's full checkpoints carry numpy values: these need weights_only=False.
            ckpt.update(
                {
                    "optimizer_state": {},
                    "grad_scaler_state": None,
                    "current_epoch": 1,
                    "logging": {"mean_fg_dice": [np.float64(0.5)]},
                    "_best_ema": np.float64(0.5),
                }
            )
        torch.save(ckpt, folder / f"fold_{fold}" / "checkpoint_final.pth")
        (folder / f"fold_{fold}" / "progress.png").write_bytes(b"\x89PNG")
    return folder.parent


def export_zip(dataset_dir: Path, out: Path) -> Path:
    """Zip as nnUNetv2_export_model_to_zip does: paths relative to nnUNet_results."""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(dataset_dir.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(dataset_dir.parent).as_posix())
    return out


def test_install_from_folder(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    info = install_model(src, tmp_path / "models")
    assert info.name == "tiny"
    assert info.folds == [0]
    assert info.descriptor.configuration == "3d_fullres"
    assert info.descriptor.trainer == "nnUNetTrainer"
    assert info.descriptor.input_channels == ["MRI"]
    assert info.descriptor.modality == "MR"
    assert [lab.name for lab in info.catalogue.labels] == ["liver", "spleen"]
    # Known names take the shipped SNOMED CT codes.
    assert info.catalogue.label(1).type.code == "10200004"
    written = yaml.safe_load((tmp_path / "models" / "tiny" / "model.yaml").read_text())
    assert written["weights_sha256"] == info.weights_sha256
    assert (tmp_path / "models" / "tiny" / "nnunet" / "fold_0" / "checkpoint_final.pth").is_file()
    assert not (tmp_path / "models" / "tiny" / "nnunet" / "fold_0" / "progress.png").exists()
    assert [m.name for m in list_models(tmp_path / "models") if not m.builtin] == ["tiny"]
    assert load_model_info("tiny", tmp_path / "models").weights_sha256 == info.weights_sha256
    with pytest.raises(ModelError, match=r"already installed .*models add --replace"):
        install_model(src, tmp_path / "models")  # the message names the way out
    assert install_model(src, tmp_path / "models", overwrite=True).name == "tiny"


def test_install_from_zip_with_overrides(tmp_path: Path) -> None:
    zipped = export_zip(make_model(tmp_path / "src"), tmp_path / "Dataset999_Tiny.zip")
    info = install_model(
        zipped, tmp_path / "models", "zipped", catalogue="demo", use_mirroring=True
    )
    assert info.name == "zipped"
    assert info.descriptor.catalogue == "demo"
    assert info.descriptor.use_mirroring is True
    assert info.folds == [0]
    direct = install_model(tmp_path / "src", tmp_path / "models", "direct")
    assert info.weights_sha256 == direct.weights_sha256


def test_unknown_labels_get_private_codes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = make_model(tmp_path / "src")
    ds = json.loads((src / TRAINER_DIR / "dataset.json").read_text())
    ds["labels"] = {"background": 0, "blob_left": 1, "thing": 2}
    (src / TRAINER_DIR / "dataset.json").write_text(json.dumps(ds))
    info = install_model(src, tmp_path / "models")
    assert "no shipped catalogue" in caplog.text
    blob = info.catalogue.label(1)
    assert blob.category.code == "123037004"
    assert blob.modifier is not None and blob.modifier.code == "7771000"
    assert blob.type.scheme.startswith("99")


def _relabel(src: Path, labels: dict[str, int]) -> Path:
    ds = json.loads((src / TRAINER_DIR / "dataset.json").read_text())
    ds["labels"] = {"background": 0, **labels}
    (src / TRAINER_DIR / "dataset.json").write_text(json.dumps(ds))
    return src


def test_catalogue_naming_other_structures_is_refused(tmp_path: Path) -> None:
    # Ids 1 and 2 exist in the demo catalogue, but there they are liver and spleen: taking
    # the ids would put a sacrum under the name liver in every SEG.
    src = _relabel(make_model(tmp_path / "src"), {"sacrum": 1, "spleen": 2})
    with pytest.raises(ModelError) as caught:
        install_model(src, tmp_path / "models", "m", catalogue="demo")
    message = str(caught.value)
    assert "label 1 is 'sacrum' in dataset.json but 'liver' in the catalogue" in message
    assert "models add PART1 PART2" in message and "--trust-label-ids" in message
    assert not (tmp_path / "models" / "m").exists()


def test_labels_are_matched_to_the_catalogue_by_name(tmp_path: Path) -> None:
    src = _relabel(make_model(tmp_path / "src"), {"Kidney Right": 1, "liver": 2})
    mapped = install_model(src, tmp_path / "models", "mapped", catalogue="demo")
    assert mapped.descriptor.label_map == {1: 4, 2: 1}
    assert load_model_info("mapped", tmp_path / "models").descriptor.label_map == {1: 4, 2: 1}
    own = install_model(src, tmp_path / "models", "own")  # catalogue built from dataset.json
    assert own.descriptor.label_map is None
    assert [lab.name for lab in own.catalogue.labels] == ["Kidney Right", "liver"]
    volume = np.random.default_rng(3).normal(300, 100, size=(16, 16, 16)).astype(np.float32)
    raw = Segmenter(own, device="cpu").predict(volume, (2.0, 2.0, 2.0))
    assert 2 in raw  # these random weights predict label 2 (liver) and background
    seg = Segmenter(mapped, device="cpu").predict(volume, (2.0, 2.0, 2.0))
    np.testing.assert_array_equal(seg, np.array([0, 4, 1], dtype=np.uint8)[raw])
    # Same names in the same ids, spelled otherwise: nothing to map.
    same = _relabel(make_model(tmp_path / "src2"), {"Liver": 1, "spleen": 2})
    same_info = install_model(same, tmp_path / "models", "same", catalogue="demo")
    assert same_info.descriptor.label_map is None


def test_trusting_label_ids_is_explicit_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = _relabel(make_model(tmp_path / "src"), {"hepar": 1, "lien": 2})
    with pytest.raises(ModelError, match=r"label 2 is 'lien' in dataset\.json but 'spleen'"):
        install_model(src, tmp_path / "models", "m", catalogue="demo")
    info = install_model(src, tmp_path / "models", "m", catalogue="demo", trust_label_ids=True)
    assert info.descriptor.label_map is None
    assert "'1 hepar', '2 lien'" in caplog.text and "--trust-label-ids" in caplog.text
    wide = _relabel(make_model(tmp_path / "src2"), {"hepar": 1, "lien": 9})
    with pytest.raises(ModelError, match=r"no entry for label ids \[9\]"):
        install_model(wide, tmp_path / "models", "w", catalogue="demo", trust_label_ids=True)


def test_labels_marked_unused_stay_background(tmp_path: Path) -> None:
    # The VIBE model keeps its retired id 20 as "unused"; the vibe catalogue has no 20.
    src = _relabel(make_model(tmp_path / "src"), {"liver": 1, "unused": 2})
    given = install_model(src, tmp_path / "models", "given", catalogue="demo")
    assert given.descriptor.label_map == {1: 1, 2: 0}
    built = install_model(src, tmp_path / "models", "built")
    assert [lab.name for lab in built.catalogue.labels] == ["liver"]
    assert built.descriptor.label_map == {1: 1, 2: 0}
    trusted = install_model(src, tmp_path / "models", "t", catalogue="demo", trust_label_ids=True)
    assert trusted.descriptor.label_map == {1: 1, 2: 0}
    volume = np.random.default_rng(3).normal(300, 100, size=(16, 16, 16)).astype(np.float32)
    segmenter = Segmenter(given, device="cpu")
    network_output = segmenter._parts[0].predictor.predict_single_npy_array(
        volume[np.newaxis], {"spacing": [2.0, 2.0, 2.0]}
    )
    assert 2 in network_output  # these random weights do predict the unused label
    seg = segmenter.predict(volume, (2.0, 2.0, 2.0))
    np.testing.assert_array_equal(seg, np.where(network_output == 2, 0, network_output))


def test_several_folds_make_an_ensemble(tmp_path: Path) -> None:
    info = install_model(make_model(tmp_path / "src", folds=(0, 1)), tmp_path / "models")
    assert info.folds == [0, 1]
    expected = compute_weights_sha256(info.nnunet_dir, [0, 1], "checkpoint_final.pth")
    assert info.weights_sha256 == expected
    assert expected != compute_weights_sha256(info.nnunet_dir, [0], "checkpoint_final.pth")
    seg = Segmenter(info, device="cpu").predict(np.random.rand(12, 20, 18), (3.0, 1.5, 1.5))
    assert seg.shape == (12, 20, 18)


def test_missing_checkpoint_is_named(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src", folds=(0, 1))
    (src / TRAINER_DIR / "fold_1" / "checkpoint_final.pth").unlink()
    with pytest.raises(ModelError, match=r"fold_1/checkpoint_final\.pth"):
        install_model(src, tmp_path / "models", folds=[0, 1])
    (src / TRAINER_DIR / "fold_0" / "checkpoint_final.pth").unlink()
    with pytest.raises(ModelError, match=r"checkpoint_final\.pth"):
        find_nnunet_folder(src)
    assert not (tmp_path / "models" / "tiny").exists()


def test_missing_plans_is_named(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    (src / TRAINER_DIR / "plans.json").unlink()
    with pytest.raises(ModelError, match=r"plans\.json"):
        install_model(src, tmp_path / "models")
    zipped = export_zip(src, tmp_path / "m.zip")
    with pytest.raises(ModelError, match=r"plans\.json"):
        find_nnunet_folder(zipped)


def test_unknown_model_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not installed"):
        load_model_info("nothing", tmp_path)


def test_predict_returns_label_map_of_input_shape(tmp_path: Path) -> None:
    info = install_model(make_model(tmp_path / "src"), tmp_path / "models")
    segmenter = Segmenter(info, device="auto", cpu_threads=1)
    volume = np.random.default_rng(0).normal(300, 100, size=(20, 24, 28)).astype(np.float32)
    seg = segmenter.predict(volume, (2.5, 1.25, 1.5))
    assert seg.shape == volume.shape
    assert seg.dtype == np.uint8
    assert set(np.unique(seg)) <= {0, 1, 2}
    # (c, z, y, x) with one channel is the same input.
    assert segmenter.predict(volume[np.newaxis], (2.5, 1.25, 1.5)).shape == volume.shape
    with pytest.raises(ValueError, match="channel"):
        segmenter.predict(np.zeros((2, 4, 4, 4)), (1.0, 1.0, 1.0))


def test_weights_only_checkpoint_predicts(tmp_path: Path) -> None:
    info = install_model(make_model(tmp_path / "src", weights_only=True), tmp_path / "models")
    seg = Segmenter(info, device="cpu").predict(np.random.rand(16, 16, 16), (2.0, 2.0, 2.0))
    assert seg.shape == (16, 16, 16)


def test_sha256_is_stable(tmp_path: Path) -> None:
    info = install_model(make_model(tmp_path / "src"), tmp_path / "models")
    again = compute_weights_sha256(info.nnunet_dir, info.folds, "checkpoint_final.pth")
    assert (
        again == info.weights_sha256 == load_model_info("tiny", tmp_path / "models").weights_sha256
    )
    assert len(again) == 64


def test_inference_never_imports_pydicom(tmp_path: Path) -> None:
    install_model(make_model(tmp_path / "src"), tmp_path / "models")
    code = f"""
import sys
import numpy as np
import torch
torch.set_num_threads(1)
import inference.predictor, inference.model_folder, inference.model_store, inference.catalogue
bad = [m for m in ("pydicom", "pynetdicom") if m in sys.modules]
assert not bad, ("after import", bad)
from pathlib import Path
info = inference.model_store.load_model_info("tiny", Path({str(tmp_path / "models")!r}))
segmenter = inference.predictor.Segmenter(info, device="cpu")
seg = segmenter.predict(np.random.rand(8, 8, 8), (2.0, 2.0, 2.0))
assert seg.shape == (8, 8, 8)
bad = [m for m in ("pydicom", "pynetdicom", "torchvision", "timm") if m in sys.modules]
assert not bad, ("after predict", bad)
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_settings_and_overrides_pick_the_options(tmp_path: Path) -> None:
    from dicom_node.config import InferenceSettings

    info = install_model(make_model(tmp_path / "src"), tmp_path / "models")
    settings = InferenceSettings(device="cpu", tile_step_size=0.8, cpu_threads=1)
    segmenter = Segmenter(info, settings)
    assert segmenter.options.tile_step_size == 0.8
    assert segmenter.options.use_mirroring is False  # the descriptor's value
    assert segmenter.device.type == "cpu"
    assert Segmenter(info, settings, use_mirroring=True).options.use_mirroring is True


def test_cli_add_list_check(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dicom_node.cli import app

    src = make_model(tmp_path / "src")
    config = tmp_path / "config.yaml"
    # Relative: taken from the config file's folder.
    config.write_text("storage:\n  data_dir: var\ninference:\n  device: cpu\n  cpu_threads: 1\n")
    runner = CliRunner()
    base = ["--config", str(config), "models"]
    added = runner.invoke(app, [*base, "add", str(src), "--name", "cli", "--catalogue", "demo"])
    assert added.exit_code == 0, added.output
    listed = runner.invoke(app, [*base, "list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert "cli" in [m["name"] for m in json.loads(listed.stdout)]
    checked = runner.invoke(app, [*base, "check", "cli", "--size", "16", "--json"])
    assert checked.exit_code == 0, checked.output
    result = json.loads(checked.stdout)
    assert result["output_shape"] == [16, 16, 16] and result["weights_sha256_ok"] is True
