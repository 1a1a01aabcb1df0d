"""Installed models: install, list and describe nnU-Net v2 trained models.

A model is an nnU-Net trained-model folder or export zip (``inference.model_folder``) plus the
project's descriptor ``model.yaml``. Installed, it lives at::

    <models_dir>/<name>/model.yaml
    <models_dir>/<name>/nnunet/            # the trainer__plans__configuration folder
    <models_dir>/<name>/catalogue.yaml     # only when the catalogue is not a shipped one

The demo model ships inside the package (``inference/demo_model/``). Nothing is downloaded.
"""

from __future__ import annotations

import colorsys
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dicom_node.errors import ModelError, validation_problems
from inference.catalogue import (
    ANATOMICAL_STRUCTURE,
    LEFT,
    RIGHT,
    Catalogue,
    Code,
    DicomText,
    Label,
    dump_catalogue,
    load_catalogue,
    parse_catalogue,
    shipped_catalogues,
    to_dicom_text,
)
from inference.model_folder import (
    Fold,
    NnunetFolder,
    checkpoint_configuration,
    compute_weights_sha256,
    copy_model_files,
    find_nnunet_folder,
    fold_dir,
)

logger = logging.getLogger(__name__)

DESCRIPTOR = "model.yaml"
NNUNET_SUBDIR = "nnunet"
PARTS_SUBDIR = "parts"
CATALOGUE_FILE = "catalogue.yaml"
BUILTIN_MODELS: dict[str, Path] = {"demo": Path(__file__).resolve().parent / "demo_model"}

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PRIVATE_SCHEME = "99DICOMNODE"  # DICOM reserves "99..." for private coding schemes
IGNORE_LABEL = "ignore"  # nnU-Net's label for unannotated voxels: trained around, never predicted

DEFAULT_ORIENTATION = "LPS"  # the node's volumes: x to the patient's left, y posterior, z up
_AXIS_PAIRS = ("LR", "PA", "SI")
# Shipped catalogues of TotalSegmentator's models: it runs nibabel's as_closest_canonical
# (RAS) before nnU-Net, so its networks learnt RAS arrays.
TOTALSEGMENTATOR_CATALOGUES = ("total", "total_mr")
TILE_STEP_SIZE = 0.5  # nnU-Net's default
# TotalSegmentator predicts its 1.5 mm "total" parts with step 0.8 (0.5 for its 3 mm model
# and for total_mr): totalsegmentator/nnunet.py, nnUNet_predict_image.
TOTALSEGMENTATOR_TOTAL_TILE_STEP_SIZE = 0.8


def _plain_checkpoint(value: str) -> str:
    if "/" in value or "\\" in value or value in ("", ".", ".."):
        raise ValueError(f"checkpoint must be a file name inside fold_N, not {value!r}")
    return value


def orientation_problem(value: object) -> str | None:
    """Why ``value`` is not an orientation (three axis codes such as LPS or RAS), or None."""
    text = value if isinstance(value, str) else ""
    axes = [next((i for i, pair in enumerate(_AXIS_PAIRS) if c in pair), -1) for c in text]
    if len(text) == 3 and text.isupper() and sorted(axes) == [0, 1, 2]:
        return None
    return (
        f"{value!r} is not an orientation: give three capital letters, one of L/R, one of "
        "P/A and one of S/I, saying where the image's x, y and z axes point in the images the "
        "model was trained on (LPS: DICOM's patient axes; RAS: NIfTI after nibabel's "
        "as_closest_canonical)"
    )


def parse_orientation(value: object, where: str) -> str:
    """An orientation as written by people and tools: "ras", "RAS" or ["R", "A", "S"]."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        value = "".join(value)
    if isinstance(value, str):
        value = value.strip().upper()
    problem = orientation_problem(value)
    if problem is not None:
        raise ModelError(f"{where}: {problem}")
    assert isinstance(value, str)
    return value


class PartDescriptor(BaseModel):
    """One nnU-Net model of a model published in several parts (``parts/<folder>``)."""

    model_config = ConfigDict(extra="forbid")

    folder: str
    source: str = ""  # what it was installed from, for the operator
    folds: list[Fold] = Field(min_length=1)
    checkpoint: str = "checkpoint_final.pth"
    configuration: str | None = None
    trainer: str | None = None
    plans: str | None = None
    weights_sha256: str | None = None
    label_map: dict[int, int] | None = None  # as ModelDescriptor.label_map, for this part

    @field_validator("folder")
    @classmethod
    def _safe_folder(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError(f"part folder {value!r} is invalid: letters, digits, '.', '_', '-'")
        return value

    @field_validator("checkpoint")
    @classmethod
    def _plain_file_name(cls, value: str) -> str:
        return _plain_checkpoint(value)


class ModelDescriptor(BaseModel):
    """``model.yaml``: what the project needs to know beyond nnU-Net's own files."""

    model_config = ConfigDict(extra="forbid")

    name: str
    # Written into every SEG (Algorithm Version, Series Description): DICOM's default
    # character set, as catalogue text.
    version: DicomText = Field("1.0", min_length=1, max_length=40)
    description: str = ""
    modality: Literal["MR", "CT"]
    input_channels: list[str] = Field(min_length=1)
    folds: list[Fold] = Field(default_factory=list)  # required unless the model has parts
    checkpoint: str = "checkpoint_final.pth"
    tile_step_size: float = Field(0.5, gt=0.0, le=1.0)
    use_mirroring: bool = False
    catalogue: str
    # From the trainer__plans__configuration folder name; the folder is renamed on install.
    configuration: str | None = None
    trainer: str | None = None
    plans: str | None = None
    weights_sha256: str | None = None
    # The network's label id -> the catalogue's id, where the two differ (matched by name at
    # install); absent when the network's ids are the catalogue's.
    label_map: dict[int, int] | None = None
    # A model published as several nnU-Net models, each segmenting some of the structures
    # (TotalSegmentator): run in this order, a later part's label wins where two overlap.
    parts: list[PartDescriptor] | None = None
    # Where the voxel axes i, j, k (the volume's x, y, z) pointed in the images the network
    # was trained on, as nibabel axis codes; the volume is turned to it before prediction.
    # A model.yaml without it is LPS: the node's own volumes, as the demo model was trained.
    orientation: str = DEFAULT_ORIENTATION
    # A model of two inputs whose second is another model's segmentation of the same image
    # (TotalVibeSegmentator: its ROI model, Dataset278): that model's name. It runs first.
    roi_model: str | None = None

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError(
                f"model name {value!r} is invalid: use 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        return value

    @field_validator("checkpoint")
    @classmethod
    def _plain_file_name(cls, value: str) -> str:
        return _plain_checkpoint(value)

    @field_validator("orientation")
    @classmethod
    def _axis_codes(cls, value: str) -> str:
        problem = orientation_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _roi_input(self) -> ModelDescriptor:
        if self.roi_model is None:
            return self
        if not NAME_RE.match(self.roi_model) or self.roi_model == self.name:
            raise ValueError(f"roi_model: {self.roi_model!r} is not another model's name")
        if len(self.input_channels) != 2:
            raise ValueError(
                "roi_model is for a model of two inputs (the image, then the ROI model's "
                f"segmentation); this one has {len(self.input_channels)}"
            )
        return self

    @model_validator(mode="after")
    def _one_model_or_parts(self) -> ModelDescriptor:
        if self.parts is None:
            if not self.folds:
                raise ValueError("folds: give at least one fold")
            return self
        if len(self.parts) < 2:
            raise ValueError("parts: a model of parts has at least two")
        if self.folds or self.label_map:
            raise ValueError("a model of parts gives folds and label_map for each part")
        folders = [p.folder for p in self.parts]
        if len(set(folders)) != len(folders):
            raise ValueError(f"parts: folders must differ, got {folders}")
        return self


@dataclass(frozen=True)
class ModelPart:
    """One loadable nnU-Net model: the whole model, or one part of a model of parts."""

    name: str  # for log lines: the model's name, or the part's folder
    nnunet_dir: Path
    folds: list[Fold]
    checkpoint: str
    configuration: str | None
    trainer: str | None
    label_map: dict[int, int] | None
    weights_sha256: str

    @property
    def checkpoint_paths(self) -> list[Path]:
        return [self.nnunet_dir / fold_dir(f) / self.checkpoint for f in self.folds]

    def compute_sha256(self) -> str:
        return compute_weights_sha256(self.nnunet_dir, self.folds, self.checkpoint)


def combine_part_hashes(hashes: Iterable[str]) -> str:
    """The weights hash of a model of parts: sha256 over its parts' hashes, in order (the
    order decides which label wins where parts overlap, so it is part of the identity)."""
    digest = hashlib.sha256()
    for value in hashes:
        digest.update(bytes.fromhex(value))
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelInfo:
    """Everything the predictor and the DICOM side need about one usable model."""

    name: str
    root: Path  # folder holding model.yaml
    descriptor: ModelDescriptor
    catalogue: Catalogue
    weights_sha256: str
    parts: tuple[ModelPart, ...]
    builtin: bool = False
    # What an install decided for the operator to confirm (an assumed orientation); not kept.
    notes: tuple[str, ...] = ()

    @property
    def has_parts(self) -> bool:
        return self.descriptor.parts is not None

    @property
    def nnunet_dir(self) -> Path:
        """The trainer folder of a model of one part."""
        if self.has_parts:
            raise ModelError(f"model {self.name} has {len(self.parts)} parts, not one folder")
        return self.parts[0].nnunet_dir

    @property
    def folds(self) -> list[Fold]:
        """The folds of a model of one part (see ``folds_text`` for any model)."""
        if self.has_parts:
            raise ModelError(f"model {self.name} has {len(self.parts)} parts with their folds")
        return list(self.parts[0].folds)

    def folds_text(self) -> str:
        """``0,1``; for parts each part's folds: ``0 | 0 | 0,1``."""
        return " | ".join(",".join(map(str, p.folds)) for p in self.parts)

    def compute_sha256(self) -> str:
        """The weights hash computed from the files now (compare with ``weights_sha256``)."""
        if not self.has_parts:
            return self.parts[0].compute_sha256()
        return combine_part_hashes(p.compute_sha256() for p in self.parts)

    def summary(self) -> dict[str, Any]:
        d = self.descriptor
        out: dict[str, Any] = {
            "name": self.name,
            "version": d.version,
            "modality": d.modality,
            "description": d.description,
            "input_channels": d.input_channels,
            "folds": [p.folds for p in self.parts] if self.has_parts else self.folds,
            "configuration": d.configuration,
            "trainer": d.trainer,
            "catalogue": d.catalogue,
            "orientation": d.orientation,
            "labels": len(self.catalogue.labels),
            "weights_sha256": self.weights_sha256,
            "builtin": self.builtin,
            "path": str(self.root),
        }
        if d.parts is not None:
            out["parts"] = [
                {
                    "folder": pd.folder,
                    "source": pd.source,
                    "folds": part.folds,
                    "configuration": part.configuration,
                    "labels": len(part.label_map or {}),
                    "weights_sha256": part.weights_sha256,
                }
                for pd, part in zip(d.parts, self.parts, strict=True)
            ]
        return out


# --- descriptors and catalogues -------------------------------------------------------------


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {file}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{file} is not a JSON object")
    return data


def read_descriptor(file: Path) -> ModelDescriptor:
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ModelError(f"model descriptor {file} cannot be read: {exc}") from exc
    try:
        return ModelDescriptor.model_validate(raw)
    except ValidationError as exc:
        problems = validation_problems(exc)
        raise ModelError(f"model descriptor {file} is invalid:\n{problems}") from exc


def write_descriptor(descriptor: ModelDescriptor, file: Path) -> None:
    data = descriptor.model_dump(mode="json", exclude_none=True)
    file.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def _channels(dataset: dict[str, Any]) -> list[str]:
    names = dataset.get("channel_names") or dataset.get("modality")
    if not isinstance(names, dict) or not names:
        raise ModelError("dataset.json has no channel_names: cannot tell the model's inputs")
    return [str(names[k]) for k in sorted(names, key=lambda k: int(k))]


def _dataset_labels(dataset: dict[str, Any]) -> dict[int, str]:
    """dataset.json's labels by id, without the background and nnU-Net's ignore label."""
    labels = dataset.get("labels")
    if not isinstance(labels, dict):
        raise ModelError("dataset.json has no labels")
    order = _region_values(dataset)
    if order is not None:
        regions = "; ".join(
            f"{name}: {value}" for name, value in labels.items() if name != "background"
        )
        raise ModelError(
            f"dataset.json trains overlapping regions ({regions}), not one label per voxel: "
            f"nnU-Net writes their prediction as the values of regions_class_order {order}, "
            "each voxel the value of the last region in that order that holds it. Give a "
            f"catalogue (--catalogue FILE) whose labels {order} name what those voxels are"
        )
    out: dict[int, str] = {}
    for name, value in labels.items():
        if name == IGNORE_LABEL:
            continue
        if isinstance(value, (list, tuple)) and len(value) == 1:
            value = value[0]  # one value in a list: nnU-Net reads it as a plain label
        try:
            label_id = int(value)
        except (TypeError, ValueError):
            raise ModelError(
                f"dataset.json label {name!r} is {value!r}, not a label value"
            ) from None
        if label_id != 0:
            out[label_id] = str(name)
    if not out:
        raise ModelError("dataset.json labels hold only the background")
    return out


def _region_values(dataset: dict[str, Any]) -> list[int] | None:
    """The values a region-trained model's label map holds (``regions_class_order``), or
    None for a model of one label per voxel."""
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not any(
        isinstance(v, (list, tuple)) and len(v) > 1 for k, v in labels.items() if k != IGNORE_LABEL
    ):
        return None  # as nnU-Net's LabelManager tells region-based training
    order = dataset.get("regions_class_order")
    regions = [k for k, v in labels.items() if k not in ("background", IGNORE_LABEL)]
    if (
        not isinstance(order, list)
        or len(order) != len(regions)
        or not all(isinstance(v, int) and v > 0 for v in order)
    ):
        raise ModelError(
            f"dataset.json trains {len(regions)} regions but its regions_class_order "
            f"({order!r}) does not give a positive label value for each: nnU-Net cannot "
            "predict with it"
        )
    return list(order)


def _generic_colour(index: int) -> list[int]:
    # Golden-ratio hue steps keep neighbouring labels apart without a palette file.
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.65, 0.9)
    return [round(r * 255), round(g * 255), round(b * 255)]


def _private_code(label_name: str) -> Code:
    """A code in this node's private scheme for a structure no catalogue knows."""
    value = label_name
    if len(value) > 16:  # a code value is at most 16 characters (SH)
        # Cut alone, "lesion_category_1" and "lesion_category_2" got one code: two
        # structures no reader of the SEG could tell apart.
        digest = hashlib.sha256(label_name.encode("utf-8")).hexdigest()[:5]
        value = f"{label_name[:10].rstrip()}-{digest}"
    return Code(scheme=PRIVATE_SCHEME, code=value, meaning=label_name)


def catalogue_from_dataset(dataset: dict[str, Any], name: str) -> tuple[str | None, Catalogue]:
    """A catalogue for dataset.json's labels: a shipped one when ids and names all match,
    else one built from shipped codes where names are known and private codes where not.
    Names match as ``label_map_for`` matches them (ignoring case, spaces and dashes).

    Returns (shipped name or None, catalogue).
    """
    labels = {i: n for i, n in _dataset_labels(dataset).items() if not _marked_unused(n)}
    keys = {i: _label_key(n) for i, n in labels.items()}
    shipped = {n: load_catalogue(n) for n in shipped_catalogues()}
    for cat_name, cat in shipped.items():
        if {lab.id: _label_key(lab.name) for lab in cat.labels} == keys:
            return cat_name, cat
    known: dict[str, Label] = {}
    for cat in shipped.values():
        for lab in cat.labels:
            known.setdefault(_label_key(lab.name), lab)
    built: list[Label] = []
    unknown: list[str] = []
    for index, (label_id, label_name) in enumerate(sorted(labels.items())):
        # The SEG writes names in DICOM's default character set, at most 64 characters.
        text = to_dicom_text(label_name)
        if keys[label_id] in known:  # the codes of a shipped label, under the model's name
            built.append(known[keys[label_id]].model_copy(update={"id": label_id, "name": text}))
            continue
        if not keys[label_id]:
            raise ModelError(
                f"dataset.json label {label_id} {label_name!r} has no ASCII letters or digits "
                "to name a SEG segment with (DICOM's default character set): give a catalogue "
                "naming the model's labels (--catalogue FILE --trust-label-ids)"
            )
        unknown.append(label_name)
        words = keys[label_id].split("_")
        side = LEFT if "left" in words else RIGHT if "right" in words else None
        built.append(
            Label(
                id=label_id,
                name=text,
                category=ANATOMICAL_STRUCTURE,
                type=_private_code(text),
                modifier=side,
                color=_generic_colour(index),
                code_note="No published code known: private code from the dataset.json label name.",
            )
        )
    if unknown:
        logger.warning(
            "model %s: labels %s are in no shipped catalogue; they get private codes (%s). "
            "Give a catalogue with SNOMED CT codes for DICOM-SEG that other systems understand.",
            name,
            unknown,
            PRIVATE_SCHEME,
        )
    try:
        catalogue = Catalogue(
            name=f"{name}-labels",
            description=f"Built from dataset.json of model {name} at install.",
            source="dataset.json labels; codes from shipped catalogues where the name matched",
            labels=built,
        )
    except ValidationError as exc:  # two labels of one name once made DICOM text
        raise ModelError(
            f"the labels of dataset.json make no catalogue:\n{validation_problems(exc)}\n"
            "Give a catalogue naming the model's labels (--catalogue FILE)"
        ) from exc
    return None, catalogue


def _resolve_catalogue(descriptor: ModelDescriptor, root: Path) -> Catalogue:
    return load_catalogue(descriptor.catalogue, base_dir=root)


def _label_key(name: str) -> str:
    # "Kidney Left", "kidney-left" and "kidney_left" are one structure; "Läsion" is the
    # "Lasion" a catalogue can hold (catalogue_from_dataset names it so).
    return re.sub(r"[^a-z0-9]+", "_", to_dicom_text(name).lower()).strip("_")


def _marked_unused(name: str) -> bool:
    # Published models keep retired ids as "unused" (VIBE's label 20): background in the SEG.
    return _label_key(name).startswith("unused")


def label_map_for(
    catalogue: Catalogue,
    dataset: dict[str, Any],
    where: str,
    *,
    trust_ids: bool = False,
) -> dict[int, int] | None:
    """How the network's label ids become the catalogue's: None when they are the same.

    dataset.json names each id; a catalogue given by the operator must name the same
    structures, or every SEG would carry wrong labels (installing one part of
    TotalSegmentator with the ``total`` catalogue puts the vertebrae under organ names).
    Ids whose names match are kept; otherwise each name is looked up in the catalogue and
    the ids mapped. Names the catalogue lacks are an error unless ``trust_ids`` (the operator
    vouches that only the spelling differs). Labels named ``unused...`` that the catalogue
    lacks map to 0 (background). A region-trained model's label map holds the values of its
    ``regions_class_order``, which no dataset.json name describes: the catalogue must have
    each of them, and they are kept.
    """
    order = _region_values(dataset)
    if order is not None:
        missing = sorted(set(order) - set(catalogue.by_id()))
        if missing:
            # Installed, every job would fail on a value the SEG cannot describe.
            raise ModelError(
                f"{where}: the model predicts regions written as the values of "
                f"regions_class_order {order}; catalogue {catalogue.name!r} has no label "
                f"{', '.join(map(str, missing))}: give a catalogue whose labels {order} name "
                "what those voxels are"
            )
        logger.info(
            "%s: region-based model; catalogue %r names its label values %s",
            where,
            catalogue.name,
            ", ".join(f"{i} {catalogue.label(i).name}" for i in order),
        )
        return None
    labels = _dataset_labels(dataset)
    by_id = catalogue.by_id()
    by_name = {_label_key(lab.name): lab.id for lab in catalogue.labels}
    dropped = {
        i: 0 for i, n in labels.items() if _marked_unused(n) and _label_key(n) not in by_name
    }
    if dropped:
        logger.info(
            "%s: dataset.json labels %s are marked unused; their voxels stay background",
            where,
            [f"{i} {labels[i]}" for i in sorted(dropped)],
        )
        labels = {i: n for i, n in labels.items() if i not in dropped}
    matched = {i: by_name[_label_key(n)] for i, n in labels.items() if _label_key(n) in by_name}
    targets = list(matched.values())
    # Names compare in their first 64 ASCII characters: two structures alike in those match
    # one catalogue label and would share its segment.
    shared = {i: c for i, c in matched.items() if targets.count(c) > 1}
    unmatched = {i: n for i, n in labels.items() if i not in matched or i in shared}
    mapping: dict[int, int] | None
    if all(i in by_id and _label_key(by_id[i].name) == _label_key(n) for i, n in labels.items()):
        mapping = None
    elif not unmatched:
        mapping = dict(sorted(matched.items()))
        logger.info(
            "%s: dataset.json label ids differ from catalogue %r; matched by name: %s",
            where,
            catalogue.name,
            ", ".join(f"{labels[i]} {i}->{c}" for i, c in mapping.items() if i != c),
        )
    elif trust_ids:
        missing = sorted(set(labels) - set(by_id))
        if missing:
            raise ModelError(
                f"{where}: the catalogue {catalogue.name!r} has no entry for label ids "
                f"{missing} that dataset.json declares"
            )
        logger.warning(
            "%s: dataset.json names %s differ from catalogue %r; its ids are used as asked "
            "(--trust-label-ids)",
            where,
            [f"{i} {n}" for i, n in sorted(unmatched.items())],
            catalogue.name,
        )
        mapping = None
    else:
        problems = [
            f"label {i} {n!r} matches catalogue label {shared[i]} {by_id[shared[i]].name!r}, "
            "as another label does"
            if i in shared
            else f"label {i} is {n!r} in dataset.json but {by_id[i].name!r} in the catalogue"
            if i in by_id
            else f"label {i} {n!r} is not in the catalogue"
            for i, n in sorted(unmatched.items())
        ]
        more = f"; and {len(problems) - 6} more" if len(problems) > 6 else ""
        shown = "; ".join(problems[:6]) + more
        raise ModelError(
            f"{where}: the model's labels do not match catalogue {catalogue.name!r}: {shown}. "
            "Give the catalogue that fits the model; a model published in several parts "
            "(TotalSegmentator) is installed with all its parts at once "
            "(`dicom-node models add PART1 PART2 ...`); if only the spelling of the names "
            "differs and the ids are right, add --trust-label-ids"
        )
    if dropped:  # an explicit map is needed to send them to 0
        return {**(mapping or {i: i for i in labels}), **dropped}
    return mapping


# --- loading --------------------------------------------------------------------------------


def _load_part(name: str, folder: Path, p: PartDescriptor) -> ModelPart:
    nnunet_dir = find_nnunet_folder(folder, p.folds, p.checkpoint).path
    return ModelPart(
        name=name,
        nnunet_dir=nnunet_dir,
        folds=list(p.folds),
        checkpoint=p.checkpoint,
        configuration=p.configuration,
        trainer=p.trainer,
        label_map=p.label_map,
        weights_sha256=p.weights_sha256
        or compute_weights_sha256(nnunet_dir, p.folds, p.checkpoint),
    )


def _load_from_root(root: Path, builtin: bool = False) -> ModelInfo:
    d = read_descriptor(root / DESCRIPTOR)
    if "orientation" not in d.model_fields_set and d.catalogue in TOTALSEGMENTATOR_CATALOGUES:
        # Installed before model.yaml said: TotalSegmentator's networks learnt RAS arrays.
        d = d.model_copy(update={"orientation": "RAS"})
    catalogue = _resolve_catalogue(d, root)
    if d.parts is None:
        # A model of one part: its top-level fields describe that part.
        whole = PartDescriptor(
            folder=NNUNET_SUBDIR,
            **d.model_dump(
                include={"folds", "checkpoint", "configuration", "trainer", "plans",
                         "weights_sha256", "label_map"}
            ),
        )  # fmt: skip
        parts: tuple[ModelPart, ...] = (_load_part(d.name, root / NNUNET_SUBDIR, whole),)
        sha = parts[0].weights_sha256
    else:
        parts = tuple(_load_part(p.folder, root / PARTS_SUBDIR / p.folder, p) for p in d.parts)
        sha = d.weights_sha256 or combine_part_hashes(p.weights_sha256 for p in parts)
    for part in parts:
        _check_label_map_fits(part, catalogue, root)
    return ModelInfo(
        name=d.name,
        root=root,
        descriptor=d,
        catalogue=catalogue,
        weights_sha256=sha,
        parts=parts,
        builtin=builtin,
    )


def _check_label_map_fits(part: ModelPart, catalogue: Catalogue, root: Path) -> None:
    # A hand-edited model.yaml must not map to ids the SEG encoder cannot describe.
    missing = sorted(set((part.label_map or {}).values()) - {0, *catalogue.by_id()})
    if missing:
        raise ModelError(
            f"{root / DESCRIPTOR}: label_map of {part.name} maps to ids {missing} that "
            f"catalogue {catalogue.name!r} does not have"
        )


def _unreadable(root: Path, exc: OSError) -> ModelError:
    return ModelError(
        f"{root} cannot be read ({exc.strerror or exc}): the user running dicom-node needs "
        f"read access to the model's folder and files (e.g. chmod -R a+rX {root})"
    )


def load_model_info(name: str, models_dir: Path) -> ModelInfo:
    """The installed model ``name``, else the built-in one of that name."""
    if not NAME_RE.match(name):
        raise ModelError(f"model name {name!r} is invalid")
    root = models_dir / name
    try:
        if (root / DESCRIPTOR).is_file():
            return _load_from_root(root)
    except OSError as exc:
        raise _unreadable(root, exc) from exc
    if name in BUILTIN_MODELS and (BUILTIN_MODELS[name] / DESCRIPTOR).is_file():
        return _load_from_root(BUILTIN_MODELS[name], builtin=True)
    available = sorted({m.name for m in list_models(models_dir)})
    raise ModelError(
        f"model {name!r} is not installed in {models_dir}; available: "
        f"{', '.join(available) or 'none'} (install one with `dicom-node models add PATH`)"
    )


def scan_models(models_dir: Path) -> tuple[list[ModelInfo], list[str]]:
    """Installed models, then built-in ones not shadowed by an installed model of that name;
    and a line for each model folder that cannot be used, saying why.

    One broken or unreadable folder does not hide the rest.
    """
    out: list[ModelInfo] = []
    problems: list[str] = []
    try:
        roots = (
            sorted(p for p in models_dir.iterdir() if not p.name.startswith("."))
            if models_dir.is_dir()
            else []
        )
    except OSError as exc:
        problems.append(str(_unreadable(models_dir, exc)))
        roots = []
    for root in roots:
        try:
            if (root / DESCRIPTOR).is_file():
                out.append(_load_from_root(root))
        except OSError as exc:
            problems.append(str(_unreadable(root, exc)))
        except ModelError as exc:
            problems.append(f"{root} is unusable: {exc}")
    names = {m.name for m in out}
    for name, root in sorted(BUILTIN_MODELS.items()):
        if name not in names and (root / DESCRIPTOR).is_file():
            try:
                out.append(_load_from_root(root, builtin=True))
            except (ModelError, OSError) as exc:
                problems.append(f"built-in model {name} is unusable: {exc}")
    return out, problems


def list_models(models_dir: Path) -> list[ModelInfo]:
    """``scan_models``' models; its problems are logged."""
    models, problems = scan_models(models_dir)
    for problem in problems:
        logger.warning("%s", problem)
    return models


# --- installing -----------------------------------------------------------------------------


def _default_name(src: Path, found: NnunetFolder) -> str:
    parts = [src.stem if src.is_file() else src.name, *found.inner.parts]
    for part in reversed(parts):
        m = re.match(r"^Dataset\d+_(.+)$", part)
        if m:
            return _safe(m.group(1))
    return _safe(src.stem if src.is_file() else src.name)


def _safe(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:64].lower()
    if not name or not NAME_RE.match(name):
        raise ModelError(f"cannot derive a model name from {text!r}: give one with --name")
    return name


def _existing_descriptor(src: Path) -> ModelDescriptor | None:
    if src.is_dir() and (src / DESCRIPTOR).is_file():
        return read_descriptor(src / DESCRIPTOR)
    if src.is_file() and zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as zf:
            if DESCRIPTOR in zf.namelist():
                try:
                    raw = yaml.safe_load(zf.read(DESCRIPTOR))
                    return ModelDescriptor.model_validate(raw)
                except yaml.YAMLError as exc:
                    raise ModelError(f"{src}: {DESCRIPTOR} is invalid: {exc}") from exc
                except ValidationError as exc:
                    raise ModelError(
                        f"{src}: {DESCRIPTOR} is invalid:\n{validation_problems(exc)}"
                    ) from exc
    return None


def _guess_modality(channels: list[str]) -> Literal["MR", "CT"]:
    return "CT" if any(c.strip().upper() == "CT" for c in channels) else "MR"


def _check_name(model_name: str) -> str:
    if not NAME_RE.match(model_name):
        raise ModelError(
            f"model name {model_name!r} is invalid: use letters, digits, '.', '_', '-'"
        )
    return model_name


STAGING_PREFIX = ".install-"
ASIDE_PREFIX = ".replaced-"  # the previous version during --replace, deleted after
REMOVING_PREFIX = ".removing-"  # a removed model, renamed out of sight, then deleted
# <prefix><model>-<host>-<pid>-<random>: which process on which machine owns the folder.
_OWNED_RE = re.compile(r"^\.(install|replaced|removing)-(.+)-([A-Za-z0-9]+)-(\d+)-[a-z0-9_]+$")
# Staging folders of versions that did not record their process: surely dead after a day.
_UNOWNED_STAGING_AGE_S = 24 * 3600


def _host_tag() -> str:
    # Models folders may be shared between machines: a pid is only checked on its own host.
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process id we wrote: leave the folder alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, but another user's
    return True


def _clean_interrupted_installs(models_dir: Path) -> None:
    """Tidy what killed installs left: their staging folders go, and a model that a
    ``--replace`` set aside comes back when its new version was never renamed in."""
    host = _host_tag()
    try:
        entries = sorted(models_dir.iterdir())
    except OSError as exc:
        logger.warning("cannot look for interrupted installs in %s: %s", models_dir, exc)
        return
    for entry in entries:
        owned = _OWNED_RE.match(entry.name)
        try:
            if owned is None:
                if (
                    entry.name.startswith(STAGING_PREFIX)
                    and entry.is_dir()
                    and time.time() - entry.stat().st_mtime > _UNOWNED_STAGING_AGE_S
                ):
                    shutil.rmtree(entry)
                    logger.info("removed %s, left by an install that was stopped", entry)
                continue
            kind, name, owner_host, pid = owned.groups()
            if owner_host != host or _process_alive(int(pid)):
                continue
            final = models_dir / name
            if kind == "replaced" and not final.exists() and NAME_RE.match(name):
                entry.rename(final)
                logger.warning(
                    "model %s: restored the installed version, which an install with --replace "
                    "had set aside when it was stopped; the new version was not installed",
                    name,
                )
            else:
                shutil.rmtree(entry)
                logger.info("removed %s, left by an install that was stopped", entry)
        except OSError as exc:
            logger.warning("cannot tidy %s, left by an install that was stopped: %s", entry, exc)


def remove_model(models_dir: Path, name: str) -> Path:
    """Take an installed model out of ``models_dir``: renamed out of sight at once (a worker
    finds it gone at its next job of it; a job running now finishes), then deleted. A stopped
    removal's folder is deleted by the next ``models add``. Returns where it was."""
    final = models_dir / name
    if not NAME_RE.match(name) or not final.is_dir():
        built_in = " (it is built in, and cannot be removed)" if name in BUILTIN_MODELS else ""
        raise ModelError(f"model {name!r} is not installed in {models_dir}{built_in}")
    owner = f"{name}-{_host_tag()}-{os.getpid()}-"
    aside = models_dir / f"{REMOVING_PREFIX}{owner}{secrets.token_hex(4)}"
    try:
        final.rename(aside)
    except OSError as exc:
        raise ModelError(
            f"cannot remove model {name!r} from {final}: {exc.strerror or exc}"
        ) from exc
    shutil.rmtree(aside, ignore_errors=True)
    logger.info("model %s removed from %s", name, final)
    return final


def _make_models_dir(models_dir: Path) -> None:
    """``models_dir`` and the parents it lacks, each readable by all: the commands run with
    umask 027 (patient data), and the service may run as another user than the one
    installing (root, with sudo): it could not reach any model."""
    missing = []
    folder = models_dir
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for each in reversed(missing):
        each.mkdir(exist_ok=True)
        each.chmod(0o755)


def _make_readable(folder: Path) -> None:
    # The service may run as another user than the one installing: it must read the model.
    for path in (folder, *folder.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _install_failed(exc: OSError, model_name: str, models_dir: Path) -> ModelError:
    reason = exc.strerror or str(exc)
    path = exc.filename2 or exc.filename  # shutil's copies give the destination second
    where = f" ({path})" if path else ""
    full = exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    hint = " Free space there, or set inference.models_dir to a larger disk." if full else ""
    return ModelError(
        f"cannot install model {model_name!r} into {models_dir}: {reason}{where}. Nothing was "
        f"installed and an installed model of that name is unchanged.{hint}"
    )


@contextlib.contextmanager
def _installing(models_dir: Path, model_name: str, overwrite: bool) -> Iterator[Path]:
    """A staging folder beside the models, renamed to ``<models_dir>/<name>`` only when the
    body succeeds: a failed install leaves nothing behind and an installed model untouched."""
    try:
        _make_models_dir(models_dir)
    except OSError as exc:
        raise _install_failed(exc, model_name, models_dir) from exc
    _clean_interrupted_installs(models_dir)
    final = models_dir / model_name
    if final.exists() and not overwrite:
        raise ModelError(
            f"model {model_name!r} is already installed at {final}: install over it with "
            "replace (dicom-node models add --replace), or choose another name"
        )
    owner = f"{model_name}-{_host_tag()}-{os.getpid()}-"
    staging = models_dir / f"{STAGING_PREFIX}{owner}{secrets.token_hex(4)}"
    try:
        staging.mkdir()
    except OSError as exc:
        raise _install_failed(exc, model_name, models_dir) from exc
    try:
        yield staging
        _make_readable(staging)
        if overwrite and final.exists():
            # Never a moment without a whole model: the old one is set aside, not deleted,
            # until the new one is in (a killed install puts it back next time).
            aside = models_dir / f"{ASIDE_PREFIX}{owner}{secrets.token_hex(4)}"
            final.rename(aside)
            try:
                staging.rename(final)
            except BaseException:
                aside.rename(final)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            try:
                staging.rename(final)  # refused where a model came meanwhile: never replaced
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                raise ModelError(
                    f"model {model_name!r} was installed at {final} by another install while "
                    "this one copied: it is left as that install made it; install over it "
                    "with replace (dicom-node models add --replace), or choose another name"
                ) from exc
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise _install_failed(exc, model_name, models_dir) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_new_descriptor(
    fields: dict[str, Any], overrides: dict[str, Any], channels: int, staging: Path
) -> None:
    """model.yaml from the derived ``fields`` and the operator's ``overrides`` (None: keep)."""
    fields = {**fields, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        descriptor = ModelDescriptor.model_validate(fields)
    except ValidationError as exc:
        raise ModelError(
            f"model descriptor for {fields['name']!r} is invalid:\n{validation_problems(exc)}"
        ) from exc
    if len(descriptor.input_channels) != channels:
        raise ModelError(
            f"model.yaml lists {len(descriptor.input_channels)} input channels but "
            f"dataset.json has {channels}"
        )
    write_descriptor(descriptor, staging / DESCRIPTOR)


def _check_folds(folds: Iterable[Fold] | None) -> list[Fold] | None:
    if folds is None:
        return None
    chosen = list(folds)
    repeated = sorted({str(f) for f in chosen if chosen.count(f) > 1})
    if repeated:
        raise ModelError(
            f"folds: fold {', '.join(repeated)} is given more than once; give each fold once "
            "(e.g. 0,1,2,3,4)"
        )
    return chosen


def _check_checkpoint(checkpoint: str | None) -> str | None:
    try:
        return None if checkpoint is None else _plain_checkpoint(checkpoint)
    except ValueError as exc:
        raise ModelError(f"{exc} (checkpoint_final.pth or checkpoint_best.pth)") from exc


def _config_value(plans: dict[str, Any], configuration: str | None, key: str) -> Any:
    """A configuration's ``key`` in plans.json, following ``inherits_from`` as nnU-Net does."""
    configs = plans.get("configurations")
    seen: set[str] = set()
    while (
        isinstance(configs, dict)
        and isinstance(configuration, str)
        and configuration in configs
        and configuration not in seen
    ):
        seen.add(configuration)
        config = configs[configuration]
        if not isinstance(config, dict):
            return None
        if key in config:
            return config[key]
        configuration = config.get("inherits_from")
    return None


def _config_spacing(plans: dict[str, Any], configuration: str | None) -> list[float] | None:
    """The target spacing of a configuration in plans.json."""
    spacing = _config_value(plans, configuration, "spacing")
    if isinstance(spacing, list) and all(isinstance(v, (int, float)) for v in spacing):
        return [float(v) for v in spacing]
    return None


def _loaded_configuration(
    configuration: str | None, nnunet_dir: Path, folds: Sequence[Fold], checkpoint: str
) -> str | None:
    """The configuration a job loads: model.yaml's, else (a renamed trainer folder names
    none) the first checkpoint's, as the predictor reads it."""
    if configuration is not None or not folds:
        return configuration
    return checkpoint_configuration(nnunet_dir / fold_dir(folds[0]) / checkpoint)


def _check_configuration(plans: dict[str, Any], configuration: str | None, where: str) -> None:
    """Refuse at install a configuration a job could not run (found when loading otherwise)."""
    if configuration is None:
        return  # a renamed trainer folder: the checkpoint names it when loaded
    configs = plans.get("configurations")
    if not isinstance(configs, dict) or configuration not in configs:
        names = ", ".join(configs) if isinstance(configs, dict) else "none"
        raise ModelError(
            f"{where}: the trained-model folder is of configuration {configuration!r} but its "
            f"plans.json has no such configuration (it has: {names}); copy the folder again "
            "from where the model was trained"
        )
    previous = _config_value(plans, configuration, "previous_stage")
    if previous is not None:
        # Its network takes the previous stage's segmentation as extra input channels.
        raise ModelError(
            f"{where}: {configuration} is the second stage of nnU-Net's cascade: it needs the "
            f"{previous} configuration's segmentation of each series as input, which the node "
            f"does not run. Install the {previous} or the 3d_fullres configuration instead "
            "(--configuration)"
        )


def _default_tile_step_size(
    cat_ref: str, plans: dict[str, Any], configuration: str | None, *, parts: bool = False
) -> float:
    """As TotalSegmentator runs its models: 0.8 for its "total" task at 1.5 mm (the five
    parts, or one of them), 0.5 for its 3 mm model, total_mr and everything else."""
    if cat_ref != "total":
        return TILE_STEP_SIZE
    spacing = _config_spacing(plans, configuration)
    if parts or (spacing and max(spacing) < 3.0):
        return TOTALSEGMENTATOR_TOTAL_TILE_STEP_SIZE
    return TILE_STEP_SIZE


def _declared_orientation(
    dataset: dict[str, Any], plans: dict[str, Any], where: str
) -> tuple[str, str] | None:
    """(orientation, the file saying so) from one nnU-Net model's json files, or None."""
    if dataset.get("orientation") is not None:  # TotalVibeSegmentator writes it
        value = parse_orientation(dataset["orientation"], f"{where}: dataset.json orientation")
        return value, "dataset.json"
    if plans.get("image_reader_writer") == "NibabelIOWithReorient":
        return "RAS", "plans.json (NibabelIOWithReorient reads images as RAS)"
    return None


def _is_totalsegmentator(cat_ref: str, names: Iterable[str]) -> bool:
    return cat_ref in TOTALSEGMENTATOR_CATALOGUES or any("totalseg" in n.lower() for n in names)


def _choose_orientation(
    model_name: str,
    override: str | None,
    existing: ModelDescriptor | None,
    json_files: Sequence[tuple[dict[str, Any], dict[str, Any], str]],
    totalsegmentator: bool,
) -> tuple[str, str | None]:
    """The model's orientation and, where it was assumed, a note for the operator.

    The operator's ``--orientation``, else an installed model.yaml that gives one, else what
    the model's files (``json_files``: each nnU-Net model's dataset.json, plans.json and
    where it is) say, else RAS for TotalSegmentator, else LPS (assumed).
    """
    if override is not None:
        return parse_orientation(override, "--orientation"), None
    if existing is not None and "orientation" in existing.model_fields_set:
        return existing.orientation, None
    declared = [_declared_orientation(*files) for files in json_files]
    said = {value for value, _ in filter(None, declared)}
    if len(said) > 1:
        raise ModelError(
            f"model {model_name}: its parts were trained on differently oriented images "
            f"({', '.join(sorted(said))}); they cannot run as one model"
        )
    if said:
        value = said.pop()
        why = next(d[1] for d in declared if d is not None and d[0] == value)
        logger.info("model %s: orientation %s, from %s", model_name, value, why)
        return value, None
    if totalsegmentator:
        logger.info("model %s: orientation RAS, as TotalSegmentator's models", model_name)
        return "RAS", None
    note = (
        f"orientation {DEFAULT_ORIENTATION} assumed: nothing in the model says how its training "
        "images were oriented. If it was trained on NIfTI files turned to RAS (nibabel "
        "as_closest_canonical, NibabelIOWithReorient), install it again with --replace "
        "--orientation RAS. Check left and right on one real study before routing to it."
    )
    logger.info("model %s: orientation %s assumed", model_name, DEFAULT_ORIENTATION)
    return DEFAULT_ORIENTATION, note


def install_model(
    src: Path | Sequence[Path],
    models_dir: Path,
    name: str | None = None,
    *,
    catalogue: str | Path | None = None,
    trust_label_ids: bool = False,
    modality: Literal["MR", "CT"] | None = None,
    folds: Iterable[Fold] | None = None,
    checkpoint: str | None = None,
    configuration: str | None = None,
    tile_step_size: float | None = None,
    use_mirroring: bool | None = None,
    description: str | None = None,
    version: str | None = None,
    orientation: str | None = None,
    roi_model: str | None = None,
    overwrite: bool = False,
) -> ModelInfo:
    """Install a trained-model folder or export zip as ``<models_dir>/<name>``.

    Keeps ``model.yaml`` when ``src`` has one (keyword arguments override its fields), else
    writes one derived from the folder name, the folds present and ``dataset.json``. The
    catalogue is ``catalogue`` (a shipped name or a YAML file, copied in), else the source's,
    else one built from ``dataset.json`` labels. The weights' sha256 is cached in model.yaml.
    ``orientation`` (e.g. RAS) overrides what is derived from the model's files
    (``_choose_orientation``); an assumed one is in the returned info's ``notes``.
    ``configuration`` (e.g. 2d) chooses among the configurations an export zip or dataset
    folder holds; by default 3d_fullres, the others named in ``notes``.

    Several sources make one model of parts (``install_parts``).
    """
    folds = _check_folds(folds)
    checkpoint = _check_checkpoint(checkpoint)
    overrides: dict[str, Any] = {
        "modality": modality,
        "tile_step_size": tile_step_size,
        "use_mirroring": use_mirroring,
        "description": description,
        "version": version,
        "roi_model": roi_model,
    }
    if roi_model is not None:
        # Installed first: its jobs would fail at every series otherwise.
        load_model_info(roi_model, models_dir)
    sources = [Path(src)] if isinstance(src, (str, Path)) else [Path(s) for s in src]
    if not sources:
        raise ModelError("give the model's folder or zip")
    existing = _existing_descriptor(sources[0]) if len(sources) == 1 else None
    if len(sources) > 1 or (existing is not None and existing.parts is not None):
        if trust_label_ids:
            raise ModelError(
                "--trust-label-ids is for a model of one part: parts are matched to the "
                "catalogue by their label names"
            )
        return install_parts(
            sources,
            models_dir,
            name,
            catalogue=catalogue,
            folds=folds,
            checkpoint=checkpoint,
            configuration=configuration,
            orientation=orientation,
            overwrite=overwrite,
            **overrides,
        )
    source = sources[0]
    ckpt = checkpoint or (existing.checkpoint if existing else "checkpoint_final.pth")
    fold_choice = folds if folds is not None else (existing.folds if existing else None)
    found = find_nnunet_folder(source, fold_choice, ckpt, configuration)
    model_name = _check_name(name or (existing.name if existing else _default_name(source, found)))

    with _installing(models_dir, model_name, overwrite) as staging:
        nnunet_dest = staging / NNUNET_SUBDIR
        copy_model_files(found, nnunet_dest)
        dataset = _read_json(nnunet_dest / "dataset.json")

        cat_ref: str
        cat_obj: Catalogue
        if catalogue is not None:
            cat_ref, cat_obj = _install_catalogue(catalogue, staging, base_dir=Path.cwd())
        elif existing is not None and source.is_dir():
            cat_ref, cat_obj = _install_catalogue(existing.catalogue, staging, base_dir=source)
        elif existing is not None:
            cat_ref, cat_obj = _catalogue_from_zip(source, existing.catalogue, staging)
        else:
            shipped, cat_obj = catalogue_from_dataset(dataset, model_name)
            if shipped is not None:
                cat_ref = shipped
            else:
                (staging / CATALOGUE_FILE).write_text(dump_catalogue(cat_obj), encoding="utf-8")
                cat_ref = CATALOGUE_FILE
        label_map = label_map_for(cat_obj, dataset, str(source), trust_ids=trust_label_ids)
        plans = _read_json(nnunet_dest / "plans.json")
        model_orientation, note = _choose_orientation(
            model_name,
            orientation,
            existing,
            [(dataset, plans, str(source))],
            _is_totalsegmentator(
                cat_ref, [source.name, *found.inner.parts, str(dataset.get("name", ""))]
            ),
        )

        channels = _channels(dataset)
        base = existing.model_dump() if existing else {}
        base.pop("weights_sha256", None)  # recomputed below from the copied files
        fields: dict[str, Any] = {
            "name": model_name,
            "version": "1.0",
            "description": f"nnU-Net v2 model installed from {source.name}",
            "modality": _guess_modality(channels),
            "input_channels": channels,
            "tile_step_size": _default_tile_step_size(cat_ref, plans, found.configuration),
            "use_mirroring": False,
            "configuration": found.configuration,
            "trainer": found.trainer,
            "plans": found.plans,
            **base,
        }
        fields.update(
            {
                "name": model_name,
                "folds": list(found.folds),
                "checkpoint": ckpt,
                "catalogue": cat_ref,
                "label_map": label_map,
                "orientation": model_orientation,
            }
        )
        if configuration is not None:  # asked for: before what the source's model.yaml says
            fields["configuration"] = found.configuration
        _check_configuration(
            plans,
            _loaded_configuration(fields["configuration"], nnunet_dest, found.folds, ckpt),
            str(source),
        )
        fields["weights_sha256"] = compute_weights_sha256(nnunet_dest, found.folds, ckpt)
        _write_new_descriptor(fields, overrides, len(channels), staging)
    info = _load_from_root(models_dir / model_name)
    logger.info(
        "installed model %s from %s: folds %s, %d labels, orientation %s, weights sha256 %s",
        model_name,
        source,
        info.folds_text(),
        len(info.catalogue.labels),
        info.descriptor.orientation,
        info.weights_sha256[:12],
    )
    notes = [note] if note else []
    notes += _other_configurations_notes([(source.name, found)])
    roi = dataset.get("roi")
    if roi is not None and info.descriptor.roi_model is None:
        # TotalVibeSegmentator's way of saying its second input is another model's output.
        notes.append(
            f"dataset.json names a ROI model (Dataset{roi}) whose segmentation is this "
            "model's second input: install that model first, then this one again with "
            "--roi-model NAME --replace"
        )
    return dataclasses.replace(info, notes=tuple(notes))


def _other_configurations_notes(founds: Sequence[tuple[str, NnunetFolder]]) -> list[str]:
    """What each source (``where``) holds beside the configuration installed from it."""
    return [
        f"{where} also holds the {', '.join(found.other_configurations)} configuration(s) of "
        f"this model; {found.configuration} was installed (choose another with "
        "--configuration NAME --replace)"
        for where, found in founds
        if found.other_configurations
    ]


def _catalogue_for_parts(
    part_labels: list[dict[int, str]], model_name: str, staging: Path
) -> tuple[str, Catalogue]:
    """The shipped catalogue naming exactly the parts' structures (TotalSegmentator's parts
    make ``total`` or ``total_mr``), else one built from their names, numbered in part order."""
    ordered: dict[str, str] = {}
    for labels in part_labels:
        for _, label_name in sorted(labels.items()):
            if not _marked_unused(label_name):
                ordered.setdefault(_label_key(label_name), label_name)
    for cat_name in shipped_catalogues():
        cat = load_catalogue(cat_name)
        if {_label_key(lab.name) for lab in cat.labels} == set(ordered):
            return cat_name, cat
    combined = {"background": 0, **{n: i for i, n in enumerate(ordered.values(), start=1)}}
    shipped, built = catalogue_from_dataset({"labels": combined}, model_name)
    if shipped is not None:
        return shipped, built
    (staging / CATALOGUE_FILE).write_text(dump_catalogue(built), encoding="utf-8")
    return CATALOGUE_FILE, built


def _part_folder(index: int, source: Path, found: NnunetFolder) -> str:
    try:
        slug = _default_name(source, found)
    except ModelError:
        slug = "part"
    return f"{index}-{slug}"[:64].rstrip("._-")


def install_parts(
    sources: Sequence[Path],
    models_dir: Path,
    name: str | None,
    *,
    catalogue: str | Path | None = None,
    folds: Iterable[Fold] | None = None,
    checkpoint: str | None = None,
    configuration: str | None = None,
    orientation: str | None = None,
    overwrite: bool = False,
    **overrides: Any,
) -> ModelInfo:
    """Install a model published as several nnU-Net models, each segmenting some of the
    structures (TotalSegmentator's ``total``: five parts; ``total_mr``: two), as one model.

    ``sources`` are the parts' folders or zips in the order they run (where two parts label
    the same voxel, the later one's label is kept, as TotalSegmentator combines them), or one
    installed model of parts (copied with its model.yaml). Each part's labels are matched to
    the catalogue by name; the catalogue is ``catalogue``, else the installed model's, else
    the shipped one naming exactly the parts' structures, else one built from the names.
    """
    fold_choice = _check_folds(folds)
    checkpoint = _check_checkpoint(checkpoint)
    _check_distinct_sources(sources)
    existing = _existing_descriptor(sources[0]) if len(sources) == 1 else None
    specs: list[tuple[Path, PartDescriptor | None]]
    if existing is not None and existing.parts is not None:
        if not sources[0].is_dir():
            raise ModelError(
                f"{sources[0]}: a model of parts is installed from its parts' folders or zips, "
                "or from its installed folder, not from a zip of that folder"
            )
        specs = [(sources[0] / PARTS_SUBDIR / p.folder, p) for p in existing.parts]
    else:
        existing = None
        specs = [(s, None) for s in sources]
    chosen = name or (existing.name if existing else None)
    if not chosen:
        raise ModelError("a model of several parts needs a name: give --name")
    model_name = _check_name(chosen)
    founds = [
        (
            source,
            old,
            find_nnunet_folder(
                source,
                fold_choice if fold_choice is not None else (old.folds if old else None),
                checkpoint or (old.checkpoint if old else "checkpoint_final.pth"),
                configuration,
            ),
        )
        for source, old in specs
    ]

    with _installing(models_dir, model_name, overwrite) as staging:
        datasets: list[dict[str, Any]] = []
        folders: list[str] = []
        for index, (source, old, found) in enumerate(founds, start=1):
            folder = old.folder if old else _part_folder(index, source, found)
            copy_model_files(found, staging / PARTS_SUBDIR / folder)
            folders.append(folder)
            datasets.append(_read_json(staging / PARTS_SUBDIR / folder / "dataset.json"))
        plans = [_read_json(staging / PARTS_SUBDIR / f / "plans.json") for f in folders]
        channels = [_channels(d) for d in datasets]
        for (source, _, _), chans in zip(founds[1:], channels[1:], strict=True):
            if [c.lower() for c in chans] != [c.lower() for c in channels[0]]:
                raise ModelError(
                    f"the parts take different inputs: {founds[0][0]} takes {channels[0]}, "
                    f"{source} takes {chans}"
                )

        cat_ref: str
        cat_obj: Catalogue
        if catalogue is not None:
            cat_ref, cat_obj = _install_catalogue(catalogue, staging, base_dir=Path.cwd())
        elif existing is not None:
            cat_ref, cat_obj = _install_catalogue(existing.catalogue, staging, base_dir=sources[0])
        else:
            # Only here are the parts' own label names needed: a given catalogue is matched
            # to each part (a region-trained part's values included) by label_map_for.
            part_labels: list[dict[int, str]] = []
            for (source, _, _), dataset in zip(founds, datasets, strict=True):
                try:
                    part_labels.append(_dataset_labels(dataset))
                except ModelError as exc:
                    raise ModelError(f"{source}: {exc}") from exc
            cat_ref, cat_obj = _catalogue_for_parts(part_labels, model_name, staging)

        parts: list[PartDescriptor] = []
        for index, ((source, old, found), folder, dataset) in enumerate(
            zip(founds, folders, datasets, strict=True), start=1
        ):
            where = f"{source} (part {index})"
            parts.append(
                PartDescriptor(
                    folder=folder,
                    source=old.source if old else source.name,
                    folds=list(found.folds),
                    checkpoint=found.checkpoint,
                    configuration=found.configuration or (old.configuration if old else None),
                    trainer=found.trainer or (old.trainer if old else None),
                    plans=found.plans or (old.plans if old else None),
                    weights_sha256=compute_weights_sha256(
                        staging / PARTS_SUBDIR / folder, found.folds, found.checkpoint
                    ),
                    label_map=_part_label_map(cat_obj, dataset, where),
                )
            )
        _check_distinct_weights(parts, founds)
        for index, ((source, _, _), part, part_plans) in enumerate(
            zip(founds, parts, plans, strict=True), start=1
        ):
            _check_configuration(
                part_plans,
                _loaded_configuration(
                    part.configuration,
                    staging / PARTS_SUBDIR / part.folder,
                    part.folds,
                    part.checkpoint,
                ),
                f"{source} (part {index})",
            )
        model_orientation, note = _choose_orientation(
            model_name,
            orientation,
            existing,
            [
                (d, p, f"{source} (part {i})")
                for i, ((source, _, _), d, p) in enumerate(
                    zip(founds, datasets, plans, strict=True), start=1
                )
            ],
            _is_totalsegmentator(
                cat_ref,
                [
                    *(n for source, _, found in founds for n in (source.name, *found.inner.parts)),
                    *(str(d.get("name", "")) for d in datasets),
                ],
            ),
        )
        covered = {i for part in parts for i in (part.label_map or {}).values()}
        uncovered = [lab.name for lab in cat_obj.labels if lab.id not in covered]
        if uncovered:
            logger.warning(
                "model %s: no part segments %d of catalogue %r's labels: %s",
                model_name,
                len(uncovered),
                cat_obj.name,
                uncovered,
            )
        base = (
            existing.model_dump(exclude={"parts", "weights_sha256", "catalogue", "name"})
            if existing
            else {}
        )
        fields: dict[str, Any] = {
            "version": "1.0",
            "description": f"nnU-Net v2 model of {len(parts)} parts installed from "
            + ", ".join(s.name for s in sources),
            "modality": _guess_modality(channels[0]),
            "input_channels": channels[0],
            "tile_step_size": _default_tile_step_size(
                cat_ref, plans[0], founds[0][2].configuration, parts=True
            ),
            "use_mirroring": False,
            **base,
            "name": model_name,
            "orientation": model_orientation,
            "catalogue": cat_ref,
            "parts": [p.model_dump() for p in parts],
            "weights_sha256": combine_part_hashes(str(p.weights_sha256) for p in parts),
        }
        _write_new_descriptor(fields, overrides, len(channels[0]), staging)
    info = _load_from_root(models_dir / model_name)
    logger.info(
        "installed model %s from %d parts (%s): folds %s, %d labels, orientation %s, "
        "weights sha256 %s",
        model_name,
        len(parts),
        ", ".join(folders),
        info.folds_text(),
        len(info.catalogue.labels),
        info.descriptor.orientation,
        info.weights_sha256[:12],
    )
    notes = [note] if note else []
    notes += _other_configurations_notes(
        [(f"{source.name} (part {i})", found) for i, (source, _, found) in enumerate(founds, 1)]
    )
    return dataclasses.replace(info, notes=tuple(notes))


def _check_distinct_sources(sources: Sequence[Path]) -> None:
    seen: dict[Path, Path] = {}
    for source in sources:
        key = source.resolve()
        if key in seen:
            raise ModelError(
                f"{source} is given twice: give each part of the model once, in the order they run"
            )
        seen[key] = source


def _check_distinct_weights(
    parts: Sequence[PartDescriptor], founds: Sequence[tuple[Path, Any, NnunetFolder]]
) -> None:
    # The same part under two file names would run twice and hide nothing it lacks.
    first: dict[str | None, Path] = {}
    for part, (source, _, _) in zip(parts, founds, strict=True):
        if part.weights_sha256 in first:
            raise ModelError(
                f"{first[part.weights_sha256]} and {source} hold the same weights: the same "
                "part is given twice; give each part of the model once"
            )
        first[part.weights_sha256] = source


def _part_label_map(catalogue: Catalogue, dataset: dict[str, Any], where: str) -> dict[int, int]:
    # Always written out for a part: its ids are its own, whatever the catalogue's order.
    mapping = label_map_for(catalogue, dataset, where)
    if mapping is not None:
        return mapping
    # A region-trained part writes the values of regions_class_order: the catalogue's ids.
    values = _region_values(dataset) or _dataset_labels(dataset)
    return {i: i for i in values}


def _install_catalogue(ref: str | Path, staging: Path, base_dir: Path) -> tuple[str, Catalogue]:
    """A shipped name stays a name; a file is validated and copied in as catalogue.yaml."""
    text = str(ref)
    if isinstance(ref, str) and text in shipped_catalogues():
        return text, load_catalogue(text)
    cat = load_catalogue(Path(ref), base_dir=base_dir)
    (staging / CATALOGUE_FILE).write_text(dump_catalogue(cat), encoding="utf-8")
    return CATALOGUE_FILE, cat


def _catalogue_from_zip(src: Path, ref: str, staging: Path) -> tuple[str, Catalogue]:
    if ref in shipped_catalogues():
        return ref, load_catalogue(ref)
    with zipfile.ZipFile(src) as zf:
        try:
            raw = yaml.safe_load(zf.read(ref))
        except KeyError:
            raise ModelError(
                f"{src}: catalogue {ref!r} named in {DESCRIPTOR} is not in the zip"
            ) from None
        except yaml.YAMLError as exc:
            raise ModelError(f"{src}: catalogue {ref!r} is not valid YAML: {exc}") from exc
    cat = parse_catalogue(raw, origin=f"{src}:{ref}")
    (staging / CATALOGUE_FILE).write_text(dump_catalogue(cat), encoding="utf-8")
    return CATALOGUE_FILE, cat
