"""The kernels' training formulation, whole models, in float64: fuse()d third-party models against
their stock selves, both in float64, with the torch reference following the kernels' formulation
(_dispatch.kernel_formulation: statistics from the convolution, batch_norm_act_train with the given
statistics, the pre-activation recomputed from the saved input in the backward, the activation
gradient from the saved output, attention through the reference math with its saved log-sum-exp).

Why float64, and why this is the test of the issue-11 LRASPP report: in float32 a whole-model
gradient comparison is at the mercy of activation kinks. With a pre-activation within fp32
rounding of a ReLU kink, the fp32 run and the float64 reference can take opposite sides: one
element's gradient switches on or off, and near the output (the LRASPP head's conv -> BN -> ReLU
sees 2 x 6 x 6 values per channel) that one element moves whole gradients by 1e-3 to 1e-2.
scripts/lraspp_relu_flip.py shows it (committed run: benchmarks/results/lraspp-relu-flip-2026-12-02):
the issue's recipe, the stem gradient 8.2e-3 off for one seed; exactly one ReLU input differs in
side, at 2.5e-6 from the kink on a layer of scale 5.3; with that one element moved to the fp32
side in the float64 reference, the fused fp32 error is 6.5e-6, stock's level. Stock fp32 happened
to round to the float64 side there; which side a computation lands on is luck, not a property of
the formulation. In float64 no pre-activation is within rounding of a kink, so any difference here
is the formulation's: what the fused ops save, alias, recompute or modify in place, the memory
formats they assume for inputs, outputs and gradients, how gradients meeting at a residual are
accumulated. The bound, 1e-8 relative, is ~1e6 times float64 rounding and ~1e3 times below the
smallest formulation error this test has caught (the conv-act sigmoid gradient computed in float32
for float64 input: 5e-8).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

import _thirdparty
import fastnets
from fastnets import _dispatch
from model_cases import flat_outputs as _flat
from model_cases import no_dropout as _no_dropout
from model_cases import randomize

BOUND = 1e-8
FLOOR = 1e-3  # gradients that are zero in exact arithmetic (a per-channel shift followed by a
# training-mode batch-norm) are ~1e-12 in float64: measured against this norm, not their own


def _step(model, x, weights):
    model.zero_grad(set_to_none=True)
    outs = _flat(model(x))
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    return outs


def _rel(a, b):
    return ((a - b).norm() / max(b.norm().item(), FLOOR)).item()


def _check(name, build, size, seeds, expect_ops):
    torch.manual_seed(0)
    stock = _no_dropout(randomize(build())).double().train()
    fused = fastnets.fuse(copy.deepcopy(stock)).train()
    for seed in seeds:
        torch.manual_seed(seed)
        x = torch.randn(2, 3, size, size, dtype=torch.float64)
        with torch.no_grad():
            shapes = [o.shape for o in _flat(copy.deepcopy(stock)(x))]
        gen = torch.Generator().manual_seed(7 + seed)
        weights = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        ref = _step(stock, x, weights)
        with _dispatch.use_backend("torch"), _dispatch.kernel_formulation(), _dispatch.trace() as ran:
            out = _step(fused, x, weights)
        ops = {op for op, _ in ran}
        assert expect_ops <= ops, f"{name}: the kernels' formulation did not run ({sorted(expect_ops - ops)} missing)"
        what = f"{name} seed {seed}"
        for i, (o, r) in enumerate(zip(out, ref)):
            assert _rel(o, r) < BOUND, f"{what} output {i}: {_rel(o, r):.2e}"
        sp = dict(stock.named_parameters())
        for pname, p in fused.named_parameters():
            g = sp[pname].grad
            if g is None:
                assert p.grad is None or not p.grad.any(), f"{what}: {pname} has a gradient, stock has none"
                continue
            assert p.grad is not None, f"{what}: no gradient for {pname}"
            assert _rel(p.grad, g) < BOUND, f"{what} grad {pname}: {_rel(p.grad, g):.2e}"
        sb = dict(stock.named_buffers())
        for bname, b in fused.named_buffers():
            if b.is_floating_point():
                assert _rel(b, sb[bname]) < BOUND, f"{what} buffer {bname}: {_rel(b, sb[bname]):.2e}"


CONV_BN = {"norm_act_stats_given", "conv_bn_act"}
ATTENTION = {"attention_fwd", "attention_bwd"}

# Input sizes give every training-mode batch-norm at least 8 values per channel (batch 2, the last
# stage at 2x2 or more). Below that the normalization is ill-conditioned: over 2 values its output
# is +-1 whatever the input (x - mean = +-d/2, std = |d|/2), the difference of the two samples is
# what survives, and its relative rounding grows by |x|/|d| at each such layer; torchvision's
# regnet_x_400mf at 32x32 (its last 12 blocks at 1x1) ends 80% apart between stock float64 and
# the same model fused, also float64, with the first difference 1e-10 at the first 1x1 block.
FULL = os.environ.get("FASTNETS_THIRDPARTY_FULL") == "1"  # the heavier models too (~4 more minutes)
TV = [  # (builder, input size, seeds, ops the formulation must have run)
    ("lraspp", 96, (1,), CONV_BN),  # the recipe: 96x96 (seeds 1, 2, 3 with FULL)
    ("resnet18", 64, (0,), CONV_BN),
    ("vit", 32, (0,), ATTENTION),
]
if FULL:
    TV[0] = ("lraspp", 96, (1, 2, 3), CONV_BN)
    TV += [("mobilenet_v2", 64, (0,), CONV_BN), ("efficientnet_b0", 64, (0,), CONV_BN),
           ("regnet_x_400mf", 64, (0,), CONV_BN), ("googlenet", 64, (0,), CONV_BN)]


@pytest.mark.parametrize("name,size,seeds,ops", TV, ids=[t[0] for t in TV])
def test_torchvision_formulation_float64(name, size, seeds, ops):
    tvm = _thirdparty.torchvision().models
    if name == "lraspp":
        build = lambda: tvm.segmentation.lraspp_mobilenet_v3_large(  # noqa: E731
            weights=None, weights_backbone=None, num_classes=3)
    elif name == "vit":  # vit_b_16's blocks, narrower and 2 deep
        build = lambda: tvm.vision_transformer.VisionTransformer(  # noqa: E731
            image_size=32, patch_size=16, num_layers=2, num_heads=3, hidden_dim=192, mlp_dim=384, num_classes=10)
    elif name == "googlenet":
        build = lambda: tvm.googlenet(num_classes=10, aux_logits=True, init_weights=True)  # noqa: E731
    else:
        build = lambda: getattr(tvm, name)(num_classes=10)  # noqa: E731
    _check(f"torchvision {name}", build, size, seeds, ops)


TIMM = [
    ("mobilenetv3_large_100", 64, CONV_BN),
    ("dla34", 64, CONV_BN),
    ("vit_tiny_patch16_224", 32, ATTENTION),
]
if FULL:
    TIMM += [("efficientnet_b0", 64, CONV_BN), ("resnet26d", 64, CONV_BN)]


@pytest.mark.parametrize("name,size,ops", TIMM, ids=[t[0] for t in TIMM])
def test_timm_formulation_float64(name, size, ops):
    timm = _thirdparty.timm()
    kwargs = {"img_size": 32, "depth": 2} if name.startswith("vit") else {}
    _check(f"timm {name}", lambda: timm.create_model(name, pretrained=False, num_classes=10, **kwargs), size, (0,),
           ops)


def test_relu_flip_moves_a_whole_gradient():
    """The mechanism behind the fp32 LRASPP report, in miniature: a ReLU input within fp32 rounding
    of the kink (here placed there on purpose) decides by its side whether its element's gradient
    counts; both sides are 'right' to the rounding of the forward, and the gradient moves by far
    more than rounding. A float32 comparison against float64 cannot tell which side is right."""
    torch.manual_seed(0)
    z = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    z[1, 2, 1, 0] = 2.5e-6  # what the LRASPP head's channel 85 had
    g = torch.randn_like(z)
    bias_grad = lambda t: (g * (t > 0)).sum((0, 2, 3))  # noqa: E731  (ReLU, then a per-channel sum)
    z32 = z.float().double()
    flipped = z32.clone()
    flipped[1, 2, 1, 0] = -1e-7  # a 2.6e-6 change: rounding of a 960-term fp32 dot product
    assert (z32 - z).abs().max() < 1e-6 and (flipped - z).abs().max() < 3e-6
    d = (bias_grad(flipped) - bias_grad(z)).norm() / bias_grad(z).norm()
    assert d > 1e-3, "one flipped element moves the channel's gradient by its whole share"
    assert (bias_grad(z32) - bias_grad(z)).norm() == 0
