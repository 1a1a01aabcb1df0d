#!/usr/bin/env bash
# Install dicom-node into ./.venv (idempotent). Usage: scripts/install.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=""
if [ "${1:-}" = "--test" ]; then EXTRAS="[test,postgres]"; fi
# What the installed environment was made from: when nothing changed, starting the node
# needs no package index (pip's isolated build of the project would fetch setuptools), so a
# server without internet access restarts as it started.
STAMP=.venv/.dicom-node-installed
WANT="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1) ${EXTRAS:-plain}"
if [ -x .venv/bin/dicom-node ] && [ -f "$STAMP" ] && grep -qxF -- "$WANT" "$STAMP"; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
TORCH=$(grep -E '^torch==' constraints.txt | head -n1)
# torch first, on its own, so the constraint below can pin it (its dependencies at their
# pinned versions too).
.venv/bin/pip install -q -c constraints.txt "$TORCH"
.venv/bin/pip install -q -c constraints.txt -e ".${EXTRAS}"
# Several lines: the test extras include the plain install, not the other way round.
if [ -n "$EXTRAS" ]; then
  printf '%s\n%s\n' "$WANT" "${WANT% *} plain" > "$STAMP"
else
  printf '%s\n' "$WANT" >> "$STAMP"
fi
