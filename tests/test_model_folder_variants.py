"""Unusual but valid nnU-Net v2 trained-model folders, as a hospital's AI engineer brings them.

Region-based training, the ignore label, several configurations and the cascade, fold and
checkpoint choices, trainers nnU-Net does not know, several input channels, zip layouts and
label names outside the catalogues: on the tiny random-weights model of ``test_models`` and
the demo model's real checkpoint; no training.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from seg_fixtures import mr_series
from test_models import TRAINER_DIR, export_zip, make_model
from typer.testing import CliRunner, Result

from dicom_node.errors import ModelError
from inference.catalogue import load_catalogue
from inference.model_store import BUILTIN_MODELS, install_model
from inference.predictor import Segmenter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DEMO_TRAINER = "nnUNetTrainerDemo__nnUNetPlans__3d_demo"
ALGORITHM: dict[str, Any] = {"model_name": "m", "model_version": "1", "weights_sha256": "0" * 64}


def _edit_dataset(src: Path, **changes: Any) -> Path:
    file = src / TRAINER_DIR / "dataset.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))
    return src


def _cli(tmp_path: Path, *args: str) -> Result:
    from dicom_node.cli import app

    config = tmp_path / "config.yaml"
    if not config.exists():
        config.write_text("storage:\n  data_dir: var\ninference:\n  device: cpu\n")
    return CliRunner().invoke(app, ["--config", str(config), "models", *args])


def _catalogue_file(path: Path, names: list[str]) -> Path:
    """A catalogue of ``names`` as labels 1..n, with private codes."""
    altered = {"scheme": "SCT", "code": "49755003", "meaning": "Morphologically Altered Structure"}
    labels = [
        {
            "id": i,
            "name": name,
            "category": altered,
            "type": {"scheme": "99TEST", "code": name[:16], "meaning": name},
            "color": [200, 40 * i, 0],
        }
        for i, name in enumerate(names, start=1)
    ]
    path.write_text(yaml.safe_dump({"name": path.stem, "labels": labels}))
    return path


def _random_volume(shape: tuple[int, int, int] = (20, 20, 20)) -> np.ndarray:
    return np.random.default_rng(0).normal(300, 100, size=shape).astype(np.float32)


# --- region-based training ------------------------------------------------------------------

REGIONS = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}


def test_region_based_model_needs_a_catalogue_of_the_values_it_predicts(tmp_path: Path) -> None:
    """nnU-Net writes a region model's prediction as the values of regions_class_order (the
    last region holding a voxel wins), which no dataset.json name describes. Installed with
    a catalogue lacking one of them, every job failed on its first series ('label map
    contains values [3] that the catalogue does not describe')."""
    src = _edit_dataset(make_model(tmp_path / "src"), labels=REGIONS, regions_class_order=[1, 2, 3])
    models = tmp_path / "models"
    with pytest.raises(ModelError, match=r"regions_class_order \[1, 2, 3\].*--catalogue"):
        install_model(src, models, "plain")
    two = _catalogue_file(tmp_path / "two.yaml", ["edema", "necrosis"])
    with pytest.raises(ModelError, match=r"catalogue 'two' has no label 3"):
        install_model(src, models, "short", catalogue=str(two))
    assert not (models / "short").exists()

    three = _catalogue_file(tmp_path / "brats.yaml", ["edema", "necrosis", "enhancing"])
    info = install_model(src, models, "brats", catalogue=str(three))
    sources = mr_series(nz=8, ny=32, nx=32)
    volume = np.stack([s.pixel_array for s in sources]).astype(np.float32)
    label_map = Segmenter(info, device="cpu").predict(volume, (3.0, 1.25, 1.5))
    assert set(np.unique(label_map)) <= {0, 1, 2, 3}
    from dicom_node.seg_encode import encode_seg

    seg = encode_seg(label_map, sources, info.catalogue, **ALGORITHM)
    names = [item.SegmentLabel for item in seg.SegmentSequence]
    assert names == [info.catalogue.label(int(v)).name for v in np.unique(label_map) if v]


def test_region_based_model_without_regions_class_order_is_refused(tmp_path: Path) -> None:
    # nnU-Net cannot turn its regions into a label map without it (an assertion at load).
    src = _edit_dataset(make_model(tmp_path / "src"), labels=REGIONS)
    catalogue = _catalogue_file(tmp_path / "three.yaml", ["a", "b", "c"])
    with pytest.raises(ModelError, match="regions_class_order"):
        install_model(src, tmp_path / "models", "m", catalogue=str(catalogue))


# --- the ignore label -----------------------------------------------------------------------


def _demo_with_ignore(base: Path) -> Path:
    """The demo model with nnU-Net's ignore label (partial annotations) above its labels."""
    folder = base / "Dataset902_Partial" / DEMO_TRAINER
    shutil.copytree(BUILTIN_MODELS["demo"] / "nnunet" / DEMO_TRAINER, folder)
    dataset = json.loads((folder / "dataset.json").read_text())
    dataset["labels"]["ignore"] = 5
    (folder / "dataset.json").write_text(json.dumps(dataset))
    return folder.parent


def test_the_ignore_label_is_no_structure(tmp_path: Path) -> None:
    """nnU-Net trains around voxels labelled "ignore" and never predicts them: it was made a
    catalogue label with a private code (no shipped catalogue matched), and a given catalogue
    was refused ("label 5 'ignore' is not in the catalogue")."""
    src = _demo_with_ignore(tmp_path / "src")
    models = tmp_path / "models"
    own = install_model(src, models, "own")
    assert own.descriptor.catalogue == "demo"
    assert "ignore" not in [lab.name for lab in own.catalogue.labels]
    given = install_model(src, models, "given", catalogue="demo")
    assert given.descriptor.label_map is None
    from inference.demo.phantoms import make_phantom

    image, truth = make_phantom(10000)
    found = Segmenter(given, device="cpu").predict(image, (3.0, 2.0, 2.0))
    assert set(np.unique(found)) == {0, 1, 2, 3, 4}
    assert ((found == 1) & (truth == 1)).sum() > 0.8 * (truth == 1).sum()  # the liver


# --- configurations -------------------------------------------------------------------------


def _configurations(base: Path) -> Path:
    """A dataset folder of one training in 2d, 3d_fullres, 3d_lowres and the cascade, as
    nnUNetv2_export_model_to_zip exports them (same tiny weights; only the plans matter)."""
    src = make_model(base)
    trainer = src / TRAINER_DIR
    plans = json.loads((trainer / "plans.json").read_text())
    configs = plans["configurations"]
    configs["2d"] = json.loads(json.dumps(configs["3d_fullres"]))
    configs["3d_lowres"] = {**configs["3d_fullres"], "spacing": [3.0, 3.0, 3.0]}
    configs["3d_lowres"]["next_stage"] = "3d_cascade_fullres"
    configs["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    (trainer / "plans.json").write_text(json.dumps(plans))
    for name in ("2d", "3d_lowres", "3d_cascade_fullres"):
        shutil.copytree(trainer, src / f"nnUNetTrainer__nnUNetPlans__{name}")
    return src


def test_several_configurations_install_3d_fullres_and_name_the_others(tmp_path: Path) -> None:
    src = _configurations(tmp_path / "src")
    zipped = export_zip(src, tmp_path / "export.zip")
    info = install_model(zipped, tmp_path / "models", "m")
    assert info.descriptor.configuration == "3d_fullres"
    assert any(
        "2d, 3d_cascade_fullres, 3d_lowres configuration(s)" in note and "--configuration" in note
        for note in info.notes
    ), info.notes


def test_the_configuration_is_chosen_with_an_option(tmp_path: Path) -> None:
    """The admin could not install 3d_lowres (or 2d) from an export zip: the zip held them,
    the node always took 3d_fullres, and without it said 'give one of them directly'."""
    src = _configurations(tmp_path / "src")
    zipped = export_zip(src, tmp_path / "export.zip")
    info = install_model(zipped, tmp_path / "models", "low", configuration="3d_lowres")
    assert info.descriptor.configuration == "3d_lowres"
    assert Segmenter(info, device="cpu").predict(_random_volume(), (2.0, 2.0, 2.0)).shape == (
        20,
        20,
        20,
    )
    with pytest.raises(ModelError, match=r"holds no 3d_foo configuration \(it holds 2d, "):
        install_model(zipped, tmp_path / "models", "foo", configuration="3d_foo")
    shutil.rmtree(src / TRAINER_DIR)  # no 3d_fullres to fall back on
    without = export_zip(src, tmp_path / "without.zip")
    with pytest.raises(ModelError, match=r"several configurations of one model.*--configuration"):
        install_model(without, tmp_path / "models", "none")
    added = _cli(tmp_path, "add", str(without), "--name", "two-d", "--configuration", "2d")
    assert added.exit_code == 0, added.output
    assert "installed two-d" in added.output


def test_the_cascade_stage_is_refused_at_install(tmp_path: Path) -> None:
    """3d_cascade_fullres takes the 3d_lowres segmentation as extra input channels, which the
    node never computes: it installed, and every job failed ('model.yaml lists 1 input
    channels, the network takes 3')."""
    src = _configurations(tmp_path / "src")
    with pytest.raises(ModelError, match=r"second stage of nnU-Net's cascade.*3d_lowres"):
        install_model(src / "nnUNetTrainer__nnUNetPlans__3d_cascade_fullres", tmp_path / "models")
    with pytest.raises(ModelError, match="cascade"):
        install_model(src, tmp_path / "models", "c", configuration="3d_cascade_fullres")
    assert not (tmp_path / "models" / "c").exists()


def test_a_configuration_plans_json_lacks_is_refused_at_install(tmp_path: Path) -> None:
    # It installed and failed at load: "configuration '3d_big' not in plans.json".
    src = make_model(tmp_path / "src")
    (src / TRAINER_DIR).rename(src / "nnUNetTrainer__nnUNetPlans__3d_big")
    with pytest.raises(ModelError, match=r"'3d_big' but its plans\.json has no such .*3d_fullres"):
        install_model(src, tmp_path / "models", "m")


# --- folds and checkpoints ------------------------------------------------------------------


def test_fold_and_checkpoint_variants(tmp_path: Path) -> None:
    models = tmp_path / "models"
    some = make_model(tmp_path / "some", folds=(1, 3))
    trainer = some / TRAINER_DIR
    assert install_model(some, models, "some").folds == [1, 3]
    shutil.copytree(trainer / "fold_1", trainer / "fold_all")
    assert install_model(some, models, "numbered").folds == [1, 3]  # as nnU-Net's ensemble
    assert install_model(some, models, "all", folds=["all"]).folds == ["all"]

    best = make_model(tmp_path / "best", folds=(0, 1))
    for fold in ("fold_0", "fold_1"):
        folder = best / TRAINER_DIR / fold
        (folder / "checkpoint_final.pth").rename(folder / "checkpoint_best.pth")
    # It said only "no fold has checkpoint_final.pth", as if the model were incomplete.
    with pytest.raises(
        ModelError, match=r"hold checkpoint_best\.pth: .*--checkpoint checkpoint_best"
    ):
        install_model(best, models, "final")
    with pytest.raises(
        ModelError, match=r"fold_0/checkpoint_final\.pth is missing; .*--checkpoint"
    ):
        install_model(best, models, "final", folds=[0])
    info = install_model(best, models, "best", checkpoint="checkpoint_best.pth")
    assert info.folds == [0, 1] and info.descriptor.checkpoint == "checkpoint_best.pth"

    both = make_model(tmp_path / "both")
    folder = both / TRAINER_DIR / "fold_0"
    checkpoint = torch.load(folder / "checkpoint_final.pth", weights_only=False)
    checkpoint["network_weights"] = {k: v + 1 for k, v in checkpoint["network_weights"].items()}
    torch.save(checkpoint, folder / "checkpoint_best.pth")
    final = install_model(both, models, "both-final")
    best_info = install_model(both, models, "both-best", checkpoint="checkpoint_best.pth")
    assert final.weights_sha256 != best_info.weights_sha256


# --- trainers nnU-Net does not know ---------------------------------------------------------


@pytest.mark.parametrize("trainer", ["nnUNetTrainerNoMirroring", "nnUNetTrainerMyHospital"])
def test_a_trainer_nnunet_cannot_find_by_name_predicts(tmp_path: Path, trainer: str) -> None:
    # nnU-Net's lookup by name imports every trainer module (torchvision here): never used.
    src = make_model(tmp_path / "src")
    folder = src / f"{trainer}__nnUNetPlans__3d_fullres"
    (src / TRAINER_DIR).rename(folder)
    checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
    checkpoint.update(trainer_name=trainer, inference_allowed_mirroring_axes=None)
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    info = install_model(src, tmp_path / "models", "m")
    assert info.descriptor.trainer == trainer
    segmenter = Segmenter(info, device="cpu", use_mirroring=True)
    assert segmenter.predict(_random_volume(), (2.0, 2.0, 2.0)).shape == (20, 20, 20)


# --- several input channels -----------------------------------------------------------------


def test_a_dixon_model_of_four_channels_is_installed_with_a_true_note(tmp_path: Path) -> None:
    """The note sent the admin to the README's "Known limits", which says nothing of it."""
    src = _edit_dataset(
        make_model(tmp_path / "src"),
        channel_names={"0": "in", "1": "opp", "2": "water", "3": "fat"},
        file_ending=".nii.gz",
    )
    added = _cli(tmp_path, "add", str(src), "--name", "dixon", "--json")
    assert added.exit_code == 0, added.output
    notes = json.loads(added.stdout)["notes"]
    note = next(n for n in notes if "needs 4 input channels (in, opp, water, fat)" in n)
    assert "(README, Series the node refuses to segment)" in note
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Series the node refuses to segment", 1)[1].split("\n## ", 1)[0]
    assert "several input channels" in section  # where the note sends the admin


# --- zip layouts ----------------------------------------------------------------------------


def _zip(out: Path, trees: list[tuple[Path, str]]) -> Path:
    """A zip of each dataset folder under the given prefix."""
    with zipfile.ZipFile(out, "w") as zf:
        for tree, prefix in trees:
            for f in sorted(tree.rglob("*")):
                if f.is_file():
                    zf.write(f, prefix + f.relative_to(tree.parent).as_posix())
    return out


def test_zip_layouts(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    models = tmp_path / "models"
    wrapped = _zip(tmp_path / "wrapped.zip", [(src, "export/")])  # export/Dataset/trainer
    assert install_model(wrapped, models, "wrapped").descriptor.configuration == "3d_fullres"
    deep = tmp_path / "deep.zip"
    with zipfile.ZipFile(deep, "w") as zf:  # a/b/trainer
        for f in sorted((src / TRAINER_DIR).rglob("*")):
            zf.write(f, f"a/b/{TRAINER_DIR}/{f.relative_to(src / TRAINER_DIR).as_posix()}")
    assert install_model(deep, models, "deep").folds == [0]

    escaping = shutil.copy(export_zip(src, tmp_path / "plain.zip"), tmp_path / "escaping.zip")
    with zipfile.ZipFile(escaping, "a") as zf:
        zf.writestr("../../etc/x", "not a model file")
    with pytest.raises(ModelError, match=r"'\.\./\.\./etc/x' escapes the archive"):
        install_model(Path(escaping), models, "escaping")

    # Two models, one of them 3d_fullres: it was taken as if the other were its 2d.
    other = make_model(tmp_path / "other")
    other = other.rename(other.parent / "Dataset998_Other")
    (other / TRAINER_DIR).rename(other / "nnUNetTrainer__nnUNetPlans__2d")
    two = _zip(tmp_path / "two.zip", [(src, ""), (other, "")])
    with pytest.raises(ModelError, match=r"several trained-model folders .*unpack the zip first"):
        install_model(two, models, "two")
    assert sorted(p.name for p in models.iterdir()) == ["deep", "wrapped"]


# --- label names outside the catalogues ------------------------------------------------------


def _seg_codes(info: Any) -> list[tuple[str, str, str]]:
    """(label, scheme, code) of each segment of a SEG holding every label of the model."""
    from dicom_node.seg_encode import encode_seg

    sources = mr_series(nz=4, ny=16, nx=16)
    label_map = np.zeros((4, 16, 16), dtype=np.uint8)
    for lab in info.catalogue.labels:
        label_map[lab.id - 1, :4, :4] = lab.id
    seg = encode_seg(label_map, sources, info.catalogue, **ALGORITHM)
    return [
        (
            str(item.SegmentLabel),
            str(item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator),
            str(item.SegmentedPropertyTypeCodeSequence[0].CodeValue),
        )
        for item in seg.SegmentSequence
    ]


def test_unknown_names_sharing_sixteen_characters_get_distinct_codes(tmp_path: Path) -> None:
    """Private codes were the name's first 16 characters: both lesions got one code, and no
    reader of the SEG could tell the two structures apart."""
    labels = {"background": 0, "lesion_category_one": 1, "lesion_category_two": 2}
    info = install_model(_edit_dataset(make_model(tmp_path / "src"), labels=labels), tmp_path / "m")
    codes = _seg_codes(info)
    assert [label for label, _, _ in codes] == ["lesion_category_one", "lesion_category_two"]
    assert {scheme for _, scheme, _ in codes} == {"99DICOMNODE"}
    assert len({code for _, _, code in codes}) == 2
    assert all(len(code) <= 16 for _, _, code in codes)


def test_names_outside_dicoms_default_characters_are_made_ascii(tmp_path: Path) -> None:
    """A German or over-long label name stopped `models add` with a pydantic traceback."""
    long_name = "lesion of the " + "very " * 12 + "left kidney"
    labels = {"background": 0, "Läsion": 1, long_name: 2}
    src = _edit_dataset(make_model(tmp_path / "src"), labels=labels)
    info = install_model(src, tmp_path / "models", "de")
    assert [lab.name for lab in info.catalogue.labels] == ["Lasion", long_name[:64].strip()]
    assert info.descriptor.label_map is None
    assert [label for label, _, _ in _seg_codes(info)] == ["Lasion", long_name[:64].strip()]
    # What the SEG says must load again from the installed catalogue file.
    assert load_catalogue(info.root / "catalogue.yaml").label(1).name == "Lasion"
    added = _cli(tmp_path, "add", str(src), "--name", "cli-de")
    assert added.exit_code == 0, added.output
    nothing_ascii = _edit_dataset(make_model(tmp_path / "jp"), labels={"background": 0, "肝臓": 1})
    with pytest.raises(ModelError, match=r"no ASCII letters or digits.*--catalogue"):
        install_model(nothing_ascii, tmp_path / "models", "jp")


def test_known_structures_spelled_otherwise_get_their_snomed_codes(tmp_path: Path) -> None:
    """'Liver' got a private code although the node knows the liver's SNOMED CT code; the
    install of the same model with --catalogue matched it by name (ignoring case)."""
    labels = {"background": 0, "Liver": 1, "Kidney-Left": 2}
    info = install_model(_edit_dataset(make_model(tmp_path / "src"), labels=labels), tmp_path / "m")
    assert _seg_codes(info) == [("Liver", "SCT", "10200004"), ("Kidney-Left", "SCT", "64033007")]
    kidney = info.catalogue.label(2)
    assert kidney.modifier is not None and kidney.modifier.meaning == "Left"


# --- review of the variants -------------------------------------------------------------------


def test_the_configuration_asked_for_a_renamed_trainer_folder_is_kept(tmp_path: Path) -> None:
    """A trainer folder renamed from nnU-Net's pattern names no configuration: --configuration
    2d was dropped without a word (model.yaml had none, so jobs ran the checkpoint's), and one
    plans.json lacks installed."""
    src = make_model(tmp_path / "src")
    plans_file = src / TRAINER_DIR / "plans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["2d"] = plans["configurations"]["3d_fullres"]
    plans_file.write_text(json.dumps(plans))
    renamed = (src / TRAINER_DIR).rename(src / "hospital_model")
    models = tmp_path / "models"
    assert install_model(renamed, models, "plain").descriptor.configuration is None
    info = install_model(renamed, models, "two-d", configuration="2d")
    assert info.descriptor.configuration == "2d"
    with pytest.raises(ModelError, match=r"'3d_foo' but its plans\.json has no such"):
        install_model(renamed, models, "foo", configuration="3d_foo")
    # Installed again from the node's folder of it (model.yaml says 2d): the option decides.
    again = install_model(info.root, tmp_path / "other", "full", configuration="3d_fullres")
    assert again.descriptor.configuration == "3d_fullres"


def test_two_trainings_side_by_side_are_two_models(tmp_path: Path) -> None:
    """Folders of another trainer or plans beside 3d_fullres are another training, not its
    configurations: the 3d_fullres one was installed with a note calling the other 'the 2d
    configuration of this model'."""
    src = make_model(tmp_path / "src")
    shutil.copytree(src / TRAINER_DIR, src / "nnUNetTrainer__nnUNetResEncUNetMPlans__2d")
    zipped = export_zip(src, tmp_path / "export.zip")
    with pytest.raises(ModelError, match=r"several trained-model folders .*unpack the zip first"):
        install_model(zipped, tmp_path / "models", "m")
    chosen = install_model(zipped, tmp_path / "models", "full", configuration="3d_fullres")
    assert chosen.descriptor.plans == "nnUNetPlans"
    assert not [n for n in chosen.notes if "configuration" in n], chosen.notes


def test_two_labels_matching_one_catalogue_label_are_refused(tmp_path: Path) -> None:
    """Names compare in their first 64 characters (a SEG's limit): two long names alike in
    those were both mapped to one catalogue label, two structures under one segment."""
    stem = "lesion of the " + "very " * 12
    labels = {"background": 0, stem + "left kidney": 1, stem + "right kidney": 2}
    src = _edit_dataset(make_model(tmp_path / "src"), labels=labels)
    catalogue = _catalogue_file(tmp_path / "lesions.yaml", [stem[:64].strip(), "cyst"])
    with pytest.raises(
        ModelError, match=r"label 1 'lesion.*left kidney' matches catalogue label 1 .*as another"
    ):
        install_model(src, tmp_path / "models", "m", catalogue=str(catalogue))
    info = install_model(
        src, tmp_path / "models", "m", catalogue=str(catalogue), trust_label_ids=True
    )
    assert info.descriptor.label_map is None


# --- second review of the variants ------------------------------------------------------------


def _set_checkpoint_configuration(folder: Path, configuration: str) -> Path:
    """What nnU-Net's trainer writes into each checkpoint: the configuration it trained."""
    for file in folder.glob("fold_*/checkpoint_final.pth"):
        checkpoint = torch.load(file, weights_only=False)
        checkpoint["init_args"]["configuration"] = configuration
        torch.save(checkpoint, file)
    return folder


def test_a_renamed_cascade_folder_is_refused_at_install(tmp_path: Path) -> None:
    """A renamed trainer folder names no configuration; its checkpoint does, when a job loads
    it. Renamed from 3d_cascade_fullres and installed without --configuration, it installed
    and every job failed: its network takes the 3d_lowres segmentation as extra inputs."""
    src = _configurations(tmp_path / "src")
    cascade = (src / "nnUNetTrainer__nnUNetPlans__3d_cascade_fullres").rename(tmp_path / "ours")
    _set_checkpoint_configuration(cascade, "3d_cascade_fullres")
    models = tmp_path / "models"
    with pytest.raises(ModelError, match=r"3d_cascade_fullres is the second stage .*3d_lowres"):
        install_model(cascade, models, "cascade")
    zipped = _zip(tmp_path / "ours.zip", [(cascade, "")])
    with pytest.raises(ModelError, match="second stage of nnU-Net's cascade"):
        install_model(zipped, models, "zipped")
    other = make_model(tmp_path / "other", folds=(1,))
    with pytest.raises(ModelError, match=r"\(part 1\): 3d_cascade_fullres is the second stage"):
        install_model([cascade, other], models, "parts")
    assert not models.exists() or not [p for p in models.iterdir() if p.name[0] != "."]
    # The lowres stage renamed so installs and runs: its checkpoint's configuration is checked.
    lowres = (src / "nnUNetTrainer__nnUNetPlans__3d_lowres").rename(tmp_path / "low")
    info = install_model(_set_checkpoint_configuration(lowres, "3d_lowres"), models, "low")
    assert Segmenter(info, device="cpu").predict(_random_volume(), (2.0, 2.0, 2.0)).shape == (
        20,
        20,
        20,
    )


def test_the_parts_install_names_the_other_configurations(tmp_path: Path) -> None:
    """A single install says which other configurations the zip holds; a model of parts
    installed from such zips said nothing."""
    first = export_zip(_configurations(tmp_path / "first"), tmp_path / "first.zip")
    second = make_model(tmp_path / "second", folds=(1,))
    info = install_model([first, second], tmp_path / "models", "parts", catalogue="demo")
    assert [p.configuration for p in info.parts] == ["3d_fullres", "3d_fullres"]
    assert any(
        "first.zip (part 1) also holds the 2d, 3d_cascade_fullres, 3d_lowres configuration(s)"
        in note
        and "--configuration" in note
        for note in info.notes
    ), info.notes
    added = _cli(tmp_path, "add", str(first), str(second), "--name", "cli", "--catalogue", "demo")
    assert added.exit_code == 0, added.output
    assert "note: first.zip (part 1) also holds the 2d" in added.output


def test_a_region_trained_part_takes_the_catalogue_given(tmp_path: Path) -> None:
    """A region-trained part of a model of parts was refused with 'Give a catalogue
    (--catalogue FILE)' although a catalogue naming its values was given."""
    regions = _edit_dataset(
        make_model(tmp_path / "regions"), labels=REGIONS, regions_class_order=[1, 2, 3]
    )
    organs = _edit_dataset(
        make_model(tmp_path / "organs", folds=(1,)),
        labels={"background": 0, "liver": 1, "spleen": 2},
    )
    models = tmp_path / "models"
    with pytest.raises(ModelError, match=r"Tiny: .*regions_class_order \[1, 2, 3\].*--catalogue"):
        install_model([regions, organs], models, "none")
    short = _catalogue_file(tmp_path / "short.yaml", ["edema", "necrosis"])
    with pytest.raises(ModelError, match=r"\(part 1\): .*catalogue 'short' has no label 3"):
        install_model([regions, organs], models, "short", catalogue=str(short))
    names = ["edema", "necrosis", "enhancing", "liver", "spleen"]
    catalogue = _catalogue_file(tmp_path / "tumour.yaml", names)
    info = install_model([regions, organs], models, "tumour", catalogue=str(catalogue))
    assert [p.label_map for p in info.parts] == [{1: 1, 2: 2, 3: 3}, {1: 4, 2: 5}]
    label_map = Segmenter(info, device="cpu").predict(_random_volume(), (2.0, 2.0, 2.0))
    assert set(np.unique(label_map)) <= {0, 1, 2, 3, 4, 5}


def test_ensemble_folders_of_an_export_zip_are_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """nnUNetv2_export_model_to_zip adds <dataset>/ensembles/ensemble___...: with the
    cross-validation predictions, each holds dataset.json and plans.json but no fold. The
    node runs one trainer and configuration: they are no model, and not a second one."""
    src = _configurations(tmp_path / "src")
    ensemble = (
        src / "ensembles" / "ensemble___nnUNetTrainer__nnUNetPlans__2d___nnUNetTrainer__"
        "nnUNetPlans__3d_fullres___0"
    )
    ensemble.mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copyfile(src / TRAINER_DIR / name, ensemble / name)
    (ensemble / "summary.json").write_text("{}")
    zipped = export_zip(src, tmp_path / "export.zip")
    models = tmp_path / "models"
    with caplog.at_level("INFO", logger="inference.model_folder"):
        info = install_model(zipped, models, "m")
    assert info.descriptor.configuration == "3d_fullres"
    assert any(
        "ignoring nnU-Net ensemble" in r.getMessage() and ensemble.name in r.getMessage()
        for r in caplog.records
    ), caplog.text
    assert install_model(zipped, models, "low", configuration="3d_lowres").descriptor.plans
    # What is missing from the trainer folder is said, not 'several trained-model folders'.
    (src / TRAINER_DIR / "plans.json").unlink()
    for name in ("2d", "3d_lowres", "3d_cascade_fullres"):
        shutil.rmtree(src / f"nnUNetTrainer__nnUNetPlans__{name}")
    broken = export_zip(src, tmp_path / "broken.zip")
    with pytest.raises(ModelError, match=r"plans\.json is missing from the trained-model folder"):
        install_model(broken, models, "broken")
