#!/usr/bin/env bash
# Install dicom-node into ./.venv (idempotent). Usage: scripts/install.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
TORCH=$(grep -E '^torch==' constraints.txt | head -n1)
# torch first, on its own, so the constraint below can pin it (its dependencies at their
# pinned versions too).
.venv/bin/pip install -q -c constraints.txt "$TORCH"
EXTRAS=""
if [ "${1:-}" = "--test" ]; then EXTRAS="[test,postgres]"; fi
.venv/bin/pip install -q -c constraints.txt -e ".${EXTRAS}"
