#!/usr/bin/env bash
# Install (first time) and start the node on its embedded default: SQLite index and file
# store under ./var, one local worker, the bundled demo model, config.yaml from this folder.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/dicom-node --config "${DICOM_NODE_CONFIG:-config.yaml}" serve
