"""fastnets.fuse: every architecture's stock form fused gives the same outputs, gradients and
batch-norm statistics in eval and train mode; the input model is untouched (unless inplace); the
state_dict keys are unchanged; the summary says what was fused and what was left alone and why;
models fx cannot trace are fused module by module; bad input."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnets
import _thirdparty
import parity
from fastnets import _dispatch, models
from fastnets import nn as fnn
from fastnets.fuse import FuseSummary
from fastnets.models import resnet
from model_cases import CASE_IDS, CASES, as_input, assert_step_matches, randomize, run


def _snapshot(model):
    """Everything fuse() must not change in its input: classes, state, instance attributes."""
    return ([(name, type(m), sorted(m.__dict__)) for name, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


def _assert_untouched(model, snapshot):
    structure, state = snapshot
    assert [(name, type(m), sorted(m.__dict__)) for name, m in model.named_modules()] == structure
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fuse_keeps_every_stock_model_equivalent(case, train):
    stock = randomize(case.build(fused=False)).train(train)
    stock64 = copy.deepcopy(stock).double()
    before = _snapshot(stock)
    fused = fastnets.fuse(stock)
    _assert_untouched(stock, before)
    assert list(fused.state_dict()) == list(stock.state_dict())
    assert isinstance(fused.fuse_summary, FuseSummary)
    # The LSTM classifier has nothing fuse() can rewrite (its forward is not traceable, and its
    # only candidate, the head's linear + relu, sits in that forward); every other net has.
    assert bool(fused.fuse_summary.fused) == (case.name != "lstm"), str(fused.fuse_summary)
    reference = copy.deepcopy(stock)
    with _dispatch.use_backend("torch"):
        assert_step_matches(fused, reference, stock64, case.input(), train, case.name)


def test_fused_model_trains_like_the_stock_one():
    """SGD steps on a fused ResNet and on the stock one, then eval: same weights, same outputs."""
    case = CASES[CASE_IDS.index("resnet_bottleneck")]
    stock = randomize(case.build(fused=False))
    stock64 = copy.deepcopy(stock).double()
    fused = fastnets.fuse(stock)
    x = case.input()
    with _dispatch.use_backend("torch"):
        for m, dtype in ((fused, torch.float32), (stock, torch.float32), (stock64, torch.float64)):
            opt = torch.optim.SGD(m.parameters(), lr=0.05)
            m.train()
            for step in range(2):
                opt.zero_grad()
                run(m, as_input(x, dtype), seed=step).logsumexp(1).mean().backward()
                opt.step()
        assert_step_matches(fused, stock, stock64, x, False, "after training")


def test_state_dict_moves_both_ways():
    stock = randomize(models.resnet18(fused=False)).eval()
    fused = fastnets.fuse(stock)
    other = models.resnet18(fused=False)
    fused.load_state_dict(other.state_dict(), strict=True)  # into the fused model
    for k, v in fused.state_dict().items():
        assert torch.equal(v, other.state_dict()[k])
    assert all(torch.equal(a, b) for a, b in zip(stock.state_dict().values(), _snapshot(stock)[1].values()))


def test_summary_counts_for_resnet50():
    fused = fastnets.fuse(models.resnet50(fused=False))
    summary = fused.fuse_summary
    assert summary.counts == {"max-pool": 1, "adaptive-avg-pool": 1, "conv-bn-act": 1 + 2 * 16,
                              "conv-bn-add-act": 16, "conv-bn": 4}
    assert summary.left_alone == []
    assert ("conv-bn-add-act", "layer1.0.conv3, layer1.0.bn3") in summary.fused
    assert ("conv-bn", "layer2.0.downsample.0, layer2.0.downsample.1") in summary.fused
    text = str(summary)
    assert "55 fused, 0 left alone" in text and "conv-bn-add-act" in text and "16" in text
    assert isinstance(fused.maxpool, fnn.MaxPool2d) and isinstance(fused.avgpool, fnn.AdaptiveAvgPool2d)
    assert type(fused.layer1[0]) is resnet.Bottleneck  # blocks keep their class; their forward is fused


def test_summary_says_what_was_left_alone_and_why():
    net = models.DenseNet(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2, fused=False)
    summary = fastnets.fuse(net).fuse_summary
    assert summary.counts["bn-act"] == 5 + 1 and summary.counts["conv-bn-act"] == 1 + 5  # norm1-relu1 + transition
    reasons = dict(summary.left_alone)
    assert "no activation after it" in reasons["features.norm5"]  # its relu is in the parent's forward
    assert "no batch-norm, residual add or activation follows it" in reasons["features.denseblock1.denselayer1.conv2"]
    text = str(summary)
    assert "left alone:" in text and "features.norm5" in text


class _DataDependent(nn.Module):
    """fx cannot trace the root (a branch on a tensor's value); its children can be fused."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.block = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        x = self.bn(self.conv(x))
        if x.sum() > 0:
            x = x.relu()
        return self.pool(self.block(x))


def test_untraceable_model_is_fused_module_by_module():
    model = randomize(_DataDependent())
    fused = fastnets.fuse(model)
    summary = fused.fuse_summary
    assert summary.counts == {"max-pool": 1, "conv-bn-act": 1}
    (where, why), = summary.left_alone
    assert where == "" and "cannot trace" in why and "module by module" in why
    assert "forward" not in fused.__dict__ and "forward" in fused.block.__dict__
    for train in (False, True):
        m, ref = copy.deepcopy(fused).train(train), copy.deepcopy(model).train(train)
        assert_step_matches(m, copy.deepcopy(ref), ref.double(), torch.randn(2, 3, 9, 9), train, "data-dependent")


class _ModeDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.relu(x) if self.training else F.relu6(x)


def test_forward_that_depends_on_the_mode_is_left_alone():
    model = _ModeDependent()
    fused = fastnets.fuse(model)
    assert fused.fuse_summary.counts == {}
    assert "differs between train and eval mode" in dict(fused.fuse_summary.left_alone)[""]
    x = torch.randn(2, 3, 5, 5) * 10
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), model.eval()(x))


class _Patterns(nn.Module):
    """Activation spellings, a residual from either side, a shared conv, a broadcast residual, a
    tanh-GELU (not fusable), an output used twice."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.c3 = nn.Conv2d(4, 4, 3, padding=1)
        self.c4, self.b4 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.c5 = nn.Conv2d(4, 4, 1)
        self.bias = nn.Parameter(torch.randn(4, 1, 1))
        self.act = nn.SiLU()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))                # conv-bn-act (torch.relu)
        y = F.relu(x + self.b2(self.c2(y)), inplace=True)  # conv-bn-add-act, residual on the left
        z = self.c3(y).sigmoid()                           # conv-act (tensor method)
        z = self.act(self.c3(z))                           # the same conv again, nn.SiLU
        w = self.b4(self.c4(z)) + self.bias                # a broadcast "residual": added after the fused op
        w = F.gelu(w, approximate="tanh")                  # not fused (tanh form)
        v = self.c5(w)
        v = F.relu6(v) + v                                 # c5's output used twice: left alone
        return self.lin(v.mean((2, 3))).relu()             # linear-act


def test_pattern_variants():
    model = randomize(_Patterns())
    fused = fastnets.fuse(model)
    counts = fused.fuse_summary.counts
    # b4(c4(z)) + self.bias is fused as conv-bn-add: the [C, 1, 1] parameter would broadcast
    # nothing, but it is not the output's shape, so the call adds it after the fused conv-bn.
    assert counts == {"conv-bn-act": 1, "conv-bn-add-act": 1, "conv-act": 2, "conv-bn-add": 1, "linear-act": 1}, counts
    assert "used more than once" in dict(fused.fuse_summary.left_alone)["c5"]
    for train in (False, True):
        m, ref = copy.deepcopy(fused).train(train), copy.deepcopy(model).train(train)
        assert_step_matches(m, copy.deepcopy(ref), ref.double(), torch.randn(2, 4, 7, 6), train, "patterns")


def test_hooks_are_respected():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))
    calls = []
    model[1].register_forward_hook(lambda m, i, o: calls.append(1))
    model[3].register_forward_pre_hook(lambda m, i: calls.append(2))
    fused = fastnets.fuse(model)
    reasons = dict(fused.fuse_summary.left_alone)
    assert "hooks" in reasons["1"] and "hooks" in reasons["3"]
    fused.eval()(torch.randn(1, 3, 8, 8))
    assert calls == [1, 2]


def test_inplace():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2))
    out = fastnets.fuse(model, inplace=True)
    assert out is model and isinstance(model[3], fnn.AvgPool2d) and "forward" in model.__dict__
    again = fastnets.fuse(model)  # fusing a fused model finds nothing new and changes nothing
    assert again.fuse_summary.counts == {}
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), model.eval()(x))


def test_replacements_share_parameters_and_modes():
    model = nn.Sequential(nn.LayerNorm(8), nn.LocalResponseNorm(3), nn.AdaptiveMaxPool2d(2))
    model[0].eval()
    fused = fastnets.fuse(model, inplace=False)
    assert isinstance(fused[0], fnn.LayerNorm) and isinstance(fused[1], fnn.LocalResponseNorm)
    assert isinstance(fused[2], fnn.AdaptiveMaxPool2d) and not fused[0].training and fused[1].training
    assert fused.fuse_summary.counts == {"layer-norm": 1, "local-response-norm": 1, "adaptive-max-pool": 1}
    assert fused[0].weight is not model[0].weight  # a copy (inplace=False) ...
    assert torch.equal(fused[0].weight, model[0].weight)
    shared = nn.MaxPool2d(2)
    twice = fastnets.fuse(nn.Sequential(shared, shared))
    assert twice[0] is twice[1] and isinstance(twice[0], fnn.MaxPool2d)  # ... and sharing is kept


def test_modules_without_a_kernel_are_reported():
    model = nn.Sequential(nn.Conv1d(2, 2, 1), nn.BatchNorm1d(2), nn.ReLU())
    fused = fastnets.fuse(model)
    reasons = dict(fused.fuse_summary.left_alone)
    assert "no fastnets kernel" in reasons["0"] and "no fastnets kernel" in reasons["1"]


def test_fuse_of_a_single_module_and_of_a_fused_family_model():
    pool = fastnets.fuse(nn.MaxPool2d(3, 2, 1, ceil_mode=True))
    assert isinstance(pool, fnn.MaxPool2d) and pool.ceil_mode and pool.padding == 1
    fused_model = models.ResNet(resnet.BasicBlock, [1, 1, 1, 1], width=4)
    out = fastnets.fuse(fused_model)
    assert out.fuse_summary.counts == {} and out.fuse_summary.left_alone == []


def test_deepcopy_of_a_fused_model_runs_on_its_own_modules():
    fused = fastnets.fuse(randomize(models.ResNet(resnet.BasicBlock, [1, 1, 1, 1], width=4, fused=False)))
    twin = copy.deepcopy(fused).eval()
    fused.eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), fused(x))
        twin.fc.bias.add_(1.0)
        torch.testing.assert_close(twin(x), fused(x) + 1.0)  # the copy's forward reads the copy's modules


@pytest.mark.parametrize("bad", [None, 3, "resnet", torch.randn(2), [nn.ReLU()]])
def test_fuse_of_something_that_is_not_a_module(bad):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fastnets.fuse(bad)


def test_fuse_inplace_must_be_a_bool():
    with pytest.raises(TypeError, match="inplace"):
        fastnets.fuse(nn.ReLU(), inplace="yes")


@pytest.mark.parametrize("name", ["resnet18", "googlenet", "densenet121", "efficientnet_b0", "vgg11_bn", "vit_b_16"])
def test_fuse_torchvision_models(name):
    tvm = _thirdparty.torchvision().models  # skips the test where torchvision is not installed
    kwargs = {"image_size": 32} if name == "vit_b_16" else {}
    stock = randomize(getattr(tvm, name)(**kwargs)).eval()
    for m in stock.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    fused = fastnets.fuse(stock)
    assert list(fused.state_dict()) == list(stock.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with _dispatch.use_backend("torch"):
        assert_step_matches(fused, copy.deepcopy(stock), copy.deepcopy(stock).double(), x, False, name)


@pytest.mark.skipif("triton" not in parity.KERNEL_BACKENDS, reason="Triton is not installed")
def test_fused_stock_model_runs_on_triton():
    stock = randomize(nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
                                    nn.MaxPool2d(2), nn.Conv2d(5, 3, 1), nn.ReLU()))
    fused = fastnets.fuse(stock).to(parity.DEVICE)
    stock64 = copy.deepcopy(stock).double().to(parity.DEVICE)
    stock = stock.to(parity.DEVICE)
    with parity.ran_on("triton"):
        assert_step_matches(fused, stock, stock64, torch.randn(2, 3, 7, 9, device=parity.DEVICE), True, "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", parity.KERNEL_BACKENDS)
def test_fused_torchvision_style_resnet50_on_the_kernels(backend):
    stock = randomize(models.resnet50(fused=False)).to(parity.DEVICE)
    stock64 = copy.deepcopy(stock).double()
    fused = fastnets.fuse(stock)
    x = torch.randn(4, 3, 224, 224, device=parity.DEVICE)
    for train in (False, True):
        with parity.ran_on(backend):
            assert_step_matches(fused, stock, stock64, x, train, "resnet50")




# ----------------------------------------------------------------------------------------------
# float64 training (issue 11): stock trains in float64 and gradcheck relies on it.

def _stock_and_fused_grads(stock, fused, x):
    grads = []
    for m in (stock, fused):
        m.double().train()
        m.zero_grad()
        with _dispatch.use_backend("torch"):
            out = m(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape)).sum().backward()
        grads.append((out.detach(), {n: p.grad for n, p in m.named_parameters()}))
    return grads


def test_float64_training_of_a_fused_torchvision_model_and_of_the_family():
    tvm = _thirdparty.torchvision().models
    # 64x64: layer4 normalizes over 2 x 2 x 2 values, which amplifies any difference in the
    # backward by orders of magnitude (at 32x32, over 2 values): float32 anywhere would show as
    # ~1e-3, float64 ordering differences stay near 1e-10.
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    stock_tv = randomize(tvm.resnet18(num_classes=10))
    family = randomize(models.resnet18(num_classes=10))
    family_stock = models.resnet18(num_classes=10, fused=False)
    family_stock.load_state_dict(family.state_dict())
    for stock, fused in ((stock_tv, fastnets.fuse(stock_tv)), (family_stock, family)):
        (out_s, grads_s), (out_f, grads_f) = _stock_and_fused_grads(stock, fused, x)
        assert out_f.dtype == torch.float64
        torch.testing.assert_close(out_f, out_s, rtol=1e-9, atol=1e-10)
        for name, g in grads_s.items():
            assert grads_f[name].dtype == torch.float64
            rel = ((grads_f[name] - g).norm() / g.norm()).item()
            assert rel < 1e-7, f"{name}: relative L2 difference {rel:.3g} from stock float64"


def test_float64_gradcheck_of_a_fused_block_in_training():
    torch.manual_seed(3)
    block = randomize(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                    nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.SiLU()))
    fused = fastnets.fuse(block).double().train()
    assert fused.fuse_summary.counts == {"conv-bn-act": 2}
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    with _dispatch.use_backend("torch"):
        assert torch.autograd.gradcheck(lambda t: fused(t), (x,), eps=1e-6, atol=1e-7)


def test_float64_conv_statistics_op_feeds_the_training_batch_norm():
    """The registered conv_stats op (the kernels' training path: statistics from the conv, then
    batch_norm_act_train) gives float64 statistics for float64 input, as batch_norm_act_train
    requires (it raised 'batch_mean must be torch.float64, got torch.float32')."""
    from fastnets.ops import conv as conv_ops
    from fastnets.ops import norm_act

    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    gamma, beta = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64) * 0.2
    z, mean, var = conv_ops.ops["conv_stats"]["torch"](x, w, None, [1, 1], [1, 1], [1, 1], 1, False)
    assert mean.dtype == var.dtype == torch.float64
    y = norm_act.batch_norm_act_train(z, None, None, gamma, beta, 0.1, 1e-5, "relu", None, batch_mean=mean,
                                      batch_var=var)
    ref = F.relu(F.batch_norm(F.conv2d(x, w, padding=1), None, None, gamma, beta, True, 0.1, 1e-5))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    gx, gw = torch.autograd.grad((y * torch.arange(y.numel(), dtype=torch.float64).view(y.shape)).sum(), (x, w))
    rx, rw = torch.autograd.grad((ref * torch.arange(y.numel(), dtype=torch.float64).view(y.shape)).sum(), (x, w))
    torch.testing.assert_close(gx, rx, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gw, rw, rtol=1e-9, atol=1e-10)
