"""Pieces shared by the model files: the fused/stock layer choice, the fused Sequential, argument
checks, and torchvision's weight initializations.

Every builder takes a keyword `fused` (default True). fused=True builds the network from fastnets
layers (fused conv-bn-act through fastnets.nn.conv.fused_conv_bn_act, fastnets pooling, LRN,
layer-norm and attention modules); fused=False builds the same network, with the same modules
under the same names, from stock torch.nn only (torchvision's form): a baseline, and the input of
fastnets.fuse() in the tests. Both forms have identical state_dict keys and shapes, so weights move
between them (and from torchvision) with load_state_dict(strict=True).
"""
from __future__ import annotations

import math
import numbers

from torch import nn

from fastnets import functional as FF
from fastnets import nn as fnn
from fastnets.nn.conv import conv_act_max_pool, fused_conv_bn_act

# The activation modules a fused op can apply, and their fastnets names (fastnets/ops/_activation.py).
_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Sigmoid: "sigmoid"}


def activation_name(module: nn.Module) -> str | None:
    """The fastnets activation name of a stock activation module, or None when it is not one the
    fused ops apply (nn.GELU counts only in its exact erf form, approximate="none")."""
    kind = type(module)
    if kind in _ACTIVATION_MODULES:
        return _ACTIVATION_MODULES[kind]
    if kind is nn.GELU and module.approximate == "none":
        return "gelu"
    return None


class _Layers:
    """The module classes of one form: attribute X is fastnets.nn.X (fused) or torch.nn.X (stock),
    Sequential FusedSequential or nn.Sequential. Looked up when used."""

    def __init__(self, fused: bool):
        self.fused = fused

    def __getattr__(self, name: str):
        if name == "Sequential":
            return FusedSequential if self.fused else nn.Sequential
        return getattr(fnn if self.fused else nn, name)


def layers(fused: bool) -> _Layers:
    """The module classes a model is built from: fastnets' when fused, else torch.nn's. Both take
    the same constructor arguments and have the same state_dict keys."""
    if not isinstance(fused, bool):
        raise TypeError(f"fused must be a bool, got {type(fused).__name__}")
    return _Layers(fused)


class FusedSequential(nn.Sequential):
    """nn.Sequential (same children, same state_dict keys) that runs each run of children
        nn.Conv2d [-> nn.BatchNorm2d] [-> activation]   as one fused_conv_bn_act
        nn.Linear -> activation                         as one fastnets.functional.linear_act
    and every other child as it is. The activation modules stay in place (torchvision's indices
    and names are kept) but are applied inside the fused op, not a second time. In CPU inference a
    relu/relu6 followed by a max-pool is applied after the pool (the same values, fewer elements). The runs are read
    from the children at each call, so a child replaced later (a new classifier head) is honoured.
    """

    def forward(self, input):
        children = list(self._modules.values())
        i, n = 0, len(children)
        while i < n:
            m = children[i]
            if type(m) is nn.Conv2d and m.padding_mode == "zeros":
                bn = children[i + 1] if i + 1 < n and type(children[i + 1]) is nn.BatchNorm2d else None
                j = i + 1 + (bn is not None)
                act = activation_name(children[j]) if j < n else None
                pool = children[j + 1] if act in ("relu", "relu6") and j + 1 < n else None
                if isinstance(pool, nn.MaxPool2d) and not pool.return_indices:
                    input = conv_act_max_pool(input, m, bn, act, pool)  # in CPU inference: act after the pool
                    i = j + 2
                    continue
                input = fused_conv_bn_act(input, m, bn, act)
                i = j + (act is not None)
                continue
            if type(m) is nn.Linear and i + 1 < n and activation_name(children[i + 1]) is not None:
                input = FF.linear_act(input, m.weight, m.bias, activation_name(children[i + 1]))
                i += 2
                continue
            input = m(input)
            i += 1
        return input


# ----------------------------------------------------------------------------------------------
# Argument checks. Where torchvision checks an argument, the same exception type as torchvision.

def check_weights(weights, progress) -> None:
    """torchvision's builders take `weights` and `progress`; fastnets downloads nothing."""
    if weights is not None:
        raise ValueError("fastnets does not download weights: build the model with weights=None, then "
                         "model.load_state_dict(torchvision_state_dict) (the keys and shapes are torchvision's)")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {type(progress).__name__}")


def check_int(value, name: str, minimum: int = 1) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def check_probability(value, name: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1, got {value}")
    return float(value)


def check_depths(value, name: str, length: int | None = None) -> list[int]:
    """A list of positive block counts (ResNet's layers: `length` 4; DenseNet's block_config: any
    non-empty length)."""
    if not isinstance(value, (list, tuple)) or not value or (length is not None and len(value) != length):
        raise ValueError(f"{name} must be a list of {length or 'one or more'} block counts, got {value!r}")
    return [check_int(v, f"{name}[{i}]") for i, v in enumerate(value)]


# ----------------------------------------------------------------------------------------------
# Initializations (torchvision's schemes, so that a fastnets model trains like torchvision's).

def init_kaiming_fan_out(model: nn.Module, linear: str = "normal") -> None:
    """Convs: kaiming normal, fan_out, relu gain, zero bias; batch-norms: weight 1, bias 0;
    linears: normal(0, 0.01) ("normal") or uniform(+-1/sqrt(out_features)) ("uniform_out"), zero bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear == "normal":
                nn.init.normal_(m.weight, 0, 0.01)
            else:
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
