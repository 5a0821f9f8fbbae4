"""`LocalResponseNorm`: torch.nn.LocalResponseNorm (same constructor, repr and attributes), whose
forward runs fastnets.functional.local_response_norm (the kernels of fastnets/ops/lrn.py)."""
from __future__ import annotations

import torch
from torch import nn

from fastnets.ops.lrn import local_response_norm


class LocalResponseNorm(nn.LocalResponseNorm):
    """Drop-in for torch.nn.LocalResponseNorm(size, alpha=1e-4, beta=0.75, k=1.0)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return local_response_norm(input, self.size, self.alpha, self.beta, self.k)
