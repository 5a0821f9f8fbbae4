"""fastnets.models: torchvision compatibility (state_dict keys and shapes from the fixtures, and
against torchvision itself where it is importable), every builder built and run, every
architecture's fused form against its stock form (forward and a training step, outputs, gradients,
batch-norm statistics), a few small models end to end through the Triton kernels, bad arguments.

On the CPU the fused models run the torch reference path of the fastnets ops (backend "torch"),
except the Triton tests (interpreter); the gpu-marked tests run every builder on the kernels.
"""
import copy
import json
import os

import pytest
import torch
from torch import nn

import _thirdparty
import parity
from fastnets import _dispatch, models
from fastnets.models import efficientnet as effnet
from fastnets.models import resnet, vgg
from model_cases import CASE_IDS, CASES, as_input, assert_step_matches, randomize, run, stock_copy

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "torchvision")


def _fixture(name):
    with open(os.path.join(FIXTURES, f"{name}.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# torchvision compatibility

def test_every_torchvision_builder_has_a_fixture():
    assert sorted(f[:-5] for f in os.listdir(FIXTURES) if f.endswith(".json")) == sorted(models.TORCHVISION_BUILDERS)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "stock"])
@pytest.mark.parametrize("name", sorted(models.TORCHVISION_BUILDERS))
def test_state_dict_keys_and_shapes_are_torchvisions(name, fused):
    """The ordered (key, shape) list of the builder with default arguments is torchvision's."""
    record = _fixture(name)
    with torch.device("meta"):
        model = models.TORCHVISION_BUILDERS[name](fused=fused)
    got = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert got == record["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == record["num_parameters"]


def _torchvision():
    return _thirdparty.torchvision().models  # skips the test where torchvision is not installed


@pytest.mark.parametrize("name,size", [("alexnet", 64), ("vgg11_bn", 32), ("googlenet", 32), ("resnet18", 32),
                                       ("resnet50", 32), ("densenet121", 32), ("efficientnet_b0", 32),
                                       ("vit_b_16", 32)])
def test_torchvision_weights_load_and_give_the_same_outputs(name, size):
    tvm = _torchvision()
    kwargs = {"image_size": size} if name == "vit_b_16" else {}
    if name == "googlenet":
        kwargs["init_weights"] = True
    reference = randomize(getattr(tvm, name)(**kwargs)).eval()
    ours = models.TORCHVISION_BUILDERS[name](**kwargs).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad(), _dispatch.use_backend("torch"):
        stock, out = reference(x), ours(x)
        ref64 = reference.double()(x.double())
    parity.assert_parity(out, ref64, stock)


# ----------------------------------------------------------------------------------------------
# Every builder: built, right output, same as its stock form.

def _builder_input(name):
    if name in ("text_transformer", "lstm_classifier"):
        t = torch.randint(1, 1000, (2, 7))
        t[1, 5:] = 0
        return t
    size = {"alexnet": 63, "alexnet_2012": 67, "zfnet": 64}.get(name, 32)
    return torch.randn(1, 3, size, size)


@pytest.mark.parametrize("name", sorted(models.BUILDERS))
def test_every_builder_runs(name):
    """Each builder at full depth and width: built (its own initialization), run on the reference
    backend at a small input, through fastnets ops. (That each architecture computes what its
    stock form computes is proven on small configurations below, and against torchvision where
    it is installed; the builders' state_dicts are torchvision's, above.)"""
    kwargs = {"image_size": 32} if name == "vit_b_16" else {}
    model = models.BUILDERS[name](**kwargs).eval()
    x = _builder_input(name)
    with torch.no_grad(), _dispatch.use_backend("torch"), _dispatch.trace() as launched:
        out = model(x)
    assert out.shape == (x.shape[0], 2 if name in ("text_transformer", "lstm_classifier") else 1000)
    assert torch.isfinite(out).all()
    ops = {op for op, _ in launched}
    assert ops and all(backend == "torch" for _, backend in launched)
    if name != "lstm_classifier":  # its only fastnets op is the head's linear_act
        assert len(ops) >= 2, f"{name}: the fused model ran almost no fastnets op: {ops}"


# ----------------------------------------------------------------------------------------------
# Every architecture (small configurations): fused vs stock, eval and a training step.

_CASE_MODES = [pytest.param(c, t, id=f"{c.name}-{'train' if t else 'eval'}") for c in CASES for t in (False, True)]


@pytest.mark.parametrize("case,train", _CASE_MODES)
def test_fused_form_matches_stock_form(case, train):
    model = randomize(case.build(fused=True))
    stock, stock64 = stock_copy(model, case), stock_copy(model, case, torch.float64)
    x = case.input()
    with _dispatch.use_backend("torch"):
        assert_step_matches(model, stock, stock64, x, train, case.name)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("resnet_bottleneck", "vgg_bn", "densenet")],
                         ids=lambda c: c.name)
def test_a_training_step_then_eval_matches(case):
    """Two SGD steps in train mode (batch statistics, running statistics, autograd), then eval:
    the fused model trains as the stock one does."""
    model = randomize(case.build(fused=True))
    stock = stock_copy(model, case)
    stock64 = stock_copy(model, case, torch.float64)
    x = case.input()
    with _dispatch.use_backend("torch"):
        for m, dtype in ((model, torch.float32), (stock, torch.float32), (stock64, torch.float64)):
            opt = torch.optim.SGD(m.parameters(), lr=0.05)
            m.train()
            for step in range(2):
                opt.zero_grad()
                run(m, as_input(x, dtype), seed=step).square().mean().backward()
                opt.step()
            m.eval()
        assert_step_matches(model, stock, stock64, x, False, case.name)


def test_fused_model_uses_fastnets_ops():
    """The fused ResNet runs its convs, pools through fastnets (recorded), the stock one none."""
    case = CASES[CASE_IDS.index("resnet_basic")]
    model = randomize(case.build(fused=True)).eval()
    with torch.no_grad(), _dispatch.use_backend("torch"), _dispatch.trace() as launched:
        model(case.input())
    ops = [op for op, _ in launched]
    assert sum(op.startswith("conv") for op in ops) >= 9 and any("pool" in op for op in ops), ops
    with torch.no_grad(), _dispatch.trace() as launched:
        stock_copy(model, case).eval()(case.input())
    assert launched == []


def test_googlenet_training_outputs_and_eval_output():
    model = models.GoogLeNet(num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    with _dispatch.use_backend("torch"):
        out = model.train()(x)
        assert isinstance(out, models.GoogLeNetOutputs) and [o.shape for o in out] == [(2, 7)] * 3
        assert models.GoogLeNet(num_classes=7, aux_logits=False).train()(x).shape == (2, 7)
        with torch.no_grad():
            assert model.eval()(x).shape == (2, 7)


def test_googlenet_transform_input():
    """transform_input maps ImageNet normalization to (x - 0.5) / 0.5 (torchvision's formula)."""
    model = models.GoogLeNet(transform_input=True, aux_logits=False)
    x = torch.randn(1, 3, 4, 4)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(model._transform_input(x), (x * std + mean - 0.5) / 0.5)


def test_paper_forms_shapes():
    """AlexNet 2012 at 227x227 and ZFNet at 224x224: the stage shapes of the papers (and of the
    files' comments), computed on the meta device."""
    expected = {
        "alexnet_2012": (227, [(96, 55, 55), (96, 55, 55), (96, 27, 27), (256, 27, 27), (256, 27, 27),
                               (256, 13, 13), (384, 13, 13), (384, 13, 13), (256, 13, 13), (256, 6, 6)]),
        "zfnet": (224, [(96, 110, 110), (96, 55, 55), (96, 55, 55), (256, 26, 26), (256, 13, 13), (256, 13, 13),
                        (384, 13, 13), (384, 13, 13), (256, 13, 13), (256, 6, 6)]),
    }
    for name, (size, shapes) in expected.items():
        with torch.device("meta"):
            model = models.BUILDERS[name](fused=False)
            x = torch.empty(1, 3, size, size)
            got = []
            for m in model.features:
                x = m(x)
                if not isinstance(m, nn.ReLU):
                    got.append(tuple(x.shape[1:]))
            assert got == shapes, name
            assert model(torch.empty(1, 3, size, size)).shape == (1, 1000)
    alex = models.alexnet_2012()
    assert [m.groups for m in alex.features if isinstance(m, nn.Conv2d)] == [1, 2, 1, 2, 2]
    lrn = [m for m in alex.features if isinstance(m, nn.LocalResponseNorm)]
    assert len(lrn) == 2 and lrn[0].size == 5 and lrn[0].alpha == pytest.approx(5e-4) and lrn[0].k == 2
    zf = models.zfnet()
    convs = [m for m in zf.features if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.stride) for c in convs[:2]] == [((7, 7), (2, 2)), ((5, 5), (2, 2))]


# ----------------------------------------------------------------------------------------------
# End to end through the Triton kernels (the interpreter on the CPU).

_TRITON_CASES = [
    ("resnet", lambda fused: models.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=5, width=4, fused=fused), 48),
    ("alexnet_2012", lambda fused: models.AlexNet2012(num_classes=5, widths=(4, 8, 4, 4, 4), hidden=8, fused=fused),
     67),
]


@pytest.mark.skipif("triton" not in parity.KERNEL_BACKENDS, reason="Triton is not installed")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name,build,size", _TRITON_CASES, ids=[c[0] for c in _TRITON_CASES])
def test_small_model_end_to_end_on_triton(name, build, size, train):
    model = randomize(build(True)).to(parity.DEVICE)
    stock = build(False)
    stock.load_state_dict(model.state_dict())
    stock64 = build(False)
    stock64.load_state_dict(model.state_dict())
    stock, stock64 = stock.to(parity.DEVICE), stock64.double().to(parity.DEVICE)
    x = torch.randn(2, 3, size, size, device=parity.DEVICE)
    with parity.ran_on("triton"):
        assert_step_matches(model, stock, stock64, x, train, name)


# ----------------------------------------------------------------------------------------------
# Bad arguments: torchvision's exception type where torchvision checks, else a clear error.

@pytest.mark.parametrize("make,exc,match", [
    (lambda: models.resnet18(weights="IMAGENET1K_V1"), ValueError, "does not download"),
    (lambda: models.ResNet(resnet.BasicBlock, [2, 2, 2]), ValueError, "layers"),
    (lambda: models.ResNet(resnet.BasicBlock, [2, 2, 0, 2]), ValueError, r"layers\[2\]"),
    (lambda: models.resnet18(groups=2), ValueError, "BasicBlock only supports groups=1"),
    (lambda: models.resnet18(replace_stride_with_dilation=[False, False, True]), NotImplementedError, "Dilation"),
    (lambda: models.resnet50(replace_stride_with_dilation=[True]), ValueError, "replace_stride_with_dilation"),
    (lambda: models.resnet50(norm_layer=nn.GroupNorm), ValueError, "norm_layer"),
    (lambda: models.resnet50(num_classes=0), ValueError, "num_classes"),
    (lambda: models.resnet50(num_classes=2.5), TypeError, "num_classes"),
    (lambda: models.vgg11(dropout=1.5), ValueError, "dropout"),
    (lambda: vgg.make_layers([]), ValueError, "cfg"),
    (lambda: models.alexnet(widths=(64, 192)), ValueError, "widths"),
    (lambda: models.alexnet_2012(groups=3), ValueError, "groups=3"),
    (lambda: models.googlenet(blocks=[nn.Conv2d]), ValueError, "blocks length"),
    (lambda: models.googlenet(dropout_aux=-0.1), ValueError, "dropout_aux"),
    (lambda: models.DenseNet(block_config=()), ValueError, "block_config"),
    (lambda: models.DenseNet(growth_rate=0), ValueError, "growth_rate"),
    (lambda: models.EfficientNet([], 0.2), ValueError, "should not be empty"),
    (lambda: models.EfficientNet([1, 2], 0.2), TypeError, "List\\[MBConvConfig\\]"),
    (lambda: models.efficientnet_b0(norm_layer=nn.LayerNorm), ValueError, "norm_layer"),
    (lambda: models.vit_b_16(image_size=100), AssertionError, "indivisible by patch size"),
    (lambda: models.VisionTransformer(32, 16, 1, 5, 12, 8), ValueError, "divisible by num_heads"),
    (lambda: models.text_transformer(d_model=30, nhead=4), ValueError, "divisible by nhead"),
    (lambda: models.text_transformer(vocab_size=10, padding_idx=10), ValueError, "padding_idx"),
    (lambda: models.lstm_classifier(hidden_size=0), ValueError, "hidden_size"),
    (lambda: models.resnet18(fused="yes"), TypeError, "fused"),
])
def test_impossible_arguments(make, exc, match):
    with torch.device("meta"), pytest.raises(exc, match=match):
        make()


def test_bad_inputs():
    vit = models.VisionTransformer(16, 8, 1, 2, 8, 8)
    with pytest.raises(AssertionError, match="Wrong image height"):
        vit(torch.randn(1, 3, 24, 16))
    text = models.TextTransformerClassifier(11, 2, d_model=8, nhead=2, num_layers=1, max_len=4)
    with pytest.raises(ValueError, match="integer tensor"):
        text(torch.randn(2, 3))
    with pytest.raises(ValueError, match="max_len"):
        text(torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(IndexError):  # torch's nn.Embedding: a token id out of the vocabulary
        text(torch.full((1, 3), 11))
    lstm = models.LSTMClassifier(11, 2, embed_dim=4, hidden_size=4)
    with pytest.raises(RuntimeError, match="greater than 0"):  # torch's pack_padded_sequence: an empty sequence
        lstm(torch.tensor([[1, 2], [0, 0]]))
    with pytest.raises(ValueError, match="integer tensor"):
        lstm(torch.ones(2, 3))


def test_nan_propagates_as_in_the_stock_model():
    case = CASES[CASE_IDS.index("resnet_basic")]
    model = randomize(case.build(fused=True)).eval()
    stock = stock_copy(model, case).eval()
    x = case.input()
    x[0, 1, 3, 4] = float("nan")
    with torch.no_grad(), _dispatch.use_backend("torch"):
        out, expected = model(x), stock(x)
    assert torch.equal(torch.isnan(out), torch.isnan(expected)) and torch.isnan(out[0]).all()
    assert not torch.isnan(out[1]).any()


# ----------------------------------------------------------------------------------------------
# On a GPU: every builder at its real input size on each kernel backend.

_GPU_SIZES = {"alexnet_2012": 227, "vit_b_16": 224}


def _no_randomness(model):
    """Dropout, stochastic depth and attention dropout off: the kernels' random streams differ
    from torch's."""
    for m in model.modules():
        if isinstance(m, (nn.Dropout, effnet.StochasticDepth)):
            m.p = 0.0
        if isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0
    return model


@pytest.mark.gpu
@pytest.mark.parametrize("backend", parity.KERNEL_BACKENDS)
@pytest.mark.parametrize("name", sorted(models.BUILDERS))
def test_every_builder_on_the_kernels(name, backend):
    """Forward and a training step of every builder at its real input size on the GPU kernels,
    against the float64 stock form (outputs, every gradient, batch-norm statistics)."""
    fused = _no_randomness(randomize(models.BUILDERS[name]())).to(parity.DEVICE)
    stock = _no_randomness(models.BUILDERS[name](fused=False))
    stock.load_state_dict(fused.state_dict())
    stock64 = copy.deepcopy(stock).double().to(parity.DEVICE)
    stock = stock.to(parity.DEVICE)
    if name in ("text_transformer", "lstm_classifier"):
        x = torch.randint(1, 1000, (8, 64), device=parity.DEVICE)
        x[1, 40:] = 0
    else:
        size = _GPU_SIZES.get(name, 224)
        x = torch.randn(2, 3, size, size, device=parity.DEVICE)
    if name == "lstm_classifier":  # its recurrence is torch's nn.LSTM: only the head is fastnets'
        with _dispatch.use_backend(backend):
            assert_step_matches(fused, stock, stock64, x, True, name)
        return
    with parity.ran_on(backend):
        assert_step_matches(fused, stock, stock64, x, True, name)
