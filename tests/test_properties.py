"""Property tests (issue 7, item 4): hypothesis draws shapes and arguments that torch accepts for
each op, and the kernel (the Triton interpreter on the CPU) must match the stock op under the
project's tolerance rule (parity.assert_parity: at most 2x stock PyTorch's float32 error against a
float64 reference, plus a small floor), forward and the input gradient, with parity.ran_on proving
the kernel ran. Examples are tiny and few (the interpreter is slow) and derandomized, so that CI
draws the same ones every run; the family test files hold the hand-picked shapes.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastnets import functional as FF
from parity import DEVICE, KERNEL_BACKENDS, assert_parity, ran_on, to_layout

pytestmark = pytest.mark.skipif(not KERNEL_BACKENDS, reason="no kernel backend here")

BACKEND = KERNEL_BACKENDS[0] if KERNEL_BACKENDS else "torch"
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ACTS = ["relu", "relu6", "silu", "gelu", "sigmoid", None]


def _rand(shape, seed, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    return to_layout(torch.randn(*shape, generator=g).to(DEVICE), layout)


def _check(ours, stock, tensors, grad_of=(0,), trace=None):
    """ours(*tensors) against stock(*tensors): forward and the gradients of tensors[grad_of]."""
    def run(fn, ts):
        leaves = [t.detach().clone().requires_grad_(i in grad_of) for i, t in enumerate(ts)]
        out = fn(*leaves)
        g = _rand(out.shape, seed=99).to(out.dtype)
        out.backward(g)
        return out.detach(), [leaves[i].grad for i in grad_of]

    ref, ref_grads = run(stock, [t.double() for t in tensors])
    st32, st_grads = run(stock, tensors)
    with ran_on(BACKEND, trace):
        out, grads = run(ours, tensors)
    assert_parity(out, ref, st32, "output")
    for i, (g, r, s) in enumerate(zip(grads, ref_grads, st_grads)):
        assert_parity(g, r, s, f"gradient of input {grad_of[i]}")


def _layouts():
    return st.sampled_from(["contiguous", "channels_last", "noncontiguous"])


@SETTINGS
@given(st.data())
def test_max_and_avg_pool2d(data):
    k = data.draw(st.tuples(st.integers(1, 4), st.integers(1, 4)), label="kernel")
    s = data.draw(st.tuples(st.integers(1, 3), st.integers(1, 3)), label="stride")
    p = data.draw(st.tuples(st.integers(0, k[0] // 2), st.integers(0, k[1] // 2)), label="padding")
    ceil = data.draw(st.booleans(), label="ceil_mode")
    is_max = data.draw(st.booleans(), label="max")
    d = data.draw(st.tuples(st.integers(1, 2), st.integers(1, 2)), label="dilation") if is_max else (1, 1)
    eff = [d[i] * (k[i] - 1) + 1 for i in range(2)]
    h = data.draw(st.integers(max(1, eff[0] - 2 * p[0]), 11), label="H")
    w = data.draw(st.integers(max(1, eff[1] - 2 * p[1]), 11), label="W")
    x = _rand((data.draw(st.integers(1, 2)), data.draw(st.integers(1, 5)), h, w), 0, data.draw(_layouts()))
    if is_max:
        def fn(m):
            return lambda t: m.max_pool2d(t, k, s, p, d, ceil_mode=ceil)
        _check(fn(FF), fn(F), [x], trace="max_pool2d")
    else:
        cip = data.draw(st.booleans(), label="count_include_pad")
        div = data.draw(st.sampled_from([None, 1, 3]), label="divisor_override")

        def fn(m):
            return lambda t: m.avg_pool2d(t, k, s, p, ceil, cip, div)
        _check(fn(FF), fn(F), [x], trace="avg_pool2d")


@SETTINGS
@given(st.data())
def test_adaptive_pools(data):
    h, w = data.draw(st.integers(1, 12), label="H"), data.draw(st.integers(1, 12), label="W")
    out = (data.draw(st.integers(1, 7), label="OH"), data.draw(st.integers(1, 7), label="OW"))
    x = _rand((data.draw(st.integers(1, 2)), data.draw(st.integers(1, 5)), h, w), 1, data.draw(_layouts()))
    name = data.draw(st.sampled_from(["adaptive_avg_pool2d", "adaptive_max_pool2d"]), label="op")
    _check(lambda t: getattr(FF, name)(t, out), lambda t: getattr(F, name)(t, out), [x], trace=name)


@SETTINGS
@given(st.data())
def test_local_response_norm(data):
    rank = data.draw(st.integers(3, 5), label="rank")
    shape = [data.draw(st.integers(1, 3)), data.draw(st.integers(1, 9))] + \
        [data.draw(st.integers(1, 6)) for _ in range(rank - 2)]
    size = data.draw(st.integers(1, 7), label="size")
    alpha = data.draw(st.sampled_from([1e-4, 1e-2, 0.5]), label="alpha")
    beta = data.draw(st.sampled_from([0.0, 0.5, 0.75, 1.0, 2.0]), label="beta")
    k = data.draw(st.sampled_from([0.5, 1.0, 2.0]), label="k")
    x = _rand(shape, 2, data.draw(_layouts()) if rank == 4 else "noncontiguous")
    _check(lambda t: FF.local_response_norm(t, size, alpha, beta, k),
           lambda t: F.local_response_norm(t, size, alpha, beta, k), [x], trace="lrn")


@SETTINGS
@given(st.data())
def test_conv_bn_act(data):
    groups = data.draw(st.sampled_from([1, 2, 3]), label="groups")
    cin = groups * data.draw(st.integers(1, 3), label="cin/groups")
    cout = groups * data.draw(st.integers(1, 3), label="cout/groups")
    if data.draw(st.booleans(), label="depthwise"):
        groups, cin = 3, 3
        cout = 3 * data.draw(st.integers(1, 2), label="multiplier")
    kh, kw = data.draw(st.integers(1, 3), label="KH"), data.draw(st.integers(1, 3), label="KW")
    stride, dil = data.draw(st.integers(1, 2), label="stride"), data.draw(st.integers(1, 2), label="dilation")
    pad = data.draw(st.integers(0, 2), label="padding")
    h = data.draw(st.integers(max(1, dil * (kh - 1) + 1 - 2 * pad), 8), label="H")
    w = data.draw(st.integers(max(1, dil * (kw - 1) + 1 - 2 * pad), 8), label="W")
    act = data.draw(st.sampled_from(ACTS), label="activation")
    training = data.draw(st.booleans(), label="training")
    n = data.draw(st.integers(1 if not training else 2, 2), label="N")
    x = _rand((n, cin, h, w), 3, data.draw(_layouts()))
    wt = _rand((cout, cin // groups, kh, kw), 4) * 0.5
    rm, rv = _rand((cout,), 5) * 0.1, _rand((cout,), 6).abs() + 0.5
    bw, bb = _rand((cout,), 7) + 1, _rand((cout,), 8)

    def ours(t, wt):
        return FF.conv_bn_act(t, wt, None, rm.clone(), rv.clone(), bw, bb, stride=stride, padding=pad, dilation=dil,
                              groups=groups, training=training, activation=act)

    def stock(t, wt):
        y = F.conv2d(t, wt, None, stride, pad, dil, groups)
        y = F.batch_norm(y, rm.to(y.dtype).clone(), rv.to(y.dtype).clone(), bw.to(y.dtype), bb.to(y.dtype), training)
        return {None: lambda v: v, "relu": F.relu, "relu6": F.relu6, "silu": F.silu, "gelu": F.gelu,
                "sigmoid": torch.sigmoid}[act](y)

    _check(ours, stock, [x, wt], grad_of=(0, 1))


@SETTINGS
@given(st.data())
def test_batch_norm_act(data):
    rank = data.draw(st.integers(2, 5), label="rank")
    shape = [data.draw(st.integers(2, 3)), data.draw(st.integers(1, 6))] + \
        [data.draw(st.integers(1, 5)) for _ in range(rank - 2)]
    training, act = data.draw(st.booleans(), label="training"), data.draw(st.sampled_from(ACTS), label="act")
    C = shape[1]
    rm, rv, wb = _rand((C,), 1) * 0.1, _rand((C,), 2).abs() + 0.5, _rand((C,), 3) + 1
    x = _rand(shape, 4, data.draw(_layouts()) if rank == 4 else "contiguous")
    r = _rand(shape, 5)
    acts = {None: lambda v: v, "relu": F.relu, "relu6": F.relu6, "silu": F.silu, "gelu": F.gelu,
            "sigmoid": torch.sigmoid}

    def ours(t, r):
        return FF.batch_norm_act(t, rm.clone(), rv.clone(), wb, None, training, activation=act, residual=r)

    def stock(t, r):
        y = F.batch_norm(t, rm.to(t.dtype).clone(), rv.to(t.dtype).clone(), wb.to(t.dtype), None, training)
        return acts[act](y + r)

    _check(ours, stock, [x, r], grad_of=(0, 1), trace="norm_act")


@SETTINGS
@given(st.data())
def test_layer_norm_and_bias_act(data):
    lead = [data.draw(st.integers(1, 4)) for _ in range(data.draw(st.integers(1, 2), label="leading dims"))]
    N = data.draw(st.integers(1, 70), label="N")
    x = _rand((*lead, N), 6)
    if data.draw(st.booleans(), label="layer_norm"):
        w, b, r = _rand((N,), 7), _rand((N,), 8), _rand((*lead, N), 9)
        if data.draw(st.booleans(), label="residual"):
            _check(lambda t, r: FF.layer_norm(t, (N,), w, b, residual=r),
                   lambda t, r: F.layer_norm(t + r, (N,), w.to(t.dtype), b.to(t.dtype)), [x, r], (0, 1), "layer_norm")
        else:
            _check(lambda t: FF.layer_norm(t, (N,), w, None), lambda t: F.layer_norm(t, (N,), w.to(t.dtype)), [x],
                   trace="layer_norm")
    else:
        act = data.draw(st.sampled_from(ACTS), label="act")
        acts = {None: lambda v: v, "relu": F.relu, "relu6": F.relu6, "silu": F.silu, "gelu": F.gelu,
                "sigmoid": torch.sigmoid}
        bias = _rand((N,), 10)
        _check(lambda t, b: FF.bias_act(t, b, act), lambda t, b: acts[act](t + b), [x, bias], (0, 1), "bias_act")


@SETTINGS
@given(st.data())
def test_scaled_dot_product_attention(data):
    B, H = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(1, 2), label="H")
    L, S = data.draw(st.integers(1, 40), label="L"), data.draw(st.integers(1, 40), label="S")
    E = data.draw(st.sampled_from([8, 16, 24, 32]), label="E")
    mask_kind = data.draw(st.sampled_from(["none", "causal", "bool", "additive"]), label="mask")
    q, k, v = _rand((B, H, L, E), 11), _rand((B, H, S, E), 12), _rand((B, H, S, E), 13)
    kw = {}
    if mask_kind == "causal":
        kw["is_causal"] = True
    elif mask_kind == "bool":
        kw["attn_mask"] = torch.rand(L, S, generator=torch.Generator().manual_seed(14)).to(DEVICE) > 0.3
    elif mask_kind == "additive":
        kw["attn_mask"] = _rand((1, H, L, S), 15)

    def stock(q, k, v):
        m = kw.get("attn_mask")
        extra = dict(kw, attn_mask=m.to(q.dtype)) if m is not None and m.is_floating_point() else kw
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, **extra)

    _check(lambda q, k, v: FF.scaled_dot_product_attention(q, k, v, **kw), stock, [q, k, v], (0, 1, 2), "attention")
