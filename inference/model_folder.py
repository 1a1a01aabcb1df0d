"""nnU-Net v2 trained-model folders: find and validate one in a folder or zip, hash its weights.

A trained model is the ``<trainer>__<plans>__<configuration>`` folder nnU-Net writes
(``dataset.json``, ``plans.json``, ``fold_N/checkpoint_final.pth``), or the zip
``nnUNetv2_export_model_to_zip`` makes of it. ``find_nnunet_folder`` locates it without
extracting anything, ``copy_model_files`` copies the files a model needs out of it, and
``compute_weights_sha256`` identifies its weights. Installing and describing models is
``inference.model_store``.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
import shutil
import stat
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from dicom_node.errors import ModelError

logger = logging.getLogger(__name__)

FOLD_RE = re.compile(r"^fold_(\d+|all)$")
# nnUNetv2_find_best_configuration writes these beside the folds, each with its own
# dataset.json and plans.json: results, not a second model.
CROSSVAL_PREFIX = "crossval_results"
# nnUNetv2_export_model_to_zip adds <dataset>/ensembles/ensemble___<model>___<model>___<folds>
# (with the cross-validation predictions: dataset.json and plans.json, no fold): an ensemble
# of several configurations, which the node does not run (it serves one of them).
ENSEMBLES_DIR = "ensembles"
MACOS_METADATA = "__MACOSX"  # macOS Finder adds it to every zip it makes
# What nnU-Net's trainer writes at the end of training and at its best validation Dice
# (checkpoint_latest.pth is an unfinished training's, not offered).
NNUNET_CHECKPOINTS = ("checkpoint_best.pth", "checkpoint_final.pth")

Fold = int | Literal["all"]


@dataclass(frozen=True)
class NnunetFolder:
    """A located trainer folder, inside a directory or a zip; nothing extracted yet."""

    source: Path  # the directory or zip given
    inner: PurePosixPath  # the trainer folder, relative to source ("." when source itself)
    folds: tuple[Fold, ...]  # folds present with the checkpoint
    checkpoint: str
    trainer: str | None
    plans: str | None
    configuration: str | None
    # Other configurations of the same training beside it, not chosen (e.g. 2d, 3d_lowres).
    other_configurations: tuple[str, ...] = ()

    @property
    def is_zip(self) -> bool:
        return self.source.is_file()

    @property
    def path(self) -> Path:
        """The trainer folder on disk (directories only)."""
        if self.is_zip:
            raise ValueError("a zip has no folder path; extract it first")
        return self.source / self.inner


# --- locating -------------------------------------------------------------------------------


def fold_dir(fold: Fold) -> str:
    return f"fold_{fold}"


def _fold_key(fold: Fold) -> tuple[int, int]:
    return (1, 0) if fold == "all" else (0, int(fold))


def _parse_fold(text: str) -> Fold:
    return "all" if text == "all" else int(text)


def zip_members(zf: zipfile.ZipFile, where: Path) -> dict[str, zipfile.ZipInfo]:
    """The zip's members by name with '/' between folders, directories without their '/'.

    Zips made on Windows may separate folders with '\\'; a name that would land outside the
    folder it is extracted to is refused.
    """
    out: dict[str, zipfile.ZipInfo] = {}
    for info in zf.infolist():
        name = info.filename.replace("\\", "/").rstrip("/")
        if not name:
            continue
        p = PurePosixPath(name)
        if p.is_absolute() or ".." in p.parts or p.parts[0].endswith(":"):
            raise ModelError(
                f"{where}: zip member {info.filename!r} escapes the archive; refusing it"
            )
        out[name] = info
    return out


def _list_files(path: Path) -> list[PurePosixPath]:
    """Relative paths of the files under a directory or in a zip (depth-limited for folders)."""
    if path.is_dir():
        found: list[PurePosixPath] = []
        # Depth 5 covers wrapper/Dataset/trainer__plans__cfg/fold_N/checkpoint.
        for pattern in ("*", "*/*", "*/*/*", "*/*/*/*", "*/*/*/*/*"):
            found += [PurePosixPath(p.relative_to(path).as_posix()) for p in path.glob(pattern)]
        return found
    if path.is_file() and zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = list(zip_members(zf, path))
        except zipfile.BadZipFile as exc:
            raise ModelError(f"{path} is a damaged zip file ({exc}): copy it again") from exc
        # Zips may omit directory entries: add every parent so folders can be found.
        out = {PurePosixPath(n) for n in names}
        for n in list(out):
            out.update(p for p in n.parents if str(p) != ".")
        return sorted(out)
    if path.exists():
        raise ModelError(f"{path} is neither a folder nor a zip file")
    raise ModelError(f"{path} does not exist")


def _split_trainer_folder_name(name: str) -> tuple[str | None, str | None, str | None]:
    parts = name.split("__")
    if len(parts) == 3 and all(parts):
        return parts[0], parts[1], parts[2]
    return None, None, None


def _other_checkpoints_hint(
    files: set[PurePosixPath], folder: PurePosixPath, fold_dirs: list[str], checkpoint: str
) -> str:
    """What to give ``--checkpoint`` when the folds hold another nnU-Net checkpoint (a model
    shared with checkpoint_best.pth only), else nothing."""
    names = sorted(
        {
            p.name
            for p in files
            if p.parent.name in fold_dirs
            and p.parent.parent == folder
            and p.name in NNUNET_CHECKPOINTS
            and p.name != checkpoint
        }
    )
    if not names:
        return ""
    return f"; the folds hold {', '.join(names)}: install it with --checkpoint {names[0]}"


def find_nnunet_folder(
    path: Path,
    folds: Iterable[Fold] | None = None,
    checkpoint: str = "checkpoint_final.pth",
    configuration: str | None = None,
) -> NnunetFolder:
    """Locate the trainer folder in ``path`` (a folder or an nnU-Net export zip).

    The folder may be ``path`` itself or nested up to two levels below it (e.g.
    ``Dataset291_X/nnUNetTrainer__nnUNetPlans__3d_fullres``), three when everything sits in
    one wrapping folder (a zip made of the folder holding the dataset). A trained-model folder
    has plans.json, dataset.json and fold_N/; ``crossval_results_*`` folders and a stray
    dataset.json beside the trainer folder are not one. Of several configurations of one
    training side by side, ``configuration`` is taken, by default 3d_fullres (the others are
    in ``other_configurations``); a folder whose name gives no configuration (renamed) is
    of ``configuration`` when one is given. Raises ``ModelError`` naming what is missing:
    plans.json, dataset.json, a fold_N folder, or a fold's checkpoint.
    """
    path = Path(path)
    files = set(_list_files(path))
    root = PurePosixPath(".")
    tops = {p.parts[0] for p in files if p.parts[0] != MACOS_METADATA}
    wrapped = len(tops) == 1 and any(len(p.parts) > 1 for p in files)
    max_depth = 3 if wrapped else 2
    candidates = [
        root,
        *sorted(
            p
            for p in files
            if len(p.parts) <= max_depth
            and p.parts[0] != MACOS_METADATA
            and not any(part.startswith(CROSSVAL_PREFIX) for part in p.parts)
            and ENSEMBLES_DIR not in p.parts
        ),
    ]
    ensembles = sorted({str(p.parent) for p in files if p.parent.parent.name == ENSEMBLES_DIR})
    if ensembles:
        logger.info(
            "%s: ignoring nnU-Net ensemble folders %s: the node runs one trainer and configuration",
            path,
            ", ".join(ensembles),
        )

    def has(folder: PurePosixPath, name: str) -> bool:
        return (folder / name if folder != root else PurePosixPath(name)) in files

    def fold_dirs(folder: PurePosixPath) -> list[str]:
        depth = 0 if folder == root else len(folder.parts)
        return sorted(
            p.name
            for p in files
            if len(p.parts) == depth + 1
            and (folder == root or p.parent == folder)
            and FOLD_RE.match(p.name)
        )

    def name_parts(folder: PurePosixPath) -> tuple[str | None, str | None, str | None]:
        return _split_trainer_folder_name(folder.name if folder != root else path.name)

    def configuration_of(folder: PurePosixPath) -> str | None:
        return name_parts(folder)[2]

    markers = ("plans.json", "dataset.json")
    marked = [c for c in candidates if any(has(c, m) for m in markers) or fold_dirs(c)]
    # A folder with all three is the model; the others only explain what is missing.
    complete = [c for c in marked if all(has(c, m) for m in markers) and fold_dirs(c)]
    if configuration is not None and marked:
        pool = complete or marked
        named = [c for c in pool if configuration_of(c) == configuration]
        # A folder renamed from nnU-Net's pattern says no configuration: its checkpoint does.
        named = named or [c for c in pool if configuration_of(c) is None]
        if not named:
            present = sorted({str(configuration_of(c)) for c in pool})
            raise ModelError(
                f"{path} holds no {configuration} configuration (it holds "
                f"{', '.join(present)}): choose one of those with --configuration"
            )
        marked = named
    else:
        marked = complete or marked
    if not marked:
        raise ModelError(
            f"{path} holds no nnU-Net trained-model folder (nothing with plans.json, dataset.json "
            "or fold_N/ within two levels, three inside one wrapping folder): give the "
            "<trainer>__<plans>__<configuration> folder or the zip made by "
            "nnUNetv2_export_model_to_zip"
        )
    others: list[str] = []
    if len(marked) > 1:
        listed = ", ".join(map(str, marked))
        configurations = [configuration_of(c) for c in marked]
        # Configurations of one training sit side by side in its dataset folder; folders
        # in two places are two models, whatever their configurations.
        # Trainer or plans differing are two trainings, not two configurations of one.
        trainings = {name_parts(c)[:2] for c in marked}
        siblings = (
            len({c.parent for c in marked}) == 1
            and None not in configurations
            and len(trainings) == 1
        )
        if not siblings or len(set(configurations)) < len(configurations):
            unpack = " (unpack the zip first)" if path.is_file() else ""
            raise ModelError(
                f"{path} holds several trained-model folders ({listed}): give one of them "
                f"directly{unpack}"
            )
        if "3d_fullres" not in configurations:
            raise ModelError(
                f"{path} holds several configurations of one model "
                f"({', '.join(map(str, configurations))}): choose one with --configuration"
            )
        # An export zip holds every configuration trained; 3d_fullres is the usual choice.
        chosen = marked[configurations.index("3d_fullres")]
        others = sorted(str(c) for c in configurations if c != "3d_fullres")
        logger.info(
            "%s holds several configurations; using %s (others: %s)",
            path,
            chosen,
            ", ".join(others),
        )
        marked = [chosen]
    folder = marked[0]
    where = f"{path}" if folder == root else f"{path} (in {folder})"
    for required in ("plans.json", "dataset.json"):
        if not has(folder, required):
            raise ModelError(f"{where}: {required} is missing from the trained-model folder")
    present = fold_dirs(folder)
    if not present:
        raise ModelError(f"{where}: no fold_N folder (e.g. fold_0/{checkpoint}) is present")
    if folds is None:
        wanted: list[Fold] = [_parse_fold(d.removeprefix("fold_")) for d in present]
        # Like nnU-Net's auto-detection: numbered folds form the ensemble; fold_all only alone.
        numbered: list[Fold] = [f for f in wanted if f != "all"]
        wanted = numbered or wanted
        with_ckpt = [f for f in wanted if has(folder / fold_dir(f), checkpoint)]
        if not with_ckpt:
            raise ModelError(
                f"{where}: no fold has {checkpoint} (looked in {', '.join(present)})"
                + _other_checkpoints_hint(files, folder, present, checkpoint)
            )
        if len(with_ckpt) < len(wanted):
            skipped = sorted(set(map(str, wanted)) - set(map(str, with_ckpt)))
            logger.warning("%s: folds %s have no %s; using the others", where, skipped, checkpoint)
        wanted = with_ckpt
    else:
        wanted = list(folds)
        for f in wanted:
            if fold_dir(f) not in present:
                raise ModelError(
                    f"{where}: {fold_dir(f)} is missing (present: {', '.join(present)})"
                )
            if not has(folder / fold_dir(f), checkpoint):
                raise ModelError(
                    f"{where}: checkpoint {fold_dir(f)}/{checkpoint} is missing"
                    + _other_checkpoints_hint(files, folder, [fold_dir(f)], checkpoint)
                )
    trainer, plans, cfg = name_parts(folder)
    if cfg is None:
        # A renamed folder: the configuration asked for is the model's (model.yaml's
        # configuration goes before the checkpoint's), checked against plans.json at install.
        cfg = configuration
    return NnunetFolder(
        source=path,
        inner=folder,
        folds=tuple(sorted(wanted, key=_fold_key)),
        checkpoint=checkpoint,
        trainer=trainer,
        plans=plans,
        configuration=cfg,
        other_configurations=tuple(others),
    )


# --- checkpoints ----------------------------------------------------------------------------


class _Opaque:
    """Stands for any object of a checkpoint's pickle other than plain data (tensors, numpy
    values, the trainer's own classes): nothing is imported and no code of the file runs."""

    def __new__(cls, *args: object, **kwargs: object) -> _Opaque:
        return super().__new__(cls)

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:
        pass

    def append(self, value: object) -> None:
        pass

    def extend(self, values: object) -> None:
        pass


class _StateDict(dict[object, object]):
    """A state dict (an OrderedDict with attributes, torch's ``_metadata``)."""


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> type:
        if (module, name) == ("collections", "OrderedDict"):
            return _StateDict
        return _Opaque

    def persistent_load(self, pid: object) -> None:
        return None  # a tensor's storage: its bytes are not read


def checkpoint_configuration(file: Path) -> str | None:
    """The configuration an nnU-Net checkpoint was trained in (``init_args``), which a job
    loads when model.yaml gives none; None when the file does not say.

    Read from the pickle inside the checkpoint's zip without loading tensors or running the
    file's code, so that a large checkpoint costs no memory at install.
    """
    try:
        with zipfile.ZipFile(file) as zf:
            name = next(
                (n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1), None
            )
            if name is None:
                return None
            with zf.open(name) as fh:
                data = _PlainDataUnpickler(fh).load()
    except Exception as exc:  # any pickle at all may be in a file the operator brings
        logger.debug("cannot read the configuration of checkpoint %s: %s", file, exc)
        return None
    init_args = data.get("init_args") if isinstance(data, dict) else None
    value = init_args.get("configuration") if isinstance(init_args, dict) else None
    if value is None and isinstance(data, dict):
        value = data.get("configuration")
    return value if isinstance(value, str) and value else None


# --- hashing --------------------------------------------------------------------------------


def compute_weights_sha256(nnunet_dir: Path, folds: Iterable[Fold], checkpoint: str) -> str:
    """sha256 over the checkpoint files of ``folds``, read in fold order as one stream."""
    digest = hashlib.sha256()
    for fold in folds:
        file = nnunet_dir / fold_dir(fold) / checkpoint
        try:
            with file.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
        except OSError as exc:
            raise ModelError(f"cannot read checkpoint {file}: {exc}") from exc
    return digest.hexdigest()


# --- copying --------------------------------------------------------------------------------


def _is_torch_checkpoint(file: Path) -> bool:
    # torch.save has written a zip archive since PyTorch 1.6 (nnU-Net v2 needs 2.x): a file
    # that is not one was cut short or is something else.
    return zipfile.is_zipfile(file)


def copy_model_files(found: NnunetFolder, dest: Path) -> None:
    """Copy the trainer folder's json files and the used checkpoints to ``dest``.

    Refuses a zip member that is a symbolic link (it would be installed as a file holding the
    link's target) and a checkpoint that is not a PyTorch checkpoint.
    """
    dest.mkdir(parents=True)
    wanted = [PurePosixPath("plans.json"), PurePosixPath("dataset.json")]
    wanted += [PurePosixPath("dataset_fingerprint.json")]
    checkpoints = [PurePosixPath(fold_dir(f)) / found.checkpoint for f in found.folds]
    wanted += checkpoints
    if found.is_zip:
        with zipfile.ZipFile(found.source) as zf:
            members = zip_members(zf, found.source)
            for rel in wanted:
                info = members.get(str(found.inner / rel))
                if info is None:
                    continue  # only the optional fingerprint may be absent (checked earlier)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise ModelError(
                        f"{found.source}: {info.filename} is a symbolic link in the zip, not the "
                        "file itself; make the zip again with the files (nnUNetv2_export_model_"
                        "to_zip, or zip without --symlinks)"
                    )
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(info) as fin, target.open("wb") as fout:
                        shutil.copyfileobj(fin, fout, 1 << 20)
                except (zipfile.BadZipFile, zlib.error) as exc:
                    raise ModelError(
                        f"{found.source} is damaged ({info.filename}: {exc}): copy it again"
                    ) from exc
    else:
        for rel in wanted:
            source = found.path / rel
            if source.is_file():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, dest / rel)
    for rel in checkpoints:
        if not _is_torch_checkpoint(dest / rel):
            raise ModelError(
                f"{found.source}: {found.inner / rel} is not a PyTorch checkpoint (torch.save "
                "writes a zip archive; this file is not one): it is damaged or was cut short, "
                "copy it again from where the model was trained"
            )
