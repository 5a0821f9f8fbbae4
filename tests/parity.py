"""Helpers shared by the parity tests: devices, backends, inputs, layouts, and the tolerance rule.

The rule (from flash-attention's tests, DESIGN section 5): against a float64 reference, the
fastnets result's error is at most FACTOR times stock PyTorch's error in the same dtype, plus a
small absolute floor scaled by the reference's magnitude. NaN and Inf must sit where the
reference has them.
"""
from __future__ import annotations

import contextlib
import importlib.util

import torch

from fastnets import _dispatch, _ext

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")

# The kernel backends that can run here: Triton (natively on a GPU, in the interpreter on the CPU)
# and the CUDA C++ kernels (only where fastnets._C sees a device).
KERNEL_BACKENDS = [b for b, ok in (("triton", importlib.util.find_spec("triton") is not None),
                                   ("cuda", GPU and _ext.device_status()[0] > 0)) if ok]

# Elementwise and reduction kernels compute in float32, so bf16 runs in the interpreter too.
# tl.dot on bf16 operands returns garbage in the interpreter: kernels built on tl.dot test
# DOT_DTYPES on the CPU and bf16 only on a GPU.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DOT_DTYPES = DTYPES if GPU else [torch.float32, torch.float16]

FACTOR = 2.0
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}

LAYOUTS = ("contiguous", "channels_last", "noncontiguous")


def rand(*shape, dtype=torch.float32, device=DEVICE, layout="contiguous", requires_grad=False,
         scale=1.0, generator=None):
    """Fresh standard-normal values (never zeros) in the requested memory layout.

    layout: "contiguous"; "channels_last" (4-D: NHWC strides); "noncontiguous" (a strided view
    of a larger tensor, every stride different from the contiguous one).
    """
    t = torch.randn(*shape, dtype=torch.float32, generator=generator) * scale
    t = to_layout(t.to(device=device, dtype=dtype), layout)
    return t.requires_grad_(requires_grad)


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        if t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        if t.dim() == 3:  # unbatched (C, H, W): channels innermost
            return t.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        return t.contiguous()
    if layout == "noncontiguous":
        # Every dimension twice as long, then every second element: no stride is the dense one.
        big = torch.empty([2 * s for s in t.shape], dtype=t.dtype, device=t.device).normal_()
        view = big[tuple(slice(None, None, 2) for _ in t.shape)]
        view.copy_(t)
        return view
    raise ValueError(layout)


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """t's values, shape and strides (and requires_grad) in storage that starts one element past a
    16-byte boundary: the input that must take a kernel's unaligned (non-vector) path."""
    buf = torch.empty(t.untyped_storage().nbytes() // t.element_size() + 1, dtype=t.dtype, device=t.device)
    out = buf.as_strided(t.shape, t.stride(), t.storage_offset() + 1)
    out.copy_(t.detach())
    assert out.data_ptr() % 16 != 0
    return out.requires_grad_(t.requires_grad)


def upcast(t, dtype=torch.float64):
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        return t.detach().to(dtype).requires_grad_(t.requires_grad)
    return t


def error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Max absolute difference over the finite reference entries."""
    a, ref = a.double(), ref.double()
    finite = torch.isfinite(ref)
    if not finite.any():
        return 0.0
    return (a[finite] - ref[finite]).abs().max().item()


def assert_parity(out: torch.Tensor, ref: torch.Tensor, stock, name: str = "output",
                  factor: float = FACTOR, floor: float | None = None) -> None:
    """out: fastnets in dtype; ref: float64 reference; stock: stock PyTorch in the same dtype, or a
    sequence of stock results (say NCHW and channels_last), whose largest error is the yardstick."""
    stocks = list(stock) if isinstance(stock, (list, tuple)) else [stock]
    stock = max(stocks, key=lambda s: error(s, ref.detach().double().cpu()))
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert out.dtype == stock.dtype, f"{name}: dtype {out.dtype} != stock {stock.dtype}"
    out_d, ref_d = out.detach().double().cpu(), ref.detach().double().cpu()
    nan_out, nan_ref = torch.isnan(out_d), torch.isnan(ref_d)
    assert torch.equal(nan_out, nan_ref), (
        f"{name}: NaN at {int((nan_out & ~nan_ref).sum())} places the reference has none "
        f"(unwritten output?), missing at {int((nan_ref & ~nan_out).sum())} places it has NaN")
    inf_ref = torch.isinf(ref_d)
    assert torch.equal(out_d[inf_ref], ref_d[inf_ref]), f"{name}: Inf values differ from the reference"
    scale = max(1.0, ref_d[torch.isfinite(ref_d)].abs().max().item() if torch.isfinite(ref_d).any() else 1.0)
    bound = factor * error(stock, ref_d) + (FLOOR[out.dtype] if floor is None else floor) * scale
    err = error(out_d, ref_d)
    assert err <= bound, (f"{name}: max error {err:.3g} against the float64 reference exceeds {bound:.3g} "
                          f"({factor}x stock PyTorch's {error(stock, ref_d):.3g} + floor)")


@contextlib.contextmanager
def ran_on(backend: str, op: str | None = None):
    """Runs the block under `backend` and proves that this backend's kernels, not the reference,
    produced the results (every launch recorded inside is that backend's)."""
    with _dispatch.use_backend(backend), _dispatch.trace() as record:
        yield record
    launches = [r for r in record if op is None or r[0].startswith(op)]
    assert launches, f"no {op or ''} launch was recorded under backend {backend!r}"
    others = [r for r in launches if r[1] != backend]
    assert not others, f"under backend {backend!r} these ran elsewhere: {others}"


def assert_raises_like(ours, stock, match: str | None = None):
    """ours() must raise the exception type stock() raises (PyTorch's own behaviour for the same
    bad input); `match` (a regex) is checked against our message when given."""
    import pytest

    try:
        stock()
    except Exception as exc:  # noqa: BLE001 - the type is what we compare
        expected = type(exc)
    else:
        raise AssertionError("stock PyTorch accepts this input; compare the results instead")
    with pytest.raises(expected, match=match):
        ours()
