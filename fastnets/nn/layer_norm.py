"""`LayerNorm`: torch.nn.LayerNorm (same constructor, attributes and state_dict, `elementwise_affine`
and `bias=False` included) whose forward runs fastnets.functional.layer_norm (the kernels of
fastnets/ops/layer_norm.py)."""
from __future__ import annotations

import torch
from torch import nn

from fastnets.ops.layer_norm import layer_norm


class LayerNorm(nn.LayerNorm):
    """Drop-in for torch.nn.LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
    device=None, dtype=None). forward(input, residual=None): with `residual`, the layer norm of
    input + residual in one pass (post-norm add & norm)."""

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, residual=residual)
