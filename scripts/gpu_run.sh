#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call (device tool: `bash scripts/gpu_run.sh`):
# build fastnets._C for the GPU, run the whole test suite natively (the gpu-marked tests
# included), then the benchmark suite. Raw logs and JSON land in $OUT (the device tool brings
# them back) to be committed under benchmarks/results/<gpu>-<date>/.
#   QUICK=1 runs the benchmark's --quick subset; SKIP_TESTS=1 / SKIP_BENCH=1 skip a part.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FASTNETS_BUILD_CUDA=1
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '.')
export FASTNETS_CUDA_ARCHS="${FASTNETS_CUDA_ARCHS:-${arch:-90}}"
{ nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } \
    > "$OUT/machine.txt" 2>&1
status=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    bash scripts/test.sh -p no:cacheprovider --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log"
    status=${PIPESTATUS[0]}
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
    bench_args=(--out "$OUT")
    [ "${QUICK:-0}" = 1 ] && bench_args+=(--quick)
    bash scripts/bench.sh "${bench_args[@]}" 2>&1 | tee "$OUT/bench.log"
fi
exit "$status"
