"""The machine's two ceilings, measured at the start of a run, and the roofline of each op.

- Copy bandwidth: a large device-to-device copy, counting the bytes read plus the bytes written.
- Matrix rate: a large matrix product in the run's dtype (fp16/bf16 on the tensor cores; fp32 both
  as IEEE fp32 and as TF32, since cuDNN convolutions use TF32 by default and matmuls do not).

An op's floor is max(bytes / bandwidth, FLOPs / matrix rate) for the fewest bytes it must move
(each input read once, each output written once) and the FLOPs it must do (ops.py gives both per
case); the roofline fraction is that floor over the measured time (1.0 = at the roofline).

On the CPU there is no roofline here: fastnets' kernels do not run natively there, and a shared
2-core machine's ceilings say nothing about the GPU kernels the fractions are meant to judge.
"""
from __future__ import annotations

import dataclasses

import torch

from fastnets.bench import harness


@dataclasses.dataclass
class Ceilings:
    copy_gbps: float                 # GB/s (1e9 bytes), read + written
    matrix_tflops: dict[str, float]  # "fp16", "bf16", "fp32", "tf32" -> TFLOP/s
    copy_bytes: int                  # size of the copy that was timed (each way)
    matmul_size: int                 # n of the n x n x n product

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def measure(device: torch.device, dtypes, *, quick: bool = False) -> Ceilings:
    """Measures the copy bandwidth and the matrix rate of each dtype in `dtypes` on a CUDA device."""
    assert device.type == "cuda", "the ceilings are measured on a GPU"
    nbytes = (256 if quick else 1024) * 2 ** 20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = harness.time_gpu(lambda: dst.copy_(src), rep_ms=50)
    copy_gbps = 2 * nbytes / (t.median_ms * 1e-3) / 1e9
    del src, dst

    n = 4096 if quick else 8192
    rates = {}
    wanted = {DTYPE_NAMES[d] for d in dtypes}
    if "fp32" in wanted:
        wanted.add("tf32")
    for name in sorted(wanted):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "tf32": torch.float32}[name]
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
        try:
            t = harness.time_gpu(lambda: torch.mm(a, b), rep_ms=100)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        rates[name] = 2 * n ** 3 / (t.median_ms * 1e-3) / 1e12
        del a, b
    torch.cuda.empty_cache()
    return Ceilings(copy_gbps, rates, nbytes, n)


def matrix_rate_name(dtype: torch.dtype, conv: bool) -> str:
    """The matrix rate an op of this dtype can reach under torch's current TF32 settings."""
    if dtype != torch.float32:
        return DTYPE_NAMES[dtype]
    allowed = torch.backends.cudnn.allow_tf32 if conv else torch.backends.cuda.matmul.allow_tf32
    return "tf32" if allowed else "fp32"


def floor_ms(nbytes: int, flops: int, ceilings: Ceilings, rate_name: str) -> tuple[float, str]:
    """The roofline floor in ms and which term sets it ("memory" or "compute")."""
    mem = nbytes / (ceilings.copy_gbps * 1e9) * 1e3
    rate = ceilings.matrix_tflops.get(rate_name)
    comp = flops / (rate * 1e12) * 1e3 if (rate and flops) else 0.0
    return (mem, "memory") if mem >= comp else (comp, "compute")
