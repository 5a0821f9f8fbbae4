"""ResNet 18/34/50/101/152 (He et al., 2015), torchvision's arguments and state_dict keys.

Shapes at a 224x224 input (N = batch), Bottleneck expansion 4 (BasicBlock: 1):
    input                          N x 3 x 224 x 224
    conv1 7x7/2, bn1, relu         N x 64 x 112 x 112      one fused conv-bn-relu
    maxpool 3x3/2                  N x 64 x 56 x 56        fastnets max-pool
    layer1                         N x 64e x 56 x 56       (e = block.expansion)
    layer2 (stride 2)              N x 128e x 28 x 28
    layer3 (stride 2)              N x 256e x 14 x 14
    layer4 (stride 2)              N x 512e x 7 x 7
    avgpool (global)               N x 512e x 1 x 1        fastnets global average pool
    flatten, fc                    N x num_classes

In a block, conv -> bn -> relu is one fused op, and the last conv -> bn -> (+ identity) -> relu is
one fused op with the residual added in its epilogue. The modules keep torchvision's names
(conv1, bn1, ..., downsample.0/1): fused_conv_bn_act runs a stock (Conv2d, BatchNorm2d) pair in
place, so a torchvision checkpoint loads unchanged.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fastnets import nn as fnn
from fastnets.models import _common as C
from fastnets.nn.conv import fused_conv_bn_act

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


def _conv3x3(in_planes, out_planes, stride=1, groups=1, dilation=1):
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=dilation, groups=groups, bias=False,
                     dilation=dilation)


def _conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


def _downsample(inplanes, planes, stride, fused):
    """The projection shortcut: 1x1 conv + batch-norm, keys downsample.0 / downsample.1."""
    if fused:
        return fnn.ConvBNAct2d(inplanes, planes, 1, stride=stride, bias=False, activation=None)
    return nn.Sequential(_conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))


class BasicBlock(nn.Module):
    """3x3 conv-bn-relu, 3x3 conv-bn, + identity, relu."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1,
                 norm_layer=None, *, fused=True):
        super().__init__()
        _check_norm_layer(norm_layer)
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride
        self.fused = fused

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        if self.fused:
            out = fused_conv_bn_act(x, self.conv1, self.bn1, "relu")
            return fused_conv_bn_act(out, self.conv2, self.bn2, "relu", residual=identity)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 conv-bn-relu, 3x3 conv-bn-relu (the stride, as torchvision's v1.5), 1x1 conv-bn,
    + identity, relu."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1,
                 norm_layer=None, *, fused=True):
        super().__init__()
        _check_norm_layer(norm_layer)
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride, groups, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.fused = fused

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        if self.fused:
            out = fused_conv_bn_act(x, self.conv1, self.bn1, "relu")
            out = fused_conv_bn_act(out, self.conv2, self.bn2, "relu")
            return fused_conv_bn_act(out, self.conv3, self.bn3, "relu", residual=identity)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _check_norm_layer(norm_layer):
    if norm_layer is not None and norm_layer is not nn.BatchNorm2d:
        raise ValueError("norm_layer: fastnets' ResNet fuses nn.BatchNorm2d into its convolutions; "
                         f"other normalizations are not supported, got {norm_layer!r}")


class ResNet(nn.Module):
    """torchvision's ResNet(block, layers, num_classes, zero_init_residual, groups, width_per_group,
    replace_stride_with_dilation, norm_layer) plus keyword-only `fused` (see fastnets.models._common)
    and `width`: the stem's channels, the stages having width, 2, 4 and 8 times width (torchvision: 64;
    smaller for tests). norm_layer may only be None or nn.BatchNorm2d (the fused ops fold a batch-norm)."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], num_classes: int = 1000,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: list[bool] | None = None,
                 norm_layer: Callable[..., nn.Module] | None = None, *, fused: bool = True, width: int = 64):
        super().__init__()
        if block not in (BasicBlock, Bottleneck):
            raise TypeError(f"block must be BasicBlock or Bottleneck, got {block!r}")
        layers = C.check_depths(layers, "layers", 4)
        C.check_int(num_classes, "num_classes")
        C.check_int(groups, "groups")
        C.check_int(width_per_group, "width_per_group")
        C.check_int(width, "width")
        _check_norm_layer(norm_layer)
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None "
                             f"or a 3-element tuple, got {replace_stride_with_dilation}")
        L = C.layers(fused)
        self.fused = fused
        self.inplanes = width
        self.dilation = 1
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = L.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], 2, replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 4 * width, layers[2], 2, replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 8 * width, layers[3], 2, replace_stride_with_dilation[2])
        self.avgpool = L.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:  # each residual branch starts as zero: the block starts as identity
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = _downsample(self.inplanes, planes * block.expansion, stride, self.fused)
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                        previous_dilation, fused=self.fused)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                                dilation=self.dilation, fused=self.fused))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            x = fused_conv_bn_act(x, self.conv1, self.bn1, "relu")
        else:
            x = self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _resnet(block, layers, weights, progress, **kwargs) -> ResNet:
    C.check_weights(weights, progress)
    return ResNet(block, layers, **kwargs)


def resnet18(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    """ResNet-18: BasicBlock, [2, 2, 2, 2]."""
    return _resnet(BasicBlock, [2, 2, 2, 2], weights, progress, **kwargs)


def resnet34(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    """ResNet-34: BasicBlock, [3, 4, 6, 3]."""
    return _resnet(BasicBlock, [3, 4, 6, 3], weights, progress, **kwargs)


def resnet50(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    """ResNet-50: Bottleneck, [3, 4, 6, 3]."""
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, **kwargs)


def resnet101(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    """ResNet-101: Bottleneck, [3, 4, 23, 3]."""
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def resnet152(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    """ResNet-152: Bottleneck, [3, 8, 36, 3]."""
    return _resnet(Bottleneck, [3, 8, 36, 3], weights, progress, **kwargs)
