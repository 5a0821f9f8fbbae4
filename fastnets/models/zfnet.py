"""ZFNet (Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", 2013), the
paper's form: AlexNet's layout with a 7x7/2 first convolution (AlexNet: 11x11/4), a 5x5/2
second one, dense connections (a single GPU: no groups), and normalization across feature maps
after the first two layers (here torch's LocalResponseNorm with AlexNet's constants; see
fastnets/models/alexnet.py). No torchvision counterpart.

Shapes at the paper's 224x224 input (its Figure 3):
    input                                  N x 3 x 224 x 224
    conv1 7x7/2 pad 1, relu                N x 96 x 110 x 110     one fused conv-relu each
    maxpool 3x3/2 pad 1, LRN               N x 96 x 55 x 55
    conv2 5x5/2, relu                      N x 256 x 26 x 26
    maxpool 3x3/2 pad 1, LRN               N x 256 x 13 x 13
    conv3 3x3 pad 1, relu                  N x 384 x 13 x 13
    conv4 3x3 pad 1, relu                  N x 384 x 13 x 13
    conv5 3x3 pad 1, relu                  N x 256 x 13 x 13
    maxpool 3x3/2                          N x 256 x 6 x 6
    avgpool (adaptive 6x6: the identity at 224x224; lets other sizes through)
    fc6 4096 relu, dropout, fc7 4096 relu, dropout, fc8    N x num_classes
Initialization as the paper: weights N(0, 0.01), biases 0.
"""
from __future__ import annotations

import torch
from torch import nn

from fastnets.models import _common as C
from fastnets.models.alexnet import _check, build_classifier, build_features

__all__ = ["ZFNet", "zfnet"]


class ZFNet(nn.Module):
    """ZFNet(num_classes=1000, dropout=0.5, *, fused=True, widths=(96, 256, 384, 384, 256), hidden=4096)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5, *, fused: bool = True,
                 widths=(96, 256, 384, 384, 256), hidden: int = 4096):
        super().__init__()
        w = _check(num_classes, dropout, widths, hidden)
        L = C.layers(fused)
        self.features = build_features([("conv", w[0], 7, 2, 1, 1), ("pool", 3, 2, 1), ("lrn",),
                                        ("conv", w[1], 5, 2, 0, 1), ("pool", 3, 2, 1), ("lrn",),
                                        ("conv", w[2], 3, 1, 1, 1), ("conv", w[3], 3, 1, 1, 1),
                                        ("conv", w[4], 3, 1, 1, 1), ("pool", 3, 2, 0)], L)
        self.avgpool = L.AdaptiveAvgPool2d((6, 6))
        self.classifier = build_classifier(w[4] * 36, hidden, num_classes, dropout, L, dropout_first=False)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def zfnet(**kwargs) -> ZFNet:
    """ZFNet as the 2013 paper describes it (224x224 input)."""
    return ZFNet(**kwargs)
