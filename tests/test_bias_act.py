"""Bias + activation (fastnets/ops/bias_act.py): bias_act and linear_act against the stock
composition in float64, forward and the gradients of input and bias, every activation, dtypes,
strided inputs, mixed-precision bias, NaN/Inf, bad input, opcheck/compile, and MLP sizes on a GPU."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastnets
from fastnets import functional as FF
from fastnets.ops import _activation as A
from fastnets.ops import bias_act as BA
import aot_compile
import parity
from parity import DEVICE, DTYPES, GPU, KERNEL_BACKENDS, LAYOUTS


def stock_bias_act(x, b, activation):
    return A.apply(x + b if b is not None else x, A.code(activation))


def check(x, b, activation, backend):
    leaves = [t for t in (x, b) if t is not None]
    x64, b64 = parity.upcast(x), parity.upcast(b)
    ref = stock_bias_act(x64, b64, activation)
    # stock in the input's dtype (a float32 bias with a half input: the bias rounded to the input's
    # dtype, as F.linear under autocast would)
    stock = stock_bias_act(x, b.to(x.dtype) if b is not None else None, activation)
    g = torch.randn_like(ref)
    ref_g = torch.autograd.grad(ref, [t for t in (x64, b64) if t is not None], g)
    stock_g = torch.autograd.grad(stock, leaves, g.to(x.dtype))
    with parity.ran_on(backend, "bias_act"):
        out = FF.bias_act(x, b, activation)
        out_g = torch.autograd.grad(out, leaves, g.to(x.dtype))
    parity.assert_parity(out, ref, stock)
    assert out.is_contiguous()
    for o, r, s, name in zip(out_g, ref_g, stock_g, ("grad input", "grad bias")):
        parity.assert_parity(o, r, s, name)
    return out


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("activation", A.NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_activations_dtypes(backend, activation, dtype):
    x = parity.rand(37, 131, dtype=dtype, scale=3.0, requires_grad=True)  # scale 3: relu6's upper kink
    b = parity.rand(131, dtype=dtype, requires_grad=True)
    check(x, b, activation, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape,layout", [
    ((1, 1), "contiguous"), ((1,), "contiguous"), ((7,), "noncontiguous"),
    ((3, 5, 17), "contiguous"), ((2, 3, 5, 29), "channels_last"), ((4, 9, 13), "noncontiguous"),
    ((300, 3), "contiguous"),  # more rows than one backward program takes at once
])
def test_shapes_and_layouts(backend, shape, layout):
    x = parity.rand(*shape, layout=layout, requires_grad=True)
    check(x, parity.rand(shape[-1], requires_grad=True), "gelu", backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_transposed_input_and_no_bias(backend):
    x = parity.rand(23, 6, dtype=torch.float16).t().requires_grad_()  # column stride 23
    check(x, parity.rand(23, dtype=torch.float16, requires_grad=True), "silu", backend)
    check(x, None, "relu", backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_bias_with_half_input(backend, dtype):
    out = check(parity.rand(9, 40, dtype=dtype, requires_grad=True), parity.rand(40, requires_grad=True),
                "gelu", backend)
    assert out.dtype == dtype


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_bias(backend):
    check(parity.rand(6, 21, requires_grad=True), parity.rand(21, 3)[:, 1].requires_grad_(), "sigmoid", backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_bias_without_grad(backend):
    x = parity.rand(5, 12, requires_grad=True)
    b = parity.rand(12)
    with parity.ran_on(backend, "bias_act"):
        (dx,) = torch.autograd.grad(FF.bias_act(x, b, "relu6"), x, torch.ones(5, 12, device=DEVICE))
    torch.testing.assert_close(dx, ((x + b > 0) & (x + b < 6)).float())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("activation", A.NAMES)
def test_nan_and_inf_propagate_as_torch(backend, activation):
    x = parity.rand(3, 8)
    x[0, 1], x[1, 2], x[2, 3] = float("nan"), float("inf"), -float("inf")
    x.requires_grad_()
    b = parity.rand(8)
    g = torch.randn(3, 8, device=DEVICE)
    with parity.ran_on(backend, "bias_act"):
        out = FF.bias_act(x, b, activation)
        (dx,) = torch.autograd.grad(out, x, g)
    expected = stock_bias_act(x.detach(), b, activation)
    if activation == "gelu" and not GPU:  # the CPU's stock gelu gives NaN at +inf (CUDA's gives inf)
        expected[1, 2] = float("inf")
    torch.testing.assert_close(out, expected, equal_nan=True, rtol=1e-5, atol=1e-6)
    # The gradient in the row with the NaN, by the shared activation convention (relu and relu6 pass
    # it through a NaN as torch's CUDA threshold/hardtanh backward do; the CPU's vectorized
    # hardtanh backward gives 0 there, its scalar path the gradient).
    z = (x.detach() + b)[0]
    torch.testing.assert_close(dx[0], A.grad(z, g[0], A.code(activation)), equal_nan=True, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "relu", None])
def test_linear_act(backend, activation):
    x = parity.rand(2, 5, 24, requires_grad=True)
    w = parity.rand(17, 24, requires_grad=True)
    b = parity.rand(17, requires_grad=True)
    up = [parity.upcast(t) for t in (x, w, b)]
    ref = A.apply(F.linear(*up), A.code(activation))
    stock = A.apply(F.linear(x, w, b), A.code(activation))
    g = torch.randn_like(ref)
    ref_g = torch.autograd.grad(ref, up, g)
    stock_g = torch.autograd.grad(stock, (x, w, b), g.float())
    with parity.ran_on(backend, "bias_act"):
        out = FF.linear_act(x, w, b, activation)
        out_g = torch.autograd.grad(out, (x, w, b), g.float())
    parity.assert_parity(out, ref, stock)
    for o, r, s, name in zip(out_g, ref_g, stock_g, ("grad input", "grad weight", "grad bias")):
        parity.assert_parity(o, r, s, name)
    with parity.ran_on(backend, "bias_act"):  # without bias
        torch.testing.assert_close(FF.linear_act(x, w, None, activation),
                                   A.apply(F.linear(x, w), A.code(activation)), rtol=1e-5, atol=1e-5)


def test_reference_backward_matches_autograd():
    x = torch.randn(6, 11, dtype=torch.float64, requires_grad=True) * 3
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    for name in A.NAMES:
        y = stock_bias_act(x, b, name)
        g = torch.randn_like(y)
        expected = torch.autograd.grad(y, (x, b), g)
        dx, db = BA.backward_ops["torch"](g, x.detach(), b.detach(), A.code(name), True)
        torch.testing.assert_close(dx, expected[0])
        torch.testing.assert_close(db, expected[1])


def test_empty_input():
    x = torch.randn(0, 5, device=DEVICE, requires_grad=True)
    b = torch.randn(5, device=DEVICE, requires_grad=True)
    out = FF.bias_act(x, b, "gelu")
    assert out.shape == (0, 5)
    out.sum().backward()
    assert torch.equal(b.grad, torch.zeros(5, device=DEVICE))


def test_bad_input():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="activation must be one of"):
        FF.bias_act(x, torch.randn(6), "tanhh")
    with pytest.raises(RuntimeError, match=r"bias must have shape \[6\]"):
        FF.bias_act(x, torch.randn(5), "gelu")
    with pytest.raises(RuntimeError, match=r"bias must have shape \[6\]"):
        FF.bias_act(x, torch.randn(1, 6), "gelu")
    with pytest.raises(TypeError, match="bias has dtype torch.float64"):
        FF.bias_act(x, torch.randn(6, dtype=torch.float64), "gelu")
    with pytest.raises(TypeError, match="bias has dtype torch.float16"):
        FF.bias_act(x, torch.randn(6).half(), "gelu")
    with pytest.raises(RuntimeError, match="at least one dimension"):
        FF.bias_act(torch.tensor(1.0), None, "gelu")
    w = torch.randn(3, 5)  # in_features 5 against the input's 6
    parity.assert_raises_like(lambda: FF.linear_act(x, w), lambda: F.linear(x, w))
    with pytest.raises(RuntimeError, match="weight must be a 2-D tensor"):
        FF.linear_act(x, torch.randn(6))
    with pytest.raises(ValueError, match="activation must be one of"):
        FF.linear_act(x, torch.randn(3, 6), None, "swishy")
    for backend in KERNEL_BACKENDS:
        with fastnets.use_backend(backend), pytest.raises(fastnets.BackendError, match="float64"):
            FF.bias_act(x.double().to(DEVICE), None, "relu")


@pytest.mark.parametrize("act", [0, 4])
def test_opcheck_reference_registration(act):
    x = torch.randn(7, 13, requires_grad=True)
    b = torch.randn(13, requires_grad=True)
    torch.library.opcheck(BA.ops["torch"], (x, b, act))
    torch.library.opcheck(BA.ops["torch"], (x, None, act))
    torch.library.opcheck(BA.backward_ops["torch"], (torch.randn(7, 13), x.detach(), b.detach(), act, True))


def test_compile_fullgraph_reference():
    x = torch.randn(3, 4, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    fn = torch.compile(lambda x: FF.linear_act(x, w, b, "gelu"), fullgraph=True, backend="aot_eager")
    with fastnets.use_backend("torch"):
        out = fn(x)
        out.sum().backward()
    got = (x.grad, w.grad, b.grad)
    for t in (x, w, b):
        t.grad = None
    expected = F.gelu(F.linear(x, w, b))
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    for a, e in zip(got, (x.grad, w.grad, b.grad)):
        torch.testing.assert_close(a, e)


# ----------------------------------------------------------------------------------------------
# GPU: natively, both kernel backends, at Transformer MLP sizes.

@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
@pytest.mark.parametrize("M,F", [(8192, 3072), (4099, 1000), (3, 50257)])
def test_mlp_sizes_gpu(backend, dtype, activation, M, F):
    x = parity.rand(M, F, dtype=dtype, requires_grad=True)
    check(x, parity.rand(F, dtype=dtype, requires_grad=True), activation, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_and_deterministic_gpu(backend):
    for layout in LAYOUTS:
        check(parity.rand(64, 33, 129, dtype=torch.bfloat16, layout=layout, requires_grad=True),
              parity.rand(129, requires_grad=True), "gelu", backend)
    x = parity.rand(16384, 768, dtype=torch.float16, requires_grad=True)
    b = parity.rand(768, dtype=torch.float16, requires_grad=True)
    g = torch.randn(16384, 768, device=DEVICE, dtype=torch.float16)
    runs = []
    for _ in range(3):
        with parity.ran_on(backend, "bias_act"):
            runs.append(torch.autograd.grad(FF.bias_act(x, b, "gelu"), (x, b), g))
    for other in runs[1:]:
        assert all(torch.equal(a, e) for a, e in zip(other, runs[0])), "the backward is not deterministic"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck_and_compile_gpu(backend):
    x = parity.rand(64, 96, dtype=torch.float16, requires_grad=True)
    b = parity.rand(96, dtype=torch.float16, requires_grad=True)
    torch.library.opcheck(BA.ops[backend], (x, b, 4))
    torch.library.opcheck(BA.backward_ops[backend], (torch.randn_like(x), x.detach(), b.detach(), 4, True))
    w = parity.rand(96, 96, dtype=torch.float16)
    fn = torch.compile(lambda t: FF.linear_act(t, w, b, "gelu"), fullgraph=True)
    with parity.ran_on(backend, "bias_act"):
        out = fn(x)
    torch.testing.assert_close(out, F.gelu(F.linear(x, w, b)), rtol=2e-3, atol=2e-3)


def test_triton_kernels_compile_for_the_gpu():
    """The kernels through Triton's real compiler for sm_90 (the interpreter accepts code the
    compiler rejects)."""
    why = aot_compile.unavailable()
    if why:
        pytest.skip(why)
    aot_compile.compile_kernels("fastnets.kernels.bias_act", [
        dict(kernel="bias_act_fwd_kernel", types=dict(x_ptr="*fp16", b_ptr="*fp32", y_ptr="*fp16"),
             constexprs=dict(HAS_BIAS=True, ACT=4, BLOCK_M=16, BLOCK_F=128)),
        dict(kernel="bias_act_bwd_kernel", types=dict(dy_ptr="*bf16", x_ptr="*bf16", b_ptr="*bf16", dx_ptr="*bf16",
                                                      dbp_ptr="*fp32"),
             constexprs=dict(HAS_BIAS=True, NEED_DB=True, ACT=3, BLOCK_M=16, BLOCK_F=128)),
        dict(kernel="bias_act_bwd_kernel", types=dict(dy_ptr="*fp32", x_ptr="*fp32", b_ptr="*fp32", dx_ptr="*fp32",
                                                      dbp_ptr="*fp32"),
             constexprs=dict(HAS_BIAS=False, NEED_DB=False, ACT=2, BLOCK_M=16, BLOCK_F=128)),
        dict(kernel="column_sum_kernel", types=dict(p_ptr="*fp32", out_ptr="*fp16"),
             constexprs=dict(BLOCK_P=16, BLOCK_F=256)),
    ])


def test_cuda_launcher_arguments_match_the_bindings(monkeypatch):
    """On a CPU machine whose fastnets._C has these launchers: the CUDA backend's Python glue calls
    them with arguments pybind11 accepts, and the launcher fails at its first CUDA call, named."""
    mod, why = fastnets._ext.load()
    if GPU or mod is None:  # a built extension must have the launchers (CI builds it)
        pytest.skip("needs a CPU machine with fastnets._C built with the bias_act launchers")
    monkeypatch.setattr(fastnets._ext, "stream", lambda t: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    x, b = torch.randn(6, 10), torch.randn(10)
    for call in (lambda: BA._cuda_fwd(x, b, 4), lambda: BA._cuda_fwd(x, None, 1),
                 lambda: BA._cuda_bwd(x, x, b, 4, True), lambda: BA._cuda_bwd(x, x, None, 3, False)):
        with pytest.raises(RuntimeError, match="fastnets._C: .* failed"):
            call()


# ----------------------------------------------------------------------------------------------
# GPU: the CUDA kernels' 128-bit path (csrc/bias_act.cu: contiguous rows, F a multiple of 8 for
# 16-bit dtypes or 4 for float32, 16-byte aligned pointers) and the scalar path it falls back to
# (a pointer one element past a 16-byte boundary, F = 260 for 16-bit dtypes, odd F).

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("F_,misaligned,bias32", [(256, False, False), (256, False, True), (256, True, False),
                                                  (260, False, False), (131, False, True)])
def test_cuda_vector_and_scalar_paths_gpu(dtype, F_, misaligned, bias32):
    if "cuda" not in KERNEL_BACKENDS:
        pytest.skip("fastnets._C sees no device")
    x = parity.rand(67, F_, dtype=dtype, requires_grad=True)
    b = parity.rand(F_, dtype=torch.float32 if bias32 else dtype, requires_grad=True)
    if misaligned:
        x, b = parity.misaligned(x), parity.misaligned(b)
    for activation in ("gelu", "relu", None):
        check(x, b, activation, "cuda")
