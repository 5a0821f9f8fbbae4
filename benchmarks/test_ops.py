"""The op cases of fastnets.bench.ops through pytest-benchmark: each (case, dtype, variant) is one
benchmark; extra_info carries the case's bytes and FLOPs and the achieved GB/s and TFLOP/s."""
import pytest
import torch

from fastnets.bench import harness, ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _backends():
    from fastnets.bench.__main__ import fastnets_backends

    return fastnets_backends(DEVICE, None)


def test_op(benchmark, bench_config, op_case, dtype, variant):
    if DEVICE.type != "cuda" and not bench_config.cpu_ops:
        pytest.skip("no GPU: fastnets' kernels do not run natively here (--bench-cpu-ops times the stock ops and "
                    "the reference path anyway)")
    if variant == "compile" and not bench_config.compile_on:
        pytest.skip("torch.compile is off (--bench-compile none, --bench-quick, or the default on a CPU)")
    try:
        timed, (nbytes, flops) = ops.build(op_case, variant, DEVICE, dtype, bench_config.op_batch, _backends(),
                                           bench_config.shrink)
    except harness.Skip as exc:
        pytest.skip(str(exc))
    rounds = 10 if bench_config.quick else 50
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=2, iterations=1)
    benchmark.extra_info.update(case=op_case.name, variant=variant, dtype=str(dtype), bytes=nbytes, flops=flops)
    if benchmark.stats is not None:  # None under --benchmark-disable
        seconds = benchmark.stats.stats.median
        benchmark.extra_info.update(gbps=nbytes / seconds / 1e9, tflops=flops / seconds / 1e12)
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
