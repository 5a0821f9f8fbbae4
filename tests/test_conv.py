"""Fused convolution + batch-norm + activation (+ residual): conv_bn_act, ConvBNAct2d, ConvAct2d and
fused_conv_bn_act against stock PyTorch (F.conv2d -> F.batch_norm -> + residual -> activation).

Every parity check compares against a float64 reference with parity.assert_parity (at most 2x
stock PyTorch's own error in the same dtype, plus a small floor), for the forward output, every
gradient (input, conv weight and bias, batch-norm weight and bias, residual) and the running
statistics, under parity.ran_on(backend) so that the kernels, not the reference, produced them.
On the CPU the Triton kernels run in the interpreter on small awkward shapes; the tests marked
gpu run both kernel backends natively at ResNet/EfficientNet sizes.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastnets
from fastnets import BackendError
from fastnets.functional import conv_bn_act
from fastnets.nn import ConvAct2d, ConvBNAct2d
from fastnets.nn.conv import fused_conv_bn_act
from fastnets.ops import _activation as A
from fastnets.ops import conv as conv_ops
import parity
from parity import (DEVICE, DOT_DTYPES, DTYPES, GPU, KERNEL_BACKENDS, assert_parity, assert_raises_like, rand,
                    ran_on, upcast)

# Stock F.conv2d warns about padding="same" with an even kernel (it pads a copy, as we do).
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    n: int
    cin: int
    hw: tuple
    cout: int
    k: int
    stride: int = 1
    padding: object = 0
    dilation: int = 1
    groups: int = 1
    bias: bool = False
    act: object = "relu"
    residual: bool = False

    @property
    def depthwise(self):
        return self.groups == self.cin and self.groups > 1

    def __str__(self):
        return self.name


# Small and awkward on purpose: odd and prime sizes, channel counts no multiple of any block (16,
# 32, ...), a reduction per tap (C_in/groups) both below 32 (the flattened-K path) and above it.
CASES = [
    Case("stem7x7s2", 2, 3, (13, 11), 5, 7, stride=2, padding=3),
    Case("3x3s1_bias", 2, 5, (9, 7), 7, 3, padding=1, bias=True),
    Case("3x3s2_wide", 1, 37, (7, 9), 17, 3, stride=2, padding=1, act="relu6"),
    Case("1x1_residual", 3, 35, (5, 3), 19, 1, residual=True),
    Case("dw3x3_silu", 2, 19, (9, 7), 19, 3, padding=1, groups=19, act="silu"),
    Case("dw5x5s2_silu_x2", 2, 7, (11, 9), 14, 5, stride=2, padding=2, groups=7, act="silu", residual=True),
    Case("grouped3x3_gelu", 2, 12, (7, 5), 20, 3, padding=1, groups=4, act="gelu", bias=True),
    Case("grouped1x1_wide", 1, 66, (3, 5), 10, 1, groups=2, act="sigmoid", residual=True),
    Case("dilated_none", 2, 4, (11, 11), 6, 3, padding=2, dilation=2, act=None, bias=True),
    Case("same_even_k", 1, 3, (6, 7), 5, 4, padding="same", act="silu"),
    Case("valid_1px", 2, 6, (3, 3), 3, 3, padding="valid", residual=True),
]
BY_NAME = {c.name: c for c in CASES}


def _inputs(case: Case, dtype, layout, mode, device=DEVICE, bn_dtype=torch.float32):
    """x, conv weight and bias, batch-norm tensors (or None), residual (or None), dy."""
    x = rand(case.n, case.cin, *case.hw, dtype=dtype, device=device, layout=layout, requires_grad=True)
    fan_in = case.cin // case.groups * case.k * case.k
    w = rand(case.cout, case.cin // case.groups, case.k, case.k, dtype=dtype, device=device,
             scale=fan_in ** -0.5, requires_grad=True)
    b = rand(case.cout, dtype=dtype, device=device, scale=0.5, requires_grad=True) if case.bias else None
    bn = None
    if mode != "nobn":
        bn = dict(running_mean=rand(case.cout, device=device, scale=0.3).to(bn_dtype),
                  running_var=(torch.rand(case.cout, device=device) + 0.5).to(bn_dtype),
                  bn_weight=(1 + rand(case.cout, device=device, scale=0.3)).to(bn_dtype).requires_grad_(),
                  bn_bias=rand(case.cout, device=device, scale=0.3).to(bn_dtype).requires_grad_())
    out = F.conv2d(x.detach().float(), w.detach().float(), None, case.stride, case.padding, case.dilation, case.groups)
    res = rand(*out.shape, dtype=dtype, device=device, layout=layout, requires_grad=True) if case.residual else None
    dy = rand(*out.shape, dtype=dtype, device=device)
    return x, w, b, bn, res, dy


def _stock(case, x, w, b, bn, res, training, momentum=0.1, eps=1e-5):
    """Stock PyTorch: conv2d -> batch_norm -> + residual -> activation (bn's running stats updated)."""
    y = F.conv2d(x, w, b, case.stride, case.padding, case.dilation, case.groups)
    if bn is not None:
        y = F.batch_norm(y, bn["running_mean"], bn["running_var"], bn["bn_weight"], bn["bn_bias"], training, momentum,
                         eps)
    if res is not None:
        y = y + res
    return A.apply(y, A.code(case.act))


def _clone_bn(bn, dtype=None):
    if bn is None:
        return None
    out = {}
    for k, v in bn.items():
        t = v.detach().clone() if dtype is None else v.detach().to(dtype)
        out[k] = t.requires_grad_(v.requires_grad)
    return out


def _grads(y, dy, tensors):
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(y, wanted, dy))
    return [next(got) if (t is not None and t.requires_grad) else None for t in tensors]


def _check(case, dtype, layout, mode, backend):
    """One parity run: forward, every gradient and the running statistics. In eval mode, first
    the inference path (no gradient: batch-norm folded into the one kernel), then the path with
    gradients for every parameter."""
    training = mode == "train"
    x, w, b, bn, res, dy = _inputs(case, dtype, layout, mode)
    names = ["input", "weight", "bias", "bn_weight", "bn_bias", "residual"]
    kernel = "conv_bn_act.depthwise" if case.depthwise else "conv_bn_act.gemm"
    kw = dict(stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups,
              training=training, activation=case.act, residual=res)

    def leaves(xx, ww, bb, bnn, rr):
        return [xx, ww, bb, bnn and bnn["bn_weight"], bnn and bnn["bn_bias"], rr]

    ref_in = [upcast(t) for t in (x, w, b, res)]
    ref_bn = _clone_bn(bn, torch.float64)
    ref = _stock(case, ref_in[0], ref_in[1], ref_in[2], ref_bn, ref_in[3], training)
    ref_grads = _grads(ref, upcast(dy), leaves(ref_in[0], ref_in[1], ref_in[2], ref_bn, ref_in[3]))
    st_in = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in (x, w, b, res)]
    st_bn = _clone_bn(bn)
    stock = _stock(case, st_in[0], st_in[1], st_in[2], st_bn, st_in[3], training)
    st_grads = _grads(stock, dy, leaves(st_in[0], st_in[1], st_in[2], st_bn, st_in[3]))
    # the memory format F.conv2d gives (either, where sizes of 1 make both formats the same)
    stock_cl = stock.is_contiguous(memory_format=torch.channels_last) and not stock.is_contiguous()
    fmt = torch.channels_last if stock_cl else torch.contiguous_format

    if mode == "eval":  # inference: the fold, one kernel
        with torch.no_grad(), ran_on(backend) as record:
            out = conv_bn_act(x, w, b, **_clone_bn(bn), **kw)
        assert {op for op, _ in record} == {kernel}, record
        assert_parity(out, ref, stock, "inference output")
        assert out.is_contiguous(memory_format=fmt), f"output strides {out.stride()}, stock {stock.stride()}"

    ours_bn = _clone_bn(bn)
    with ran_on(backend) as record:
        out = conv_bn_act(x, w, b, **(ours_bn or {}), **kw)
        grads = _grads(out, dy, leaves(x, w, b, ours_bn, res))
    kinds = {op for op, _ in record}
    assert kernel in kinds, f"{kernel} did not run: {kinds}"
    if training:
        assert "conv_bn_act.stats" in kinds, kinds
    if mode == "nobn" and case.act is not None:
        assert "conv_bn_act.act_grad" in kinds, kinds

    assert_parity(out, ref, stock, "output")
    assert out.is_contiguous(memory_format=fmt), f"output strides {out.stride()}, stock {stock.stride()}"
    for name, g, gr, gs in zip(names, grads, ref_grads, st_grads):
        if gr is None:
            continue
        assert_parity(g.to(gs.dtype), gr, gs, f"grad of {name}")
    if training:
        for key in ("running_mean", "running_var"):
            assert_parity(ours_bn[key], ref_bn[key], st_bn[key], key)
    elif bn is not None:
        for key in ("running_mean", "running_var"):
            assert torch.equal(ours_bn[key], bn[key]), f"{key} changed in eval mode"


def _dtypes(case):
    return DTYPES if case.depthwise else DOT_DTYPES


# ----------------------------------------------------------------------------------------------
# Parity: every case, mode and dtype in the fast layout (channels_last); every layout on a subset.

PARAMS = [pytest.param(c, m, d, id=f"{c.name}-{m}-{str(d)[6:]}")
          for c in CASES for m in ("eval", "train", "nobn") for d in _dtypes(c)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case,mode,dtype", PARAMS)
def test_parity_channels_last(backend, case, mode, dtype):
    if mode == "train" and dtype == torch.bfloat16 and not GPU:
        pytest.skip("the Triton interpreter converts float32 to bfloat16 by truncation, not round-to-nearest: "
                    "the batch statistics of the stored bf16 conv output are biased there; bf16 training runs "
                    "on the GPU")
    _check(case, dtype, "channels_last", mode, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
@pytest.mark.parametrize("mode", ["eval", "train", "nobn"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_parity_layouts(backend, case, mode, layout):
    # NCHW input (output NCHW, as F.conv2d gives) and strided views, every case, float32; float16 for
    # the two kernels' main cases.
    _check(case, torch.float32, layout, mode, backend)
    if case.name in ("3x3s2_wide", "dw5x5s2_silu_x2"):
        _check(case, torch.float16, layout, mode, backend)


# Channel counts that are multiples of 8 but not of 16: Triton's JIT proves 16-byte alignment only
# for multiples of 16, so the launchers pass VEC (and OUT_VEC) and the kernels realign their strides
# (issue 12: both GEMM operands by 128-bit async copies). 40 channels per tap: the tap-by-tap path.
VEC_CASES = [Case("vec3x3_res", 1, 40, (5, 6), 24, 3, padding=1, residual=True),
             Case("vec_dw3x3_res", 1, 24, (5, 6), 24, 3, padding=1, groups=24, residual=True, act="silu")]


def _spy_vec(monkeypatch, depthwise):
    """Records the (VEC, OUT_VEC) the launcher computes."""
    from fastnets.kernels import conv as KC
    from fastnets.kernels import conv_depthwise as KD

    seen = {"VEC": [], "OUT_VEC": []}
    mod = KD if depthwise else KC

    def spy(name, fn):
        def wrapped(*a, **k):
            v = fn(*a, **k)
            seen[name].append(v)
            return v
        return wrapped

    monkeypatch.setattr(mod, "_vec", spy("VEC", mod._vec))
    monkeypatch.setattr(mod, "out_vec", spy("OUT_VEC", mod.out_vec))
    return seen


def _misaligned(t):
    """t's values in an NHWC view whose data starts one element past a 16-byte boundary."""
    n, c, h, w = t.shape
    buf = torch.empty(n * h * w * c + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(n, h, w, c).permute(0, 3, 1, 2)
    view.copy_(t)
    return view


@pytest.mark.parametrize("case", VEC_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_vector_aligned_and_misaligned_paths(case, dtype, monkeypatch):
    # The spy watches the Triton launchers' VEC choice; the CUDA kernels' vector and gather paths
    # have their own GPU tests (test_cuda_async_copy_and_gather_paths_gpu).
    backend = "triton"
    seen = _spy_vec(monkeypatch, case.depthwise)
    want = 16 // torch.tensor([], dtype=dtype).element_size()
    _check(case, dtype, "channels_last", "eval", backend)  # parity on the aligned (VEC) path
    assert set(seen["VEC"]) == {want} and set(seen["OUT_VEC"]) == {want}, seen
    # An OIHW weight with NHWC input: the launcher reads an OHWI copy, still the vector path.
    x, w, _, bn, res, _ = _inputs(case, dtype, "channels_last", "eval")
    kw = dict(padding=case.padding, groups=case.groups, activation=case.act)
    with torch.no_grad(), ran_on(backend):
        seen["VEC"].clear()
        ref = conv_bn_act(x, w.contiguous(), None, **bn, residual=res, **kw)
        assert seen["VEC"] == [want], seen
        # The same values in views that start 2 bytes past alignment: the unaligned path, same result.
        seen["VEC"].clear()
        seen["OUT_VEC"].clear()
        out = conv_bn_act(_misaligned(x), w, None, **bn, residual=_misaligned(res), **kw)
    assert seen["VEC"] == [1] and seen["OUT_VEC"] == [1], seen
    assert torch.equal(out, ref)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DOT_DTYPES, ids=str)
def test_eval_input_and_residual_grads_through_the_fold(backend, dtype):
    # Frozen parameters: the folded single kernel runs with autograd (dx through the folded weight).
    case = BY_NAME["3x3s2_wide"]
    x, w, b, bn, _, dy = _inputs(case, dtype, "channels_last", "eval")
    res = rand(*dy.shape, dtype=dtype, layout="channels_last", requires_grad=True)
    w = w.detach()
    bn = {k: v.detach() for k, v in bn.items()}
    c = dataclasses.replace(case, residual=True)
    kw = dict(stride=case.stride, padding=case.padding, activation=case.act)
    with ran_on(backend) as record:
        out = conv_bn_act(x, w, None, **bn, residual=res, **kw)
        gx, gr = torch.autograd.grad(out, [x, res], dy)
    assert {op for op, _ in record} == {"conv_bn_act.gemm", "conv_bn_act.act_grad"}, record
    x64, r64 = upcast(x), upcast(res)
    ref = _stock(c, x64, w.double(), None, _clone_bn(bn, torch.float64), r64, False)
    rx, rr = torch.autograd.grad(ref, [x64, r64], dy.double())
    xs, rs = x.detach().clone().requires_grad_(), res.detach().clone().requires_grad_()
    stock = _stock(c, xs, w, None, _clone_bn(bn), rs, False)
    sx, sr = torch.autograd.grad(stock, [xs, rs], dy)
    assert_parity(out, ref, stock)
    assert_parity(gx, rx, sx, "grad of input")
    assert_parity(gr, rr, sr, "grad of residual")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DOT_DTYPES, ids=str)
@pytest.mark.parametrize("depthwise", [False, True], ids=["gemm", "depthwise"])
def test_batch_statistics_are_stable_with_a_large_mean(backend, dtype, depthwise):
    # Conv outputs around 1000 with unit spread: E[x^2] - E[x]^2 in float32 would lose the variance;
    # the per-tile mean/M2 merged by Chan's formula must not. 1458 rows: several finalize blocks.
    groups = 5 if depthwise else 1
    x = rand(2, 5, 27, 27, dtype=dtype, layout="channels_last")
    w = (1 + rand(5, 5 // groups, 1, 1, scale=0.2)).to(dtype)  # outputs of unit spread ...
    b = (1000 + rand(5)).to(dtype)                             # ... around 1000
    with ran_on(backend, "conv_bn_act") as record:
        z, mean, var = conv_ops.ops["conv_stats"][backend](x, w, b, [1, 1], [0, 0], [1, 1], groups, True)
    assert ("conv_bn_act.stats", backend) in record
    z64 = F.conv2d(x.double(), w.double(), b.double(), groups=groups)
    ref_var, ref_mean = torch.var_mean(z64, dim=(0, 2, 3), unbiased=False)
    st_var, st_mean = torch.var_mean(F.conv2d(x, w, b, groups=groups).float(), dim=(0, 2, 3), unbiased=False)
    assert_parity(z, z64, F.conv2d(x, w, b, groups=groups), "z")
    assert_parity(mean, ref_mean, st_mean, "mean")
    assert_parity(var, ref_var, st_var, "var")
    if dtype == torch.float32:  # (fp16 outputs near 1000 are 0.5 apart: their own spread is what they keep)
        assert ((var - ref_var).abs() / ref_var).max().item() < 1e-3


def _autocast_check(backend, device, amp_dtype, modes):
    conv, bn = _stock_pair(cin=4, cout=6, padding=1, bias=True)
    conv, bn = conv.to(device), bn.to(device)
    m = ConvBNAct2d.from_modules(conv, bn, activation="relu")
    c64, b64 = _double(conv, bn)
    x = rand(2, 4, 7, 7, device=device)
    for mode in modes:
        m.train(mode == "train"), bn.train(mode == "train"), b64.train(mode == "train")
        stock_bn = copy.deepcopy(bn)
        with torch.autocast(device, dtype=amp_dtype), torch.no_grad():
            with ran_on(backend, "conv_bn_act"):
                y = m(x)
            stock = F.relu(stock_bn(conv(x)))
        assert y.dtype == stock.dtype == amp_dtype
        with torch.no_grad():
            assert_parity(y, F.relu(b64(c64(x.double()))), stock)
            assert_parity(bn.running_mean, b64.running_mean, stock_bn.running_mean, "running_mean")


def test_autocast_reference():
    # Under torch.autocast the convolution runs in the autocast dtype, as F.conv2d does there.
    _autocast_check("torch", "cpu", torch.bfloat16, ["eval", "train"])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_autocast_kernels(backend):
    _autocast_check(backend, "cuda", torch.float16, ["eval", "train"])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_channels_last_weight_gives_channels_last_output(backend):
    # F.conv2d's output is channels_last when its input or its weight is; so is ours.
    x = rand(2, 5, 7, 7)
    w = rand(6, 5, 3, 3, layout="channels_last")
    with ran_on(backend, "conv_bn_act"):
        y = conv_bn_act(x, w, padding=1, activation=None)
    stock = F.conv2d(x, w, padding=1)
    assert y.is_contiguous(memory_format=torch.channels_last) and stock.is_contiguous(memory_format=torch.channels_last)
    assert_parity(y, F.conv2d(x.double(), w.double(), padding=1), stock)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_unbatched_input_and_broadcast_residual(backend):
    x = rand(5, 9, 8)
    w = rand(7, 5, 3, 3, scale=0.2)
    r = rand(7, 1, 1)  # broadcast over the spatial dims, as stock `+` does
    with ran_on(backend, "conv_bn_act"):
        y = conv_bn_act(x, w, stride=2, padding=1, residual=r, activation="relu6")
    stock = F.relu6(F.conv2d(x, w, stride=2, padding=1) + r)
    ref = F.relu6(F.conv2d(x.double(), w.double(), stride=2, padding=1) + r.double())
    assert_parity(y, ref, stock)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
def test_nan_and_inf_propagate_as_torch(backend, mode):
    case = BY_NAME["3x3s1_bias"]
    x, w, b, bn, _, _ = _inputs(case, torch.float32, "channels_last", mode)
    x = x.detach().clone()
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, 5, 0] = float("inf")
    ours_bn, st_bn, ref_bn = _clone_bn(bn), _clone_bn(bn), _clone_bn(bn, torch.float64)
    with torch.no_grad():
        with ran_on(backend, "conv_bn_act"):
            y = conv_bn_act(x, w, b, **ours_bn, padding=1, training=mode == "train", activation=None)
        stock = _stock(dataclasses.replace(case, act=None), x, w, b, st_bn, None, mode == "train")
        ref = _stock(dataclasses.replace(case, act=None), x.double(), w.double(), b.double(), ref_bn, None,
                     mode == "train")
    assert torch.isnan(stock).any()
    assert_parity(y, ref, stock)
    if mode == "train":
        assert torch.equal(torch.isnan(ours_bn["running_mean"]), torch.isnan(st_bn["running_mean"]))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_empty_batch(backend):
    x = rand(0, 4, 7, 7)
    w = rand(6, 4, 3, 3)
    with fastnets.use_backend(backend):
        y = conv_bn_act(x, w, padding=1)
    assert y.shape == F.conv2d(x, w, padding=1).shape


def test_bf16_gemm_in_interpreter_is_refused_not_wrong():
    if GPU:
        pytest.skip("the interpreter's bf16 tl.dot limitation only applies on the CPU")
    x, w = rand(1, 4, 5, 5, dtype=torch.bfloat16), rand(3, 4, 3, 3, dtype=torch.bfloat16)
    with fastnets.use_backend("triton"), pytest.raises(BackendError, match="bfloat16"):
        conv_bn_act(x, w)
    with fastnets.use_backend("auto"):  # auto runs the reference instead on the CPU
        y = conv_bn_act(x, w)
    assert_parity(y, F.relu(F.conv2d(x.double(), w.double())), F.relu(F.conv2d(x, w)))


def test_float64_runs_the_reference_and_kernels_refuse_it():
    x, w = rand(1, 4, 5, 5, dtype=torch.float64), rand(3, 4, 3, 3, dtype=torch.float64)
    with fastnets.use_backend("triton"), pytest.raises(BackendError, match="float64"):
        conv_bn_act(x, w)
    with ran_on("torch", "conv_bn_act"):
        y = conv_bn_act(x, w, activation="gelu")
    torch.testing.assert_close(y, F.gelu(F.conv2d(x, w)))


def test_fold_is_the_eval_batch_norm():
    case = BY_NAME["3x3s1_bias"]
    x, w, b, bn, _, _ = _inputs(case, torch.float64, "contiguous", "eval", bn_dtype=torch.float64)
    wf, bf = conv_ops.fold_batch_norm(w, b, bn["running_mean"], bn["running_var"], bn["bn_weight"], bn["bn_bias"],
                                      1e-5, dtype=torch.float64)
    assert bf.dtype == torch.float64  # float32 for every kernel dtype; float64 keeps float64
    y = F.conv2d(x, wf, bf, padding=1)
    expected = F.batch_norm(F.conv2d(x, w, b, padding=1), bn["running_mean"], bn["running_var"], bn["bn_weight"],
                            bn["bn_bias"], False, 0.0, 1e-5)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    w16 = w.half()
    assert conv_ops.fold_batch_norm(w16, None, bn["running_mean"].float(), bn["running_var"].float(), None, None,
                                    1e-5)[1].dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# Bad input: PyTorch's exception type for the same input.

def _bad(fn_ours, fn_stock, match=None):
    assert_raises_like(fn_ours, fn_stock, match)


def test_bad_input_like_torch():
    x = rand(2, 4, 9, 9)
    w = rand(6, 4, 3, 3)
    c = dict(stride=1, padding=1)
    _bad(lambda: conv_bn_act(x, rand(6, 5, 3, 3)), lambda: F.conv2d(x, rand(6, 5, 3, 3)), "channels")
    _bad(lambda: conv_bn_act(x, rand(5, 2, 3, 3), groups=2), lambda: F.conv2d(x, rand(5, 2, 3, 3), groups=2),
         "divisible")
    _bad(lambda: conv_bn_act(x, rand(6, 2, 3, 3), groups=3), lambda: F.conv2d(x, rand(6, 2, 3, 3), groups=3))
    _bad(lambda: conv_bn_act(x, w, groups=0), lambda: F.conv2d(x, w, groups=0))
    _bad(lambda: conv_bn_act(x, w, stride=0), lambda: F.conv2d(x, w, stride=0), "stride")
    _bad(lambda: conv_bn_act(x, w, padding=-1), lambda: F.conv2d(x, w, padding=-1), "padding")
    _bad(lambda: conv_bn_act(x, w, dilation=0), lambda: F.conv2d(x, w, dilation=0), "dilation")
    _bad(lambda: conv_bn_act(x, w, stride=2, padding="same"), lambda: F.conv2d(x, w, stride=2, padding="same"))
    _bad(lambda: conv_bn_act(x, w, padding="full"), lambda: F.conv2d(x, w, padding="full"), "padding")
    _bad(lambda: conv_bn_act(x, w, padding=(1, 1, 1)), lambda: F.conv2d(x, w, padding=(1, 1, 1)))
    _bad(lambda: conv_bn_act(x, rand(6, 4, 11, 11)), lambda: F.conv2d(x, rand(6, 4, 11, 11)), "Kernel size")
    _bad(lambda: conv_bn_act(rand(9, 9), w), lambda: F.conv2d(rand(9, 9), w), "3D")
    _bad(lambda: conv_bn_act(rand(1, 2, 4, 9, 9), w), lambda: F.conv2d(rand(1, 2, 4, 9, 9), w))
    _bad(lambda: conv_bn_act(x, w, rand(5)), lambda: F.conv2d(x, w, rand(5)), "bias")
    _bad(lambda: conv_bn_act(x.half(), w), lambda: F.conv2d(x.half(), w), "type")
    # batch-norm tensors of the wrong length
    y = F.conv2d(x, w, **c)
    for key, pos in (("running_mean", 1), ("running_var", 2), ("bn_weight", 3), ("bn_bias", 4)):
        bn = dict(running_mean=torch.zeros(6), running_var=torch.ones(6), bn_weight=torch.ones(6),
                  bn_bias=torch.zeros(6))
        bn[key] = torch.ones(5)
        args = [y, bn["running_mean"], bn["running_var"], bn["bn_weight"], bn["bn_bias"]]
        _bad(lambda: conv_bn_act(x, w, **bn, **c), lambda: F.batch_norm(*args), "5")
    _bad(lambda: conv_bn_act(x, w, bn_weight=torch.ones(6), **c), lambda: F.batch_norm(y, None, None, torch.ones(6)),
         "running_mean")
    one = rand(1, 4, 3, 3)
    _bad(lambda: conv_bn_act(one, w, None, torch.zeros(6), torch.ones(6), training=True),
         lambda: F.batch_norm(F.conv2d(one, w), torch.zeros(6), torch.ones(6), training=True), "more than 1 value")
    # a residual of the wrong shape
    r = rand(2, 6, 9, 8)
    _bad(lambda: conv_bn_act(x, w, residual=r, **c), lambda: F.relu(y + r), "residual")


def test_bad_input_without_torch_counterpart():
    x, w = rand(2, 4, 9, 9), rand(6, 4, 3, 3)
    with pytest.raises(ValueError, match="activation must be one of"):
        conv_bn_act(x, w, activation="tanhh")
    with pytest.raises(ValueError, match="activation must be one of"):
        ConvBNAct2d(4, 6, 3, activation="swishh")
    with pytest.raises(RuntimeError, match="residual must have the output's dtype"):
        conv_bn_act(x, w, padding=1, residual=rand(2, 6, 9, 9).half())
    with pytest.raises(RuntimeError, match="broadcast"):
        conv_bn_act(x, w, padding=1, residual=rand(3, 2, 6, 9, 9))
    with pytest.raises(TypeError, match="groups"):
        conv_bn_act(x, w, groups=1.0)
    with pytest.raises(TypeError, match="bn"):
        fused_conv_bn_act(x, nn.Conv2d(4, 6, 3), nn.LayerNorm(6))


# ----------------------------------------------------------------------------------------------
# Modules.

def _stock_pair(cin=5, cout=7, k=3, **kw):
    conv = nn.Conv2d(cin, cout, k, bias=kw.pop("bias", False), **kw)
    bn = nn.BatchNorm2d(cout)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.normal_(1, 0.3)
        bn.bias.normal_(0, 0.3)
    return conv, bn


def test_convbnact_state_dict_is_the_stock_sequence_both_ways():
    m = ConvBNAct2d(5, 7, 3, stride=2, padding=1, bias=True, activation="silu")
    stock = nn.Sequential(nn.Conv2d(5, 7, 3, 2, 1, bias=True), nn.BatchNorm2d(7))
    assert list(m.state_dict()) == list(stock.state_dict())
    for k in m.state_dict():
        assert m.state_dict()[k].shape == stock.state_dict()[k].shape
    stock.load_state_dict(m.state_dict())
    m.load_state_dict(stock.state_dict())
    assert isinstance(m[0], nn.Conv2d) and isinstance(m[1], nn.BatchNorm2d)
    assert "silu" in repr(m)
    c = ConvAct2d(5, 7, 3, padding=1, activation="gelu")
    assert list(c.state_dict()) == list(nn.Conv2d(5, 7, 3).state_dict())


def _double(*modules):
    return [copy.deepcopy(m).double() for m in modules]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_convbnact_eval_folds_once_and_refolds_on_change(backend):
    m = ConvBNAct2d(5, 7, 3, padding=1, activation="relu6")
    with torch.no_grad():
        m[1].running_mean.normal_(0, 0.3)
        m[1].weight.normal_(1, 0.3)
    m.eval()
    x = rand(2, 5, 9, 7, layout="channels_last")

    def check():
        with torch.no_grad():
            with ran_on(backend, "conv_bn_act"):
                y = m(x)
            stock = F.relu6(m[1](m[0](x)))
            c64, b64 = _double(m[0], m[1])
            ref = F.relu6(b64(c64(x.double())))
        assert_parity(y, ref, stock)

    check()
    entry = m[0].__dict__["_fastnets_folded"]
    check()
    assert m[0].__dict__["_fastnets_folded"] is entry, "the fold was recomputed without a change"
    with torch.no_grad():
        m[1].running_var.mul_(2.0)  # an in-place buffer change
    check()
    assert m[0].__dict__["_fastnets_folded"] is not entry
    entry = m[0].__dict__["_fastnets_folded"]
    other = ConvBNAct2d(5, 7, 3, padding=1)
    with torch.no_grad():
        other[1].running_mean.normal_()
    m.load_state_dict(other.state_dict())  # a state_dict load (in-place copies)
    check()
    assert m[0].__dict__["_fastnets_folded"] is not entry
    # a training step drops the fold; back in eval mode it is rebuilt from the new statistics
    with torch.no_grad(), fastnets.use_backend(backend):
        m.train()(x)
    assert "_fastnets_folded" not in m[0].__dict__
    m.eval()
    check()
    # the cache is a plain attribute: state_dict is unchanged
    assert list(m.state_dict()) == list(nn.Sequential(nn.Conv2d(5, 7, 3, bias=False), nn.BatchNorm2d(7)).state_dict())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_modules_built_in_inference_mode(backend):
    # Inference tensors have no version counter: the fold is recomputed (never a stale cache).
    with torch.inference_mode():
        m = ConvBNAct2d(3, 5, 3, padding=1, activation="gelu").eval()
        m[1].running_mean.normal_(0, 0.3)
        x = rand(2, 3, 6, 5, layout="channels_last")
        with ran_on(backend, "conv_bn_act"):
            y = m(x)
        assert "_fastnets_folded" not in m[0].__dict__
        m[1].running_var.mul_(3.0)
        with ran_on(backend, "conv_bn_act"):
            y2 = m(x)
        stock = F.gelu(m[1](m[0](x)))
        c64, b64 = _double(m[0], m[1])
        assert_parity(y2, F.gelu(b64(c64(x.double()))), stock)
        assert not torch.equal(y, y2)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_eval_with_grad_reaches_every_parameter(backend):
    conv, bn = _stock_pair(bias=True, padding=1)
    m = ConvBNAct2d.from_modules(conv, bn, activation="silu").eval()
    assert m[0] is conv and m[1] is bn
    x = rand(2, 5, 7, 6, requires_grad=True)
    dy = rand(2, 7, 7, 6)
    params = [x, conv.weight, conv.bias, bn.weight, bn.bias]
    with ran_on(backend):
        y = m(x)
        got = torch.autograd.grad(y, params, dy)
    assert "_fastnets_folded" not in conv.__dict__, "a fold that needs gradients must not be cached"
    stock = F.silu(bn(conv(x)))
    expected = torch.autograd.grad(stock, params, dy)
    c64, b64 = _double(conv, bn)
    x64 = x.detach().double().requires_grad_()
    ref = F.silu(b64(c64(x64)))
    ref_grads = torch.autograd.grad(ref, [x64, c64.weight, c64.bias, b64.weight, b64.bias], dy.double())
    assert_parity(y, ref, stock)
    for name, g, gr, gs in zip(["input", "weight", "bias", "bn_weight", "bn_bias"], got, ref_grads, expected):
        assert_parity(g, gr, gs, f"grad of {name}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_convbnact_training_updates_running_stats_like_stock(backend, momentum):
    conv, bn = _stock_pair(cin=6, cout=11, k=3, stride=2, padding=1)
    bn.momentum = momentum
    m = ConvBNAct2d.from_modules(conv, bn, activation="relu").train()
    stock_conv, stock_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    ref_conv, ref_bn = _double(conv, bn)
    for step in range(2):
        x = rand(3, 6, 9, 9, layout="channels_last")
        res = rand(3, 11, 5, 5, layout="channels_last")
        with ran_on(backend, "conv_bn_act"):
            y = m(x, res)
        stock = F.relu(stock_bn(stock_conv(x)) + res)
        ref = F.relu(ref_bn(ref_conv(x.double())) + res.double())
        assert_parity(y, ref, stock)
        assert m[1].num_batches_tracked.item() == stock_bn.num_batches_tracked.item() == step + 1
        assert_parity(m[1].running_mean, ref_bn.running_mean, stock_bn.running_mean, "running_mean")
        assert_parity(m[1].running_var, ref_bn.running_var, stock_bn.running_var, "running_var")
    # train -> eval: the fold with the updated statistics
    m.eval(), stock_bn.eval(), ref_bn.eval()
    x = rand(2, 6, 9, 9)
    with torch.no_grad():
        with ran_on(backend, "conv_bn_act"):
            y = m(x)
        assert_parity(y, F.relu(ref_bn(ref_conv(x.double()))), F.relu(stock_bn(stock_conv(x))))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_pair_without_running_stats_or_affine(backend):
    conv = nn.Conv2d(4, 5, 3, padding=1)
    bn = nn.BatchNorm2d(5, affine=False, track_running_stats=False).eval()  # batch stats even in eval
    x = rand(2, 4, 7, 7)
    with torch.no_grad():
        with ran_on(backend, "conv_bn_act"):
            y = fused_conv_bn_act(x, conv, bn, activation="gelu")
        c64, b64 = _double(conv, bn)
        assert_parity(y, F.gelu(b64(c64(x.double()))), F.gelu(bn(conv(x))))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_convact_padding_modes_and_from_conv(backend):
    conv = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", bias=True)
    m = ConvAct2d.from_conv(conv, activation="sigmoid")
    assert m.weight is conv.weight and m.bias is conv.bias
    x = rand(2, 4, 6, 5, requires_grad=True)
    dy = rand(2, 6, 6, 5)
    with ran_on(backend, "conv_bn_act"):
        y = m(x)
        (gx,) = torch.autograd.grad(y, [x], dy)
    stock = torch.sigmoid(conv(x))
    (sx,) = torch.autograd.grad(stock, [x], dy)
    (c64,) = _double(conv)
    x64 = x.detach().double().requires_grad_()
    ref = torch.sigmoid(c64(x64))
    (rx,) = torch.autograd.grad(ref, [x64], dy.double())
    assert_parity(y, ref, stock)
    assert_parity(gx, rx, sx, "grad of input")
    z = ConvAct2d(4, 6, (3, 1), stride=(2, 1), padding=(1, 0), activation=None)
    r = rand(2, 6, 3, 5)
    with torch.no_grad():
        with ran_on(backend, "conv_bn_act"):
            y = z(x, r)
        (z64,) = _double(z)
        assert_parity(y, z64(x.double()) + r.double(), z(x) + r)


# ----------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile through the reference registrations on the CPU, through
# the kernels' on a GPU (the interpreter cannot run fake tensors).

def _op_samples(device, dtype=torch.float32):
    x, w, b = rand(2, 4, 7, 7, device=device, dtype=dtype, requires_grad=True), \
        rand(6, 4, 3, 3, device=device, dtype=dtype, requires_grad=True), rand(6, device=device, requires_grad=True)
    r = rand(2, 6, 4, 4, device=device, dtype=dtype, requires_grad=True)
    return [
        ("conv_bias_act", (x, w, b, r, [2, 2], [1, 1], [1, 1], 1, 3, True, True)),
        ("conv_bias_act", (x, w, None, None, [1, 1], [0, 0], [1, 1], 1, 1, False, False)),
        ("conv_stats", (x, w, b, [1, 1], [1, 1], [1, 1], 1, False)),
        ("conv_act_grad", (rand(2, 6, 5, 5, device=device, dtype=dtype), rand(2, 6, 5, 5, device=device, dtype=dtype),
                           4)),
    ]


def test_opcheck_reference_registrations():
    for name, args in _op_samples("cpu"):
        torch.library.opcheck(conv_ops.ops[name]["torch"], args)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck_kernel_registrations(backend):
    for name, args in _op_samples("cuda", torch.float16):
        torch.library.opcheck(conv_ops.ops[name][backend], args)


def _compile_check(backend, device, compile_backend):
    """The compiled module (fullgraph: no graph break) against eager, by the parity rule (the
    compiler may pick other kernel configurations: same error budget, not the same bits)."""
    x = rand(2, 4, 7, 7, device=device, requires_grad=True)
    r = rand(2, 6, 7, 7, device=device)
    dy = rand(2, 6, 7, 7, device=device)
    with fastnets.use_backend(backend):
        # conv + activation with autograd (ConvAct2d)
        m = ConvAct2d(4, 6, 3, padding=1, activation="silu", device=device)
        eager = m(x, r)
        compiled = torch.compile(lambda a, b: m(a, b), fullgraph=True, backend=compile_backend)(x, r)
        (g_eager,) = torch.autograd.grad(eager, [x], dy)
        (g_comp,) = torch.autograd.grad(compiled, [x], dy)
        (m64,) = _double(m)
        x64 = x.detach().double().requires_grad_()
        ref = F.silu(F.conv2d(x64, m64.weight, m64.bias, padding=1) + r.double())
        (g_ref,) = torch.autograd.grad(ref, [x64], dy.double())
        assert_parity(compiled, ref, eager, "compiled output")
        assert_parity(g_comp, g_ref, g_eager, "compiled grad of input")
        # the folded conv-bn-act for inference
        mb = ConvBNAct2d(4, 6, 3, padding=1, activation="relu", device=device).eval()
        with torch.no_grad():
            mb[1].running_mean.normal_(0, 0.3)
            eager = mb(x, r)
            compiled = torch.compile(lambda a, b: mb(a, b), fullgraph=True, backend=compile_backend)(x, r)
            c64, b64 = _double(mb[0], mb[1])
            assert_parity(compiled, F.relu(b64(c64(x.double())) + r.double()), eager, "compiled inference")
        # training with batch statistics, and its backward
        mb.train()
        compiled = torch.compile(lambda a, b: mb(a, b), fullgraph=True, backend=compile_backend)(x, r)
        compiled.backward(dy)
        assert mb[0].weight.grad is not None and mb[1].weight.grad is not None
        assert int(mb[1].num_batches_tracked) == 1


def test_compile_fullgraph_reference():
    _compile_check("torch", "cpu", "aot_eager")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compile_fullgraph_kernels(backend):
    _compile_check(backend, "cuda", "inductor")


# ----------------------------------------------------------------------------------------------
# GPU: both kernel backends natively, at the family's real sizes.

GPU_CASES = [
    Case("resnet_stem", 8, 3, (224, 224), 64, 7, stride=2, padding=3),
    Case("resnet_3x3", 16, 64, (56, 56), 64, 3, padding=1),
    Case("resnet_3x3s2", 16, 128, (56, 56), 128, 3, stride=2, padding=1),
    Case("resnet_1x1_res", 16, 64, (56, 56), 256, 1, residual=True),
    Case("resnet_1x1_odd", 8, 1024, (13, 13), 251, 1, bias=True, act="gelu"),
    Case("effnet_dw3x3", 16, 96, (112, 112), 96, 3, stride=2, padding=1, groups=96, act="silu"),
    Case("effnet_dw5x5", 16, 240, (28, 28), 240, 5, padding=2, groups=240, act="silu", residual=True),
    Case("resnext_grouped", 8, 256, (28, 28), 256, 3, padding=1, groups=32, act="relu6"),
    Case("alexnet_11x11", 8, 3, (227, 227), 64, 11, stride=4, padding=2, bias=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["eval", "train", "nobn"])
@pytest.mark.parametrize("dtype", DOT_DTYPES, ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_parity(backend, case, mode, dtype):
    _check(case, dtype, "channels_last", mode, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
def test_gpu_layouts(backend, layout):
    _check(GPU_CASES[2], torch.float16, layout, "train", backend)
    _check(GPU_CASES[5], torch.bfloat16, layout, "eval", backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_tf32_follows_torch(backend):
    # fp32 convolutions use TF32 only when torch allows it for convolutions (cudnn.allow_tf32).
    case = GPU_CASES[1]
    previous = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False
        _check(case, torch.float32, "channels_last", "eval", backend)
    finally:
        torch.backends.cudnn.allow_tf32 = previous


# ----------------------------------------------------------------------------------------------
# GPU: the CUDA implicit GEMM's fast path (csrc/conv.cu conv_gemm_async_kernel: 16-bit types,
# channels_last input and OHWI weight, Cg and strides multiples of 8, aligned pointers; both
# operands by 16-byte cp.async copies, double-buffered) and the gather path it falls back to (Cg
# not a multiple of 8, NCHW input, a misaligned input). Tiles: M and Kg not multiples of 64, K not
# a multiple of 32, K below one tile, groups, dilation.
ASYNC_CASES = [Case("async3x3s2_res", 3, 48, (13, 11), 72, 3, stride=2, padding=1, bias=True, residual=True),
               Case("async_grouped_dil", 2, 32, (9, 7), 48, 3, padding=2, dilation=2, groups=2, act="silu"),
               Case("async1x1_gelu", 2, 24, (5, 5), 40, 1, act="gelu"),
               Case("gather_cg12", 2, 12, (7, 6), 16, 3, padding=1, residual=True)]


def _check_cuda_paths(case, dtype):
    """The CUDA backend on one case: channels_last in eval, train and without batch-norm, and NCHW."""
    if "cuda" not in KERNEL_BACKENDS:
        pytest.skip("fastnets._C sees no device")
    for mode in ("eval", "train", "nobn"):
        _check(case, dtype, "channels_last", mode, "cuda")
    _check(case, dtype, "contiguous", "nobn", "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ASYNC_CASES, ids=str)
def test_cuda_async_copy_and_gather_paths_gpu(case, dtype):
    _check_cuda_paths(case, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_misaligned_input_takes_the_gather_path_gpu(dtype):
    if "cuda" not in KERNEL_BACKENDS:
        pytest.skip("fastnets._C sees no device")
    case = ASYNC_CASES[0]
    x, w, b, _, res, _ = _inputs(case, dtype, "channels_last", "nobn")
    x, res = parity.misaligned(x), parity.misaligned(res)
    kw = dict(stride=case.stride, padding=case.padding, groups=case.groups, activation=case.act)
    with torch.no_grad():
        with ran_on("cuda", "conv_bn_act"):
            out = conv_bn_act(x, w, b, residual=res, **kw)
        ref = F.relu(F.conv2d(upcast(x), upcast(w), upcast(b), case.stride, case.padding) + upcast(res))
        stock = F.relu(F.conv2d(x, w, b, case.stride, case.padding) + res)
    assert_parity(out, ref, stock)


# The fast path's residual tile, staged in shared memory after the main loop: by 16-byte copies
# (channels_last residual, Kg a multiple of 8; grouped, so each group's channel offset is used) or
# element by element (Kg not a multiple of 8, an NCHW residual, a misaligned residual), the input
# itself always on the fast path (channels_last, Cg a multiple of 8, aligned). Bias included.
RES_STAGING = [("vec_grouped_kg24", Case("g2_kg24", 2, 32, (9, 7), 48, 3, padding=1, groups=2, bias=True,
                                         residual=True), "keep"),
               ("elem_kg18", Case("g2_kg18", 2, 32, (9, 7), 36, 3, padding=1, groups=2, bias=True, residual=True),
                "keep"),
               ("elem_nchw_residual", ASYNC_CASES[0], "nchw"),
               ("elem_misaligned_residual", ASYNC_CASES[0], "misaligned")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,case,res_form", RES_STAGING, ids=[r[0] for r in RES_STAGING])
def test_cuda_async_residual_staging_gpu(name, case, res_form, dtype):
    if "cuda" not in KERNEL_BACKENDS:
        pytest.skip("fastnets._C sees no device")
    x, w, b, _, res, _ = _inputs(case, dtype, "channels_last", "nobn")
    x, w, b, res = x.detach(), w.detach(), b.detach(), res.detach()
    res = {"keep": res, "nchw": res.contiguous(), "misaligned": parity.misaligned(res)}[res_form]
    kw = dict(stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups)
    with torch.no_grad():
        with ran_on("cuda", "conv_bn_act"):
            out = conv_bn_act(x, w, b, residual=res, activation=case.act, **kw)
        ref = F.relu(F.conv2d(upcast(x), upcast(w), upcast(b), **kw) + upcast(res))
        stock = F.relu(F.conv2d(x, w, b, **kw) + res)
    assert_parity(out, ref, stock)



# ----------------------------------------------------------------------------------------------
# GPU: the CUDA depthwise kernel's 128-bit path (csrc/conv.cu conv_depthwise_vec_kernel: one input
# channel per output channel, channels contiguous in every tensor, the weight as the launcher's
# [KH, KW, C] copy, C a multiple of 8 (16-bit) or 4 (fp32), aligned pointers; 8 or 4 channels per
# thread) and the scalar kernel it falls back to (C = 20 for 16-bit dtypes, a channel multiplier of
# 2, NCHW, a misaligned input); the activation gradient's 128-bit kernel with its scalar tail
# (1 x 20 x 7 x 5 = 700 elements: 4 past the last 16-bit vector) and its misaligned fallback.
DW_VEC_CASES = [Case("dwvec3x3s2_bias_res", 3, 40, (13, 11), 40, 3, stride=2, padding=1, groups=40, bias=True,
                     act="silu", residual=True),
                Case("dwvec5x5_dil_2blocks", 2, 72, (9, 10), 72, 5, padding=4, dilation=2, groups=72, act="relu6"),
                Case("dw_c20_tail", 1, 20, (7, 5), 20, 3, padding=1, groups=20, act="gelu", residual=True),
                Case("dw_mult2", 2, 16, (7, 6), 32, 3, padding=1, groups=16, bias=True)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", DW_VEC_CASES, ids=str)
def test_cuda_depthwise_vector_and_scalar_paths_gpu(case, dtype):
    _check_cuda_paths(case, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_depthwise_and_act_grad_misaligned_take_the_scalar_kernels_gpu(dtype):
    if "cuda" not in KERNEL_BACKENDS:
        pytest.skip("fastnets._C sees no device")
    case = DW_VEC_CASES[0]
    x, w, b, _, res, dy = _inputs(case, dtype, "channels_last", "nobn")
    kw = dict(stride=case.stride, padding=case.padding, groups=case.groups, activation=case.act)
    xm, resm = parity.misaligned(x), parity.misaligned(res)
    with ran_on("cuda", "conv_bn_act"):
        out = conv_bn_act(xm, w, b, residual=resm, **kw)
        gx, gr = torch.autograd.grad(out, [xm, resm], parity.misaligned(dy))
    x64, r64 = upcast(x), upcast(res)
    ref = A.apply(F.conv2d(x64, upcast(w), upcast(b), case.stride, case.padding, groups=case.groups) + r64,
                  A.code(case.act))
    rx, rr = torch.autograd.grad(ref, [x64, r64], dy.double())
    xs, rs = x.detach().clone().requires_grad_(), res.detach().clone().requires_grad_()
    stock = A.apply(F.conv2d(xs, w, b, case.stride, case.padding, groups=case.groups) + rs, A.code(case.act))
    sx, sr = torch.autograd.grad(stock, [xs, rs], dy)
    assert_parity(out, ref, stock)
    assert_parity(gx, rx, sx, "grad of input")
    assert_parity(gr, rr, sr, "grad of residual")
