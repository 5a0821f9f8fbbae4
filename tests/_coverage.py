"""How much of a model's normalization and attention fastnets.fuse() replaced, counted by running it.

coverage(stock, fused, *inputs) runs both models once on the inputs (no grad, each in its own
mode) and counts the calls of the stock functional ops they make: outermost calls only, none made
inside a fastnets op (whose CPU reference may call the stock op) and none on torch.fx proxies (a
forward that fuse() traces at its first call of a new argument structure):
    batch-norm   F.batch_norm            (nn.BatchNorm*d, timm's BatchNormAct2d, F.batch_norm calls)
    layer-norm   F.layer_norm            (nn.LayerNorm and its subclasses, F.layer_norm calls)
    attention    F.scaled_dot_product_attention, F.multi_head_attention_forward (nn.MultiheadAttention)
The fraction replaced of a kind is 1 - (its calls left in the fused model) / (its calls in the
stock model); a kind the stock model never calls is absent from the result.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

KINDS = {
    F.batch_norm: "batch-norm",
    torch.batch_norm: "batch-norm",
    F.layer_norm: "layer-norm",
    torch.layer_norm: "layer-norm",
    F.scaled_dot_product_attention: "attention",
    F.multi_head_attention_forward: "attention",
}


_INTERNAL = ("fastnets.ops", "fastnets.kernels", "fastnets._library", "fastnets._dispatch")


def _inside_fastnets_op() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(_INTERNAL):
            return True
        frame = frame.f_back
    return False


def _tracing(args, kwargs) -> bool:
    """A call on torch.fx proxies: fuse() tracing a forward at its first call of a new structure."""
    return any(isinstance(a, torch.fx.Proxy) for a in torch.utils._pytree.tree_leaves((args, kwargs or {})))


class _Count(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.counts = {kind: 0 for kind in set(KINDS.values())}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = KINDS.get(func)
        if kind is not None and not _inside_fastnets_op() and not _tracing(args, kwargs):
            self.counts[kind] += 1
        # Inside a mode's handler the mode is off: the calls func makes are not counted (outermost only).
        return func(*args, **(kwargs or {}))


def count_stock_ops(model: torch.nn.Module, *inputs) -> dict[str, int]:
    """{kind: number of outermost calls of its stock ops} in one forward of model on inputs."""
    with torch.no_grad(), _Count() as counter:
        model(*inputs)
    return counter.counts


def coverage(stock: torch.nn.Module, fused: torch.nn.Module, *inputs) -> dict[str, tuple[int, int]]:
    """{kind: (stock ops replaced, stock ops in the stock model)} for the kinds the stock model
    calls; inputs are cloned for each model (a forward may modify its input in place)."""
    before = count_stock_ops(stock, *[x.clone() if isinstance(x, torch.Tensor) else x for x in inputs])
    after = count_stock_ops(fused, *[x.clone() if isinstance(x, torch.Tensor) else x for x in inputs])
    return {kind: (n - after[kind], n) for kind, n in sorted(before.items()) if n}


def fraction(counts: tuple[int, int]) -> float:
    replaced, total = counts
    return replaced / total if total else 1.0


def format_coverage(cov: dict[str, tuple[int, int]]) -> str:
    """'batch-norm 49/49, attention 12/12' (for test output and README tables)."""
    return ", ".join(f"{kind} {r}/{n}" for kind, (r, n) in cov.items()) or "no norm or attention ops"
