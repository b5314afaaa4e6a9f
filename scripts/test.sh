#!/usr/bin/env bash
# Set up (if needed), then lint, type-check and run every test, the real-model ones included
# (SmolLM2-135M and the default edge model, Qwen2.5-Coder-0.5B).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh qwen2.5-coder-0.5b-instruct-q4_k_m smollm2-135m-instruct-q4_1
# promtool (Debian's prometheus package) checks the alert rules in deploy/; where it cannot be
# installed (no root, no apt) those tests skip and say why
if ! command -v promtool >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; } >/dev/null 2>&1 \
    || echo "test.sh: could not install promtool; the alert-rule tests will skip"
fi
# llama.cpp's own server (parallel slots, continuous batching) for the remote tier's engine
# tests, built once from the pinned llama-cpp-python's vendored llama.cpp and cached; where it
# cannot be built (no compiler or cmake) those tests skip and say why
if ! scripts/llama-server.sh >/tmp/gatekeeper-llama-server-build.log 2>&1; then
  echo "test.sh: could not build llama-server (/tmp/gatekeeper-llama-server-build.log); the remote-engine tests will skip"
fi
.venv/bin/ruff check service tests benchmarks
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
