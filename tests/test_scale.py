"""Scale (issue 7, item 5), GPU only: tensors past 2^31 elements (offsets that overflow int32) for
pooling, batch-norm + activation and LRN; launches whose grid would pass 65535 in y or z; and a
non-default stream honoured (a kernel launched on a side stream sees that stream's earlier writes
with no device synchronization in between).

Memory: each large fp16 tensor is 2^31 + 2^25 elements (4.4 GB); a test holds at most a handful
(< 30 GB), within an 80 GB H100. Results are checked on slices (the first and the last image, whose
offsets straddle 2^31) against torch on the same slices, so the oracle needs no second full-size
copy.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastnets
from fastnets import functional as FF
from parity import KERNEL_BACKENDS, ran_on

pytestmark = pytest.mark.gpu

BIG = (65, 128, 512, 512)  # 2^31 + 2^25 elements: the last image starts past 2^31
assert BIG[0] * BIG[1] * BIG[2] * BIG[3] > 2**31


def _big(layout="contiguous", dtype=torch.float16):
    x = torch.empty(BIG, device="cuda", dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    x.normal_()
    return x


def _ends(t):
    return [t[:1], t[-1:]]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_max_and_avg_pool_past_2_31(backend, layout):
    x = _big(layout).requires_grad_()
    with ran_on(backend, "max_pool2d"):
        y = FF.max_pool2d(x, 3, 2, 1)
        y.backward(torch.ones_like(y))
    for xs, ys, gs in zip(_ends(x.detach()), _ends(y.detach()), _ends(x.grad)):
        xs = xs.clone().requires_grad_()
        ref = F.max_pool2d(xs, 3, 2, 1)
        ref.backward(torch.ones_like(ref))
        assert torch.equal(ys, ref) and torch.equal(gs, xs.grad)
    del y
    x.grad = None
    with ran_on(backend, "avg_pool2d"):
        y = FF.avg_pool2d(x.detach(), 2)
    for xs, ys in zip(_ends(x.detach()), _ends(y)):
        torch.testing.assert_close(ys, F.avg_pool2d(xs, 2), rtol=1e-3, atol=1e-3)
    with ran_on(backend, "adaptive_avg_pool2d"):
        g = FF.adaptive_avg_pool2d(x.detach(), 1)
    for xs, gs in zip(_ends(x.detach()), _ends(g)):
        torch.testing.assert_close(gs, F.adaptive_avg_pool2d(xs.float(), 1).half(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_norm_act_past_2_31(backend, layout):
    x = _big(layout)
    C = BIG[1]
    w, b = torch.rand(C, device="cuda") + 0.5, torch.randn(C, device="cuda")
    rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
    with ran_on(backend, "norm_act"):
        y = FF.batch_norm_act(x, rm, rv, w, b, True, 0.1, 1e-5, "relu")
    # the batch statistics over all 2^31+ elements, in float64 per channel (chunked)
    mean = torch.zeros(C, dtype=torch.float64, device="cuda")
    sq = torch.zeros(C, dtype=torch.float64, device="cuda")
    for i in range(0, BIG[0], 8):
        chunk = x[i:i + 8].double()
        mean += chunk.sum((0, 2, 3))
        sq += (chunk * chunk).sum((0, 2, 3))
    n = x.numel() // C
    mean /= n
    var = sq / n - mean * mean
    torch.testing.assert_close(rm.double(), 0.1 * mean, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(rv.double(), 0.9 + 0.1 * var * n / (n - 1), rtol=1e-3, atol=1e-4)
    for xs, ys in zip(_ends(x), _ends(y)):
        ref = F.relu(F.batch_norm(xs.float(), mean.float(), var.float(), w, b, False, 0.0, 1e-5)).half()
        torch.testing.assert_close(ys, ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_lrn_past_2_31(backend, layout):
    x = _big(layout).requires_grad_()
    with ran_on(backend, "lrn"):
        y = FF.local_response_norm(x, 5, 1e-4, 0.75, 2.0)
        y.backward(torch.ones_like(y))
    for xs, ys, gs in zip(_ends(x.detach()), _ends(y.detach()), _ends(x.grad)):
        xs = xs.float().requires_grad_()
        ref = F.local_response_norm(xs, 5, 1e-4, 0.75, 2.0)
        ref.backward(torch.ones_like(ref))
        torch.testing.assert_close(ys, ref.half(), rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(gs, xs.grad.half(), rtol=2e-3, atol=2e-3)


# ----------------------------------------------------------------------------------------------
# Grids past 65535 in y or z: the launch shapes that could, each checked against torch.

@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_bias_act_backward_with_more_than_65535_column_blocks(backend):
    F_ = 65535 * 128 + 129  # column blocks of the backward: more than 65535 (they go on grid x)
    x = torch.randn(3, F_, device="cuda", requires_grad=True)
    b = torch.randn(F_, device="cuda", requires_grad=True)
    with ran_on(backend, "bias_act"):
        y = FF.bias_act(x, b, "gelu")
        y.backward(torch.ones_like(y))
    xr, br = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref = F.gelu(xr + br)
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, br.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_many_groups_and_channels(backend):
    """Grouped convolution past 65535 groups is refused by the kernels with the reason (auto runs
    the reference); a depthwise convolution with 70000 channels, batch-norm with 70000 channels and
    attention with 70000 (batch x heads) run and match torch."""
    x = torch.randn(1, 2 * 65536, 3, 3, device="cuda", dtype=torch.float16)
    w = torch.randn(65536, 2, 1, 1, device="cuda", dtype=torch.float16)
    with fastnets.use_backend(backend), pytest.raises(fastnets.BackendError, match="65535"):
        FF.conv_bn_act(x, w, groups=65536, activation=None)
    C = 70000
    x = torch.randn(2, C, 5, 5, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, 1, 3, 3, device="cuda", dtype=torch.float16)
    with ran_on(backend):
        y = FF.conv_bn_act(x, w, padding=1, groups=C, activation=None)
        z = FF.batch_norm_act(x, None, None, None, None, True, activation=None)
    torch.testing.assert_close(y, F.conv2d(x, w, padding=1, groups=C), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(z.float(), F.batch_norm(x.float(), None, None, training=True), rtol=2e-3, atol=2e-3)
    q = torch.randn(700, 100, 17, 32, device="cuda", dtype=torch.float16)
    with ran_on(backend, "attention"):
        o = FF.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, q, q, is_causal=True), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dropout_mask_past_65535_batch_heads(backend):
    """The dropout-mask hook puts (batch x heads) on grid z: past 65535 it launches in chunks, and
    the mask is still the kernels' Philox stream, element for element."""
    from fastnets.ops import attention as A
    seed = A.draw_seed("cuda")
    keep = A.dropout_mask(seed, 2, 65536 // 2 + 3, 5, 7, 0.3, backend)
    assert torch.equal(keep, A.philox_keep_mask(seed, 2, 65536 // 2 + 3, 5, 7, 0.3))


# ----------------------------------------------------------------------------------------------
# Streams

@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", ["max_pool2d", "batch_norm_act", "lrn", "layer_norm", "bias_act", "attention",
                                  "conv_bn_act"])
def test_side_stream_is_honoured(backend, name):
    """The kernels run on the current stream: a side stream's fill, then the op on that stream with
    no synchronization between them, reads the filled values (on the default stream it could run
    before the fill finished). A long kernel first keeps the side stream busy."""
    calls = {
        "max_pool2d": lambda t: FF.max_pool2d(t, 3, 2, 1),
        "batch_norm_act": lambda t: FF.batch_norm_act(t, None, None, None, None, True),
        "lrn": lambda t: FF.local_response_norm(t, 5),
        "layer_norm": lambda t: FF.layer_norm(t, (t.shape[-1],)),
        "bias_act": lambda t: FF.bias_act(t, None, "gelu"),
        "attention": lambda t: FF.scaled_dot_product_attention(t, t, t),
        "conv_bn_act": lambda t: FF.conv_bn_act(t, torch.ones(64, 64, 1, 1, device="cuda", dtype=t.dtype) / 64,
                                                activation=None),
    }
    fn = calls[name]
    src = torch.randn(16, 64, 64, 64, device="cuda", dtype=torch.float16)
    expected = fn(src)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    busy = torch.randn(8192, 8192, device="cuda")
    x = torch.zeros_like(src)
    torch.cuda.synchronize()
    with torch.cuda.stream(side), ran_on(backend):
        for _ in range(4):
            busy = busy @ busy / 8192  # keeps the side stream busy for a while
        x.copy_(src)
        out = fn(x)
    side.synchronize()
    torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)
