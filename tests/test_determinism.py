"""Determinism (issue 7, item 9): under torch.use_deterministic_algorithms(True) every op runs (no
kernel here uses atomics, so none needs torch's "no deterministic implementation" error), and
repeated backward passes give bitwise equal gradients of the input and of every parameter;
repeated forward passes give bitwise equal outputs.

On the CPU the Triton interpreter runs programs one after another, so a race cannot show there:
these runs prove the deterministic code paths (fixed-order partial sums, no atomics) execute
under the flag and that nothing in them depends on anything but the input (a partial buffer left
uninitialized would show: outputs are NaN-poisoned under FASTNETS_POISON=1). On a GPU the
gpu-marked tests repeat 50 backward and 100 forward passes at large sizes, where a race or an
atomic would show.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from fastnets import functional as FF
from parity import DEVICE, KERNEL_BACKENDS, ran_on


def _t(*shape, dtype=torch.float32, seed=0, grad=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype).requires_grad_(grad)


def _cases(large: bool, dtype=torch.float32):
    """name -> (trace prefix, inputs, fn(**inputs) -> output). The reductions are what matter: batch
    statistics and parameter gradients (norm_act, conv training), parameter gradients (layer_norm,
    bias_act), dQ/dK/dV (attention), overlapping-window gathers (pooling backward), the channel
    window (LRN)."""
    n, c, h, w = (32, 96, 56, 56) if large else (3, 5, 6, 7)
    L, E = (1024, 64) if large else (19, 16)
    F_ = 3072 if large else 37
    return {
        "batch_norm_act_train": ("norm_act", dict(x=_t(n, c, h, w, dtype=dtype), w=_t(c, seed=1), b=_t(c, seed=2),
                                                  r=_t(n, c, h, w, dtype=dtype, seed=3)),
                                 lambda x, w, b, r: FF.batch_norm_act(x, None, None, w, b, True, activation="silu",
                                                                      residual=r)),
        "conv_bn_act_train": (None, dict(x=_t(n, c // 2 or 1, h, w, dtype=dtype), wt=_t(c, c // 2 or 1, 3, 3,
                                                                                         dtype=dtype, seed=1, scale=0.2),
                                         bw=_t(c, seed=2), bb=_t(c, seed=3)),
                              lambda x, wt, bw, bb: FF.conv_bn_act(x, wt, None, None, None, bw, bb, padding=1,
                                                                   training=True)),
        "layer_norm": ("layer_norm", dict(x=_t(n * h, 4 * w, dtype=dtype), r=_t(n * h, 4 * w, dtype=dtype, seed=1),
                                          w=_t(4 * w, seed=2, dtype=dtype), b=_t(4 * w, seed=3, dtype=dtype)),
                       lambda x, r, w, b: FF.layer_norm(x, (w.shape[0],), w, b, residual=r)),
        "bias_act": ("bias_act", dict(x=_t(n * h, F_, dtype=dtype), b=_t(F_, seed=1, dtype=dtype)),
                     lambda x, b: FF.bias_act(x, b, "gelu")),
        "attention": ("attention", dict(q=_t(2, 4, L, E, dtype=dtype), k=_t(2, 2, L + 3, E, dtype=dtype, seed=1),
                                        v=_t(2, 2, L + 3, E, dtype=dtype, seed=2)),
                      lambda q, k, v: FF.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)),
        "max_pool2d": ("max_pool2d", dict(x=_t(n, c, h, w, dtype=dtype)), lambda x: FF.max_pool2d(x, 3, 2, 1)),
        "avg_pool2d": ("avg_pool2d", dict(x=_t(n, c, h, w, dtype=dtype)), lambda x: FF.avg_pool2d(x, 3, 1, 1)),
        "adaptive_avg_pool2d": ("adaptive_avg_pool2d", dict(x=_t(n, c, h, w, dtype=dtype)),
                                lambda x: FF.adaptive_avg_pool2d(x, (5, 3))),
        "local_response_norm": ("lrn", dict(x=_t(n, c, h, w, dtype=dtype)), lambda x: FF.local_response_norm(x, 5)),
    }


def _pass(fn, inputs, grad):
    for t in inputs.values():
        t.grad = None
    out = fn(**inputs)
    out.backward(grad)
    return out.detach().clone(), [t.grad.clone() for t in inputs.values()]


@contextlib.contextmanager
def _deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _check(backend, name, large, backward_reps, forward_reps, dtype=torch.float32):
    trace, inputs, fn = _cases(large, dtype)[name]
    with _deterministic(), ran_on(backend, trace):
        grad = _t(*fn(**inputs).shape, dtype=dtype, seed=9, grad=False)
        out0, grads0 = _pass(fn, inputs, grad)
        for i in range(backward_reps - 1):
            out, grads = _pass(fn, inputs, grad)
            assert torch.equal(out, out0), f"{name}: forward {i + 1} differs"
            for (k, g0), g in zip(inputs.items(), grads):
                assert torch.equal(g, grads0[[*inputs].index(k)]), f"{name}: gradient of {k}, pass {i + 1} differs"
        with torch.no_grad():
            for i in range(forward_reps):
                assert torch.equal(fn(**inputs), out0), f"{name}: no-grad forward {i} differs"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(_cases(False)))
def test_repeated_passes_are_bitwise_equal(backend, name):
    _check(backend, name, large=False, backward_reps=3, forward_reps=2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(_cases(False)))
def test_gpu_50_backward_100_forward_bitwise(backend, name, dtype):
    _check(backend, name, large=True, backward_reps=50, forward_reps=100, dtype=dtype)
