"""``series list``, ``show``, ``process`` and ``delete``."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table
from sqlalchemy import select

from dicom_node.cli import MAX_ROW_ID, console, print_json, settings_of
from dicom_node.errors import DicomNodeError
from storage.models import Instance, Series, SeriesVersion, Study


def register(app: typer.Typer) -> None:
    series_app = typer.Typer(help="Received series and their completion.", no_args_is_help=True)
    series_app.command("list")(list_series)
    series_app.command("show")(show_series)
    series_app.command("process")(process_series)
    series_app.command("delete")(delete_series_command)
    app.add_typer(series_app, name="series")


def _summary(series: Series, study: Study, version: SeriesVersion) -> dict[str, Any]:
    return {
        "series_instance_uid": series.series_instance_uid,
        "study_instance_uid": study.study_instance_uid,
        "patient_id": study.patient.patient_id,
        # With the description: how a PACS administrator finds the series there.
        "patient_name": study.patient.patient_name,
        "study_date": study.study_date,
        "modality": series.modality,
        "series_description": series.series_description,
        "calling_ae_title": series.calling_ae_title,
        "version": version.version,
        "state": version.state.value,
        "instances": version.instance_count,
        "expected": version.expected_count,
        "last_received_at": version.last_received_at,
        "completed_at": version.completed_at,
        "completion_reason": version.completion_reason,
    }


def list_series(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    limit: Annotated[int, typer.Option(help="newest N series", min=1, max=MAX_ROW_ID)] = 100,
) -> None:
    """List series with the state of their newest version."""
    from dicom_node.service import open_store

    index, _ = open_store(settings_of(ctx))
    with index.session() as session:
        rows = session.execute(
            select(Series, Study, SeriesVersion)
            .join(Study, Series.study_pk == Study.id)
            .join(
                SeriesVersion,
                (SeriesVersion.series_pk == Series.id)
                & (SeriesVersion.version == Series.current_version),
            )
            .order_by(SeriesVersion.last_received_at.desc())
            .limit(limit)
        ).all()
        items = [_summary(s, st, v) for s, st, v in rows]
    if as_json:
        print_json(items)
        return
    table = Table("series UID", "modality", "description", "from AE", "ver", "state", "images")
    for item in items:
        table.add_row(
            item["series_instance_uid"],
            item["modality"],
            item["series_description"],
            item["calling_ae_title"],
            str(item["version"]),
            item["state"],
            str(item["instances"]),
        )
    console(200).print(table)


def show_series(
    ctx: typer.Context,
    uid: Annotated[str, typer.Argument(help="Series Instance UID")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show one series: its versions and instances."""
    from dicom_node.service import open_store

    index, store = open_store(settings_of(ctx))
    with index.session() as session:
        series = session.scalar(select(Series).where(Series.series_instance_uid == uid))
        if series is None:
            raise DicomNodeError(f"no series {uid!r} in the index (see `dicom-node series list`)")
        study = series.study
        patient = study.patient  # loaded while the session is open
        versions = [_summary(series, study, v) for v in series.versions]
        instances = [
            {
                "sop_instance_uid": i.sop_instance_uid,
                "version": i.version,
                "instance_number": i.instance_number,
                "sop_class_uid": i.sop_class_uid,
                "transfer_syntax_uid": i.transfer_syntax_uid,
                "path": str(store.absolute(i.path)),
                "calling_ae_title": i.calling_ae_title,
                "received_at": i.received_at,
            }
            for i in session.scalars(
                select(Instance)
                .where(Instance.series_pk == series.id)
                .order_by(Instance.version, Instance.instance_number)
            )
        ]
    data = {
        "series_instance_uid": uid,
        "study_instance_uid": study.study_instance_uid,
        "patient_name": patient.patient_name,
        "study_date": study.study_date,
        "modality": series.modality,
        "series_description": series.series_description,
        "protocol_name": series.protocol_name,
        "body_part_examined": series.body_part_examined,
        "image_type": series.image_type,
        "frame_of_reference_uid": series.frame_of_reference_uid,
        "calling_ae_title": series.calling_ae_title,
        "versions": versions,
        "instances": instances,
    }
    if as_json:
        print_json(data)
        return
    for key in (
        "series_instance_uid",
        "study_instance_uid",
        "patient_name",
        "study_date",
        "modality",
        "series_description",
        "protocol_name",
        "calling_ae_title",
    ):
        typer.echo(f"{key}: {data[key]}")
    for v in versions:
        typer.echo(
            f"version {v['version']}: {v['state']}, {v['instances']} instances"
            f"{', ' + v['completion_reason'] if v['completion_reason'] else ''}"
        )
    typer.echo(f"{len(instances)} instances under {store.root}")


def process_series(
    ctx: typer.Context,
    uid: Annotated[str, typer.Argument(help="Series Instance UID")],
    rule: Annotated[
        str | None, typer.Option(help="the rule to use; default: the first that matches")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Queue a stored series for segmentation now (a running node's workers take it)."""
    from dicom_node.rule_models import rule_problems
    from dicom_node.scheduler import queue_series
    from dicom_node.service import open_store

    settings = settings_of(ctx)
    index, _ = open_store(settings)
    queued = queue_series(settings, index, uid, rule)
    chosen = next(r for r in settings.rules if r.name == queued.rule_name)
    for problem in rule_problems(chosen, settings.models_dir):  # on stderr: --json stays clean
        typer.echo(f"WARNING {problem}", err=True)
    if as_json:
        print_json(
            {
                "job": queued.job_id,
                "rule": queued.rule_name,
                "model": queued.model_name,
                "version": queued.version,
                "again": queued.again,
            }
        )
        return
    typer.echo(
        f"job {queued.job_id} queued{' again' if queued.again else ''}: series {uid} "
        f"version {queued.version}, rule {queued.rule_name}, model {queued.model_name}"
    )


def delete_series_command(
    ctx: typer.Context,
    uids: Annotated[list[str], typer.Argument(help="Series Instance UIDs", metavar="UID...")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
) -> None:
    """Delete series sent by mistake: their images, jobs, deliveries and SEGs."""
    from dicom_node.service import open_store
    from storage.retention import delete_series

    if not yes and not typer.confirm(
        f"Delete {len(uids)} series with their images and results from this node?"
    ):
        raise typer.Exit(1)
    index, store = open_store(settings_of(ctx))
    failed = False
    for uid in uids:
        try:
            result = delete_series(index, store, uid)
        except DicomNodeError as exc:
            typer.echo(f"error: {exc}", err=True)
            failed = True
            continue
        typer.echo(
            f"deleted series {uid}: {result.instances} images, {result.bytes_freed / 1e6:.1f} MB"
        )
    if failed:
        raise typer.Exit(1)
