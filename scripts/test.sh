#!/usr/bin/env bash
# The test command (README): sets up the environment, builds, and runs the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k pool`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
workers="${FASTNETS_TEST_WORKERS:-$(( $(nproc) < 8 ? $(nproc) : 8 ))}"
exec "$PYBIN" -m pytest tests -n "$workers" -q -p no:benchmark --durations=15 "$@"
