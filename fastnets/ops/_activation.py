"""The activations the fused ops apply: names, codes shared with the kernels, torch references.

Codes are the same in fastnets/kernels/_activation.py (Triton) and csrc/activation.h (CUDA):
    0 none, 1 relu, 2 relu6, 3 silu, 4 gelu (exact, erf form: F.gelu's default), 5 sigmoid.
NaN propagates through every one of them as in torch (relu(NaN) is NaN).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CODES = {None: 0, "none": 0, "identity": 0, "relu": 1, "relu6": 2, "silu": 3, "swish": 3, "gelu": 4, "sigmoid": 5}
NAMES = ("relu", "relu6", "silu", "gelu", "sigmoid", None)


def code(activation) -> int:
    """The kernel code of an activation name; ValueError naming the argument for an unknown one."""
    key = activation.lower() if isinstance(activation, str) else activation
    try:
        return CODES[key]
    except (KeyError, TypeError):
        raise ValueError(f"activation must be one of {', '.join(map(repr, NAMES))}, got {activation!r}") from None


def apply(x: torch.Tensor, act: int) -> torch.Tensor:
    """Reference forward (stock ops)."""
    if act == 0:
        return x
    if act == 1:
        return F.relu(x)
    if act == 2:
        return F.relu6(x)
    if act == 3:
        return F.silu(x)
    if act == 4:
        return F.gelu(x)
    if act == 5:
        return torch.sigmoid(x)
    raise ValueError(f"unknown activation code {act}")


def apply_(x: torch.Tensor, act: int) -> torch.Tensor:
    """Reference forward in place where torch has an in-place form (all but gelu); returns the
    result (x itself, or a new tensor for gelu)."""
    if act == 0:
        return x
    if act == 1:
        return x.relu_()
    if act == 2:
        return F.hardtanh_(x, 0.0, 6.0)
    if act == 3:
        return F.silu(x, inplace=True)
    if act == 5:
        return x.sigmoid_()
    return apply(x, act)


def grad(z: torch.Tensor, grad_out: torch.Tensor, act: int) -> torch.Tensor:
    """Reference backward: d act(z) / dz * grad_out, with z the activation's input (pre-activation,
    the same dtype as grad_out), through torch's own backward ops (one pass each), so torch's
    conventions hold at the kinks (relu'(0) = 0, relu6'(0) = relu6'(6) = 0) and at NaN (relu and
    relu6 pass the gradient through a NaN input, as threshold_backward does)."""
    aten = torch.ops.aten
    if act == 0:
        return grad_out
    if act == 1:
        return aten.threshold_backward(grad_out, z, 0)
    if act == 2:
        return aten.hardtanh_backward(grad_out, z, 0.0, 6.0)
    if act == 3:
        return aten.silu_backward(grad_out, z)
    if act == 4:
        return aten.gelu_backward(grad_out, z)
    if act == 5:
        return aten.sigmoid_backward(grad_out, torch.sigmoid(z))
    raise ValueError(f"unknown activation code {act}")
