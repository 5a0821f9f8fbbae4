"""Local response normalization (fastnets/ops/lrn.py): the kernels against torch's definition in
float64, forward and backward, every window size 1..7, layouts, dtypes, 3-D to 6-D inputs, edge
parameters, NaN/Inf, bad input, the module, opcheck/compile, and AlexNet's shapes on a GPU."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastnets
from fastnets import functional as FF
from fastnets import nn as fnn
from fastnets.ops import lrn as L
import aot_compile
import parity
from parity import DEVICE, DTYPES, GPU, KERNEL_BACKENDS, LAYOUTS

# alpha large enough that the window sum really matters (torch's default 1e-4 barely moves x)
PARAMS = dict(alpha=0.8, beta=0.75, k=1.3)


def stock_lrn(x, size, alpha=1e-4, beta=0.75, k=1.0):
    """Stock PyTorch in x's dtype. The CPU build lacks avg_pool3d for float16/bfloat16: there, the
    same six ops, the pooling in float32 and rounded back (what the GPU's pooling kernel does)."""
    try:
        return F.local_response_norm(x, size, alpha, beta, k)
    except NotImplementedError:
        if x.dtype not in (torch.float16, torch.bfloat16):
            raise
    N, C = x.shape[:2]
    div = x.mul(x).reshape(N, 1, C, x.shape[2], -1).float()
    div = F.pad(div, (0, 0, 0, 0, size // 2, (size - 1) // 2))
    div = F.avg_pool3d(div, (size, 1, 1), stride=1).squeeze(1).to(x.dtype).reshape(x.shape)
    return x / div.mul(alpha).add(k).pow(beta)


def check(x, size, backend, grad=True, **params):
    """Forward (and backward) of the kernel under `backend` against the float64 reference, with
    stock PyTorch's error in x's dtype as the yardstick."""
    params = params or PARAMS
    x = x.detach().requires_grad_(grad)
    x64 = parity.upcast(x)
    ref = F.local_response_norm(x64, size, **params)
    stock = stock_lrn(x, size, **params)
    if grad:
        g64 = torch.randn_like(ref)
        (ref_dx,) = torch.autograd.grad(ref, x64, g64)
        (stock_dx,) = torch.autograd.grad(stock, x, g64.to(x.dtype))
    with parity.ran_on(backend, "lrn"):
        out = FF.local_response_norm(x, size, **params)
        if grad:
            (dx,) = torch.autograd.grad(out, x, g64.to(x.dtype))
    parity.assert_parity(out, ref, stock)
    assert out.stride() == stock.stride(), "output memory format differs from torch's"
    if grad:
        parity.assert_parity(dx, ref_dx, stock_dx, "grad input")
    return out


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", range(1, 8))
def test_window_sizes_layouts_dtypes(backend, dtype, layout, size):
    # Every size, even and odd, with C = 6 (size 7 passes both channel edges at once).
    x = parity.rand(2, 6, 5, 7, dtype=dtype, layout=layout)
    check(x, size, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_default_parameters(backend, dtype):
    check(parity.rand(3, 11, 3, 3, dtype=dtype, layout="channels_last"), 5, backend,
          alpha=1e-4, beta=0.75, k=1.0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape,size,layout", [
    ((2, 7, 13), 3, "contiguous"),  # 3-D (N, C, L)
    ((1, 5, 11), 4, "channels_last"),  # 3-D, channels innermost
    ((3, 4, 17), 2, "noncontiguous"),
    ((2, 5, 2, 3, 4), 5, "contiguous"),  # 5-D: the window runs over C, not depth
    ((1, 6, 3, 1, 5), 4, "noncontiguous"),
    ((2, 3, 2, 2, 2, 3), 3, "contiguous"),  # 6-D: torch accepts any rank >= 3
    ((1, 1, 5, 3), 3, "contiguous"),  # a single channel
    ((2, 3, 1, 1), 7, "channels_last"),  # C < size, 1x1 spatial
])
def test_ranks_and_small_channel_counts(backend, shape, size, layout):
    check(parity.rand(*shape, layout=layout), size, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_permuted_views(backend):
    # Spatial dims that cannot be merged (up to three are read by strides), and a 6-D view with
    # four unmergeable spatial dims (made contiguous by the op). torch's own view() fails on some of
    # these, so the reference is computed on contiguous copies.
    for x in (parity.rand(2, 5, 4, 3, 6).transpose(3, 4), parity.rand(2, 4, 3, 2, 3, 2).permute(0, 1, 5, 3, 4, 2)):
        ref = F.local_response_norm(x.double().contiguous(), 3, **PARAMS)
        g = torch.randn_like(ref)
        x64 = x.double().contiguous().requires_grad_()
        (ref_dx,) = torch.autograd.grad(F.local_response_norm(x64, 3, **PARAMS), x64, g)
        xk = x.detach().requires_grad_()
        with parity.ran_on(backend, "lrn"):
            out = FF.local_response_norm(xk, 3, **PARAMS)
            (dx,) = torch.autograd.grad(out, xk, g.float())
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dx.double(), ref_dx, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_expanded_grad_and_input(backend):
    # out.sum().backward() hands the backward a stride-0 gradient; the input is a broadcast view too.
    x = parity.rand(1, 5, 1, 6).expand(2, 5, 3, 6).requires_grad_()
    x.retain_grad()
    x64 = parity.upcast(x)
    F.local_response_norm(x64, 4, **PARAMS).sum().backward()
    with parity.ran_on(backend, "lrn"):
        FF.local_response_norm(x, 4, **PARAMS).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_vector_paths_agree(backend, layout, monkeypatch):
    # Issue 12: channels_last reads the window from registers (WHOLE_C), NCHW from whole aligned rows;
    # VEC when the runs are 16-byte aligned (C or H*W a multiple of 8, not of 16: beyond the JIT's
    # own proof). The old shifted-load path (channels_last, more channels than one tile holds) and
    # misaligned views must give the very same values.
    from fastnets.kernels import lrn as K

    seen = []
    real_vec, real_blocks = K._vec, K._blocks
    monkeypatch.setattr(K, "_vec", lambda *a: seen.append(real_vec(*a)) or seen[-1])
    x = parity.rand(2, 24, 3, 8, dtype=torch.float16, layout=layout)  # C = 24, H*W = 24
    out = check(x, 5, backend)
    assert seen == [8, 8], seen  # forward, backward
    g = torch.randn_like(out)
    with parity.ran_on(backend, "lrn"):
        xs = x.detach().requires_grad_()
        ref_dx, = torch.autograd.grad(FF.local_response_norm(xs, 5, **PARAMS), xs, g)
        seen.clear()
        xm = parity.misaligned(x).requires_grad_()
        out_m = FF.local_response_norm(xm, 5, **PARAMS)
        dx_m, = torch.autograd.grad(out_m, xm, parity.misaligned(g))
        assert seen == [1, 1], seen
        assert torch.equal(out_m, out) and torch.equal(dx_m, ref_dx)
        if layout == "channels_last":  # the path for more channels than one tile: shifted loads
            monkeypatch.setattr(K, "_blocks", lambda C, S, inner: (8, 64, 4, False) if inner else real_blocks(C, S, inner))
            out_s = FF.local_response_norm(xs, 5, **PARAMS)
            dx_s, = torch.autograd.grad(out_s, xs, g)
            assert torch.equal(out_s, out) and torch.equal(dx_s, ref_dx)


def test_module_and_fuse_reach_the_vector_path(monkeypatch):
    # Issue 12: AlexNet's conv -> ReLU -> LRN. fuse() stores the conv weights channels_last (its
    # default), so the activations are NHWC whatever the input's layout, and the LRN kernels get
    # channels-contiguous 16-byte runs: CH_INNER with VEC = 8. With the drop-in module (or
    # fuse(channels_last=False)) the layout is the input's: NCHW with a plane that is a multiple of 8
    # positions is vectorized too; an odd plane (AlexNet's 55x55) cannot be, each channel row starting
    # 2 bytes off alignment: VEC = 1 (CONTRIBUTING, machine-code expectations: not a fast path).
    from fastnets.kernels import lrn as K

    seen = []
    real = K._grid_args
    monkeypatch.setattr(K, "_grid_args", lambda C, S, inner, N, vec: seen.append((inner, vec)) or real(C, S, inner, N, vec))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.LocalResponseNorm(5, 5e-4, 0.75, 2.0))
    model = model.to(DEVICE).eval().half()
    drop_in = torch.nn.Sequential(model[0], model[1], fnn.LocalResponseNorm(5, 5e-4, 0.75, 2.0))
    for layout, hw in (("channels_last", 9), ("contiguous", 9), ("contiguous", 10)):
        x = parity.rand(2, 3, hw, hw, dtype=torch.float16, layout=layout)  # planes 7x7 (odd) or 8x8
        as_input = (True, 8) if layout == "channels_last" else (False, 1 if hw == 9 else 8)
        with parity.ran_on("triton", "lrn"):
            for m, want in ((fastnets.fuse(model), (True, 8)), (drop_in, as_input),
                            (fastnets.fuse(model, channels_last=False), as_input)):
                seen.clear()
                with torch.no_grad():
                    y = m(x)
                assert seen == [want], (layout, hw, seen)
                assert y.is_contiguous(memory_format=torch.channels_last) == want[0]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("alpha,beta,k", [
    (0.5, 0.0, 1.0),  # beta = 0: the identity, whatever d is (torch's pow(d, 0) = 1)
    (2.0, 2.0, -1.0),  # negative d, even integer beta: positive powers
    (2.0, 1.0, -1.0),  # negative d, odd integer beta: negative powers
    (0.5, 0.75, -1.0),  # negative d, fractional beta: NaN where d < 0, as torch
    (1.0, -0.5, 0.5),  # negative beta
    (0.0, 0.75, 2.0),  # alpha = 0: x / k^beta
])
def test_edge_parameters(backend, alpha, beta, k):
    x = parity.rand(2, 5, 3, 4)
    check(x, 3, backend, grad=beta >= 0 and k > 0, alpha=alpha, beta=beta, k=k)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("beta", [0.75, 0.0])
def test_nan_and_inf_propagate_as_torch(backend, beta):
    x = parity.rand(2, 7, 3, 3)
    x[0, 2, 1, 1] = float("nan")
    x[1, 4, 0, 2] = float("inf")
    x[1, 0, 2, 2] = -float("inf")
    out = check(x, 4, backend, alpha=0.8, beta=beta, k=1.3)
    if beta:  # size 4: channel 2 lies in the windows [c - 2, c + 1] of channels 1..4
        assert out[0, 1:5, 1, 1].isnan().all() and not out[0, [0, 5, 6], 1, 1].isnan().any()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_zero_input_where_d_is_k(backend):
    # x = 0 in whole windows: y = 0 and the gradient is g / k^beta exactly.
    x = torch.zeros(1, 4, 2, 2, device=DEVICE)
    x[0, 0] = parity.rand(2, 2)
    check(x, 2, backend)
    # k = 0 and a zero first channel: the padded channel -1 would have d = 0 (0 / 0 in the
    # transposed window sum if it were not masked out).
    x = parity.rand(2, 4, 3, 2)
    x[:, 0] = 0
    check(x, 3, backend, alpha=0.8, beta=0.75, k=0.0)


def test_reference_backward_matches_autograd():
    # The hand-derived gradient (also the kernels' formula) against autograd of torch's definition.
    for size in range(1, 8):
        x = torch.randn(2, 6, 3, 2, dtype=torch.float64, requires_grad=True)
        y = F.local_response_norm(x, size, **PARAMS)
        g = torch.randn_like(y)
        (expected,) = torch.autograd.grad(y, x, g)
        got = L.backward_ops["torch"](g, x.detach(), size, PARAMS["alpha"], PARAMS["beta"], PARAMS["k"])
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_empty_input_is_returned_as_torch_does():
    for shape in ((0, 3, 4, 4), (2, 0, 3), (2, 3, 0, 4)):
        x = torch.randn(shape, device=DEVICE)
        assert FF.local_response_norm(x, 3) is x and F.local_response_norm(x, 3) is x


def test_bad_input_raises_like_torch():
    x = torch.randn(2, 3, 4, 4)
    for bad in (0, -1):
        parity.assert_raises_like(lambda: FF.local_response_norm(x, bad), lambda: F.local_response_norm(x, bad),
                                  match="size must be at least 1")
    for bad in (2.5, 2.0, True, None, "3"):
        parity.assert_raises_like(lambda: FF.local_response_norm(x, bad), lambda: F.local_response_norm(x, bad),
                                  match="size must be an int")
    for t in (torch.randn(3, 4), torch.randn(5)):
        parity.assert_raises_like(lambda: FF.local_response_norm(t, 3), lambda: F.local_response_norm(t, 3),
                                  match="Expected 3D or higher dimensionality input")
    parity.assert_raises_like(lambda: FF.local_response_norm(x, 3, alpha="a"),
                              lambda: F.local_response_norm(x, 3, alpha="a"), match="alpha")
    b = torch.ones(2, 3, 4, 4, dtype=torch.bool)
    parity.assert_raises_like(lambda: FF.local_response_norm(b, 3), lambda: F.local_response_norm(b, 3))
    assert FF.local_response_norm(x, torch.tensor(3)).shape == x.shape  # an int tensor is an int, as in torch


def test_integer_input_as_torch_and_kernels_refuse_it():
    x = torch.randint(-3, 4, (2, 5, 3, 3))
    torch.testing.assert_close(FF.local_response_norm(x, 3), F.local_response_norm(x, 3))
    for backend in KERNEL_BACKENDS:
        with fastnets.use_backend(backend), pytest.raises(fastnets.BackendError, match="float32, float16 or bfloat16"):
            FF.local_response_norm(x.to(DEVICE), 3)
        with fastnets.use_backend(backend), pytest.raises(fastnets.BackendError, match="float64"):
            FF.local_response_norm(x.double().to(DEVICE), 3)


def test_module_matches_torch_module():
    for args in ((5,), (2, 1e-3, 0.5, 2.0), (3,)):
        ours, theirs = fnn.LocalResponseNorm(*args), torch.nn.LocalResponseNorm(*args)
        assert repr(ours) == repr(theirs) and isinstance(ours, torch.nn.LocalResponseNorm)
        assert (ours.size, ours.alpha, ours.beta, ours.k) == (theirs.size, theirs.alpha, theirs.beta, theirs.k)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours, theirs = fnn.LocalResponseNorm(5, 1e-2, 0.75, 2.0), torch.nn.LocalResponseNorm(5, 1e-2, 0.75, 2.0)
    x = parity.rand(2, 7, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x))  # float64: the reference on the CPU
    for backend in KERNEL_BACKENDS:
        with parity.ran_on(backend, "lrn"):
            torch.testing.assert_close(ours(x.float()), theirs(x).float(), rtol=1e-5, atol=1e-6)


def _reference_args(layout):
    x = parity.rand(2, 5, 3, 4, layout=layout, requires_grad=True, device="cpu")
    return x, 3, 0.8, 0.75, 1.3


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_reference_registration(layout):
    args = _reference_args(layout)
    torch.library.opcheck(L.ops["torch"], args)
    g = torch.randn(args[0].shape)
    torch.library.opcheck(L.backward_ops["torch"], (g, args[0].detach()) + args[1:])


def test_compile_fullgraph_reference():
    x, *params = _reference_args("channels_last")
    fn = torch.compile(lambda t: FF.local_response_norm(t, *params), fullgraph=True, backend="aot_eager")
    with fastnets.use_backend("torch"):
        out = fn(x)
        out.sum().backward()
    x2 = x.detach().requires_grad_()
    expected = F.local_response_norm(x2, *params)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, x2.grad)


# ----------------------------------------------------------------------------------------------
# GPU: natively, both kernel backends, at AlexNet's shapes.

@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("C,H", [(96, 55), (256, 27)])
def test_alexnet_shapes_gpu(backend, dtype, layout, C, H):
    x = parity.rand(128, C, H, H, dtype=dtype, layout=layout)
    check(x, 5, backend, alpha=1e-4, beta=0.75, k=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("size", [1, 2, 3, 4, 7, 12])
def test_sizes_and_views_gpu(backend, size):
    for layout in LAYOUTS:
        check(parity.rand(9, 37, 13, 11, dtype=torch.float16, layout=layout), size, backend)
    check(parity.rand(5, 19, 301), size, backend)  # 3-D
    check(parity.rand(2, 23, 5, 9, 7, layout="noncontiguous"), size, backend)  # 5-D strided


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_autocast_dtype_as_torch_gpu(backend):
    x = parity.rand(4, 16, 9, 9, dtype=torch.float16, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.float16):
        stock = F.local_response_norm(x, 5, 1e-2, 0.75, 2.0)  # torch's pow runs in float32 there
        with parity.ran_on(backend, "lrn"):
            out = FF.local_response_norm(x, 5, 1e-2, 0.75, 2.0)
    assert out.dtype == stock.dtype == torch.float32
    torch.testing.assert_close(out, stock, rtol=2e-3, atol=2e-3)
    out.sum().backward()
    assert x.grad.dtype == torch.float16


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck_and_compile_gpu(backend):
    x = parity.rand(4, 16, 9, 9, layout="channels_last", requires_grad=True)
    torch.library.opcheck(L.ops[backend], (x, 5, 1e-4, 0.75, 2.0))
    torch.library.opcheck(L.backward_ops[backend], (torch.randn_like(x), x.detach(), 5, 1e-4, 0.75, 2.0))
    fn = torch.compile(lambda t: FF.local_response_norm(t, 5, 1e-4, 0.75, 2.0), fullgraph=True)
    with parity.ran_on(backend, "lrn"):
        out = fn(x)
    torch.testing.assert_close(out, F.local_response_norm(x, 5, 1e-4, 0.75, 2.0), rtol=1e-5, atol=1e-6)


def test_triton_kernels_compile_for_the_gpu():
    """The kernels through Triton's real compiler for sm_90 (the interpreter accepts code the
    compiler rejects), in the variants the launchers use."""
    why = aot_compile.unavailable()
    if why:
        pytest.skip(why)
    floats = {n: "fp32" for n in ("alpha_over_size", "beta", "k", "neg_factor", "coef")}
    aot_compile.compile_kernels("fastnets.kernels.lrn", [
        dict(kernel="lrn_fwd_kernel", types=dict(floats, x_ptr="*fp16", y_ptr="*fp16"),
             constexprs=dict(SPATIAL=1, BLOCK_C=4, BLOCK_S=256), num_warps=8),
        dict(kernel="lrn_fwd_kernel", types=dict(floats, x_ptr="*bf16", y_ptr="*bf16"),
             constexprs=dict(SPATIAL=3, BLOCK_C=32, BLOCK_S=32), num_warps=8),
        dict(kernel="lrn_bwd_kernel", types=dict(floats, g_ptr="*fp32", x_ptr="*fp32", dx_ptr="*fp32"),
             constexprs=dict(SPATIAL=1, BLOCK_C=32, BLOCK_S=32), num_warps=8),
        dict(kernel="lrn_bwd_kernel", types=dict(floats, g_ptr="*fp16", x_ptr="*fp16", dx_ptr="*fp16"),
             constexprs=dict(SPATIAL=2, BLOCK_C=4, BLOCK_S=256), num_warps=8),
    ])


def test_cuda_launcher_arguments_match_the_bindings(monkeypatch):
    """On a CPU machine whose fastnets._C has these launchers: the CUDA backend's Python glue calls
    them with arguments pybind11 accepts (a wrong count or type would be a TypeError), and the
    launcher then fails at its first CUDA call, with the call named."""
    mod, why = fastnets._ext.load()
    if GPU or mod is None:  # a built extension must have the launchers (CI builds it)
        pytest.skip("needs a CPU machine with fastnets._C built with the LRN launchers")
    _patch_cuda_glue(monkeypatch)
    x = torch.randn(2, 5, 3, 4)
    for call in (lambda: L._cuda_fwd(x, 3, 1e-4, 0.75, 1.0), lambda: L._cuda_bwd(x, x, 3, 1e-4, 0.75, 1.0)):
        with pytest.raises(RuntimeError, match="fastnets._C: .* failed"):
            call()


def _patch_cuda_glue(monkeypatch):
    monkeypatch.setattr(fastnets._ext, "stream", lambda t: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())


# ----------------------------------------------------------------------------------------------
# GPU: the CUDA kernels' 128-bit path (csrc/lrn.cu: channels_last, C a multiple of 8 for 16-bit
# dtypes or 4 for float32, aligned pointers, windows of at most 9 channels; each block of 256
# threads stages its vectors and their neighbours in shared memory: C = 24 in 16-bit types puts a
# block boundary inside a position, C = 8 has no neighbouring vector in a position) and the scalar
# path it falls back to (a misaligned input, C = 60 for 16-bit dtypes, odd C, size 11, NCHW).

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", parity.DTYPES)
@pytest.mark.parametrize("C,misaligned,layout", [(64, False, "channels_last"), (64, True, "channels_last"),
                                                 (60, False, "channels_last"), (33, False, "channels_last"),
                                                 (24, False, "channels_last"), (8, False, "channels_last"),
                                                 (64, False, "contiguous")])
@pytest.mark.parametrize("size", [1, 2, 5, 8, 9, 11])
def test_cuda_vector_and_scalar_paths_gpu(dtype, C, misaligned, layout, size):
    if "cuda" not in parity.KERNEL_BACKENDS:
        pytest.skip("fastnets._C sees no device")
    x = parity.rand(3, C, 5, 7, dtype=dtype, layout=layout)
    check(parity.misaligned(x) if misaligned else x, size, "cuda")
    check(parity.misaligned(x) if misaligned else x, size, "cuda", alpha=0.5, beta=0.0, k=2.0)
