"""Layer normalization (`layer_norm`, `add_layer_norm`): argument checks, the torch.library
registration of each backend (Triton, CUDA C++, torch reference), autograd, and the reference.

`layer_norm` has F.layer_norm's semantics; with `residual` it normalizes input + residual in the
same pass (the post-norm Transformer's add & norm). `add_layer_norm` returns (input + residual,
its layer norm) for the pre-norm block, whose residual stream continues with the sum. The kernels
(fastnets/kernels/layer_norm.py, csrc/layer_norm.cu) see the input as [M, N] rows with N the
product of normalized_shape, compute the statistics in float32 and save mean and rstd [M] for the
backward, which returns grad_input (= grad_residual), grad_weight and grad_bias, the latter two
through per-program partial sums reduced in a fixed order (deterministic).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from fastnets import _dispatch, _ext, _library

OP = "layer_norm"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Registered ops. Forward: x, residual [M, N]; weight, bias [N] -> (y [M, N], sum [M, N] or [0],
# mean [M], rstd [M]). Backward -> (grad of x and residual [M, N], grad weight [N] or [0], grad bias
# [N] or [0]).

def _prototype(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
               bias: Optional[torch.Tensor], eps: float, store_sum: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    raise NotImplementedError


def _bwd_prototype(dy: torch.Tensor, dsum: Optional[torch.Tensor], x: torch.Tensor,
                   residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, need_dw: bool,
                   need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    raise NotImplementedError


def _fwd_outputs(x, store_sum, empty=torch.empty):
    M, N = x.shape
    y = empty((M, N), dtype=x.dtype, device=x.device)
    s = empty((M, N) if store_sum else (0,), dtype=x.dtype, device=x.device)
    mean = empty((M,), dtype=_stat_dtype(x), device=x.device)
    rstd = empty((M,), dtype=_stat_dtype(x), device=x.device)
    return y, s, mean, rstd


def _bwd_outputs(x, weight, bias, need_dw, need_db, empty=torch.empty):
    dx = empty(tuple(x.shape), dtype=x.dtype, device=x.device)
    dw = empty((weight.shape[0],) if need_dw else (0,), dtype=(weight if need_dw else x).dtype, device=x.device)
    db = empty((bias.shape[0],) if need_db else (0,), dtype=(bias if need_db else x).dtype, device=x.device)
    return dx, dw, db


def _fake(x, residual, weight, bias, eps, store_sum):
    return _fwd_outputs(x, store_sum)


def _bwd_fake(dy, dsum, x, residual, weight, bias, mean, rstd, need_dw, need_db):
    return _bwd_outputs(x, weight, bias, need_dw, need_db)


def _torch_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
               bias: Optional[torch.Tensor], eps: float, store_sum: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stock aten.native_layer_norm (one fused pass on the CPU and the GPU), with its mean/rstd."""
    _dispatch.record(OP, "torch")
    s = x + residual if residual is not None else x
    y, mean, rstd = torch.native_layer_norm(s, (x.shape[1],), weight, bias, eps)
    st = _stat_dtype(x)
    if not store_sum:
        s_out = x.new_empty((0,))
    elif residual is not None and s.dtype == x.dtype and s.is_contiguous():
        s_out = s  # x + residual is a fresh dense tensor: returned as it is, no copy
    else:
        s_out = torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(s)
    return y, s_out, mean.reshape(-1).to(st), rstd.reshape(-1).to(st)


def _torch_bwd(dy: torch.Tensor, dsum: Optional[torch.Tensor], x: torch.Tensor,
               residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
               bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, need_dw: bool,
               need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stock aten.native_layer_norm_backward (statistics in float32 or better), plus the sum's own
    gradient for add_layer_norm."""
    _dispatch.record(OP, "torch")
    s = x + residual if residual is not None else x
    M, N = s.shape
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(
        dy, s, [N], mean.view(M, 1), rstd.view(M, 1), weight, bias, [True, need_dw, need_db])
    if dsum is not None:
        dx = (dx.to(torch.promote_types(x.dtype, torch.float32)) + dsum).to(x.dtype)
    _, dw_out, db_out = _bwd_outputs(x, weight, bias, need_dw, need_db, empty=torch.empty)
    if need_dw:
        dw_out.copy_(dw)
    if need_db:
        db_out.copy_(db)
    return dx.contiguous(), dw_out, db_out


def _triton_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], eps: float, store_sum: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastnets.kernels import layer_norm as kernels

    _dispatch.record(OP, "triton")
    y, s, mean, rstd = _fwd_outputs(x, store_sum, empty=_dispatch.empty)
    kernels.ln_forward(x, residual, weight, bias, y, s if store_sum else None, mean, rstd, eps)
    return y, s, mean, rstd


def _triton_bwd(dy: torch.Tensor, dsum: Optional[torch.Tensor], x: torch.Tensor,
                residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, need_dw: bool,
                need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastnets.kernels import layer_norm as kernels

    _dispatch.record(OP, "triton")
    dx, dw, db = _bwd_outputs(x, weight, bias, need_dw, need_db, empty=_dispatch.empty)
    kernels.ln_backward(dy, dsum, x, residual, weight, mean, rstd, dx,
                        dw if need_dw else None, db if need_db else None)
    return dx, dw, db


def _strides(t: Optional[torch.Tensor]) -> list[int]:
    return list(t.stride()) if t is not None else [0, 0]


def _code(t: Optional[torch.Tensor], x: torch.Tensor) -> int:
    return _ext.dtype_code(t if t is not None else x)


def _cuda_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
              bias: Optional[torch.Tensor], eps: float, store_sum: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _dispatch.record(OP, "cuda")
    y, s, mean, rstd = _fwd_outputs(x, store_sum, empty=_dispatch.empty)
    M, N = x.shape
    param = weight if weight is not None else bias
    with torch.cuda.device(x.device):
        _ext.module().layer_norm_forward(
            _ext.ptr(x), _ext.ptr(residual), _ext.ptr(weight), _ext.ptr(bias), _ext.ptr(y),
            _ext.ptr(s) if store_sum else 0, _ext.ptr(mean), _ext.ptr(rstd), M, N,
            list(x.stride()), _strides(residual), eps, residual is not None, weight is not None,
            bias is not None, store_sum, _ext.dtype_code(x), _code(param, x), _ext.stream(x))
    return y, s, mean, rstd


def _cuda_bwd(dy: torch.Tensor, dsum: Optional[torch.Tensor], x: torch.Tensor,
              residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
              bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, need_dw: bool,
              need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _dispatch.record(OP, "cuda")
    dx, dw, db = _bwd_outputs(x, weight, bias, need_dw, need_db, empty=_dispatch.empty)
    M, N = x.shape
    param = weight if weight is not None else bias
    with torch.cuda.device(x.device):
        _ext.module().layer_norm_backward(
            _ext.ptr(dy), _ext.ptr(dsum), _ext.ptr(x), _ext.ptr(residual), _ext.ptr(weight),
            _ext.ptr(mean), _ext.ptr(rstd), _ext.ptr(dx), _ext.ptr(dw) if need_dw else 0,
            _ext.ptr(db) if need_db else 0, M, N, list(dy.stride()), _strides(dsum), list(x.stride()),
            _strides(residual), dsum is not None, residual is not None, weight is not None,
            _ext.dtype_code(x), _code(param, x), _ext.stream(x))
    return dx, dw, db


ops = _library.register(OP, _prototype, fake=_fake,
                        impls={"triton": _triton_fwd, "cuda": _cuda_fwd, "torch": _torch_fwd})
backward_ops = _library.register(OP + "_backward", _bwd_prototype, fake=_bwd_fake,
                                 impls={"triton": _triton_bwd, "cuda": _cuda_bwd, "torch": _torch_bwd})


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, store_sum = inputs
    y, s, mean, rstd = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*((mean, rstd) if store_sum else (s, mean, rstd)))  # one call: a second replaces it
    # add_layer_norm's backward reads the stored (rounded) sum; layer_norm's recomputes x + residual.
    ctx.store_sum = store_sum
    ctx.save_for_backward(s if store_sum else x, None if store_sum else residual, weight, bias, mean, rstd)
    ctx.has_residual = residual is not None


def _backward(backend, ctx, dy, ds, dmean, drstd):
    x, residual, weight, bias, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dw, need_db = weight is not None and need[2], bias is not None and need[3]
    if dy is None and ds is None:
        return None, None, None, None, None, None
    if dy is None:  # only the sum was used: the normalized output contributes nothing
        dy = torch.zeros_like(x)
    dx, dw, db = backward_ops[backend](dy, ds if ctx.store_sum else None, x, residual, weight, bias,
                                       mean, rstd, need_dw, need_db)
    return (dx, dx if ctx.has_residual else None, dw if need_dw else None, db if need_db else None,
            None, None)


_library.register_autograd(ops, setup_context=_setup_context, backward=_backward)


# ----------------------------------------------------------------------------------------------
# The public functions.

def _check(fn, input, normalized_shape, weight, bias, eps, residual):
    """Torch's checks (same exception types and messages as F.layer_norm) plus the residual's.
    Returns (normalized_shape as a tuple, eps as a float)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{fn}(): input must be a Tensor, got {type(input).__name__}")
    if not isinstance(normalized_shape, (tuple, list, torch.Size)):
        raise TypeError(f"{fn}(): argument 'normalized_shape' must be tuple of ints, not "
                        f"{type(normalized_shape).__name__}")
    for d in normalized_shape:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            raise TypeError(f"{fn}(): argument 'normalized_shape' must be tuple of ints, but found "
                            f"element of type {type(d).__name__}")
    shape = tuple(int(d) for d in normalized_shape)
    if len(shape) == 0:
        raise RuntimeError("Expected normalized_shape to be at least 1-dimensional, i.e., containing at "
                           "least one element, but got normalized_shape = []")
    if tuple(input.shape[input.dim() - len(shape):]) != shape or input.dim() < len(shape):
        raise RuntimeError(f"Given normalized_shape={list(shape)}, expected input with shape "
                           f"[*, {', '.join(map(str, shape))}], but got input of size{list(input.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{fn}(): {name} must be a Tensor or None, got {type(p).__name__}")
        if tuple(p.shape) != shape:
            raise RuntimeError(f"Expected {name} to be of same shape as normalized_shape, but got {name} "
                               f"of shape {list(p.shape)} and normalized_shape = {list(shape)}")
        if p.device != input.device:
            raise RuntimeError(f"Expected all tensors to be on the same device, but {name} is on "
                               f"{p.device} and input on {input.device}")
        mixed_ok = input.dtype in (torch.float16, torch.bfloat16) and p.dtype == torch.float32
        if p.dtype != input.dtype and not mixed_ok:
            raise RuntimeError(f"{fn}(): {name} has dtype {p.dtype}; expected the input's ({input.dtype}), "
                               f"or float32 for a float16/bfloat16 input")
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise RuntimeError(f"{fn}(): weight ({weight.dtype}) and bias ({bias.dtype}) must have one dtype")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"{fn}(): residual must be a Tensor, got {type(residual).__name__}")
        if residual.shape != input.shape:
            raise RuntimeError(f"{fn}(): residual must have the input's shape {list(input.shape)}, got "
                               f"{list(residual.shape)}")
        if residual.device != input.device:
            raise RuntimeError(f"{fn}(): residual is on {residual.device}, input on {input.device}")
        if residual.dtype != input.dtype:
            raise TypeError(f"{fn}(): residual must have the input's dtype {input.dtype}, got {residual.dtype}")
    if isinstance(eps, torch.Tensor) and eps.numel() == 1:
        eps = eps.item()
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{fn}(): eps must be a real number, got {type(eps).__name__}")
    return shape, float(eps)


def _run(input, shape, weight, bias, eps, residual, store_sum):
    N = math.prod(shape)
    M = input.numel() // N
    x2 = input.reshape(M, N)
    r2 = residual.reshape(M, N) if residual is not None else None
    w1 = weight.reshape(N).contiguous() if weight is not None else None  # the kernels read [N] densely
    b1 = bias.reshape(N).contiguous() if bias is not None else None
    why = None if input.dtype in _KERNEL_DTYPES else (
        f"the kernels take float32, float16 or bfloat16 input, got {input.dtype}")
    backend = _dispatch.choose(OP, input.device, {"triton": why, "cuda": why},
                               probe=lambda: F.layer_norm(x2 if r2 is None else x2 + r2, (N,), w1, b1, eps))
    y, s, _, _ = _library.call(ops, backend, x2, r2, w1, b1, eps, store_sum)
    return y.view(input.shape), (s.view(input.shape) if store_sum else None)


def _autocast_fp32(input) -> bool:
    """CUDA autocast runs torch's layer_norm in float32 (its float32 op list): so do these."""
    return (isinstance(input, torch.Tensor) and input.is_cuda and input.dtype in (torch.float16, torch.bfloat16)
            and torch.is_autocast_enabled("cuda"))


def _fp32(*ts):
    return [t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16) else t
            for t in ts]


def layer_norm(input: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, *,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """F.layer_norm(input, normalized_shape, weight, bias, eps); with `residual` (input's shape and
    dtype), the layer norm of input + residual, the sum formed in float32 inside the kernel and
    never written (post-norm add & norm). Output: input's shape and dtype, contiguous (float32 under
    CUDA autocast, as torch's). weight and bias: normalized_shape, input's dtype (or float32 for a
    float16/bfloat16 input)."""
    if _autocast_fp32(input):
        input, weight, bias, residual = _fp32(input, weight, bias, residual)
    shape, eps = _check("layer_norm", input, normalized_shape, weight, bias, eps, residual)
    if input.numel() == 0:
        return F.layer_norm(input + residual if residual is not None else input, shape, weight, bias, eps)
    return _run(input, shape, weight, bias, eps, residual, store_sum=False)[0]


def add_layer_norm(input: torch.Tensor, residual: torch.Tensor, normalized_shape,
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(input + residual, layer_norm(input + residual)) in one pass, for the pre-norm block whose
    residual stream continues with the sum. The sum is rounded to input's dtype, and that rounded
    sum is what is normalized (as the stock composition does). Both outputs are differentiable.
    Under CUDA autocast (torch's layer_norm runs in float32 there) the sum is a separate add and
    the normalized output float32, as in the stock composition."""
    if residual is None:
        raise TypeError("add_layer_norm(): residual must be a Tensor, got None")
    if _autocast_fp32(input):  # as the stock composition: the sum in input's dtype, its norm in float32
        _check("add_layer_norm", input, normalized_shape, *_fp32(weight, bias), eps, residual)
        s = input + residual
        return s, layer_norm(s, normalized_shape, weight, bias, eps)
    shape, eps = _check("add_layer_norm", input, normalized_shape, weight, bias, eps, residual)
    if input.numel() == 0:
        s = input + residual
        return s, F.layer_norm(s, shape, weight, bias, eps)
    y, s = _run(input, shape, weight, bias, eps, residual, store_sum=True)
    return s, y
