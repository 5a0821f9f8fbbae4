"""BatchNormAct2d: nn.BatchNorm2d followed by an optional residual add and an activation, in one
fused pass (fastnets.functional.batch_norm_act). A subclass of nn.BatchNorm2d with the same
constructor arguments (plus the keyword `activation`), parameters, buffers and state_dict, so
weights move both ways; training/eval, track_running_stats, momentum=None (cumulative moving
average), num_batches_tracked and affine=False behave exactly as nn.BatchNorm2d's.
"""
from __future__ import annotations

import torch
from torch import nn

from fastnets.ops import _activation
from fastnets.ops.norm_act import batch_norm_act


class BatchNormAct2d(nn.BatchNorm2d):
    """act(BatchNorm2d(x) + residual). activation: "relu" (default), "relu6", "silu", "gelu",
    "sigmoid" or None. forward(input, residual=None): input (N, C, H, W); residual of input's shape
    (or broadcastable to it) and dtype, or None."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, activation: str | None = "relu"):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        _activation.code(activation)  # an unknown name fails here, naming the argument
        self.activation = activation

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input_dim(input)
        # nn.BatchNorm2d's rules: the factor of the running average, and which statistics normalize.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        return batch_norm_act(input, self.running_mean if keep else None, self.running_var if keep else None,
                              self.weight, self.bias, use_batch_stats, factor, self.eps, self.activation, residual)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"
