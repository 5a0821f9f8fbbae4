"""Edge behaviour and layouts across every op (issue 7, items 2 and 3), on the kernel backends
(the Triton interpreter on the CPU; Triton and CUDA natively on a GPU):

- batch 0: torch's empty result and gradient, and no kernel launched (every launch is patched to
  fail);
- NaN and +-Inf inside the input: NaN and Inf where torch has them, forward and backward (an
  all -inf max-pool window gives -inf, a NaN in a window NaN, batch-norm statistics poisoned by
  one NaN, ...);
- layouts: a transposed view, channels_last, and a float16 view whose storage offset of one
  element breaks 16-byte alignment give the contiguous run's results; a non-contiguous
  grad_output (an expanded, stride-0 one and a transposed one) gives the gradients of its
  contiguous copy.
The ops and their stock counterparts are tests/harden_ops.py's table. Fully masked attention rows
and causal alignment with L != S: the attention entry is causal with L > S; fully masked rows are
checked in test_masked_attention_rows below.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastnets
from fastnets import _ext
from fastnets import functional as FF
from harden_ops import NAMES, ops
from parity import DEVICE, KERNEL_BACKENDS, ran_on

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _rand(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def _run(op_fn, x, grad=None):
    """(output, x.grad) of op_fn(x) with the backward of grad (a fixed random one by default)."""
    x = x.detach().requires_grad_()
    out = op_fn(x)
    if grad is None:
        grad = _rand(out.shape, out.dtype, seed=1)
    out.backward(grad)
    return out.detach(), x.grad


@contextlib.contextmanager
def _no_launch(monkeypatch):
    """Every Triton launch and every CUDA launcher fails inside the block."""
    import triton.runtime.autotuner as autotuner
    import triton.runtime.jit as jit

    def fail(*args, **kwargs):
        raise AssertionError("a kernel was launched for an empty input")

    monkeypatch.setattr(jit.JITFunction, "run", fail)
    monkeypatch.setattr(autotuner.Autotuner, "run", fail)
    try:
        from triton.runtime.interpreter import InterpretedFunction

        monkeypatch.setattr(InterpretedFunction, "run", fail)
    except ImportError:  # pragma: no cover - an older Triton without the interpreter module
        pass
    monkeypatch.setattr(_ext, "module", fail)
    yield


# ----------------------------------------------------------------------------------------------
# Batch 0

@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_batch_zero_is_empty_and_launches_nothing(backend, name, monkeypatch):
    op = ops(batch=0)[name]
    x = _rand(op.shape)
    expected, expected_grad = _run(op.stock, x, grad=torch.zeros(op.stock(x).shape, device=DEVICE))
    with _no_launch(monkeypatch), fastnets.use_backend(backend):
        out, grad = _run(op.ours, x, grad=torch.zeros(expected.shape, device=DEVICE))
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert grad.shape == x.shape and not grad.any()


@pytest.mark.skipif(not KERNEL_BACKENDS, reason="no kernel backend here")
def test_empty_planes_and_any_rank_global_average_as_torch():
    """adaptive_avg_pool2d to 1x1 is torch's mean over the last two dims: any rank from 2, and NaN
    for an empty plane; the kernels run it on the (planes, H, W) view."""
    for shape in ((7, 9), (2, 3, 4, 5, 6)):
        x = _rand(shape)
        with ran_on(KERNEL_BACKENDS[0], "adaptive_avg_pool2d"):
            out, grad = _run(lambda t: FF.adaptive_avg_pool2d(t, 1), x)
        expected, expected_grad = _run(lambda t: F.adaptive_avg_pool2d(t, 1), x)
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(grad, expected_grad)
    x = _rand((2, 3, 0, 4))
    out = FF.adaptive_avg_pool2d(x, 1)
    assert out.shape == (2, 3, 1, 1) and out.isnan().all()


# ----------------------------------------------------------------------------------------------
# NaN and Inf

def _poisoned(shape, seed=0):
    """Random values with a NaN, a +Inf and a -Inf in different channels and batches, and a whole
    -Inf 3x3 block (an all -inf max-pool window)."""
    x = _rand(shape, seed=seed)
    x[0, 0, 1, 1] = float("nan")
    x[1, 1, 2, 4] = float("inf")
    x[1, 0, 0, 6] = float("-inf")
    x[0, 2, 4:7, 6:9] = float("-inf")
    return x


def _same_nonfinite(out, expected, what):
    for kind, test in (("NaN", torch.isnan), ("+Inf", lambda t: t == float("inf")),
                       ("-Inf", lambda t: t == float("-inf"))):
        assert torch.equal(test(out), test(expected)), (
            f"{what}: {kind} at {int((test(out) & ~test(expected)).sum())} places torch has none, missing at "
            f"{int((test(expected) & ~test(out)).sum())}")
    finite = torch.isfinite(expected)
    torch.testing.assert_close(out[finite], expected[finite], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_nan_and_inf_as_torch(backend, name):
    op = ops()[name]
    x = _poisoned(op.shape)
    expected, expected_grad = _run(op.stock, x)
    with ran_on(backend, op.trace):
        out, grad = _run(op.ours, x)
    _same_nonfinite(out, expected, f"{name} output")
    _same_nonfinite(grad, expected_grad, f"{name} input gradient")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_masked_attention_rows(backend):
    """A fully masked row gives 0 and zero gradients (torch 2.13's math composite and its fused
    kernels); the other rows and every gradient are finite and equal torch's."""
    q, k, v = _rand((1, 2, 6, 16)), _rand((1, 2, 5, 16), seed=1), _rand((1, 2, 5, 16), seed=2)
    mask = torch.rand(6, 5, generator=torch.Generator().manual_seed(3)).to(DEVICE) > 0.4
    mask[2] = False
    mask[2, 0] = True
    mask[4] = False  # a fully masked row
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    with ran_on(backend, "attention"):
        out = FF.scaled_dot_product_attention(*ins, attn_mask=mask)
        out.backward(torch.ones_like(out))
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(*ref, attn_mask=mask)
    expected.backward(torch.ones_like(expected))
    assert torch.equal(out[:, :, 4], torch.zeros_like(out[:, :, 4]))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(ins, ref):
        assert torch.isfinite(ours.grad).all()
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-5)
    assert not ins[0].grad[:, :, 4].any()


# ----------------------------------------------------------------------------------------------
# Layouts

def _transposed(x):
    """Same values, H and W strides swapped (not channels_last, not contiguous)."""
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def _offset(x):
    """Same values and strides, the first element one element past a 16-byte boundary."""
    base = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    view = base[1:].view(x.shape)
    view.copy_(x)
    assert view.storage_offset() == 1 and view.is_contiguous()
    return view


LAYOUTS = {
    "transposed": (torch.float32, _transposed),
    "channels_last": (torch.float32, lambda x: x.contiguous(memory_format=torch.channels_last)),
    "offset_fp16": (torch.float16, _offset),
}


def _close(a, b, dtype, what):
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(a, b, equal_nan=True, msg=lambda m: f"{what}: {m}", **tol)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", NAMES)
def test_layouts_equal_the_contiguous_run(backend, layout, name):
    dtype, make = LAYOUTS[layout]
    op = ops(dtype)[name]
    if layout == "channels_last" and not op.spatial:
        pytest.skip("not an (N, C, H, W) input")
    x = _rand(op.shape, dtype)
    with ran_on(backend, op.trace):
        out, grad = _run(op.ours, x)
        g = _rand(out.shape, dtype, seed=1)
        out_l, grad_l = _run(op.ours, make(x), grad=make(g) if layout == "offset_fp16" else g)
    if layout == "offset_fp16":  # the same strides: the same kernel arithmetic, bit for bit
        assert torch.equal(out_l, out) and torch.equal(grad_l, grad), f"{name}: misaligned run differs"
    else:
        _close(out_l, out, dtype, f"{name} output ({layout})")
        _close(grad_l, grad, dtype, f"{name} input gradient ({layout})")


def _expanded(g):
    """A stride-0 gradient: one value per channel (dim 1), broadcast."""
    return g[:, :, :1, :1].expand(g.shape) if g.dim() == 4 else g[:1].expand(g.shape)


GRADS = {"expanded": _expanded, "transposed": _transposed}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("kind", list(GRADS))
@pytest.mark.parametrize("name", NAMES)
def test_noncontiguous_grad_output(backend, kind, name):
    op = ops()[name]
    x = _rand(op.shape)
    with ran_on(backend, op.trace):
        out = op.ours(x.detach())
        g = GRADS[kind](_rand(out.shape, seed=1))
        if g.is_contiguous():
            pytest.skip(f"a {list(out.shape)} output has no non-contiguous {kind} view")
        _, grad = _run(op.ours, x, grad=g)
        _, grad_dense = _run(op.ours, x, grad=g.contiguous())
    _close(grad, grad_dense, torch.float32, f"{name} input gradient ({kind} grad_output)")


# ----------------------------------------------------------------------------------------------
# GPU: the same misalignment through every kernel at sizes that take the vectorized paths.

@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_gpu_misaligned_half_views(backend, name):
    op = ops(torch.float16, large=True)[name]
    x = _rand(op.shape, torch.float16)
    with ran_on(backend, op.trace):
        g = _rand(op.ours(x).shape, torch.float16, seed=1)
        out, grad = _run(op.ours, x, grad=g)
        out_l, grad_l = _run(op.ours, _offset(x), grad=_offset(g))
    assert torch.equal(out_l, out) and torch.equal(grad_l, grad), f"{name}: misaligned run differs"
