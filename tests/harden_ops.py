"""One table of every public op for the cross-cutting tests (edge cases, layouts, determinism):
each entry calls the fastnets op and its stock-PyTorch counterpart on one input tensor `x` (the
other arguments fixed per entry), so that a test can vary x (its batch, layout, values) alone.

ops(dtype, large=False, batch=None)[name] -> Op. Shapes are small (the Triton interpreter runs them) and awkward
(odd sizes, no multiple of a block); large=True gives GPU sizes.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastnets import functional as FF
from parity import DEVICE


@dataclasses.dataclass
class Op:
    shape: tuple[int, ...]  # x's shape; dim 0 is the batch
    ours: Callable[[torch.Tensor], torch.Tensor]
    stock: Callable[[torch.Tensor], torch.Tensor]
    trace: str | None = None  # the launches' name prefix for parity.ran_on (None: every launch)
    spatial: bool = True  # x is (N, C, H, W)-like: channels_last applies


def _p(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape) + 7)) * scale).to(DEVICE, dtype)


def _sdpa(q, k, v, **kw):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, **kw)


def _pool_ops(dtype, S):
    N, C, H, W = S
    return {
        "max_pool2d": Op(S, lambda x: FF.max_pool2d(x, 3, 2, 1), lambda x: F.max_pool2d(x, 3, 2, 1),
                         "max_pool2d"),
        "avg_pool2d": Op(S, lambda x: FF.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
                         lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False), "avg_pool2d"),
        "adaptive_avg_pool2d": Op(S, lambda x: FF.adaptive_avg_pool2d(x, (3, 4)),
                                  lambda x: F.adaptive_avg_pool2d(x, (3, 4)), "adaptive_avg_pool2d"),
        "adaptive_max_pool2d": Op(S, lambda x: FF.adaptive_max_pool2d(x, (3, 4)),
                                  lambda x: F.adaptive_max_pool2d(x, (3, 4)), "adaptive_max_pool2d"),
        "global_avg_pool": Op(S, lambda x: FF.adaptive_avg_pool2d(x, 1),
                              lambda x: F.adaptive_avg_pool2d(x, 1), "adaptive_avg_pool2d"),
    }


def _conv_ops(dtype, S):
    N, C, H, W = S
    O = C + 2
    w = _p(O, C, 3, 3, dtype=dtype, scale=C ** -0.5)
    rm, rv = _p(O, scale=0.1), _p(O).abs() + 0.5
    bw, bb = _p(O) + 1, _p(O)

    def stock(x, training=False):
        y = F.batch_norm(F.conv2d(x, w, None, 1, 1), rm.clone(), rv.clone(), bw, bb, training)
        return F.relu(y)

    return {
        "conv_bn_act": Op(S, lambda x: FF.conv_bn_act(x, w, None, rm, rv, bw, bb, padding=1), stock),
        "conv_bn_act_train": Op(S,
                                lambda x: FF.conv_bn_act(x, w, None, rm.clone(), rv.clone(), bw, bb, padding=1,
                                                         training=True),
                                lambda x: stock(x, True)),
    }


def _norm_ops(dtype, S):
    N, C, H, W = S
    rm, rv = _p(C, scale=0.1), _p(C).abs() + 0.5
    w, b = _p(C) + 1, _p(C)
    r = _p(*S, dtype=dtype)
    lw, lb = _p(W, dtype=dtype) + 1, _p(W, dtype=dtype)
    lr = _p(*S, dtype=dtype)
    return {
        "batch_norm_act": Op(S, lambda x: FF.batch_norm_act(x, rm, rv, w, b, False, activation="relu",
                                                                       residual=r),
                             lambda x: F.relu(F.batch_norm(x, rm, rv, w, b, False) + r), "norm_act"),
        "batch_norm_act_train": Op(S, lambda x: FF.batch_norm_act(x, None, None, w, b, True,
                                                                             activation="silu"),
                                   lambda x: F.silu(F.batch_norm(x, None, None, w, b, True)), "norm_act"),
        "local_response_norm": Op(S, lambda x: FF.local_response_norm(x, 3),
                                  lambda x: F.local_response_norm(x, 3), "lrn"),
        "layer_norm": Op(S, lambda x: FF.layer_norm(x, (W,), lw, lb, residual=lr),
                         lambda x: F.layer_norm(x + lr, (W,), lw, lb), "layer_norm", spatial=False),
        "add_layer_norm": Op(S, lambda x: torch.cat(FF.add_layer_norm(x, lr, (W,), lw, lb)),
                             lambda x: torch.cat([x + lr, F.layer_norm(x + lr, (W,), lw, lb)]), "layer_norm",
                             spatial=False),
    }


def _other_ops(dtype, S):
    N, C, H, W = S
    bias = _p(W, dtype=dtype)
    k, v = _p(N, C, H - 2, W, dtype=dtype), _p(N, C, H - 2, W, dtype=dtype)
    return {
        "bias_act": Op(S, lambda x: FF.bias_act(x, bias, "relu"), lambda x: F.relu(x + bias), "bias_act",
                       spatial=False),
        # causal with L > S (7 and 5): torch's top-left aligned triangle
        "scaled_dot_product_attention": Op(
            S, lambda x: FF.scaled_dot_product_attention(x, k, v, is_causal=True),
            lambda x: _sdpa(x, k, v, is_causal=True), "attention", spatial=False),
    }


def ops(dtype=torch.float32, large: bool = False, batch: int | None = None) -> dict[str, Op]:
    S = (8, 64, 33, 72) if large else (2, 5, 7, 9)
    if batch is not None:
        S = (batch, *S[1:])
    return {**_pool_ops(dtype, S), **_conv_ops(dtype, S), **_norm_ops(dtype, S), **_other_ops(dtype, S)}


NAMES = list(ops())
