#!/usr/bin/env bash
# Install (first time) and start the node on its embedded default: SQLite index and file
# store under ./var, one local worker, the bundled demo model, config.yaml from this folder.
# Arguments go to `dicom-node serve`: scripts/run-node.sh --config /etc/dicom-node/config.yaml
# (or set DICOM_NODE_CONFIG); a relative path is taken from where you run it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/install.sh"
# The checkout's config.yaml only when none is given: found from any working directory,
# without changing to the checkout (which would resolve the caller's relative paths there).
given=false
for arg in "$@"; do
  case "$arg" in
    --) break ;;
    --config | -c | --config=*) given=true ;;
  esac
done
if [ "$given" = false ] && [ -z "${DICOM_NODE_CONFIG:-}" ]; then
  export DICOM_NODE_CONFIG="$root/config.yaml"
fi
exec "$root/.venv/bin/dicom-node" serve "$@"
