"""Layer normalization (fastnets/ops/layer_norm.py): layer_norm (with and without residual) and
add_layer_norm against F.layer_norm in float64, forward and every gradient, row widths that take the
one-tile and the chunked paths, dtypes, mixed-precision parameters, strided inputs, 2-D
normalized_shape, NaN/Inf, bad input, the module, opcheck/compile, and Transformer sizes on a GPU."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastnets
from fastnets import functional as FF
from fastnets import nn as fnn
from fastnets.ops import layer_norm as LN
import aot_compile
import parity
from parity import DEVICE, DTYPES, GPU, KERNEL_BACKENDS


def _inputs(shape, ns, dtype, layout="contiguous", residual=False, affine=(True, True), pdtype=None):
    """(input, residual or None, weight or None, bias or None), leaves requiring grad."""
    x = parity.rand(*shape, dtype=dtype, layout=layout, requires_grad=True)
    r = parity.rand(*shape, dtype=dtype, layout=layout, requires_grad=True) if residual else None
    pdtype = pdtype or dtype
    w = (1 + 0.5 * parity.rand(*ns, dtype=pdtype)).requires_grad_() if affine[0] else None
    b = parity.rand(*ns, dtype=pdtype, requires_grad=True) if affine[1] else None
    return x, r, w, b


def _leaves(*ts):
    return [t for t in ts if t is not None]


def check(shape, ns, dtype, backend, layout="contiguous", residual=False, add=False, affine=(True, True),
          pdtype=None, eps=1e-5):
    x, r, w, b = _inputs(shape, ns, dtype, layout, residual or add, affine, pdtype)
    leaves = _leaves(x, r, w, b)
    up = [parity.upcast(t) for t in (x, r, w, b)]
    x64, r64, w64, b64 = up

    def stock_fn(x, r, w, b):  # the stock composition, in the inputs' dtypes
        s = x + r if r is not None else x
        y = F.layer_norm(s, ns, w, b, eps)
        return (s, y) if add else (y,)

    ref = stock_fn(x64, r64, w64, b64)
    stock = stock_fn(x, r, w, b)
    grads = [torch.randn_like(t) for t in ref]
    ref_g = torch.autograd.grad(ref, _leaves(*up), grads)
    stock_g = torch.autograd.grad(stock, leaves, [g.to(dtype) for g in grads])
    with parity.ran_on(backend, "layer_norm"):
        if add:
            out = FF.add_layer_norm(x, r, ns, w, b, eps)
        else:
            out = (FF.layer_norm(x, ns, w, b, eps, residual=r),)
        out_g = torch.autograd.grad(out, leaves, [g.to(dtype) for g in grads])
    names = ["sum", "output"] if add else ["output"]
    for o, rf, st, name in zip(out, ref, stock, names):
        parity.assert_parity(o, rf, st, name)
        assert o.is_contiguous()
    for o, rf, st, name in zip(out_g, ref_g, stock_g, ["grad input", "grad residual", "grad weight", "grad bias"]
                               if r is not None else ["grad input", "grad weight", "grad bias"]):
        parity.assert_parity(o, rf, st, name)
    return out


# Widths: one tile (1, 7, 64) and, in the interpreter (tiles of at most 512 columns), the chunked
# path (768, 1000); on a GPU the chunked path is tested at widths above 8192 below.
WIDTHS = [1, 7, 64, 768, 1000]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", WIDTHS)
def test_layer_norm_widths_dtypes(backend, dtype, N):
    rows = 5 if N < 512 else 3
    check((rows, N), (N,), dtype, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("N", WIDTHS)
def test_post_norm_residual(backend, N):
    dtype = DTYPES[N % 3]
    check((2, 3 if N < 512 else 1, N), (N,), dtype, backend, residual=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("N", WIDTHS)
def test_add_layer_norm(backend, N):
    dtype = DTYPES[(N + 1) % 3]
    check((3 if N < 512 else 2, N), (N,), dtype, backend, add=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", [
    dict(shape=(4, 3, 7), ns=(3, 7)),  # normalized_shape of two dims
    dict(shape=(2, 5, 33), ns=(33,), layout="noncontiguous"),  # strided rows and columns
    dict(shape=(3, 6, 4, 5), ns=(4, 5), layout="noncontiguous", residual=True),
    dict(shape=(13,), ns=(13,)),  # a single row, 1-D input
    dict(shape=(6, 40), ns=(40,), affine=(False, False)),
    dict(shape=(6, 40), ns=(40,), affine=(True, False)),
    dict(shape=(6, 40), ns=(40,), affine=(False, True), add=True),
    dict(shape=(5, 24), ns=(24,), dtype=torch.float16, pdtype=torch.float32),  # fp32 params, fp16 input
    dict(shape=(3, 600), ns=(600,), dtype=torch.bfloat16, pdtype=torch.float32, residual=True),
    dict(shape=(4, 10), ns=(10,), eps=0.5),
    # More rows than one backward program takes at once: partial dw/db accumulate over row blocks,
    # in registers (one tile) and in the program's own partial row (chunked).
    dict(shape=(200, 40), ns=(40,), residual=True),
    dict(shape=(50, 700), ns=(700,), add=True),
])
def test_shapes_layouts_parameters(backend, case):
    case = dict(case)
    check(case.pop("shape"), case.pop("ns"), case.pop("dtype", torch.float32), backend, **case)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_transposed_input(backend):
    # Rows whose elements are not adjacent in memory (column stride M).
    x = parity.rand(37, 6).t().requires_grad_()
    w, b = parity.rand(37), parity.rand(37)
    x64 = parity.upcast(x)
    ref = F.layer_norm(x64, (37,), w.double(), b.double())
    g = torch.randn_like(ref)
    (ref_dx,) = torch.autograd.grad(ref, x64, g)
    stock = F.layer_norm(x, (37,), w, b)
    (stock_dx,) = torch.autograd.grad(stock, x, g.float())
    with parity.ran_on(backend, "layer_norm"):
        out = FF.layer_norm(x, (37,), w, b)
        (dx,) = torch.autograd.grad(out, x, g.float())
    parity.assert_parity(out, ref, stock)
    parity.assert_parity(dx, ref_dx, stock_dx, "grad input")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_parameters(backend):
    # weight and bias that are views with a stride (the kernels read them densely: made contiguous)
    x = parity.rand(4, 3, 5, requires_grad=True)
    w = parity.rand(3, 10)[:, ::2].requires_grad_()
    b = parity.rand(3, 5, 2)[..., 0].requires_grad_()
    assert not w.is_contiguous() and not b.is_contiguous()
    ref = F.layer_norm(x.double(), (3, 5), w.double(), b.double())
    g = torch.randn_like(ref)
    expected = torch.autograd.grad(ref, (x, w, b), g)
    with parity.ran_on(backend, "layer_norm"):
        out = FF.layer_norm(x, (3, 5), w, b)
        got = torch.autograd.grad(out, (x, w, b), g.float())
    for a, e in zip((out,) + got, (ref,) + expected):
        torch.testing.assert_close(a.double(), e.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_only_the_sum_used(backend):
    # add_layer_norm's normalized output unused: the gradient is the sum's alone.
    x, r = parity.rand(3, 9, requires_grad=True), parity.rand(3, 9, requires_grad=True)
    with parity.ran_on(backend, "layer_norm"):
        s, _ = FF.add_layer_norm(x, r, (9,))
        g = torch.randn_like(s)
        dx, dr = torch.autograd.grad(s, (x, r), g)
    torch.testing.assert_close(dx, g)
    torch.testing.assert_close(dr, g)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_nan_and_inf_propagate_as_torch(backend):
    x = parity.rand(4, 11)
    x[1, 3] = float("nan")
    x[2, 7] = float("inf")
    w, b = parity.rand(11), parity.rand(11)
    stock = F.layer_norm(x, (11,), w, b)
    with parity.ran_on(backend, "layer_norm"):
        out = FF.layer_norm(x, (11,), w, b)
    parity.assert_parity(out, F.layer_norm(x.double(), (11,), w.double(), b.double()), stock)
    assert out[1].isnan().all() and out[2].isnan().all() and not out[[0, 3]].isnan().any()


def test_reference_backward_matches_autograd():
    x = torch.randn(5, 3, 8, dtype=torch.float64, requires_grad=True)
    r = torch.randn(5, 3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    for add in (False, True):
        s = x + r
        ref = (s, F.layer_norm(s, (3, 8), w, b)) if add else (F.layer_norm(s, (3, 8), w, b),)
        grads = [torch.randn_like(t) for t in ref]
        expected = torch.autograd.grad(ref, (x, r, w, b), grads)
        with parity.ran_on("torch", "layer_norm"):
            out = FF.add_layer_norm(x, r, (3, 8), w, b) if add else (FF.layer_norm(x, (3, 8), w, b, residual=r),)
            got = torch.autograd.grad(out, (x, r, w, b), grads)
        for a, e in zip(out + got, ref + expected):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_empty_inputs():
    for shape, ns in (((0, 8), (8,)), ((3, 0), (0,)), ((2, 0, 4), (4,))):
        x = torch.randn(shape, device=DEVICE, requires_grad=True)
        w = torch.randn(ns, device=DEVICE, requires_grad=True)
        out = FF.layer_norm(x, ns, w)
        assert out.shape == x.shape
        out.sum().backward()
        s, y = FF.add_layer_norm(x, x.detach(), ns, w)
        assert s.shape == y.shape == x.shape


def test_bad_input_raises_like_torch():
    x = torch.randn(2, 3, 4)
    cases = [
        ((x, (5,)), "expected input with shape"),
        ((x, (2, 4)), "expected input with shape"),
        ((x, (1, 2, 3, 4)), "expected input with shape"),
        ((x, ()), "at least 1-dimensional"),
        ((x, 4), "normalized_shape"),  # an int: F.layer_norm wants a tuple (nn.LayerNorm converts)
        ((x, (4.0,)), "normalized_shape"),
        ((x, (4,), torch.randn(5)), "Expected weight to be of same shape"),
        ((x, (4,), torch.randn(1, 4)), "Expected weight to be of same shape"),
        ((x, (4,), torch.randn(4), torch.randn(3)), "Expected bias to be of same shape"),
        ((x, (4,), torch.randn(4).double()), "weight has dtype"),
        ((x.half(), (4,), torch.randn(4), torch.randn(4).half()), "weight"),
        ((torch.randint(0, 4, (2, 4)), (4,)), None),
    ]
    for args, match in cases:
        parity.assert_raises_like(lambda: FF.layer_norm(*args), lambda: F.layer_norm(*args), match=match)


def test_bad_residual_names_it():
    x = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="residual must have the input's shape"):
        FF.layer_norm(x, (4,), residual=torch.randn(3, 4))
    with pytest.raises(TypeError, match="residual must have the input's dtype"):
        FF.layer_norm(x, (4,), residual=x.double())
    with pytest.raises(TypeError, match="residual must be a Tensor"):
        FF.add_layer_norm(x, None, (4,))
    with pytest.raises(RuntimeError, match="residual must have the input's shape"):
        FF.add_layer_norm(x, torch.randn(2, 3, 1), (4,))


def test_kernels_refuse_float64():
    for backend in KERNEL_BACKENDS:
        with fastnets.use_backend(backend), pytest.raises(fastnets.BackendError, match="float64"):
            FF.layer_norm(torch.randn(2, 4, dtype=torch.float64, device=DEVICE), (4,))


@pytest.mark.parametrize("kwargs", [dict(), dict(bias=False), dict(elementwise_affine=False), dict(eps=1e-3)])
def test_module_is_a_drop_in(kwargs):
    ours, theirs = fnn.LayerNorm((3, 10), **kwargs), torch.nn.LayerNorm((3, 10), **kwargs)
    assert isinstance(ours, torch.nn.LayerNorm) and repr(ours) == repr(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    assert isinstance(fnn.LayerNorm(6).normalized_shape, tuple)  # an int normalized_shape, as torch
    x = parity.rand(2, 5, 3, 10)
    expected = theirs(x)
    for backend in KERNEL_BACKENDS:
        with parity.ran_on(backend, "layer_norm"):
            torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
            r = parity.rand(2, 5, 3, 10)
            torch.testing.assert_close(ours(x, residual=r), theirs(x + r), rtol=1e-5, atol=1e-5)


def _reference_args(residual, store_sum):
    x = torch.randn(5, 12, requires_grad=True)
    r = torch.randn(5, 12, requires_grad=True) if residual else None
    return x, r, torch.randn(12, requires_grad=True), torch.randn(12, requires_grad=True), 1e-5, store_sum


@pytest.mark.parametrize("residual,store_sum", [(False, False), (True, False), (True, True)])
def test_opcheck_reference_registration(residual, store_sum):
    args = _reference_args(residual, store_sum)
    torch.library.opcheck(LN.ops["torch"], args)
    x, r, w, b = (t.detach() if t is not None else None for t in args[:4])
    y, s, mean, rstd = LN.ops["torch"](*args)
    s_or_x = s.detach() if store_sum else x
    torch.library.opcheck(LN.backward_ops["torch"], (torch.randn(5, 12), torch.randn(5, 12) if store_sum else None,
                                                     s_or_x, None if store_sum else r, w, b,
                                                     mean, rstd, True, True))


def test_compile_fullgraph_reference():
    x, r, w, b, *_ = _reference_args(True, True)

    def block(x, r):
        s, y = FF.add_layer_norm(x, r, (12,), w, b)
        return FF.layer_norm(y, (12,), w, b, residual=s)

    fn = torch.compile(block, fullgraph=True, backend="aot_eager")
    with fastnets.use_backend("torch"):
        out = fn(x, r)
        out.sum().backward()
    got = (x.grad, r.grad, w.grad, b.grad)
    for t in (x, r, w, b):
        t.grad = None
    s = x + r
    expected = F.layer_norm(F.layer_norm(s, (12,), w, b) + s, (12,), w, b)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    for a, e in zip(got, (x.grad, r.grad, w.grad, b.grad)):
        torch.testing.assert_close(a, e)


# ----------------------------------------------------------------------------------------------
# GPU: natively, both kernel backends, at Transformer sizes.

@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [768, 1024, 1000, 4096, 12288])
def test_transformer_sizes_gpu(backend, dtype, N):
    M = 4096 if N <= 4096 else 512
    check((M, N), (N,), dtype, backend)
    check((M // 8, 8, N), (N,), dtype, backend, residual=True)
    check((M, N), (N,), dtype, backend, add=True, pdtype=torch.float32 if dtype != torch.float32 else None)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_deterministic_gpu(backend):
    x, r, w, b = _inputs((8192, 768), (768,), torch.float16, residual=True)
    g = torch.randn(8192, 768, device=DEVICE, dtype=torch.float16)
    runs = []
    for _ in range(3):
        with parity.ran_on(backend, "layer_norm"):
            out = FF.layer_norm(x, (768,), w, b, residual=r)
            runs.append(torch.autograd.grad(out, (x, r, w, b), g))
    for other in runs[1:]:
        for a, e in zip(other, runs[0]):
            assert torch.equal(a, e), "the backward is not deterministic"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_autocast_dtypes_as_torch_gpu(backend):
    x, r, w, b = _inputs((8, 64), (64,), torch.float16, residual=True, pdtype=torch.float32)
    with torch.autocast("cuda", dtype=torch.float16):
        stock_y = F.layer_norm(x + r, (64,), w, b)  # float32 under autocast
        with parity.ran_on(backend, "layer_norm"):
            y = FF.layer_norm(x, (64,), w, b, residual=r)
            s, y2 = FF.add_layer_norm(x, r, (64,), w, b)
    assert y.dtype == y2.dtype == stock_y.dtype == torch.float32 and s.dtype == torch.float16
    torch.testing.assert_close(y, stock_y, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(y2, stock_y, rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck_and_compile_gpu(backend):
    x, r, w, b = _inputs((64, 96), (96,), torch.float16, residual=True)
    for store_sum in (False, True):
        torch.library.opcheck(LN.ops[backend], (x, r, w, b, 1e-5, store_sum))
    y, s, mean, rstd = LN.ops[backend](x, r, w, b, 1e-5, True)
    torch.library.opcheck(LN.backward_ops[backend], (torch.randn_like(y), torch.randn_like(y), s.detach(), None,
                                                     w.detach(), b.detach(), mean, rstd, True, True))
    fn = torch.compile(lambda x, r: FF.add_layer_norm(x, r, (96,), w, b), fullgraph=True)
    with parity.ran_on(backend, "layer_norm"):
        s, y = fn(x, r)
    torch.testing.assert_close(y, F.layer_norm(x + r, (96,), w, b), rtol=2e-3, atol=2e-3)


def test_triton_kernels_compile_for_the_gpu():
    """The kernels through Triton's real compiler for sm_90 (the interpreter accepts code the
    compiler rejects): one tile and chunked rows, with and without residual, stored sum, params."""
    why = aot_compile.unavailable()
    if why:
        pytest.skip(why)
    def fwd(dt, pdt, single, flags, warps):
        res, w, b, store = flags
        return dict(kernel="ln_fwd_kernel", num_warps=warps,
                    types=dict(x_ptr=dt, r_ptr=dt, y_ptr=dt, s_ptr=dt, w_ptr=pdt, b_ptr=pdt, mean_ptr="*fp32",
                               rstd_ptr="*fp32", eps="fp32"),
                    constexprs=dict(HAS_RES=res, HAS_W=w, HAS_B=b, STORE_SUM=store, ROWS=1 if not single else 2,
                                    BLOCK_N=8192 if not single else 1024, SINGLE=single))

    def bwd(dt, pdt, single, flags, warps):
        ds, res, w, b = flags
        return dict(kernel="ln_bwd_kernel", num_warps=warps,
                    types=dict(dy_ptr=dt, ds_ptr=dt, x_ptr=dt, r_ptr=dt, dx_ptr=dt, w_ptr=pdt, mean_ptr="*fp32",
                               rstd_ptr="*fp32", dwp_ptr="*fp32", dbp_ptr="*fp32"),
                    constexprs=dict(HAS_DS=ds, HAS_RES=res, HAS_W=w, NEED_DW=w, NEED_DB=b, ROWS=1 if not single else 2,
                                    BLOCK_N=8192 if not single else 1024, SINGLE=single))
    aot_compile.compile_kernels("fastnets.kernels.layer_norm", [
        fwd("*fp16", "*fp32", True, (True, True, True, False), 4),
        fwd("*bf16", "*bf16", False, (True, True, False, True), 16),
        fwd("*fp32", "*fp32", False, (False, False, False, False), 16),
        bwd("*fp16", "*fp16", True, (False, True, True, True), 4),
        bwd("*bf16", "*fp32", False, (True, False, True, False), 16),
        dict(kernel="column_sum_kernel", types=dict(p_ptr="*fp32", out_ptr="*bf16"),
             constexprs=dict(BLOCK_P=16, BLOCK_N=256)),
    ])


def test_cuda_launcher_arguments_match_the_bindings(monkeypatch):
    """On a CPU machine whose fastnets._C has these launchers: the CUDA backend's Python glue calls
    them with arguments pybind11 accepts, and the launcher fails at its first CUDA call, named."""
    mod, why = fastnets._ext.load()
    if GPU or mod is None:  # a built extension must have the launchers (CI builds it)
        pytest.skip("needs a CPU machine with fastnets._C built with the layer-norm launchers")
    monkeypatch.setattr(fastnets._ext, "stream", lambda t: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    x, w = torch.randn(6, 10), torch.randn(10)
    mean, rstd = torch.randn(6), torch.rand(6)
    for call in (lambda: LN._cuda_fwd(x, x, w, w, 1e-5, True),
                 lambda: LN._cuda_fwd(x, None, None, None, 1e-5, False),
                 lambda: LN._cuda_bwd(x, x, x, None, w, w, mean, rstd, True, True),
                 lambda: LN._cuda_bwd(x, None, x, x, None, None, mean, rstd, False, False)):
        with pytest.raises(RuntimeError, match="fastnets._C: .* failed"):
            call()


# ----------------------------------------------------------------------------------------------
# GPU: the CUDA kernels' 128-bit path (csrc/layer_norm.cu: contiguous rows, N a multiple of 8 for
# 16-bit dtypes or 4 for float32, aligned pointers; warp rows up to 1024, block rows above) and the
# scalar path it falls back to (N = 260 for 16-bit dtypes, odd N, a misaligned input).

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", parity.DTYPES)
@pytest.mark.parametrize("N", [256, 260, 255, 1536, 1540])
def test_cuda_vector_and_scalar_paths_gpu(dtype, N):
    if "cuda" not in KERNEL_BACKENDS:
        pytest.skip("fastnets._C sees no device")
    check((37, N), (N,), dtype, "cuda")
    check((37, N), (N,), dtype, "cuda", add=True)
    check((37, N), (N,), dtype, "cuda", pdtype=torch.float32, residual=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", parity.DTYPES)
@pytest.mark.parametrize("N", [256, 1536])
def test_cuda_misaligned_input_gpu(dtype, N):
    if "cuda" not in KERNEL_BACKENDS:
        pytest.skip("fastnets._C sees no device")
    x = parity.misaligned(parity.rand(37, N, dtype=dtype, requires_grad=True))
    w = (1 + 0.5 * parity.rand(N, dtype=dtype)).requires_grad_()
    b = parity.rand(N, dtype=dtype, requires_grad=True)
    up = [parity.upcast(t) for t in (x, w, b)]
    ref = F.layer_norm(up[0], (N,), up[1], up[2])
    stock = F.layer_norm(x, (N,), w, b)
    g = torch.randn_like(ref)
    ref_g = torch.autograd.grad(ref, up, g)
    stock_g = torch.autograd.grad(stock, (x, w, b), g.to(dtype))
    with parity.ran_on("cuda", "layer_norm"):
        out = FF.layer_norm(x, (N,), w, b)
        out_g = torch.autograd.grad(out, (x, w, b), g.to(dtype))
    parity.assert_parity(out, ref, stock)
    for o, rf, st, name in zip(out_g, ref_g, stock_g, ("grad input", "grad weight", "grad bias")):
        parity.assert_parity(o, rf, st, name)
