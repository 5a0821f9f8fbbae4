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


def autotune(configs: list[triton.Config], key: list[str], **kwargs):
    """triton.autotune with the on-disk cache of timings (AUTOTUNE_CACHE; the interpreter never
    caches, Triton turns it off there)."""
    return triton.autotune(configs=configs, key=key, cache_results=AUTOTUNE_CACHE, **kwargs)


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


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))
