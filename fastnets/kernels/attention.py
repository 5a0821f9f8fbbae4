"""Flash attention in Triton: the forward kernel, the dropout RNG, and their launchers.

The algorithm (FlashAttention-2): each program owns BLOCK_M query rows of one (batch, head) and
streams the keys and values through in tiles of BLOCK_N, keeping a running row maximum m, a running
normalizer l and an unnormalized output accumulator in registers (online softmax, in base 2:
exp(x) = exp2(x * log2 e)). The [L, S] score matrix never reaches memory. The row's log-sum-exp
(natural log) is stored for the backward pass (fastnets/kernels/attention_bwd.py), which recomputes
the probabilities from it.

Semantics (torch's scaled_dot_product_attention, math backend):
- scores s = q.k * scale, plus an additive float mask, or -inf where a boolean mask is False;
  is_causal keeps column j <= row i (the top-left aligned lower triangle, also when L != S);
- a row whose scores are all -inf (fully masked) gives 0 output and lse = +inf, so that the
  backward's recomputed probabilities exp(s - lse) are 0 there (torch gives 0 and zero gradients);
- NaN and +inf scores make the row NaN, as in torch;
- dropout (p > 0) zeroes probabilities after the softmax normalizer is formed and scales the
  kept ones by 1 / (1 - p). The keep decision of element (bh, i, j) is a pure function of
  (seed, bh, i, j): Philox4x32-10 (Salmon et al., SC 2011) keyed by the 64-bit seed, counter
  (j, i, bh, 0), first output word; kept iff (word >> 8) * 2^-24 >= p (in float32). The backward
  and the CUDA C++ kernels (csrc/attention.cu) and the torch reference
  (fastnets/ops/attention.py) compute the very same mask.
- grouped-query attention: query head h reads key/value head h // GROUP.

Head dims are padded to BLOCK_D = next power of two >= 16 with masked loads (any E <= 256).
Everything is computed in float32; the probabilities are cast to the value dtype for the P @ V
product (as FlashAttention does); fp32 inputs use tl.dot with _common.dot_precision.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastnets.kernels import _common

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# Philox4x32-10 and the dropout keep mask (shared with attention_bwd.py).

@triton.jit
def philox_keep(seed, bh, rows, cols, p_drop):
    """The dropout keep mask of a tile: True where element (bh, row, col) is kept.

    seed: int64 scalar (the Philox key); bh: int32 scalar, batch * heads + head;
    rows, cols: int32 tensors that broadcast to the tile ([BM, 1] and [1, BN], or transposed);
    p_drop: float32 scalar, the dropout probability.
    """
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = (rows * 0 + cols * 0).to(tl.uint32)
    c0 = cols.to(tl.uint32) + zero
    c1 = rows.to(tl.uint32) + zero
    c2 = zero + bh.to(tl.uint32)
    c3 = zero
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    u = (c0 >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24: uniform in [0, 1), exact
    return u >= p_drop


@triton.jit
def _dropout_mask_kernel(
    Rng,            # [1] int64: the Philox seed
    Keep,           # [BH, L, S] uint8 output, contiguous: 1 where kept
    L, S,           # query and key lengths
    bh0,            # first (batch * head) index of this launch
    p_drop,         # float32 dropout probability
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (cdiv(S, BLOCK_N), cdiv(L, BLOCK_M), min(BH - bh0, 65535)): a test hook; the launcher
    # splits BH into launches of at most 65535 (the grid's z limit)
    bh = bh0 + tl.program_id(2)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    keep = philox_keep(tl.load(Rng), bh, rows, cols, p_drop)
    offs = bh.to(tl.int64) * L * S + rows.to(tl.int64) * S + cols
    tl.store(Keep + offs, keep.to(tl.uint8), mask=(rows < L) & (cols < S))


# ----------------------------------------------------------------------------------------------
# Score tile: q.k * scale (+ mask), in base 2, with the masks of this tile applied.

@triton.jit
def score_tile(qk, rows, cols, mask_ptrs, mask_ok, S, qk_scale,
               IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, BOUNDS: tl.constexpr):
    """qk: [BM, BN] (or transposed) float32 dot products; rows, cols: int32 indices that broadcast
    to it; mask_ptrs: pointers to the attention-mask elements of the tile; mask_ok: in-range
    predicate for those loads. Returns the scores times log2(e), -inf where masked out.
    BOUNDS: apply the column bound (col < S) and, when IS_CAUSAL, col <= row."""
    s = qk * qk_scale
    if MASK_KIND == 2:
        s += tl.load(mask_ptrs, mask=mask_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    if MASK_KIND == 1:
        s = tl.where(tl.load(mask_ptrs, mask=mask_ok, other=1) != 0, s, float("-inf"))
    if BOUNDS:
        ok = cols < S
        if IS_CAUSAL:
            ok = ok & (cols <= rows)
        s = tl.where(ok, s, float("-inf"))
    return s


# ----------------------------------------------------------------------------------------------
# Forward.

@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, mask_base, seed, bh, offs_m, offs_d, offs_dv,
               n_lo, n_hi, L, S, E, EV,
               stride_ks, stride_kd, stride_vs, stride_vd, stride_ml, stride_ms,
               qk_scale, p_drop,
               IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
               BOUNDS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr, IDX64: tl.constexpr):
    """Streams key/value tiles [n_lo, n_hi) through the online softmax of one query block."""
    rows = offs_m[:, None]
    d_ok = offs_d[:, None] < E
    dv_ok = offs_dv[None, :] < EV
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if IDX64:
            offs_n = offs_n.to(tl.int64)
        cols = offs_n[None, :]
        # K^T tile [BLOCK_D, BLOCK_N] and V tile [BLOCK_N, BLOCK_DV]; only the tail tile needs
        # the sequence bound in its loads
        if BOUNDS:
            n_ok = offs_n < S
            k_ok = d_ok & n_ok[None, :]
            v_ok = n_ok[:, None] & dv_ok
        else:
            k_ok = d_ok
            v_ok = dv_ok
        kt = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd, mask=k_ok, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_dv[None, :] * stride_vd, mask=v_ok, other=0.0)
        qk = tl.dot(q, kt, input_precision=DOT_PREC)
        s = score_tile(qk, rows, cols, mask_base + rows * stride_ml + cols * stride_ms,
                       (rows < L) & (cols < S), S, qk_scale, IS_CAUSAL, MASK_KIND, BOUNDS)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked row so far
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(philox_keep(seed, bh, rows, cols, p_drop), p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


def _arch_major() -> int:
    if _common.INTERPRET or not torch.cuda.is_available():
        return 0
    return torch.cuda.get_device_capability()[0]


ARCH_MAJOR = _arch_major()  # read at import (scripts/aot_compile_all.py sets the architecture there)


def tuned_configs(table: dict[int, list[tuple[int, int, int, int]]], interpreter: triton.Config,
                  spills: dict[int, dict[int, set]] | None = None):
    """Autotuning candidates from a table {padded head dim: [(BLOCK_M, BLOCK_N, warps, stages)]}
    and the pruning function that keeps, at run time, only the padded head dim's own rows (large
    head dims need smaller tiles to stay in registers and shared memory; the rows were chosen from
    ptxas reports of Triton 3.9's sm_90 and sm_80 code for bf16/fp16 without mask or dropout).
    spills {arch major: {table key: rows}}: the rows that spill registers on that architecture (SASS
    audit, issue 12), pruned there unless nothing else would remain."""
    rows = sorted({r for v in table.values() for r in v})
    configs = _common.configs([triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                               for bm, bn, w, s in rows], interpreter)

    def prune(configs, named_args, **kwargs):
        if len(configs) == 1:
            return configs
        dims = [kwargs.get(n, named_args.get(n)) for n in ("BLOCK_D", "BLOCK_DV")]
        if None in dims:  # not called the way Triton calls it: keep every candidate
            return configs
        d = max(dims)
        key = min(k for k in table if k >= d) if d <= max(table) else max(table)
        wanted = set(table[key])
        kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]
        drop = (spills or {}).get(ARCH_MAJOR, {}).get(key, set())
        kept = [c for c in kept if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                not in drop] or kept
        q = named_args.get("Q", kwargs.get("Q"))
        if getattr(q, "dtype", None) == torch.float32:
            # fp32 tiles of 128 x 128 need 225 KB of shared memory (more than sm_80's 163 KB, the
            # compile reports in benchmarks/results/aot-compile-2026-11-23): smaller tiles only.
            kept = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] < 128 * 128] or kept
        return kept or configs[-1:]

    return configs, prune


# Rows that spill (cuobjdump: LDL/STL), fp16 head dim 64, compiled as the JIT specializes the audit's
# launches (synthetic 2x4x256x64 and ViT-B/16's 197 tokens), under Triton 3.6 (the GPU image's) or 3.9:
# sm_80 64x64/4 warps (3.9, ViT: one predicate register kept in local memory across the loops) and
# 128x64/4 warps (3.9: 6 LDL/6 STL); sm_90 128x64/4 warps (3.6: 4 LDL/4 STL). Other head dims: not
# measured yet.
FWD_SPILLS = {8: {64: {(64, 64, 4, 3), (128, 64, 4, 3)}}, 9: {64: {(128, 64, 4, 3)}}}
FWD_TABLE = {64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
             128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
             256: [(64, 32, 8, 2), (128, 32, 8, 2), (64, 32, 8, 3)]}
_FWD_CONFIGS, _fwd_prune = tuned_configs(
    FWD_TABLE, triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1), FWD_SPILLS)


@_common.autotune(configs=_FWD_CONFIGS, key=["seq_bucket", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "MASK_KIND", "DROPOUT"],
                  prune_configs_by={"early_config_prune": _fwd_prune})
@triton.jit
def _attn_fwd(
    Q,      # [B, H, L, E] query (any strides)
    K,      # [B, H // GROUP, S, E] key
    V,      # [B, H // GROUP, S, EV] value
    Mask,   # [B, H, L, S] attention mask, broadcast by strides (0 where broadcast); unused if MASK_KIND == 0
    Rng,    # [1] int64 Philox seed; unused without DROPOUT
    Out,    # [B, H, L, EV] output (any strides)
    Lse,    # [B * H, L] float32 log-sum-exp of each row's scores (natural log; +inf: fully masked)
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb, stride_mh, stride_ml, stride_ms,
    stride_ob, stride_oh, stride_ol, stride_od,
    H, L, S, E, EV,        # heads of the query, sequence lengths, head dims of query/key and value
    GROUP,                 # query heads per key/value head
    seq_bucket,            # next power of two of max(L, S): the autotuning key, not used inside
    qk_scale,              # float32: scale * log2(e)
    p_drop, drop_scale,    # float32: dropout probability and 1 / (1 - p) (0 when p == 1)
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr,
    IDX64: tl.constexpr,   # in-tile offsets (row * stride) in int64: some reach 2^31
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (cdiv(L, BLOCK_M) * B * H,): one query block of one (batch, head) per program, the
    # last (longest, under is_causal) blocks first.
    n_mblocks = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // n_mblocks
    mb = n_mblocks - 1 - pid % n_mblocks
    b = bh // H
    h = bh % H
    hk = h // GROUP
    m0 = mb * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    if IDX64:
        offs_m = offs_m.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    mask_base = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    m_ok = offs_m < L
    q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & (offs_d[None, :] < E), other=0.0)
    seed = 0
    if DROPOUT:
        seed = tl.load(Rng)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if IS_CAUSAL:
        n_hi = tl.minimum(S, m0 + BLOCK_M)
        n_full = tl.minimum((m0 + 1) // BLOCK_N, S // BLOCK_N) * BLOCK_N
    else:
        n_hi = S
        n_full = (S // BLOCK_N) * BLOCK_N
    # Tiles entirely inside the sequence and below the diagonal: no bounds or causal mask.
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, mask_base, seed, bh, offs_m, offs_d, offs_dv,
                               0, n_full, L, S, E, EV, stride_ks, stride_kd, stride_vs, stride_vd,
                               stride_ml, stride_ms, qk_scale, p_drop, IS_CAUSAL, MASK_KIND, DROPOUT,
                               False, BLOCK_N, BLOCK_D, BLOCK_DV, DOT_PREC, IDX64)
    # The tail of the sequence and the tiles on the diagonal.
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, mask_base, seed, bh, offs_m, offs_d, offs_dv,
                               n_full, n_hi, L, S, E, EV, stride_ks, stride_kd, stride_vs, stride_vd,
                               stride_ml, stride_ms, qk_scale, p_drop, IS_CAUSAL, MASK_KIND, DROPOUT,
                               True, BLOCK_N, BLOCK_D, BLOCK_DV, DOT_PREC, IDX64)

    empty = l_i == 0.0  # every score -inf (NaN rows have l = NaN and stay NaN)
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc * (drop_scale / l_safe)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(Lse + bh.to(tl.int64) * L + offs_m, lse, mask=m_ok)
    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ol + offs_dv[None, :] * stride_od, o.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & (offs_dv[None, :] < EV))


# ----------------------------------------------------------------------------------------------
# Launchers (arguments checked by fastnets/ops/attention.py).

def block_d(n: int) -> int:
    """The padded head dim: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, _common.next_pow2(n))


def mask_args(q: torch.Tensor, mask: torch.Tensor | None):
    """(tensor, kind, 4 strides) for a [B, H, L, S] mask view (stride 0 where broadcast)."""
    if mask is None:
        return q, MASK_NONE, (0, 0, 0, 0)
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), MASK_BOOL, mask.stride()
    return mask, MASK_ADD, mask.stride()


def needs_int64(*views) -> bool:
    """Whether a tile's in-tile offset, row * row stride + col * col stride, can reach 2^31 for one of
    the (tensor, rows, cols) views (the batch and head offsets are int64 always)."""
    for t, rows, cols in views:
        if t is not None and t.dim() == 4:
            if max(rows - 1, 0) * abs(t.stride(2)) + max(cols - 1, 0) * abs(t.stride(3)) >= 2**31 - 1024:
                return True
    return False


def drop_args(p: float) -> tuple[float, float]:
    """(p, 1 / (1 - p)) as the kernels use them; p == 1 drops everything (scale 0, as torch)."""
    return p, (0.0 if p >= 1.0 else 1.0 / (1.0 - p))


def forward(q, k, v, mask, rng, dropout_p: float, is_causal: bool, scale: float, out, lse) -> None:
    """q [B, H, L, E], k [B, Hkv, S, E], v [B, Hkv, S, EV]; writes out [B, H, L, EV] and lse [B, H, L]."""
    B, H, L, E = q.shape
    S, EV = k.shape[2], v.shape[3]
    m, kind, ms = mask_args(q, mask)
    p, drop_scale = drop_args(dropout_p)
    if B * H * L == 0:
        return
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]) * B * H,)  # noqa: E731
    torch.library.wrap_triton(_attn_fwd)[grid](
        q, k, v, m, rng if rng is not None else lse, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *ms, *out.stride(),
        H, L, S, E, EV, H // k.shape[1], _common.next_pow2(max(L, S)),
        scale * LOG2E, p, drop_scale,
        IS_CAUSAL=bool(is_causal), MASK_KIND=kind, DROPOUT=rng is not None,
        BLOCK_D=block_d(E), BLOCK_DV=block_d(EV), DOT_PREC=_common.dot_precision(q.dtype),
        IDX64=needs_int64((q, L, E), (k, S, E), (v, S, EV), (out, L, EV), (mask, L, S)))


GRID_Z_MAX = 65535  # CUDA's limit on grid z


def dropout_mask(rng: torch.Tensor, BH: int, L: int, S: int, dropout_p: float) -> torch.Tensor:
    """The keep mask [BH, L, S] (bool) that the kernels apply for this seed: the RNG alone."""
    keep = torch.empty(BH, L, S, dtype=torch.uint8, device=rng.device)
    if keep.numel():
        for bh0 in range(0, BH, GRID_Z_MAX):
            grid = (triton.cdiv(S, 32), triton.cdiv(L, 32), min(BH - bh0, GRID_Z_MAX))
            torch.library.wrap_triton(_dropout_mask_kernel)[grid](rng, keep, L, S, bh0, dropout_p,
                                                                  BLOCK_M=32, BLOCK_N=32)
    return keep.bool()

