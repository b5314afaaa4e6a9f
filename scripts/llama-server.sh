#!/usr/bin/env bash
# Build llama.cpp's own OpenAI-compatible server, `llama-server` (parallel slots, continuous
# batching, /health, /slots, /metrics), from the llama.cpp source vendored in the pinned
# llama-cpp-python sdist from PyPI: the real engine that the remote tier's concurrency tests
# and benchmarks.remote_load run against. Debian 12 packages no llama.cpp, and
# `python -m llama_cpp.server` serves one request at a time, so it cannot show overlap.
#   scripts/llama-server.sh        prints the binary's path (builds it the first time)
#   scripts/llama-server.sh --where  prints where it is or would be, building nothing
# The first build takes ~10 minutes on 2 cores; the binary is kept in the cache folder. Exits
# non-zero (and says why) where there is no compiler or cmake: the tests that need it skip.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/llama-flags.sh  # the same llama.cpp, compiled the same way, as the edge tier
version=$llama_version
cache=${GATEKEEPER_LLAMA_SERVER_CACHE:-$HOME/.cache/gatekeeper/llama-server-$version-$llama_build_key}
binary=$cache/bin/llama-server
if [ "${1:-}" = "--where" ]; then  # where the binary is (or would be), without building it
  echo "$binary"
  exit 0
fi
if [ -x "$binary" ]; then
  echo "$binary"
  exit 0
fi
for tool in cmake c++ tar; do
  command -v "$tool" >/dev/null 2>&1 || { echo "llama-server.sh: no $tool; cannot build" >&2; exit 1; }
done
python=.venv/bin/python
[ -x "$python" ] || python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation \
  --dest "$work" "llama-cpp-python==$version" >&2 2>/dev/null \
  || "$python" -m pip download --quiet --no-deps --no-binary :all: --dest "$work" \
    "llama-cpp-python==$version" >&2
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src=$work/llama_cpp_python-$version/vendor/llama.cpp
# A static binary for this machine; no TLS, no web UI, no tests or other tools: only the target.
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF $LLAMA_CMAKE_ARGS >&2
cmake --build "$work/build" --target llama-server -j "${LLAMA_SERVER_JOBS:-$(nproc)}" >&2
mkdir -p "$cache/bin"
cp "$work/build/bin/llama-server" "$binary.tmp"
mv "$binary.tmp" "$binary"  # atomically: a half-copied binary is never found
echo "$binary"
