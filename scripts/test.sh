#!/usr/bin/env bash
# Set up (if needed), then lint, type-check and run every test, the real-model ones included
# (SmolLM2-135M and the default edge model, Qwen2.5-Coder-0.5B).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh qwen2.5-coder-0.5b-instruct-q4_k_m smollm2-135m-instruct-q4_1
.venv/bin/ruff check service tests benchmarks
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
