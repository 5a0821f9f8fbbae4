"""Local response normalization (`local_response_norm`): argument checks, the torch.library
registration of each backend (Triton, CUDA C++, torch reference), autograd, and the reference.

Exactly torch's definition (torch.nn.functional.local_response_norm): for input (N, C, *),
    d[c] = k + alpha * mean over the channel window [c - size//2, c + (size-1)//2] of x^2,
with the squared input zero-padded at the channel edges and the mean always taken over `size`
channels (padding included); y = x / d^beta. 3-D and higher inputs, any layout (NCHW,
channels_last, strided views). Stock PyTorch builds it from six ops and as many memory passes;
the kernels do the forward in one pass (read x, write y) and the backward in one pass (read g and
x, write dx), recomputing d rather than saving it. Kernels: fastnets/kernels/lrn.py (Triton),
csrc/lrn.cu (CUDA C++).
"""
from __future__ import annotations

import math
import numbers
import operator

import torch
import torch.nn.functional as F

from fastnets import _dispatch, _ext, _library

OP = "lrn"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Layout: the kernels see [N, C, S0, S1, S2], the trailing dims merged where every tensor's
# strides allow it (contiguous NCHW and channels_last give one spatial dim).

def _merge_spatial(shape, strides_list):
    """Merges the spatial dims (shape[2:]) of tensors of one shape with the given strides.
    Returns (sizes, strides per tensor, number of spatial dims in use), or None when more than three
    spatial dims remain."""
    dims: list[tuple[int, list[int]]] = []
    for i in range(2, len(shape)):
        size = shape[i]
        st = [s[i] for s in strides_list]
        if size == 1:
            continue  # a size-1 dim has no effect on any offset
        if dims and all(prev == cur * size for prev, cur in zip(dims[-1][1], st)):
            dims[-1] = (dims[-1][0] * size, st)
        else:
            dims.append((size, st))
    if len(dims) > 3:
        return None
    spatial = max(1, len(dims))
    while len(dims) < 3:
        dims.append((1, [0] * len(strides_list)))
    sizes = [shape[0], shape[1]] + [d[0] for d in dims]
    strides = [[s[0], s[1]] + [d[1][j] for d in dims] for j, s in enumerate(strides_list)]
    return sizes, strides, spatial


def _layout(*tensors):
    """(tensors, sizes, strides per tensor, spatial) for the kernels; tensors made contiguous only in
    the rare case of more than three unmergeable spatial dims (a 6-D or higher permuted view)."""
    merged = _merge_spatial(tensors[0].shape, [t.stride() for t in tensors])
    if merged is None:
        tensors = tuple(t.contiguous() for t in tensors)
        merged = _merge_spatial(tensors[0].shape, [t.stride() for t in tensors])
    return (tensors, *merged)


def _neg_factor(beta: float) -> float:
    """The sign of (negative base) ** beta: +-1 for an integer beta, NaN otherwise (C's pow)."""
    if math.isfinite(beta) and beta == int(beta):
        return -1.0 if int(beta) % 2 else 1.0
    return math.nan


# ----------------------------------------------------------------------------------------------
# The implementations of each backend (forward, backward) and their registration.

def _prototype(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    raise NotImplementedError


def _bwd_prototype(grad: torch.Tensor, x: torch.Tensor, size: int, alpha: float, beta: float,
                   k: float) -> torch.Tensor:
    raise NotImplementedError


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    # torch computes x / (float tensor): integer inputs give the default float dtype.
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


def _fake(x, size, alpha, beta, k):
    return torch.empty_like(x, dtype=_out_dtype(x))


def _bwd_fake(grad, x, size, alpha, beta, k):
    return torch.empty_like(x)


def _torch_fwd(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    _dispatch.record(OP, "torch")
    return F.local_response_norm(x, size, alpha, beta, k)


def _window_sum(t: torch.Tensor, size: int, before: int) -> torch.Tensor:
    """Sum of t over channels c - before .. c - before + size - 1 (zero outside [0, C)), stock ops."""
    C = t.shape[1]
    padded = t.new_zeros((t.shape[0], C + size - 1) + tuple(t.shape[2:]))
    padded[:, before:before + C] = t
    return sum(padded[:, o:o + C] for o in range(size))


def _torch_bwd(grad: torch.Tensor, x: torch.Tensor, size: int, alpha: float, beta: float,
               k: float) -> torch.Tensor:
    """The hand-derived gradient (see fastnets/kernels/lrn.py) in stock ops, at float32 or better."""
    _dispatch.record(OP, "torch")
    ct = torch.promote_types(x.dtype, torch.float32)
    xf, gf = x.to(ct), grad.to(ct)
    d = (_window_sum(xf * xf, size, size // 2) / size) * alpha + k
    p = d.pow(beta)
    if beta != 0:
        dx = gf / p - (2.0 * alpha * beta / size) * xf * _window_sum(gf * xf / (p * d), size, (size - 1) // 2)
    else:  # torch's pow backward is exactly zero for a zero exponent: what remains of x * x's is x * 0
        dx = gf / p + xf * 0.0
    return _dispatch.empty_like(x).copy_(dx)


def _triton_fwd(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    from fastnets.kernels import lrn as kernels

    _dispatch.record(OP, "triton")
    y = _dispatch.empty_like(x)
    (x, y_), dims, (sx, sy), spatial = _layout(x, y)
    kernels.lrn_forward(x, y_, dims, sx, sy, spatial, size, alpha, beta, k, _neg_factor(beta))
    if y_ is not y:
        y.copy_(y_)
    return y


def _triton_bwd(grad: torch.Tensor, x: torch.Tensor, size: int, alpha: float, beta: float,
                k: float) -> torch.Tensor:
    from fastnets.kernels import lrn as kernels

    _dispatch.record(OP, "triton")
    dx = _dispatch.empty_like(x)
    (g, x, dx_), dims, (sg, sx, sy), spatial = _layout(grad, x, dx)
    kernels.lrn_backward(g, x, dx_, dims, sg, sx, sy, spatial, size, alpha, beta, k, _neg_factor(beta))
    if dx_ is not dx:
        dx.copy_(dx_)
    return dx


def _cuda_fwd(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    _dispatch.record(OP, "cuda")
    y = _dispatch.empty_like(x)
    (x, y_), dims, (sx, sy), _ = _layout(x, y)
    with torch.cuda.device(x.device):
        _ext.module().lrn_forward(_ext.ptr(x), _ext.ptr(y_), dims, sx, sy, size, alpha, beta, k,
                                  _ext.dtype_code(x), _ext.stream(x))
    if y_ is not y:
        y.copy_(y_)
    return y


def _cuda_bwd(grad: torch.Tensor, x: torch.Tensor, size: int, alpha: float, beta: float,
              k: float) -> torch.Tensor:
    _dispatch.record(OP, "cuda")
    dx = _dispatch.empty_like(x)
    (g, x, dx_), dims, (sg, sx, sy), _ = _layout(grad, x, dx)
    with torch.cuda.device(x.device):
        _ext.module().lrn_backward(_ext.ptr(g), _ext.ptr(x), _ext.ptr(dx_), dims, sg, sx, sy, size,
                                   alpha, beta, k, _ext.dtype_code(x), _ext.stream(x))
    if dx_ is not dx:
        dx.copy_(dx_)
    return dx


ops = _library.register(OP, _prototype, fake=_fake,
                        impls={"triton": _triton_fwd, "cuda": _cuda_fwd, "torch": _torch_fwd})
backward_ops = _library.register(OP + "_backward", _bwd_prototype, fake=_bwd_fake,
                                 impls={"triton": _triton_bwd, "cuda": _cuda_bwd, "torch": _torch_bwd})


def _setup_context(ctx, inputs, output):
    x, size, alpha, beta, k = inputs
    ctx.save_for_backward(x)
    ctx.params = (size, alpha, beta, k)


def _backward(backend, ctx, grad):
    (x,) = ctx.saved_tensors
    return _library.call(backward_ops, backend, grad, x, *ctx.params), None, None, None, None


_library.register_autograd(ops, setup_context=_setup_context, backward=_backward)


# ----------------------------------------------------------------------------------------------
# The public function.

def _number(value, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"local_response_norm(): {name} must be a real number, got {type(value).__name__}")
    return float(value)


def _unsupported(x: torch.Tensor) -> dict[str, str | None]:
    why = None
    if x.dtype not in _KERNEL_DTYPES:
        why = f"the kernels take float32, float16 or bfloat16 input, got {x.dtype}"
    return {"triton": why, "cuda": why}


def local_response_norm(input: torch.Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 1.0) -> torch.Tensor:
    """Local response normalization across channels, as torch.nn.functional.local_response_norm.

    input: (N, C, *) with at least 3 dims; size: channels in the window (an int >= 1); alpha, beta,
    k: as torch. Returns a tensor of input's shape, dtype and memory format. The Triton and CUDA
    kernels take float32, float16 and bfloat16; other dtypes run the torch reference.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"local_response_norm(): input must be a Tensor, got {type(input).__name__}")
    if input.dim() < 3:
        raise ValueError(f"Expected 3D or higher dimensionality input (got {input.dim()} dimensions)")
    if isinstance(size, bool) or isinstance(size, float):
        raise TypeError(f"local_response_norm(): size must be an int, got {type(size).__name__}")
    try:
        size = operator.index(size)
    except TypeError:
        raise TypeError(f"local_response_norm(): size must be an int, got {type(size).__name__}") from None
    alpha, beta, k = _number(alpha, "alpha"), _number(beta, "beta"), _number(k, "k")
    if input.numel() == 0:
        return input  # as torch: the input itself
    if input.dtype in (torch.float16, torch.bfloat16) and input.is_cuda and torch.is_autocast_enabled("cuda"):
        # CUDA autocast runs torch's pow in float32, so stock LRN returns float32 there: the same
        input = input.float()
    if size < 1:  # torch's avg_pool3d raises a RuntimeError for a window of size < 1
        raise RuntimeError(f"local_response_norm(): size must be at least 1, got {size}")
    backend = _dispatch.choose(OP, input.device, _unsupported(input),
                               probe=lambda: F.local_response_norm(input, size, alpha, beta, k))
    return _library.call(ops, backend, input, size, alpha, beta, k)
