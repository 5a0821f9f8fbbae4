"""How much of timm's models fastnets.fuse() runs on fastnets ops (issue 11, coverage): the
fraction of the stock batch-norm, layer-norm and attention ops replaced (tests/_coverage.py,
counted by running the stock and the fused model), and the fused models' parity with stock (DESIGN
section 5: float64 reference, 2x the larger of stock's NCHW and channels_last errors; random
batch-norm parameters and statistics). timm builds its CNNs from BatchNormAct2d / ConvNormAct
(fastnets/_fuse_thirdparty.py recognises them by behaviour), its ViT from F.scaled_dot_product_attention
inside its Attention forward and nn.LayerNorm. pretrained=False: nothing is downloaded."""
import copy

import pytest
import torch
from torch import nn

import _thirdparty
import fastnets
from _coverage import count_stock_ops, coverage, format_coverage, fraction
from fastnets import _dispatch
from model_cases import assert_step_matches, randomize

# model -> (input size, the stock model's batch-norm ops: the counts)
CNNS = {
    "efficientnet_b0": (64, 49),
    "mobilenetv3_large_100": (64, 46),
    "regnety_016": (64, 86),
    "densenet121": (64, 121),
    "inception_v3": (96, 94),  # its reduction blocks need more than 64 pixels
}


def _timm_model(name, **kwargs):
    """The timm model with random parameters and statistics, and a 10-class head (the head does not
    change what is counted; a smaller one keeps the gradient comparisons quick)."""
    tm = _thirdparty.timm()
    torch.manual_seed(0)
    return randomize(tm.create_model(name, pretrained=False, num_classes=10, **kwargs)).eval()


@pytest.mark.parametrize("name", list(CNNS))
def test_timm_cnn_batch_norm_coverage(name):
    size, total = CNNS[name]
    model = _timm_model(name)
    fused = fastnets.fuse(model)
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size)
    cov = coverage(model, fused, x[:1])
    print(f"{name}: {format_coverage(cov)}")
    assert cov["batch-norm"][1] == total
    assert fraction(cov["batch-norm"]) >= 0.9, f"{name}: {format_coverage(cov)}\n{fused.fuse_summary}"
    stock64 = copy.deepcopy(model).double()
    assert_step_matches(fused, model, stock64, x, train=False, what=name)


def test_timm_norm_act_train_gradients():
    """Train mode (batch statistics, running-stat updates, gradients) through fused timm norm-act
    layers: MobileNetV3-Small has conv -> BatchNormAct2d with ReLU (fused), with hardswish (run
    after the fused batch-norm) and without activation (-> + residual)."""
    model = _timm_model("mobilenetv3_small_050")
    fused = fastnets.fuse(model)
    cov = coverage(model, fused, torch.randn(1, 3, 32, 32))
    assert cov["batch-norm"][0] == cov["batch-norm"][1], format_coverage(cov)
    assert {"conv-bn-act", "conv-bn", "conv-bn-add"} <= set(fused.fuse_summary.counts), str(fused.fuse_summary)
    torch.manual_seed(3)
    x = torch.randn(2, 3, 32, 32)
    assert_step_matches(fused, model, copy.deepcopy(model).double(), x, train=True, what="mobilenetv3_small_050")


def test_timm_vit_attention_and_layer_norm():
    model = _timm_model("vit_tiny_patch16_224", img_size=48, depth=3)  # ViT-Ti/16, 3 of its 12 blocks
    fused = fastnets.fuse(model)
    torch.manual_seed(2)
    x = torch.randn(2, 3, 48, 48)
    cov = coverage(model, fused, x[:1])
    print(f"vit_tiny_patch16_224: {format_coverage(cov)}")
    assert cov == {"attention": (3, 3), "layer-norm": (7, 7)}, format_coverage(cov)
    with torch.no_grad(), _dispatch.trace() as ran:
        fused(x)
    ops = {op for op, _ in ran}
    assert {"attention_fwd", "layer_norm"} <= ops, ops
    stock64 = copy.deepcopy(model).double()
    assert_step_matches(fused, model, stock64, x, train=False, what="vit")
    assert_step_matches(fused, model, stock64, x, train=True, what="vit train")


def test_coverage_counts_what_is_left():
    """The count sees a stock op left in the fused model (a batch-norm with a hook stays stock),
    and no stock op inside fastnets' own ones."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
            self.ln = nn.LayerNorm(4)

        def forward(self, x):
            y = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
            return self.ln(y.permute(0, 2, 3, 1))

    model = randomize(Net()).eval()
    model.bn2.register_forward_hook(lambda *args: None)
    x = torch.randn(1, 3, 9, 9)
    assert count_stock_ops(model, x) == {"batch-norm": 2, "layer-norm": 1, "attention": 0}
    fused = fastnets.fuse(model)
    assert coverage(model, fused, x) == {"batch-norm": (1, 2), "layer-norm": (1, 1)}
    assert fraction(coverage(model, fused, x)["batch-norm"]) == 0.5
