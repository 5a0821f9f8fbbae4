"""The model family's layers at real batch sizes, for the ahead-of-time compile and the SASS audit.

Each case builds one model of fastnets.models (ResNet-50, VGG-16, EfficientNet-B0, ViT-B/16) and
runs its forward in eval mode (inference) at a batch size of 32 or 256, in fp16 or bf16 with
channels_last activations, or in fp32, with the Triton backend forced. In the capture process
(scripts/aot_compile_all.py) the Triton launches are recorded, not run, so every fastnets kernel
sees the launch values it would see on a GPU: the same shapes, strides, views and 16-byte
alignments, hence the same JIT specialization. The stock matrix products between fastnets ops
(nn.Linear layers, matmuls) are replaced by empty outputs of the right shape and layout (their
values never matter: no kernel runs), which keeps a batch-256 forward cheap on a CPU.

Tensors are allocated with torch.empty and never written by a kernel, so their pages are mostly
never touched; the elementwise stock ops between layers still run (on uninitialized values).
"""
from __future__ import annotations

import contextlib

MODELS = ("resnet50", "vgg16", "efficientnet_b0", "vit_b_16")


@contextlib.contextmanager
def _empty_matmuls():
    """F.linear, torch.matmul/bmm/addmm produce empty tensors of the right shape (no arithmetic)."""
    import torch
    import torch.nn.functional as F

    saved = (F.linear, torch.matmul, torch.bmm, torch.addmm)

    def linear(x, w, b=None):
        return x.new_empty(*x.shape[:-1], w.shape[0])

    def matmul(a, b, **kw):
        return torch.empty(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]),
                           dtype=a.dtype)

    def addmm(c, a, b, **kw):
        return a.new_empty(a.shape[0], b.shape[1])

    F.linear, torch.matmul, torch.bmm, torch.addmm = linear, matmul, matmul, addmm
    try:
        yield
    finally:
        F.linear, torch.matmul, torch.bmm, torch.addmm = saved


def _run(name: str, batch: int, dtype, channels_last: bool):
    import torch

    import fastnets

    model = getattr(fastnets.models, name)().eval().to(dtype)
    size = 224
    x = torch.empty(batch, 3, size, size, dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), _empty_matmuls():
        model(x)


def cases(models, batches, dtypes=("float16", "bfloat16", "float32")):
    """(name, function) pairs for scripts/aot_compile_all.py: each runs one model forward; 16-bit
    dtypes with channels_last activations, float32 in NCHW."""
    import torch

    out = []
    dtypes = [(getattr(torch, d), d != "float32") for d in dtypes]
    for name in models:
        if name not in MODELS:
            raise ValueError(f"models: unknown model {name!r}; expected some of {', '.join(MODELS)}")
        for batch in batches:
            for dtype, cl in dtypes:
                tag = f"model {name} b{batch} {str(dtype).replace('torch.', '')} {'nhwc' if cl else 'nchw'}"
                out.append((tag, lambda name=name, batch=batch, dtype=dtype, cl=cl: _run(name, batch, dtype, cl)))
    return out
