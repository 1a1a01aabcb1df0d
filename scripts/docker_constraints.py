"""Write the Docker image's pip constraints from constraints.txt.

Usage: python scripts/docker_constraints.py constraints.txt /tmp/constraints.txt

Every pin of a package the base image lacks is kept: the image gets the versions the tests
passed with. A package the base image already has keeps the base's version instead, and
torch is pinned to the base's own: those are torch and its exact dependencies, which the
pins made beside the CPU torch contradict (torch 2.6.0 requires sympy==1.13.1, the tested
set has sympy 1.14.0, and pip then refuses to install anything).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def image_constraints(lines: Iterable[str], installed: dict[str, str]) -> list[str]:
    """``lines`` of a constraints file, less the pins of packages in ``installed``
    (canonical name -> version); torch, if installed, is pinned to its installed version."""
    kept = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name = canonical(re.split(r"[\s=<>!~;\[@]", line, maxsplit=1)[0])
        if name not in installed:
            kept.append(line)
    if "torch" in installed:
        kept.insert(0, f"torch=={installed['torch'].split('+')[0]}")
    return kept


def main() -> None:
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    installed = {
        canonical(dist.metadata["Name"]): dist.version for dist in metadata.distributions()
    }
    lines = image_constraints(source.read_text().splitlines(), installed)
    target.write_text("".join(f"{line}\n" for line in lines))
    print(f"{target}: {len(lines)} pins ({len(installed)} packages of the base image kept)")


if __name__ == "__main__":
    main()
