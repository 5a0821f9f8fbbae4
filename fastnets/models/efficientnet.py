"""EfficientNet B0-B7 (Tan & Le, 2019), torchvision's arguments and state_dict keys.

Shapes at a 224x224 input, B0 (B1-B7 scale the channels by width_mult, rounded to multiples of
8, and the blocks per stage by depth_mult, rounded up; their input sizes are larger):
    input                                          N x 3 x 224 x 224
    features.0  conv 3x3/2, bn, silu               N x 32 x 112 x 112     one fused conv-bn-silu
    features.1  MBConv1 k3 x1                      N x 16 x 112 x 112
    features.2  MBConv6 k3 x2 (stride 2)           N x 24 x 56 x 56
    features.3  MBConv6 k5 x2 (stride 2)           N x 40 x 28 x 28
    features.4  MBConv6 k3 x3 (stride 2)           N x 80 x 14 x 14
    features.5  MBConv6 k5 x3                      N x 112 x 14 x 14
    features.6  MBConv6 k5 x4 (stride 2)           N x 192 x 7 x 7
    features.7  MBConv6 k3 x1                      N x 320 x 7 x 7
    features.8  conv 1x1, bn, silu                 N x 1280 x 7 x 7
    avgpool (global), flatten, dropout, fc         N x num_classes

An MBConv block: expand 1x1 conv-bn-silu (when expand_ratio > 1), depthwise kxk conv-bn-silu,
squeeze-and-excitation (global pool, 1x1 conv-silu, 1x1 conv-sigmoid, scale), project 1x1
conv-bn, and the residual when the shape is kept (with stochastic depth in training). Fused, the
conv-bn-act steps are ConvBNAct2d (the keys of torchvision's Conv2dNormActivation: .0 conv,
.1 bn), the SE convs ConvAct2d, and the residual is added in the project conv's epilogue when
stochastic depth is off (eval mode, or probability 0).
"""
from __future__ import annotations

import copy
import math
from functools import partial

import torch
from torch import nn

from fastnets import nn as fnn
from fastnets.models import _common as C

__all__ = ["EfficientNet", "MBConvConfig", "MBConv", "StochasticDepth"] + [f"efficientnet_b{i}" for i in range(8)]


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Rounds to the nearest multiple of divisor, at least divisor, never more than 10% down (the
    channel rounding of the TF reference)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class MBConvConfig:
    """One stage (Table 1 of the paper): expand_ratio, kernel, stride, input and output channels,
    blocks; channels scaled by width_mult and blocks by depth_mult, as torchvision."""

    def __init__(self, expand_ratio: float, kernel: int, stride: int, input_channels: int, out_channels: int,
                 num_layers: int, width_mult: float = 1.0, depth_mult: float = 1.0):
        self.expand_ratio = expand_ratio
        self.kernel = kernel
        self.stride = stride
        self.input_channels = self.adjust_channels(input_channels, width_mult)
        self.out_channels = self.adjust_channels(out_channels, width_mult)
        self.num_layers = int(math.ceil(num_layers * depth_mult))

    @staticmethod
    def adjust_channels(channels: int, width_mult: float) -> int:
        return _make_divisible(channels * width_mult, 8)

    def __repr__(self) -> str:
        return (f"MBConvConfig(expand_ratio={self.expand_ratio}, kernel={self.kernel}, stride={self.stride}, "
                f"input_channels={self.input_channels}, out_channels={self.out_channels}, "
                f"num_layers={self.num_layers})")


class StochasticDepth(nn.Module):
    """Drops the residual branch of whole samples with probability p in training ("row" mode: one
    draw per sample), scaling the kept ones by 1 / (1 - p); the identity in eval mode."""

    def __init__(self, p: float, mode: str = "row"):
        super().__init__()
        if mode not in ("row", "batch"):
            raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
        self.p = C.check_probability(p, "p")
        self.mode = mode

    def forward(self, input):
        if not self.training or self.p == 0.0:
            return input
        survival = 1.0 - self.p
        size = [input.shape[0]] + [1] * (input.dim() - 1) if self.mode == "row" else [1] * input.dim()
        noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(survival)
        if survival > 0.0:
            noise.div_(survival)
        return input * noise

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode}"


def _conv_norm_act(in_ch, out_ch, kernel, stride=1, groups=1, *, activation, bn, fused):
    """torchvision's Conv2dNormActivation(norm=BatchNorm2d): keys .0 (conv, no bias), .1 (bn)."""
    padding = (kernel - 1) // 2
    if fused:
        return fnn.ConvBNAct2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False, eps=bn["eps"],
                               momentum=bn["momentum"], activation=activation)
    layers = [nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False),
              nn.BatchNorm2d(out_ch, **bn)]
    if activation == "silu":
        layers.append(nn.SiLU(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """x * sigmoid(fc2(silu(fc1(avgpool(x))))), fc1/fc2 1x1 convs with bias (keys fc1.*, fc2.*)."""

    def __init__(self, input_channels: int, squeeze_channels: int, *, fused: bool = True):
        super().__init__()
        self.avgpool = C.layers(fused).AdaptiveAvgPool2d(1)
        if fused:
            self.fc1 = fnn.ConvAct2d(input_channels, squeeze_channels, 1, activation="silu")
            self.fc2 = fnn.ConvAct2d(squeeze_channels, input_channels, 1, activation="sigmoid")
        else:
            self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
            self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
            self.activation = nn.SiLU(inplace=True)
            self.scale_activation = nn.Sigmoid()
        self.fused = fused

    def forward(self, x):
        scale = self.avgpool(x)
        if self.fused:
            scale = self.fc2(self.fc1(scale))
        else:
            scale = self.scale_activation(self.fc2(self.activation(self.fc1(scale))))
        return scale * x


class MBConv(nn.Module):
    def __init__(self, cnf: MBConvConfig, stochastic_depth_prob: float, bn: dict, *, fused: bool = True):
        super().__init__()
        if not 1 <= cnf.stride <= 2:
            raise ValueError("illegal stride value")
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        expanded = MBConvConfig.adjust_channels(cnf.input_channels, cnf.expand_ratio)
        cna = partial(_conv_norm_act, bn=bn, fused=fused)
        layers: list[nn.Module] = []
        if expanded != cnf.input_channels:
            layers.append(cna(cnf.input_channels, expanded, 1, activation="silu"))
        layers.append(cna(expanded, expanded, cnf.kernel, cnf.stride, groups=expanded, activation="silu"))
        layers.append(SqueezeExcitation(expanded, max(1, cnf.input_channels // 4), fused=fused))
        layers.append(cna(expanded, cnf.out_channels, 1, activation=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")
        self.out_channels = cnf.out_channels
        self.fused = fused

    def forward(self, input):
        if not self.fused:
            result = self.block(input)
            if self.use_res_connect:
                result = self.stochastic_depth(result) + input
            return result
        x = input
        for layer in self.block[:-1]:
            x = layer(x)
        project = self.block[-1]
        if not self.use_res_connect:
            return project(x)
        if self.training and self.stochastic_depth.p > 0:
            return self.stochastic_depth(project(x)) + input
        return project(x, residual=input)  # the residual in the fused epilogue


def _batch_norm_args(norm_layer) -> dict:
    """eps and momentum of norm_layer: None (nn.BatchNorm2d's defaults), nn.BatchNorm2d, or a
    partial of it (torchvision's B5-B7: eps 1e-3, momentum 0.01)."""
    if norm_layer is None:
        return {"eps": 1e-5, "momentum": 0.1}
    probe = norm_layer(1, device="meta") if callable(norm_layer) else None
    if type(probe) is not nn.BatchNorm2d:
        raise ValueError("norm_layer: fastnets' EfficientNet fuses nn.BatchNorm2d into its convolutions; pass None, "
                         f"nn.BatchNorm2d or a functools.partial of it, got {norm_layer!r}")
    return {"eps": probe.eps, "momentum": probe.momentum}


class EfficientNet(nn.Module):
    """torchvision's EfficientNet(inverted_residual_setting, dropout, stochastic_depth_prob,
    num_classes, norm_layer, last_channel) for the MBConv (B0-B7) family, plus keyword-only
    `fused`. norm_layer: None, nn.BatchNorm2d or a partial of it."""

    def __init__(self, inverted_residual_setting: list[MBConvConfig], dropout: float,
                 stochastic_depth_prob: float = 0.2, num_classes: int = 1000, norm_layer=None,
                 last_channel: int | None = None, *, fused: bool = True):
        super().__init__()
        if not inverted_residual_setting:
            raise ValueError("The inverted_residual_setting should not be empty")
        if not (isinstance(inverted_residual_setting, (list, tuple))
                and all(isinstance(s, MBConvConfig) for s in inverted_residual_setting)):
            raise TypeError("The inverted_residual_setting should be List[MBConvConfig]")
        C.check_probability(dropout, "dropout")
        C.check_probability(stochastic_depth_prob, "stochastic_depth_prob")
        C.check_int(num_classes, "num_classes")
        if last_channel is not None:
            C.check_int(last_channel, "last_channel")
        bn = _batch_norm_args(norm_layer)
        L = C.layers(fused)

        first = inverted_residual_setting[0].input_channels
        layers: list[nn.Module] = [_conv_norm_act(3, first, 3, 2, activation="silu", bn=bn, fused=fused)]
        total_blocks = sum(cnf.num_layers for cnf in inverted_residual_setting)
        block_id = 0
        for cnf in inverted_residual_setting:
            stage = []
            for _ in range(cnf.num_layers):
                block_cnf = copy.copy(cnf)
                if stage:  # later blocks of a stage keep the shape
                    block_cnf.input_channels, block_cnf.stride = block_cnf.out_channels, 1
                sd_prob = stochastic_depth_prob * float(block_id) / total_blocks
                stage.append(MBConv(block_cnf, sd_prob, bn, fused=fused))
                block_id += 1
            layers.append(nn.Sequential(*stage))
        last_in = inverted_residual_setting[-1].out_channels
        last_out = last_channel if last_channel is not None else 4 * last_in
        layers.append(_conv_norm_act(last_in, last_out, 1, activation="silu", bn=bn, fused=fused))
        self.features = nn.Sequential(*layers)
        self.avgpool = L.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True), nn.Linear(last_out, num_classes))
        # torchvision's: kaiming normal, fan_out (its default leaky_relu gain with slope 0 is relu's sqrt(2))
        C.init_kaiming_fan_out(self, linear="uniform_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# (width_mult, depth_mult, dropout, batch-norm eps and momentum) per variant, as torchvision.
_VARIANTS = {0: (1.0, 1.0, 0.2, None), 1: (1.0, 1.1, 0.2, None), 2: (1.1, 1.2, 0.3, None), 3: (1.2, 1.4, 0.3, None),
             4: (1.4, 1.8, 0.4, None), 5: (1.6, 2.2, 0.4, (1e-3, 0.01)), 6: (1.8, 2.6, 0.5, (1e-3, 0.01)),
             7: (2.0, 3.1, 0.5, (1e-3, 0.01))}


def mbconv_setting(width_mult: float = 1.0, depth_mult: float = 1.0) -> list[MBConvConfig]:
    """B0's stages (expand_ratio, kernel, stride, in, out, blocks), scaled."""
    stages = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
              (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]
    return [MBConvConfig(*s, width_mult=width_mult, depth_mult=depth_mult) for s in stages]


def _efficientnet(variant: int, weights, progress, **kwargs) -> EfficientNet:
    C.check_weights(weights, progress)
    width, depth, dropout, bn = _VARIANTS[variant]
    if bn is not None and "norm_layer" not in kwargs:
        kwargs["norm_layer"] = partial(nn.BatchNorm2d, eps=bn[0], momentum=bn[1])
    return EfficientNet(mbconv_setting(width, depth), kwargs.pop("dropout", dropout), **kwargs)


def efficientnet_b0(*, weights=None, progress: bool = True, **kwargs) -> EfficientNet:
    """EfficientNet-B0 (width 1.0, depth 1.0, dropout 0.2; 224x224)."""
    return _efficientnet(0, weights, progress, **kwargs)


def efficientnet_b1(*, weights=None, progress: bool = True, **kwargs) -> EfficientNet:
    """EfficientNet-B1 (width 1.0, depth 1.1, dropout 0.2; 240x240)."""
    return _efficientnet(1, weights, progress, **kwargs)


def efficientnet_b2(*, weights=None, progress: bool = True, **kwargs) -> EfficientNet:
    """EfficientNet-B2 (width 1.1, depth 1.2, dropout 0.3; 288x288)."""
    return _efficientnet(2, weights, progress, **kwargs)


def efficientnet_b3(*, weights=None, progress: bool = True, **kwargs) -> EfficientNet:
    """EfficientNet-B3 (width 1.2, depth 1.4, dropout 0.3; 300x300)."""
    return _efficientnet(3, weights, progress, **kwargs)


def efficientnet_b4(*, weights=None, progress: bool = True, **kwargs) -> EfficientNet:
    """EfficientNet-B4 (width 1.4, depth 1.8, dropout 0.4; 380x380)."""
    return _efficientnet(4, weights, progress, **kwargs)


def efficientnet_b5(*, weights=None, progress: bool = True, **kwargs) -> EfficientNet:
    """EfficientNet-B5 (width 1.6, depth 2.2, dropout 0.4, batch-norm eps 1e-3 momentum 0.01; 456x456)."""
    return _efficientnet(5, weights, progress, **kwargs)


def efficientnet_b6(*, weights=None, progress: bool = True, **kwargs) -> EfficientNet:
    """EfficientNet-B6 (width 1.8, depth 2.6, dropout 0.5, batch-norm eps 1e-3 momentum 0.01; 528x528)."""
    return _efficientnet(6, weights, progress, **kwargs)


def efficientnet_b7(*, weights=None, progress: bool = True, **kwargs) -> EfficientNet:
    """EfficientNet-B7 (width 2.0, depth 3.1, dropout 0.5, batch-norm eps 1e-3 momentum 0.01; 600x600)."""
    return _efficientnet(7, weights, progress, **kwargs)
