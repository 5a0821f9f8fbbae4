"""AlexNet: torchvision's form (alexnet) and the 2012 paper's form (alexnet_2012).

torchvision's form (Krizhevsky's "one weird trick" variant: 64-192-384-256-256 channels, no
normalization), torchvision's arguments and state_dict keys. Shapes at a 224x224 input:
    input                                  N x 3 x 224 x 224
    conv 11x11/4 pad 2, relu               N x 64 x 55 x 55       one fused conv-relu each
    maxpool 3x3/2                          N x 64 x 27 x 27
    conv 5x5 pad 2, relu; maxpool 3x3/2    N x 192 x 13 x 13
    conv 3x3, relu                         N x 384 x 13 x 13
    conv 3x3, relu; conv 3x3, relu         N x 256 x 13 x 13
    maxpool 3x3/2                          N x 256 x 6 x 6
    avgpool (adaptive 6x6)                 N x 256 x 6 x 6
    dropout, fc 4096 relu, dropout,
    fc 4096 relu, fc                       N x num_classes        fc + relu: fastnets linear_act

The 2012 paper's form (Krizhevsky, Sutskever & Hinton, "ImageNet Classification with Deep
Convolutional Neural Networks"): 96-256-384-384-256 channels, local response normalization after
the first two conv-relus, and (groups=2, the default) the paper's two-GPU split, in which conv2,
conv4 and conv5 see only the kernel maps on their own GPU (grouped convolutions). The paper's
"224x224" input only works out at 227x227 (with no padding in conv1):
    input                                  N x 3 x 227 x 227
    conv1 11x11/4, relu, LRN               N x 96 x 55 x 55
    maxpool 3x3/2                          N x 96 x 27 x 27
    conv2 5x5 pad 2 (groups), relu, LRN    N x 256 x 27 x 27
    maxpool 3x3/2                          N x 256 x 13 x 13
    conv3 3x3 pad 1, relu                  N x 384 x 13 x 13
    conv4 3x3 pad 1 (groups), relu         N x 384 x 13 x 13
    conv5 3x3 pad 1 (groups), relu         N x 256 x 13 x 13
    maxpool 3x3/2                          N x 256 x 6 x 6
    avgpool (adaptive 6x6: the identity at 227x227; lets other sizes through)
    fc6 4096 relu, dropout, fc7 4096 relu, dropout, fc8    N x num_classes
The paper's normalization is b = a / (k + alpha * sum a^2)^beta over n = 5 adjacent maps with
k = 2, alpha = 1e-4, beta = 0.75; torch's LocalResponseNorm divides alpha by n, so it is built with
alpha = 5e-4. Initialization as the paper: weights N(0, 0.01), biases 1 in conv2, conv4, conv5 and
the hidden fully-connected layers, 0 elsewhere.
"""
from __future__ import annotations

import torch
from torch import nn

from fastnets.models import _common as C

__all__ = ["AlexNet", "AlexNet2012", "alexnet", "alexnet_2012", "build_features", "build_classifier"]

# The paper's normalization constants, in torch's convention (alpha divided by size).
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 5 * 1e-4, 0.75, 2.0


def build_features(spec, L, in_channels: int = 3) -> nn.Sequential:
    """A feature extractor from a list of layers:
        ("conv", out_channels, kernel, stride, padding, groups)   conv + relu
        ("lrn",)                                                  the paper's normalization
        ("pool", kernel, stride, padding)                         max-pool
    """
    layers: list[nn.Module] = []
    for kind, *args in spec:
        if kind == "conv":
            out, k, s, p, g = args
            if in_channels % g or out % g:
                raise ValueError(f"groups={g} must divide the conv's channels ({in_channels} -> {out})")
            layers += [nn.Conv2d(in_channels, out, k, stride=s, padding=p, groups=g), nn.ReLU(inplace=True)]
            in_channels = out
        elif kind == "lrn":
            layers.append(L.LocalResponseNorm(LRN_SIZE, alpha=LRN_ALPHA, beta=LRN_BETA, k=LRN_K))
        else:
            k, s, p = args
            layers.append(L.MaxPool2d(kernel_size=k, stride=s, padding=p))
    return L.Sequential(*layers)


def build_classifier(in_features: int, hidden: int, num_classes: int, dropout: float, L,
                     dropout_first: bool) -> nn.Sequential:
    """Three fully-connected layers with relu; dropout before each hidden layer (torchvision) or
    after it (the papers: dropout on the outputs of fc6 and fc7)."""
    drop = lambda: nn.Dropout(p=dropout)  # noqa: E731
    if dropout_first:
        return L.Sequential(drop(), nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
                            drop(), nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))
    return L.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), drop(),
                        nn.Linear(hidden, hidden), nn.ReLU(inplace=True), drop(), nn.Linear(hidden, num_classes))


def _check(num_classes, dropout, widths, hidden):
    C.check_int(num_classes, "num_classes")
    C.check_probability(dropout, "dropout")
    C.check_int(hidden, "hidden")
    if not isinstance(widths, (list, tuple)) or len(widths) != 5:
        raise ValueError(f"widths must list the 5 convolutions' output channels, got {widths!r}")
    return [C.check_int(w, f"widths[{i}]") for i, w in enumerate(widths)]


class AlexNet(nn.Module):
    """torchvision's AlexNet(num_classes, dropout) plus keyword-only `fused`, and `widths` (the 5
    convs' channels) and `hidden` (the fc width) to build smaller variants."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5, *, fused: bool = True,
                 widths=(64, 192, 384, 256, 256), hidden: int = 4096):
        super().__init__()
        w = _check(num_classes, dropout, widths, hidden)
        L = C.layers(fused)
        self.features = build_features([("conv", w[0], 11, 4, 2, 1), ("pool", 3, 2, 0),
                                        ("conv", w[1], 5, 1, 2, 1), ("pool", 3, 2, 0),
                                        ("conv", w[2], 3, 1, 1, 1), ("conv", w[3], 3, 1, 1, 1),
                                        ("conv", w[4], 3, 1, 1, 1), ("pool", 3, 2, 0)], L)
        self.avgpool = L.AdaptiveAvgPool2d((6, 6))
        self.classifier = build_classifier(w[4] * 36, hidden, num_classes, dropout, L, dropout_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class AlexNet2012(nn.Module):
    """The 2012 paper's AlexNet (see the module docstring). groups=2 is the paper's two-GPU split
    (conv2, conv4 and conv5 grouped); groups=1 connects every map (the single-GPU variant)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5, *, groups: int = 2, fused: bool = True,
                 widths=(96, 256, 384, 384, 256), hidden: int = 4096):
        super().__init__()
        w = _check(num_classes, dropout, widths, hidden)
        g = C.check_int(groups, "groups")
        L = C.layers(fused)
        self.features = build_features([("conv", w[0], 11, 4, 0, 1), ("lrn",), ("pool", 3, 2, 0),
                                        ("conv", w[1], 5, 1, 2, g), ("lrn",), ("pool", 3, 2, 0),
                                        ("conv", w[2], 3, 1, 1, 1), ("conv", w[3], 3, 1, 1, g),
                                        ("conv", w[4], 3, 1, 1, g), ("pool", 3, 2, 0)], L)
        self.avgpool = L.AdaptiveAvgPool2d((6, 6))
        self.classifier = build_classifier(w[4] * 36, hidden, num_classes, dropout, L, dropout_first=False)
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        fcs = [m for m in self.classifier if isinstance(m, nn.Linear)]
        for m in convs + fcs:
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
        for m in (convs[1], convs[3], convs[4], fcs[0], fcs[1]):
            nn.init.ones_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def alexnet(*, weights=None, progress: bool = True, **kwargs) -> AlexNet:
    """AlexNet as torchvision builds it (state_dict keys and shapes of torchvision.models.alexnet)."""
    C.check_weights(weights, progress)
    return AlexNet(**kwargs)


def alexnet_2012(**kwargs) -> AlexNet2012:
    """AlexNet as the 2012 paper describes it: LRN, 96-256-384-384-256 channels, 227x227 input."""
    return AlexNet2012(**kwargs)
