"""The CPU reference path of conv -> activation (fastnets/ops/conv.py, _onednn_conv_act): oneDNN's
convolution with the activation and the residual add as post-ops, as torch.compile's CPU backend
emits it. Checked against the stock ops it replaces, under the 2x rule, and for where it applies."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import parity
from fastnets.ops import _activation
from fastnets.ops import conv as C

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

GEOMETRIES = [  # (N, C_in, C_out, H, W, kernel, stride, padding, dilation, groups)
    (2, 8, 16, 9, 7, 3, 1, 1, 1, 1),
    (1, 6, 6, 7, 7, 3, 2, 0, 2, 3),
    (3, 5, 7, 11, 5, 1, 1, 0, 1, 1),
    (2, 12, 12, 8, 9, 5, 1, 2, 1, 12),  # depthwise
    (1, 3, 4, 1, 1, 1, 1, 0, 1, 1),
]


@pytest.mark.parametrize("geo", GEOMETRIES, ids=[str(g) for g in GEOMETRIES])
@pytest.mark.parametrize("act", [1, 2, 3, 5], ids=["relu", "relu6", "silu", "sigmoid"])
def test_onednn_conv_act_matches_stock(geo, act):
    N, Ci, Co, H, W, k, s, p, d, g = geo
    torch.manual_seed(sum(geo) + act)
    for x_cl, w_cl, res in itertools.product([False, True], [False, True], [False, True]):
        x = torch.randn(N, Ci, H, W)
        w = torch.randn(Co, Ci // g, k, k) / (Ci // g * k * k) ** 0.5
        b = torch.randn(Co)
        if x_cl:
            x = x.contiguous(memory_format=torch.channels_last)
        if w_cl:
            w = w.contiguous(memory_format=torch.channels_last)
        z64 = F.conv2d(x.double(), w.double(), b.double(), s, p, d, g)
        fmt = torch.channels_last if C._out_channels_last(x, w) else torch.contiguous_format
        r = torch.randn(z64.shape).contiguous(memory_format=fmt) if res else None
        ref = _activation.apply(z64 + r.double() if res else z64, act)
        stock = _activation.apply(F.conv2d(x, w, b, s, p, d, g) + (r if res else 0), act)
        y, _ = C._cba_torch(x, w, b, r, [s, s], [p, p], [d, d], g, act, fmt == torch.channels_last, False)
        used = C._onednn_conv_act(x, w, b, r, [s, s], [p, p], [d, d], g, act) is not None
        assert used == (not res or act == 1), "applies to every case but a residual before a non-relu activation"
        assert y.shape == ref.shape and y.is_contiguous(memory_format=fmt)
        parity.assert_parity(y, ref, (stock,), f"{geo} act {act} x_cl {x_cl} w_cl {w_cl} residual {res}")


def test_onednn_conv_act_declines_what_it_cannot_take():
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(8, 4, 3, 3)
    args = ([1, 1], [1, 1], [1, 1], 1)
    assert C._onednn_conv_act(x.double(), w.double(), None, None, *args, 1) is None  # float64
    assert C._onednn_conv_act(x, w, None, None, *args, 4) is None  # gelu: not taken
    assert C._onednn_conv_act(x, w, None, None, *args, 0) is None  # no activation: plain conv
    assert C._onednn_conv_act(x[:, :, ::2], w, None, None, *args, 1) is None  # not dense
    assert C._onednn_conv_act(x[:0], w, None, None, *args, 1) is None  # empty batch
    r = torch.randn(2, 8, 6, 6)
    assert C._onednn_conv_act(x, w, None, r[:, :, :, :1].expand(2, 8, 6, 6), *args, 1) is None  # broadcast residual
    assert C._onednn_conv_act(x, w, None, r, *args, 2) is None  # residual + relu6
    assert C._onednn_conv_act(x, w, None, r, *args, 1) is not None


def test_reference_conv_act_keeps_autograd():
    """The oneDNN op has no derivative; the registered op's own backward (from y) must give stock's gradients."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    g = torch.randn(2, 6, 7, 7)
    out = C.conv_bn_act(x, w, b, padding=1, activation="relu")
    grads = torch.autograd.grad(out, (x, w, b), g)
    ref = torch.autograd.grad(F.relu(F.conv2d(x, w, b, padding=1)), (x, w, b), g)
    for a, r in zip(grads, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
