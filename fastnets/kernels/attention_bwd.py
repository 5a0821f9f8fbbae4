"""Flash attention backward in Triton (FlashAttention-2's structure, deterministic: no atomics).

Three kernels, with P = exp(S - lse) recomputed from the forward's log-sum-exp:
1. _bwd_delta: delta_i = sum_d dO[i, d] * O[i, d] (= sum_j P_ij dP_ij, dropout included).
2. _attn_bwd_dkdv: one program per key/value block of BLOCK_N rows and key/value head; it walks
   over every query head of its group (grouped-query attention sums there, in registers) and
   every query block that can see it (under is_causal, only the blocks at and below the
   diagonal), accumulating dV += P^T dO and dK += dS^T Q * scale, where
   dS = P * (dP - delta) and dP = dO V^T (times the dropout keep mask and 1 / (1 - p)).
3. _attn_bwd_dq: one program per query block and head, a separate pass over the key blocks:
   dQ += dS K * scale. Optionally it writes dS itself, which is the gradient of an additive
   attention mask (its broadcast dimensions are summed by the caller).
The separate dQ pass recomputes Q K^T once more instead of accumulating dQ with atomics: the
result is bitwise reproducible run to run.
Masks, causal alignment, fully masked rows (lse = +inf gives P = 0, so zero gradients), dropout
and head-dim padding are as in the forward (fastnets/kernels/attention.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastnets.kernels import _common
from fastnets.kernels.attention import (LOG2E, block_d, drop_args, mask_args, needs_int64, philox_keep, score_tile,
                                        tuned_configs)


@triton.jit
def _bwd_delta(
    Out,     # [B, H, L, EV] forward output
    dOut,    # [B, H, L, EV] gradient of the output (any strides, possibly 0 where broadcast)
    LD,      # [B * H, L, 2] float32: writes LD[..., 1] = rowsum(dO * O) (LD[..., 0] holds lse)
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_gb, stride_gh, stride_gl, stride_gd,
    H, L, EV,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, IDX64: tl.constexpr,
):
    # grid: (cdiv(L, BLOCK_M) * B * H,)
    n_mblocks = tl.cdiv(L, BLOCK_M)
    bh = tl.program_id(0) // n_mblocks
    offs_m = (tl.program_id(0) % n_mblocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    if IDX64:
        offs_m = offs_m.to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    ok = (offs_m[:, None] < L) & (offs_dv[None, :] < EV)
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_dv[None, :] * stride_od,
                mask=ok, other=0.0).to(tl.float32)
    g = tl.load(dOut + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gl + offs_dv[None, :] * stride_gd,
                mask=ok, other=0.0).to(tl.float32)
    tl.store(LD + (bh.to(tl.int64) * L + offs_m) * 2 + 1, tl.sum(o * g, 1), mask=offs_m < L)


# ----------------------------------------------------------------------------------------------
# dK, dV

@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, mask_base, ld_base, seed, bh,
                offs_n, offs_d, offs_dv, m_lo, m_hi, L, S, E, EV,
                stride_ql, stride_qd, stride_gl, stride_gd, stride_ml, stride_ms,
                qk_scale, p_drop, drop_scale,
                IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
                CAUSAL_MASK: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr, IDX64: tl.constexpr):
    """Accumulates one key/value block's dK and dV over the query blocks [m_lo, m_hi) of one head.
    Works on transposed tiles [BLOCK_N, BLOCK_M] (keys down, queries across)."""
    cols = offs_n[:, None]
    d_ok = offs_d[None, :] < E
    dv_ok = offs_dv[None, :] < EV
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        if IDX64:
            offs_m = offs_m.to(tl.int64)
        rows = offs_m[None, :]
        m_ok = offs_m < L
        q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                    mask=m_ok[:, None] & d_ok, other=0.0)                       # [BM, BD]
        do = tl.load(do_base + offs_m[:, None] * stride_gl + offs_dv[None, :] * stride_gd,
                     mask=m_ok[:, None] & dv_ok, other=0.0)                     # [BM, BDV]
        # The rows' (lse, delta) pairs as one contiguous run of 2 * BLOCK_M floats (vector
        # loads: as two row vectors Triton 3.6 copies them 8 bytes at a time, as much per thread as of
        # the q and dO tiles at head dim 64). Rows past L get lse = +inf: their probabilities are 0.
        offs_p = 2 * m0 + tl.arange(0, 2 * BLOCK_M)
        ld = tl.load(ld_base + offs_p, mask=offs_p < 2 * L, other=0.0)
        lse, delta = tl.split(tl.reshape(ld, [BLOCK_M, 2]))
        lse = tl.where(m_ok, lse * 1.4426950408889634, float("inf"))
        qkt = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)                 # [BN, BM]
        st = score_tile(qkt, rows, cols, mask_base + rows * stride_ml + cols * stride_ms,
                        (rows < L) & (cols < S), S, qk_scale, IS_CAUSAL, MASK_KIND, CAUSAL_MASK)
        pt = tl.math.exp2(st - lse[None, :])
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)                # [BN, BM]
        if DROPOUT:
            keep = philox_keep(seed, bh, rows, cols, p_drop)
            dv += tl.dot(tl.where(keep, pt * drop_scale, 0.0).to(do.dtype), do, input_precision=DOT_PREC)
            dpt = tl.where(keep, dpt * drop_scale, 0.0)
        else:
            dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


# Rows are (BLOCK_M, BLOCK_N, warps, stages); BLOCK_N is the key/value block each program owns.
# Spilling rows (as attention.FWD_SPILLS; fp16, head dim 64): sm_80 64x64/4 warps and 64x128/8 warps
# (Triton 3.6 and 3.9: 1-5 LDL/STL at 255 registers).
DKDV_SPILLS = {8: {64: {(64, 64, 4, 3), (64, 128, 8, 2)}}}
DKDV_TABLE = {64: [(64, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3), (32, 128, 8, 3)],
              128: [(16, 64, 4, 2), (16, 128, 8, 2), (32, 64, 8, 2), (32, 128, 8, 1), (64, 64, 8, 2)],
              256: [(16, 32, 4, 2), (32, 32, 8, 2)]}
_DKDV_CONFIGS, _dkdv_prune = tuned_configs(
    DKDV_TABLE, triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1), DKDV_SPILLS)


@_common.autotune(configs=_DKDV_CONFIGS, key=["seq_bucket", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "MASK_KIND", "DROPOUT"],
                  prune_configs_by={"early_config_prune": _dkdv_prune})
@triton.jit
def _attn_bwd_dkdv(
    Q,       # [B, H, L, E] query
    K,       # [B, H // GROUP, S, E] key
    V,       # [B, H // GROUP, S, EV] value
    Mask,    # [B, H, L, S] attention mask by strides (unused if MASK_KIND == 0)
    Rng,     # [1] int64 Philox seed (unused without DROPOUT)
    dOut,    # [B, H, L, EV] gradient of the output
    LD,      # [B * H, L, 2] float32 (lse, rowsum(dO * O)) per row, interleaved (see backward)
    dK,      # [B, H // GROUP, S, E] output
    dV,      # [B, H // GROUP, S, EV] output
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb, stride_mh, stride_ml, stride_ms,
    stride_gb, stride_gh, stride_gl, stride_gd,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    H, L, S, E, EV, GROUP, seq_bucket,
    qk_scale, sm_scale,    # float32: scale * log2(e), and scale
    p_drop, drop_scale,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr,
    IDX64: tl.constexpr,   # in-tile offsets in int64: some reach 2^31
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (cdiv(S, BLOCK_N) * B * (H // GROUP),)
    n_nblocks = tl.cdiv(S, BLOCK_N)
    pid = tl.program_id(0)
    HKV = H // GROUP
    bhk = pid // n_nblocks
    n0 = (pid % n_nblocks) * BLOCK_N
    b = bhk // HKV
    hk = bhk % HKV
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if IDX64:
        offs_n = offs_n.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n[:, None] < S
    k = tl.load(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
                + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=n_ok & (offs_d[None, :] < E), other=0.0)                  # [BN, BD]
    v = tl.load(V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
                + offs_n[:, None] * stride_vs + offs_dv[None, :] * stride_vd,
                mask=n_ok & (offs_dv[None, :] < EV), other=0.0)                # [BN, BDV]
    seed = 0
    if DROPOUT:
        seed = tl.load(Rng)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = dOut + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
        mask_base = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
        ld_base = LD + bh.to(tl.int64) * L * 2
        # Under is_causal only query rows i >= n0 see this block (and every block is masked:
        # one loop keeps the register pressure of one copy of the body; ptxas-checked).
        m_lo = (n0 // BLOCK_M) * BLOCK_M if IS_CAUSAL else 0
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, mask_base, ld_base, seed, bh,
                             offs_n, offs_d, offs_dv, m_lo, L, L, S, E, EV,
                             stride_ql, stride_qd, stride_gl, stride_gd, stride_ml, stride_ms,
                             qk_scale, p_drop, drop_scale, IS_CAUSAL, MASK_KIND, DROPOUT, IS_CAUSAL,
                             BLOCK_M, DOT_PREC, IDX64)
    dk = dk * sm_scale
    tl.store(dK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh
             + offs_n[:, None] * stride_dks + offs_d[None, :] * stride_dkd,
             dk.to(dK.dtype.element_ty), mask=n_ok & (offs_d[None, :] < E))
    tl.store(dV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh
             + offs_n[:, None] * stride_dvs + offs_dv[None, :] * stride_dvd,
             dv.to(dV.dtype.element_ty), mask=n_ok & (offs_dv[None, :] < EV))


# ----------------------------------------------------------------------------------------------
# dQ (and dS, the additive mask's gradient)

@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, mask_base, ds_base, seed, bh,
              offs_m, offs_d, offs_dv, n_lo, n_hi, L, S, E, EV,
              stride_ks, stride_kd, stride_vs, stride_vd, stride_ml, stride_ms,
              qk_scale, p_drop, drop_scale,
              IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
              STORE_DS: tl.constexpr, BOUNDS: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
              IDX64: tl.constexpr):
    """Accumulates one query block's dQ over the key blocks [n_lo, n_hi)."""
    rows = offs_m[:, None]
    d_ok = offs_d[None, :] < E
    dv_ok = offs_dv[:, None] < EV
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if IDX64:
            offs_n = offs_n.to(tl.int64)
        cols = offs_n[None, :]
        n_ok = cols < S
        if BOUNDS:  # only the tail tile needs the sequence bound in its loads
            k_ok = (offs_n[:, None] < S) & d_ok
            v_ok = dv_ok & n_ok
        else:
            k_ok = d_ok
            v_ok = dv_ok
        # K as [BN, BD] (its rows as stored), used transposed first: the order in which Triton's
        # pipeliner keeps both uses in shared memory (loaded as [BD, BN] and transposed for dQ, the
        # sm_80 load went through registers, not by async copy; the audit's loop async share 0.5)
        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=k_ok, other=0.0)  # [BN, BD]
        vt = tl.load(v_base + cols * stride_vs + offs_dv[:, None] * stride_vd, mask=v_ok, other=0.0)  # [BDV, BN]
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        s = score_tile(qk, rows, cols, mask_base + rows * stride_ml + cols * stride_ms,
                       (rows < L) & n_ok, S, qk_scale, IS_CAUSAL, MASK_KIND, BOUNDS)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, vt, input_precision=DOT_PREC)
        if DROPOUT:
            dp = tl.where(philox_keep(seed, bh, rows, cols, p_drop), dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if STORE_DS:
            tl.store(ds_base + rows.to(tl.int64) * S + cols, ds, mask=(rows < L) & n_ok)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


# Spilling rows (as attention.FWD_SPILLS; fp16, head dim 64): sm_80 128x32/4 warps (Triton 3.6, 2 LDL/2 STL).
DQ_SPILLS = {8: {64: {(128, 32, 4, 3)}}}
DQ_TABLE = {64: [(128, 32, 4, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)],
            128: [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 8, 2), (64, 32, 4, 3)],
            256: [(32, 32, 8, 2), (32, 64, 8, 2), (16, 32, 4, 2)]}
_DQ_CONFIGS, _dq_prune = tuned_configs(
    DQ_TABLE, triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1), DQ_SPILLS)


@_common.autotune(configs=_DQ_CONFIGS,
                  key=["seq_bucket", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "MASK_KIND", "DROPOUT", "STORE_DS"],
                  prune_configs_by={"early_config_prune": _dq_prune})
@triton.jit
def _attn_bwd_dq(
    Q,       # [B, H, L, E] query
    K,       # [B, H // GROUP, S, E] key
    V,       # [B, H // GROUP, S, EV] value
    Mask,    # [B, H, L, S] attention mask by strides (unused if MASK_KIND == 0)
    Rng,     # [1] int64 Philox seed (unused without DROPOUT)
    dOut,    # [B, H, L, EV] gradient of the output
    LD,      # [B * H, L, 2] float32 (lse, rowsum(dO * O)) per row, interleaved (see backward)
    dQ,      # [B, H, L, E] output
    dS,      # [B * H, L, S] float32 output, contiguous, zero-filled: the scores' gradient (if STORE_DS)
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb, stride_mh, stride_ml, stride_ms,
    stride_gb, stride_gh, stride_gl, stride_gd,
    stride_dqb, stride_dqh, stride_dql, stride_dqd,
    H, L, S, E, EV, GROUP, seq_bucket,
    qk_scale, sm_scale, p_drop, drop_scale,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, STORE_DS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr,
    IDX64: tl.constexpr,   # in-tile offsets in int64: some reach 2^31
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (cdiv(L, BLOCK_M) * B * H,), the longest causal blocks first
    n_mblocks = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // n_mblocks
    m0 = (n_mblocks - 1 - pid % n_mblocks) * BLOCK_M
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    if IDX64:
        offs_m = offs_m.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < L
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & (offs_d[None, :] < E), other=0.0)         # [BM, BD]
    do = tl.load(dOut + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
                 + offs_m[:, None] * stride_gl + offs_dv[None, :] * stride_gd,
                 mask=m_ok[:, None] & (offs_dv[None, :] < EV), other=0.0)      # [BM, BDV]
    lse = tl.load(LD + (bh.to(tl.int64) * L + offs_m) * 2, mask=m_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(LD + (bh.to(tl.int64) * L + offs_m) * 2 + 1, mask=m_ok, other=0.0)
    seed = 0
    if DROPOUT:
        seed = tl.load(Rng)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    mask_base = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    ds_base = dS + bh.to(tl.int64) * L * S
    if IS_CAUSAL:
        n_hi = tl.minimum(S, m0 + BLOCK_M)
        n_full = tl.minimum((m0 + 1) // BLOCK_N, S // BLOCK_N) * BLOCK_N
    else:
        n_hi = S
        n_full = (S // BLOCK_N) * BLOCK_N
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, mask_base, ds_base, seed, bh, offs_m, offs_d, offs_dv,
                   0, n_full, L, S, E, EV, stride_ks, stride_kd, stride_vs, stride_vd, stride_ml, stride_ms,
                   qk_scale, p_drop, drop_scale, IS_CAUSAL, MASK_KIND, DROPOUT, STORE_DS, False, BLOCK_N, DOT_PREC,
                   IDX64)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, mask_base, ds_base, seed, bh, offs_m, offs_d, offs_dv,
                   n_full, n_hi, L, S, E, EV, stride_ks, stride_kd, stride_vs, stride_vd, stride_ml, stride_ms,
                   qk_scale, p_drop, drop_scale, IS_CAUSAL, MASK_KIND, DROPOUT, STORE_DS, True, BLOCK_N, DOT_PREC,
                   IDX64)
    dq = dq * sm_scale
    tl.store(dQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + offs_m[:, None] * stride_dql + offs_d[None, :] * stride_dqd,
             dq.to(dQ.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < E))


# ----------------------------------------------------------------------------------------------

def backward(grad_out, q, k, v, out, lse, mask, rng, dropout_p: float, is_causal: bool, scale: float,
             dq, dk, dv, ds=None) -> None:
    """Writes dq [B, H, L, E], dk [B, Hkv, S, E], dv [B, Hkv, S, EV] and, when given, ds [B, H, L, S]
    (float32, contiguous, zero-filled). Shapes as in fastnets.kernels.attention.forward."""
    B, H, L, E = q.shape
    Hkv, S, EV = k.shape[1], k.shape[2], v.shape[3]
    m, kind, ms = mask_args(q, mask)
    p, drop_scale = drop_args(dropout_p)
    BD, BDV = block_d(E), block_d(EV)
    prec = _common.dot_precision(q.dtype)
    idx64 = needs_int64((q, L, E), (k, S, E), (v, S, EV), (out, L, EV), (grad_out, L, EV), (mask, L, S),
                        (dq, L, E), (dk, S, E), (dv, S, EV))
    # Per row (lse, delta) interleaved, so that the dK/dV loop loads a query block's pairs as one
    # contiguous run by 128-bit async copies (as two row vectors, Triton 3.6 copies them 8 bytes at a
    # time, as many bytes per thread as of the q and dO tiles at head dim 64: SASS audit, issue 12).
    ld = torch.empty(B * H, L, 2, dtype=torch.float32, device=q.device)
    if ld.numel():
        ld[:, :, 0].copy_(lse.reshape(B * H, L))
        torch.library.wrap_triton(_bwd_delta)[(triton.cdiv(L, 32) * B * H,)](
            out, grad_out, ld, *out.stride(), *grad_out.stride(), H, L, EV, BLOCK_M=32, BLOCK_DV=BDV, IDX64=idx64)
    rng_arg = rng if rng is not None else lse
    common = (H, L, S, E, EV, H // Hkv, _common.next_pow2(max(L, S)), scale * LOG2E, scale, p, drop_scale)
    flags = dict(IS_CAUSAL=bool(is_causal), MASK_KIND=kind, DROPOUT=rng is not None,
                 BLOCK_D=BD, BLOCK_DV=BDV, DOT_PREC=prec, IDX64=idx64)
    if S > 0 and B * Hkv > 0:
        torch.library.wrap_triton(_attn_bwd_dkdv)[lambda meta: (triton.cdiv(S, meta["BLOCK_N"]) * B * Hkv,)](
            q, k, v, m, rng_arg, grad_out, ld, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *ms, *grad_out.stride(), *dk.stride(), *dv.stride(),
            *common, **flags)
    if L > 0 and B * H > 0:
        torch.library.wrap_triton(_attn_bwd_dq)[lambda meta: (triton.cdiv(L, meta["BLOCK_M"]) * B * H,)](
            q, k, v, m, rng_arg, grad_out, ld, dq, ds if ds is not None else ld,
            *q.stride(), *k.stride(), *v.stride(), *ms, *grad_out.stride(), *dq.stride(),
            *common, STORE_DS=ds is not None, **flags)
