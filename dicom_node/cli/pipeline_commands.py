"""``rules test``, ``jobs``, ``deliveries``, ``status``, ``worker``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.table import Table
from sqlalchemy import make_url, select

from dicom_node.cli import MAX_ROW_ID, console, human, print_json, settings_of
from dicom_node.errors import DicomNodeError, StorageError
from storage.models import Delivery, DeliveryState, Job, JobState, Series, SeriesVersion

if TYPE_CHECKING:
    from storage.database import Index

logger = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    rules_app = typer.Typer(help="Routing rules.", no_args_is_help=True)
    rules_app.command("test")(rules_test)
    app.add_typer(rules_app, name="rules")
    jobs_app = typer.Typer(help="Segmentation jobs.", no_args_is_help=True)
    jobs_app.command("list")(jobs_list)
    jobs_app.command("show")(jobs_show)
    jobs_app.command("retry")(jobs_retry)
    jobs_app.command("cancel")(jobs_cancel)
    app.add_typer(jobs_app, name="jobs")
    deliveries_app = typer.Typer(help="SEG deliveries (the outbox).", no_args_is_help=True)
    deliveries_app.command("list")(deliveries_list)
    deliveries_app.command("retry")(deliveries_retry)
    deliveries_app.command("cancel")(deliveries_cancel)
    app.add_typer(deliveries_app, name="deliveries")
    app.command("status")(status)
    app.command("worker")(worker)


def _index(ctx: typer.Context) -> Any:
    from dicom_node.service import open_store

    return open_store(settings_of(ctx))


def rules_test(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="a Series Instance UID in the index, or a folder")],
    calling_ae: Annotated[str, typer.Option(help="calling AE to assume for a folder")] = "",
) -> None:
    """Show which routing rule fires for a series, and why."""
    from dicom_node.routing import NOT_EVALUATED, facts_from_folder, route
    from dicom_node.rule_models import rule_problems
    from dicom_node.scheduler import facts_from_index

    settings = settings_of(ctx)
    if not target.strip():
        # Path("") is the current folder: it would be read as a folder of images.
        raise DicomNodeError("give a Series Instance UID or a folder (the argument is empty)")
    path = Path(target)
    if path.is_dir():
        facts = facts_from_folder(path, calling_ae)
    else:
        index, _ = _index(ctx)
        with index.session() as session:
            series = session.scalar(select(Series).where(Series.series_instance_uid == target))
            if series is None:
                raise DicomNodeError(f"{target} is neither a folder nor a series in the index")
            version = session.scalar(
                select(SeriesVersion).where(
                    SeriesVersion.series_pk == series.id,
                    SeriesVersion.version == series.current_version,
                )
            )
            assert version is not None
            facts = facts_from_index(session, series, version)
    typer.echo(
        f"series {facts.series_instance_uid}: modality {facts.modality!r}, "
        f"description {facts.series_description!r}, protocol {facts.protocol_name!r}, "
        f"image type {list(facts.image_type)}, body part {facts.body_part_examined!r}, "
        f"calling AE {facts.calling_ae_title!r}, {facts.image_count} images"
    )
    decision = route(settings.rules, facts)
    if path.is_dir() and not calling_ae.strip():
        # A folder's files do not say who would send them: such a rule never matches here,
        # whatever it would do for the series sent by its AE.
        by_ae = {rule.name for rule in settings.rules if rule.match.calling_ae_title}
        for verdict in decision.verdicts:
            if verdict.rule in by_ae and not verdict.matched and verdict.reasons != [NOT_EVALUATED]:
                verdict.reasons.append("calling AE not known for a folder: give --calling-ae")
    typer.echo(decision.explain())
    if decision.rule is not None:
        for problem in rule_problems(decision.rule, settings.models_dir):
            typer.echo(f"WARNING {problem}")


def _job_dict(job: Job) -> dict[str, Any]:
    version = job.series_version
    return {
        "id": job.id,
        "state": job.state.value,
        "series_instance_uid": version.series.series_instance_uid,
        "study_instance_uid": version.series.study.study_instance_uid,
        "version": version.version,
        "rule": job.rule_name,
        "model": job.model_name,
        "attempts": job.attempts,
        "reason": job.reason,
        "worker": job.worker,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "next_attempt_at": job.next_attempt_at,
        "seg_sop_instance_uid": job.seg_sop_instance_uid,
        "seg_path": job.seg_path,
        "timings": job.timings,
        "destinations": job.destinations,
    }


def _delivery_dict(d: Delivery) -> dict[str, Any]:
    return {
        "id": d.id,
        "job": d.job_pk,
        "destination": d.destination,
        "peer": d.resolved_peer,
        "state": d.state.value,
        "attempts": d.attempts,
        "next_attempt_at": d.next_attempt_at,
        "last_error": d.last_error,
        "sop_instance_uid": d.sop_instance_uid,
        "delivered_at": d.delivered_at,
        "duration_s": d.duration_s,
    }


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    table = Table(*columns)
    for row in rows:
        table.add_row(*(human(row[c]) for c in columns))
    console(220).print(table)


def jobs_list(
    ctx: typer.Context,
    state: Annotated[JobState | None, typer.Option(help="only jobs in this state")] = None,
    limit: Annotated[int, typer.Option(min=1, max=MAX_ROW_ID)] = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List jobs, newest first."""
    index, _ = _index(ctx)
    with index.session() as session:
        query = select(Job).order_by(Job.id.desc()).limit(limit)
        if state:
            query = query.where(Job.state == state)
        rows = [_job_dict(j) for j in session.scalars(query)]
    if as_json:
        print_json(rows)
    else:
        _print_table(
            rows,
            [
                "id",
                "state",
                "series_instance_uid",
                "version",
                "rule",
                "model",
                "attempts",
                "reason",
            ],
        )


def jobs_show(
    ctx: typer.Context,
    job_id: Annotated[int, typer.Argument(max=MAX_ROW_ID)],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """One job with its deliveries."""
    index, _ = _index(ctx)
    with index.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise DicomNodeError(f"no job {job_id}")
        data = _job_dict(job)
        data["deliveries"] = [
            _delivery_dict(d)
            for d in session.scalars(select(Delivery).where(Delivery.job_pk == job_id))
        ]
    if as_json:
        print_json(data)
        return
    for key, value in data.items():
        if key != "deliveries":
            typer.echo(f"{key}: {human(value)}")
    for d in data["deliveries"]:
        typer.echo(
            f"delivery {d['id']} -> {d['peer'] or d['destination']}: {d['state']} {d['last_error']}"
        )


def jobs_retry(ctx: typer.Context, job_id: Annotated[int, typer.Argument(max=MAX_ROW_ID)]) -> None:
    """Queue a failed, cancelled or succeeded job again (its unsent deliveries wait for the
    new SEG)."""
    from storage.queue import retry_job

    index, _ = _index(ctx)
    _refuse_superseded(index, job_id)
    if not retry_job(index, job_id):
        with index.session() as session:
            state = session.scalar(select(Job.state).where(Job.id == job_id))
        if state is None:
            raise DicomNodeError(f"no job {job_id}")
        raise DicomNodeError(
            f"job {job_id} is {state.value}: only a failed, cancelled or succeeded job is "
            "queued again"
        )
    typer.echo(f"job {job_id} queued again")


def _refuse_superseded(index: Index, job_id: int) -> None:
    """A job of a series version that a later one superseded would make no SEG when run
    again (its worker stops: the later version's job segments every image), while its
    cancelled deliveries said the new SEG was on its way."""
    with index.session() as session:
        row = session.execute(
            select(SeriesVersion.version, Series.id, Series.series_instance_uid, Job.rule_name)
            .join(SeriesVersion, Job.series_version_pk == SeriesVersion.id)
            .join(Series, SeriesVersion.series_pk == Series.id)
            .where(Job.id == job_id)
        ).first()
        if row is None:
            return  # retry_job's own answer: no such job
        version, series_pk, series_uid, rule_name = row
        later = session.execute(
            select(SeriesVersion.version, Job.id)
            .outerjoin(
                Job, (Job.series_version_pk == SeriesVersion.id) & (Job.rule_name == rule_name)
            )
            .where(SeriesVersion.series_pk == series_pk, SeriesVersion.version > version)
            .order_by(SeriesVersion.version.desc())
            .limit(1)
        ).first()
    if later is None:
        return
    newest, newest_job = later
    then = (
        f"`dicom-node jobs retry {newest_job}` runs its job again"
        if newest_job is not None
        else f"`dicom-node series process {series_uid}` segments it"
    )
    raise DicomNodeError(
        f"job {job_id} is for version {version} of series {series_uid}, and version {newest} "
        f"came after it: run again, it would make no SEG (the newest version's job segments "
        f"every image of the series); {then}"
    )


def jobs_cancel(ctx: typer.Context, job_id: Annotated[int, typer.Argument(max=MAX_ROW_ID)]) -> None:
    """Cancel a queued, waiting or running job: nothing is sent."""
    from storage.queue import cancel_job

    index, _ = _index(ctx)
    before = _cancelled(
        cancel_job(index, job_id),
        f"job {job_id}",
        " already: nothing to cancel (`dicom-node series delete` removes a series and its results)",
    )
    note = ": its worker is stopped within seconds" if before == JobState.RUNNING else ""
    typer.echo(f"job {job_id} cancelled (was {before.value}){note}")


_State = TypeVar("_State", JobState, DeliveryState)


def _cancelled(outcome: tuple[_State, bool] | None, what: str, refused: str) -> _State:
    """The state a cancel found; an error naming ``what`` when nothing was cancelled."""
    if outcome is None:
        raise DicomNodeError(f"{what} does not exist")
    before, cancelled = outcome
    if not cancelled:
        raise DicomNodeError(f"{what} is {before.value}{refused}")
    return before


def deliveries_list(
    ctx: typer.Context,
    state: Annotated[
        DeliveryState | None, typer.Option(help="only deliveries in this state")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=MAX_ROW_ID)] = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List deliveries, newest first."""
    index, _ = _index(ctx)
    with index.session() as session:
        query = select(Delivery).order_by(Delivery.id.desc()).limit(limit)
        if state:
            query = query.where(Delivery.state == state)
        rows = [_delivery_dict(d) for d in session.scalars(query)]
    if as_json:
        print_json(rows)
    else:
        _print_table(
            rows, ["id", "job", "peer", "state", "attempts", "next_attempt_at", "last_error"]
        )


def deliveries_retry(
    ctx: typer.Context,
    delivery_id: Annotated[
        int | None,
        typer.Argument(help="one delivery; all dead ones if omitted", max=MAX_ROW_ID),
    ] = None,
) -> None:
    """Send dead-lettered deliveries again now."""
    from storage.queue import retry_delivery

    index, _ = _index(ctx)
    count = retry_delivery(index, delivery_id)
    if delivery_id is not None and not count:
        raise DicomNodeError(
            f"delivery {delivery_id} does not exist, or is being sent or delivered already"
        )
    typer.echo(f"{count} deliveries due again")


def deliveries_cancel(
    ctx: typer.Context, delivery_id: Annotated[int, typer.Argument(max=MAX_ROW_ID)]
) -> None:
    """Stop a pending delivery: it is not sent."""
    from storage.queue import cancel_delivery

    index, _ = _index(ctx)
    _cancelled(
        cancel_delivery(index, delivery_id),
        f"delivery {delivery_id}",
        ": only a pending one can be cancelled",
    )
    typer.echo(f"delivery {delivery_id} cancelled: it will not be sent")


def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="fail unless the node's DICOM port(s) answer a C-ECHO (a health check)",
        ),
    ] = False,
    timeout_s: Annotated[
        float,
        typer.Option("--timeout-s", min=0.1, help="seconds --check waits for each port"),
    ] = 5.0,
) -> None:
    """Queue depth, failures and the last errors; with --check, whether the node answers."""
    settings = settings_of(ctx)
    problems: list[str] = []
    try:
        data: dict[str, Any] = {"index_up": True, **_index_status(ctx, must_exist=check)}
    except StorageError as exc:
        if not check:
            raise  # without --check: the index alone, its reason as the error
        # The health check still says what it can: the ports, and the index's reason.
        data = {"index_up": False, "index_error": str(exc)}
        problems.append(str(exc))
    if check:
        from dicom_node.health import check_ports

        answers = check_ports(settings, timeout_s)
        data["listening"] = {where: answer.answered for where, answer in answers.items()}
        data["answers"] = {where: answer.detail for where, answer in answers.items()}
        problems += [
            f"{'nothing accepts connections on' if answer.refused else 'no answer on'} "
            f"{where}: {answer.detail}"
            for where, answer in answers.items()
            if not answer.answered
        ]
    if as_json:
        print_json(data)
    elif data["index_up"]:
        typer.echo(_status_text(data))
    if problems:
        # Exit 1: what Docker's HEALTHCHECK reads as unhealthy (2 is reserved there).
        typer.echo(f"error: {'; '.join(problems)}", err=True)
        raise typer.Exit(1)


def _index_status(ctx: typer.Context, *, must_exist: bool) -> dict[str, Any]:
    """What `status` says from the index; StorageError where it cannot be read, or, with
    ``must_exist`` (the health check), where a SQLite index is not there yet."""
    from dicom_node.rule_models import (
        rule_caller_problems,
        rule_match_problems,
        rule_model_problems,
    )
    from storage.stats import index_counts

    settings = settings_of(ctx)
    url = make_url(settings.storage.effective_database_url)
    missing = (
        url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists()
    )
    if must_exist and missing:
        # Opening it would make an empty one: a wrong or unmounted data_dir looked healthy.
        raise StorageError(
            f"no index at {url.database}: is storage.data_dir ({settings.storage.data_dir}) "
            "the node's, and mounted?"
        )
    index, store = _index(ctx)  # an unreachable index fails here, with its reason
    counts = index_counts(index)
    with index.session() as session:
        failed_jobs = [
            {"job": j.id, "at": j.finished_at, "reason": j.reason}
            for j in session.scalars(
                select(Job)
                .where(Job.state.in_([JobState.FAILED, JobState.RETRY_WAIT]))
                .order_by(Job.id.desc())
                .limit(5)
            )
        ]
        failed_deliveries = [
            {"delivery": d.id, "state": d.state.value, "error": d.last_error}
            for d in session.scalars(
                select(Delivery)
                .where(Delivery.last_error != "", Delivery.state != DeliveryState.DELIVERED)
                .order_by(Delivery.id.desc())
                .limit(5)
            )
        ]
    return {
        "series_receiving": counts.series_versions["receiving"],
        "instances": counts.instances,
        "jobs": {state: n for state, n in counts.jobs.items() if n},
        "deliveries": {state: n for state, n in counts.deliveries.items() if n},
        "queue_depth": counts.queue_depth,
        "oldest_waiting_job_s": counts.oldest_waiting_job_s,
        "jobs_failed_24h": counts.jobs_failed_24h,
        "free_disk_mb": store.free_bytes() // (1024 * 1024),
        "last_job_errors": failed_jobs,
        "last_delivery_errors": failed_deliveries,
        # A rule's model not installed here, unusable or of another modality; a rule that
        # cannot match as written (logged at start).
        "rule_problems": [
            str(p)
            for p in rule_model_problems(settings)
            + rule_caller_problems(settings)
            + rule_match_problems(settings)
        ],
    }


def _counted(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {state}" for state, n in counts.items()) or "none"


def _waited(seconds: float | None) -> str:
    """How long the job waiting longest for a worker has waited, for a person."""
    if seconds is None:
        return "no job waits for a worker"
    minutes = int(seconds // 60)
    if minutes < 1:
        return "under a minute"
    text = f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"
    return f"{text} (a job waits for a worker)"


def _status_text(data: dict[str, Any]) -> str:
    """``status`` for a person: one fact per line, the errors listed under their heading."""
    failed_jobs, failed_deliveries = data["last_job_errors"], data["last_delivery_errors"]
    lines = [
        f"series receiving:   {data['series_receiving']}",
        f"images stored:      {data['instances']}",
        f"free disk:          {data['free_disk_mb']:,} MB",
        f"jobs:               {_counted(data['jobs'])}",
        f"queue depth:        {data['queue_depth']}",
        f"longest wait:       {_waited(data['oldest_waiting_job_s'])}",
        f"jobs failed (24 h): {data['jobs_failed_24h']}",
        f"deliveries:         {_counted(data['deliveries'])}",
    ]
    if "listening" in data:
        lines += [
            f"answers on {where}: {'yes' if answered else 'NO'}, {data['answers'][where]}"
            for where, answered in data["listening"].items()
        ]
    lines.append("last job errors:" if failed_jobs else "last job errors: none")
    lines += [
        f"  job {j['job']}"
        + (f" at {human(j['at'])}" if j["at"] is not None else "")
        + f": {j['reason']}"
        for j in failed_jobs
    ]
    lines.append("last delivery errors:" if failed_deliveries else "last delivery errors: none")
    lines += [f"  delivery {d['delivery']} ({d['state']}): {d['error']}" for d in failed_deliveries]
    problems = data["rule_problems"]
    lines.append("rule problems:" if problems else "rule problems: none")
    lines += [f"  {problem}" for problem in problems]
    return "\n".join(lines)


def worker(
    ctx: typer.Context,
    processes: Annotated[
        int | None, typer.Option(help="default: workers.processes", min=1, max=64)
    ] = None,
) -> None:
    """Run extra inference workers on the same index and store (another machine, or more GPUs)."""
    import signal
    import threading

    from dicom_node.rule_models import rule_model_problems
    from dicom_node.service import open_store
    from dicom_node.worker import WorkerPool
    from storage.database import warn_of_clock_skew

    wake = threading.Event()  # a stop asked for while starting is honoured once started
    signal.signal(signal.SIGTERM, lambda *_: wake.set())
    signal.signal(signal.SIGINT, lambda *_: wake.set())
    settings = settings_of(ctx)
    index, _ = open_store(settings)
    warn_of_clock_skew(index)  # its heartbeats are compared with other machines' clocks
    for problem in rule_model_problems(settings):  # this machine's models run the jobs
        if problem.stops_jobs:
            logger.warning("%s: jobs of that rule that this worker takes will fail", problem)
    pool = WorkerPool(settings, index, processes or max(1, settings.workers.processes))
    pool.start()
    while not wake.wait(1.0):
        pass
    pool.stop()
