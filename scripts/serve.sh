#!/usr/bin/env bash
# Set up (if needed) and serve /evaluate on the embedded default edge model, on port 8080.
# Extra arguments go to `gatekeeper serve` (e.g. --host 0.0.0.0 --port 9000).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/gatekeeper serve "$@"
