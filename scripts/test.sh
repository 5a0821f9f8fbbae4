#!/usr/bin/env bash
# The test command (README): sets up the environment, builds, and runs the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k pool`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
workers="${FASTNETS_TEST_WORKERS:-$(( $(nproc) < 8 ? $(nproc) : 8 ))}"
# A hung test fails after 15 minutes instead of stalling the run (pytest-timeout, where installed).
timeout_args=()
"$PYBIN" -c "import pytest_timeout" >/dev/null 2>&1 && timeout_args=(--timeout=900)
exec "$PYBIN" -m pytest tests -n "$workers" -q -p no:benchmark "${timeout_args[@]}" --durations=15 "$@"
