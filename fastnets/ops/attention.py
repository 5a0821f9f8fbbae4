"""Scaled dot-product attention: `scaled_dot_product_attention` with torch's semantics, on flash
attention kernels (Triton: fastnets/kernels/attention.py and attention_bwd.py; CUDA C++:
csrc/attention.cu), with a torch reference (the CPU path and the tests' oracle).

Semantics: those of torch.nn.functional.scaled_dot_product_attention's math composite (torch 2.13
documents it in the function's docstring):
- inputs (N, ..., Hq, L, E), (N, ..., H, S, E), (N, ..., H, S, Ev); the leading dimensions
  broadcast; E may differ from Ev; rank >= 2;
- attn_mask: bool (True = takes part) or additive float (float32 or the query's dtype),
  broadcastable to (N, ..., Hq, L, S); read by strides, a broadcast costs nothing;
- is_causal: keeps column j <= row i (torch.ones(L, S).tril(), top-left aligned when L != S);
  together with attn_mask it raises, as torch's math backend does;
- a fully masked row (all scores -inf) gives 0 output and zero gradients: what torch 2.13's
  math composite (a "safe" softmax) and its fused flash kernel give (checked in the tests against
  the math backend), not the NaN of a plain softmax; NaN and +inf scores give NaN, as in torch;
- dropout_p > 0 applies dropout to the attention probabilities whenever it is given (as torch:
  pass 0.0 in eval). Its mask is keyed by a seed drawn from torch's default generator of the
  query's device, so torch.manual_seed makes it reproducible. The kernels (Triton and CUDA) draw it
  from a counter-based Philox4x32-10 RNG, the same mask in both; the reference draws it from a
  torch.Generator seeded with the same seed (a Philox in torch ops costs ~200 elementwise passes,
  which made the CPU path of a Transformer step 10x slower than stock). None of them is torch's
  own mask (torch's fused kernels' RNG cannot be reproduced). `dropout_mask()` returns a
  backend's mask, `philox_keep_mask()` the kernels' Philox mask computed with torch ops (the
  tests' oracle of the kernels' RNG);
- enable_gqa: Hq a multiple of the key's and the value's heads; query head h reads head
  h // (Hq / Hkv), inside the kernels (no copy). Key and value with different head counts (torch's
  CPU path allows it) are first repeated to the query's heads (a copy). Without enable_gqa
  mismatched heads must broadcast, as in torch;
- the gradient of a float attn_mask that requires grad is computed (the dS matrix, summed over the
  broadcast dimensions); it costs an extra [N, Hq, L, S] float32 buffer, only then.
Head dims up to 256 run on the kernels (padded to a power of two); float64 runs on the reference.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from fastnets import _dispatch, _ext, _library

OP = "scaled_dot_product_attention"
MAX_HEAD_DIM = 256
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Dropout RNG: the seed, the reference's mask, and Philox4x32-10 in torch ops (the oracle of the
# kernels' RNG).

def draw_seed(device: torch.device) -> torch.Tensor:
    """A fresh Philox seed, [1] int64 on `device`, from torch's default generator of that device
    (torch.manual_seed makes it reproducible; CUDA graphs replay it as torch's own RNG ops)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


_M32 = 0xFFFFFFFF


def _mulhilo(c: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of c * m for c int64 tensors in [0, 2^32) and a 32-bit constant m,
    exactly, with no int64 overflow (m split into 16-bit halves)."""
    a = c * (m & 0xFFFF)
    b = c * (m >> 16)
    return (b + (a >> 16)) >> 16, (((b & 0xFFFF) << 16) + a) & _M32


def _philox_keep(seed: int, BH: int, L: int, S: int, p: float, device) -> torch.Tensor:
    """Keep mask [BH, L, S] (bool): Philox4x32-10 of counter (col, row, bh, 0) and key (seed low,
    seed high); kept iff (first word >> 8) * 2^-24 >= p in float32, as in the kernels."""
    i64 = dict(dtype=torch.int64, device=device)
    c0 = torch.arange(S, **i64).view(1, 1, S).expand(BH, L, S)
    c1 = torch.arange(L, **i64).view(1, L, 1).expand(BH, L, S)
    c2 = torch.arange(BH, **i64).view(BH, 1, 1).expand(BH, L, S)
    c3 = torch.zeros((), **i64).expand(BH, L, S)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, 0xD2511F53)
        hi1, lo1 = _mulhilo(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    u = (c0 >> 8).to(torch.float32) * 2.0**-24
    return u >= torch.tensor(p, dtype=torch.float32, device=device)


def _reference_keep(seed: int, BH: int, L: int, S: int, p: float, device) -> torch.Tensor:
    """The reference's keep mask [BH, L, S] (bool): uniforms from a torch.Generator of `device`
    seeded with `seed`, kept iff >= p (float32). The backward regenerates it from the seed."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    u = torch.rand((BH, L, S), generator=gen, dtype=torch.float32, device=device)
    return u >= torch.tensor(p, dtype=torch.float32, device=device)


def philox_keep_mask(rng: torch.Tensor, batch: int, heads: int, L: int, S: int, dropout_p: float) -> torch.Tensor:
    """Test oracle: the keep mask [batch, heads, L, S] that the Triton and CUDA kernels draw for
    the seed `rng`, computed with torch ops (Philox4x32-10, slow)."""
    keep = _philox_keep(int(rng.item()), batch * heads, L, S, _as_f32(dropout_p), rng.device)
    return keep.view(batch, heads, L, S)


def dropout_mask(rng: torch.Tensor, batch: int, heads: int, L: int, S: int, dropout_p: float,
                 backend: str = "torch") -> torch.Tensor:
    """Debug/test hook: the dropout keep mask [batch, heads, L, S] (bool, True = kept) that
    `backend` applies for the seed `rng` (from `draw_seed`), computed by its RNG alone: "torch"
    (the reference's generator), "triton" or "cuda" (Philox, the same mask in both)."""
    p = _as_f32(dropout_p)
    BH = batch * heads
    if backend == "torch":
        keep = _reference_keep(int(rng.item()), BH, L, S, p, rng.device)
    elif backend == "triton":
        from fastnets.kernels import attention as K

        keep = K.dropout_mask(rng, BH, L, S, p)
    elif backend == "cuda":
        keep = torch.empty(BH, L, S, dtype=torch.bool, device=rng.device)
        if keep.numel():
            with torch.cuda.device(rng.device):
                _ext.module().attention_dropout_mask(_ext.ptr(rng), _ext.ptr(keep), BH, L, S, p, _ext.stream(rng))
    else:
        raise ValueError(f"backend must be 'torch', 'triton' or 'cuda', got {backend!r}")
    _dispatch.record("attention_rng", backend)
    return keep.view(batch, heads, L, S)


def _as_f32(x: float) -> float:
    """x rounded to float32, the precision the kernels compare in."""
    return torch.tensor(float(x), dtype=torch.float32).item()


# ----------------------------------------------------------------------------------------------
# The torch reference (stock ops): the CPU path and the tests' oracle. Without dropout, on the CPU,
# it is torch's own fused CPU attention (what F.scaled_dot_product_attention runs there: never
# slower than stock); otherwise the math below, in float32 for half inputs (as torch's math
# backend), in float64 for float64.

def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lse_dtype(dtype):
    """The log-sum-exp's dtype: float32 (float64 for float64 inputs, which only the reference takes)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _drop_scale(dropout_p: float) -> float:
    return 0.0 if dropout_p >= 1 else 1.0 / (1.0 - dropout_p)


def _ref_probs(q, k, mask, rng, dropout_p, is_causal, scale, lse=None):
    """(P, keep mask or None, lse): P = softmax of the masked scores, 0 on fully masked rows."""
    ct = _compute_dtype(q.dtype)
    B, H, L, _ = q.shape
    S = k.shape[2]
    k = k.to(ct).repeat_interleave(H // k.shape[1], 1)
    s = torch.matmul(q.to(ct), k.transpose(-2, -1)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(ct)
    if is_causal:
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, -1)
        lse = torch.where(lse == float("-inf"), float("inf"), lse)  # fully masked: P = 0
    p = torch.exp(s - lse.to(ct).unsqueeze(-1))
    keep = None
    if rng is not None:
        keep = _reference_keep(int(rng.item()), B * H, L, S, _as_f32(dropout_p), q.device).view(B, H, L, S)
    return p, keep, lse


def _out_like(q: torch.Tensor, ev: int, dtype=None) -> torch.Tensor:
    """The output [B, H, L, Ev], laid out as [B, L, H, Ev] (so that merging the heads back into
    the embedding, as attention layers do next, is a free view)."""
    B, H, L, _ = q.shape
    return _dispatch.empty(B, L, H, ev, dtype=dtype or q.dtype, device=q.device).transpose(1, 2)


def _stock_mask(mask, q):
    """The mask as torch's CPU flash attention takes it (None, or additive in the query's dtype with
    its broadcast dimensions kept at size 1), or False when it cannot take it."""
    if mask is None:
        return None
    compact = mask.as_strided([n if st else 1 for n, st in zip(mask.shape, mask.stride())], mask.stride())
    if mask.dtype == torch.bool:
        return torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~compact, float("-inf")) \
            if compact.numel() else compact.to(q.dtype)
    return compact if mask.dtype == q.dtype else False


def _stock_sdpa(q, k, v, mask, rng):
    """The mask to give torch's own fused CPU attention (aten::_scaled_dot_product_flash_attention_for_cpu,
    what F.scaled_dot_product_attention runs on a CPU), or False where the reference must compute it
    itself: dropout (the reference's own generator mask), the kernels' formulation forced
    (_dispatch.kernel_formulation), head dims that differ, grouped heads,
    a float mask in another dtype than the query's, a last dimension that is not dense (torch's
    kernel needs a unit stride there: stock SDPA takes its math path too), tensors not on the CPU."""
    if rng is not None or q.device.type != "cpu" or _dispatch.kernel_formulation_forced() \
            or q.shape[-1] != v.shape[-1] or k.shape[1] != q.shape[1] or 0 in q.shape \
            or 0 in k.shape or any(t.stride(-1) != 1 for t in (q, k, v)):
        return False
    m = _stock_mask(mask, q)
    return False if (m is not None and m is not False and m.shape[-1] > 1 and m.stride(-1) != 1) else m


def _fwd_torch(q, k, v, mask, rng, dropout_p, is_causal, scale):
    _dispatch.record("attention_fwd", "torch")
    stock_mask = _stock_sdpa(q, k, v, mask, rng)
    if stock_mask is not False:
        # torch's own CPU kernel: lse [B, H, L] float32 (float64 for float64) with 0 on fully masked
        # rows, whose output is 0 (the math's is too); out is laid out as the query is ([B, L, H, E]
        # for attention layers' projections, as _out_like), else copied into that layout.
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=stock_mask, scale=scale)
        if out.transpose(1, 2).is_contiguous():  # its output follows the query's layout
            return out, lse.to(_lse_dtype(q.dtype)).contiguous()
        return _out_like(q, v.shape[3]).copy_(out), lse.to(_lse_dtype(q.dtype)).contiguous()
    ct = _compute_dtype(q.dtype)
    p, keep, lse = _ref_probs(q, k, mask, rng, dropout_p, is_causal, scale)
    pd = p if keep is None else torch.where(keep, p * _drop_scale(dropout_p), 0.0)
    o = torch.matmul(pd, v.to(ct).repeat_interleave(q.shape[1] // v.shape[1], 1))
    out = _out_like(q, v.shape[3])
    out.copy_(o)
    return out, lse.to(_lse_dtype(q.dtype)).contiguous()


def _group_sum(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, H, ...] per query head -> [B, heads, ...] summed over each group of query heads."""
    B, H = t.shape[:2]
    return t.view(B, heads, H // heads, *t.shape[2:]).sum(2)


def _bwd_torch(grad_out, q, k, v, out, lse, mask, rng, dropout_p, is_causal, scale, mask_grad):
    _dispatch.record("attention_bwd", "torch")
    stock_mask = False if mask_grad else _stock_sdpa(q, k, v, mask, rng)
    if stock_mask is not False:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, is_causal, attn_mask=stock_mask, scale=scale)
        return dq, dk, dv, q.new_empty(0)
    ct = _compute_dtype(q.dtype)
    H = q.shape[1]
    p, keep, _ = _ref_probs(q, k, mask, rng, dropout_p, is_causal, scale, lse=lse)
    pd = p if keep is None else torch.where(keep, p * _drop_scale(dropout_p), 0.0)
    g = grad_out.to(ct)
    kr = k.to(ct).repeat_interleave(H // k.shape[1], 1)
    vr = v.to(ct).repeat_interleave(H // v.shape[1], 1)
    dv = _group_sum(torch.matmul(pd.transpose(-2, -1), g), v.shape[1])
    dp = torch.matmul(g, vr.transpose(-2, -1))
    if keep is not None:
        dp = torch.where(keep, dp * _drop_scale(dropout_p), 0.0)
    delta = (g * out.to(ct)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, kr) * scale
    dk = _group_sum(torch.matmul(ds.transpose(-2, -1), q.to(ct)) * scale, k.shape[1])
    dmask = ds.to(mask.dtype) if mask_grad else q.new_empty(0)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask


# ----------------------------------------------------------------------------------------------
# Triton and CUDA C++ implementations.

# torch.library.triton_op infers its schema from the implementation itself: annotated in full.
def _fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                rng: Optional[torch.Tensor], dropout_p: float, is_causal: bool,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from fastnets.kernels import attention as K

    _dispatch.record("attention_fwd", "triton")
    out = _out_like(q, v.shape[3])
    lse = _dispatch.empty(*q.shape[:3], dtype=torch.float32, device=q.device)
    if out.numel() or lse.numel():
        K.forward(q, k, v, mask, rng, dropout_p, is_causal, scale, out, lse)
    return out, lse


def _bwd_triton(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor, mask: Optional[torch.Tensor], rng: Optional[torch.Tensor], dropout_p: float,
                is_causal: bool, scale: float,
                mask_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastnets.kernels import attention_bwd as KB

    _dispatch.record("attention_bwd", "triton")
    dq, dk, dv = (_dispatch.empty(*t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    ds = torch.zeros(*q.shape[:3], k.shape[2], dtype=torch.float32, device=q.device) if mask_grad else None
    KB.backward(grad_out, q, k, v, out, lse, mask, rng, dropout_p, is_causal, scale, dq, dk, dv, ds)
    return dq, dk, dv, (ds.to(mask.dtype) if mask_grad else q.new_empty(0))


def _mask_kind(mask, q) -> int:
    """Mask codes of csrc/attention.h: 0 none, 1 bool, 2 additive float32, 3 additive in q's dtype."""
    if mask is None:
        return 0
    if mask.dtype == torch.bool:
        return 1
    return 2 if mask.dtype == torch.float32 else 3


def _cuda_common(q, k, v, mask, rng, dropout_p, is_causal, scale):
    from fastnets.kernels.attention import drop_args  # noqa: PLC0415 - pure Python helper

    p, drop_scale = drop_args(_as_f32(dropout_p))
    B, H, L, E = q.shape
    sizes = [B, H, L, k.shape[2], E, v.shape[3], H // k.shape[1]]
    mstrides = list(mask.stride()) if mask is not None else [0, 0, 0, 0]
    return dict(sizes=sizes, q=_ext.ptr(q), k=_ext.ptr(k), v=_ext.ptr(v), mask=_ext.ptr(mask),
                mask_kind=_mask_kind(mask, q), rng=_ext.ptr(rng), q_strides=list(q.stride()),
                k_strides=list(k.stride()), v_strides=list(v.stride()), mask_strides=mstrides,
                scale=float(scale), p_drop=p, drop_scale=drop_scale, is_causal=bool(is_causal),
                dtype=_ext.dtype_code(q), stream=_ext.stream(q))


def _fwd_cuda(q, k, v, mask, rng, dropout_p, is_causal, scale):
    _dispatch.record("attention_fwd", "cuda")
    out = _out_like(q, v.shape[3])
    lse = _dispatch.empty(*q.shape[:3], dtype=torch.float32, device=q.device)
    if out.numel() or lse.numel():
        with torch.cuda.device(q.device):
            c = _cuda_common(q, k, v, mask, rng, dropout_p, is_causal, scale)
            _ext.module().attention_fwd(c["sizes"], c["q"], c["k"], c["v"], c["mask"], c["mask_kind"], c["rng"],
                                        _ext.ptr(out), _ext.ptr(lse), c["q_strides"], c["k_strides"],
                                        c["v_strides"], c["mask_strides"], list(out.stride()), c["scale"],
                                        c["p_drop"], c["drop_scale"], c["is_causal"], c["dtype"], c["stream"])
    return out, lse


def _bwd_cuda(grad_out, q, k, v, out, lse, mask, rng, dropout_p, is_causal, scale, mask_grad):
    _dispatch.record("attention_bwd", "cuda")
    dq, dk, dv = (_dispatch.empty(*t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    ds = torch.zeros(*q.shape[:3], k.shape[2], dtype=torch.float32, device=q.device) if mask_grad else None
    delta = torch.empty(*q.shape[:3], dtype=torch.float32, device=q.device)
    with torch.cuda.device(q.device):
        c = _cuda_common(q, k, v, mask, rng, dropout_p, is_causal, scale)
        _ext.module().attention_bwd(c["sizes"], c["q"], c["k"], c["v"], c["mask"], c["mask_kind"], c["rng"],
                                    _ext.ptr(out), _ext.ptr(grad_out), _ext.ptr(lse), _ext.ptr(delta),
                                    _ext.ptr(dq), _ext.ptr(dk), _ext.ptr(dv), _ext.ptr(ds),
                                    c["q_strides"], c["k_strides"], c["v_strides"], c["mask_strides"],
                                    list(out.stride()), list(grad_out.stride()), list(dq.stride()),
                                    list(dk.stride()), list(dv.stride()), c["scale"], c["p_drop"],
                                    c["drop_scale"], c["is_causal"], c["dtype"], c["stream"])
    return dq, dk, dv, (ds.to(mask.dtype) if mask_grad else q.new_empty(0))


# ----------------------------------------------------------------------------------------------
# Registration: fastnets::attention_fwd_<backend>, fastnets::attention_bwd_<backend>.

def _fwd_proto(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
               rng: Optional[torch.Tensor], dropout_p: float, is_causal: bool,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, L, E], k [B, Hkv, S, E], v [B, Hkv, S, Ev] (H a multiple of Hkv), mask [B, H, L, S]
    (bool or float, broadcast by strides) or None, rng [1] int64 seed or None (no dropout).
    Returns out [B, H, L, Ev] (laid out as [B, L, H, Ev]) and lse [B, H, L] float32 (float64 for
    float64 inputs)."""
    raise NotImplementedError


def _fwd_fake(q, k, v, mask, rng, dropout_p, is_causal, scale):
    B, H, L, _ = q.shape
    return q.new_empty(B, L, H, v.shape[3]).transpose(1, 2), q.new_empty(B, H, L, dtype=_lse_dtype(q.dtype))


def _bwd_proto(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
               lse: torch.Tensor, mask: Optional[torch.Tensor], rng: Optional[torch.Tensor], dropout_p: float,
               is_causal: bool, scale: float,
               mask_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dq, dk, dv (shapes of q, k, v) and the mask's gradient [B, H, L, S] when mask_grad
    (else an empty tensor)."""
    raise NotImplementedError


def _bwd_fake(grad_out, q, k, v, out, lse, mask, rng, dropout_p, is_causal, scale, mask_grad):
    dmask = q.new_empty(*q.shape[:3], k.shape[2], dtype=mask.dtype) if mask_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


fwd_ops = _library.register("attention_fwd", _fwd_proto, fake=_fwd_fake,
                            impls={"triton": _fwd_triton, "cuda": _fwd_cuda, "torch": _fwd_torch})
bwd_ops = _library.register("attention_bwd", _bwd_proto, fake=_bwd_fake,
                            impls={"triton": _bwd_triton, "cuda": _bwd_cuda, "torch": _bwd_torch})


def _setup_context(ctx, inputs, output):
    q, k, v, mask, rng, dropout_p, is_causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, rng, out, lse)
    ctx.args = (dropout_p, is_causal, scale)
    ctx.mark_non_differentiable(lse)


def _backward(backend, ctx, grad_out, _grad_lse):
    q, k, v, mask, rng, out, lse = ctx.saved_tensors
    mask_grad = bool(ctx.needs_input_grad[3])
    dq, dk, dv, dmask = _library.call(bwd_ops, backend, grad_out, q, k, v, out, lse, mask, rng, *ctx.args,
                                         mask_grad)
    return dq, dk, dv, (dmask if mask_grad else None), None, None, None, None


_library.register_autograd(fwd_ops, setup_context=_setup_context, backward=_backward)


# ----------------------------------------------------------------------------------------------
# The public function.

def _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"scaled_dot_product_attention(): argument '{name}' must be Tensor, not {type(t).__name__}")
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"scaled_dot_product_attention(): argument 'attn_mask' must be Tensor, "
                        f"not {type(attn_mask).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"scaled_dot_product_attention(): argument 'dropout_p' must be float, "
                        f"not {type(dropout_p).__name__}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scaled_dot_product_attention(): argument 'scale' must be float, not {type(scale).__name__}")
    if min(query.dim(), key.dim(), value.dim()) < 2:
        raise RuntimeError("scaled_dot_product_attention: expected query, key and value to be at least 2 "
                           f"dimensional, got query.dim() {query.dim()}, key.dim() {key.dim()}, "
                           f"value.dim() {value.dim()}")
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError("scaled_dot_product_attention: expected query, key and value to have the same "
                           f"dtype, got {query.dtype}, {key.dtype} and {value.dtype}")
    if query.is_complex():  # torch's math path fails in its softmax: NotImplementedError
        raise NotImplementedError(f"scaled_dot_product_attention: not implemented for {query.dtype} inputs")
    if not query.is_floating_point():
        raise RuntimeError(f"scaled_dot_product_attention: query, key and value must be floating point, got "
                           f"{query.dtype}")
    if not (query.device == key.device == value.device):
        raise RuntimeError("scaled_dot_product_attention: expected query, key and value on the same device, got "
                           f"{query.device}, {key.device} and {value.device}")
    if query.size(-1) != key.size(-1):
        raise RuntimeError(f"scaled_dot_product_attention: query's head dim ({query.size(-1)}) must equal key's "
                           f"({key.size(-1)})")
    if key.size(-2) != value.size(-2):
        raise RuntimeError(f"scaled_dot_product_attention: key and value must have the same sequence length, got "
                           f"{key.size(-2)} and {value.size(-2)}")
    if not 0.0 <= dropout_p <= 1.0:
        raise RuntimeError(f"scaled_dot_product_attention: dropout_p must be in [0, 1], got {dropout_p}")
    if attn_mask is not None:
        if is_causal:
            raise RuntimeError("_scaled_dot_product_attention: Explicit attn_mask should not be set when "
                               "is_causal=True")
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise RuntimeError("scaled_dot_product_attention: attn_mask must be bool, float32 or the query's dtype "
                               f"({query.dtype}), got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise RuntimeError(f"scaled_dot_product_attention: attn_mask is on {attn_mask.device}, the query on "
                               f"{query.device}")
    if enable_gqa:
        if min(query.dim(), key.dim(), value.dim()) < 3:  # torch indexes the head dim -3
            raise IndexError("scaled_dot_product_attention: enable_gqa needs a heads dimension (-3) in query, "
                             "key and value")
        hq, hk, hv = query.size(-3), key.size(-3), value.size(-3)
        if hk == 0 or hv == 0 or hq % hk or hq % hv:
            raise RuntimeError("scaled_dot_product_attention: number of heads in key and value must divide the "
                               f"number of heads in query (enable_gqa), got {hq}, {hk} and {hv}")


def _to4(t: torch.Tensor, heads: bool) -> torch.Tensor:
    """(..., X, Y) -> (B, H, X, Y), merging or adding leading dimensions. A 3-D tensor's leading
    dimension is the heads when `heads` (GQA), else the batch (so that the output, laid out as
    (B, L, H, Ev), is contiguous when H = 1)."""
    if t.dim() == 2:
        return t.unsqueeze(0).unsqueeze(0)
    if t.dim() == 3:
        return t.unsqueeze(0) if heads else t.unsqueeze(1)
    return t if t.dim() == 4 else t.flatten(0, -4)


def _canonical(query, key, value, attn_mask, enable_gqa):
    """Broadcast views [B, H, L, E], [B, Hkv, S, E], [B, Hkv, S, Ev], mask [B, H, L, S], and the
    output's shape."""
    L, S = query.size(-2), key.size(-2)
    if enable_gqa:
        lead = torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3])
        hq, hk, hv = query.size(-3), key.size(-3), value.size(-3)
        q = query.expand(*lead, *query.shape[-3:])
        k = key.expand(*lead, *key.shape[-3:])
        v = value.expand(*lead, *value.shape[-3:])
        if hk != hv:  # the kernels share one group size: repeat both to the query's heads (a copy)
            k, v = k.repeat_interleave(hq // hk, -3), v.repeat_interleave(hq // hv, -3)
        batch = (*lead, hq)
    else:
        batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
        q = query.expand(*batch, *query.shape[-2:])
        k = key.expand(*batch, *key.shape[-2:])
        v = value.expand(*batch, *value.shape[-2:])
    mask = None
    if attn_mask is not None:
        mask = _to4(attn_mask.expand(*batch, L, S), enable_gqa)
    return _to4(q, enable_gqa), _to4(k, enable_gqa), _to4(v, enable_gqa), mask, (*batch, L, value.size(-1))


def _unsupported(q: torch.Tensor, v: torch.Tensor) -> dict[str, Optional[str]]:
    why = None
    if q.dtype not in _KERNEL_DTYPES:
        why = f"{q.dtype} inputs (the kernels take float32, float16 and bfloat16)"
    elif max(q.size(-1), v.size(-1)) > MAX_HEAD_DIM:
        why = f"head dims {q.size(-1)}/{v.size(-1)} (the kernels take up to {MAX_HEAD_DIM})"
    return {"triton": why, "cuda": why}


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention on flash-attention kernels (same arguments,
    defaults and semantics; see the module docstring). Fully masked rows give 0 (and zero
    gradients), as torch's math composite does. Dropout is seeded from torch's generator and
    reproducible under torch.manual_seed, with a mask of its own (fastnets.ops.attention.dropout_mask).
    The gradient of a float attn_mask that requires grad is computed. A 4-D (or longer) output is
    laid out as (..., L, Hq, Ev) in memory (a transposed view), ready for the heads to be merged;
    2-D and 3-D outputs are contiguous."""
    _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    q, k, v, mask, out_shape = _canonical(query, key, value, attn_mask, enable_gqa)
    E = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(E) if E > 0 else 1.0  # E == 0: every score is 0 whatever the scale
    p = float(dropout_p)
    rng = draw_seed(q.device) if p > 0 else None
    backend = _dispatch.choose(OP, q.device, _unsupported(q, v))
    out, _ = _library.call(fwd_ops, backend, q, k, v, mask, rng, p, bool(is_causal), float(scale))
    return out.reshape(out_shape)
