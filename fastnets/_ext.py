"""Loading of the CUDA extension fastnets._C, and the helpers that pass tensors to it.

The extension has no torch headers: a tensor crosses as its data pointer, sizes and strides (in
elements), a dtype code and the current CUDA stream, all plain integers. Everything a kernel
assumes (device, dtype, shapes) is checked in Python by the op before these helpers run.
"""
from __future__ import annotations

import functools
import json
import os

import torch

# Kept equal to csrc/common.h DType.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.lru_cache(maxsize=None)
def load():
    """Returns (module or None, reason it is unavailable or None)."""
    try:
        from fastnets import _C  # noqa: PLC0415
    except ImportError as exc:
        info = build_info()
        why = info.get("reason") if info else None
        if why:
            return None, f"fastnets._C is not built: {why}"
        return None, f"fastnets._C could not be imported: {exc}"
    return _C, None


def build_info() -> dict:
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except OSError:
        return {}


@functools.lru_cache(maxsize=None)
def device_status():
    """Returns (number of CUDA devices the extension sees, reason when it sees none)."""
    mod, why = load()
    if mod is None:
        return 0, why
    n, err = mod.device_count()
    if n == 0:
        return 0, f"fastnets._C is built but finds no CUDA device ({err or 'device count is 0'})"
    return n, None


def module():
    """The extension module; raises a RuntimeError that says why when it is unavailable."""
    mod, why = load()
    if mod is None:
        raise RuntimeError(f"the CUDA C++ backend is unavailable: {why}")
    return mod


def ptr(t: torch.Tensor | None) -> int:
    """Device address of a tensor's first element (0 for None or an empty tensor)."""
    if t is None or t.numel() == 0:
        return 0
    return t.data_ptr()


def dtype_code(t: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"the CUDA kernels take float32, float16 or bfloat16, got {t.dtype}") from None


def stream(t: torch.Tensor) -> int:
    """The current CUDA stream of t's device, as an integer handle."""
    return torch.cuda.current_stream(t.device).cuda_stream
