"""Bias + activation (`bias_act`) and `linear_act`: argument checks, the torch.library registration
of each backend (Triton, CUDA C++, torch reference), autograd, and the reference.

bias_act(input [..., F], bias [F], activation) = act(input + bias) in one pass, the Transformer
MLP's epilogue after a matmul without bias; its backward is one pass too (grad_input), with
grad_bias a deterministic two-level column reduction. The sum and the activation are computed in
float32 and rounded once to the input's dtype. Kernels: fastnets/kernels/bias_act.py (Triton),
csrc/bias_act.cu (CUDA C++); activations: fastnets/ops/_activation.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastnets import _dispatch, _ext, _library
from fastnets.ops import _activation as A

OP = "bias_act"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _prototype(x: torch.Tensor, bias: Optional[torch.Tensor], act: int) -> torch.Tensor:
    raise NotImplementedError


def _bwd_prototype(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], act: int,
                   need_db: bool) -> tuple[torch.Tensor, torch.Tensor]:
    raise NotImplementedError


def _fake(x, bias, act):
    return torch.empty(tuple(x.shape), dtype=x.dtype, device=x.device)


def _bwd_outputs(x, bias, need_db, empty=torch.empty):
    dx = empty(tuple(x.shape), dtype=x.dtype, device=x.device)
    db = empty((x.shape[1],) if need_db else (0,), dtype=(bias if need_db else x).dtype, device=x.device)
    return dx, db


def _bwd_fake(dy, x, bias, act, need_db):
    return _bwd_outputs(x, bias, need_db)


def _torch_fwd(x: torch.Tensor, bias: Optional[torch.Tensor], act: int) -> torch.Tensor:
    _dispatch.record(OP, "torch")
    ct = torch.promote_types(x.dtype, torch.float32)
    z = x.to(ct) + bias.to(ct) if bias is not None else x.to(ct, copy=True)  # a fresh tensor
    return A.apply_(z, act).to(x.dtype).contiguous()  # in place; no copy for float32 input


def _torch_bwd(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], act: int,
               need_db: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _dispatch.record(OP, "torch")
    ct = torch.promote_types(x.dtype, torch.float32)
    z = x.to(ct) + bias.to(ct) if bias is not None else x.to(ct)
    dz = A.grad(z, dy.to(ct), act)
    dx, db = _bwd_outputs(x, bias, need_db)
    dx.copy_(dz)
    if need_db:
        db.copy_(dz.sum(0))
    return dx, db


def _triton_fwd(x: torch.Tensor, bias: Optional[torch.Tensor], act: int) -> torch.Tensor:
    from fastnets.kernels import bias_act as kernels

    _dispatch.record(OP, "triton")
    y = _dispatch.empty(tuple(x.shape), dtype=x.dtype, device=x.device)
    kernels.bias_act_forward(x, bias, y, act)
    return y


def _triton_bwd(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], act: int,
                need_db: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from fastnets.kernels import bias_act as kernels

    _dispatch.record(OP, "triton")
    dx, db = _bwd_outputs(x, bias, need_db, empty=_dispatch.empty)
    kernels.bias_act_backward(dy, x, bias, dx, db if need_db else None, act)
    return dx, db


def _cuda_fwd(x: torch.Tensor, bias: Optional[torch.Tensor], act: int) -> torch.Tensor:
    _dispatch.record(OP, "cuda")
    y = _dispatch.empty(tuple(x.shape), dtype=x.dtype, device=x.device)
    M, F = x.shape
    with torch.cuda.device(x.device):
        _ext.module().bias_act_forward(
            _ext.ptr(x), _ext.ptr(bias), _ext.ptr(y), M, F, list(x.stride()), bias is not None, act,
            _ext.dtype_code(x), _ext.dtype_code(bias if bias is not None else x), _ext.stream(x))
    return y


def _cuda_bwd(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], act: int,
              need_db: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _dispatch.record(OP, "cuda")
    dx, db = _bwd_outputs(x, bias, need_db, empty=_dispatch.empty)
    M, F = x.shape
    with torch.cuda.device(x.device):
        _ext.module().bias_act_backward(
            _ext.ptr(dy), _ext.ptr(x), _ext.ptr(bias), _ext.ptr(dx), _ext.ptr(db) if need_db else 0, M, F,
            list(dy.stride()), list(x.stride()), bias is not None, act, _ext.dtype_code(x),
            _ext.dtype_code(bias if bias is not None else x), _ext.stream(x))
    return dx, db


ops = _library.register(OP, _prototype, fake=_fake,
                        impls={"triton": _triton_fwd, "cuda": _cuda_fwd, "torch": _torch_fwd})
backward_ops = _library.register(OP + "_backward", _bwd_prototype, fake=_bwd_fake,
                                 impls={"triton": _triton_bwd, "cuda": _cuda_bwd, "torch": _torch_bwd})


def _setup_context(ctx, inputs, output):
    x, bias, act = inputs
    ctx.save_for_backward(x, bias)
    ctx.act = act


def _backward(backend, ctx, dy):
    x, bias = ctx.saved_tensors
    need_db = bias is not None and ctx.needs_input_grad[1]
    dx, db = _library.call(backward_ops, backend, dy, x, bias, ctx.act, need_db)
    return dx, (db if need_db else None), None


_library.register_autograd(ops, setup_context=_setup_context, backward=_backward)


# ----------------------------------------------------------------------------------------------
# The public functions.

def bias_act(input: torch.Tensor, bias: torch.Tensor | None, activation: str | None = "gelu") -> torch.Tensor:
    """act(input + bias) in one pass: input [..., F]; bias [F] (input's dtype, or float32 for a
    float16/bfloat16 input) or None (the activation alone); activation one of "relu", "relu6",
    "silu", "gelu" (exact erf form, F.gelu's default), "sigmoid", None. The sum and the activation
    are computed in float32; the output has input's shape and dtype and is contiguous. Integer and
    bool inputs (the reference only) follow torch's rules for act(input + bias) exactly."""
    act = A.code(activation)
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"bias_act(): input must be a Tensor, got {type(input).__name__}")
    if input.dim() < 1:
        raise RuntimeError("bias_act(): input must have at least one dimension (the features)")
    F = input.shape[-1]
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias_act(): bias must be a Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (F,):
            raise RuntimeError(f"bias_act(): bias must have shape [{F}] (input's last dim), got {list(bias.shape)}")
        if bias.device != input.device:
            raise RuntimeError(f"bias_act(): bias is on {bias.device}, input on {input.device}")
        mixed_ok = input.dtype in (torch.float16, torch.bfloat16) and bias.dtype == torch.float32
        if bias.dtype != input.dtype and not mixed_ok:
            raise TypeError(f"bias_act(): bias has dtype {bias.dtype}; expected the input's ({input.dtype}), "
                            f"or float32 for a float16/bfloat16 input")
    if input.numel() == 0:
        z = input + bias.to(input.dtype) if bias is not None else input
        return A.apply(z, act).clone()

    def stock():  # the composite in stock ops: torch's semantics for any dtype (and its errors)
        return A.apply(input + bias if bias is not None else input, act)

    x2 = input.reshape(-1, F)
    why = None if input.dtype in _KERNEL_DTYPES else (
        f"the kernels take float32, float16 or bfloat16 input, got {input.dtype}")
    backend = _dispatch.choose(OP, input.device, {"triton": why, "cuda": why}, probe=stock)
    if backend == "torch" and not input.is_floating_point():
        # Integer and bool inputs: torch's own rules (relu keeps an integer dtype, sigmoid gives a
        # float, gelu and a bool relu raise), not a float32 computation rounded back to integers.
        _dispatch.record(OP, "torch")
        return stock()
    b = bias.contiguous() if bias is not None else None  # the kernels read [F] densely
    return _library.call(ops, backend, x2, b, act).view(input.shape)


def linear_act(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               activation: str | None = "gelu") -> torch.Tensor:
    """act(input @ weight.T + bias), F.linear's arguments (weight [F, K]) plus the activation.

    A documented composition, not one kernel: the matmul runs through torch.matmul (cuBLAS on a
    GPU, without bias), then bias + activation run in one fastnets kernel (bias_act), which saves
    the separate bias-add and activation passes of the stock F.linear + activation."""
    A.code(activation)  # an unknown activation fails before the matmul runs
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise RuntimeError("linear_act(): weight must be a 2-D tensor [out_features, in_features], got "
                           f"{list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if (isinstance(input, torch.Tensor) and input.is_floating_point()
            and (bias is None or (isinstance(bias, torch.Tensor) and bias.dtype == input.dtype))
            and _dispatch.choose(OP, input.device) == "torch"):
        # The reference path: stock F.linear (addmm: the bias rides along the matmul), then the
        # activation, in place on the fresh output (as nn.ReLU(inplace=True) after a Linear).
        _dispatch.record(OP, "torch")
        return A.apply_(torch.nn.functional.linear(input, weight, bias), A.code(activation))
    return bias_act(torch.matmul(input, weight.t()), bias, activation)
