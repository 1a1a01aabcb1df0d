"""``models add``, ``models list`` and ``models check``."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.table import Table

from dicom_node.cli import console, print_json, settings_of


def register(app: typer.Typer) -> None:
    models_app = typer.Typer(
        help="nnU-Net v2 models: install, list, check, remove.", no_args_is_help=True
    )
    models_app.command("add")(add_model)
    models_app.command("list")(list_models_command)
    models_app.command("check")(check_model)
    models_app.command("remove")(remove_model_command)
    app.add_typer(models_app, name="models")


def add_model(
    ctx: typer.Context,
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="nnU-Net trained-model folder (<trainer>__<plans>__<configuration>, or a folder "
            "holding it) or the zip from nnUNetv2_export_model_to_zip. Several: the parts of "
            "one model (TotalSegmentator's total: its five Dataset291-295 zips), run in the "
            "order given; a later part's label wins where two overlap",
            metavar="PATH...",
        ),
    ],
    name: Annotated[str | None, typer.Option(help="model name (default: from the folder)")] = None,
    catalogue: Annotated[
        str | None,
        typer.Option(help="label catalogue: a shipped name (vibe, total, total_mr) or a YAML file"),
    ] = None,
    trust_label_ids: Annotated[
        bool,
        typer.Option(
            help="use dataset.json's label ids as the catalogue's even where the names differ "
            "(only when you know the names are merely spelled differently)"
        ),
    ] = False,
    modality: Annotated[
        str | None, typer.Option(help="MR or CT (default: from dataset.json)")
    ] = None,
    folds: Annotated[
        str | None, typer.Option(help="comma-separated folds, e.g. 0,1,2 (default: all present)")
    ] = None,
    checkpoint: Annotated[
        str | None,
        typer.Option(
            help="the checkpoint file in each fold_N: checkpoint_final.pth (default) or "
            "checkpoint_best.pth"
        ),
    ] = None,
    configuration: Annotated[
        str | None,
        typer.Option(
            help="the nnU-Net configuration to install where the zip or folder holds several "
            "(2d, 3d_lowres, 3d_fullres; default: 3d_fullres). The cascade's "
            "3d_cascade_fullres is refused: the node does not run its first stage"
        ),
    ] = None,
    orientation: Annotated[
        str | None,
        typer.Option(
            help="where the x, y, z axes of the images the model was trained on point, e.g. "
            "RAS (NIfTI turned to RAS, as TotalSegmentator) or LPS (DICOM's patient axes); "
            "default: from the model's files, else LPS"
        ),
    ] = None,
    roi_model: Annotated[
        str | None,
        typer.Option(
            help="for a model of two inputs (TotalVibeSegmentator): the installed model whose "
            "segmentation of the image is the second input (its ROI model, Dataset278)"
        ),
    ] = None,
    replace: Annotated[bool, typer.Option(help="replace an installed model of that name")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Install a model into the models folder (copied; the source is left as it is)."""
    if not paths:
        raise typer.BadParameter("give the model's folder or zip")
    from dicom_node.rule_models import unfeedable
    from inference.model_store import install_model

    settings = settings_of(ctx)
    if modality is not None and modality.upper() not in ("MR", "CT"):
        raise typer.BadParameter("--modality must be MR or CT")
    mod: Literal["MR", "CT"] | None = None
    if modality is not None:
        mod = "CT" if modality.upper() == "CT" else "MR"
    fold_list: list[int | Literal["all"]] | None = None
    if folds:
        fold_list = []
        for part in (p.strip() for p in folds.split(",") if p.strip()):
            if part == "all":
                fold_list.append("all")
            elif part.isdigit():
                fold_list.append(int(part))
            else:
                raise typer.BadParameter("--folds takes fold numbers separated by commas")
    info = install_model(
        paths,
        settings.models_dir,
        name,
        catalogue=catalogue,
        trust_label_ids=trust_label_ids,
        modality=mod,
        folds=fold_list,
        checkpoint=checkpoint,
        configuration=configuration,
        orientation=orientation,
        roi_model=roi_model,
        overwrite=replace,
    )
    notes = list(info.notes)
    why = unfeedable(info)
    if why is not None:
        # Installed all the same (a later node may feed it), but not silently: every job
        # routed to it would fail.
        notes.append(f"{why}: jobs routed to it fail (README, Series the node refuses to segment)")
    if replace:
        # Workers notice the new folder at their next job of it (dicom_node.segment.ModelCache).
        notes.append(
            "jobs running now finish with the previous version; each worker loads this one "
            "for its next job of the model"
        )
    if as_json:
        print_json({**info.summary(), "notes": notes})
        return
    typer.echo(
        f"installed {info.name} at {info.root}: {info.descriptor.modality}, "
        + (f"{len(info.parts)} parts, " if info.has_parts else "")
        + f"folds {info.folds_text()}, "
        f"{len(info.catalogue.labels)} labels (catalogue {info.descriptor.catalogue}), "
        f"orientation {info.descriptor.orientation}, "
        f"tile step {info.descriptor.tile_step_size}, "
        f"weights sha256 {info.weights_sha256}"
    )
    for note in notes:
        typer.echo(f"note: {note}")


def list_models_command(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """List installed and built-in models, and the model folders that cannot be used."""
    from inference.model_store import scan_models

    settings = settings_of(ctx)
    models, problems = scan_models(settings.models_dir)
    if as_json:
        print_json([m.summary() for m in models])
        for problem in problems:
            typer.echo(f"problem: {problem}", err=True)
        return
    columns = ("name", "version", "modality", "folds", "labels", "catalogue", "orientation")
    table = Table(*columns, "sha256", "where")
    for column in table.columns:
        column.overflow = "fold"  # a long path or name wraps; never cut with "…"
    for m in models:
        table.add_row(
            m.name,
            m.descriptor.version,
            m.descriptor.modality,
            m.folds_text(),
            str(len(m.catalogue.labels)),
            m.descriptor.catalogue,
            m.descriptor.orientation,
            m.weights_sha256[:12],
            "built-in" if m.builtin else str(m.root),
        )
    # Piped or logged, there is no screen to fit: print each row whole on one line.
    console(None if sys.stdout.isatty() else 10_000).print(table)
    for problem in problems:
        typer.echo(f"problem: {problem}")
    if not models:
        typer.echo(f"no models in {settings.models_dir}; add one with `dicom-node models add PATH`")


def remove_model_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="model name")],
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="remove it although rules route to it or jobs wait for it (they fail)"
        ),
    ] = False,
) -> None:
    """Remove an installed model (its folder in inference.models_dir)."""
    from sqlalchemy import func, select

    from dicom_node.service import open_store
    from inference.model_store import remove_model, scan_models
    from storage.models import Job, JobState

    settings = settings_of(ctx)
    if not (settings.models_dir / name).is_dir():
        remove_model(settings.models_dir, name)  # says why it cannot
    rules = [rule.name for rule in settings.rules if rule.model == name]
    # TotalVibeSegmentator's way: another model runs this one first, on each of its jobs.
    takers = [m.name for m in scan_models(settings.models_dir)[0] if m.descriptor.roi_model == name]
    index, _ = open_store(settings)
    with index.session() as session:
        waiting = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(
                Job.model_name == name,
                Job.state.in_([JobState.QUEUED, JobState.RUNNING, JobState.RETRY_WAIT]),
            )
        )
    uses = []
    if rules:
        uses.append(f"rule(s) {', '.join(rules)} route series to it")
    if takers:
        uses.append(f"model(s) {', '.join(takers)} run it first as their ROI model")
    if waiting:
        uses.append(f"{waiting} job(s) are queued, running or waiting to retry on it")
    if uses and not force:
        typer.echo(
            f"model {name} not removed: {'; '.join(uses)}, and would fail. Change the rules "
            "(and restart the node) or cancel the jobs first, or give --force",
            err=True,
        )
        raise typer.Exit(1)
    where = remove_model(settings.models_dir, name)
    typer.echo(f"removed {name} from {where}")
    for use in uses:
        typer.echo(f"note: {use}: they fail with `model {name!r} is not installed`")


def check_model(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="model name")],
    size: Annotated[
        int, typer.Option(help="edge of the random test volume in voxels", min=8, max=512)
    ] = 32,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Load a model and run a small random volume through it; print the times."""
    import numpy as np

    from inference.model_store import load_model_info
    from inference.predictor import Segmenter

    settings = settings_of(ctx)
    info = load_model_info(name, settings.models_dir)
    sha = info.compute_sha256()
    started = time.perf_counter()
    segmenter = Segmenter(info, settings.inference)
    load_s = time.perf_counter() - started
    channels = len(info.descriptor.input_channels)
    rng = np.random.default_rng(0)
    volume = rng.normal(0.0, 1.0, size=(channels, size, size, size)).astype(np.float32)
    started = time.perf_counter()
    seg = segmenter.predict(volume if channels > 1 else volume[0], (1.5, 1.5, 1.5))
    predict_s = time.perf_counter() - started
    result = {
        "name": info.name,
        "device": str(segmenter.device),
        "load_s": round(load_s, 3),
        "predict_s": round(predict_s, 3),
        "input_shape": list(volume.shape[1:]),
        "output_shape": list(seg.shape),
        "labels_found": sorted(int(v) for v in np.unique(seg) if v),
        "weights_sha256_ok": sha == info.weights_sha256,
    }
    if as_json:
        print_json(result)
    else:
        typer.echo(
            f"{info.name}: loaded in {load_s:.2f} s on {segmenter.device}, "
            f"{size}^3 random volume segmented in {predict_s:.2f} s, "
            f"weights sha256 {'ok' if result['weights_sha256_ok'] else 'MISMATCH'}"
        )
    if not result["weights_sha256_ok"]:
        raise typer.Exit(1)
