"""Stage 2 of scripts/gpu_run.py: native correctness of every op family, both kernel backends.

One representative op per family (the one the models use most), forward and backward (input and
parameter gradients), fp16 / bf16 / fp32, channels_last and NCHW for the 4-D families (contiguous
and a strided view for the others), a small odd shape and one real shape, against a float64
reference under DESIGN's 2x rule (tests/parity.py: the error is at most 2x stock PyTorch's error in
the same dtype, plus a floor). `parity.ran_on(backend)` proves the named backend's kernels ran.

Each check is one item: `items(rehearse)` lists them in priority order (small shapes first, then
the real ones; Triton before CUDA C++ within a shape), `run_item(item)` runs one and raises
AssertionError on a mismatch. `precompile_call(item)` runs only the fastnets side (stage 1
compiles the Triton kernels it launches).
"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


@dataclasses.dataclass(frozen=True)
class Family:
    name: str          # op family (fastnets/ops/<name>.py)
    dims4: bool        # channels_last is a layout of it
    dot: bool          # built on tl.dot (bf16 is wrong in the interpreter)
    small: tuple
    real: tuple
    tiny: tuple = ()   # the rehearsal's shape (the interpreter is slow), when smaller than `small`


FAMILIES = [
    Family("conv", True, True, (3, 5, 9, 11), (32, 64, 56, 56), (2, 3, 5, 6)),          # N, C, H, W; 3x3 C->C+2, training
    Family("attention", False, True, (2, 3, 37, 64), (2, 16, 2048, 128), (1, 2, 17, 16)),  # B, H, L, D
    Family("norm_act", True, False, (3, 7, 5, 9), (64, 256, 56, 56)),
    Family("pool", True, False, (3, 5, 13, 11), (32, 64, 112, 112)),
    Family("lrn", True, False, (2, 7, 5, 9), (64, 96, 55, 55)),
    Family("layer_norm", False, False, (3, 7, 33), (16, 512, 768)),
    Family("bias_act", False, False, (5, 37), (8192, 3072)),
]
BY_NAME = {f.name: f for f in FAMILIES}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _rand(shape, dtype, device, layout, scale=1.0, grad=True):
    import parity

    return parity.rand(*shape, dtype=dtype, device=device, layout=layout, scale=scale, requires_grad=grad)


def make(fam: Family, shape: tuple, dtype, layout: str, device) -> tuple[dict, list[str]]:
    """The inputs (fresh random values) and the names of the tensors that get gradients."""
    r = lambda s, **k: _rand(s, dtype, device, layout if len(s) == len(shape) else "contiguous", **k)  # noqa: E731
    if fam.name == "conv":
        n, c, h, w = shape
        co = c + 2
        return {"x": r(shape), "w": _rand((co, c, 3, 3), dtype, device, layout, scale=(2.0 / (9 * c)) ** 0.5),
                "rm": r((co,), scale=0.1, grad=False), "rv": (torch.rand(co, device=device) + 0.5).to(dtype),
                "bw": (r((co,), scale=0.2, grad=False) + 1).requires_grad_(), "bb": r((co,), scale=0.1)}, \
            ["x", "w", "bw", "bb"]
    if fam.name == "attention":
        return {k: r(shape) for k in ("q", "k", "v")}, ["q", "k", "v"]
    if fam.name == "norm_act":
        c = shape[1]
        return {"x": r(shape), "rm": r((c,), scale=0.1, grad=False),
                "rv": (torch.rand(c, device=device) + 0.5).to(dtype),
                "bw": (r((c,), scale=0.2, grad=False) + 1).requires_grad_(), "bb": r((c,), scale=0.1)}, \
            ["x", "bw", "bb"]
    if fam.name in ("pool", "lrn"):
        return {"x": r(shape)}, ["x"]
    if fam.name == "layer_norm":
        d = shape[-1]
        return {"x": r(shape), "w": (r((d,), scale=0.2, grad=False) + 1).requires_grad_(), "b": r((d,), scale=0.1)}, \
            ["x", "w", "b"]
    if fam.name == "bias_act":
        return {"x": r(shape), "b": r((shape[-1],), scale=0.5)}, ["x", "b"]
    raise ValueError(fam.name)


def stock(fam: Family, i: dict):
    if fam.name == "conv":
        y = F.conv2d(i["x"], i["w"], None, padding=1)
        return F.relu(F.batch_norm(y, i["rm"], i["rv"], i["bw"], i["bb"], True, 0.1, 1e-5))
    if fam.name == "attention":
        return F.scaled_dot_product_attention(i["q"], i["k"], i["v"])
    if fam.name == "norm_act":
        return F.relu(F.batch_norm(i["x"], i["rm"], i["rv"], i["bw"], i["bb"], True, 0.1, 1e-5))
    if fam.name == "pool":
        return F.max_pool2d(i["x"], 3, 2, 1)
    if fam.name == "lrn":
        return F.local_response_norm(i["x"], 5, 1e-4, 0.75, 2.0)
    if fam.name == "layer_norm":
        return F.layer_norm(i["x"], i["x"].shape[-1:], i["w"], i["b"])
    if fam.name == "bias_act":
        return F.gelu(i["x"] + i["b"])
    raise ValueError(fam.name)


def fast(fam: Family, i: dict):
    import fastnets.functional as FF

    if fam.name == "conv":
        return FF.conv_bn_act(i["x"], i["w"], None, i["rm"], i["rv"], i["bw"], i["bb"], padding=1, training=True,
                              momentum=0.1, eps=1e-5, activation="relu")
    if fam.name == "attention":
        return FF.scaled_dot_product_attention(i["q"], i["k"], i["v"])
    if fam.name == "norm_act":
        return FF.batch_norm_act(i["x"], i["rm"], i["rv"], i["bw"], i["bb"], training=True, momentum=0.1, eps=1e-5,
                                 activation="relu")
    if fam.name == "pool":
        return FF.max_pool2d(i["x"], 3, 2, 1)
    if fam.name == "lrn":
        return FF.local_response_norm(i["x"], 5, 1e-4, 0.75, 2.0)
    if fam.name == "layer_norm":
        return FF.layer_norm(i["x"], i["x"].shape[-1:], i["w"], i["b"])
    if fam.name == "bias_act":
        return FF.bias_act(i["x"], i["b"], "gelu")
    raise ValueError(fam.name)


def _clone(i: dict, dtype=None) -> dict:
    """Copies with the same sizes and strides (a strided view stays strided), optionally upcast."""
    out = {}
    for k, v in i.items():
        t = torch.empty_strided(v.shape, v.stride(), dtype=dtype or v.dtype, device=v.device)
        t.copy_(v.detach())
        out[k] = t.requires_grad_(v.requires_grad)
    return out


def _fwd_bwd(fn, inp: dict, names: list[str], gout=None):
    out = fn(inp)
    if gout is None:
        gout = torch.randn_like(out, dtype=torch.float32).to(out.dtype)
    grads = torch.autograd.grad(out, [inp[n] for n in names], gout.to(out.dtype))
    return out, grads, gout


def items(rehearse: bool, backends: list[str]) -> list[dict]:
    """Every check in priority order, each {"family", "shape", "dtype", "layout", "backend"} (+ "skip": reason)."""
    out = []
    for size in ("small", "real"):
        for backend in ("triton", "cuda"):
            for fam in FAMILIES:
                for dname in ("fp16", "bf16", "fp32"):
                    for layout in (("contiguous", "channels_last") if fam.dims4 else ("contiguous", "noncontiguous")):
                        it = {"family": fam.name, "size": size, "shape": list((fam.tiny or fam.small) if (rehearse and size == "small") else getattr(fam, size)), "dtype": dname,
                              "layout": "nchw" if (fam.dims4 and layout == "contiguous") else layout,
                              "_layout": layout, "backend": backend}
                        it["name"] = f"{fam.name} {backend} {dname} {it['layout']} {size}{tuple(it['shape'])}"
                        if backend not in backends:
                            it["skip"] = f"backend {backend} does not run here"
                        elif rehearse and size == "real":
                            it["skip"] = "rehearsal: real shapes only on a GPU"
                        elif rehearse and dname != "fp32":
                            it["skip"] = ("rehearsal: fp32 only (bf16 tl.dot is wrong in the interpreter; fp16 is "
                                          "covered by the CPU tests)")
                        out.append(it)
    return out


def run_item(it: dict, device) -> dict:
    """Runs one check; returns {"detail", "ops": the dispatch keys the op used (the keys of
    fastnets/_measured.py)}; raises AssertionError on a mismatch."""
    import parity
    from fastnets.bench.ops import _dispatch_keys

    fam, dtype = BY_NAME[it["family"]], DTYPES[it["dtype"]]
    inp, names = make(fam, tuple(it["shape"]), dtype, it["_layout"], device)
    with parity.ran_on(it["backend"]), _dispatch_keys() as keys:
        out, grads, gout = _fwd_bwd(lambda i: fast(fam, i), _clone(inp), names)
    s_out, s_grads, _ = _fwd_bwd(lambda i: stock(fam, i), _clone(inp), names, gout)
    r_out, r_grads, _ = _fwd_bwd(lambda i: stock(fam, i), _clone(inp, torch.float64), names, gout.double())
    parity.assert_parity(out, r_out, s_out, "output")
    for n, g, sg, rg in zip(names, grads, s_grads, r_grads):
        parity.assert_parity(g, rg, sg, f"grad {n}")
    return {"detail": "ok: output and every gradient within 2x stock's error", "ops": sorted(set(keys))}


def precompile_call(it: dict, device) -> None:
    """The fastnets side of a check, once (results unused): launches every kernel the check does."""
    from fastnets import use_backend

    fam, dtype = BY_NAME[it["family"]], DTYPES[it["dtype"]]
    inp, names = make(fam, tuple(it["shape"]), dtype, it["_layout"], device)
    with use_backend(it["backend"]):
        _fwd_bwd(lambda i: fast(fam, i), inp, names)
