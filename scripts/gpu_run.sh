#!/usr/bin/env bash
# The GPU window in one command (device tool: `bash scripts/gpu_run.sh`), or its CPU rehearsal
# (`bash scripts/gpu_run.sh --rehearse`, what CI runs through tests/test_gpu_run.py).
# Four stages in priority order with deadlines (build + Triton precompile, native correctness,
# headline numbers, gpu tests + compute-sanitizer); at most 8 files in $OUT, a summary even when
# killed. The stage logic, the time estimates and the drop order under --budget SECONDS are in
# scripts/gpu_run.py's docstring. Give the device tool's run a timeout_s of 600 (the run's own
# budget is 540 s). After the run: python -m fastnets.bench.measured ingest <returned folder>.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ] && ! python3 -c "import torch" >/dev/null 2>&1; then
    PY=.venv/bin/python          # the CPU machine
else
    PY="${PYTHON:-python3}"      # a GPU machine's python3 already holds torch and Triton
fi
export PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_run.py "$@"
