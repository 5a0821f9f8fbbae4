"""GoogLeNet (Inception v1; Szegedy et al., 2014), torchvision's arguments and state_dict keys.

As in torchvision, the "5x5" branch of each Inception block uses a 3x3 convolution (the weights
torchvision ships were trained that way), batch-norms (eps 1e-3) follow every convolution, and
in training mode with aux_logits the model returns GoogLeNetOutputs(logits, aux_logits2,
aux_logits1).

Shapes at a 224x224 input:
    input                                  N x 3 x 224 x 224
    conv1 7x7/2 (conv-bn-relu)             N x 64 x 112 x 112     one fused op per BasicConv2d
    maxpool1 3x3/2 (ceil)                  N x 64 x 56 x 56
    conv2 1x1, conv3 3x3                   N x 192 x 56 x 56
    maxpool2 3x3/2 (ceil)                  N x 192 x 28 x 28
    inception3a, 3b                        N x 256, 480 x 28 x 28
    maxpool3 3x3/2 (ceil)                  N x 480 x 14 x 14
    inception4a (-> aux1 in training)      N x 512 x 14 x 14
    inception4b, 4c, 4d (-> aux2)          N x 512, 512, 528 x 14 x 14
    inception4e                            N x 832 x 14 x 14
    maxpool4 2x2/2 (ceil)                  N x 832 x 7 x 7
    inception5a, 5b                        N x 832, 1024 x 7 x 7
    avgpool (global), dropout, fc          N x num_classes
  aux classifier: adaptive avg-pool 4x4, conv 1x1 128, fc 2048 -> 1024 relu, dropout, fc.
"""
from __future__ import annotations

from collections import namedtuple

import torch
from torch import nn
import torch.nn.functional as F

from fastnets import functional as FF
from fastnets.models import _common as C
from fastnets.nn.conv import fused_conv_bn_act

__all__ = ["GoogLeNet", "GoogLeNetOutputs", "BasicConv2d", "Inception", "InceptionAux", "googlenet"]

GoogLeNetOutputs = namedtuple("GoogLeNetOutputs", ["logits", "aux_logits2", "aux_logits1"])
GoogLeNetOutputs.__annotations__ = {"logits": torch.Tensor, "aux_logits2": torch.Tensor | None,
                                    "aux_logits1": torch.Tensor | None}


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch-norm (eps 1e-3) -> relu; one fused op when fused."""

    def __init__(self, in_channels: int, out_channels: int, *, fused: bool = True, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)
        self.fused = fused

    def forward(self, x):
        if self.fused:
            return fused_conv_bn_act(x, self.conv, self.bn, "relu")
        return F.relu(self.bn(self.conv(x)))


class Inception(nn.Module):
    """Four branches concatenated on channels: 1x1; 1x1 -> 3x3; 1x1 -> 3x3 (torchvision's "5x5");
    3x3/1 max-pool -> 1x1."""

    def __init__(self, in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj, *, fused: bool = True):
        super().__init__()
        L = C.layers(fused)
        conv = lambda i, o, **kw: BasicConv2d(i, o, fused=fused, **kw)  # noqa: E731
        self.branch1 = conv(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(conv(in_channels, ch3x3red, kernel_size=1),
                                     conv(ch3x3red, ch3x3, kernel_size=3, padding=1))
        self.branch3 = nn.Sequential(conv(in_channels, ch5x5red, kernel_size=1),
                                     conv(ch5x5red, ch5x5, kernel_size=3, padding=1))
        self.branch4 = nn.Sequential(L.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
                                     conv(in_channels, pool_proj, kernel_size=1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    """The auxiliary classifier (training only)."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.7, *, fused: bool = True,
                 width: float = 1.0):
        super().__init__()
        conv, hidden = max(1, int(round(128 * width))), max(1, int(round(1024 * width)))
        self.conv = BasicConv2d(in_channels, conv, kernel_size=1, fused=fused)
        self.fc1 = nn.Linear(conv * 16, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.dropout = nn.Dropout(p=dropout)
        self.fused = fused

    def forward(self, x):
        if self.fused:
            x = torch.flatten(self.conv(FF.adaptive_avg_pool2d(x, (4, 4))), 1)
            x = FF.linear_act(x, self.fc1.weight, self.fc1.bias, "relu")
        else:
            x = torch.flatten(self.conv(F.adaptive_avg_pool2d(x, (4, 4))), 1)
            x = F.relu(self.fc1(x))
        return self.fc2(self.dropout(x))


class GoogLeNet(nn.Module):
    """torchvision's GoogLeNet(num_classes, aux_logits, transform_input, init_weights, blocks,
    dropout, dropout_aux) plus keyword-only `fused` and `width` (a factor on every channel count:
    1.0 is torchvision's network; smaller for tests). `blocks` is accepted only as None (fastnets'
    own BasicConv2d, Inception, InceptionAux): the fused ops need to know the blocks' layers."""

    def __init__(self, num_classes: int = 1000, aux_logits: bool = True, transform_input: bool = False,
                 init_weights: bool | None = None, blocks=None, dropout: float = 0.2, dropout_aux: float = 0.7,
                 *, fused: bool = True, width: float = 1.0):
        super().__init__()
        if blocks is not None:
            if len(blocks) != 3:
                raise ValueError(f"blocks length should be 3 instead of {len(blocks)}")
            raise ValueError("blocks: fastnets' GoogLeNet builds its own BasicConv2d, Inception and InceptionAux; "
                             "pass blocks=None")
        C.check_int(num_classes, "num_classes")
        C.check_probability(dropout, "dropout")
        C.check_probability(dropout_aux, "dropout_aux")
        if not isinstance(width, (int, float)) or isinstance(width, bool) or width <= 0:
            raise ValueError(f"width must be a positive number, got {width!r}")
        if init_weights is None:
            init_weights = True  # torchvision's default (it warns that the default may change)
        L = C.layers(fused)
        self.aux_logits = bool(aux_logits)
        self.transform_input = bool(transform_input)
        c = lambda ch: max(1, int(round(ch * width)))  # noqa: E731
        self.conv1 = BasicConv2d(3, c(64), kernel_size=7, stride=2, padding=3, fused=fused)
        self.maxpool1 = L.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(c(64), c(64), kernel_size=1, fused=fused)
        self.conv3 = BasicConv2d(c(64), c(192), kernel_size=3, padding=1, fused=fused)
        self.maxpool2 = L.MaxPool2d(3, stride=2, ceil_mode=True)
        channels = c(192)

        def inc(*ch):  # the block's six channel counts; its input is the previous block's output
            nonlocal channels
            block = Inception(channels, *map(c, ch), fused=fused)
            channels = c(ch[0]) + c(ch[2]) + c(ch[4]) + c(ch[5])
            return block

        self.inception3a = inc(64, 96, 128, 16, 32, 32)
        self.inception3b = inc(128, 128, 192, 32, 96, 64)
        self.maxpool3 = L.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = inc(192, 96, 208, 16, 48, 64)
        aux1_in = channels
        self.inception4b = inc(160, 112, 224, 24, 64, 64)
        self.inception4c = inc(128, 128, 256, 24, 64, 64)
        self.inception4d = inc(112, 144, 288, 32, 64, 64)
        aux2_in = channels
        self.inception4e = inc(256, 160, 320, 32, 128, 128)
        self.maxpool4 = L.MaxPool2d(2, stride=2, ceil_mode=True)
        self.inception5a = inc(256, 160, 320, 32, 128, 128)
        self.inception5b = inc(384, 192, 384, 48, 128, 128)
        if self.aux_logits:
            self.aux1 = InceptionAux(aux1_in, num_classes, dropout=dropout_aux, fused=fused, width=width)
            self.aux2 = InceptionAux(aux2_in, num_classes, dropout=dropout_aux, fused=fused, width=width)
        else:
            self.aux1 = None
            self.aux2 = None
        self.avgpool = L.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(channels, num_classes)
        if init_weights:
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def _transform_input(self, x):
        """Maps inputs normalized with ImageNet's mean/std to the (x - 0.5) / 0.5 normalization."""
        if not self.transform_input:
            return x
        ch = [x[:, i:i + 1] * (s / 0.5) + (m - 0.5) / 0.5
              for i, (m, s) in enumerate(((0.485, 0.229), (0.456, 0.224), (0.406, 0.225)))]
        return torch.cat(ch, 1)

    def forward(self, x: torch.Tensor):
        x = self._transform_input(x)
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        aux1 = self.aux1(x) if (self.aux1 is not None and self.training) else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if (self.aux2 is not None and self.training) else None
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))
        x = self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
        if self.training and self.aux_logits:
            return GoogLeNetOutputs(x, aux2, aux1)
        return x


def googlenet(*, weights=None, progress: bool = True, **kwargs) -> GoogLeNet:
    """GoogLeNet as torchvision builds it (aux_logits=True by default, as torchvision without weights)."""
    C.check_weights(weights, progress)
    return GoogLeNet(**kwargs)
