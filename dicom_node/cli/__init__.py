"""The ``dicom-node`` command line: one typer app, one sub-app per noun."""

from __future__ import annotations

import codecs
import contextlib
import datetime as dt
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from sqlalchemy import make_url
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.config import Settings, load_settings
from dicom_node.errors import ConfigError, DicomNodeError, StorageError
from dicom_node.logging_setup import configure_logging

app = typer.Typer(
    name="dicom-node",
    help="DICOM node: receive series, segment them with nnU-Net v2, return DICOM-SEG.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain help and usage errors ("Error: ..." under the usage line), as other tools on a
    # server print them, rather than boxes drawn around them.
    rich_markup_mode=None,
)

DEFAULT_CONFIG = Path("config.yaml")
PRIVATE_UMASK = 0o027  # no write for the group, nothing for other users
MAX_ROW_ID = 2**63 - 1  # an index key (and LIMIT): a larger number fails in the database driver


@app.callback()
def _main(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            envvar="DICOM_NODE_CONFIG",
            help=(
                "config.yaml to use, before or after the command (default: ./config.yaml"
                " when present, else built-in defaults)"
            ),
        ),
    ] = None,
) -> None:
    if config is None and DEFAULT_CONFIG.exists():
        config = DEFAULT_CONFIG
    # Patient data: the index, the log, images and SEGs are for the node's user and group,
    # whatever the login's umask (022 left them readable by every local user). A stricter
    # umask stays as it is. Put back after the command (tests run commands in-process).
    previous = os.umask(PRIVATE_UMASK)
    os.umask(previous | PRIVATE_UMASK)
    ctx.call_on_close(lambda: os.umask(previous))
    settings = load_settings(config)
    configure_logging(settings.logging)
    ctx.obj = settings
    ctx.meta["config_path"] = config  # for `serve`'s first log line
    ctx.with_resource(_index_faults_explained(settings))


class IndexFault(StorageError):
    """An index this release cannot use as it is; the message says what to do."""


def index_fault(exc: BaseException, settings: Settings) -> IndexFault | None:
    """``exc`` told with what to do, where it comes from a SQLite index file damaged on
    disk or an index a newer release migrated; None for any other error. Every command
    opens the index: without this, a damaged one was a traceback or "cannot migrate"."""
    from alembic.util.exc import CommandError

    from storage.database import damaged_sqlite_index

    url = make_url(settings.storage.effective_database_url)
    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, IndexFault):
        damaged = damaged_sqlite_index(seen)
        if damaged is not None:
            return IndexFault(
                f"the index {url.database} is damaged ({damaged}): stop the node, move "
                f"{url.database}* aside and rebuild the index from the store with "
                "`dicom-node store check --repair --grace-s 0` (README: Recovering from faults)"
            )
        if isinstance(seen, CommandError) and "Can't locate revision" in str(seen):
            return IndexFault(
                f"{seen}: the index at {url.render_as_string(hide_password=True)} was "
                "migrated by a newer release of dicom-node: run that release, or restore the "
                "index backed up before the upgrade (README: Upgrading the node)"
            )
        seen = seen.__cause__
    return None


@contextlib.contextmanager
def _index_faults_explained(settings: Settings) -> Iterator[None]:
    """Around the command (a resource of its context): see ``index_fault``."""
    try:
        yield
    except (DicomNodeError, SQLAlchemyError) as exc:
        fault = index_fault(exc, settings)
        if fault is None:
            raise
        raise fault from exc


def settings_of(ctx: typer.Context) -> Settings:
    settings = ctx.obj
    if not isinstance(settings, Settings):  # pragma: no cover - set by the callback
        raise RuntimeError("settings not loaded")
    return settings


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def console(width: int | None = None, *, stderr: bool = False) -> Console:
    """The console the CLI prints its tables and progress on. Their cells hold values from
    DICOM headers, peers and job reasons, shown as they are: with rich's markup on, a series
    description holding "[/x]" stopped the command (MarkupError) and "[red]" vanished."""
    return Console(width=width, stderr=stderr, markup=False)


def human(value: Any) -> str:
    """A value as a person reads it in text output: times in UTC to the second, lists and
    mappings as comma-separated items, nothing for a missing value."""
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return f"{value:%Y-%m-%d %H:%M:%S} UTC"  # the index stores UTC
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, dict):
        return ", ".join(f"{key} {human(item)}" for key, item in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(human(item) for item in value)
    return str(value)


def _register() -> None:
    # Imported here so `dicom-node --help` stays fast and each noun lives in its own module.
    from dicom_node.cli import (
        models_commands,
        node_commands,
        pipeline_commands,
        segment_commands,
        series_commands,
    )

    node_commands.register(app)
    series_commands.register(app)
    segment_commands.register(app)
    pipeline_commands.register(app)
    models_commands.register(app)


_register()


_CONFIG_FLAGS = ("--config", "-c")


def config_first(argv: list[str]) -> list[str]:
    """``argv`` with ``--config PATH`` moved before the command, so ``dicom-node serve
    --config PATH`` works as ``dicom-node --config PATH serve`` does (the option belongs to
    the program; no command has its own ``-c``). Arguments after ``--`` are left alone."""
    moved: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest.extend(argv[i:])
            break
        if arg in _CONFIG_FLAGS and i + 1 < len(argv):
            moved += argv[i : i + 2]
            i += 2
            continue
        if arg.startswith("--config="):
            moved.append(arg)
        else:
            rest.append(arg)
        i += 1
    given = [a.removeprefix("--config=") for a in moved if a not in _CONFIG_FLAGS]
    if len(given) > 1:
        # click would take the last silently: a command meant for one node run on another's.
        raise ConfigError(f"--config given {len(given)} times ({', '.join(given)}): give one")
    return moved + rest


def main(argv: list[str] | None = None) -> None:
    # A terminal whose locale cannot encode a patient's name or a description (LANG=C
    # with PYTHONUTF8=0, a Latin-1 locale and a Japanese name): escaped, not a traceback.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and codecs.lookup(stream.encoding).name != "utf-8":
            stream.reconfigure(errors="backslashreplace")
    try:
        app(args=config_first(sys.argv[1:] if argv is None else argv), prog_name="dicom-node")
    except DicomNodeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from exc
