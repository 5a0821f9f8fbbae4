"""Fused convolution modules: ConvBNAct2d (conv -> batch-norm -> activation, the state_dict of
nn.Sequential(nn.Conv2d, nn.BatchNorm2d)), ConvAct2d (an nn.Conv2d followed by an activation),
and fused_conv_bn_act, the fused path of a stock (nn.Conv2d, nn.BatchNorm2d) pair that stays where
it is in its parent (torchvision's ResNet keeps conv1 and bn1 as siblings).

Eval mode folds the batch-norm into the convolution once and caches the folded weight and bias on
the conv module (a plain attribute, not a buffer: state_dict is untouched); the cache is rebuilt
when any parameter or buffer changes (version counter or storage), when the dtype or device
changes, or when the mode changes. Training mode uses batch statistics and updates the running
statistics (and num_batches_tracked; momentum=None is the cumulative average), as nn.BatchNorm2d.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastnets.ops import _activation
from fastnets import _dispatch
from fastnets.ops.conv import _conv_bn_act, cpu_inference, fold_batch_norm

__all__ = ["ConvBNAct2d", "ConvAct2d", "fused_conv_bn_act", "conv_act_max_pool"]

_CACHE = "_fastnets_folded"


def _state_key(tensors):
    return tuple(None if t is None else (t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)


def _folded_weights(conv: nn.Conv2d, bn: nn.BatchNorm2d | None):
    """A function dtype -> (weight, bias) for the inference kernel, cached on `conv`: the batch-norm
    folded in (bias in float32), the weight in channels_last (OHWI: the kernels' fast layout) on a
    GPU."""
    def get(dtype):
        tensors = [conv.weight, conv.bias]
        if bn is not None:
            tensors += [bn.weight, bn.bias, bn.running_mean, bn.running_var]
        # Inference tensors (modules built under torch.inference_mode) have no version counter:
        # their fold is recomputed at each call rather than cached on a key that cannot see changes.
        cacheable = not any(t is not None and t.is_inference() for t in tensors)
        key = (dtype, id(bn), bn.eps if bn is not None else None, bn.training if bn is not None else None,
               conv.training, torch.is_inference_mode_enabled(), _state_key(tensors) if cacheable else None)
        entry = conv.__dict__.get(_CACHE)
        if cacheable and entry is not None and entry[0] == key:
            return entry[1], entry[2]
        with torch.no_grad():
            if bn is not None:
                w, b = fold_batch_norm(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight,
                                       bn.bias, bn.eps, dtype=dtype)
            else:
                w = conv.weight.to(dtype)
                b = conv.bias.to(torch.promote_types(dtype, torch.float32)) if conv.bias is not None else None
            if w.is_cuda:
                w = w.contiguous(memory_format=torch.channels_last)
        if cacheable:
            conv.__dict__[_CACHE] = (key, w, b)
        return w, b
    return get


def cpu_reference_inference(x) -> bool:
    """Whether this call is inference on a CPU through the torch reference: no gradient, a CPU
    tensor, the reference backend chosen (the shortcuts below and in fuse()/FusedSequential)."""
    return (not torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.device.type == "cpu"
            and _dispatch.choose("conv_bn_act", x.device) == "torch")


def conv_act_max_pool(input, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, activation: str, pool: nn.Module):
    """pool(act(bn(conv(input)))) for a relu/relu6 followed by a max-pool module. In CPU inference the
    activation runs after the pool (a max commutes with a non-decreasing function, padding and NaN
    included): its pass covers the pooled output, 2-4x smaller. Elsewhere the fused conv applies it
    (free in the kernels' epilogue) and the pool follows, as the stock graph."""
    if cpu_reference_inference(input):
        return _activation.apply_(pool(fused_conv_bn_act(input, conv, bn, None)), _activation.code(activation))
    return pool(fused_conv_bn_act(input, conv, bn, activation))


def fused_conv_bn_act(input, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, activation="relu", residual=None):
    """act(bn(conv(input)) + residual) through fastnets' fused kernels, for stock modules.

    conv: an nn.Conv2d (any padding_mode); bn: an nn.BatchNorm2d over conv's output channels, or
    None (conv -> activation). Follows the modules' modes exactly: bn in eval mode with running
    statistics folds (cached on conv); otherwise batch statistics, with bn's running statistics
    and num_batches_tracked updated as nn.BatchNorm2d.forward does.
    """
    x, padding = input, conv.padding
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    kw = dict(stride=conv.stride, padding=padding, dilation=conv.dilation, groups=conv.groups,
              activation=activation, residual=residual)
    cache = None if torch.compiler.is_compiling() else _folded_weights(conv, bn)
    if (cache is not None and cpu_reference_inference(x) and x.dim() == 4 and x.dtype == torch.float32
            and isinstance(padding, tuple) and (bn is None or not (bn.training or bn.running_mean is None))
            and not torch.is_autocast_enabled("cpu")):
        # Inference on a CPU: the cached fold through the reference ops, without the full path's per-call Python.
        w, b = cache(torch.float32)
        y = cpu_inference(x, w, b, residual, conv.stride, padding, conv.dilation, conv.groups,
                          _activation.code(activation), conv.weight)
        if y is not None:
            return y
    if bn is None:
        return _conv_bn_act(x, conv.weight, conv.bias, None, None, None, None, training=False, momentum=0.0,
                            eps=0.0, has_bn=False, cache=cache, **kw)
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"bn must be an nn.BatchNorm2d or None, got {type(bn).__name__}")
    bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
    if not bn_training:
        return _conv_bn_act(x, conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                            training=False, momentum=0.0, eps=bn.eps, has_bn=True, cache=cache, **kw)
    conv.__dict__.pop(_CACHE, None)  # training: the fold goes stale at every step
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    keep = not bn.training or bn.track_running_stats
    return _conv_bn_act(x, conv.weight, conv.bias, bn.running_mean if keep else None,
                        bn.running_var if keep else None, bn.weight, bn.bias, training=True, momentum=factor,
                        eps=bn.eps, has_bn=True, **kw)


class ConvBNAct2d(nn.Sequential):
    """nn.Sequential(nn.Conv2d, nn.BatchNorm2d) + activation, fused: act(bn(conv(x)) + residual).

    Constructor arguments as nn.Conv2d (bias defaults to False) plus the batch-norm's eps and
    momentum and the activation ("relu", "relu6", "silu", "gelu", "sigmoid" or None). Children "0"
    (the conv) and "1" (the batch-norm), so the state_dict keys are those of the stock sequence.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=False, padding_mode="zeros", device=None, dtype=None, *, eps=1e-5, momentum=0.1,
                 activation="relu"):
        _activation.code(activation)
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                      device=device, dtype=dtype),
            nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, device=device, dtype=dtype))
        self.activation = activation

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, activation="relu") -> "ConvBNAct2d":
        """Wraps existing modules (sharing their parameters and buffers)."""
        _activation.code(activation)
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"from_modules takes an nn.Conv2d and an nn.BatchNorm2d, got "
                            f"{type(conv).__name__} and {type(bn).__name__}")
        if bn.num_features != conv.out_channels:
            raise ValueError(f"bn has {bn.num_features} features but conv has {conv.out_channels} output channels")
        self = cls.__new__(cls)
        nn.Sequential.__init__(self, conv, bn)
        self.activation = activation
        return self

    def forward(self, input, residual=None):
        return fused_conv_bn_act(input, self[0], self[1], self.activation, residual)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class ConvAct2d(nn.Conv2d):
    """nn.Conv2d followed by an activation (and an optional residual before it), in one kernel:
    act(conv(x) + residual). nn.Conv2d's constructor and state_dict, plus keyword `activation`."""

    def __init__(self, *args, activation="relu", **kwargs):
        _activation.code(activation)
        super().__init__(*args, **kwargs)
        self.activation = activation

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, activation="relu") -> "ConvAct2d":
        """A ConvAct2d sharing conv's parameters."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv takes an nn.Conv2d, got {type(conv).__name__}")
        self = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                   conv.groups, conv.bias is not None, conv.padding_mode, device="meta", dtype=conv.weight.dtype,
                   activation=activation)
        self.weight = conv.weight
        self.bias = conv.bias
        self.train(conv.training)
        return self

    def forward(self, input, residual=None):
        return fused_conv_bn_act(input, self, None, self.activation, residual)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"
