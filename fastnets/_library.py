"""torch.library registration shared by every op family.

An op family registers each of its kernels once per backend, under one schema:
    fastnets::<name>_triton   torch.library.triton_op (torch.compile sees the Triton kernels)
    fastnets::<name>_cuda     torch.library.custom_op over the fastnets._C launcher
    fastnets::<name>_torch    torch.library.custom_op over the torch reference
with one fake (meta) implementation and, where the op is differentiable, one autograd formula
whose backward calls the same backend's backward op. torch.compile(fullgraph=True) and CUDA graphs
run through them without graph breaks; torch.library.opcheck tests each registration.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Iterable

import torch

NAMESPACE = "fastnets"


def register(name: str, prototype: Callable, *, fake: Callable, impls: dict[str, Callable],
             mutates_args: Iterable[str] = ()) -> dict[str, object]:
    """Registers fastnets::<name>_<backend> for each backend in `impls`.

    prototype: a function whose annotated signature gives the schema (its body is never run).
    fake: the meta implementation (output shapes, dtypes and strides from input metadata).
    impls: backend name ("triton", "cuda", "torch") -> implementation with the prototype's signature.
    Returns backend -> the registered op (a CustomOpDef, callable like a function).
    """
    mutates_args = tuple(mutates_args)
    schema = torch.library.infer_schema(prototype, mutates_args=mutates_args)
    ops = {}
    for backend, impl in impls.items():
        qualname = f"{NAMESPACE}::{name}_{backend}"
        if backend == "triton":
            # triton_op infers its schema from the implementation itself (it ignores `schema`):
            # give the implementation the prototype's signature.
            op = torch.library.triton_op(qualname, _with_signature(impl, prototype), mutates_args=mutates_args)
        else:
            op = torch.library.custom_op(qualname, impl, mutates_args=mutates_args, schema=schema)
        op.register_fake(fake)
        ops[backend] = op
        _REFERENCE[op] = impl
    return ops


# The torch reference of each registered op (fastnets::<name>_torch -> its Python implementation).
_REFERENCE: dict[object, Callable] = {}
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def call(ops: dict[str, object], backend: str, *args):
    """ops[backend](*args). The torch reference (the CPU path) runs its implementation directly,
    without the custom-op layer (about 50-100 us of Python per call on a CPU, more than stock's own
    overhead for small layers), where nothing can tell the difference: no autograd to record (grad
    off, or no input that requires it), no torch.compile tracing, no dispatch mode (fake tensors,
    functionalization, make_fx), no functorch transform, no autocast, plain tensors only. Anywhere
    else, and for the kernel backends, the registered op runs."""
    op = ops[backend]
    if backend == "torch" and _direct(args):
        return _REFERENCE[op](*args)
    return op(*args)


def _direct(args) -> bool:
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._are_functorch_transforms_active() or torch._C._is_any_autocast_enabled()):
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN or (grad and a.requires_grad)):
            return False
    return True


def _with_signature(impl: Callable, prototype: Callable) -> Callable:
    """impl, seen by inspect with prototype's signature (names, annotations, defaults)."""
    @functools.wraps(impl)
    def typed(*args, **kwargs):
        return impl(*args, **kwargs)

    sig = inspect.signature(prototype, eval_str=True)  # string annotations, resolved in prototype's module
    typed.__signature__ = sig
    typed.__annotations__ = {n: p.annotation for n, p in sig.parameters.items()}
    typed.__annotations__["return"] = sig.return_annotation
    return typed


def register_autograd(ops: dict[str, object], *, setup_context: Callable, backward: Callable) -> None:
    """Gives every backend's op the same autograd formula.

    backward(backend, ctx, *grad_outputs) receives the backend name first, so that it calls that
    backend's backward op; setup_context(ctx, inputs, output) as in torch.library.register_autograd.
    """
    for backend, op in ops.items():
        op.register_autograd(functools.partial(backward, backend), setup_context=setup_context)
