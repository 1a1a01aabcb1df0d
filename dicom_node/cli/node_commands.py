"""``serve``, ``echo`` and ``store prune``."""

from __future__ import annotations

import logging
import re
from typing import Annotated

import typer
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.cli import index_fault, print_json, settings_of
from dicom_node.config import PeerSettings
from dicom_node.errors import ConfigError, DicomNodeError, validation_problems

logger = logging.getLogger(__name__)

_ADDRESS = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d+)$")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("echo")(echo)
    store_app = typer.Typer(help="The file store and index.", no_args_is_help=True)
    store_app.command("prune")(prune)
    store_app.command("check")(check)
    app.add_typer(store_app, name="store")


def serve(ctx: typer.Context) -> None:
    """Run the node: Storage SCP, series completion, jobs, workers and the outbox."""
    from dicom_node.service import Service, default_components

    settings = settings_of(ctx)
    listeners, components = default_components(settings)
    try:
        Service(
            settings,
            completion_listeners=listeners,
            components=components,
            config_path=ctx.meta.get("config_path"),
        ).run_until_signal()
    except (DicomNodeError, SQLAlchemyError) as exc:
        # Also in logging.file, where the start's own lines are: stderr alone had the reason.
        logger.error("serve failed: %s", index_fault(exc, settings) or exc)
        raise


def _resolve_peer(ctx: typer.Context, peer: str) -> PeerSettings:
    settings = settings_of(ctx)
    found = settings.peer_by_name(peer) or settings.peer_by_ae(peer)
    if found is not None:
        return found
    match = _ADDRESS.match(peer)
    if match:
        port = int(match["port"])
        if not 1 <= port <= 65535:
            raise ConfigError(f"{peer!r}: port {port} is not between 1 and 65535")
        try:
            return PeerSettings(name=peer, ae_title=match["ae"], host=match["host"], port=port)
        except ValidationError as exc:  # an AE title the settings model refuses
            raise ConfigError(f"{peer!r}: {validation_problems(exc).strip()}") from exc
    known = ", ".join(p.name for p in settings.peers) or "none configured"
    raise ConfigError(
        f"unknown peer {peer!r}: use a configured peer name ({known}) or AE@host:port"
    )


def echo(
    ctx: typer.Context,
    peer: Annotated[str, typer.Argument(help="a configured peer name, or AE@host:port")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Send a C-ECHO to a peer and report whether it answered."""
    from dicom_node.send import echo_peer

    settings = settings_of(ctx)
    target = _resolve_peer(ctx, peer)
    result = echo_peer(settings, target)
    if as_json:
        print_json(result)
    else:
        state = "OK" if result["ok"] else "FAILED"
        typer.echo(
            f"C-ECHO {target.ae_title}@{target.host}:{target.port}: {state} "
            f"({result['detail']}, {result['seconds']:.3f} s)"
        )
    if not result["ok"]:
        raise typer.Exit(1)


def prune(
    ctx: typer.Context,
    older_than: Annotated[str, typer.Option("--older-than", help="e.g. 30d, 12h, 90m")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only list what would go")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Remove files and index rows of finished series older than DURATION."""
    from dicom_node.service import open_store
    from storage.retention import parse_duration
    from storage.retention import prune as prune_store

    try:
        age = parse_duration(older_than)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    index, store = open_store(settings_of(ctx))
    result = prune_store(index, store, age, dry_run=dry_run)
    if as_json:
        print_json(
            {
                "series": result.series,
                "instances": result.instances,
                "bytes_freed": result.bytes_freed,
                "dry_run": dry_run,
                "kept": [{"series": uid, "why": why} for uid, why in result.kept],
            }
        )
    else:
        verb = "would remove" if dry_run else "removed"
        typer.echo(
            f"{verb} {len(result.series)} series, {result.instances} instances, "
            f"{result.bytes_freed / 1e6:.1f} MB"
        )
        if dry_run:
            _list("series that would go", result.series)
        _list("old enough but kept for now", [f"{uid}: {why}" for uid, why in result.kept])


def check(
    ctx: typer.Context,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="index images no row names, remove partial files and SEGs of no job",
        ),
    ] = False,
    forget_missing: Annotated[
        bool,
        typer.Option(
            "--forget-missing", help="also remove the index rows of images whose file is gone"
        ),
    ] = False,
    grace_s: Annotated[
        float, typer.Option("--grace-s", help="leave out files younger than this (in flight)")
    ] = 60.0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Compare the file store with the index; exit 1 while they disagree."""
    from dataclasses import asdict

    from dicom_node.service import open_store
    from dicom_node.store_check import COMPLETE_COPY, complete_copies, repair_store
    from storage.consistency import check_store

    index, store = open_store(settings_of(ctx))
    report = check_store(index, store, grace_s)
    repaired = None
    if repair or forget_missing:
        repaired = repair_store(index, store, report, forget=forget_missing)
        report = check_store(index, store, grace_s)
    # Files of another size that --repair would re-index (they hold a whole copy): read
    # only for rows whose size differs, which are few.
    copies = complete_copies(store, report.missing)
    if as_json:
        print_json(
            {
                "consistent": report.consistent,
                "report": asdict(report),
                "complete_copies": sorted(copies),
                "repaired": asdict(repaired) if repaired else None,
            }
        )
    else:
        if repaired is not None:
            typer.echo(
                f"repaired: indexed {repaired.indexed} images of {len(repaired.series)} series, "
                f"removed {len(repaired.removed)} leftover files, "
                f"re-indexed {len(repaired.refreshed)} images from whole copies, "
                f"forgot {repaired.forgotten} rows of missing files, "
                f"finished {repaired.finished_removals} interrupted prunes or deletes"
            )
        typer.echo(
            f"checked {report.instances_checked} images and {report.seg_results_checked} SEGs"
            + (
                f" ({report.recent} files younger than {grace_s:g} s left out)"
                if report.recent
                else ""
            )
        )
        _list(
            "images or SEGs missing or altered",
            [
                f"{m.path}: {m.what}: {m.problem}"
                + (f": {COMPLETE_COPY}" if m.path in copies else "")
                for m in report.missing
            ],
        )
        # What --repair has just left in place is not sent back to it: it would go round.
        left = dict(repaired.unreadable) if repaired is not None else {}
        _list(
            "images no index row names (--repair indexes them)",
            [path for path in report.unreferenced_images if path not in left],
        )
        _list(
            "files --repair cannot index, left in place: inspect each (not DICOM, or a second "
            "copy of an image indexed under another file) and move each out of the store",
            [f"{path}: {left[path]}" for path in report.unreferenced_images if path in left],
        )
        _list("SEGs of no job (--repair removes them)", report.unreferenced_results)
        _list("partial files from a crash (--repair removes them)", report.temporaries)
        _list(
            "prunes or deletes a crash interrupted (--repair finishes them)",
            report.interrupted_removals,
        )
        _list(
            "prunes or deletes under way in a running process (their files not judged)",
            report.removals_in_progress,
        )
        typer.echo("consistent" if report.consistent else "NOT consistent")
    if not report.consistent:
        raise typer.Exit(1)


def _list(title: str, lines: list[str], limit: int = 20) -> None:
    if not lines:
        return
    typer.echo(f"{title}: {len(lines)}")
    for line in lines[:limit]:
        typer.echo(f"  {line}")
    if len(lines) > limit:
        typer.echo(f"  ... and {len(lines) - limit} more (--json lists all)")
