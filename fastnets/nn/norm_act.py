"""BatchNormAct2d: nn.BatchNorm2d followed by an optional residual add and an activation, in one
fused pass (fastnets.functional.batch_norm_act). A subclass of nn.BatchNorm2d with the same
constructor arguments (plus the keyword `activation`), parameters, buffers and state_dict, so
weights move both ways; training/eval, track_running_stats, momentum=None (cumulative moving
average), num_batches_tracked and affine=False behave exactly as nn.BatchNorm2d's.
"""
from __future__ import annotations

import torch
from torch import nn

from fastnets import _dispatch
from fastnets.ops import _activation
from fastnets.ops.norm_act import OP, batch_norm_act, cpu_inference


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
        return fused_batch_norm_act(input, self, self.activation, residual)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


def fused_batch_norm_act(input: torch.Tensor, bn: nn.BatchNorm2d, activation: str | None = "relu",
                         residual: torch.Tensor | None = None) -> torch.Tensor:
    """act(bn(input) + residual) in one fused op, for any nn.BatchNorm2d (BatchNormAct2d's forward,
    and fastnets.fuse()'s for a stock batch-norm that stays where it is), with nn.BatchNorm2d's
    rules: its mode, the factor of the running average (momentum=None: the cumulative average),
    num_batches_tracked, track_running_stats. A residual the fused op cannot take (another dtype,
    or one that broadcasts the output larger) is added after the batch-norm, as torch would."""
    bn._check_input_dim(input)
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    if (not use_batch_stats and residual is None and input.device.type == "cpu"
            and input.dtype in (torch.float32, torch.float64) and _dispatch.choose(OP, input.device) == "torch"):
        # Inference on a CPU: stock's own pair of ops with stock's per-call cost (the functional's
        # checks would add about 50 us per layer: 3% of DenseNet-121).
        return cpu_inference(input, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, activation)
    keep = not bn.training or bn.track_running_stats
    stats = (bn.running_mean if keep else None, bn.running_var if keep else None)
    if residual is not None and not (isinstance(residual, torch.Tensor) and residual.dtype == input.dtype and
                                     list(torch.broadcast_shapes(residual.shape, input.shape)) == list(input.shape)):
        out = batch_norm_act(input, *stats, bn.weight, bn.bias, use_batch_stats, factor, bn.eps, activation=None)
        return _activation.apply(out + residual, _activation.code(activation))
    return batch_norm_act(input, *stats, bn.weight, bn.bias, use_batch_stats, factor, bn.eps, activation, residual)
