"""DenseNet-BC 121/161/169/201 (Huang et al., 2016), torchvision's arguments and state_dict keys.

Shapes at a 224x224 input, DenseNet-121 (growth k = 32, blocks (6, 12, 24, 16), 64 initial maps):
    input                                      N x 3 x 224 x 224
    conv0 7x7/2, norm0, relu0                  N x 64 x 112 x 112    one fused conv-bn-relu
    pool0 max 3x3/2                            N x 64 x 56 x 56
    denseblock1 (6 layers: +k maps each)       N x 256 x 56 x 56
    transition1 (bn-relu, 1x1 conv, avg 2x2)   N x 128 x 28 x 28
    denseblock2 (12)                           N x 512 x 28 x 28
    transition2                                N x 256 x 14 x 14
    denseblock3 (24)                           N x 1024 x 14 x 14
    transition3                                N x 512 x 7 x 7
    denseblock4 (16)                           N x 1024 x 7 x 7
    norm5, relu                                N x 1024 x 7 x 7      one fused bn-relu
    global avg-pool, flatten, classifier       N x num_classes

A dense layer is pre-activation: bn -> relu -> 1x1 conv -> bn -> relu -> 3x3 conv on the
concatenation of all earlier maps. Fused: norm1 is a BatchNormAct2d (bn-relu in one pass, the
state_dict of nn.BatchNorm2d), conv1 -> norm2 -> relu2 is one fused conv-bn-relu, conv2 a fastnets
convolution. (torchvision's relu modules hold no state; the fused form has none.)
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import nn

from fastnets import functional as FF
from fastnets import nn as fnn
from fastnets.models import _common as C
from fastnets.nn.conv import fused_conv_bn_act

__all__ = ["DenseNet", "densenet121", "densenet161", "densenet169", "densenet201"]


def _bn_relu(num_features: int, fused: bool) -> nn.BatchNorm2d:
    return fnn.BatchNormAct2d(num_features, activation="relu") if fused else nn.BatchNorm2d(num_features)


class _DenseLayer(nn.Module):
    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float,
                 memory_efficient: bool = False, *, fused: bool = True):
        super().__init__()
        self.norm1 = _bn_relu(num_input_features, fused)
        if not fused:
            self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        if not fused:
            self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient
        self.fused = fused

    def _normalized(self, inputs):
        """bn -> relu of the concatenated maps (the memory-hungry part, recomputed in backward when
        memory_efficient, as torchvision does)."""
        x = torch.cat(inputs, 1)
        return self.norm1(x) if self.fused else self.relu1(self.norm1(x))

    def _any_requires_grad(self, inputs) -> bool:
        return any(t.requires_grad for t in inputs)

    def forward(self, input):
        # (Written, as torchvision's, so that torch.fx can trace it: the list is not iterated
        # unless memory_efficient.)
        prev = [input] if isinstance(input, torch.Tensor) else input
        if self.memory_efficient and self._any_requires_grad(prev):
            x = cp.checkpoint(lambda *t: self._normalized(list(t)), *prev, use_reentrant=False)
        else:
            x = self._normalized(prev)
        if self.fused:
            x = fused_conv_bn_act(x, self.conv1, self.norm2, "relu")
            x = fused_conv_bn_act(x, self.conv2, None, None)
        else:
            x = self.conv2(self.relu2(self.norm2(self.conv1(x))))
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x


class _DenseBlock(nn.ModuleDict):
    _version = 2

    def __init__(self, num_layers, num_input_features, bn_size, growth_rate, drop_rate, memory_efficient=False,
                 *, fused: bool = True):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(num_input_features + i * growth_rate, growth_rate,
                                                              bn_size, drop_rate, memory_efficient, fused=fused))

    def forward(self, init_features):
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Module):
    """bn -> relu -> 1x1 conv -> 2x2/2 average pool (keys norm.*, conv.weight)."""

    def __init__(self, num_input_features: int, num_output_features: int, *, fused: bool = True):
        super().__init__()
        self.norm = _bn_relu(num_input_features, fused)
        if not fused:
            self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = C.layers(fused).AvgPool2d(kernel_size=2, stride=2)
        self.fused = fused

    def forward(self, x):
        if self.fused:
            return self.pool(fused_conv_bn_act(self.norm(x), self.conv, None, None))
        return self.pool(self.conv(self.relu(self.norm(x))))


class DenseNet(nn.Module):
    """torchvision's DenseNet(growth_rate, block_config, num_init_features, bn_size, drop_rate,
    num_classes, memory_efficient) plus keyword-only `fused`."""

    def __init__(self, growth_rate: int = 32, block_config=(6, 12, 24, 16), num_init_features: int = 64,
                 bn_size: int = 4, drop_rate: float = 0, num_classes: int = 1000, memory_efficient: bool = False,
                 *, fused: bool = True):
        super().__init__()
        C.check_int(growth_rate, "growth_rate")
        block_config = C.check_depths(block_config, "block_config")
        C.check_int(num_init_features, "num_init_features")
        C.check_int(bn_size, "bn_size")
        C.check_probability(drop_rate, "drop_rate")
        C.check_int(num_classes, "num_classes")
        L = C.layers(fused)
        self.fused = fused
        self.features = L.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", L.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", _DenseBlock(
                num_layers, num_features, bn_size, growth_rate, drop_rate, memory_efficient, fused=fused))
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(num_features, num_features // 2,
                                                                           fused=fused))
                num_features //= 2
        self.features.add_module("norm5", _bn_relu(num_features, fused))  # relu: fused in, or in forward
        self.classifier = nn.Linear(num_features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if self.fused:
            x = FF.adaptive_avg_pool2d(x, (1, 1))
        else:
            x = F.adaptive_avg_pool2d(F.relu(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def _densenet(growth_rate, block_config, num_init_features, weights, progress, **kwargs) -> DenseNet:
    C.check_weights(weights, progress)
    return DenseNet(growth_rate, block_config, num_init_features, **kwargs)


def densenet121(*, weights=None, progress: bool = True, **kwargs) -> DenseNet:
    """DenseNet-121: k = 32, blocks (6, 12, 24, 16), 64 initial maps."""
    return _densenet(32, (6, 12, 24, 16), 64, weights, progress, **kwargs)


def densenet161(*, weights=None, progress: bool = True, **kwargs) -> DenseNet:
    """DenseNet-161: k = 48, blocks (6, 12, 36, 24), 96 initial maps."""
    return _densenet(48, (6, 12, 36, 24), 96, weights, progress, **kwargs)


def densenet169(*, weights=None, progress: bool = True, **kwargs) -> DenseNet:
    """DenseNet-169: k = 32, blocks (6, 12, 32, 32), 64 initial maps."""
    return _densenet(32, (6, 12, 32, 32), 64, weights, progress, **kwargs)


def densenet201(*, weights=None, progress: bool = True, **kwargs) -> DenseNet:
    """DenseNet-201: k = 32, blocks (6, 12, 48, 32), 64 initial maps."""
    return _densenet(32, (6, 12, 48, 32), 64, weights, progress, **kwargs)
