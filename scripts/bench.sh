#!/usr/bin/env bash
# The main job (README): sets up the environment, builds, and runs the benchmark suite.
# Extra arguments go to `python -m fastnets.bench` (e.g. `--quick`, `--models resnet50`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec "$PYBIN" -m fastnets.bench "$@"
