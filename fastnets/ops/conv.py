"""Fused convolution + batch-norm + activation (+ residual): `conv_bn_act`.

    y = act(batch_norm(conv2d(x, w, b)) + residual)

Inference (training=False): the batch-norm is folded into the convolution (w' = w * g/sqrt(v+eps),
b' = (b - mean) * g/sqrt(v+eps) + beta, computed in float32; the bias stays float32), then ONE
kernel runs the convolution with an epilogue that adds the bias and the residual and applies the
activation, writing each output once. fastnets.nn caches the fold per module (nn/conv.py); the
functional form folds at each call (a few elementwise ops on the weight). When a parameter of the
eval-mode conv/batch-norm needs a gradient (fine-tuning with frozen statistics), the fold is not
used: the convolution kernel, then fastnets.ops.norm_act.batch_norm_act (eval), so that the
batch-norm parameters' gradients are float32 sums, not sums over a rounded folded weight.

Training (training=True with batch-norm): the convolution's epilogue writes the conv output z and
per-(row tile, channel) mean and M2; a small kernel merges them (Chan's formula) into the batch
mean and biased variance; then fastnets.ops.norm_act.batch_norm_act_train normalizes, adds the
residual, applies the activation and updates the running statistics (momentum, unbiased
variance), and its backward is one fused kernel for activation + residual + batch-norm.

Backward of the convolution itself (input and weight gradients): stock PyTorch
(torch.ops.aten.convolution_backward, i.e. cuDNN on a GPU) for now. Without batch-norm, a fastnets
kernel computes act'(z) * dy first.

Kernels: Triton (kernels/conv.py: implicit GEMM, NHWC fast path, tensor cores for fp16/bf16;
kernels/conv_depthwise.py: direct depthwise kernel), CUDA C++ (csrc/conv.cu: implicit GEMM
(ldmatrix + mma.sync) for fp16/bf16, an FMA-tiled path for fp32, the depthwise kernel), and the
torch reference (stock F.conv2d + elementwise ops: the CPU path and the tests' oracle).

Registered ops (fastnets::<name>_<backend>, backend in triton/cuda/torch):
    conv_bias_act   (x, w, b?, residual?, ...) -> (y, z)    y = act(conv + b + residual), z = the
                    pre-activation when save_z (for the backward of silu/gelu/sigmoid), else empty
    conv_stats      (x, w, b?, ...) -> (z, mean, var)       z = conv + b, batch mean/biased var
    conv_act_grad   (dy, z, act) -> dz                      dz = act'(z) * dy
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from fastnets import _dispatch, _ext, _library
from fastnets.ops import _activation
from fastnets.ops.norm_act import batch_stats_reference

__all__ = ["conv_bn_act", "fold_batch_norm"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Argument checks (torch's exception types and, where torch has one, its message).

def _pair(value, name):
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return value  # the modules' own form: no ABC checks on the hot path
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (int(value), int(value))
    if isinstance(value, (tuple, list)) and all(isinstance(v, numbers.Integral) for v in value):
        if len(value) == 1:
            return (int(value[0]), int(value[0]))
        if len(value) == 2:
            return (int(value[0]), int(value[1]))
    shown = list(value) if isinstance(value, (tuple, list)) else value
    raise RuntimeError(f"expected {name} to be a single integer value or a list of 2 values to match "
                       f"the convolution dimensions, but got {name}={shown}")


def _geometry(x, w, stride, padding, dilation, groups):
    """Checks the convolution arguments as F.conv2d does; returns (stride, (pad_top, pad_left),
    (pad_bottom, pad_right), dilation, (OH, OW))."""
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    if min(stride) <= 0:
        raise RuntimeError("non-positive stride is not supported")
    if min(dilation) <= 0:
        raise RuntimeError("non-positive dilation is not supported")
    if not isinstance(groups, numbers.Integral) or isinstance(groups, bool):
        raise TypeError(f"groups must be an int, got {type(groups).__name__}")
    if groups <= 0:
        raise RuntimeError("non-positive groups is not supported")
    if w.dim() != 4:
        raise RuntimeError(f"weight should have 4 dimensions (out_channels, in_channels/groups, kH, kW), "
                           f"got weight of size {list(w.shape)}")
    KH, KW = w.shape[2], w.shape[3]
    if isinstance(padding, str):
        if padding == "valid":
            lo = hi = (0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise RuntimeError("padding='same' is not supported for strided convolutions")
            total = (dilation[0] * (KH - 1), dilation[1] * (KW - 1))
            lo = (total[0] // 2, total[1] // 2)
            hi = (total[0] - lo[0], total[1] - lo[1])
        else:
            raise RuntimeError(f"Invalid padding string: '{padding}'")
    else:
        lo = hi = _pair(padding, "padding")
        if min(lo) < 0:
            raise RuntimeError("negative padding is not supported")
    C_out = w.shape[0]
    if C_out % groups:
        raise RuntimeError(f"Given groups={groups}, expected weight to be divisible by {groups} at dimension 0, "
                           f"but got weight of size [{list(w.shape)}] instead")
    if x.shape[1] != w.shape[1] * groups:
        raise RuntimeError(f"Given groups={groups}, weight of size {list(w.shape)}, expected input{list(x.shape)} "
                           f"to have {w.shape[1] * groups} channels, but got {x.shape[1]} channels instead")
    H, W = x.shape[2] + lo[0] + hi[0], x.shape[3] + lo[1] + hi[1]
    eff = (dilation[0] * (KH - 1) + 1, dilation[1] * (KW - 1) + 1)
    if H < eff[0] or W < eff[1]:
        raise RuntimeError(f"Calculated padded input size per channel: ({H} x {W}). Kernel size: "
                           f"({eff[0]} x {eff[1]}). Kernel size can't be greater than actual input size")
    out = ((H - eff[0]) // stride[0] + 1, (W - eff[1]) // stride[1] + 1)
    return stride, lo, hi, dilation, out


def _check_tensor(t, name, x, length):
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
    if t.device != x.device:
        raise RuntimeError(f"{name} is on {t.device}, but input is on {x.device}")
    if length is not None and (t.dim() != 1 or t.numel() != length):
        raise RuntimeError(f"{name} should contain {length} elements not {t.numel()}")


def _is_channels_last(t: torch.Tensor) -> bool:
    # torch's own rule (suggest_memory_format), which F.conv2d uses to pick its output's format
    from fastnets.ops._layout import suggest_memory_format

    return t.dim() == 4 and suggest_memory_format(t) == torch.channels_last


def _out_channels_last(x, w) -> bool:
    """F.conv2d's output is channels_last when its input or its weight is."""
    return _is_channels_last(x) or _is_channels_last(w)


# ----------------------------------------------------------------------------------------------
# The registered ops. Argument conventions shared by the three backends:
#   x [N, C_in, H, W]; w [C_out, C_in/groups, KH, KW] (any strides); b [C_out] float32 or x's
#   dtype, or None; residual [N, C_out, OH, OW] (any strides, x's dtype) or None; stride, padding
#   (symmetric), dilation: [2]; act: activation code; channels_last: memory format of the outputs.

def _out_shape(x, w, stride, padding, dilation):
    H, W = x.shape[2] + 2 * padding[0], x.shape[3] + 2 * padding[1]
    return (x.shape[0], w.shape[0], (H - dilation[0] * (w.shape[2] - 1) - 1) // stride[0] + 1,
            (W - dilation[1] * (w.shape[3] - 1) - 1) // stride[1] + 1)


def _fmt(channels_last: bool):
    return torch.channels_last if channels_last else torch.contiguous_format


def _depthwise(x, w, groups) -> bool:
    return groups == x.shape[1] and w.shape[1] == 1


def _cba_proto(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, residual: torch.Tensor | None,
               stride: list[int], padding: list[int], dilation: list[int], groups: int, act: int,
               channels_last: bool, save_z: bool) -> tuple[torch.Tensor, torch.Tensor]:
    raise NotImplementedError


def _cba_fake(x, w, b, residual, stride, padding, dilation, groups, act, channels_last, save_z):
    shape = _out_shape(x, w, stride, padding, dilation)
    y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_fmt(channels_last))
    z = torch.empty(shape if save_z else (0,), dtype=x.dtype, device=x.device,
                    memory_format=_fmt(channels_last and save_z))
    return y, z


def cpu_inference(x, w, b, residual, stride, padding, dilation, groups, act, weight):
    """The CPU reference path of an inference call from the modules, with no more Python than stock
    spends on conv -> batch-norm -> activation: x a float32 CPU tensor [N, C, H, W], w and b the
    module's cached (folded) inference weight and bias, integer stride/padding/dilation pairs, no
    gradient, no autocast. act(conv(x, w, b) + residual) by the ops _cba_torch runs, in the memory
    format the full path gives (channels_last when x or the module's `weight` is), or None where
    the full path must run (its checks, a residual that broadcasts or has another dtype)."""
    if x.shape[1] != w.shape[1] * groups:
        return None  # the full path's error message
    y = F.conv2d(x, w, b, stride, padding, dilation, groups)
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or residual.shape != y.shape or residual.dtype != y.dtype:
            return None
        y = y.add_(residual)
    _dispatch.record("conv_bn_act", "torch")
    return _activation.apply_(y.contiguous(memory_format=_fmt(_out_channels_last(x, weight))), act)


def _cba_torch(x, w, b, residual, stride, padding, dilation, groups, act, channels_last, save_z):
    _dispatch.record("conv_bn_act", "torch")
    bias = b.to(x.dtype) if (b is not None and b.dtype != x.dtype) else b
    z = F.conv2d(x, w, bias, stride, padding, dilation, groups)
    if residual is not None:
        z = z.add_(residual)
    z = z.contiguous(memory_format=_fmt(channels_last))
    if save_z:
        return _activation.apply(z, act).contiguous(memory_format=_fmt(channels_last)), z
    return _activation.apply_(z, act), x.new_empty((0,))


def _alloc_outputs(x, w, stride, padding, dilation, channels_last, save_z):
    shape = _out_shape(x, w, stride, padding, dilation)
    y = _dispatch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_fmt(channels_last))
    z = (_dispatch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_fmt(channels_last))
         if save_z else x.new_empty((0,)))
    return y, z


def _cba_triton(x, w, b, residual, stride, padding, dilation, groups, act, channels_last, save_z):
    y, z = _alloc_outputs(x, w, stride, padding, dilation, channels_last, save_z)
    if y.numel():
        if _depthwise(x, w, groups):
            from fastnets.kernels import conv_depthwise

            _dispatch.record("conv_bn_act.depthwise", "triton")
            conv_depthwise.conv_depthwise(x, w, b, residual, y, z if save_z else None, None, None,
                                          stride, padding, dilation, act)
        else:
            from fastnets.kernels import conv as K

            _dispatch.record("conv_bn_act.gemm", "triton")
            K.conv_gemm(x, w, b, residual, y, z if save_z else None, None, None, stride, padding, dilation,
                        groups, act)
    return y, z


def _cuda_args(t):
    return _ext.ptr(t), list(t.shape), list(t.stride())


def _cuda_launch(x, w, b, residual, y, z, pmean, pm2, stride, padding, dilation, groups, act):
    """Calls fastnets._C.conv_fwd (its arguments are described in csrc/conv.h)."""
    mod = _ext.module()
    b32 = b.float().contiguous() if b is not None else None
    if groups == x.shape[1] == w.shape[0] and w.shape[1] == 1 and x.stride(1) == 1 and w.stride(0) != 1:
        # Depthwise beside an NHWC input: the weight as [KH, KW, C] (channels contiguous, a view of
        # shape [C, 1, KH, KW]), so that the kernel's 128-bit path reads it 16 bytes at a time too.
        w = w.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
    if x.dtype != torch.float32 and x.stride(1) == 1 and w.stride(1) != 1 and w.shape[1] % 8 == 0:
        # An OHWI copy of an OIHW weight beside an NHWC input: the 16-bit GEMM's fast path reads
        # both operands by 16-byte asynchronous copies along the input channels (csrc/conv.cu).
        w = w.contiguous(memory_format=torch.channels_last)
    with torch.cuda.device(x.device):
        mod.conv_fwd(*_cuda_args(x), *_cuda_args(w), _ext.ptr(b32),
                     _ext.ptr(residual), list(residual.stride()) if residual is not None else [0, 0, 0, 0],
                     *_cuda_args(y), _ext.ptr(z), _ext.ptr(pmean), _ext.ptr(pm2),
                     list(stride), list(padding), list(dilation), groups, act, _ext.dtype_code(x), _ext.stream(x))


def _cba_cuda(x, w, b, residual, stride, padding, dilation, groups, act, channels_last, save_z):
    y, z = _alloc_outputs(x, w, stride, padding, dilation, channels_last, save_z)
    if y.numel():
        _dispatch.record("conv_bn_act.depthwise" if _depthwise(x, w, groups) else "conv_bn_act.gemm", "cuda")
        _cuda_launch(x, w, b, residual, y, z if save_z else None, None, None, stride, padding, dilation, groups, act)
    return y, z


_cba_ops = _library.register("conv_bias_act", _cba_proto, fake=_cba_fake,
                             impls={"triton": _cba_triton, "cuda": _cba_cuda, "torch": _cba_torch})


# conv_stats ----------------------------------------------------------------------------------

def _stats_proto(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: list[int], padding: list[int],
                 dilation: list[int], groups: int,
                 channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    raise NotImplementedError


def _stats_fake(x, w, b, stride, padding, dilation, groups, channels_last):
    shape = _out_shape(x, w, stride, padding, dilation)
    z = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_fmt(channels_last))
    ct = torch.promote_types(x.dtype, torch.float32)  # the statistics' dtype: float64 for float64 input
    return z, x.new_empty((w.shape[0],), dtype=ct), x.new_empty((w.shape[0],), dtype=ct)


def _stats_torch(x, w, b, stride, padding, dilation, groups, channels_last):
    _dispatch.record("conv_bn_act", "torch")
    z = F.conv2d(x, w, b.to(x.dtype) if b is not None else None, stride, padding, dilation, groups)
    z = z.contiguous(memory_format=_fmt(channels_last))
    mean, var = batch_stats_reference(z)  # float32, float64 for float64 input (batch_norm_act_train's rule)
    return z, mean, var


def _stats_outputs(x, w, stride, padding, dilation, channels_last, tile_m):
    shape = _out_shape(x, w, stride, padding, dilation)
    z = _dispatch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_fmt(channels_last))
    C = shape[1]
    T = -(-(shape[0] * shape[2] * shape[3]) // tile_m)
    part = [_dispatch.empty((T, C), dtype=torch.float32, device=x.device) for _ in range(2)]
    stats = [_dispatch.empty((C,), dtype=torch.float32, device=x.device) for _ in range(2)]
    return z, part, stats


def _stats_triton(x, w, b, stride, padding, dilation, groups, channels_last):
    from fastnets.kernels import conv as K
    from fastnets.kernels import conv_depthwise

    dw = _depthwise(x, w, groups)
    tile = conv_depthwise.STATS_BLOCK_P if dw else K.STATS_BLOCK_M
    z, (pmean, pm2), (mean, var) = _stats_outputs(x, w, stride, padding, dilation, channels_last, tile)
    if z.numel() == 0:
        return z, mean.fill_(float("nan")), var.fill_(float("nan"))
    if dw:
        _dispatch.record("conv_bn_act.depthwise", "triton")
        conv_depthwise.conv_depthwise(x, w, b, None, z, None, pmean, pm2, stride, padding, dilation, 0)
    else:
        _dispatch.record("conv_bn_act.gemm", "triton")
        K.conv_gemm(x, w, b, None, z, None, pmean, pm2, stride, padding, dilation, groups, 0)
    _dispatch.record("conv_bn_act.stats", "triton")
    K.stats_finalize(pmean, pm2, mean, var, z.numel() // z.shape[1], tile)
    return z, mean, var


def _stats_cuda(x, w, b, stride, padding, dilation, groups, channels_last):
    mod = _ext.module()
    dw = _depthwise(x, w, groups)
    tile = mod.conv_stats_tile(dw)
    z, (pmean, pm2), (mean, var) = _stats_outputs(x, w, stride, padding, dilation, channels_last, tile)
    if z.numel() == 0:
        return z, mean.fill_(float("nan")), var.fill_(float("nan"))
    _dispatch.record("conv_bn_act.depthwise" if dw else "conv_bn_act.gemm", "cuda")
    _cuda_launch(x, w, b, None, z, None, pmean, pm2, stride, padding, dilation, groups, 0)
    _dispatch.record("conv_bn_act.stats", "cuda")
    with torch.cuda.device(x.device):
        mod.conv_stats_finalize(_ext.ptr(pmean), _ext.ptr(pm2), _ext.ptr(mean), _ext.ptr(var), pmean.shape[0],
                                pmean.shape[1], z.numel() // z.shape[1], tile, _ext.stream(x))
    return z, mean, var


_stats_ops = _library.register("conv_stats", _stats_proto, fake=_stats_fake,
                               impls={"triton": _stats_triton, "cuda": _stats_cuda, "torch": _stats_torch})


# conv_act_grad -------------------------------------------------------------------------------

def _grad_proto(dy: torch.Tensor, z: torch.Tensor, act: int) -> torch.Tensor:
    raise NotImplementedError


def _grad_fake(dy, z, act):
    return torch.empty_like(z, dtype=dy.dtype)


def _grad_torch(dy, z, act):
    _dispatch.record("conv_bn_act", "torch")
    ct = torch.promote_types(dy.dtype, torch.float32)  # float64 stays float64
    return _activation.grad(z.to(ct), dy.to(ct), act).to(dy.dtype)


def _dense_like(dy, z):
    # The kernels run over dense memory: dy in z's memory format (z is dense: we allocated it).
    fmt = torch.channels_last if (z.dim() == 4 and not z.is_contiguous()) else torch.contiguous_format
    return dy.contiguous(memory_format=fmt), _dispatch.empty_like(z, dtype=dy.dtype)


def _grad_triton(dy, z, act):
    from fastnets.kernels import conv as K

    dy, dz = _dense_like(dy, z)
    _dispatch.record("conv_bn_act.act_grad", "triton")
    if dz.numel():
        K.act_grad(dy, z, dz, act)
    return dz


def _grad_cuda(dy, z, act):
    dy, dz = _dense_like(dy, z)
    _dispatch.record("conv_bn_act.act_grad", "cuda")
    if dz.numel():
        with torch.cuda.device(z.device):
            _ext.module().conv_act_grad(_ext.ptr(dy), _ext.ptr(z), _ext.ptr(dz), dz.numel(), act,
                                        _ext.dtype_code(dz), _ext.stream(z))
    return dz


_grad_ops = _library.register("conv_act_grad", _grad_proto, fake=_grad_fake,
                              impls={"triton": _grad_triton, "cuda": _grad_cuda, "torch": _grad_torch})


# Autograd -------------------------------------------------------------------------------------

def _conv_backward(ctx, dz):
    """Input, weight and bias gradients of the convolution: stock PyTorch (cuDNN on a GPU)."""
    x, w = ctx.saved_tensors[:2]
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if not (need_x or need_w or need_b):
        return None, None, None
    dx = dw = db = None
    if need_x or need_w:
        dx, dw, _ = torch.ops.aten.convolution_backward(
            dz.to(x.dtype), x, w, None, ctx.conv_args[0], ctx.conv_args[1], ctx.conv_args[2], False, [0, 0],
            ctx.conv_args[3], [need_x, need_w, False])
    if need_b:  # summed in float32 (the folded bias is float32: no half-precision rounding on the way)
        db = dz.sum(dim=(0, 2, 3), dtype=torch.promote_types(dz.dtype, torch.float32)).to(ctx.bias_dtype)
    return (dx if need_x else None), (dw if need_w else None), db


def _cba_setup(ctx, inputs, output):
    x, w, b, residual, stride, padding, dilation, groups, act, channels_last, save_z = inputs
    y, z = output
    ctx.mark_non_differentiable(z)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.act = act
    ctx.bias_dtype = b.dtype if b is not None else None
    # act'(z) needs z for silu/gelu/sigmoid; relu and relu6 read it from y (y > 0 iff z > 0, and
    # 0 < y < 6 iff 0 < z < 6), so no copy of z is kept for them.
    ctx.save_for_backward(x, w, z if save_z else y)


def _cba_backward(backend, ctx, dy, _dz_unused):
    x, w, zy = ctx.saved_tensors
    dz = dy if ctx.act == 0 else _grad_ops[backend](dy, zy, ctx.act)
    dx, dw, db = _conv_backward(ctx, dz)
    dres = dz if ctx.needs_input_grad[3] else None
    return dx, dw, db, dres, None, None, None, None, None, None, None


_library.register_autograd(_cba_ops, setup_context=_cba_setup, backward=_cba_backward)


def _stats_setup(ctx, inputs, output):
    x, w, b, stride, padding, dilation, groups, channels_last = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.bias_dtype = b.dtype if b is not None else None
    ctx.save_for_backward(x, w)


def _stats_backward(backend, ctx, dz, _dmean, _dvar):
    dx, dw, db = _conv_backward(ctx, dz)
    return dx, dw, db, None, None, None, None, None


_library.register_autograd(_stats_ops, setup_context=_stats_setup, backward=_stats_backward)


# ----------------------------------------------------------------------------------------------
# Backend choice.

def _unsupported(x, w, groups, rows):
    """What each kernel backend cannot take (None when it can); rows = N * OH * OW."""
    dtype = x.dtype
    why_dtype = None if dtype in _KERNEL_DTYPES else f"dtype {dtype} (the kernels take float32, float16, bfloat16)"
    triton_why = why_dtype
    dw = _depthwise(x, w, groups)
    if triton_why is None and not dw and dtype == torch.bfloat16 and _dispatch.interpreter_enabled() \
            and x.device.type == "cpu":
        triton_why = "bfloat16 tl.dot gives wrong results in the Triton interpreter (run it on a GPU)"
    if triton_why is None and not dw and groups >= 65536:
        triton_why = f"groups={groups} exceeds the grid's second dimension (65535)"
    if triton_why is None and dw and w.shape[0] >= 65535 * 16:
        triton_why = f"{w.shape[0]} channels exceed the depthwise grid"
    if triton_why is None and rows >= 2 ** 31:
        triton_why = "more than 2^31 output pixels (the kernels index rows in int32)"
    cuda_why = why_dtype
    if cuda_why is None and groups >= 65536 and not dw:
        cuda_why = f"groups={groups} exceeds the grid's third dimension (65535)"
    if cuda_why is None and dw and w.shape[0] >= 65535 * 32:
        cuda_why = f"{w.shape[0]} channels exceed the depthwise grid"
    return {"triton": triton_why, "cuda": cuda_why}


# ----------------------------------------------------------------------------------------------
# Batch-norm folding.

def fold_batch_norm(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, dtype=None):
    """The convolution equivalent to conv -> batch_norm (eval): returns (weight', bias') with
    weight' in `dtype` (default: weight's) and bias' in float32, or float64 for float64 weights
    (the kernels add it in float32; float64 runs the reference, which keeps float64 throughout).

    scale = bn_weight / sqrt(running_var + eps); weight' = weight * scale (per output channel);
    bias' = (bias - running_mean) * scale + bn_bias. Differentiable (autograd reaches weight, bias,
    bn_weight, bn_bias through it), computed in float32 (float64 for float64 weights).
    """
    acc = torch.promote_types(torch.float32, weight.dtype)
    scale = torch.rsqrt(running_var.to(acc) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(acc)
    shift = -running_mean.to(acc) if bias is None else bias.to(acc) - running_mean.to(acc)
    b = shift * scale
    if bn_bias is not None:
        b = b + bn_bias.to(acc)
    w = (weight.to(acc) * scale.view(-1, 1, 1, 1)).to(dtype or weight.dtype)
    return w, b


# ----------------------------------------------------------------------------------------------
# Public API.

def _autocast_dtype(x):
    """The dtype F.conv2d would run in under torch.autocast, or None outside it."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and x.is_floating_point() and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def _prepare(input, weight, bias, residual, stride, padding, dilation, groups, amp):
    """Shared checks of conv_bn_act and of the modules' fused path. Returns the batched input, the
    residual expanded to the output's shape, the geometry and whether the input was unbatched."""
    if not isinstance(input, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("conv_bn_act: input and weight must be Tensors")
    if input.dim() not in (3, 4):
        raise RuntimeError(f"Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: "
                           f"{list(input.shape)}")
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    if weight.device != x.device:
        raise RuntimeError(f"Input and weight must be on the same device, got input on {x.device} and weight "
                           f"on {weight.device}")
    if weight.dtype != x.dtype and not (amp and weight.is_floating_point()):
        raise RuntimeError(f"Input type ({x.dtype}) and weight type ({weight.dtype}) should be the same")
    geo = _geometry(x, weight, stride, padding, dilation, groups)
    C_out = weight.shape[0]
    if bias is not None:
        _check_tensor(bias, "bias", x, None)
        if bias.dim() != 1 or bias.numel() != C_out:
            raise RuntimeError(f"Given weight of size {list(weight.shape)}, expected bias to be 1-dimensional with "
                               f"{C_out} elements, but got bias of size {list(bias.shape)} instead")
        if bias.dtype != x.dtype and not (amp and bias.is_floating_point()):
            raise RuntimeError(f"Input type ({x.dtype}) and bias type ({bias.dtype}) should be the same")
    out_shape = (x.shape[0], C_out, *geo[4])
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual must be a Tensor or None, got {type(residual).__name__}")
        if residual.device != x.device:
            raise RuntimeError(f"residual is on {residual.device}, but input is on {x.device}")
        if residual.dtype != x.dtype:
            raise RuntimeError(f"residual must have the output's dtype {x.dtype}, got {residual.dtype}")
        r = residual.unsqueeze(0) if (unbatched and residual.dim() == 3) else residual
        try:
            full = torch.broadcast_shapes(tuple(r.shape), out_shape)
        except RuntimeError as exc:
            raise RuntimeError(f"residual of shape {list(residual.shape)} cannot be added to the convolution's "
                               f"output of shape {list(out_shape[1:] if unbatched else out_shape)}: {exc}") from None
        if full != out_shape:
            raise RuntimeError(f"residual of shape {list(residual.shape)} would broadcast the output of shape "
                               f"{list(out_shape)} to {list(full)}")
        residual = r.expand(out_shape)
    return x, residual, geo, unbatched


def conv_bn_act(input, weight, bias=None, running_mean=None, running_var=None, bn_weight=None, bn_bias=None, *,
                stride=1, padding=0, dilation=1, groups=1, training=False, momentum=0.1, eps=1e-5,
                activation="relu", residual=None):
    """act(batch_norm(conv2d(input, weight, bias)) + residual) in fused kernels.

    Arguments as F.conv2d (padding: int, pair, "same" or "valid") and F.batch_norm (bn_weight and
    bn_bias are F.batch_norm's weight and bias); batch-norm is skipped when running_mean,
    running_var, bn_weight and bn_bias are all None. In eval mode (training=False) the batch-norm
    is folded into the convolution: one kernel. In training mode the batch statistics come from
    the convolution's epilogue and running_mean/running_var (which may be None) are updated in
    place as F.batch_norm does. activation: "relu", "relu6", "silu", "gelu", "sigmoid" or None.
    residual: added after the batch-norm, before the activation (broadcastable to the output,
    the output's dtype). The input and weight gradients of the convolution use stock PyTorch
    (torch.ops.aten.convolution_backward: cuDNN on a GPU).
    """
    return _conv_bn_act(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, stride=stride,
                        padding=padding, dilation=dilation, groups=groups, training=training, momentum=momentum,
                        eps=eps, activation=activation, residual=residual)


def _conv_bn_act(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, *, stride, padding, dilation,
                 groups, training, momentum, eps, activation, residual, has_bn=None, cache=None):
    """conv_bn_act, plus what the modules (nn/conv.py) add: has_bn (a batch-norm without affine
    parameters or running statistics still normalizes) and cache (dtype -> the inference weight
    and bias, folded and packed once per module; used when no gradient is needed)."""
    act = _activation.code(activation)
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"conv_bn_act(): argument 'input' must be Tensor, not {type(input).__name__}")
    amp = _autocast_dtype(input)
    if amp is not None:
        input = input.to(amp)
        residual = residual.to(amp) if isinstance(residual, torch.Tensor) and residual.is_floating_point() else residual
    x, residual, geo, unbatched = _prepare(input, weight, bias, residual, stride, padding, dilation, groups, amp)
    C_out = weight.shape[0]
    named = (("running_mean", running_mean), ("running_var", running_var), ("weight", bn_weight), ("bias", bn_bias))
    for name, t in named:
        _check_tensor(t, name, x, C_out)
    from fastnets.ops import norm_act

    # F.batch_norm's rule: one dtype for its tensors, the conv output's, or float32 for half outputs.
    norm_act._check_param_dtypes(x, named, "conv_bn_act")
    if has_bn is None:
        has_bn = any(t is not None for t in (running_mean, running_var, bn_weight, bn_bias))
    if has_bn and not training and (running_mean is None or running_var is None):
        raise RuntimeError("running_mean must be defined in evaluation mode")
    channels_last = _out_channels_last(x, weight)
    if has_bn and training:
        w = weight.to(x.dtype)
        b = bias.to(x.dtype) if (amp is not None and bias is not None) else bias
        y = _train_bn(x, w, b, running_mean, running_var, bn_weight, bn_bias, residual, geo, groups, momentum, eps,
                      activation, channels_last)
    else:
        grad_on = torch.is_grad_enabled()
        param_grad = grad_on and any(t is not None and t.requires_grad for t in (weight, bias, bn_weight, bn_bias))
        needs_grad = param_grad or (grad_on and any(t is not None and t.requires_grad for t in (x, residual)))
        w = weight.to(x.dtype)
        b = bias.to(x.dtype) if (amp is not None and bias is not None) else bias
        if has_bn and param_grad:
            # Eval-mode batch-norm whose parameters train (frozen statistics): the fold's gradients
            # would pass through a half-precision folded weight (its rounding, then sums over it),
            # so the convolution runs unfolded and the batch-norm + residual + activation kernel
            # (fastnets.ops.norm_act) follows, with its exact float32 parameter gradients.
            z = _conv_act(x, w, b, None, geo, groups, 0, channels_last, True)
            y = norm_act.batch_norm_act(z, running_mean, running_var, bn_weight, bn_bias, False, momentum, eps,
                                        activation, residual)
        else:
            if cache is not None and not needs_grad:
                w, b = cache(x.dtype)
            elif has_bn:
                w, b = fold_batch_norm(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps,
                                       dtype=x.dtype)
            y = _conv_act(x, w, b, residual, geo, groups, act, channels_last, needs_grad)
    return y.squeeze(0) if unbatched else y


def _pad_asymmetric(x, geo):
    """padding="same" with an even effective kernel pads one more on the bottom/right: done here
    (an explicit copy), so that the kernels only see symmetric padding."""
    stride, lo, hi, dilation, _ = geo
    if lo == hi:
        return x, list(lo)
    return F.pad(x, (lo[1], hi[1], lo[0], hi[0])), [0, 0]


def _probe(x, w, b, stride, padding, dilation, groups):
    """The stock convolution of the same input: torch's error for an input torch rejects (a bool
    tensor), run only when a forced kernel backend cannot take the input (_dispatch.choose)."""
    F.conv2d(x, w, None if b is None else b.to(x.dtype), stride, padding, dilation, groups)


def _conv_act(x, w, b, residual, geo, groups, act, channels_last, needs_grad):
    """act(conv(x, w) + b + residual), one kernel (any backend); differentiable."""
    x, pad = _pad_asymmetric(x, geo)
    stride, dilation = list(geo[0]), list(geo[3])
    rows = x.shape[0] * geo[4][0] * geo[4][1]
    backend = _dispatch.choose("conv_bn_act", x.device, _unsupported(x, w, groups, rows),
                               probe=lambda: _probe(x, w, b, stride, pad, dilation, groups))
    save_z = needs_grad and act in (3, 4, 5)
    y, _ = _library.call(_cba_ops, backend, x, w, b, residual, stride, pad, dilation, groups, act, channels_last,
                          save_z)
    return y


def _train_bn(x, w, b, running_mean, running_var, bn_weight, bn_bias, residual, geo, groups, momentum, eps,
              activation, channels_last):
    OH, OW = geo[4]
    if x.shape[0] * OH * OW == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size((1, w.shape[0], OH, OW))}")
    from fastnets.ops import norm_act

    x, pad = _pad_asymmetric(x, geo)
    rows = x.shape[0] * geo[4][0] * geo[4][1]
    backend = _dispatch.choose("conv_bn_act", x.device, _unsupported(x, w, groups, rows),
                               probe=lambda: _probe(x, w, b, list(geo[0]), pad, list(geo[3]), groups))
    if backend == "torch" and not _dispatch.kernel_formulation_forced():
        return _train_bn_torch(x, w, b, running_mean, running_var, bn_weight, bn_bias, residual, list(geo[0]), pad,
                               list(geo[3]), groups, momentum, eps, activation)
    z, mean, var = _stats_ops[backend](x, w, b, list(geo[0]), pad, list(geo[3]), groups, channels_last)
    if z.numel() == 0:
        return z
    return norm_act.batch_norm_act_train(z, running_mean, running_var, bn_weight, bn_bias, momentum, eps,
                                         activation, residual, batch_mean=mean, batch_var=var)


def _train_bn_torch(x, w, b, running_mean, running_var, bn_weight, bn_bias, residual, stride, pad, dilation, groups,
                    momentum, eps, activation):
    """The reference (CPU) path of a training step: the stock layers' own ops with their own autograd,
    as the unfused model runs them. A fused training pass cannot beat stock on a CPU (no fold, and
    torch's batch-norm already computes its statistics and normalizes in one op), and the
    kernels' formulation (statistics from the convolution, the pre-activation recomputed in the
    backward) would cost extra passes there; this one keeps what stock keeps (the batch
    statistics, the in-place activation's output) and recomputes nothing. The output's memory
    format is F.conv2d's, as the kernels give it."""
    _dispatch.record("conv_bn_act", "torch")
    z = F.conv2d(x, w, b, stride, pad, dilation, groups)
    if z.numel() == 0:
        return z
    y = F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, True, momentum, eps)
    if residual is not None:
        y = y.add_(residual)
    return _activation.apply_(y, _activation.code(activation))


ops = {"conv_bias_act": _cba_ops, "conv_stats": _stats_ops, "conv_act_grad": _grad_ops}
