"""Batch-norm + residual + activation (`batch_norm_act`, and `batch_norm_act_train` for the fused
convolution's training path): argument checks, the torch.library registration of each backend
(Triton, CUDA C++, torch reference), autograd, and the reference.

    y = act(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps) + residual)

with F.batch_norm's semantics: input (N, C, *); in training the batch statistics normalize and the
running statistics (when given) are updated in place, r = (1 - momentum) * r + momentum * batch,
with the unbiased variance; in eval the running statistics normalize. Stock PyTorch makes three
passes of the elementwise part (batch-norm, add, activation) and saves two tensors for backward;
here eval is one pass (read x, write y), training a statistics pass plus that pass, and the
backward one reduction pass plus one elementwise pass, recomputing the pre-activation from x (so
only x is saved). Kernels: fastnets/kernels/norm_act.py (Triton, with the byte counts), csrc/norm_act.cu
(CUDA C++).

Registered ops (fastnets::<name>_<backend>, backend in triton/cuda/torch):
    norm_act_stats    (x, running_mean!?, running_var!?, batch_mean?, batch_var?, momentum)
                      -> (mean, var)          batch mean and biased variance [C] (float32, float64
                      for float64 input), the running statistics updated in place
    norm_act          (x, mean, var, weight?, bias?, residual?, eps, act, training) -> y
    norm_act_backward (grad, x, mean, var, weight?, bias?, residual?, eps, act, training, need_dx,
                      need_dr, need_wb) -> (dx, grad_weight, grad_bias, grad_residual)
norm_act is differentiable in x, weight, bias and residual. In training its mean and var come from
norm_act_stats on the detached input, and its backward is the full training formula (the
gradient through the batch statistics included), as torch's native batch-norm saves its statistics.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from fastnets.ops._layout import suggest_memory_format

from fastnets import _dispatch, _ext, _library
from fastnets.ops import _activation

OP = "norm_act"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Layout: the kernels see every tensor as [N, C, S] with its own three strides.

def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    """The statistics' dtype: float32 (float64 for float64 input)."""
    return torch.promote_types(x.dtype, torch.float32)


def _alloc(x: torch.Tensor, fake: bool = False) -> torch.Tensor:
    """An output of x's shape and dtype in the memory format torch's batch-norm gives (x's suggested
    format: channels_last stays channels_last, anything else is contiguous)."""
    fmt = suggest_memory_format(x)
    if fake:
        return torch.empty_like(x, memory_format=fmt)
    return _dispatch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def _strides3(t: torch.Tensor) -> list[int] | None:
    """(sn, sc, ss) of t seen as [N, C, S] (S = the spatial dims merged), or None when the spatial
    dims cannot merge into one stride (a permuted or sliced view)."""
    st = t.stride()
    dims = [(t.shape[i], st[i]) for i in range(2, t.dim()) if t.shape[i] != 1]
    for (_, outer), (size, inner) in zip(dims, dims[1:]):
        if outer != inner * size:
            return None
    return [st[0], st[1], dims[-1][1] if dims else 1]


def _layout(x: torch.Tensor, *others: torch.Tensor | None):
    """The kernels' view of x and of tensors of x's shape (None passes through).

    Returns (tensors, dims, strides, channels_inner): tensors as given, or made contiguous (an
    explicit copy, only for views whose spatial dims do not merge); dims = (N, C, S); one stride
    triple per tensor. N is merged into S when every tensor allows it (channels_last, 2-D input,
    N = 1), so that the tiles run across images. channels_inner: x's channels are closer in memory
    than its positions (channels_last), which decides the tiles' orientation."""
    tensors, strides = [], []
    for t in (x, *others):
        if t is None:
            tensors.append(None)
            strides.append(None)
            continue
        s3 = _strides3(t)
        if s3 is None:
            t = t.contiguous()
            s3 = _strides3(t)
        tensors.append(t)
        strides.append(s3)
    N, C = x.shape[0], x.shape[1]
    S = x.numel() // (N * C)
    live = [s for s in strides if s is not None]
    if S == 1:
        for s in live:
            s[2] = s[0]
        N, S = 1, N
    elif N > 1 and all(s[0] == S * s[2] for s in live):
        N, S = 1, N * S
    sx = strides[0]
    channels_inner = S > 1 and abs(sx[1]) < abs(sx[2])
    return tensors, (N, C, S), strides, channels_inner


def _vec(t: torch.Tensor | None) -> torch.Tensor | None:
    """A per-channel vector as the kernels read it: [C] float32 contiguous (no copy when it is)."""
    return None if t is None else t.reshape(-1).to(torch.float32).contiguous()


def _running(t: torch.Tensor | None) -> torch.Tensor | None:
    """The buffer the kernels update in place for a running statistic: t itself when it is float32
    and contiguous, else a float32 copy that the caller copies back."""
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.reshape(-1).to(torch.float32).contiguous()


def _unbias(x: torch.Tensor) -> float:
    n = x.numel() // x.shape[1]
    return n / (n - 1) if n > 1 else float("nan")


# ----------------------------------------------------------------------------------------------
# The statistics op (training): batch mean and biased variance, running-statistics update.

def _stats_proto(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                 batch_mean: torch.Tensor | None, batch_var: torch.Tensor | None,
                 momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    raise NotImplementedError


def _stats_fake(x, running_mean, running_var, batch_mean, batch_var, momentum):
    C = x.shape[1]
    return x.new_empty(C, dtype=_stat_dtype(x)), x.new_empty(C, dtype=_stat_dtype(x))


def batch_stats_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of x (N, C, *) in the statistics' dtype, by stock
    aten.batch_norm_update_stats: the statistics pass of torch's own training batch-norm (vectorized,
    NCHW and channels_last), without its normalizing pass (native_batch_norm would also write a
    normalized copy of x; torch.var_mean over the same dimensions is about 7x slower on a CPU)."""
    ct = _stat_dtype(x)
    return torch.ops.aten.batch_norm_update_stats(x.to(ct), None, None, 0.0)


def _torch_stats(x, running_mean, running_var, batch_mean, batch_var, momentum):
    _dispatch.record("norm_act_stats" if batch_mean is None else "norm_act_stats_given", "torch")
    ct = _stat_dtype(x)
    if batch_mean is None:
        mean, var = batch_stats_reference(x)
    else:
        mean = batch_mean.reshape(-1).to(ct, copy=True)
        var = batch_var.reshape(-1).to(ct, copy=True)
    if running_mean is not None:
        rm = momentum * mean + (1.0 - momentum) * running_mean.reshape(-1).to(ct)
        rv = momentum * (var * _unbias(x)) + (1.0 - momentum) * running_var.reshape(-1).to(ct)
        running_mean.copy_(rm.view(running_mean.shape))
        running_var.copy_(rv.view(running_var.shape))
    return mean, var


def _kernel_stats(backend, x, running_mean, running_var, batch_mean, batch_var, momentum):
    _dispatch.record("norm_act_stats" if batch_mean is None else "norm_act_stats_given", backend)
    C = x.shape[1]
    mean = _dispatch.empty(C, dtype=torch.float32, device=x.device)
    var = _dispatch.empty(C, dtype=torch.float32, device=x.device)
    (x,), dims, (sx,), channels_inner = _layout(x)
    rm, rv = _running(running_mean), _running(running_var)
    bm, bv = _vec(batch_mean), _vec(batch_var)
    unbias = _unbias(x)
    if backend == "triton":
        from fastnets.kernels import norm_act as kernels

        kernels.stats(x, sx, dims, channels_inner, mean, var, bm, bv, rm, rv, momentum, unbias)
    else:
        N, _, S = dims
        P, rows_per = _cuda_partition(N * S, C, channels_inner, x.device) if bm is None else (0, 0)
        pmean = torch.empty((P, C), dtype=torch.float32, device=x.device) if P else None
        pm2 = torch.empty((P, C), dtype=torch.float32, device=x.device) if P else None
        with torch.cuda.device(x.device):
            _ext.module().norm_act_stats(
                _ext.ptr(x), list(dims), sx, channels_inner, _ext.ptr(pmean), _ext.ptr(pm2), P, rows_per,
                _ext.ptr(bm), _ext.ptr(bv), _ext.ptr(mean), _ext.ptr(var), _ext.ptr(rm), _ext.ptr(rv),
                float(momentum), float(unbias), _ext.dtype_code(x), _ext.stream(x))
    for buf, t in ((rm, running_mean), (rv, running_var)):
        if buf is not None and buf is not t:
            t.copy_(buf.view(t.shape))
    return mean, var


def _triton_stats(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                  batch_mean: torch.Tensor | None, batch_var: torch.Tensor | None,
                  momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernel_stats("triton", x, running_mean, running_var, batch_mean, batch_var, momentum)


def _cuda_stats(x, running_mean, running_var, batch_mean, batch_var, momentum):
    return _kernel_stats("cuda", x, running_mean, running_var, batch_mean, batch_var, momentum)


def _cuda_partition(R: int, C: int, channels_inner: bool, device) -> tuple[int, int]:
    """(P, rows per partial) of the CUDA reductions: about 8 blocks per SM over (channel blocks, P),
    each partial a contiguous range of R = N * S rows (csrc/norm_act.cu: kChannelTile channels per
    block in channels_last, one channel per block in NCHW)."""
    cblocks = -(-C // 32) if channels_inner else C
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    target = max(1, min(-(-8 * sms // cblocks), -(-R // 1024), 65535))
    rows_per = -(-R // target)
    return -(-R // rows_per), rows_per


# ----------------------------------------------------------------------------------------------
# The normalize + residual + activation op and its backward.

def _proto(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
           bias: torch.Tensor | None, residual: torch.Tensor | None, eps: float, act: int,
           training: bool) -> torch.Tensor:
    raise NotImplementedError


def _bwd_proto(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
               weight: torch.Tensor | None, bias: torch.Tensor | None, residual: torch.Tensor | None,
               eps: float, act: int, training: bool, need_dx: bool, need_dr: bool,
               need_wb: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    raise NotImplementedError


def _fake(x, mean, var, weight, bias, residual, eps, act, training):
    return _alloc(x, fake=True)


def _nothing(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh empty tensor for an output that was not asked for (outputs may not alias)."""
    return x.new_empty(0, dtype=dtype or x.dtype)


def _bwd_fake(grad, x, mean, var, weight, bias, residual, eps, act, training, need_dx, need_dr, need_wb):
    C, ct = x.shape[1], _stat_dtype(x)
    return (_alloc(x, fake=True) if need_dx else _nothing(x),
            x.new_empty(C, dtype=ct) if need_wb else _nothing(x, ct),
            x.new_empty(C, dtype=ct) if need_wb else _nothing(x, ct),
            _alloc(x, fake=True) if need_dr else _nothing(x))


def _torch_z(x, mean, var, weight, bias, residual, eps):
    """Reference pre-activation z = (x - mean) * invstd * w + b + residual in the statistics' dtype:
    stock batch_norm in its eval form (one fused pass) with the batch's mean and variance."""
    ct = _stat_dtype(x)
    vec = lambda t: t.reshape(-1).to(ct) if t is not None else None  # noqa: E731
    z = F.batch_norm(x.to(ct), vec(mean), vec(var), vec(weight), vec(bias), False, 0.0, eps)
    return z.add_(residual) if residual is not None else z


def _torch_fwd(x, mean, var, weight, bias, residual, eps, act, training):
    _dispatch.record(OP, "torch")
    y = _activation.apply_(_torch_z(x, mean, var, weight, bias, residual, eps), act)
    if y.dtype == x.dtype and y.is_contiguous(memory_format=suggest_memory_format(x)):
        return y  # batch_norm's fresh output, in the dtype and memory format _alloc gives: no copy
    return _alloc(x).copy_(y)


def _torch_bwd(grad, x, mean, var, weight, bias, residual, eps, act, training, need_dx, need_dr, need_wb):
    """Reference backward through stock ops: the activation's backward, then
    aten.native_batch_norm_backward (training: the full formula through the batch statistics;
    eval: dz * w * invstd), whose weight and bias gradients are sum(dz * xhat) and sum(dz)."""
    _dispatch.record(OP + "_backward", "torch")
    ct = _stat_dtype(x)
    dz = _activation.grad(_torch_z(x, mean, var, weight, bias, residual, eps), grad.to(ct), act)
    dx, dr = _nothing(x), _nothing(x)
    if need_dr:
        dr = _alloc(x).copy_(dz)
    if not (need_dx or need_wb):
        return dx, _nothing(x, ct), _nothing(x, ct), dr
    m, v = mean.reshape(-1).to(ct), var.reshape(-1).to(ct)
    w = weight.reshape(-1).to(ct) if weight is not None else torch.ones_like(m)
    mask = [need_dx, need_wb, need_wb]
    if training:
        dxf, dw, db = torch.ops.aten.native_batch_norm_backward(dz, x.to(ct), w, None, None, m, torch.rsqrt(v + eps),
                                                                True, eps, mask)
    else:
        dxf, dw, db = torch.ops.aten.native_batch_norm_backward(dz, x.to(ct), w, m, v, None, None, False, eps, mask)
    if need_dx:
        fresh = dxf.dtype == x.dtype and dxf.is_contiguous(memory_format=suggest_memory_format(x))
        dx = dxf if fresh else _alloc(x).copy_(dxf)  # native_batch_norm_backward's own output: no copy
    if not need_wb:
        return dx, _nothing(x, ct), _nothing(x, ct), dr
    return dx, dw, db, dr


def _kernel_fwd(backend, x, mean, var, weight, bias, residual, eps, act, training):
    _dispatch.record(OP, backend)
    y = _alloc(x)
    (x, r, y_), dims, (sx, sr, sy), channels_inner = _layout(x, residual, y)
    m, v, w, b = _vec(mean), _vec(var), _vec(weight), _vec(bias)
    if backend == "triton":
        from fastnets.kernels import norm_act as kernels

        kernels.apply(x, sx, r, sr, y_, sy, dims, channels_inner, m, v, w, b, eps, act)
    else:
        with torch.cuda.device(x.device):
            _ext.module().norm_act_forward(
                _ext.ptr(x), _ext.ptr(r), _ext.ptr(y_), list(dims), sx, sr or [0, 0, 0], sy, _ext.ptr(m),
                _ext.ptr(v), _ext.ptr(w), _ext.ptr(b), float(eps), act, channels_inner, _ext.dtype_code(x),
                _ext.stream(x))
    return y


def _kernel_bwd(backend, grad, x, mean, var, weight, bias, residual, eps, act, training, need_dx, need_dr,
                need_wb):
    _dispatch.record(OP + "_backward", backend)
    C = x.shape[1]
    grad = grad if grad.dtype == x.dtype else grad.to(x.dtype)  # the kernels take one dtype
    dx = _alloc(x) if need_dx else None
    dr = _alloc(x) if need_dr else None
    reduce = need_wb or (training and need_dx)
    sum_dz = _dispatch.empty(C, dtype=torch.float32, device=x.device) if reduce else None
    sum_dzx = _dispatch.empty(C, dtype=torch.float32, device=x.device) if reduce else None
    (x, g, r, dx_, dr_), dims, (sx, sg, sr, sdx, sdr), channels_inner = _layout(x, grad, residual, dx, dr)
    m, v, w, b = _vec(mean), _vec(var), _vec(weight), _vec(bias)
    if backend == "triton":
        from fastnets.kernels import norm_act as kernels

        kernels.backward(g, sg, x, sx, r, sr, dx_, sdx, dr_, sdr, dims, channels_inner, m, v, w, b, eps, act,
                         training, sum_dz, sum_dzx)
    else:
        N, _, S = dims
        P, rows_per = _cuda_partition(N * S, C, channels_inner, x.device) if reduce else (0, 0)
        psum_dz = torch.empty((P, C), dtype=torch.float32, device=x.device) if P else None
        psum_dzx = torch.empty((P, C), dtype=torch.float32, device=x.device) if P else None
        zero = [0, 0, 0]
        with torch.cuda.device(x.device):
            _ext.module().norm_act_backward(
                _ext.ptr(g), _ext.ptr(x), _ext.ptr(r), _ext.ptr(dx_), _ext.ptr(dr_), list(dims), sg, sx,
                sr or zero, sdx or zero, sdr or zero, _ext.ptr(m), _ext.ptr(v), _ext.ptr(w), _ext.ptr(b),
                _ext.ptr(psum_dz), _ext.ptr(psum_dzx), P, rows_per, _ext.ptr(sum_dz), _ext.ptr(sum_dzx),
                float(eps), act, training, channels_inner, _ext.dtype_code(x), _ext.stream(x))
    for out, tmp in ((dx, dx_), (dr, dr_)):
        if out is not None and tmp is not out:
            out.copy_(tmp)
    dx = dx if need_dx else _nothing(x)
    dr = dr if need_dr else _nothing(x)
    if not need_wb:
        return dx, _nothing(x, torch.float32), _nothing(x, torch.float32), dr
    return dx, sum_dzx, sum_dz, dr


def _triton_fwd(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
                bias: torch.Tensor | None, residual: torch.Tensor | None, eps: float, act: int,
                training: bool) -> torch.Tensor:
    return _kernel_fwd("triton", x, mean, var, weight, bias, residual, eps, act, training)


def _cuda_fwd(x, mean, var, weight, bias, residual, eps, act, training):
    return _kernel_fwd("cuda", x, mean, var, weight, bias, residual, eps, act, training)


def _triton_bwd(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                weight: torch.Tensor | None, bias: torch.Tensor | None, residual: torch.Tensor | None, eps: float,
                act: int, training: bool, need_dx: bool, need_dr: bool,
                need_wb: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernel_bwd("triton", grad, x, mean, var, weight, bias, residual, eps, act, training, need_dx, need_dr,
                       need_wb)


def _cuda_bwd(grad, x, mean, var, weight, bias, residual, eps, act, training, need_dx, need_dr, need_wb):
    return _kernel_bwd("cuda", grad, x, mean, var, weight, bias, residual, eps, act, training, need_dx, need_dr,
                       need_wb)


stats_ops = _library.register("norm_act_stats", _stats_proto, fake=_stats_fake,
                              impls={"triton": _triton_stats, "cuda": _cuda_stats, "torch": _torch_stats},
                              mutates_args=("running_mean", "running_var"))
ops = _library.register(OP, _proto, fake=_fake,
                        impls={"triton": _triton_fwd, "cuda": _cuda_fwd, "torch": _torch_fwd})
backward_ops = _library.register(OP + "_backward", _bwd_proto, fake=_bwd_fake,
                                 impls={"triton": _triton_bwd, "cuda": _cuda_bwd, "torch": _torch_bwd})


def _setup_context(ctx, inputs, output):
    x, mean, var, weight, bias, residual, eps, act, training = inputs
    ctx.save_for_backward(x, mean, var, weight, bias, residual)
    ctx.params = (eps, act, training)
    ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)


def _backward(backend, ctx, grad):
    x, mean, var, weight, bias, residual = ctx.saved_tensors
    eps, act, training = ctx.params
    need_dx, _, _, need_w, need_b, need_r = ctx.needs_input_grad[:6]
    if not (need_dx or need_w or need_b or need_r):
        return (None,) * 9
    dx, dw, db, dr = backward_ops[backend](grad, x, mean, var, weight, bias, residual, eps, act, training,
                                           need_dx, need_r, need_w or need_b)
    wdt, bdt = ctx.dtypes
    return (dx if need_dx else None, None, None, dw.to(wdt).view(weight.shape) if need_w else None,
            db.to(bdt).view(bias.shape) if need_b else None, dr if need_r else None, None, None, None)


_library.register_autograd(ops, setup_context=_setup_context, backward=_backward)


# ----------------------------------------------------------------------------------------------
# The public functions.

def _number(value, name: str, fn: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}(): argument '{name}' must be float, not {type(value).__name__}")
    return float(value)


def _check_input(input, fn: str) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{fn}(): input must be a Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise RuntimeError(f"{fn}(): input must have at least 2 dims (N, C, *), got {input.dim()}")
    if not input.is_floating_point():
        raise NotImplementedError(f"{fn}(): not implemented for {input.dtype} input (floating point only)")


def _check_vector(t, name: str, x: torch.Tensor, fn: str) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}(): argument '{name}' must be Tensor, not {type(t).__name__}")
    if t.device != x.device:
        raise RuntimeError(f"{fn}(): {name} is on {t.device}, but input is on {x.device}")
    C = x.shape[1]
    if t.numel() != C:
        raise RuntimeError(f"{name} should contain {C} elements not {t.numel()}")
    if name.startswith(("running_", "batch_")) and t.dim() != 1:  # torch reads them as 1-D (weight, bias: any shape)
        raise RuntimeError(f"{fn}(): {name} must be 1-D [{C}], got shape {list(t.shape)}")


def _check_param_dtypes(x: torch.Tensor, named, fn: str) -> None:
    """torch's rule: the parameters and running statistics share one dtype, the input's, or float32
    for float16/bfloat16 input (its mixed-precision batch-norm)."""
    given = [(n, t) for n, t in named if t is not None]
    allowed = (x.dtype, torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else (x.dtype,)
    for name, t in given:
        if t.dtype not in allowed:
            raise RuntimeError(f"{fn}(): {name} must have dtype {' or '.join(map(str, allowed))} for {x.dtype} "
                               f"input, got {t.dtype}")
    if len({t.dtype for _, t in given}) > 1:
        raise RuntimeError(f"{fn}(): weight, bias, running_mean and running_var must share one dtype, got "
                           + ", ".join(f"{n} {t.dtype}" for n, t in given))


def _check_residual(residual, x: torch.Tensor, fn: str) -> torch.Tensor | None:
    """The residual expanded to x's shape (broadcasting as `+` does, but never enlarging the output)."""
    if residual is None:
        return None
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"{fn}(): residual must be a Tensor or None, got {type(residual).__name__}")
    if residual.device != x.device:
        raise RuntimeError(f"{fn}(): residual is on {residual.device}, but input is on {x.device}")
    if residual.dtype != x.dtype:
        raise RuntimeError(f"{fn}(): residual must have the input's dtype {x.dtype}, got {residual.dtype}")
    try:
        full = torch.broadcast_shapes(tuple(residual.shape), tuple(x.shape))
    except RuntimeError as exc:
        raise RuntimeError(f"{fn}(): residual of shape {list(residual.shape)} cannot be added to the output of "
                           f"shape {list(x.shape)}: {exc}") from None
    if full != x.shape:
        raise RuntimeError(f"{fn}(): residual of shape {list(residual.shape)} would broadcast the output of shape "
                           f"{list(x.shape)} to {list(full)}")
    return residual if residual.shape == x.shape else residual.expand(x.shape)


def _unsupported(x: torch.Tensor) -> dict[str, str | None]:
    why = None
    if x.dtype not in _KERNEL_DTYPES:
        why = f"the kernels take float32, float16 or bfloat16 input, got {x.dtype}"
    return {"triton": why, "cuda": why}


def _verify_batch_size(x: torch.Tensor) -> None:
    """torch's check (F.batch_norm): N times the spatial sizes must not be 1 in training."""
    values = x.shape[0]
    for size in x.shape[2:]:
        values *= size
    if values == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")


def _run(x, running_mean, running_var, weight, bias, training, momentum, eps, act, residual,
         batch_mean=None, batch_var=None):
    """The checked arguments through the chosen backend's ops."""
    if x.numel() == 0:
        # Nothing to compute (torch leaves the running statistics alone); stock ops keep autograd.
        y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
        return _activation.apply(y if residual is None else y + residual, act)
    backend = _dispatch.choose(OP, x.device, _unsupported(x))
    if training and backend == "torch" and batch_mean is None and not _dispatch.kernel_formulation_forced():
        # The reference (CPU) path in training: stock batch-norm with its own autograd (it keeps its
        # batch statistics for the backward), then the residual and the activation in place as the
        # unfused layers do: the same passes as stock, none recomputed in the backward.
        _dispatch.record(OP, "torch")
        y = F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
        return _activation.apply_(y if residual is None else y.add_(residual), act)
    if training:
        mean, var = stats_ops[backend](x.detach(), running_mean, running_var,
                                       None if batch_mean is None else batch_mean.detach(),
                                       None if batch_var is None else batch_var.detach(), momentum)
    else:
        mean, var = running_mean, running_var
    return _library.call(ops, backend, x, mean, var, weight, bias, residual, eps, act, training)


def cpu_inference(x, running_mean, running_var, weight, bias, eps, activation):
    """The modules' CPU inference shortcut (nn/norm_act.py): eval batch-norm + activation as stock's
    own two ops (F.batch_norm, then the activation in place), which is what the reference backend
    computes, without the functional's per-call checks (F.batch_norm raises its own errors)."""
    _dispatch.record(OP, "torch")
    y = F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    return _activation.apply_(y, _activation.code(activation))


def batch_norm_act(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
                   momentum: float = 0.1, eps: float = 1e-5, activation: str | None = "relu",
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    """act(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps) + residual).

    input: (N, C, *) (2-D to 5-D as torch's batch-norm layers, or more); running_mean, running_var,
    weight, bias: [C] or None (running statistics may be None in training only); they share one
    dtype, the input's or float32 for float16/bfloat16 input. In training the running statistics
    are updated in place (momentum, unbiased variance). residual: input's shape (or broadcastable to
    it) and dtype, or None. activation: "relu", "relu6", "silu", "gelu", "sigmoid" or None.
    Returns a tensor of input's shape and dtype, channels_last when the input is. Differentiable in
    input, weight, bias and residual. The Triton and CUDA kernels take float32, float16 and bfloat16
    input; float64 runs the torch reference.
    """
    fn = "batch_norm_act"
    act = _activation.code(activation)
    if training and isinstance(input, torch.Tensor):
        _verify_batch_size(input)  # first, as F.batch_norm (a 0-d input: IndexError, as there)
    _check_input(input, fn)
    momentum = _number(momentum, "momentum", fn)
    eps = _number(eps, "eps", fn)
    if eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if not training:
        if running_mean is None:
            raise RuntimeError("running_mean must be defined in evaluation mode")
        if running_var is None:
            raise RuntimeError("running_var must be defined in evaluation mode")
    elif (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    named = (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias))
    for name, t in named:
        _check_vector(t, name, input, fn)
    _check_param_dtypes(input, named, fn)
    residual = _check_residual(residual, input, fn)
    return _run(input, running_mean, running_var, weight, bias, bool(training), momentum, eps, act, residual)


def batch_norm_act_train(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                         weight: torch.Tensor | None, bias: torch.Tensor | None, momentum: float, eps: float,
                         activation: str | None, residual: torch.Tensor | None,
                         batch_mean: torch.Tensor | None = None, batch_var: torch.Tensor | None = None) -> torch.Tensor:
    """batch_norm_act in training mode, for the fused convolution's training path.

    When batch_mean and batch_var ([C] float32: the mean and the biased variance of this input,
    computed by the convolution's epilogue) are given, no statistics pass runs: they normalize and
    update the running statistics (when given) directly. The backward is the full training formula
    either way (batch_mean and batch_var are treated as functions of input, not as leaves).
    Differentiable in input, weight, bias and residual.
    """
    fn = "batch_norm_act_train"
    act = _activation.code(activation)
    _check_input(input, fn)
    _verify_batch_size(input)
    momentum = _number(momentum, "momentum", fn)
    eps = _number(eps, "eps", fn)
    if eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if (batch_mean is None) != (batch_var is None):
        raise ValueError(f"{fn}(): batch_mean and batch_var must both be given or both be None")
    named = (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias))
    for name, t in named:
        _check_vector(t, name, input, fn)
    _check_param_dtypes(input, named, fn)
    for name, t in (("batch_mean", batch_mean), ("batch_var", batch_var)):
        _check_vector(t, name, input, fn)
        if t is not None and t.dtype != _stat_dtype(input):
            raise RuntimeError(f"{fn}(): {name} must be {_stat_dtype(input)}, got {t.dtype}")
    residual = _check_residual(residual, input, fn)
    return _run(input, running_mean, running_var, weight, bias, True, momentum, eps, act, residual,
                batch_mean, batch_var)
