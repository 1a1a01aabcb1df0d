#!/usr/bin/env bash
# Move constraints.txt to the newest releases the project's requirements allow: install the
# project with its test extras into a scratch venv (torch held at constraints.txt's pin) and
# write what pip installed. Run the tests afterwards (scripts/test.sh installs the new pins
# into ./.venv) and commit constraints.txt only if they pass.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=$(grep -E '^torch==' constraints.txt | head -n1)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$PYTHON" -m venv "$scratch/venv"
"$scratch/venv/bin/pip" install -q "$TORCH"
echo "$TORCH" >"$scratch/torch.txt"
"$scratch/venv/bin/pip" install -q -c "$scratch/torch.txt" -e ".[test,postgres]"
{
  cat <<EOF
# The Python packages the test suite passed with, every one pinned: a fresh install (the
# README's two commands, CI, the Dockerfile) gets exactly these, not whatever was released
# since. scripts/update-constraints.sh rewrites this file; run the tests before committing it.
#
# torch is installed first and on its own (scripts/install.sh), so this pin also keeps pip
# from replacing it (nnunetv2 -> timm -> torchvision would pull a newer torch with ~4 GB of
# CUDA wheels). The Dockerfile takes the pins of the packages its base image lacks
# (scripts/docker_constraints.py): the base brings torch and what torch itself pins.
# torchvision is left free: pip picks the one matching whichever torch is installed.
$TORCH
EOF
  # Left out: the project itself, torch (pinned above), torchvision (follows torch) and
  # pip. --all keeps setuptools, which torch requires.
  "$scratch/venv/bin/pip" freeze --all --exclude-editable \
    | grep -v -i -E '^(dicom-node|torch|torchvision|pip)([=@ ]|$)' \
    | LC_ALL=C sort -f
} >"$scratch/constraints.txt"
cp "$scratch/constraints.txt" constraints.txt
echo "constraints.txt: $(grep -c '==' constraints.txt) pins written; now run scripts/test.sh"
