"""Small configurations of every architecture of fastnets.models, shared by test_models.py and
test_fuse.py, and the helpers that compare a network with its stock form.

Each case builds the architecture through its generic class, reduced (fewer blocks, narrower) but
with every kind of block the full builders use, in its fused or stock form, at a small input.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Callable

import torch
from torch import nn

import parity
from fastnets import models
from fastnets.models import efficientnet as effnet
from fastnets.models import resnet, vgg


@dataclasses.dataclass
class Case:
    name: str
    build: Callable[..., nn.Module]  # build(fused=...) -> model
    input: Callable[[], torch.Tensor]  # a fresh input batch
    random: bool = False  # dropout / stochastic depth active in training


def _images(size, n=4):
    return lambda: torch.randn(n, 3, size, size)


def _tokens(vocab=37, n=3, length=9):
    def make():
        t = torch.randint(1, vocab, (n, length))
        t[1, length - 3:] = 0  # padding at the end of one sequence
        t[2, 1:] = 0           # and a sequence of one token
        return t
    return make


CASES = [
    Case("alexnet", functools.partial(models.AlexNet, num_classes=10, widths=(8, 16, 12, 12, 8), hidden=24),
         _images(63)),
    Case("alexnet_2012", functools.partial(models.AlexNet2012, num_classes=10, widths=(8, 16, 12, 12, 8),
                                           hidden=24), _images(67)),
    Case("zfnet", functools.partial(models.ZFNet, num_classes=10, widths=(8, 16, 12, 12, 8), hidden=24),
         _images(64)),
    Case("vgg", lambda fused: vgg.VGG(vgg.make_layers([8, "M", 16, 16, "M", 8, "M"], False, fused=fused),
                                      num_classes=10, hidden=24, fused=fused), _images(24)),
    Case("vgg_bn", lambda fused: vgg.VGG(vgg.make_layers([8, "M", 16, 16, "M", 8, "M"], True, fused=fused),
                                         num_classes=10, hidden=24, dropout=0.3, fused=fused), _images(24), True),
    Case("googlenet", functools.partial(models.GoogLeNet, num_classes=10, dropout=0.2, dropout_aux=0.5, width=0.25),
         _images(64), True),
    Case("resnet_basic", functools.partial(models.ResNet, resnet.BasicBlock, [1, 2, 1, 1], num_classes=10, width=8),
         _images(64)),
    Case("resnet_bottleneck", functools.partial(models.ResNet, resnet.Bottleneck, [2, 1, 1, 1], num_classes=10,
                                                width=4, groups=2, width_per_group=16,
                                                replace_stride_with_dilation=[False, False, True]), _images(48)),
    Case("densenet", functools.partial(models.DenseNet, growth_rate=4, block_config=(2, 3), num_init_features=8,
                                       bn_size=2, num_classes=10, drop_rate=0.2), _images(32), True),
    Case("densenet_memory_efficient", functools.partial(models.DenseNet, growth_rate=4, block_config=(2, 1),
                                                        num_init_features=8, bn_size=2, num_classes=10,
                                                        memory_efficient=True), _images(16)),
    Case("efficientnet", lambda fused: models.EfficientNet(effnet.mbconv_setting(0.25, 0.2), dropout=0.2,
                                                           stochastic_depth_prob=0.5, num_classes=10, fused=fused),
         _images(40), True),
    Case("vit", functools.partial(models.VisionTransformer, image_size=16, patch_size=8, num_layers=2, num_heads=2,
                                  hidden_dim=16, mlp_dim=24, num_classes=10, dropout=0.0), _images(16)),
    Case("text_transformer", functools.partial(models.TextTransformerClassifier, 37, 5, d_model=16, nhead=2,
                                               num_layers=2, dim_feedforward=24, dropout=0.0, max_len=16),
         _tokens()),
    Case("lstm", functools.partial(models.LSTMClassifier, 37, 5, embed_dim=8, hidden_size=12, dropout=0.25),
         _tokens(), True),
]
CASE_IDS = [c.name for c in CASES]


def no_dropout(model):
    """Dropout and stochastic depth (torchvision, timm) off: their random draws are not what a parity test checks."""
    for m in model.modules():
        if isinstance(m, (nn.Dropout, nn.Dropout2d, nn.AlphaDropout)) or type(m).__name__ in ("StochasticDepth",
                                                                                             "DropPath"):
            for attr in ("p", "drop_prob"):
                if isinstance(getattr(m, attr, None), float):
                    setattr(m, attr, 0.0)
    return model


def flat_outputs(out):
    """A model's outputs as a list of tensors (dicts in key order, tuples and lists flattened)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in flat_outputs(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flat_outputs(o)]
    raise TypeError(f"unexpected output {type(out).__name__}")


def randomize(model: nn.Module) -> nn.Module:
    """Fresh random values (never zeros) in every parameter and batch-norm statistic, scaled so
    that activations stay of order one: the builders' initializations leave some at zero (ViT's
    head, biases) and the batch-norms at the identity, where a wrong fold would not show."""
    norms = (nn.BatchNorm2d, nn.LayerNorm)
    with torch.no_grad():
        for m in model.modules():
            for name, t in list(m._parameters.items()) + list(m._buffers.items()):
                if t is None or not t.is_floating_point():
                    continue
                if isinstance(m, norms) and name in ("weight", "running_var"):
                    t.copy_(torch.rand(t.shape) + 0.5)
                elif isinstance(m, norms) or t.dim() <= 1:
                    t.copy_(torch.randn(t.shape) * 0.1)
                else:
                    fan_in = t.numel() // t.shape[0] if t.shape[0] else 1
                    t.copy_(torch.randn(t.shape) / fan_in ** 0.5)
    return model


def stock_copy(fused_model: nn.Module, case: Case, dtype=torch.float32) -> nn.Module:
    """The stock form of the case with fused_model's weights (a copy), in fused_model's mode."""
    stock = case.build(fused=False)
    stock.load_state_dict(fused_model.state_dict(), strict=True)
    return stock.to(dtype).train(fused_model.training)


def run(model: nn.Module, x: torch.Tensor, seed: int = 1):
    """Forward with a fixed RNG state (dropout, stochastic depth), returning the main output."""
    torch.manual_seed(seed)
    out = model(x)
    return out.logits if isinstance(out, models.GoogLeNetOutputs) else out


def outputs(model, x, seed=1):
    """All outputs (GoogLeNet's auxiliary logits too) as a list."""
    torch.manual_seed(seed)
    out = model(x)
    return list(out) if isinstance(out, tuple) else [out]


def as_input(x: torch.Tensor, dtype) -> torch.Tensor:
    return x.to(dtype) if x.is_floating_point() else x


def assert_step_matches(model: nn.Module, stock: nn.Module, stock64: nn.Module, x: torch.Tensor, train: bool,
                        what: str = "") -> None:
    """One step (forward, backward of a random projection of every output) of `model` against the
    float64 stock network, with stock PyTorch's float32 error as the yardstick (parity rule):
    outputs, every parameter gradient, and the batch-norm statistics after the step.

    Stock PyTorch runs twice, in NCHW and in channels_last (the same model, two memory formats):
    through a whole network the two disagree with the float64 reference by different amounts
    (measured on the GoogLeNet case: up to 3.5x apart on first-layer gradients), so the yardstick
    is the larger of the two errors, the error a stock implementation is known to make."""
    stock_cl = copy.deepcopy(stock).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
    for m in (model, stock, stock64, stock_cl):
        m.train(train)
    outs, refs = outputs(model, x), outputs(stock64, as_input(x, torch.float64))
    stocks, stocks_cl = outputs(stock, x), outputs(stock_cl, x_cl)
    assert len(outs) == len(refs)
    gen = torch.Generator().manual_seed(7)
    weights = [torch.randn(r.shape, generator=gen, dtype=torch.float64) for r in refs]
    for i, (o, r, s, c) in enumerate(zip(outs, refs, stocks, stocks_cl)):
        parity.assert_parity(o, r, (s, c), f"{what} output {i}")
    if not train:
        return
    for m, outs_m in ((model, outs), (stock, stocks), (stock64, refs), (stock_cl, stocks_cl)):
        loss = sum((o * w.to(o.dtype)).sum() for o, w in zip(outs_m, weights))
        loss.backward()
    params, params64, params_s, params_c = (dict(m.named_parameters()) for m in (model, stock64, stock, stock_cl))
    for name, p in params.items():
        g64 = params64[name].grad
        if g64 is None:
            assert p.grad is None or not p.grad.any(), f"{what}: {name} has a gradient, the stock model none"
            continue
        assert p.grad is not None, f"{what}: no gradient for {name}"
        parity.assert_parity(p.grad, g64, (params_s[name].grad, params_c[name].grad), f"{what} grad {name}")
    bufs, bufs64, bufs_s, bufs_c = (dict(m.named_buffers()) for m in (model, stock64, stock, stock_cl))
    for name, b in bufs.items():
        if b.is_floating_point():
            parity.assert_parity(b, bufs64[name], (bufs_s[name], bufs_c[name]), f"{what} buffer {name}")
        else:
            assert torch.equal(b, bufs64[name]), f"{what}: buffer {name} {b} != {bufs64[name]}"
