"""Helpers shared by the Triton kernel modules (imported only by them, after TRITON_INTERPRET is set).

Kernels must compile on Triton 3.6 (the GPU machine) and 3.9 (the CPU machine): use only the core
language (tl.load/store, tl.dot, tl.where, reductions, tl.math), no newer-only features.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastnets._dispatch import interpreter_enabled

INTERPRET = interpreter_enabled()


def configs(gpu: list[triton.Config], interpreter: triton.Config | None = None) -> list[triton.Config]:
    """The autotuning candidates: all of `gpu` natively; one config in the interpreter, where
    every candidate would run (slowly) and timings mean nothing."""
    if INTERPRET:
        return [interpreter or gpu[0]]
    return gpu


# Autotuning results persist in Triton's cache directory (keyed by the Triton version, the GPU
# target, the kernel's source, the tuning key and the candidates), so a layer shape is timed once
# per machine, not once per process. FASTNETS_AUTOTUNE_CACHE=0 times afresh in every process.
AUTOTUNE_CACHE = os.environ.get("FASTNETS_AUTOTUNE_CACHE", "1") != "0"


# FASTNETS_AUTOTUNE=fixed: no search. Each launch takes the first candidate that the kernel's own
# pruning keeps, and nothing is compared. Read at each launch's pruning, so a process may also set
# FIXED_CONFIG itself (scripts/gpu_run.py: stage 2 and the models of stage 3 run fixed).
FIXED_CONFIG = os.environ.get("FASTNETS_AUTOTUNE", "search") == "fixed"


def _pinned(prune):
    def early_config_prune(configs, named_args, **kwargs):
        kept = prune(configs, named_args, **kwargs) if prune else configs
        return list(kept)[:1] if FIXED_CONFIG else kept
    return early_config_prune


def autotune(configs: list[triton.Config], key: list[str], **kwargs):
    """triton.autotune with the on-disk cache of timings (AUTOTUNE_CACHE; the interpreter never
    caches, Triton turns it off there), and one config per launch under FIXED_CONFIG."""
    prune = dict(kwargs.pop("prune_configs_by", None) or {})
    prune["early_config_prune"] = _pinned(prune.get("early_config_prune"))
    return triton.autotune(configs=configs, key=key, cache_results=AUTOTUNE_CACHE, prune_configs_by=prune, **kwargs)


def tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def dot_precision(dtype: torch.dtype, conv: bool = False) -> str:
    """input_precision for tl.dot: fp32 operands use TF32 only when torch allows it
    (torch.backends.cudnn.allow_tf32 for convolutions, torch.backends.cuda.matmul.allow_tf32
    otherwise); half-precision operands are exact products either way."""
    if dtype != torch.float32:
        return "ieee"
    allowed = torch.backends.cudnn.allow_tf32 if conv else torch.backends.cuda.matmul.allow_tf32
    return "tf32" if (allowed and not INTERPRET) else "ieee"


def vec_elems(element_size: int, ints=(), tensors=()) -> int:
    """Elements per 16-byte vector when every integer in `ints` is a multiple of it and every tensor's
    data starts 16-byte aligned, else 1: the VEC constexpr of kernels that realign their strides
    with `aligned` (below), for channel counts that are multiples of 8 but not of 16, which Triton's
    JIT divisibility specialization (multiples of 16 only) leaves unproved."""
    v = 16 // element_size
    ok = all(int(i) % v == 0 for i in ints) and all(t.data_ptr() % 16 == 0 for t in tensors)
    return v if ok else 1


@triton.jit
def aligned(v, VEC: tl.constexpr):
    """v, known to the compiler as a multiple of VEC (the launcher guarantees v % VEC == 0, so the value
    is unchanged). tl.multiple_of does not reach a kernel argument (no defining op to carry the hint);
    a product by a constant does."""
    if VEC > 1:
        v = (v // VEC) * VEC
    return v


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))
