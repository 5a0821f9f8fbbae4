"""VGG 11/13/16/19, with and without batch-norm (Simonyan & Zisserman, 2014): torchvision's
arguments and state_dict keys.

Shapes at a 224x224 input, VGG-16 (configuration "D"; the others differ in the convs per stage):
    input                                  N x 3 x 224 x 224
    2 x (conv3x3 64 [bn] relu), maxpool    N x 64 x 112 x 112
    2 x (conv3x3 128 ...), maxpool         N x 128 x 56 x 56
    3 x (conv3x3 256 ...), maxpool         N x 256 x 28 x 28
    3 x (conv3x3 512 ...), maxpool         N x 512 x 14 x 14
    3 x (conv3x3 512 ...), maxpool         N x 512 x 7 x 7
    avgpool (adaptive 7x7)                 N x 512 x 7 x 7
    flatten, fc 4096 relu, dropout,
    fc 4096 relu, dropout, fc              N x num_classes

`features` keeps torchvision's indices (conv, [bn,] relu, ..., maxpool): in the fused form it is a
FusedSequential, which runs each conv [-> bn] -> relu as one fused op, and the classifier's
linear -> relu as fastnets linear_act.
"""
from __future__ import annotations

import torch
from torch import nn

from fastnets.models import _common as C

__all__ = ["VGG", "make_layers", "cfgs", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn",
           "vgg19", "vgg19_bn"]

# Output channels of each 3x3 conv, "M" a 2x2/2 max-pool (the paper's configurations A, B, D, E).
cfgs: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def make_layers(cfg: list[int | str], batch_norm: bool = False, *, fused: bool = True) -> nn.Sequential:
    """The feature extractor of a configuration: conv3x3 [bn] relu per int, max-pool per "M"."""
    if not isinstance(cfg, (list, tuple)) or not cfg:
        raise ValueError(f"cfg must be a non-empty list of channel counts and 'M', got {cfg!r}")
    L = C.layers(fused)
    layers: list[nn.Module] = []
    in_channels = 3
    for i, v in enumerate(cfg):
        if v == "M":
            layers.append(L.MaxPool2d(kernel_size=2, stride=2))
            continue
        v = C.check_int(v, f"cfg[{i}]")
        layers.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        in_channels = v
    return L.Sequential(*layers)


def _last_channels(features: nn.Module) -> int:
    convs = [m for m in features.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("features must contain a convolution (its output channels size the classifier)")
    return convs[-1].out_channels


class VGG(nn.Module):
    """torchvision's VGG(features, num_classes, init_weights, dropout) plus keyword-only `fused`
    and `hidden` (the classifier's hidden width, 4096 in torchvision). The classifier's input is
    the last conv's channels x 7 x 7 (512 x 7 x 7 for the paper's configurations)."""

    def __init__(self, features: nn.Module, num_classes: int = 1000, init_weights: bool = True,
                 dropout: float = 0.5, *, fused: bool = True, hidden: int = 4096):
        super().__init__()
        if not isinstance(features, nn.Module):
            raise TypeError(f"features must be an nn.Module, got {type(features).__name__}")
        C.check_int(num_classes, "num_classes")
        C.check_int(hidden, "hidden")
        C.check_probability(dropout, "dropout")
        L = C.layers(fused)
        self.features = features
        self.avgpool = L.AdaptiveAvgPool2d((7, 7))
        self.classifier = L.Sequential(
            nn.Linear(_last_channels(features) * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes))
        if init_weights:
            C.init_kaiming_fan_out(self, linear="normal")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _vgg(cfg: str, batch_norm: bool, weights, progress, fused: bool = True, **kwargs) -> VGG:
    C.check_weights(weights, progress)
    return VGG(make_layers(cfgs[cfg], batch_norm, fused=fused), fused=fused, **kwargs)


def vgg11(*, weights=None, progress: bool = True, **kwargs) -> VGG:
    """VGG-11 (configuration A)."""
    return _vgg("A", False, weights, progress, **kwargs)


def vgg11_bn(*, weights=None, progress: bool = True, **kwargs) -> VGG:
    """VGG-11 with batch-norm."""
    return _vgg("A", True, weights, progress, **kwargs)


def vgg13(*, weights=None, progress: bool = True, **kwargs) -> VGG:
    """VGG-13 (configuration B)."""
    return _vgg("B", False, weights, progress, **kwargs)


def vgg13_bn(*, weights=None, progress: bool = True, **kwargs) -> VGG:
    """VGG-13 with batch-norm."""
    return _vgg("B", True, weights, progress, **kwargs)


def vgg16(*, weights=None, progress: bool = True, **kwargs) -> VGG:
    """VGG-16 (configuration D)."""
    return _vgg("D", False, weights, progress, **kwargs)


def vgg16_bn(*, weights=None, progress: bool = True, **kwargs) -> VGG:
    """VGG-16 with batch-norm."""
    return _vgg("D", True, weights, progress, **kwargs)


def vgg19(*, weights=None, progress: bool = True, **kwargs) -> VGG:
    """VGG-19 (configuration E)."""
    return _vgg("E", False, weights, progress, **kwargs)


def vgg19_bn(*, weights=None, progress: bool = True, **kwargs) -> VGG:
    """VGG-19 with batch-norm."""
    return _vgg("E", True, weights, progress, **kwargs)
