"""Pooling: max_pool2d, avg_pool2d, adaptive_avg_pool2d and adaptive_max_pool2d, with
torch.nn.functional's signatures, defaults, argument checks (same exception types), output shapes
and memory formats, and max-pool indices equal to torch's.

Each public function checks its arguments, then runs one of three implementations, each registered
as fastnets::<op>_<backend> with a fake implementation and autograd (backward ops of the same
backend): the Triton kernels (fastnets/kernels/pool.py), the CUDA C++ kernels (csrc/pool.cu) and the
torch reference (stock aten ops: the CPU path and the oracle of the tests). An adaptive pool to a
(1, 1) output takes the global-pool kernels (one reduction per (n, c) plane).

The kernels take float32, float16 and bfloat16 (computing in float32); other dtypes (float64,
integers) run the reference, which also raises torch's error for a dtype torch rejects.
Max pooling keeps its indices for the backward only when a gradient is needed (or they are asked
for): without them the forward writes 2 bytes per fp16 output instead of 10.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import Tensor
from fastnets.ops._layout import suggest_memory_format

from fastnets import _dispatch, _ext, _library

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NO_INDICES = (0,)  # shape of the placeholder index tensor when indices are not computed


# ------------------------------------------------------------------------------------------------
# Arguments, as torch checks them. Types first (torch's argument parser: TypeError), then lengths
# and values (TORCH_CHECK: RuntimeError), in the order torch runs its checks.

def _index(v, op: str, name: str, what: str):
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise TypeError(f"{op}(): argument '{name}' must be tuple of ints, {what} {type(v).__name__}")
    return operator.index(v)


def _ints(value, op: str, name: str) -> list[int]:
    """An int or a sequence of ints (torch's int-list arguments) as a list."""
    if isinstance(value, (list, tuple)):
        return [_index(v, op, name, "but found element of type") for v in value]
    return [_index(value, op, name, "not")]


def _check_bool(value, op: str, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}(): argument '{name}' must be bool, not {type(value).__name__}")
    return value


def _pair(values: list[int], op: str, name: str, what: str) -> list[int]:
    if len(values) not in (1, 2):
        raise RuntimeError(f"{op}: {name} must {what}")
    return values * 2 if len(values) == 1 else values


def _check_tensor(input, op: str) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{op}(): argument 'input' (position 1) must be Tensor, not {type(input).__name__}")


def _pool_out_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """torch's pooling_output_shape: floor (or ceil) of the window count; in ceil mode the last
    window must start inside the input or its left padding."""
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _windowed_shape(x: Tensor, k, s, p, d, ceil_mode: bool) -> list[int]:
    return [*x.shape[:-2], _pool_out_size(x.shape[-2], k[0], s[0], p[0], d[0], ceil_mode),
            _pool_out_size(x.shape[-1], k[1], s[1], p[1], d[1], ceil_mode)]


def _check_window(op: str, x: Tensor, k, s, p, d, ceil_mode: bool) -> None:
    """Values of a fixed-window pool (rank already checked)."""
    if min(k) <= 0:
        raise RuntimeError(f"{op}: kernel_size must be greater than zero, got {tuple(k)}")
    if min(s) <= 0:
        raise RuntimeError(f"{op}: stride must be greater than zero, got {tuple(s)}")
    if min(d) <= 0:
        raise RuntimeError(f"{op}: dilation must be greater than zero, got {tuple(d)}")
    if min(p) < 0:
        raise RuntimeError(f"{op}: padding must be non-negative, got {tuple(p)}")
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise RuntimeError(f"{op}: padding should be at most half of kernel_size, got padding={tuple(p)}, "
                           f"kernel_size={tuple(k)}")
    if x.dim() not in (3, 4) or any(size == 0 for size in x.shape[-3:]):
        raise RuntimeError(f"{op}: expected a 3-D (C, H, W) or 4-D (N, C, H, W) input with non-zero C, H "
                           f"and W (N may be 0), got shape {list(x.shape)}")
    oh, ow = _windowed_shape(x, k, s, p, d, ceil_mode)[-2:]
    if oh < 1 or ow < 1:
        raise RuntimeError(f"{op}: the output size {oh}x{ow} is too small: input {x.shape[-2]}x{x.shape[-1]}, "
                           f"kernel_size={tuple(k)}, stride={tuple(s)}, padding={tuple(p)}, dilation={tuple(d)}")


def _adaptive_size(op: str, input, output_size) -> list[int]:
    """output_size as torch.nn.functional reads it: an int, or a sequence whose None entries take
    the input's size (_list_with_default); then torch's checks of the input and the sizes."""
    if not isinstance(output_size, (int, torch.SymInt)):
        defaults = input.size()
        if len(defaults) <= len(output_size):
            raise ValueError(f"Input dimension should be at least {len(output_size) + 1}")
        output_size = [v if v is not None else dflt for v, dflt in zip(output_size, defaults[-len(output_size):])]
    sizes = _ints(output_size, op, "output_size")
    _check_tensor(input, op)
    if isinstance(output_size, (int, torch.SymInt)):
        sizes = sizes * 2
    if len(sizes) != 2:
        raise RuntimeError(f"{op}: output_size must have 2 elements, got {len(sizes)}")
    if op == "adaptive_avg_pool2d" and sizes == [1, 1]:
        # torch computes this one as input.mean((-1, -2), keepdim=True): any rank from 2, empty
        # planes included (their mean is NaN); a rank below 2 fails indexing dim -2.
        if input.dim() < 2:
            raise IndexError(f"Dimension out of range (expected to be in range of [-1, 0], but got -2): "
                             f"{op} to 1x1 needs at least 2 dims, got shape {list(input.shape)}")
        return sizes
    if input.dim() not in (3, 4):
        raise RuntimeError(f"{op}(): expected a 3-D or 4-D input, got shape {list(input.shape)}")
    # adaptive_avg_pool2d needs non-empty H and W; adaptive_max_pool2d every non-batch dimension.
    first = input.dim() - 2 if op == "adaptive_avg_pool2d" else 1
    for dim in range(first, input.dim()):
        if input.shape[dim] == 0:
            raise RuntimeError(f"{op}(): expected input to have non-zero size for non-batch dimensions, "
                               f"but input has sizes {list(input.shape)} with dimension {dim} being empty")
    if min(sizes) < 0:
        raise RuntimeError(f"{op}: elements of output_size must be greater than or equal to 0, got {sizes}")
    return sizes


def _unsupported(x: Tensor) -> dict[str, str | None]:
    why = None if x.dtype in KERNEL_DTYPES else f"the kernels take float32, float16 or bfloat16, not {x.dtype}"
    return {"triton": why, "cuda": why}


# ------------------------------------------------------------------------------------------------
# Outputs: torch's shapes and memory formats (channels_last in, channels_last out).

def _empty(x: Tensor, shape, dtype=None) -> Tensor:
    return _dispatch.empty(shape, dtype=dtype or x.dtype, device=x.device, memory_format=suggest_memory_format(x))


def _no_indices(x: Tensor) -> Tensor:
    return torch.empty(_NO_INDICES, dtype=torch.int64, device=x.device)


def _as4d(t: Tensor) -> Tensor:
    return t if t.dim() == 4 else t.unsqueeze(0)


# ------------------------------------------------------------------------------------------------
# Kernel calls shared by the Triton and CUDA implementations. `geom` is what the kernels take:
# is_max, adaptive, kernel, stride, padding, dilation, count_include_pad, divisor (0: none).

def _geom(is_max, adaptive, k=(1, 1), s=(1, 1), p=(0, 0), d=(1, 1), count_include_pad=True, divisor=None):
    return dict(is_max=is_max, adaptive=adaptive, kernel=tuple(k), stride=tuple(s), padding=tuple(p),
                dilation=tuple(d), count_include_pad=bool(count_include_pad), divisor=int(divisor or 0))


def _is_global(g: dict, out: Tensor) -> bool:
    return g["adaptive"] and out.shape[-2:] == (1, 1)


def _strides(t: Tensor | None) -> list[int]:
    return list(t.stride()) if t is not None else [0] * 4


def _window(g: dict) -> list[int]:
    return [*g["kernel"], *g["stride"], *g["padding"], *g["dilation"]]


def _launch_forward(backend: str, x: Tensor, out: Tensor, idx: Tensor | None, g: dict) -> None:
    if out.numel() == 0:
        return
    x4, out4, idx4 = _as4d(x), _as4d(out), (_as4d(idx) if idx is not None else None)
    if backend == "triton":
        from fastnets.kernels import pool as K

        if _is_global(g, out):
            K.global_pool2d(x4, out4, idx4, is_max=g["is_max"])
        else:
            K.pool2d_forward(x4, out4, idx4, **g)
        return
    mod, ptr = _ext.module(), _ext.ptr
    with torch.cuda.device(x.device):
        if _is_global(g, out):
            mod.global_pool2d(ptr(x4), list(x4.shape), _strides(x4), ptr(out4), _strides(out4), ptr(idx4),
                              _strides(idx4), _ext.dtype_code(x4), g["is_max"], _ext.stream(x4))
        else:
            mod.pool2d_forward(ptr(x4), list(x4.shape), _strides(x4), ptr(out4), list(out4.shape), _strides(out4),
                               ptr(idx4), _strides(idx4), _ext.dtype_code(x4), g["is_max"], g["adaptive"],
                               _window(g), g["count_include_pad"], g["divisor"], _ext.stream(x4))


def _launch_backward(backend: str, grad_out: Tensor, idx: Tensor | None, grad_in: Tensor, g: dict) -> None:
    if grad_in.numel() == 0:
        return
    if grad_out.numel() == 0:  # an adaptive pool to an empty output: no window, no gradient
        grad_in.zero_()
        return
    go4, gi4, idx4 = _as4d(grad_out), _as4d(grad_in), (_as4d(idx) if idx is not None else None)
    if backend == "triton":
        from fastnets.kernels import pool as K

        K.pool2d_backward(go4, idx4, gi4, **g)
        return
    mod, ptr = _ext.module(), _ext.ptr
    with torch.cuda.device(grad_in.device):
        mod.pool2d_backward(ptr(go4), list(go4.shape), _strides(go4), ptr(idx4), _strides(idx4), ptr(gi4),
                            list(gi4.shape), _strides(gi4), _ext.dtype_code(gi4), g["is_max"], g["adaptive"],
                            _window(g), g["count_include_pad"], g["divisor"], _ext.stream(gi4))


def _kernel_forward(backend: str, op: str, x: Tensor, shape, g: dict, with_indices: bool):
    _dispatch.record(op, backend)
    out = _empty(x, shape)
    idx = _empty(x, shape, torch.int64) if (g["is_max"] and with_indices) else None
    _launch_forward(backend, x, out, idx, g)
    return out, (idx if idx is not None else _no_indices(x))


def _kernel_backward(backend: str, op: str, grad_out: Tensor, x: Tensor, idx: Tensor | None, g: dict) -> Tensor:
    _dispatch.record(op, backend)
    # The kernels read grad_out (and idx) through raw strides: check what they assume.
    if (grad_out.dtype != x.dtype or grad_out.device != x.device or grad_out.dim() != x.dim()
            or grad_out.shape[:-2] != x.shape[:-2]):
        raise RuntimeError(f"{op}: grad_out {grad_out.dtype} {list(grad_out.shape)} on {grad_out.device} does not "
                           f"match the input {x.dtype} {list(x.shape)} on {x.device}")
    if g["is_max"] and (idx.dtype != torch.int64 or idx.shape != grad_out.shape or idx.device != x.device):
        raise RuntimeError(f"{op}: indices {idx.dtype} {list(idx.shape)} must be int64 of the gradient's shape "
                           f"{list(grad_out.shape)} (a forward with with_indices=False has none)")
    grad_in = _empty(x, x.shape)
    _launch_backward(backend, grad_out, idx, grad_in, g)
    return grad_in


# ------------------------------------------------------------------------------------------------
# The registered ops, one per backend. Fixed-window ops take the normalized pairs.

def _max_pool2d_proto(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                      dilation: list[int], ceil_mode: bool, with_indices: bool) -> tuple[Tensor, Tensor]:
    raise NotImplementedError


def _max_pool2d_fake(x, kernel_size, stride, padding, dilation, ceil_mode, with_indices):
    shape = _windowed_shape(x, kernel_size, stride, padding, dilation, ceil_mode)
    fmt = suggest_memory_format(x)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    idx = torch.empty(shape, dtype=torch.int64, device=x.device, memory_format=fmt) if with_indices else _no_indices(x)
    return out, idx


def _max_pool2d_kernel(backend, x, kernel_size, stride, padding, dilation, ceil_mode, with_indices):
    shape = _windowed_shape(x, kernel_size, stride, padding, dilation, ceil_mode)
    return _kernel_forward(backend, "max_pool2d", x, shape, _geom(True, False, kernel_size, stride, padding, dilation),
                           with_indices)


def _max_pool2d_triton(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                       dilation: list[int], ceil_mode: bool, with_indices: bool) -> tuple[Tensor, Tensor]:
    return _max_pool2d_kernel("triton", x, kernel_size, stride, padding, dilation, ceil_mode, with_indices)


def _max_pool2d_cuda(x, kernel_size, stride, padding, dilation, ceil_mode, with_indices):
    return _max_pool2d_kernel("cuda", x, kernel_size, stride, padding, dilation, ceil_mode, with_indices)


def _max_pool2d_torch(x, kernel_size, stride, padding, dilation, ceil_mode, with_indices):
    _dispatch.record("max_pool2d", "torch")
    if with_indices:
        return torch.ops.aten.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)
    return torch.ops.aten.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode), _no_indices(x)


def _max_pool2d_backward_proto(grad_out: Tensor, x: Tensor, indices: Tensor, kernel_size: list[int],
                               stride: list[int], padding: list[int], dilation: list[int],
                               ceil_mode: bool) -> Tensor:
    raise NotImplementedError


def _grad_fake(grad_out, x, *args):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))


def _max_pool2d_backward_triton(grad_out: Tensor, x: Tensor, indices: Tensor, kernel_size: list[int],
                                stride: list[int], padding: list[int], dilation: list[int],
                                ceil_mode: bool) -> Tensor:
    return _kernel_backward("triton", "max_pool2d_backward", grad_out, x, indices,
                            _geom(True, False, kernel_size, stride, padding, dilation))


def _max_pool2d_backward_cuda(grad_out, x, indices, kernel_size, stride, padding, dilation, ceil_mode):
    return _kernel_backward("cuda", "max_pool2d_backward", grad_out, x, indices,
                            _geom(True, False, kernel_size, stride, padding, dilation))


def _max_pool2d_backward_torch(grad_out, x, indices, kernel_size, stride, padding, dilation, ceil_mode):
    _dispatch.record("max_pool2d_backward", "torch")
    return torch.ops.aten.max_pool2d_with_indices_backward(grad_out, x, kernel_size, stride, padding, dilation,
                                                           ceil_mode, indices)


def _avg_pool2d_proto(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int], ceil_mode: bool,
                      count_include_pad: bool, divisor_override: Optional[int]) -> Tensor:
    raise NotImplementedError


def _avg_pool2d_fake(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    shape = _windowed_shape(x, kernel_size, stride, padding, (1, 1), ceil_mode)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))


def _avg_geom(kernel_size, stride, padding, count_include_pad, divisor_override):
    return _geom(False, False, kernel_size, stride, padding, (1, 1), count_include_pad, divisor_override)


def _avg_pool2d_triton(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int], ceil_mode: bool,
                       count_include_pad: bool, divisor_override: Optional[int]) -> Tensor:
    shape = _windowed_shape(x, kernel_size, stride, padding, (1, 1), ceil_mode)
    g = _avg_geom(kernel_size, stride, padding, count_include_pad, divisor_override)
    return _kernel_forward("triton", "avg_pool2d", x, shape, g, False)[0]


def _avg_pool2d_cuda(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    shape = _windowed_shape(x, kernel_size, stride, padding, (1, 1), ceil_mode)
    g = _avg_geom(kernel_size, stride, padding, count_include_pad, divisor_override)
    return _kernel_forward("cuda", "avg_pool2d", x, shape, g, False)[0]


def _avg_pool2d_torch(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    _dispatch.record("avg_pool2d", "torch")
    return torch.ops.aten.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def _avg_pool2d_backward_proto(grad_out: Tensor, x: Tensor, kernel_size: list[int], stride: list[int],
                               padding: list[int], ceil_mode: bool, count_include_pad: bool,
                               divisor_override: Optional[int]) -> Tensor:
    raise NotImplementedError


def _avg_pool2d_backward_triton(grad_out: Tensor, x: Tensor, kernel_size: list[int], stride: list[int],
                                padding: list[int], ceil_mode: bool, count_include_pad: bool,
                                divisor_override: Optional[int]) -> Tensor:
    g = _avg_geom(kernel_size, stride, padding, count_include_pad, divisor_override)
    return _kernel_backward("triton", "avg_pool2d_backward", grad_out, x, None, g)


def _avg_pool2d_backward_cuda(grad_out, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                              divisor_override):
    g = _avg_geom(kernel_size, stride, padding, count_include_pad, divisor_override)
    return _kernel_backward("cuda", "avg_pool2d_backward", grad_out, x, None, g)


def _avg_pool2d_backward_torch(grad_out, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                               divisor_override):
    _dispatch.record("avg_pool2d_backward", "torch")
    return torch.ops.aten.avg_pool2d_backward(grad_out, x, kernel_size, stride, padding, ceil_mode,
                                              count_include_pad, divisor_override)


def _adaptive_avg_pool2d_proto(x: Tensor, output_size: list[int]) -> Tensor:
    raise NotImplementedError


def _adaptive_shape(x, output_size):
    return [*x.shape[:-2], *output_size]


def _adaptive_avg_pool2d_fake(x, output_size):
    return torch.empty(_adaptive_shape(x, output_size), dtype=x.dtype, device=x.device,
                       memory_format=suggest_memory_format(x))


def _adaptive_avg_pool2d_triton(x: Tensor, output_size: list[int]) -> Tensor:
    return _kernel_forward("triton", "adaptive_avg_pool2d", x, _adaptive_shape(x, output_size),
                           _geom(False, True), False)[0]


def _adaptive_avg_pool2d_cuda(x, output_size):
    return _kernel_forward("cuda", "adaptive_avg_pool2d", x, _adaptive_shape(x, output_size),
                           _geom(False, True), False)[0]


def _adaptive_avg_pool2d_torch(x, output_size):
    _dispatch.record("adaptive_avg_pool2d", "torch")
    # The stock op (a mean for a 1x1 output) with the fake's strides, whatever the input's layout.
    return torch.ops.aten.adaptive_avg_pool2d(x, output_size).contiguous(memory_format=suggest_memory_format(x))


def _adaptive_avg_pool2d_backward_proto(grad_out: Tensor, x: Tensor) -> Tensor:
    raise NotImplementedError


def _adaptive_avg_pool2d_backward_triton(grad_out: Tensor, x: Tensor) -> Tensor:
    return _kernel_backward("triton", "adaptive_avg_pool2d_backward", grad_out, x, None, _geom(False, True))


def _adaptive_avg_pool2d_backward_cuda(grad_out, x):
    return _kernel_backward("cuda", "adaptive_avg_pool2d_backward", grad_out, x, None, _geom(False, True))


def _adaptive_avg_pool2d_backward_torch(grad_out, x):
    _dispatch.record("adaptive_avg_pool2d_backward", "torch")
    return torch.ops.aten._adaptive_avg_pool2d_backward(grad_out, x)


def _adaptive_max_pool2d_proto(x: Tensor, output_size: list[int], with_indices: bool) -> tuple[Tensor, Tensor]:
    raise NotImplementedError


def _adaptive_max_pool2d_fake(x, output_size, with_indices):
    shape, fmt = _adaptive_shape(x, output_size), suggest_memory_format(x)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    idx = torch.empty(shape, dtype=torch.int64, device=x.device, memory_format=fmt) if with_indices else _no_indices(x)
    return out, idx


def _adaptive_max_pool2d_triton(x: Tensor, output_size: list[int], with_indices: bool) -> tuple[Tensor, Tensor]:
    return _kernel_forward("triton", "adaptive_max_pool2d", x, _adaptive_shape(x, output_size), _geom(True, True),
                           with_indices)


def _adaptive_max_pool2d_cuda(x, output_size, with_indices):
    return _kernel_forward("cuda", "adaptive_max_pool2d", x, _adaptive_shape(x, output_size), _geom(True, True),
                           with_indices)


def _adaptive_max_pool2d_torch(x, output_size, with_indices):
    _dispatch.record("adaptive_max_pool2d", "torch")
    out, idx = torch.ops.aten.adaptive_max_pool2d(x, output_size)
    return out, (idx if with_indices else _no_indices(x))


def _adaptive_max_pool2d_backward_proto(grad_out: Tensor, x: Tensor, indices: Tensor) -> Tensor:
    raise NotImplementedError


def _adaptive_max_pool2d_backward_triton(grad_out: Tensor, x: Tensor, indices: Tensor) -> Tensor:
    return _kernel_backward("triton", "adaptive_max_pool2d_backward", grad_out, x, indices, _geom(True, True))


def _adaptive_max_pool2d_backward_cuda(grad_out, x, indices):
    return _kernel_backward("cuda", "adaptive_max_pool2d_backward", grad_out, x, indices, _geom(True, True))


def _adaptive_max_pool2d_backward_torch(grad_out, x, indices):
    _dispatch.record("adaptive_max_pool2d_backward", "torch")
    return torch.ops.aten.adaptive_max_pool2d_backward(grad_out, x, indices)


def _register(name: str, fake, impls: dict) -> dict:
    protos = {"max_pool2d": _max_pool2d_proto, "max_pool2d_backward": _max_pool2d_backward_proto,
              "avg_pool2d": _avg_pool2d_proto, "avg_pool2d_backward": _avg_pool2d_backward_proto,
              "adaptive_avg_pool2d": _adaptive_avg_pool2d_proto,
              "adaptive_avg_pool2d_backward": _adaptive_avg_pool2d_backward_proto,
              "adaptive_max_pool2d": _adaptive_max_pool2d_proto,
              "adaptive_max_pool2d_backward": _adaptive_max_pool2d_backward_proto}
    return _library.register(name, protos[name], fake=fake, impls=impls)


def _impls(prefix: str) -> dict:
    g = globals()
    return {b: g[f"_{prefix}_{b}"] for b in ("triton", "cuda", "torch")}


MAX_POOL2D = _register("max_pool2d", _max_pool2d_fake, _impls("max_pool2d"))
MAX_POOL2D_BACKWARD = _register("max_pool2d_backward", _grad_fake, _impls("max_pool2d_backward"))
AVG_POOL2D = _register("avg_pool2d", _avg_pool2d_fake, _impls("avg_pool2d"))
AVG_POOL2D_BACKWARD = _register("avg_pool2d_backward", _grad_fake, _impls("avg_pool2d_backward"))
ADAPTIVE_AVG_POOL2D = _register("adaptive_avg_pool2d", _adaptive_avg_pool2d_fake, _impls("adaptive_avg_pool2d"))
ADAPTIVE_AVG_POOL2D_BACKWARD = _register("adaptive_avg_pool2d_backward", _grad_fake,
                                         _impls("adaptive_avg_pool2d_backward"))
ADAPTIVE_MAX_POOL2D = _register("adaptive_max_pool2d", _adaptive_max_pool2d_fake, _impls("adaptive_max_pool2d"))
ADAPTIVE_MAX_POOL2D_BACKWARD = _register("adaptive_max_pool2d_backward", _grad_fake,
                                         _impls("adaptive_max_pool2d_backward"))


# Autograd: each backend's backward op, with the saved input (its shape and memory format) and, for
# max pooling, the indices.

def _save_input(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.args = inputs[1:]


def _save_input_indices(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[1])
    ctx.args = inputs[1:]


def _no_grads(ctx) -> tuple:
    return (None,) * len(ctx.args)


def _max_pool2d_bwd(backend, ctx, grad_out, _grad_idx):
    x, idx = ctx.saved_tensors
    *window, with_indices = ctx.args
    if not with_indices:
        raise RuntimeError("max_pool2d: the backward needs the indices, but the forward ran with with_indices=False")
    return (_library.call(MAX_POOL2D_BACKWARD, backend, grad_out, x, idx, *window), *_no_grads(ctx))


def _avg_pool2d_bwd(backend, ctx, grad_out):
    (x,) = ctx.saved_tensors
    return (_library.call(AVG_POOL2D_BACKWARD, backend, grad_out, x, *ctx.args), *_no_grads(ctx))


def _adaptive_avg_pool2d_bwd(backend, ctx, grad_out):
    (x,) = ctx.saved_tensors
    return (_library.call(ADAPTIVE_AVG_POOL2D_BACKWARD, backend, grad_out, x), *_no_grads(ctx))


def _adaptive_max_pool2d_bwd(backend, ctx, grad_out, _grad_idx):
    x, idx = ctx.saved_tensors
    if not ctx.args[-1]:
        raise RuntimeError("adaptive_max_pool2d: the backward needs the indices, but the forward ran with "
                           "with_indices=False")
    return (_library.call(ADAPTIVE_MAX_POOL2D_BACKWARD, backend, grad_out, x, idx), *_no_grads(ctx))


_library.register_autograd(MAX_POOL2D, setup_context=_save_input_indices, backward=_max_pool2d_bwd)
_library.register_autograd(AVG_POOL2D, setup_context=_save_input, backward=_avg_pool2d_bwd)
_library.register_autograd(ADAPTIVE_AVG_POOL2D, setup_context=_save_input, backward=_adaptive_avg_pool2d_bwd)
_library.register_autograd(ADAPTIVE_MAX_POOL2D, setup_context=_save_input_indices, backward=_adaptive_max_pool2d_bwd)


def _needs_indices(x: Tensor, return_indices) -> bool:
    return bool(return_indices) or (torch.is_grad_enabled() and x.requires_grad)


# ------------------------------------------------------------------------------------------------
# The public functions (torch.nn.functional's signatures and defaults).

def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """torch.nn.functional.max_pool2d: the maximum over each window; with return_indices, also
    its flat index h * W + w within the input plane (torch's: the first maximum, or the last NaN)."""
    op = "max_pool2d"
    _check_tensor(input, op)
    k = _ints(kernel_size, op, "kernel_size")
    s = _ints(stride, op, "stride") if stride is not None else []
    p, d = _ints(padding, op, "padding"), _ints(dilation, op, "dilation")
    _check_bool(ceil_mode, op, "ceil_mode")
    k = _pair(k, op, "kernel_size", "either be a single int, or a tuple of two ints")
    s = _pair(s, op, "stride", "either be omitted, a single int, or a tuple of two ints") if s else k
    p = _pair(p, op, "padding", "either be a single int, or a tuple of two ints")
    d = _pair(d, op, "dilation", "be either a single int, or a tuple of two ints")
    if input.dim() not in (3, 4):
        raise RuntimeError(f"{op}: expected a 3-D (C, H, W) or 4-D (N, C, H, W) input, got shape {list(input.shape)}")
    _check_window(op, input, k, s, p, d, ceil_mode)
    backend = _dispatch.choose(op, input.device, _unsupported(input),
                               probe=lambda: torch.ops.aten.max_pool2d(input, k, s, p, d, ceil_mode))
    out, idx = _library.call(MAX_POOL2D, backend, input, k, s, p, d, ceil_mode, _needs_indices(input, return_indices))
    return (out, idx) if return_indices else out


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """torch.nn.functional.avg_pool2d: the mean over each window, padding counted when
    count_include_pad, or the window sum over divisor_override when given."""
    op = "avg_pool2d"
    _check_tensor(input, op)
    k = _ints(kernel_size, op, "kernel_size")
    s = _ints(stride, op, "stride") if stride is not None else []
    p = _ints(padding, op, "padding")
    _check_bool(ceil_mode, op, "ceil_mode")
    _check_bool(count_include_pad, op, "count_include_pad")
    if divisor_override is not None and (isinstance(divisor_override, bool)
                                         or not hasattr(divisor_override, "__index__")):
        raise TypeError(f"{op}(): argument 'divisor_override' must be int, not {type(divisor_override).__name__}")
    k = _pair(k, op, "kernel_size", "either be a single int, or a tuple of two ints")
    s = _pair(s, op, "stride", "either be omitted, a single int, or a tuple of two ints") if s else k
    p = _pair(p, op, "padding", "either be a single int, or a tuple of two ints")
    divisor = operator.index(divisor_override) if divisor_override is not None else None
    if divisor == 0:
        raise RuntimeError(f"{op}: divisor_override must be non-zero")
    if input.dim() < 3:  # torch reads input.size(-3) first: IndexError
        raise IndexError(f"{op}: expected a 3-D (C, H, W) or 4-D (N, C, H, W) input, got shape {list(input.shape)}")
    _check_window(op, input, k, s, p, (1, 1), ceil_mode)
    backend = _dispatch.choose(op, input.device, _unsupported(input),
                               probe=lambda: torch.ops.aten.avg_pool2d(input, k, s, p, ceil_mode, count_include_pad,
                                                                       divisor))
    return _library.call(AVG_POOL2D, backend, input, k, s, p, ceil_mode, count_include_pad, divisor)


def adaptive_avg_pool2d(input, output_size):
    """torch.nn.functional.adaptive_avg_pool2d: the mean over windows floor(i*H/OH) to
    ceil((i+1)*H/OH); output_size an int or a pair whose None entries keep the input's size."""
    op = "adaptive_avg_pool2d"
    size = _adaptive_size(op, input, output_size)
    if size == [1, 1] and (input.dim() not in (3, 4) or input.shape[-2] * input.shape[-1] == 0):
        # torch's global average of any rank (a mean over the last two dims, as aten computes it)
        if input.shape[-2] * input.shape[-1] == 0:
            return input.mean((-1, -2), keepdim=True)  # no element to pool: NaN, as torch's mean
        planes = input.reshape(-1, *input.shape[-2:])  # (M, H, W): the 3-D form of the kernels
        return adaptive_avg_pool2d(planes, size).reshape(*input.shape[:-2], 1, 1)
    backend = _dispatch.choose(op, input.device, _unsupported(input),
                               probe=lambda: torch.ops.aten.adaptive_avg_pool2d(input, size))
    return _library.call(ADAPTIVE_AVG_POOL2D, backend, input, size)


def adaptive_max_pool2d(input, output_size, return_indices=False):
    """torch.nn.functional.adaptive_max_pool2d: the maximum over adaptive windows (and its index)."""
    op = "adaptive_max_pool2d"
    size = _adaptive_size(op, input, output_size)
    backend = _dispatch.choose(op, input.device, _unsupported(input),
                               probe=lambda: torch.ops.aten.adaptive_max_pool2d(input, size))
    out, idx = _library.call(ADAPTIVE_MAX_POOL2D, backend, input, size, _needs_indices(input, return_indices))
    return (out, idx) if return_indices else out
