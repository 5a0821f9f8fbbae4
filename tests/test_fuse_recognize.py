"""fastnets.fuse on third-party layers with stock semantics (fastnets/_fuse_thirdparty.py), with
modules written here: batch-norm subclasses that are nn.BatchNorm2d followed by their own
submodules (timm's BatchNormAct2d pattern), subclasses whose forward is the stock one, and
functional calls (F.scaled_dot_product_attention, F.layer_norm, F.batch_norm, pooling, LRN) inside
a traced forward. Each: what is recognised, what is left alone and why, and parity with stock
(eval outputs, train gradients and running statistics; DESIGN section 5 rule against float64)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnets
from fastnets import _fuse_thirdparty as tp
from fastnets import functional as FF
from model_cases import assert_step_matches, randomize


# ----------------------------------------------------------------------------------------------
# Modules of our own.

class BNAct(nn.BatchNorm2d):
    """nn.BatchNorm2d's computation written out, then self.drop and self.act (the structure of
    timm's BatchNormAct2d). `variant` breaks one piece of the stock semantics."""

    def __init__(self, c, act=None, drop=None, variant=None, **kw):
        super().__init__(c, **kw)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()
        self.variant = variant

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            if self.variant != "no-count":
                self.num_batches_tracked.add_(1)
            if self.momentum is None and self.variant != "fixed-momentum":
                factor = 1.0 / float(self.num_batches_tracked)
            else:
                factor = self.momentum if self.momentum is not None else 0.1
        batch_stats = True if self.variant == "always-batch" else (
            self.training or (self.running_mean is None and self.running_var is None))
        keep = not self.training or self.track_running_stats
        eps = 1e-3 if self.variant == "eps" else self.eps
        x = F.batch_norm(x, self.running_mean if keep else None, self.running_var if keep else None,
                         self.weight, self.bias, batch_stats, factor, eps)
        if self.variant == "scaled":
            x = x * 2
        return self.act(self.drop(x))


class ConvBNActBlock(nn.Module):
    def __init__(self, cin, cout, norm, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = norm

    def forward(self, x):
        return self.bn(self.conv(x))


class Residual(nn.Module):
    """conv -> BNAct without activation -> identity (drop path at rate 0) -> + x -> relu."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn = BNAct(c)
        self.drop_path = nn.Identity()

    def forward(self, x):
        return F.relu(self.drop_path(self.bn(self.conv(x))) + x)


def _reasons(model):
    return " | ".join(why for _, why in model.fuse_summary.left_alone)


# ----------------------------------------------------------------------------------------------
# Batch-norm subclasses: what is recognised.

@pytest.mark.parametrize("kw, plan", [
    (dict(act=nn.ReLU(inplace=True)), ("relu", ())),
    (dict(act=nn.SiLU()), ("silu", ())),
    (dict(), (None, ())),
    (dict(act=nn.Hardswish()), (None, ("act",))),
    (dict(act=nn.GELU(approximate="tanh")), (None, ("act",))),
    (dict(act=nn.ReLU(), drop=nn.Dropout(0.2)), (None, ("drop", "act"))),
    (dict(act=nn.ReLU(), momentum=None), ("relu", ())),
    (dict(act=nn.ReLU(), affine=False), ("relu", ())),
    (dict(act=nn.ReLU(), track_running_stats=False), ("relu", ())),
])
def test_norm_act_recognised(kw, plan):
    m = BNAct(5, **kw)
    state = copy.deepcopy(m.state_dict())
    got = tp.norm_act_plan(m)
    assert isinstance(got, tp.NormActPlan), got
    assert (got.activation, got.after) == plan
    # recognising traces the forward: it must not touch the module's state or modes
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
    assert m.training


@pytest.mark.parametrize("variant, momentum, why", [
    ("eps", 0.1, "eps"),
    ("always-batch", 0.1, "training"),
    ("no-count", 0.1, "num_batches_tracked"),
    ("fixed-momentum", None, "momentum"),
    ("scaled", 0.1, "more"),
])
def test_norm_act_not_stock_left_alone(variant, momentum, why):
    m = BNAct(4, act=nn.ReLU(), variant=variant, momentum=momentum)
    got = tp.norm_act_plan(m)
    assert isinstance(got, str) and why in got, got
    fused = fastnets.fuse(nn.Sequential(nn.Conv2d(3, 4, 3), m))
    assert fused.fuse_summary.counts.get("conv-bn-act") is None
    assert why in _reasons(fused) and "BNAct" in _reasons(fused)


def test_norm_act_untraceable_and_hooks_left_alone():
    class Branchy(BNAct):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent: fx cannot trace it
                return super().forward(x)
            return x

    assert "cannot trace" in tp.norm_act_plan(Branchy(3))
    m = BNAct(3, act=nn.ReLU())
    m.register_forward_hook(lambda *a: None)
    assert "hooks" in tp.norm_act_plan(m)
    fused = fastnets.fuse(nn.Sequential(nn.Conv2d(3, 3, 1), m))
    assert "hooks" in _reasons(fused)


# ----------------------------------------------------------------------------------------------
# Batch-norm subclasses: fused, and parity with stock.

def _check(model, x, train, channels_last=True, patterns=None):
    model = randomize(model)
    fused = fastnets.fuse(model, channels_last=channels_last)
    if patterns is not None:
        assert fused.fuse_summary.counts == patterns, str(fused.fuse_summary)
    stock64 = copy.deepcopy(model).double()
    assert_step_matches(fused, model, stock64, x, train, what="fused")
    return fused


@pytest.mark.parametrize("train", [False, True])
def test_conv_norm_act_parity(train):
    torch.manual_seed(0)
    model = nn.Sequential(ConvBNActBlock(3, 6, BNAct(6, act=nn.SiLU())),
                          ConvBNActBlock(6, 6, BNAct(6, act=nn.Hardswish()), stride=2),
                          Residual(6),
                          BNAct(6, act=nn.ReLU()))  # alone: batch_norm_act
    _check(model, torch.randn(2, 3, 11, 9), train,
           patterns={"conv-bn-act": 1, "conv-bn": 1, "conv-bn-add-act": 1, "bn-act": 1})


def test_norm_act_momentum_none_and_no_stats_parity():
    torch.manual_seed(1)
    model = nn.Sequential(ConvBNActBlock(3, 4, BNAct(4, act=nn.ReLU(), momentum=None)),
                          ConvBNActBlock(4, 4, BNAct(4, act=nn.ReLU(), track_running_stats=False)),
                          BNAct(4, act=nn.ReLU(), momentum=None, affine=False))
    fused = _check(model, torch.randn(3, 3, 7, 7), True)
    for _ in range(2):  # cumulative averages over further steps
        x = torch.randn(3, 3, 7, 7)
        model(x), fused(x)
    for (name, a), b in zip(model.named_buffers(), fused.buffers()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


def test_norm_act_dropout_after_parity():
    """Non-identity drop: the batch-norm is fused, dropout and activation run after it as they are
    (same RNG draws: the fused model in NCHW, where the dropout mask is drawn in the same order)."""
    torch.manual_seed(2)
    model = nn.Sequential(ConvBNActBlock(3, 5, BNAct(5, act=nn.ReLU(), drop=nn.Dropout(0.3))))
    _check(model, torch.randn(2, 3, 8, 8), True, channels_last=False, patterns={"conv-bn": 1})


def test_standalone_norm_act_forward_follows_mode():
    torch.manual_seed(3)
    m = randomize(BNAct(4, act=nn.Hardswish()))
    fused = fastnets.fuse(m)
    assert fused.fuse_summary.counts == {"bn": 1}
    x = torch.randn(2, 4, 5, 5)
    for train in (True, False, True):
        m.train(train), fused.train(train)
        torch.testing.assert_close(fused(x), m(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(fused.num_batches_tracked, m.num_batches_tracked)
    assert fused.state_dict().keys() == m.state_dict().keys()


# ----------------------------------------------------------------------------------------------
# Subclasses whose forward is the stock one.

class PlainLN(nn.LayerNorm):
    pass


class LNViaFunctional(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class LNOtherEps(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, 1e-3)


class SameConv(nn.Conv2d):
    pass


class ScaledConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 0.5


def test_stock_forward_subclasses():
    assert tp.stock_forward(PlainLN(6), nn.LayerNorm) is True
    assert tp.stock_forward(LNViaFunctional(6, eps=1e-6), nn.LayerNorm) is True
    assert "else" in tp.stock_forward(LNOtherEps(6), nn.LayerNorm)
    assert tp.stock_forward(SameConv(3, 4, 3), nn.Conv2d) is True
    assert "else" in tp.stock_forward(ScaledConv(3, 4, 3), nn.Conv2d)


@pytest.mark.parametrize("train", [False, True])
def test_stock_forward_subclasses_fused_parity(train):
    torch.manual_seed(4)
    model = nn.Sequential(SameConv(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                          ScaledConv(5, 5, 1), nn.BatchNorm2d(5), nn.ReLU(),
                          nn.Flatten(2), LNViaFunctional(49, eps=1e-6), LNOtherEps(49))
    fused = _check(model, torch.randn(2, 3, 7, 7), train)
    assert type(fused[7]).__module__.startswith("fastnets.nn")  # replaced by fastnets' LayerNorm
    assert type(fused[8]) is LNOtherEps
    assert fused.fuse_summary.counts["conv-bn-act"] == 1
    assert "LNOtherEps subclasses LayerNorm" in _reasons(fused)


# ----------------------------------------------------------------------------------------------
# Functional calls in a traced forward.

class Functional(nn.Module):
    """A block that calls the functional ops directly (no conv or linear child: found by the
    names its code uses). Its forward does not read the mode (a forward that does is left alone,
    see test_functional_mode_dependent_left_alone): batch statistics and attention dropout
    `p` in both modes."""

    def __init__(self, c, d, heads, p=0.0):
        super().__init__()
        self.w = nn.Parameter(torch.rand(c) + 0.5)
        self.b = nn.Parameter(torch.randn(c) * 0.1)
        self.register_buffer("rm", torch.randn(c) * 0.1)
        self.register_buffer("rv", torch.rand(c) + 0.5)
        self.lw = nn.Parameter(torch.rand(d) + 0.5)
        self.heads, self.p = heads, p

    def forward(self, x, mask):
        y = F.batch_norm(x, self.rm, self.rv, self.w, self.b, True, 0.2, 1e-4)
        y = F.relu(y)
        a = F.max_pool2d(y, 3, 2, 1, ceil_mode=True)
        m, idx = F.max_pool2d(y, 2, return_indices=True)
        c = F.avg_pool2d(y, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        e = F.adaptive_avg_pool2d(y, (3, 2))
        g, gi = F.adaptive_max_pool2d(y, 2, return_indices=True)
        n = F.local_response_norm(y, 3, alpha=2e-3, beta=0.6, k=1.5)
        B, C = x.shape[:2]
        t = F.layer_norm(n.flatten(2), (n.shape[2] * n.shape[3],), self.lw, None, 1e-6)
        q = t.reshape(B, self.heads, C // self.heads, -1)
        k = q.flip(2)
        att = F.scaled_dot_product_attention(q, k, q, attn_mask=mask, dropout_p=self.p, scale=0.3)
        gqa = F.scaled_dot_product_attention(q, k[:, :1], q[:, :1], is_causal=True, enable_gqa=True)
        return a, m, c, e, g, n, t, att, gqa, idx, gi


class Bound(nn.Module):
    """Functional with a fixed mask, returning its floating outputs."""

    def __init__(self, m, mask):
        super().__init__()
        self.m, self.mask = m, mask

    def forward(self, x):
        return self.m(x, self.mask.to(x.dtype))[:-2]


def _functional_case(p=0.0):
    torch.manual_seed(5)
    return Functional(6, 7 * 7, heads=2, p=p), torch.randn(2, 6, 7, 7), torch.randn(2, 1, 3, 3)


def test_functional_rewritten():
    model, x, mask = _functional_case()
    fused = fastnets.fuse(model)
    counts = fused.fuse_summary.counts
    assert counts == {"F.batch_norm-act": 1, "F.max_pool2d": 2, "F.avg_pool2d": 1, "F.adaptive_avg_pool2d": 1,
                      "F.adaptive_max_pool2d": 1, "F.local_response_norm": 1, "F.layer_norm": 1,
                      "F.scaled_dot_product_attention": 2}, counts
    model.eval(), fused.eval()
    with torch.no_grad():
        ours, stock = fused(x, mask), model(x, mask)
    assert torch.equal(ours[-2], stock[-2]) and torch.equal(ours[-1], stock[-1])  # pooling indices


@pytest.mark.parametrize("train", [False, True])
def test_functional_parity(train):
    model, x, mask = _functional_case()
    fused = fastnets.fuse(model)
    stock64 = copy.deepcopy(model).double()
    assert_step_matches(Bound(fused, mask), Bound(model, mask), Bound(stock64, mask), x, train, what="functional")


def test_functional_attention_dropout():
    """dropout_p reaches fastnets' attention (its own mask, seeded from torch's generator): the
    fused block's attention is exactly fastnets' attention of the same inputs with that dropout."""
    model, x, mask = _functional_case(p=0.4)
    calls = []
    real = tp.FUNCTIONAL[F.scaled_dot_product_attention]

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real[1](*args, **kwargs)

    tp.FUNCTIONAL[F.scaled_dot_product_attention] = (real[0], spy)
    try:
        fused = fastnets.fuse(model, channels_last=False)
    finally:
        tp.FUNCTIONAL[F.scaled_dot_product_attention] = real
    torch.manual_seed(9)
    out = fused(x, mask)[7]
    args, kwargs = calls[0]
    assert kwargs["dropout_p"] == 0.4 and kwargs["scale"] == 0.3 and kwargs["attn_mask"] is mask
    torch.manual_seed(9)
    assert torch.equal(out, FF.scaled_dot_product_attention(*args, **kwargs))
    assert not torch.equal(out, FF.scaled_dot_product_attention(*args, **dict(kwargs, dropout_p=0.0)))


def test_functional_mode_dependent_left_alone():
    class ModeDependent(nn.Module):
        def forward(self, x):
            return F.scaled_dot_product_attention(x, x, x, dropout_p=0.3 if self.training else 0.0)

    fused = fastnets.fuse(ModeDependent())
    assert not fused.fuse_summary.fused
    assert "train and eval" in _reasons(fused)
