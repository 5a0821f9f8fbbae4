"""Pooling (fastnets/ops/pool.py): parity of the Triton and CUDA kernels with stock PyTorch against a
float64 reference (forward and input gradient, every layout and dtype, awkward shapes), indices
equal to torch's, NaN/Inf, empty batches, the modules, compile/opcheck, and bad input.

On the CPU the Triton kernels run in the interpreter on small shapes; tests marked gpu run the
Triton and CUDA kernels natively at realistic sizes.
"""
import pytest
import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

import fastnets
from fastnets import functional as FF
from fastnets import nn as fnn
from fastnets.ops import pool as P
import parity
from parity import (DEVICE, DTYPES, KERNEL_BACKENDS, LAYOUTS, assert_parity, assert_raises_like, ran_on, rand,
                    upcast)

# ------------------------------------------------------------------------------------------------
# Helpers


def _dense_strides(t):
    return [s for s, n in zip(t.stride(), t.shape) if n > 1]


def _check(op, ours, stock, x, backend, *, indices=False, grad=True, grad_out=None):
    """Runs ours(x) under `backend` (proving its kernels ran) and compares with stock(x) in x's dtype
    and stock(x in float64): values (parity rule), memory format, indices (equal) and input gradient."""
    with ran_on(backend, op):
        res = ours(x)
        out, idx = res if indices else (res, None)
        g = grad_out(out) if grad_out is not None else torch.randn(out.shape, device=out.device).to(out.dtype)
        gx = torch.autograd.grad(out, x, g)[0] if grad else None
    xs = x.detach().requires_grad_(grad)
    x64 = upcast(x)
    s_res, r_res = stock(xs), stock(x64)
    s_out, s_idx = s_res if indices else (s_res, None)
    r_out = r_res[0] if indices else r_res
    assert_parity(out, r_out, s_out, f"{op} output")
    assert _dense_strides(out) == _dense_strides(s_out), f"memory format {out.stride()} != torch's {s_out.stride()}"
    if indices:
        assert idx.dtype == torch.int64 and torch.equal(idx, s_idx), "indices differ from torch's"
        assert _dense_strides(idx) == _dense_strides(s_idx)
    if grad:
        gs = torch.autograd.grad(s_out, xs, g)[0]
        gr = torch.autograd.grad(r_out, x64, g.double())[0]
        assert_parity(gx, gr, gs, f"{op} input gradient")
        # The input's memory format (torch's pooling backward ops; its 1x1 adaptive average, a mean,
        # returns a contiguous gradient instead).
        fmt = torch.empty_like(x, memory_format=suggest_memory_format(x))
        assert _dense_strides(gx) == _dense_strides(fmt), f"gradient strides {gx.stride()}, input {x.stride()}"
    return out


def _combos(i):
    """The (layout, dtype) pairs of the i-th case of a shape table: fp32 contiguous, then channels_last
    and a non-contiguous view in the two half-precision dtypes (alternating)."""
    half = (torch.float16, torch.bfloat16)
    return [("contiguous", torch.float32), ("channels_last", half[i % 2]), ("noncontiguous", half[1 - i % 2])]


def _table(cases):
    return [pytest.param(c, layout, dtype, id=f"{c[0]}-{layout}-{str(dtype)[6:]}")
            for i, c in enumerate(cases) for layout, dtype in _combos(i)]


# ------------------------------------------------------------------------------------------------
# max_pool2d

MAX_CASES = [  # (id, shape, kwargs)
    ("stem", (2, 5, 11, 13), dict(kernel_size=3, stride=2, padding=1)),
    ("k-eq-input", (1, 3, 7, 7), dict(kernel_size=7)),
    ("stride-gt-kernel", (2, 4, 9, 10), dict(kernel_size=2, stride=3)),
    ("dilation2", (1, 3, 13, 11), dict(kernel_size=3, stride=1, padding=1, dilation=2)),
    ("rect-ceil", (2, 2, 10, 9), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), ceil_mode=True)),
    ("ceil-dil", (1, 6, 12, 17), dict(kernel_size=3, stride=2, padding=1, dilation=(2, 1), ceil_mode=True)),
    ("1x1-k1", (3, 1, 1, 1), dict(kernel_size=1)),
    ("prime-k5", (1, 7, 23, 19), dict(kernel_size=5, stride=(3, 2), padding=2)),
    ("unbatched", (3, 8, 7), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ("wide-c", (1, 67, 5, 6), dict(kernel_size=2, stride=1)),  # channel blocks
    ("long-rows", (1, 2, 37, 150), dict(kernel_size=3, stride=1, padding=1)),  # pixel blocks along H and W
    ("many-planes", (3, 30, 5, 5), dict(kernel_size=2, stride=2, ceil_mode=True)),  # blocks of planes
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool2d(backend, layout, dtype):
    x = rand(2, 5, 11, 13, dtype=dtype, layout=layout, requires_grad=True)
    _check("max_pool2d", lambda t: FF.max_pool2d(t, 3, 2, 1, return_indices=True),
           lambda t: F.max_pool2d(t, 3, 2, 1, return_indices=True), x, backend, indices=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case,layout,dtype", _table(MAX_CASES))
def test_max_pool2d_windows(backend, case, layout, dtype):
    _, shape, kw = case
    x = rand(*shape, dtype=dtype, layout=layout, requires_grad=True)
    _check("max_pool2d", lambda t: FF.max_pool2d(t, return_indices=True, **kw),
           lambda t: F.max_pool2d(t, return_indices=True, **kw), x, backend, indices=True)


# ------------------------------------------------------------------------------------------------
# avg_pool2d

AVG_CASES = [
    ("stem", (2, 5, 11, 13), dict(kernel_size=3, stride=2, padding=1)),
    ("ceil-past-pad", (1, 3, 8, 10), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ("no-pad-count", (2, 4, 9, 7), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)),
    ("divisor", (1, 6, 10, 11), dict(kernel_size=(2, 3), stride=(3, 2), padding=(1, 0), divisor_override=7)),
    ("divisor-neg", (2, 3, 6, 5), dict(kernel_size=2, padding=1, ceil_mode=True, divisor_override=-3)),
    ("k-eq-input", (1, 3, 7, 7), dict(kernel_size=7)),
    ("stride-gt-kernel", (2, 4, 9, 10), dict(kernel_size=2, stride=3)),
    ("1x1-k1", (3, 1, 1, 1), dict(kernel_size=1)),
    ("prime-k5", (1, 7, 23, 19), dict(kernel_size=5, stride=(3, 2), padding=2, count_include_pad=False)),
    ("unbatched", (3, 8, 7), dict(kernel_size=3, stride=1, padding=1, count_include_pad=False)),
    ("long-rows", (1, 2, 37, 150), dict(kernel_size=3, stride=1, padding=1, count_include_pad=False)),
    ("many-planes", (3, 30, 5, 5), dict(kernel_size=2, stride=2, ceil_mode=True)),
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_avg_pool2d(backend, layout, dtype):
    x = rand(2, 5, 11, 13, dtype=dtype, layout=layout, requires_grad=True)
    kw = dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
    _check("avg_pool2d", lambda t: FF.avg_pool2d(t, **kw), lambda t: F.avg_pool2d(t, **kw), x, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case,layout,dtype", _table(AVG_CASES))
def test_avg_pool2d_windows(backend, case, layout, dtype):
    _, shape, kw = case
    x = rand(*shape, dtype=dtype, layout=layout, requires_grad=True)
    _check("avg_pool2d", lambda t: FF.avg_pool2d(t, **kw), lambda t: F.avg_pool2d(t, **kw), x, backend)


# ------------------------------------------------------------------------------------------------
# adaptive pools, and the global (1x1) path

ADAPTIVE_CASES = [  # (id, shape, output_size)
    ("7to3", (2, 5, 7, 7), 3),
    ("5to7-up", (1, 4, 5, 5), 7),
    ("divides", (2, 3, 8, 12), (4, 3)),
    ("none-keeps", (1, 6, 9, 10), (None, 3)),
    ("1x1-input", (3, 2, 1, 1), (2, 3)),
    ("same-size", (1, 3, 6, 5), (6, 5)),
    ("prime", (1, 7, 13, 17), (5, 11)),
    ("unbatched", (3, 11, 6), (4, 4)),
    ("to-1xN", (2, 9, 8, 9), (1, 4)),
    ("big-up", (1, 2, 20, 30), (40, 70)),  # pixel blocks along H and W
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_adaptive_avg_pool2d(backend, layout, dtype):
    x = rand(2, 5, 7, 11, dtype=dtype, layout=layout, requires_grad=True)
    _check("adaptive_avg_pool2d", lambda t: FF.adaptive_avg_pool2d(t, (3, 4)),
           lambda t: F.adaptive_avg_pool2d(t, (3, 4)), x, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case,layout,dtype", _table(ADAPTIVE_CASES))
def test_adaptive_avg_pool2d_sizes(backend, case, layout, dtype):
    _, shape, size = case
    x = rand(*shape, dtype=dtype, layout=layout, requires_grad=True)
    _check("adaptive_avg_pool2d", lambda t: FF.adaptive_avg_pool2d(t, size), lambda t: F.adaptive_avg_pool2d(t, size),
           x, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_adaptive_max_pool2d(backend, layout, dtype):
    x = rand(2, 5, 7, 11, dtype=dtype, layout=layout, requires_grad=True)
    _check("adaptive_max_pool2d", lambda t: FF.adaptive_max_pool2d(t, (3, 4), return_indices=True),
           lambda t: F.adaptive_max_pool2d(t, (3, 4), return_indices=True), x, backend, indices=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case,layout,dtype", _table(ADAPTIVE_CASES))
def test_adaptive_max_pool2d_sizes(backend, case, layout, dtype):
    _, shape, size = case
    x = rand(*shape, dtype=dtype, layout=layout, requires_grad=True)
    _check("adaptive_max_pool2d", lambda t: FF.adaptive_max_pool2d(t, size, True),
           lambda t: F.adaptive_max_pool2d(t, size, True), x, backend, indices=True)


GLOBAL_SHAPES = [
    (2, 70, 7, 9),  # channels_last: several pixel steps per program, channels past one block
    (1, 3, 33, 37),  # NCHW: a plane longer than one step
    (3, 1, 1, 1),
    (4, 6, 1, 5),
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("kind", ["avg", "max"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_global_pool(backend, kind, layout, dtype):
    x = rand(2, 70, 7, 9, dtype=dtype, layout=layout, requires_grad=True)
    if kind == "avg":
        _check("adaptive_avg_pool2d", lambda t: FF.adaptive_avg_pool2d(t, 1), lambda t: F.adaptive_avg_pool2d(t, 1),
               x, backend)
    else:
        _check("adaptive_max_pool2d", lambda t: FF.adaptive_max_pool2d(t, 1, True),
               lambda t: F.adaptive_max_pool2d(t, 1, True), x, backend, indices=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", GLOBAL_SHAPES[1:], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_global_pool_shapes(backend, shape, layout):
    x = rand(*shape, layout=layout, requires_grad=True)
    _check("adaptive_avg_pool2d", lambda t: FF.adaptive_avg_pool2d(t, (1, 1)),
           lambda t: F.adaptive_avg_pool2d(t, (1, 1)), x, backend)
    _check("adaptive_max_pool2d", lambda t: FF.adaptive_max_pool2d(t, (1, 1), True),
           lambda t: F.adaptive_max_pool2d(t, (1, 1), True), x, backend, indices=True)


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="Triton is not installed")
def test_global_path_is_taken(monkeypatch):
    """An adaptive pool to (1, 1) runs the one-reduction-per-plane kernel, not the windowed one."""
    from fastnets.kernels import pool as K

    calls = []
    for name in ("global_pool2d", "pool2d_forward"):
        launcher = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _f=launcher, _n=name, **k: (calls.append(_n), _f(*a, **k)))
    x = rand(2, 3, 5, 6)
    with ran_on("triton"):
        FF.adaptive_avg_pool2d(x, 1), FF.adaptive_max_pool2d(x, (1, 1)), FF.adaptive_avg_pool2d(x, (1, 2))
    assert calls == ["global_pool2d", "global_pool2d", "pool2d_forward"]


# ------------------------------------------------------------------------------------------------
# Indices, ties, NaN and Inf exactly as torch


def _special(shape, layout, dtype=torch.float32):
    """Integer values (many ties), two NaNs sharing windows, an all -inf region and +inf."""
    x = torch.randint(-2, 2, shape).float()
    x[0, :, 2, 3] = float("nan")
    x[0, :, 3, 3] = float("nan")
    x[-1, :, :4, :4] = float("-inf")
    x[-1, 0, 6, 6] = float("inf")
    return rand(*shape, dtype=dtype, layout=layout).copy_(x.to(dtype))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_max_ties_nan_inf_as_torch(backend, layout):
    x = _special((2, 3, 9, 10), layout, torch.float16)
    cases = [lambda m, t: m.max_pool2d(t, 3, 2, 1, return_indices=True),
             lambda m, t: m.max_pool2d(t, 3, 1, 1, 2, True, True),
             lambda m, t: m.adaptive_max_pool2d(t, (4, 3), True),
             lambda m, t: m.adaptive_max_pool2d(t, 1, True)]
    for case in cases:
        with ran_on(backend):
            out, idx = case(FF, x)
        s_out, s_idx = case(F, x)
        assert torch.equal(out.isnan(), s_out.isnan()) and torch.equal(out.nan_to_num(), s_out.nan_to_num())
        assert torch.equal(idx, s_idx)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_all_padding_window_as_torch(backend):
    """A dilated window can miss the input (kernel 2, dilation 3, padding 1 on 2x2): torch gives -inf,
    its index the window's first in-bounds position (past the plane); the gradient is dropped."""
    x = rand(1, 2, 2, 2, requires_grad=True)
    with ran_on(backend):
        out, idx = FF.max_pool2d(x, 2, 1, 1, 3, return_indices=True)
        (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    s_out, s_idx = F.max_pool2d(x.detach(), 2, 1, 1, 3, return_indices=True)
    assert torch.equal(out, s_out) and torch.equal(idx, s_idx)
    assert torch.equal(gx, torch.zeros_like(gx))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_nan_inf_propagate_in_averages(backend):
    x = rand(2, 3, 8, 9, layout="channels_last")
    with torch.no_grad():
        x[0, 1, 2, 2] = float("nan")
        x[1, 2, 5, 5] = float("inf")
        x[1, 0, 0, 0] = float("-inf")
    x.requires_grad_()
    _check("avg_pool2d", lambda t: FF.avg_pool2d(t, 3, 2, 1), lambda t: F.avg_pool2d(t, 3, 2, 1), x, backend)
    _check("adaptive_avg_pool2d", lambda t: FF.adaptive_avg_pool2d(t, 1), lambda t: F.adaptive_avg_pool2d(t, 1),
           x, backend)
    _check("adaptive_avg_pool2d", lambda t: FF.adaptive_avg_pool2d(t, 3), lambda t: F.adaptive_avg_pool2d(t, 3),
           x, backend)


# ------------------------------------------------------------------------------------------------
# Gradients of any layout, empty batches, int64 indexing, the forward without indices


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backward_takes_expanded_and_strided_gradients(backend):
    x = rand(2, 3, 9, 8, layout="channels_last", requires_grad=True)
    expanded = lambda out: torch.ones((), device=out.device, dtype=out.dtype).expand(out.shape)  # noqa: E731
    strided = lambda out: rand(*out.shape, dtype=out.dtype, layout="noncontiguous")  # noqa: E731
    for grad_out in (expanded, strided):
        _check("max_pool2d", lambda t: FF.max_pool2d(t, 3, 2, 1), lambda t: F.max_pool2d(t, 3, 2, 1), x, backend,
               grad_out=grad_out)
        _check("avg_pool2d", lambda t: FF.avg_pool2d(t, 2, 1, 1), lambda t: F.avg_pool2d(t, 2, 1, 1), x, backend,
               grad_out=grad_out)
        _check("adaptive_max_pool2d", lambda t: FF.adaptive_max_pool2d(t, 3), lambda t: F.adaptive_max_pool2d(t, 3),
               x, backend, grad_out=grad_out)


EMPTY_CASES = [
    ("max_pool2d", lambda m, t: m.max_pool2d(t, 3, 2, 1, return_indices=True)),
    ("avg_pool2d", lambda m, t: m.avg_pool2d(t, 2, ceil_mode=True)),
    ("adaptive_avg_pool2d", lambda m, t: m.adaptive_avg_pool2d(t, 3)),
    ("adaptive_avg_pool2d", lambda m, t: m.adaptive_avg_pool2d(t, 1)),
    ("adaptive_avg_pool2d", lambda m, t: m.adaptive_avg_pool2d(t, (0, 2))),
    ("adaptive_max_pool2d", lambda m, t: m.adaptive_max_pool2d(t, (2, 0), True)),
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_empty_results_launch_nothing(backend, layout, monkeypatch):
    from fastnets.kernels import pool as K

    def launched(*args, **kwargs):
        pytest.fail("a kernel was launched for an empty tensor")

    for name in ("pool2d_forward", "pool2d_backward", "global_pool2d"):
        monkeypatch.setattr(K, name, launched)
    monkeypatch.setattr(P._ext, "module", launched)
    for shape in [(0, 3, 7, 8), (2, 3, 7, 8)]:
        for op, case in EMPTY_CASES:
            x = rand(*shape, layout=layout, requires_grad=True)
            stock = case(F, x.detach())
            stock = stock if isinstance(stock, tuple) else (stock,)
            if all(t.numel() for t in stock):
                continue
            with ran_on(backend, op):
                res = case(FF, x)
                res = res if isinstance(res, tuple) else (res,)
                gx = torch.autograd.grad(res[0], x, torch.ones_like(res[0]))[0]
            for a, b in zip(res, stock):
                assert a.shape == b.shape and a.dtype == b.dtype and _dense_strides(a) == _dense_strides(b)
            assert gx.shape == x.shape and not gx.count_nonzero()


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="Triton is not installed")
def test_int64_indexing_path(monkeypatch):
    """The kernels' int64 index arithmetic (taken when an offset can pass 2^31), forced on small inputs."""
    from fastnets.kernels import pool as K

    monkeypatch.setattr(K, "_I32_MAX", 0)
    x = rand(2, 5, 9, 10, layout="channels_last", requires_grad=True)
    y = rand(2, 3, 9, 10, requires_grad=True)
    _check("max_pool2d", lambda t: FF.max_pool2d(t, 3, 2, 1, 2, True, True),
           lambda t: F.max_pool2d(t, 3, 2, 1, 2, True, True), x, "triton", indices=True)
    _check("avg_pool2d", lambda t: FF.avg_pool2d(t, 3, 2, 1, True, False),
           lambda t: F.avg_pool2d(t, 3, 2, 1, True, False), y, "triton")
    _check("adaptive_max_pool2d", lambda t: FF.adaptive_max_pool2d(t, (4, 3), True),
           lambda t: F.adaptive_max_pool2d(t, (4, 3), True), y, "triton", indices=True)
    for t in (x, y):
        _check("adaptive_max_pool2d", lambda t: FF.adaptive_max_pool2d(t, 1, True),
               lambda t: F.adaptive_max_pool2d(t, 1, True), t, "triton", indices=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_forward_without_indices(backend):
    """Without return_indices and without a gradient the max pools write no indices; asking for the
    backward of such a call raises instead of returning a wrong gradient."""
    x = rand(2, 3, 9, 8)
    with ran_on(backend):
        for op, args in ((P.MAX_POOL2D, ([3, 3], [2, 2], [1, 1], [1, 1], False)), (P.ADAPTIVE_MAX_POOL2D, ([3, 3],))):
            out, idx = op[backend](x, *args, False)
            assert idx.numel() == 0
            torch.testing.assert_close(out, op[backend](x, *args, True)[0], rtol=0, atol=0)
            xg = x.clone().requires_grad_()
            out, _ = op[backend](xg, *args, False)
            with pytest.raises(RuntimeError, match="needs the indices"):
                out.sum().backward()
    with torch.no_grad(), ran_on(backend):
        torch.testing.assert_close(FF.max_pool2d(x, 3, 2, 1), F.max_pool2d(x, 3, 2, 1), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Dtypes the kernels do not take run the reference (torch's behaviour), or fail when forced


def _same_behaviour(ours, stock):
    """Equal results where torch computes one, torch's exception type where it raises."""
    try:
        want = stock()
    except Exception:  # noqa: BLE001 - compared by type below
        assert_raises_like(ours, stock)
        return
    assert torch.equal(ours(), want)


def test_other_dtypes_run_the_reference():
    xi = torch.randint(-5, 5, (2, 3, 7, 8), device=DEVICE)
    xd = rand(2, 3, 7, 8, dtype=torch.float64, requires_grad=True)
    with ran_on("torch"):
        _same_behaviour(lambda: FF.max_pool2d(xi, 3, 2, 1), lambda: F.max_pool2d(xi, 3, 2, 1))
        _same_behaviour(lambda: FF.avg_pool2d(xi, 2), lambda: F.avg_pool2d(xi, 2))
        out = FF.adaptive_max_pool2d(xd, 3)
        assert torch.equal(out, F.adaptive_max_pool2d(xd, 3))
    for case in (lambda m: m.adaptive_avg_pool2d(xi, 2), lambda m: m.adaptive_max_pool2d(xi, 2),
                 lambda m: m.max_pool2d(xi > 0, 2), lambda m: m.avg_pool2d(xi.to(torch.complex64), 2)):
        _same_behaviour(lambda: case(FF), lambda: case(F))
    with fastnets.use_backend("auto"):  # on a GPU too: no kernel takes float64
        torch.testing.assert_close(FF.avg_pool2d(xd, 3), F.avg_pool2d(xd, 3))
    if KERNEL_BACKENDS:
        with fastnets.use_backend(KERNEL_BACKENDS[0]), pytest.raises(fastnets.BackendError, match="float64"):
            FF.max_pool2d(xd, 2)


# ------------------------------------------------------------------------------------------------
# Modules

MODULES = [
    ("MaxPool2d", dict(kernel_size=3, stride=2, padding=1)),
    ("MaxPool2d", dict(kernel_size=(3, 2), dilation=2, ceil_mode=True, return_indices=True)),
    ("AvgPool2d", dict(kernel_size=3, stride=1, padding=1, count_include_pad=False)),
    ("AvgPool2d", dict(kernel_size=2, ceil_mode=True, divisor_override=3)),
    ("AdaptiveAvgPool2d", dict(output_size=(None, 3))),
    ("AdaptiveAvgPool2d", dict(output_size=1)),
    ("AdaptiveMaxPool2d", dict(output_size=(4, 2), return_indices=True)),
]


@pytest.mark.parametrize("name,kwargs", MODULES)
def test_modules_are_drop_in(name, kwargs):
    ours, stock = getattr(fnn, name)(**kwargs), getattr(torch.nn, name)(**kwargs)
    assert isinstance(ours, type(stock))
    assert repr(ours) == repr(stock) and ours.extra_repr() == stock.extra_repr()
    assert ours.state_dict() == {} and not list(ours.parameters()) and not list(ours.buffers())
    assert {k: v for k, v in vars(ours).items() if not k.startswith("_")} == \
        {k: v for k, v in vars(stock).items() if not k.startswith("_")}
    x = rand(2, 3, 9, 10, layout="channels_last")
    for backend in ["auto", *KERNEL_BACKENDS]:
        with fastnets.use_backend(backend):
            got, want = ours(x), stock(x)
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
            assert _dense_strides(a) == _dense_strides(b)


# ------------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile through the reference here, the kernels on a GPU

def _op_samples(dtype=torch.float32):
    x = rand(2, 3, 9, 8, dtype=dtype, layout="channels_last", requires_grad=True)
    x3 = rand(3, 7, 6, dtype=dtype, requires_grad=True)
    out = torch.randn(2, 3, 5, 4, device=DEVICE, dtype=dtype).contiguous(memory_format=torch.channels_last)
    _, idx = F.max_pool2d(x.detach(), 3, 2, 1, return_indices=True)
    _, aidx = F.adaptive_max_pool2d(x.detach(), (5, 4), return_indices=True)
    return [
        (P.MAX_POOL2D, (x, [3, 3], [2, 2], [1, 1], [1, 1], False, True)),
        (P.MAX_POOL2D, (x3.detach(), [2, 3], [1, 2], [1, 0], [2, 1], True, False)),
        (P.AVG_POOL2D, (x, [3, 3], [2, 2], [1, 1], True, False, None)),
        (P.AVG_POOL2D, (x3, [2, 2], [1, 1], [1, 1], False, True, 5)),
        (P.ADAPTIVE_AVG_POOL2D, (x, [5, 4])),
        (P.ADAPTIVE_AVG_POOL2D, (x, [1, 1])),
        (P.ADAPTIVE_MAX_POOL2D, (x3, [4, 7], True)),
        (P.ADAPTIVE_MAX_POOL2D, (x, [1, 1], True)),
        (P.MAX_POOL2D_BACKWARD, (out, x.detach(), idx, [3, 3], [2, 2], [1, 1], [1, 1], False)),
        (P.AVG_POOL2D_BACKWARD, (out, x.detach(), [3, 3], [2, 2], [1, 1], False, True, None)),
        (P.ADAPTIVE_AVG_POOL2D_BACKWARD, (out, x.detach())),
        (P.ADAPTIVE_MAX_POOL2D_BACKWARD, (out, x.detach(), aidx)),
    ]


def _opcheck(backend):
    for ops, args in _op_samples():
        torch.library.opcheck(ops[backend], args)


def test_opcheck_reference():
    _opcheck("torch")


def _model(x):
    y = FF.max_pool2d(x, 3, 2, 1)
    y = FF.avg_pool2d(y, 3, 1, 1, count_include_pad=False)
    z = FF.adaptive_max_pool2d(y, (3, None))
    return FF.adaptive_avg_pool2d(z, 1).flatten(1) + FF.adaptive_avg_pool2d(y, 2).flatten(1).sum(1, keepdim=True)


def _compile_check(backend, compiler):
    x = rand(2, 3, 13, 11, layout="channels_last", requires_grad=True)
    with fastnets.use_backend(backend):
        eager = _model(x)
        compiled = torch.compile(_model, fullgraph=True, backend=compiler)(x)
        g_eager = torch.autograd.grad(eager.sum(), x)[0]
        g_compiled = torch.autograd.grad(compiled.sum(), x)[0]
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(g_compiled, g_eager)


def test_compile_fullgraph_reference():
    torch._dynamo.reset()
    _compile_check("torch", "aot_eager")


# ------------------------------------------------------------------------------------------------
# Bad input: torch's exception types

_x = torch.randn(2, 3, 8, 8)
BAD = {
    "max-kernel-0": (lambda m: m.max_pool2d(_x, 0)),
    "max-kernel-neg": (lambda m: m.max_pool2d(_x, -1)),
    "max-kernel-3-tuple": (lambda m: m.max_pool2d(_x, (3, 3, 3))),
    "max-kernel-empty": (lambda m: m.max_pool2d(_x, ())),
    "max-kernel-float": (lambda m: m.max_pool2d(_x, 2.0)),
    "max-kernel-none": (lambda m: m.max_pool2d(_x, None)),
    "max-kernel-bool": (lambda m: m.max_pool2d(_x, True)),
    "max-stride-0": (lambda m: m.max_pool2d(_x, 3, 0)),
    "max-stride-neg": (lambda m: m.max_pool2d(_x, 3, -1)),
    "max-stride-3-tuple": (lambda m: m.max_pool2d(_x, 3, (1, 1, 1))),
    "max-pad-neg": (lambda m: m.max_pool2d(_x, 3, 1, -1)),
    "max-pad-over-half": (lambda m: m.max_pool2d(_x, 3, 1, 2)),
    "max-pad-over-half-dilated": (lambda m: m.max_pool2d(_x, 3, 1, 2, 2)),
    "max-dilation-0": (lambda m: m.max_pool2d(_x, 3, 1, 1, 0)),
    "max-dilation-neg": (lambda m: m.max_pool2d(_x, 3, 1, 0, -1)),
    "max-kernel-over-input": (lambda m: m.max_pool2d(_x, 9)),
    "max-kernel-over-padded": (lambda m: m.max_pool2d(_x, 11, 1, 1)),
    "max-dilated-over-input": (lambda m: m.max_pool2d(_x, 5, 1, 0, 2)),
    "max-rank2": (lambda m: m.max_pool2d(torch.randn(8, 8), 2)),
    "max-rank5": (lambda m: m.max_pool2d(torch.randn(1, 1, 1, 8, 8), 2)),
    "max-empty-channels": (lambda m: m.max_pool2d(torch.randn(2, 0, 8, 8), 2)),
    "max-empty-height": (lambda m: m.max_pool2d(torch.randn(2, 3, 0, 8), 2)),
    "max-unbatched-empty": (lambda m: m.max_pool2d(torch.randn(0, 8, 8), 2)),
    "max-ceil-not-bool": (lambda m: m.max_pool2d(_x, 2, ceil_mode=1)),
    "max-not-tensor": (lambda m: m.max_pool2d([[1.0]], 2)),
    "max-complex": (lambda m: m.max_pool2d(_x.cfloat(), 2)),
    "avg-kernel-0": (lambda m: m.avg_pool2d(_x, 0)),
    "avg-stride-neg": (lambda m: m.avg_pool2d(_x, 3, -2)),
    "avg-pad-neg": (lambda m: m.avg_pool2d(_x, 3, 1, -1)),
    "avg-pad-over-half": (lambda m: m.avg_pool2d(_x, 2, 1, 2)),
    "avg-kernel-over-input": (lambda m: m.avg_pool2d(_x, (9, 2))),
    "avg-divisor-0": (lambda m: m.avg_pool2d(_x, 2, divisor_override=0)),
    "avg-divisor-float": (lambda m: m.avg_pool2d(_x, 2, divisor_override=2.5)),
    "avg-divisor-bool": (lambda m: m.avg_pool2d(_x, 2, divisor_override=True)),
    "avg-cip-not-bool": (lambda m: m.avg_pool2d(_x, 2, count_include_pad=1)),
    "avg-rank2": (lambda m: m.avg_pool2d(torch.randn(8, 8), 2)),
    "avg-rank0": (lambda m: m.avg_pool2d(torch.tensor(1.0), 2)),
    "avg-rank5": (lambda m: m.avg_pool2d(torch.randn(1, 1, 1, 8, 8), 2)),
    "avg-rank2-divisor-0": (lambda m: m.avg_pool2d(torch.randn(8, 8), 2, divisor_override=0)),
    "avg-empty-channels": (lambda m: m.avg_pool2d(torch.randn(2, 0, 8, 8), 2)),
    "aavg-negative": (lambda m: m.adaptive_avg_pool2d(_x, -1)),
    "aavg-negative-one": (lambda m: m.adaptive_avg_pool2d(_x, (3, -1))),
    "aavg-3-sizes": (lambda m: m.adaptive_avg_pool2d(_x, (3, 3, 3))),
    "aavg-1-size": (lambda m: m.adaptive_avg_pool2d(_x, [2])),
    "aavg-none": (lambda m: m.adaptive_avg_pool2d(_x, None)),
    "aavg-float": (lambda m: m.adaptive_avg_pool2d(_x, 2.5)),
    "aavg-float-in-tuple": (lambda m: m.adaptive_avg_pool2d(_x, (2.0, 2))),
    "aavg-bool": (lambda m: m.adaptive_avg_pool2d(_x, True)),
    "aavg-rank2": (lambda m: m.adaptive_avg_pool2d(torch.randn(8, 8), 2)),
    "aavg-rank2-tuple": (lambda m: m.adaptive_avg_pool2d(torch.randn(8, 8), (2, 2))),
    "aavg-rank5": (lambda m: m.adaptive_avg_pool2d(torch.randn(1, 1, 1, 8, 8), 2)),
    "aavg-empty-height": (lambda m: m.adaptive_avg_pool2d(torch.randn(2, 3, 0, 8), 2)),
    "aavg-not-tensor": (lambda m: m.adaptive_avg_pool2d([[1.0]], (2, 2))),
    "amax-negative": (lambda m: m.adaptive_max_pool2d(_x, (3, -1))),
    "amax-3-sizes": (lambda m: m.adaptive_max_pool2d(_x, (3, 3, 3))),
    "amax-rank2": (lambda m: m.adaptive_max_pool2d(torch.randn(8, 8), 2)),
    "amax-rank1-tuple": (lambda m: m.adaptive_max_pool2d(torch.randn(8), (None, 2))),
    "amax-empty-channels": (lambda m: m.adaptive_max_pool2d(torch.randn(2, 0, 8, 8), 2)),
    "amax-empty-width": (lambda m: m.adaptive_max_pool2d(torch.randn(2, 3, 8, 0), 2)),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_like_torch(case):
    assert_raises_like(lambda: BAD[case](FF), lambda: BAD[case](F))


def test_accepted_edge_arguments_match_torch():
    """What torch accepts, we accept: one-element sizes, stride [], an empty 3-D input to the adaptive
    pools, (N, 0, H, W) to adaptive_avg_pool2d, output size 0, numpy-like ints."""
    import numpy as np

    cases = [lambda m: m.max_pool2d(_x, (3,), [], (1,)), lambda m: m.avg_pool2d(_x, [3], padding=1),
             lambda m: m.max_pool2d(_x, np.int64(2)), lambda m: m.adaptive_avg_pool2d(torch.randn(0, 8, 8), 2),
             lambda m: m.adaptive_max_pool2d(torch.randn(0, 8, 8), 2),
             lambda m: m.adaptive_avg_pool2d(torch.randn(2, 0, 8, 8), 2),
             lambda m: m.adaptive_avg_pool2d(_x, 0), lambda m: m.adaptive_max_pool2d(_x, (0, 3)),
             lambda m: m.adaptive_avg_pool2d(_x, (np.int64(2), None)),
             lambda m: m.avg_pool2d(_x, 2, divisor_override=-2)]
    for case in cases:
        ours, stock = case(FF), case(F)
        assert ours.shape == stock.shape
        torch.testing.assert_close(ours, stock)


# ------------------------------------------------------------------------------------------------
# GPU: the kernels natively, at realistic sizes (ResNet stem, global pool, VGG/AlexNet adaptive)

GPU_CASES = [  # (id, op, shape, call, returns indices)
    ("resnet-stem", "max_pool2d", (32, 64, 112, 112), lambda m, t: m.max_pool2d(t, 3, 2, 1, return_indices=True), True),
    ("googlenet-ceil", "max_pool2d", (16, 192, 56, 56),
     lambda m, t: m.max_pool2d(t, 3, 2, ceil_mode=True, return_indices=True), True),
    ("inception", "avg_pool2d", (16, 192, 35, 35), lambda m, t: m.avg_pool2d(t, 3, 1, 1, count_include_pad=False),
     False),
    ("global-2048", "adaptive_avg_pool2d", (32, 2048, 7, 7), lambda m, t: m.adaptive_avg_pool2d(t, 1), False),
    ("global-56", "adaptive_avg_pool2d", (16, 256, 56, 56), lambda m, t: m.adaptive_avg_pool2d(t, 1), False),
    ("vgg", "adaptive_avg_pool2d", (16, 512, 14, 14), lambda m, t: m.adaptive_avg_pool2d(t, 7), False),
    ("alexnet", "adaptive_avg_pool2d", (16, 256, 13, 13), lambda m, t: m.adaptive_avg_pool2d(t, 6), False),
    ("global-2048", "adaptive_max_pool2d", (32, 2048, 7, 7), lambda m, t: m.adaptive_max_pool2d(t, 1, True), True),
    ("odd", "adaptive_max_pool2d", (8, 96, 27, 31), lambda m, t: m.adaptive_max_pool2d(t, (5, 7), True), True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name,op,shape,case,indices", GPU_CASES, ids=[f"{c[1]}-{c[0]}" for c in GPU_CASES])
def test_gpu_realistic_sizes(backend, layout, dtype, name, op, shape, case, indices):
    x = rand(*shape, dtype=dtype, layout=layout, requires_grad=True)
    _check(op, lambda t: case(FF, t), lambda t: case(F, t), x, backend, indices=indices)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_backward_is_deterministic(backend):
    x = rand(8, 64, 56, 56, dtype=torch.float16, layout="channels_last", requires_grad=True)
    for f in (lambda t: FF.max_pool2d(t, 3, 1, 1), lambda t: FF.avg_pool2d(t, 3, 1, 1),
              lambda t: FF.adaptive_avg_pool2d(t, 5), lambda t: FF.adaptive_max_pool2d(t, 9)):
        with fastnets.use_backend(backend):
            out = f(x)
            g = torch.randn_like(out)
            first = torch.autograd.grad(out, x, g, retain_graph=True)[0]
            for _ in range(3):
                assert torch.equal(torch.autograd.grad(out, x, g, retain_graph=True)[0], first)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_int64_indexing(backend):
    """More than 2^31 elements: the kernels switch to int64 index arithmetic."""
    x = torch.randn(1, 2, 32768, 32770, device="cuda", dtype=torch.float16)
    with ran_on(backend):
        out, idx = FF.max_pool2d(x, 2, return_indices=True)
        avg = FF.adaptive_avg_pool2d(x, 1)
    s_out, s_idx = F.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(out, s_out) and torch.equal(idx, s_idx)
    torch.testing.assert_close(avg.float(), x.float().mean((2, 3), keepdim=True), rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_opcheck(backend):
    _opcheck(backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_compile_fullgraph(backend):
    torch._dynamo.reset()
    _compile_check(backend, "inductor")


# ----------------------------------------------------------------------------------------------
# GPU: the CUDA kernels' vector paths (csrc/pool.cu: channels_last, 16 bytes of channels per
# thread, int64 indices two per 128-bit access) and the narrower or scalar paths they fall back to
# (a misaligned input, C = 60 or odd C).

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C,misaligned", [(64, False), (64, True), (60, False), (33, False)])
def test_cuda_vector_and_scalar_paths_gpu(dtype, C, misaligned):
    if "cuda" not in KERNEL_BACKENDS:
        pytest.skip("fastnets._C sees no device")
    x = rand(2, C, 11, 13, dtype=dtype, layout="channels_last", requires_grad=True)
    if misaligned:
        x = parity.misaligned(x)
    _check("max_pool2d", lambda t: FF.max_pool2d(t, 3, 2, 1, return_indices=True),
           lambda t: F.max_pool2d(t, 3, 2, 1, return_indices=True), x, "cuda", indices=True)
    _check("avg_pool2d", lambda t: FF.avg_pool2d(t, 3, 2, 1), lambda t: F.avg_pool2d(t, 3, 2, 1), x, "cuda")
    _check("adaptive_max_pool2d", lambda t: FF.adaptive_max_pool2d(t, (4, 5), return_indices=True),
           lambda t: F.adaptive_max_pool2d(t, (4, 5), return_indices=True), x, "cuda", indices=True)
    # Global pooling (the 1x1 output): global_pool_cols_kernel, 16 bytes of channels per thread.
    _check("adaptive_avg_pool2d", lambda t: FF.adaptive_avg_pool2d(t, 1), lambda t: F.adaptive_avg_pool2d(t, 1),
           x, "cuda")
    _check("adaptive_max_pool2d", lambda t: FF.adaptive_max_pool2d(t, 1, return_indices=True),
           lambda t: F.adaptive_max_pool2d(t, 1, return_indices=True), x, "cuda", indices=True)


# GPU: global pooling of NCHW planes (csrc/pool.cu global_pool_rows_vec_kernel: a plane of H * W
# contiguous pixels, a whole number of 16-byte vectors, 8 (16-bit) or 4 (fp32) pixels per load) and
# the scalar kernel it falls back to (H * W * itemsize not a multiple of 16, a misaligned input).
# 40 x 40: several vectors per lane; ties and a NaN check torch's first-maximum / NaN rule.
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hw,misaligned", [((8, 6), False), ((40, 40), False), ((40, 40), True), ((7, 7), False),
                                           ((1, 13), False)])
def test_cuda_global_pool_nchw_vector_and_scalar_paths_gpu(dtype, hw, misaligned):
    if "cuda" not in KERNEL_BACKENDS:
        pytest.skip("fastnets._C sees no device")
    x = rand(3, 5, *hw, dtype=dtype, layout="contiguous").round()  # integer values: ties in every plane
    x[1, 2].view(-1)[-1] = float("nan")
    x.requires_grad_()
    if misaligned:
        x = parity.misaligned(x)
    _check("adaptive_avg_pool2d", lambda t: FF.adaptive_avg_pool2d(t, 1), lambda t: F.adaptive_avg_pool2d(t, 1),
           x, "cuda")
    _check("adaptive_max_pool2d", lambda t: FF.adaptive_max_pool2d(t, 1, return_indices=True),
           lambda t: F.adaptive_max_pool2d(t, 1, return_indices=True), x, "cuda", indices=True)
