"""The bad-input matrix across the library (issue 7, item 1): one table over every public function
and module, each case raising the exception type torch raises for the same input
(parity.assert_raises_like), or, where torch has no counterpart, a clear error naming the argument.
Every case runs under the reference backend and under each kernel backend (the Triton interpreter on
the CPU): a forced kernel backend must not turn torch's error into another one.

The family test files hold their own bad-input tables (windows, strides, lengths, ranks, masks,
GQA, residual shapes, ...); this table adds what cuts across them: a tensor on another device (a
"meta" tensor stands in for it on a CPU machine), dtype mismatches between arguments, integer,
bool and complex inputs, 0-d inputs, non-tensor inputs, and the modules.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastnets
from fastnets import functional as FF
from fastnets import nn as fnn
from parity import KERNEL_BACKENDS, assert_raises_like

BACKENDS = ["torch", *KERNEL_BACKENDS]


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _meta(t):
    return t.to("meta")


def _ints(*shape):
    return torch.randint(-3, 4, shape)


def _bools(*shape):
    return torch.randn(*shape) > 0


# The stock compositions the fused ops replace (their torch counterparts).

def _sdpa(*args, **kw):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kw)


def _conv_bn_act(x, w, b=None, rm=None, rv=None, bw=None, bb=None, *, stride=1, padding=0, training=False,
                 residual=None, activation="relu"):
    y = F.conv2d(x, w, b, stride, padding)
    if any(t is not None for t in (rm, rv, bw, bb)):
        y = F.batch_norm(y, rm, rv, bw, bb, training)
    if residual is not None:
        y = y + residual
    return F.relu(y) if activation == "relu" else y


def _batch_norm_act(x, rm, rv, w=None, b=None, training=False, residual=None):
    y = F.batch_norm(x, rm, rv, w, b, training)
    return F.relu(y if residual is None else y + residual)


def _qkv(L=5, S=6, E=8, dtype=torch.float32):
    return _x(1, 2, L, E, dtype=dtype), _x(1, 2, S, E, dtype=dtype), _x(1, 2, S, E, dtype=dtype)


def _conv_args():
    return _x(2, 3, 8, 8), _x(4, 3, 3, 3)


def _bn(C=4, dtype=torch.float32):
    return torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype), torch.ones(C, dtype=dtype), \
        torch.zeros(C, dtype=dtype)


def _stock_conv_bn(act=True):
    torch.manual_seed(0)
    mods = [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)] + ([nn.ReLU()] if act else [])
    return nn.Sequential(*mods)


def _fused_conv_bn():
    torch.manual_seed(0)
    return fnn.ConvBNAct2d(3, 4, 3, bias=True)


# ----------------------------------------------------------------------------------------------
# Cases with a torch counterpart: name -> (ours, stock). Each lambda builds fresh inputs.

LIKE_TORCH = {
    # A tensor argument on another device than the input.
    "conv_bn_act-running_mean-device": (
        lambda: FF.conv_bn_act(*_conv_args(), None, _meta(torch.zeros(4)), torch.ones(4)),
        lambda: _conv_bn_act(*_conv_args(), None, _meta(torch.zeros(4)), torch.ones(4))),
    "conv_bn_act-bn_weight-device": (
        lambda: FF.conv_bn_act(*_conv_args(), None, torch.zeros(4), torch.ones(4), _meta(torch.ones(4))),
        lambda: _conv_bn_act(*_conv_args(), None, torch.zeros(4), torch.ones(4), _meta(torch.ones(4)))),
    "conv_bn_act-residual-device": (
        lambda: FF.conv_bn_act(*_conv_args(), residual=_meta(_x(2, 4, 6, 6))),
        lambda: _conv_bn_act(*_conv_args(), residual=_meta(_x(2, 4, 6, 6)))),
    "batch_norm_act-running_var-device": (
        lambda: FF.batch_norm_act(_x(2, 3, 4, 4), torch.zeros(3), _meta(torch.ones(3))),
        lambda: _batch_norm_act(_x(2, 3, 4, 4), torch.zeros(3), _meta(torch.ones(3)))),
    "batch_norm_act-bias-device": (
        lambda: FF.batch_norm_act(_x(2, 3, 4, 4), torch.zeros(3), torch.ones(3), None, _meta(torch.ones(3))),
        lambda: _batch_norm_act(_x(2, 3, 4, 4), torch.zeros(3), torch.ones(3), None, _meta(torch.ones(3)))),
    "batch_norm_act-residual-device": (
        lambda: FF.batch_norm_act(_x(2, 3, 4, 4), torch.zeros(3), torch.ones(3), residual=_meta(_x(2, 3, 4, 4))),
        lambda: _batch_norm_act(_x(2, 3, 4, 4), torch.zeros(3), torch.ones(3), residual=_meta(_x(2, 3, 4, 4)))),
    "layer_norm-weight-device": (lambda: FF.layer_norm(_x(2, 8), (8,), _meta(torch.ones(8))),
                                 lambda: F.layer_norm(_x(2, 8), (8,), _meta(torch.ones(8)))),
    "layer_norm-bias-device": (lambda: FF.layer_norm(_x(2, 8), (8,), None, _meta(torch.ones(8))),
                               lambda: F.layer_norm(_x(2, 8), (8,), None, _meta(torch.ones(8)))),
    "layer_norm-residual-device": (lambda: FF.layer_norm(_x(2, 8), (8,), residual=_meta(_x(2, 8))),
                                   lambda: F.layer_norm(_x(2, 8) + _meta(_x(2, 8)), (8,))),
    "add_layer_norm-residual-device": (lambda: FF.add_layer_norm(_x(2, 8), _meta(_x(2, 8)), (8,)),
                                       lambda: F.layer_norm(_x(2, 8) + _meta(_x(2, 8)), (8,))),
    "bias_act-bias-device": (lambda: FF.bias_act(_x(2, 8), _meta(_x(8))), lambda: F.gelu(_x(2, 8) + _meta(_x(8)))),
    "sdpa-key-device": (lambda: FF.scaled_dot_product_attention(*(lambda q, k, v: (q, _meta(k), v))(*_qkv())),
                        lambda: _sdpa(*(lambda q, k, v: (q, _meta(k), v))(*_qkv()))),
    "sdpa-value-device": (lambda: FF.scaled_dot_product_attention(*(lambda q, k, v: (q, k, _meta(v)))(*_qkv())),
                          lambda: _sdpa(*(lambda q, k, v: (q, k, _meta(v)))(*_qkv()))),
    "sdpa-mask-device": (
        lambda: FF.scaled_dot_product_attention(*_qkv(), attn_mask=_meta(torch.ones(5, 6, dtype=torch.bool))),
        lambda: _sdpa(*_qkv(), attn_mask=_meta(torch.ones(5, 6, dtype=torch.bool)))),
    "ConvBNAct2d-input-device": (lambda: _fused_conv_bn()(_meta(_x(2, 3, 8, 8))),
                                 lambda: _stock_conv_bn()(_meta(_x(2, 3, 8, 8)))),
    "BatchNormAct2d-input-device": (lambda: fnn.BatchNormAct2d(3)(_meta(_x(2, 3, 4, 4))),
                                    lambda: nn.BatchNorm2d(3)(_meta(_x(2, 3, 4, 4)))),
    "LayerNorm-input-device": (lambda: fnn.LayerNorm(8)(_meta(_x(2, 8))), lambda: nn.LayerNorm(8)(_meta(_x(2, 8)))),
    "MultiheadAttention-key-device": (
        lambda: fnn.MultiheadAttention(8, 2)(_x(3, 2, 8), _meta(_x(3, 2, 8)), _meta(_x(3, 2, 8)), need_weights=False),
        lambda: nn.MultiheadAttention(8, 2)(_x(3, 2, 8), _meta(_x(3, 2, 8)), _meta(_x(3, 2, 8)), need_weights=False)),

    # Dtypes that do not match between arguments.
    "conv_bn_act-bias-dtype": (lambda: FF.conv_bn_act(*_conv_args(), _x(4).half()),
                               lambda: _conv_bn_act(*_conv_args(), _x(4).half())),
    "conv_bn_act-weight-int": (lambda: FF.conv_bn_act(_x(2, 3, 8, 8), _ints(4, 3, 3, 3)),
                               lambda: _conv_bn_act(_x(2, 3, 8, 8), _ints(4, 3, 3, 3))),
    "conv_bn_act-running-stats-half": (
        lambda: FF.conv_bn_act(*_conv_args(), None, *_bn(dtype=torch.float16)),
        lambda: _conv_bn_act(*_conv_args(), None, *_bn(dtype=torch.float16))),
    "conv_bn_act-running-stats-double": (
        lambda: FF.conv_bn_act(*_conv_args(), None, *_bn(dtype=torch.float64), training=True),
        lambda: _conv_bn_act(*_conv_args(), None, *_bn(dtype=torch.float64), training=True)),
    "batch_norm_act-weight-double": (
        lambda: FF.batch_norm_act(_x(2, 3, 4, 4), torch.zeros(3), torch.ones(3), torch.ones(3).double()),
        lambda: _batch_norm_act(_x(2, 3, 4, 4), torch.zeros(3), torch.ones(3), torch.ones(3).double())),
    "layer_norm-bias-double": (lambda: FF.layer_norm(_x(2, 8), (8,), torch.ones(8), torch.zeros(8).double()),
                               lambda: F.layer_norm(_x(2, 8), (8,), torch.ones(8), torch.zeros(8).double())),
    "sdpa-value-dtype": (lambda: FF.scaled_dot_product_attention(*(lambda q, k, v: (q, k, v.half()))(*_qkv())),
                         lambda: _sdpa(*(lambda q, k, v: (q, k, v.half()))(*_qkv()))),
    "sdpa-mask-double": (lambda: FF.scaled_dot_product_attention(*_qkv(), attn_mask=torch.zeros(5, 6).double()),
                         lambda: _sdpa(*_qkv(), attn_mask=torch.zeros(5, 6).double())),
    "linear_act-weight-dtype": (lambda: FF.linear_act(_x(2, 8), _x(4, 8).double()),
                                lambda: F.gelu(F.linear(_x(2, 8), _x(4, 8).double()))),
    "MultiheadAttention-key-dtype": (
        lambda: fnn.MultiheadAttention(8, 2)(_x(3, 2, 8), _x(3, 2, 8).double(), _x(3, 2, 8), need_weights=False),
        lambda: nn.MultiheadAttention(8, 2)(_x(3, 2, 8), _x(3, 2, 8).double(), _x(3, 2, 8), need_weights=False)),
    "ConvBNAct2d-input-half": (lambda: _fused_conv_bn()(_x(2, 3, 8, 8).half()),
                               lambda: _stock_conv_bn()(_x(2, 3, 8, 8).half())),
    "BatchNormAct2d-input-double": (lambda: fnn.BatchNormAct2d(3)(_x(2, 3, 4, 4).double()),
                                    lambda: nn.BatchNorm2d(3)(_x(2, 3, 4, 4).double())),
    "LayerNorm-input-double": (lambda: fnn.LayerNorm(8)(_x(2, 8).double()), lambda: nn.LayerNorm(8)(_x(2, 8).double())),
    "TransformerEncoderLayer-input-half": (
        lambda: fnn.TransformerEncoderLayer(8, 2, 16, 0.0)(_x(3, 2, 8).half()),
        lambda: nn.TransformerEncoderLayer(8, 2, 16, 0.0)(_x(3, 2, 8).half())),

    # Integer, bool and complex inputs that torch rejects: its own error, whatever the backend.
    "max_pool2d-bool": (lambda: FF.max_pool2d(_bools(2, 3, 8, 8), 2), lambda: F.max_pool2d(_bools(2, 3, 8, 8), 2)),
    "max_pool2d-complex": (lambda: FF.max_pool2d(_x(2, 3, 8, 8).cfloat(), 2),
                           lambda: F.max_pool2d(_x(2, 3, 8, 8).cfloat(), 2)),
    "avg_pool2d-bool": (lambda: FF.avg_pool2d(_bools(2, 3, 8, 8), 2), lambda: F.avg_pool2d(_bools(2, 3, 8, 8), 2)),
    "adaptive_avg_pool2d-int": (lambda: FF.adaptive_avg_pool2d(_ints(2, 3, 8, 8), 3),
                                lambda: F.adaptive_avg_pool2d(_ints(2, 3, 8, 8), 3)),
    "adaptive_avg_pool2d-int-global": (lambda: FF.adaptive_avg_pool2d(_ints(2, 3, 8, 8), 1),
                                       lambda: F.adaptive_avg_pool2d(_ints(2, 3, 8, 8), 1)),
    "adaptive_max_pool2d-int": (lambda: FF.adaptive_max_pool2d(_ints(2, 3, 8, 8), 3),
                                lambda: F.adaptive_max_pool2d(_ints(2, 3, 8, 8), 3)),
    "adaptive_max_pool2d-bool": (lambda: FF.adaptive_max_pool2d(_bools(2, 3, 8, 8), 3),
                                 lambda: F.adaptive_max_pool2d(_bools(2, 3, 8, 8), 3)),
    "local_response_norm-bool": (lambda: FF.local_response_norm(_bools(2, 3, 8, 8), 2),
                                 lambda: F.local_response_norm(_bools(2, 3, 8, 8), 2)),
    "local_response_norm-complex": (lambda: FF.local_response_norm(_x(2, 3, 8).cfloat(), 2),
                                    lambda: F.local_response_norm(_x(2, 3, 8).cfloat(), 2)),
    "batch_norm_act-int": (lambda: FF.batch_norm_act(_ints(2, 3, 4, 4), torch.zeros(3), torch.ones(3)),
                           lambda: _batch_norm_act(_ints(2, 3, 4, 4), torch.zeros(3), torch.ones(3))),
    "batch_norm_act-bool": (lambda: FF.batch_norm_act(_bools(2, 3, 4, 4), torch.zeros(3), torch.ones(3)),
                            lambda: _batch_norm_act(_bools(2, 3, 4, 4), torch.zeros(3), torch.ones(3))),
    "layer_norm-int": (lambda: FF.layer_norm(_ints(2, 8), (8,)), lambda: F.layer_norm(_ints(2, 8), (8,))),
    "layer_norm-bool": (lambda: FF.layer_norm(_bools(2, 8), (8,)), lambda: F.layer_norm(_bools(2, 8), (8,))),
    "layer_norm-complex": (lambda: FF.layer_norm(_x(2, 8).cfloat(), (8,)),
                           lambda: F.layer_norm(_x(2, 8).cfloat(), (8,))),
    "add_layer_norm-int": (lambda: FF.add_layer_norm(_ints(2, 8), _ints(2, 8), (8,)),
                           lambda: F.layer_norm(_ints(2, 8) + _ints(2, 8), (8,))),
    "bias_act-int-gelu": (lambda: FF.bias_act(_ints(2, 8), None, "gelu"), lambda: F.gelu(_ints(2, 8))),
    "bias_act-bool-relu": (lambda: FF.bias_act(_bools(2, 8), None, "relu"), lambda: F.relu(_bools(2, 8))),
    "bias_act-complex": (lambda: FF.bias_act(_x(2, 8).cfloat(), None, "relu"), lambda: F.relu(_x(2, 8).cfloat())),
    "linear_act-int": (lambda: FF.linear_act(_ints(2, 8), _ints(4, 8)), lambda: F.gelu(F.linear(_ints(2, 8), _ints(4, 8)))),
    "conv_bn_act-bool": (lambda: FF.conv_bn_act(_bools(2, 3, 8, 8), _bools(4, 3, 3, 3)),
                         lambda: _conv_bn_act(_bools(2, 3, 8, 8), _bools(4, 3, 3, 3))),
    "sdpa-int": (lambda: FF.scaled_dot_product_attention(*(t.long() for t in _qkv())),
                 lambda: _sdpa(*(t.long() for t in _qkv()))),
    "sdpa-bool": (lambda: FF.scaled_dot_product_attention(*(t > 0 for t in _qkv())),
                  lambda: _sdpa(*(t > 0 for t in _qkv()))),
    "sdpa-complex": (lambda: FF.scaled_dot_product_attention(*(t.cfloat() for t in _qkv())),
                     lambda: _sdpa(*(t.cfloat() for t in _qkv()))),
    "MaxPool2d-bool": (lambda: fnn.MaxPool2d(2)(_bools(2, 3, 8, 8)), lambda: nn.MaxPool2d(2)(_bools(2, 3, 8, 8))),
    "AdaptiveAvgPool2d-int": (lambda: fnn.AdaptiveAvgPool2d(2)(_ints(2, 3, 8, 8)),
                              lambda: nn.AdaptiveAvgPool2d(2)(_ints(2, 3, 8, 8))),
    "LocalResponseNorm-bool": (lambda: fnn.LocalResponseNorm(2)(_bools(2, 3, 8, 8)),
                               lambda: nn.LocalResponseNorm(2)(_bools(2, 3, 8, 8))),
    "BatchNormAct2d-int": (lambda: fnn.BatchNormAct2d(3)(_ints(2, 3, 4, 4)),
                           lambda: nn.BatchNorm2d(3)(_ints(2, 3, 4, 4))),
    "LayerNorm-int": (lambda: fnn.LayerNorm(8)(_ints(2, 8)), lambda: nn.LayerNorm(8)(_ints(2, 8))),
    "ConvBNAct2d-int": (lambda: _fused_conv_bn()(_ints(2, 3, 8, 8)), lambda: _stock_conv_bn()(_ints(2, 3, 8, 8))),
    "MultiheadAttention-int": (lambda: fnn.MultiheadAttention(8, 2)(*(_ints(3, 2, 8),) * 3, need_weights=False),
                               lambda: nn.MultiheadAttention(8, 2)(*(_ints(3, 2, 8),) * 3, need_weights=False)),

    # 0-d inputs.
    "max_pool2d-0d": (lambda: FF.max_pool2d(torch.tensor(1.0), 1), lambda: F.max_pool2d(torch.tensor(1.0), 1)),
    "adaptive_avg_pool2d-0d": (lambda: FF.adaptive_avg_pool2d(torch.tensor(1.0), 1),
                               lambda: F.adaptive_avg_pool2d(torch.tensor(1.0), 1)),
    "adaptive_max_pool2d-0d": (lambda: FF.adaptive_max_pool2d(torch.tensor(1.0), (1, 1)),
                               lambda: F.adaptive_max_pool2d(torch.tensor(1.0), (1, 1))),
    "local_response_norm-0d": (lambda: FF.local_response_norm(torch.tensor(1.0), 1),
                               lambda: F.local_response_norm(torch.tensor(1.0), 1)),
    "batch_norm_act-0d-train": (lambda: FF.batch_norm_act(torch.tensor(1.0), None, None, training=True),
                                lambda: _batch_norm_act(torch.tensor(1.0), None, None, training=True)),
    "batch_norm_act-1d-one-value-train": (lambda: FF.batch_norm_act(torch.ones(1), None, None, training=True),
                                          lambda: _batch_norm_act(torch.ones(1), None, None, training=True)),
    "layer_norm-0d": (lambda: FF.layer_norm(torch.tensor(1.0), (1,)), lambda: F.layer_norm(torch.tensor(1.0), (1,))),
    "conv_bn_act-0d": (lambda: FF.conv_bn_act(torch.tensor(1.0), _x(4, 3, 3, 3)),
                       lambda: _conv_bn_act(torch.tensor(1.0), _x(4, 3, 3, 3))),
    "conv_bn_act-0d-weight": (lambda: FF.conv_bn_act(_x(2, 3, 8, 8), torch.tensor(1.0)),
                              lambda: _conv_bn_act(_x(2, 3, 8, 8), torch.tensor(1.0))),
    "sdpa-0d-query": (lambda: FF.scaled_dot_product_attention(torch.tensor(1.0), *_qkv()[1:]),
                      lambda: _sdpa(torch.tensor(1.0), *_qkv()[1:])),
    "linear_act-0d": (lambda: FF.linear_act(torch.tensor(1.0), _x(4, 1)),
                      lambda: F.gelu(F.linear(torch.tensor(1.0), _x(4, 1)))),
    "batch_norm_act-0d-weight": (lambda: FF.batch_norm_act(_x(2, 3, 4, 4), torch.zeros(3), torch.ones(3),
                                                           torch.tensor(1.0)),
                                 lambda: _batch_norm_act(_x(2, 3, 4, 4), torch.zeros(3), torch.ones(3),
                                                         torch.tensor(1.0))),
    "batch_norm_act-2d-running-mean": (lambda: FF.batch_norm_act(_x(2, 3, 4, 4), torch.zeros(1, 3), torch.ones(3)),
                                       lambda: _batch_norm_act(_x(2, 3, 4, 4), torch.zeros(1, 3), torch.ones(3))),
    "MaxPool2d-0d": (lambda: fnn.MaxPool2d(1)(torch.tensor(1.0)), lambda: nn.MaxPool2d(1)(torch.tensor(1.0))),
    "AvgPool2d-0d": (lambda: fnn.AvgPool2d(1)(torch.tensor(1.0)), lambda: nn.AvgPool2d(1)(torch.tensor(1.0))),
    "AdaptiveMaxPool2d-0d": (lambda: fnn.AdaptiveMaxPool2d(1)(torch.tensor(1.0)),
                             lambda: nn.AdaptiveMaxPool2d(1)(torch.tensor(1.0))),
    "LocalResponseNorm-0d": (lambda: fnn.LocalResponseNorm(2)(torch.tensor(1.0)),
                             lambda: nn.LocalResponseNorm(2)(torch.tensor(1.0))),
    "BatchNormAct2d-0d": (lambda: fnn.BatchNormAct2d(3)(torch.tensor(1.0)),
                          lambda: nn.BatchNorm2d(3)(torch.tensor(1.0))),
    "LayerNorm-0d": (lambda: fnn.LayerNorm(1)(torch.tensor(1.0)), lambda: nn.LayerNorm(1)(torch.tensor(1.0))),
    "ConvBNAct2d-0d": (lambda: _fused_conv_bn()(torch.tensor(1.0)), lambda: _stock_conv_bn()(torch.tensor(1.0))),
    "ConvAct2d-0d": (lambda: fnn.ConvAct2d(3, 4, 3)(torch.tensor(1.0)), lambda: nn.Conv2d(3, 4, 3)(torch.tensor(1.0))),
    "MultiheadAttention-0d": (lambda: fnn.MultiheadAttention(8, 2)(*(torch.tensor(1.0),) * 3, need_weights=False),
                              lambda: nn.MultiheadAttention(8, 2)(*(torch.tensor(1.0),) * 3, need_weights=False)),
    "TransformerEncoderLayer-0d": (lambda: fnn.TransformerEncoderLayer(8, 2, 16, 0.0)(torch.tensor(1.0)),
                                   lambda: nn.TransformerEncoderLayer(8, 2, 16, 0.0)(torch.tensor(1.0))),

    # Non-tensor inputs.
    "conv_bn_act-list": (lambda: FF.conv_bn_act([1.0], _x(4, 3, 3, 3)), lambda: F.conv2d([1.0], _x(4, 3, 3, 3))),
    "ConvBNAct2d-list": (lambda: _fused_conv_bn()([1.0]), lambda: _stock_conv_bn()([1.0])),
    "layer_norm-list": (lambda: FF.layer_norm([1.0], (1,)), lambda: F.layer_norm([1.0], (1,))),
    "bias_act-list": (lambda: FF.bias_act([1.0], None), lambda: F.gelu([1.0])),
    "linear_act-list": (lambda: FF.linear_act([1.0], _x(4, 1)), lambda: F.linear([1.0], _x(4, 1))),
    "avg_pool2d-list": (lambda: FF.avg_pool2d([1.0], 2), lambda: F.avg_pool2d([1.0], 2)),
    "MaxPool2d-list": (lambda: fnn.MaxPool2d(2)([1.0]), lambda: nn.MaxPool2d(2)([1.0])),

    # Module arguments out of range, checked where torch checks them (at construction or call).
    "ConvBNAct2d-groups-do-not-divide": (lambda: fnn.ConvBNAct2d(3, 4, 3, groups=2),
                                         lambda: nn.Conv2d(3, 4, 3, groups=2)),
    "ConvBNAct2d-bad-padding-mode": (lambda: fnn.ConvBNAct2d(3, 4, 3, padding_mode="mirror"),
                                     lambda: nn.Conv2d(3, 4, 3, padding_mode="mirror")),
    "ConvBNAct2d-train-one-value-per-channel": (lambda: _fused_conv_bn().train()(_x(1, 3, 3, 3)),
                                                lambda: _stock_conv_bn().train()(_x(1, 3, 3, 3))),
    "ConvAct2d-kernel-larger-than-input": (lambda: fnn.ConvAct2d(3, 4, 5)(_x(1, 3, 4, 4)),
                                           lambda: nn.Conv2d(3, 4, 5)(_x(1, 3, 4, 4))),
    "MaxPool2d-kernel-0": (lambda: fnn.MaxPool2d(0)(_x(2, 3, 8, 8)), lambda: nn.MaxPool2d(0)(_x(2, 3, 8, 8))),
    "MaxPool2d-dilation-0": (lambda: fnn.MaxPool2d(3, dilation=0)(_x(2, 3, 8, 8)),
                             lambda: nn.MaxPool2d(3, dilation=0)(_x(2, 3, 8, 8))),
    "AvgPool2d-padding-over-half": (lambda: fnn.AvgPool2d(3, padding=2)(_x(2, 3, 8, 8)),
                                    lambda: nn.AvgPool2d(3, padding=2)(_x(2, 3, 8, 8))),
    "AvgPool2d-negative-stride": (lambda: fnn.AvgPool2d(3, stride=-1)(_x(2, 3, 8, 8)),
                                  lambda: nn.AvgPool2d(3, stride=-1)(_x(2, 3, 8, 8))),
    "AdaptiveMaxPool2d-negative-size": (lambda: fnn.AdaptiveMaxPool2d(-1)(_x(2, 3, 8, 8)),
                                        lambda: nn.AdaptiveMaxPool2d(-1)(_x(2, 3, 8, 8))),
    "LocalResponseNorm-size-0": (lambda: fnn.LocalResponseNorm(0)(_x(2, 3, 8, 8)),
                                 lambda: nn.LocalResponseNorm(0)(_x(2, 3, 8, 8))),
    "LayerNorm-wrong-shape": (lambda: fnn.LayerNorm(8)(_x(2, 7)), lambda: nn.LayerNorm(8)(_x(2, 7))),
    "LayerNorm-residual-wrong-shape": (lambda: fnn.LayerNorm(8)(_x(2, 8), _x(3, 8)),
                                       lambda: nn.LayerNorm(8)(_x(2, 8) + _x(3, 8))),
    "BatchNormAct2d-wrong-channels": (lambda: fnn.BatchNormAct2d(3)(_x(2, 4, 4, 4)),
                                      lambda: nn.BatchNorm2d(3)(_x(2, 4, 4, 4))),
    "TransformerEncoder-mask-wrong-shape": (
        lambda: fnn.TransformerEncoder(fnn.TransformerEncoderLayer(8, 2, 16, 0.0), 1,
                                       enable_nested_tensor=False)(_x(3, 2, 8), mask=torch.zeros(4, 4)),
        lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, 0.0), 1,
                                      enable_nested_tensor=False)(_x(3, 2, 8), mask=torch.zeros(4, 4))),
}


# Cases where torch has no counterpart (it accepts the input through another route, or fails by
# accident): name -> (ours, exception type, regex naming the argument).
NO_COUNTERPART = {
    # torch's meta dispatch lets a CPU input meet a meta weight; on two real devices it raises.
    "conv_bn_act-weight-device": (lambda: FF.conv_bn_act(_x(2, 3, 8, 8), _meta(_x(4, 3, 3, 3))), RuntimeError,
                                  "weight"),
    "conv_bn_act-bias-device": (lambda: FF.conv_bn_act(*_conv_args(), _meta(_x(4))), RuntimeError, "bias is on meta"),
    "ConvAct2d-input-device": (lambda: fnn.ConvAct2d(3, 4, 3)(_meta(_x(2, 3, 8, 8))), RuntimeError, "same device"),
    # An integer residual would promote the float output in `y + residual`: the fused ops refuse it.
    "conv_bn_act-residual-int": (lambda: FF.conv_bn_act(*_conv_args(), residual=torch.ones(2, 4, 6, 6).long()),
                                 RuntimeError, "residual must have the output's dtype"),
    "batch_norm_act-residual-int": (lambda: FF.batch_norm_act(_x(2, 3, 4, 4), torch.zeros(3), torch.ones(3),
                                                              residual=_ints(2, 3, 4, 4)),
                                    RuntimeError, "residual must have the input's dtype"),
    "bias_act-bias-int": (lambda: FF.bias_act(_x(2, 8), torch.ones(8).long()), TypeError, "bias has dtype"),
    "bias_act-0d": (lambda: FF.bias_act(torch.tensor(1.0), None), RuntimeError, "at least one dimension"),
    # torch fails with an AttributeError on a non-tensor here; a TypeError naming the input is clearer.
    "local_response_norm-list": (lambda: FF.local_response_norm([1.0], 2), TypeError, "input must be a Tensor"),
    "batch_norm_act-list": (lambda: FF.batch_norm_act([1.0], None, None, training=True), TypeError,
                            "input must be a Tensor"),
    "BatchNormAct2d-residual-device": (lambda: fnn.BatchNormAct2d(3)(_x(2, 3, 4, 4), _meta(_x(2, 3, 4, 4))),
                                       RuntimeError, "residual is on meta"),
    "ConvBNAct2d-residual-device": (lambda: _fused_conv_bn()(_x(2, 3, 8, 8), _meta(_x(2, 4, 6, 6))),
                                    RuntimeError, "residual is on meta"),
    "ConvBNAct2d-activation": (lambda: fnn.ConvBNAct2d(3, 4, 3, activation="mish"), ValueError, "activation"),
    "ConvAct2d-activation": (lambda: fnn.ConvAct2d(3, 4, 3, activation=1), ValueError, "activation"),
    "BatchNormAct2d-activation": (lambda: fnn.BatchNormAct2d(3, activation="tanh"), ValueError, "activation"),
    "linear_act-activation": (lambda: FF.linear_act(_x(2, 8), _x(4, 8), None, "swish2"), ValueError, "activation"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LIKE_TORCH))
def test_raises_like_torch(backend, name):
    ours, stock = LIKE_TORCH[name]
    torch.manual_seed(0)
    with fastnets.use_backend(backend):
        assert_raises_like(ours, stock)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(NO_COUNTERPART))
def test_clear_error_without_torch_counterpart(backend, name):
    ours, exc, match = NO_COUNTERPART[name]
    with fastnets.use_backend(backend), pytest.raises(exc, match=match):
        ours()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_backend_refusal_names_the_dtype_when_torch_accepts(backend):
    """An input torch accepts but the kernels cannot take (integers, float64): a forced kernel
    backend raises BackendError with the reason, not torch's result and not a crash."""
    cases = [lambda: FF.max_pool2d(_ints(2, 3, 8, 8), 2), lambda: FF.avg_pool2d(_ints(2, 3, 8, 8), 2),
             lambda: FF.local_response_norm(_ints(2, 3, 8, 8), 2), lambda: FF.bias_act(_ints(2, 8), None, "relu"),
             lambda: FF.conv_bn_act(_ints(2, 3, 8, 8), _ints(4, 3, 3, 3)),
             lambda: FF.layer_norm(_x(2, 8).double(), (8,)),
             lambda: FF.scaled_dot_product_attention(*(t.double() for t in _qkv()))]
    for case in cases:
        with fastnets.use_backend(backend), pytest.raises(fastnets.BackendError, match="support"):
            case()


def test_integer_inputs_follow_torch_on_the_reference():
    """The reference path gives torch's own results for integer inputs torch accepts (no float
    detour rounded back to integers)."""
    x = _ints(3, 8)
    for act, stock in (("relu", F.relu), ("relu6", F.relu6), ("sigmoid", torch.sigmoid), (None, lambda t: t)):
        out = FF.bias_act(x, torch.ones(8, dtype=torch.long), act)
        expected = stock(x + 1)
        assert out.dtype == expected.dtype and torch.equal(out, expected), act
    x = _ints(2, 3, 8, 8)
    assert torch.equal(FF.max_pool2d(x, 2), F.max_pool2d(x, 2))
    assert torch.equal(FF.avg_pool2d(x, 2), F.avg_pool2d(x, 2))
