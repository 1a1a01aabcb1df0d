"""dicom3tools' independent checkers: dciodvfy (the IOD) and dcentvfy (SEG vs its sources)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest


def _errors(output: str) -> list[str]:
    # "Abort": the tool could not read a file at all (missing, not DICOM), and checked nothing.
    return [line for line in output.splitlines() if line.startswith(("Error", "Abort"))]


def _run(tool: str, *args: Path) -> str:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed (Debian package dicom3tools)")
    run = subprocess.run([tool, *map(str, args)], capture_output=True, timeout=300)
    # It prints values as their bytes, in whatever character set the file declares.
    output = (run.stdout + run.stderr).decode("utf-8", errors="replace")
    # Exit status 1 with errors, an abort or a usage message: none of them is a pass.
    assert run.returncode == 0, f"{tool} exited with {run.returncode}:\n{output}"
    return output


def dciodvfy(path: Path) -> str:
    """dciodvfy's output; fails the test on any Error line."""
    output = _run("dciodvfy", path)
    assert _errors(output) == [], output
    return output


def dcentvfy(seg: Path, sources: Sequence[Path]) -> str:
    """dcentvfy over the SEG and its sources; fails the test on any Error line."""
    output = _run("dcentvfy", seg, *sources)
    assert _errors(output) == [], output
    return output


def assert_valid_binary_seg(seg: Path, sources: Sequence[Path]) -> None:
    """A BINARY SEG passes dciodvfy with no errors and dcentvfy with its sources."""
    dciodvfy(seg)
    dcentvfy(seg, sources)
