"""The modules' CPU inference shortcut (fastnets/nn/conv.py and nn/norm_act.py: no gradient,
float32, the reference backend): the cached fold through the same stock ops as the full path, with
stock's per-call cost. Its outputs, memory formats and errors must be the full path's."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastnets
import parity
from fastnets import _dispatch
from fastnets.ops import conv as C
from model_cases import randomize


class Block(nn.Module):
    def __init__(self, c, k=3, groups=1, act=nn.ReLU, padding=1):
        super().__init__()
        self.conv = nn.Conv2d(c, c, k, padding=padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.act = act()
        self.pre = nn.Sequential(nn.BatchNorm2d(c), act())

    def forward(self, x, residual=None):
        y = self.bn(self.conv(self.pre(x)))
        return self.act(y if residual is None else y + residual)


CASES = [  # (channels, kernel, groups, activation, padding, residual shape relative to x: None, "same", "broadcast")
    (8, 3, 1, nn.ReLU, 1, None),
    (8, 3, 1, nn.ReLU, 1, "same"),
    (6, 3, 3, nn.ReLU6, 1, "same"),
    (5, 1, 1, nn.SiLU, 0, None),
    (8, 3, 8, nn.GELU, "same", None),
    (8, 3, 1, nn.ReLU, 1, "broadcast"),
    (4, 3, 1, nn.Identity, 1, None),
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cpu_inference_matches_stock_and_full_path(case, channels_last, monkeypatch):
    c, k, g, act, pad, res = case
    torch.manual_seed(0)
    stock = randomize(Block(c, k, g, act, pad)).eval()
    fused = fastnets.fuse(copy.deepcopy(stock)).eval()
    x = torch.randn(2, c, 7, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    r = None if res is None else torch.randn(2, c, 7, 9) if res == "same" else torch.randn(1, c, 1, 9)
    taken = []
    real = C.cpu_inference
    monkeypatch.setattr("fastnets.nn.conv.cpu_inference", lambda *a: taken.append(real(*a)) or taken[-1])
    with torch.no_grad(), _dispatch.use_backend("torch"):
        out = fused(x, r)
        ref64 = copy.deepcopy(stock).double()(x.double(), None if r is None else r.double())
        outs = [stock(x, r), copy.deepcopy(stock).to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last), r)]
    parity.assert_parity(out, ref64, outs, f"{case}")
    # padding="same" (a string: its asymmetric case needs the full path) never reaches the shortcut;
    # a residual that broadcasts goes back to the full path.
    assert bool(taken) == (pad != "same")
    assert not taken or (taken[-1] is not None) == (res != "broadcast"), "shortcut taken exactly where it applies"
    # The full path (gradients on) gives the same values and memory format.
    with torch.enable_grad(), _dispatch.use_backend("torch"):
        xg = x.clone().requires_grad_()
        full = fused(xg, r)
    torch.testing.assert_close(out, full.detach(), rtol=1e-6, atol=1e-6)
    fmt = torch.channels_last if channels_last or not pad == "same" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt) == full.is_contiguous(memory_format=fmt)


def test_cpu_inference_wrong_channels_raises_like_the_full_path():
    torch.manual_seed(0)
    fused = fastnets.fuse(Block(8)).eval()
    with torch.no_grad(), _dispatch.use_backend("torch"), pytest.raises((RuntimeError, ValueError)) as short:
        fused(torch.randn(2, 5, 7, 7))
    with torch.enable_grad(), _dispatch.use_backend("torch"), pytest.raises((RuntimeError, ValueError)) as full:
        fused(torch.randn(2, 5, 7, 7, requires_grad=True))
    assert type(short.value) is type(full.value)


@pytest.mark.parametrize("bn,act,pool", [
    (False, nn.ReLU, dict(kernel_size=3, stride=2)),
    (True, nn.ReLU6, dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    (False, nn.ReLU, dict(kernel_size=2, stride=2, dilation=1, ceil_mode=True)),
])
def test_relu_after_max_pool_in_cpu_inference(bn, act, pool):
    """FusedSequential runs conv -> relu -> max-pool as conv -> max-pool -> relu in CPU inference:
    exactly the same values (a max commutes with a non-decreasing function), NaN included."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1)] + ([nn.BatchNorm2d(8)] if bn else []) + [act(), nn.MaxPool2d(**pool)]
    stock = randomize(nn.Sequential(*layers)).eval()
    fused = fastnets.fuse(copy.deepcopy(stock)).eval()
    x = torch.randn(2, 3, 11, 13).contiguous(memory_format=torch.channels_last) * 3
    x[0, :, 4, 5] = float("nan")
    seen = []
    fused[-1].register_forward_pre_hook(lambda mod, args: seen.append(args[0].nan_to_num(0.0).min().item()))
    with torch.no_grad(), _dispatch.use_backend("torch"):
        out, ref = fused(x), stock(x)
        ref64 = copy.deepcopy(stock).double()(x.double())
    assert seen and seen[-1] < 0, "the pool saw the pre-activation: the activation runs after it"
    assert out.isnan().any() and torch.equal(out.isnan(), ref.isnan())
    if not bn:  # the same convolution: bit-identical
        assert torch.equal(out.nan_to_num(), ref.nan_to_num())
    parity.assert_parity(out.nan_to_num(), ref64.nan_to_num(), (ref.nan_to_num(),), "conv-act-pool")
    with _dispatch.use_backend("torch"):  # with gradients: the stock order
        seen.clear()
        fused(x.requires_grad_())
        assert seen[-1] >= 0


def test_fused_sequential_relu_after_max_pool():
    """The model family's FusedSequential takes the same order in CPU inference."""
    from fastnets.models._common import FusedSequential

    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    stock = randomize(nn.Sequential(*layers)).eval()
    fused = FusedSequential(*copy.deepcopy(list(stock))).eval()
    seen = []
    fused[-1].register_forward_pre_hook(lambda mod, args: seen.append(args[0].min().item()))
    x = torch.randn(2, 3, 12, 10)
    with torch.no_grad(), _dispatch.use_backend("torch"):
        out, ref64 = fused(x), copy.deepcopy(stock).double()(x.double())
        ref = stock(x)
    assert seen[-1] < 0
    parity.assert_parity(out, ref64, (ref,), "FusedSequential conv-bn-relu-pool")
