"""suggest_memory_format on the reference (CPU) path's hot loop.

torch._prims_common.suggest_memory_format is the Python mirror of C++ Tensor.suggest_memory_format
(the rule by which stock ops choose their outputs' memory format), written for symbolic shapes: on
concrete sizes it costs about 100 us per call in guard helpers, more than a small layer's own
kernel. This is the same rule (c10/core/MemoryFormat.h, is_channels_last_strides_2d/3d) on plain
integers, memoized on (sizes, strides); symbolic shapes (fake tensors under torch.compile) go to
torch's version.
"""
from __future__ import annotations

import functools

import torch
from torch._prims_common import suggest_memory_format as _torch_suggest

_ORDER = {4: (1, 3, 2, 0), 5: (1, 4, 3, 2, 0)}


@functools.lru_cache(maxsize=4096)
def _strides_like_channels_last(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    order = _ORDER.get(len(shape))
    if order is None or strides[1] == 0:
        return False
    lowest = 0
    for d in order:
        if shape[d] == 0 or strides[d] < lowest:
            return False
        if d == 0 and lowest == strides[1]:
            return False
        lowest = strides[d] * shape[d]
    return True


def suggest_memory_format(x: torch.Tensor) -> torch.memory_format:
    """torch.channels_last (channels_last_3d for 5-D) when x's strides are channels-last-like, else
    torch.contiguous_format: torch._prims_common.suggest_memory_format, fast on concrete sizes."""
    if x.layout != torch.strided or x.dim() not in (4, 5):
        return torch.contiguous_format
    shape, strides = tuple(x.shape), x.stride()
    if not all(type(v) is int for v in shape + strides):
        return _torch_suggest(x)
    if _strides_like_channels_last(shape, strides):
        return torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format
