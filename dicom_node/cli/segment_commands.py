"""``segment``: offline segmentation of a folder or zip of DICOM files."""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from dicom_node.cli import console, print_json, settings_of
from dicom_node.config import COMPRESSIONS_BY_FORMAT, image_type_value
from dicom_node.errors import DicomNodeError
from dicom_node.value_warnings import summarised_value_warnings


def register(app: typer.Typer) -> None:
    app.command("segment")(segment)


def segment(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="folder or zip holding one DICOM series")],
    model: Annotated[str, typer.Option("--model", "-m", help="installed model name")] = "demo",
    out: Annotated[Path, typer.Option("--out", "-o", help="folder to write the SEG into")] = Path(
        "."
    ),
    format: Annotated[str, typer.Option("--format", help="binary or labelmap")] = "binary",
    compression: Annotated[str, typer.Option(help="none, rle, jpegls, jpeg2000")] = "none",
    series_uid: Annotated[str | None, typer.Option(help="which series, if several")] = None,
    stack: Annotated[
        str, typer.Option(help="a series of several stacks (echoes, phases): first or last")
    ] = "first",
    stack_image_type: Annotated[
        str | None,
        typer.Option(help="prefer the stack whose Image Type has this value, e.g. W"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Segment one series offline and write its DICOM-SEG; prints the labels and volumes."""
    from dicom_node.seg_write import seg_to_bytes
    from dicom_node.segment import ModelCache, segment_volume
    from dicom_node.volume import StackChoice, volume_from_folder

    if format not in ("binary", "labelmap"):
        raise typer.BadParameter("--format must be binary or labelmap")
    if stack not in ("first", "last"):
        raise typer.BadParameter("--stack must be first or last")
    if stack_image_type is not None:
        try:
            stack_image_type = image_type_value(stack_image_type)
        except ValueError as exc:
            raise typer.BadParameter(f"--stack-image-type: {exc}") from exc
    allowed = COMPRESSIONS_BY_FORMAT[format]
    if compression not in allowed:
        # Before the series is read and segmented, not after.
        raise typer.BadParameter(
            f"--compression {compression!r} cannot be used with --format {format}: "
            f"use one of {', '.join(allowed)}"
        )
    settings = settings_of(ctx)
    if not path.exists():
        raise DicomNodeError(f"{path} does not exist")
    if out.exists() and not out.is_dir():
        raise DicomNodeError(f"--out {out} is a file: give the folder to write the SEG into")
    progress_console = console(stderr=True)
    with (
        summarised_value_warnings(str(path)),
        tempfile.TemporaryDirectory() as tmp,
        Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", markup=False),
            TimeElapsedColumn(),
            console=progress_console,
            disable=as_json,
        ) as progress,
    ):
        folder = path
        if path.is_file() and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                archive.extractall(tmp)
            folder = Path(tmp)
        step = progress.add_task("reading the series", total=4)
        volume = volume_from_folder(
            folder,
            series_uid,
            StackChoice("last" if stack == "last" else "first", stack_image_type),
        )
        progress.update(step, advance=1, description=f"loading model {model}")
        models = ModelCache(settings.models_dir, settings.inference)
        info, segmenter = models.get(model)
        progress.update(step, advance=1, description=f"segmenting {volume.array.shape} voxels")
        result = segment_volume(
            volume,
            info,
            segmenter,
            format=format,
            compression=compression,
            input_models=models.get,
        )
        progress.update(step, advance=1, description="writing the SEG")
        out.mkdir(parents=True, exist_ok=True)
        target = out / f"SEG_{result.seg.SOPInstanceUID}.dcm"
        target.write_bytes(seg_to_bytes(result.seg))
        progress.update(step, advance=1, description="done")
    data: dict[str, Any] = {
        "seg": str(target),
        "series_instance_uid": result.series_instance_uid,
        "model": info.name,
        "format": format,
        "labels": [{"id": i, "name": n, "ml": round(ml, 3)} for i, n, ml in result.volumes_ml],
        "timings": result.timings,
        "stack": result.stack,
        "notes": result.notes,
    }
    if as_json:
        print_json(data)
        return
    table = Table("id", "label", "volume (ml)")
    for label in data["labels"]:
        table.add_row(str(label["id"]), label["name"], f"{label['ml']:.2f}")
    console().print(table)
    if result.stack:
        typer.echo(f"segmented {result.stack}")
    for note in result.notes:
        typer.echo(note)
    typer.echo(f"SEG written to {target}")
