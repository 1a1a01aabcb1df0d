"""Every `dicom-node ...` command the README gives an administrator exists, with the options
it names: a renamed command or option left in the README sends them to an error.

Checked against the CLI's own command tree (no subprocess): each code span or code block
line that runs ``dicom-node`` must name a command, and each ``--option`` after it must be
one of that command's (or the root's).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer

from dicom_node.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"

# Code blocks (```...```) and inline code spans (`...`, across a line break).
_BLOCK = re.compile(r"```[a-z]*\n(.*?)```", re.DOTALL)
_SPAN = re.compile(r"`([^`]+)`")
# `dicom-node` where it is run: at the start of a line or span, after a shell separator, or
# as a path ending in bin/; not the user or group (`-u dicom-node`, `create 0640 dicom-node
# dicom-node`) nor the data folder (/var/lib/dicom-node).
_RUN = re.compile(r"(?:^\s*|(?<=&& )|(?<=; )|(?<=\| )|(?<=bin/))dicom-node(?=\s|$)")


def _invocations(text: str) -> list[str]:
    """What follows each ``dicom-node`` run in the README's code, one line each."""
    code = [line for block in _BLOCK.findall(text) for line in block.splitlines()]
    prose = _BLOCK.sub("", text)
    code += [span.replace("\n", " ") for span in _SPAN.findall(prose)]
    found = []
    for line in code:
        for match in _RUN.finditer(line):
            rest = line[match.end() :].split("#", 1)[0].split("&&", 1)[0]
            found.append(rest.strip())
    return found


def _option_names(command: Any) -> set[str]:
    return {name for param in command.params for name in (*param.opts, *param.secondary_opts)}


def _is_group(command: Any) -> bool:
    # typer's own copy of click's Group: a command with subcommands.
    return isinstance(getattr(command, "commands", None), dict)


def _check(root: Any, invocation: str) -> str | None:
    """What is wrong with ``dicom-node <invocation>``, or None."""
    tokens = [t.strip("[]().,;:") for t in invocation.split()]
    tokens = [t for t in tokens if t and t not in ("...", "\\", "|")]
    command = root
    options = _option_names(root)
    path: list[str] = []
    skip_value = False
    for token in tokens:
        if skip_value:
            skip_value = False
            continue
        if token.startswith("-"):
            name = token.split("=", 1)[0]
            if name not in options:
                return f"{' '.join(path) or 'dicom-node'} has no option {name}"
            if not path and name in ("-c", "--config") and "=" not in token:
                skip_value = True  # the root's one option with a value
            continue
        if _is_group(command):
            sub = command.commands.get(token)
            if sub is None:
                if not path and not token[:1].isalpha():
                    return None  # a path or placeholder after a user name: not a run
                return f"no command {' '.join([*path, token])!r}"
            command, path = sub, [*path, token]
            options = _option_names(root) | _option_names(command)
            continue
        # Arguments of the command (UIDs, IDs, paths, placeholders).
    if _is_group(command) and path:
        return f"{' '.join(path)!r} needs a subcommand"
    return None


def test_every_command_the_readme_gives_exists_with_its_options() -> None:
    root = typer.main.get_command(app)
    assert _is_group(root)
    invocations = _invocations(README.read_text())
    assert len(invocations) > 50  # the README's command list and its sections
    problems = {inv: why for inv in invocations if (why := _check(root, inv)) is not None}
    assert problems == {}


def test_a_wrong_command_or_option_is_caught() -> None:
    """The check itself: it fails on what it must fail on."""
    root = typer.main.get_command(app)
    assert _is_group(root)
    assert _check(root, "series list --json") is None
    assert _check(root, "-c /etc/dicom-node/config.yaml store check --repair --grace-s 0") is None
    assert _check(root, "series lst") == "no command 'series lst'"
    assert _check(root, "store prune --older-then 30d") == "store prune has no option --older-then"
    assert _check(root, "jobs") == "'jobs' needs a subcommand"
