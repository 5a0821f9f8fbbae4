"""Triton kernels of the fused convolution family (fastnets/ops/conv.py calls the launchers).

- `_conv_gemm_kernel`: implicit GEMM convolution, M = N*OH*OW output pixels by N_gemm = C_out/groups
  output channels (one group per grid column), K = KH*KW*C_in/groups. fp16/bf16 operands go to the
  tensor cores through tl.dot with float32 accumulation; fp32 operands use TF32 only when torch
  allows it for convolutions (`_common.dot_precision(dtype, conv=True)`). The epilogue adds the
  bias, then either (inference) the residual and the activation, or (training) writes the conv
  output and the per-(row tile, channel) mean and M2 of this tile for the batch statistics.
- `_stats_finalize_kernel`: merges the per-tile (count, mean, M2) with Chan's parallel formula
  (numerically stable, deterministic order) into the per-channel mean and biased variance.
- `_act_grad_kernel`: dz = act'(z) * dy for the backward of the convolution without batch-norm.

The depthwise convolution has its own direct kernel in kernels/conv_depthwise.py.

Every kernel reads the strides of its tensors (any layout: NCHW, channels_last, strided views);
channels_last (NHWC) input and a channels_last (OHWI) weight are the fast path, because the
reduction dimension (input channels) is then contiguous for both tl.dot operands. Offsets that
can pass 2^31 (the batch index times its stride) are computed in int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastnets.kernels import _common
from fastnets.kernels._activation import act_bwd, act_fwd

# Rows (output pixels) per tile of the training (statistics) launches: fixed, so that the host
# knows how many partial-statistics rows to allocate whatever configuration the autotuner picks.
STATS_BLOCK_M = 32 if _common.INTERPRET else 128


def _sm90() -> bool:
    return (not _common.INTERPRET) and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). Both architectures: 128x128 and 128x64 tiles for the
# wide layers, 64-wide for the C_out=64 layers and small batches, BLOCK_K 32 (fp32/TF32) or 64
# (fp16/bf16), stages within sm_80's 164 KB of shared memory. sm_90 (228 KB, wgmma over 8 warps)
# adds the larger tiles. Candidates chosen by resource budget, not yet measured: the autotuner
# times them on the first call of each layer shape and caches the winner by the key below.
_BOTH = ((128, 128, 32, 4, 4), (128, 128, 64, 8, 3), (128, 64, 32, 4, 4), (128, 64, 64, 4, 3),
         (64, 128, 32, 4, 4), (64, 64, 32, 4, 4), (64, 64, 64, 4, 3), (128, 32, 32, 4, 4))
_SM90 = ((128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4))


# Candidates that spill registers to local memory (LDL/STL in the SASS), per architecture and
# reduction path, from compiles specialized as the JIT does at run time on the audit's launches
# (synthetic 3x3 over 64 channels with and without a residual, ResNet-50 and EfficientNet-B0 layers
# at batch 32; fp16) under Triton 3.6 (the GPU image's) and 3.9 (issue 12): a candidate that spills
# under either is pruned. Paths (_path): "flat" the flattened reduction (stems: 7x7/2 and 3x3/2 over
# 3 channels; 3x3 over 16), "nhwc" the tap path with 16-byte channel vectors (VEC > 1), "res" what
# "nhwc" adds when a residual is fused (its tile is live in the epilogue with the accumulator),
# "strided" the tap path without channel vectors: NCHW input (its per-element gather addresses hold
# every tile but 64x64x32 over 255 registers) or channels not a multiple of 8 (EfficientNet's 1x1
# squeeze-excite conv over 4 channels: up to 616 B of stack on the large tiles). Measured spills:
# sm_90 nhwc 128x128x32 (residual 136-152 B, SiLU 8-144 B), res 128x256x64 and 256x128x64 (48-240 B),
# flat (3.6) 128x64x32 (128 B) and 64x64x64 (104-112 B); sm_80 nhwc 128x128x32 (residual 8-56 B) and
# 128x64x64 (3.6: 32-40 B), flat: see _FLAT_SM80. Spilling candidates are pruned before the autotuner compiles
# and times them: a short GPU window spends its minutes on real candidates. Every remaining candidate
# fits one CTA per SM (<= 255 registers x 256 threads; shared memory: rule (3) below).
_ALL = frozenset(_BOTH + _SM90)
_SPILLS = {
    8: {"flat": set(),  # per Triton version: _FLAT_SM80 below
        "nhwc": {(128, 128, 32, 4, 4), (128, 64, 64, 4, 3)}, "res": set(),
        "strided": set(_ALL - {(64, 64, 32, 4, 4)})},
    9: {"flat": {(128, 128, 32, 4, 4), (128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (128, 256, 64, 8, 3),
                 (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 32, 4, 4), (64, 64, 64, 4, 3)},
        "nhwc": {(128, 128, 32, 4, 4)}, "res": {(128, 256, 64, 8, 3), (256, 128, 64, 8, 3)},
        "strided": set(_ALL - {(64, 64, 32, 4, 4)})},
}
# sm_80's flattened reduction: no candidate is clean under both Tritons (the stems and ViT-B/16's 16x16
# patch conv: 3.6 spills in 6 of the 8, 3.9 in 4 others), so this row is per Triton version (major.minor);
# a version not measured gets 3.6's, the GPU image's.
_FLAT_SM80 = {
    "3.6": {(128, 128, 32, 4, 4), (128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 3),
            (128, 32, 32, 4, 4), (64, 64, 32, 4, 4)},
    "3.9": {(128, 128, 32, 4, 4), (128, 128, 64, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4)},
}
TRITON = ".".join(triton.__version__.split(".")[:2])
_SPILLS[8]["flat"] = _FLAT_SM80.get(TRITON, _FLAT_SM80["3.6"])


def _path(flat_k, sxc, vec=None) -> str:
    """The _SPILLS row of a launch (vec None: not known, as a 16-byte vector)."""
    if flat_k:
        return "flat"
    return "nhwc" if sxc == 1 and vec != 1 else "strided"


def spilling(arch_major: int, flat_k, sxc, vec=None, has_res=False) -> set:
    """The candidates pruned for spilling on this architecture, for this launch."""
    table = _SPILLS.get(arch_major, {})
    path = _path(flat_k, sxc, vec)
    return set(table.get(path, ())) | (set(table.get("res", ())) if has_res and path == "nhwc" else set())


def _arch() -> tuple[int, int]:
    if _common.INTERPRET or not torch.cuda.is_available():
        return (0, 0)
    return tuple(torch.cuda.get_device_capability())


ARCH = _arch()  # read at import, as the candidate list is (_sm90)
# The most shared memory one CTA may have (bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {(8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376, (9, 0): 232448}


def _gemm_shared(bm, bn, bk, stages, elem):
    """Shared memory of the tap path's pipelined operand tiles, as the compiles report it (stages x
    (BLOCK_M + BLOCK_N) x BLOCK_K elements: 65536 B for 128x128x32 x 4 stages in fp16)."""
    return stages * (bm + bn) * bk * elem


def prune_gemm_configs(configs, named_args, **kwargs):
    """Autotuner early prune. (1) Candidates that spill on this architecture (_SPILLS: spilling()).
    (3) Candidates whose operand tiles need more shared memory than this GPU gives one CTA (fp32
    128x128x64 x 3 stages: 196608 B, over sm_80's 166912).
    (2) The sm_90-only tiles are for 16-bit operands: in fp32 their pipelined tiles need 262-295 KB of
    shared memory against sm_90's 227 KB (the compile reports in benchmarks/results/aot-compile-2026-11-23):
    the autotuner would compile each only to skip it. Never returns an empty list."""
    if len(configs) <= 1:
        return configs

    def get(name):
        return named_args.get(name, kwargs.get(name))

    def tile(c):
        return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)

    drop = spilling(ARCH[0], get("FLAT_K"), get("sxc"), get("VEC"), bool(get("HAS_RES")))
    x = get("x_ptr")
    if getattr(x, "dtype", None) == torch.float32:
        drop |= set(_SM90)
    limit = SHARED_LIMIT.get(ARCH)
    if limit and x is not None:  # (3) tiles whose pipelined operands cannot fit in one CTA's shared memory
        drop |= {t for t in map(tile, configs) if _gemm_shared(t[0], t[1], t[2], t[4], x.element_size()) > limit}
    kept = [c for c in configs if tile(c) not in drop]
    return kept or configs


def _gemm_configs(block_m: int | None = None):
    gpu = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                         num_stages=stages)
           for bm, bn, bk, warps, stages in _BOTH + (_SM90 if _sm90() else ())
           if block_m is None or bm == block_m]
    interp = triton.Config({"BLOCK_M": block_m or 32, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 8})
    return _common.configs(gpu, interp)


@triton.jit
def conv_epilogue(acc, rows_ok, tile, M, cols, cols_ok, n_img, oh, ow, C_out, b_ptr, r_ptr, y_ptr, z_ptr,
                  pmean_ptr, pm2_ptr, srn, src, srh, srw, syn, syc, syh, syw, BLOCK_ROWS: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SAVE_Z: tl.constexpr, STATS: tl.constexpr,
                  ACT: tl.constexpr, OUT_VEC: tl.constexpr):
    """The fused epilogue of both convolution kernels (this file's implicit GEMM and
    conv_depthwise.py's direct kernel), every output element written once. acc: the [rows, cols]
    float32 tile of row tile `tile`; rows are output pixels (n_img, oh, ow), cols output channels.
    Adds the bias; with STATS, stores this tile's per-channel mean and M2 over its valid rows (merged
    later by Chan's formula); adds the residual; stores the pre-activation (SAVE_Z) and act(.).
    OUT_VEC: y's, z's and the residual's channel runs are OUT_VEC-element aligned (src == syc == 1,
    C_out and their other strides multiples of OUT_VEC; the caller aligns cols_ok's bound), else 1."""
    C_out = _common.aligned(C_out, OUT_VEC)
    srn = _common.aligned(srn, OUT_VEC)
    srh = _common.aligned(srh, OUT_VEC)
    srw = _common.aligned(srw, OUT_VEC)
    syn = _common.aligned(syn, OUT_VEC)
    syh = _common.aligned(syh, OUT_VEC)
    syw = _common.aligned(syw, OUT_VEC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols_ok, other=0.0).to(tl.float32)[None, :]
    ok = rows_ok[:, None] & cols_ok[None, :]
    if STATS:
        # Statistics of the values as stored (rounded to the output dtype), which the batch-norm
        # then normalizes: the same numbers torch's batch-norm would see.
        acc = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
        cnt = tl.minimum(M - tile * BLOCK_ROWS, BLOCK_ROWS).to(tl.float32)
        mean = tl.sum(tl.where(ok, acc, 0.0), axis=0) / cnt
        dev = tl.where(ok, acc - mean[None, :], 0.0)
        tl.store(pmean_ptr + tile * C_out + cols, mean, mask=cols_ok)
        tl.store(pm2_ptr + tile * C_out + cols, tl.sum(dev * dev, axis=0), mask=cols_ok)
    if HAS_RES:
        r_off = n_img.to(tl.int64)[:, None] * srn + (cols * src)[None, :] + (oh * srh + ow * srw)[:, None]
        acc += tl.load(r_ptr + r_off, mask=ok, other=0.0).to(tl.float32)
    y_off = n_img.to(tl.int64)[:, None] * syn + (cols * syc)[None, :] + (oh * syh + ow * syw)[:, None]
    if SAVE_Z:
        tl.store(z_ptr + y_off, acc.to(z_ptr.dtype.element_ty), mask=ok)
    acc = act_fwd(acc, ACT)
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _conv_gemm(
    x_ptr,       # input [N, C_in, H, W], strides (sxn, sxc, sxh, sxw), fp32/fp16/bf16
    w_ptr,       # weight [C_out, C_in/groups, KH, KW], strides (swo, swi, swh, sww), input dtype
    b_ptr,       # bias [C_out] (float32 or input dtype); read when HAS_BIAS
    r_ptr,       # residual [N, C_out, OH, OW], strides (srn, src, srh, srw); read when HAS_RES
    y_ptr,       # output [N, C_out, OH, OW], strides (syn, syc, syh, syw), input dtype
    z_ptr,       # pre-activation [N, C_out, OH, OW] with y's strides; written when SAVE_Z
    pmean_ptr,   # [cdiv(M, BLOCK_M), C_out] float32: per-tile channel mean; written when STATS
    pm2_ptr,     # [cdiv(M, BLOCK_M), C_out] float32: per-tile sum of squared deviations (M2)
    H, W, OH, OW, C_out,
    sxn, sxc, sxh, sxw, swo, swi, swh, sww, srn, src, srh, srw, syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    M,           # N * OH * OW: the GEMM rows
    CIN_G,       # input channels per group (the reduction per tap)
    COUT_G,      # output channels per group (the GEMM columns of one group)
    KH: tl.constexpr, KW: tl.constexpr,
    FLAT_K: tl.constexpr,    # reduce over the flattened (kh, kw, ci) instead of tap by tap
    VEC: tl.constexpr,       # the channel runs are VEC-element (16-byte) aligned: sxc == swi == 1 and CIN_G and
                             # the other x and w strides are multiples of VEC (else 1); see _vec()
    OUT_VEC: tl.constexpr,   # the same for the outputs and the residual (conv_epilogue), COUT_G included
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SAVE_Z: tl.constexpr, STATS: tl.constexpr,
    ACT: tl.constexpr,       # activation code (ops/_activation.py)
    DOT_PREC: tl.constexpr,  # tl.dot input_precision for fp32 operands ("ieee" or "tf32")
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    if VEC > 1:
        # What the JIT's divisibility-16 specialization proves only when C is a multiple of 16: each
        # pixel's channel run starts 16 bytes aligned and the channel mask flips on whole vectors, so
        # both operands load as 128-bit async copies (LDGSTS.128 / cp.async) when C is a multiple of 8.
        CIN_G = _common.aligned(CIN_G, VEC)
        sxn = _common.aligned(sxn, VEC)
        sxh = _common.aligned(sxh, VEC)
        sxw = _common.aligned(sxw, VEC)
        swo = _common.aligned(swo, VEC)
        swh = _common.aligned(swh, VEC)
        sww = _common.aligned(sww, VEC)
    COUT_G = _common.aligned(COUT_G, OUT_VEC)
    # Tile order: GROUP_M row tiles share their column tiles in L2 before moving on.
    pid = tl.program_id(0)
    g = tl.program_id(1)  # the group
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(COUT_G, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] output pixels (n, oh, ow)
    m_ok = m < M
    ohw = OH * OW
    n_img = m // ohw
    oh = (m % ohw) // OW
    ow = m % OW
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_row = x_ptr + n_img.to(tl.int64) * sxn + (g * CIN_G).to(tl.int64) * sxc  # [BLOCK_M] pointers

    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output channel within the group
    co_ok = co < COUT_G
    co_g = g * COUT_G + co                        # [BLOCK_N] output channel
    w_col = w_ptr + co_g * swo                    # [BLOCK_N] pointers

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        # Few channels per group (the RGB stem, narrow groups): one reduction over kh, kw, ci.
        K = KH * KW * CIN_G
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
            k_ok = k < K
            ci = k % CIN_G
            tap = k // CIN_G
            kh = tap // KW
            kw = tap % KW
            ih = ih0[:, None] + (kh * dil_h)[None, :]  # [BLOCK_M, BLOCK_K]
            iw = iw0[:, None] + (kw * dil_w)[None, :]
            a_ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_row[:, None] + ih * sxh + iw * sxw + (ci * sxc)[None, :], mask=a_ok, other=0.0)
            b = tl.load(w_col[None, :] + (ci * swi + kh * swh + kw * sww)[:, None],
                        mask=k_ok[:, None] & co_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    else:
        # Tap by tap (kh, kw), BLOCK_K input channels at a time, as ONE loop so that the compiler
        # pipelines the loads across taps (a 3x3 conv over 64 channels is 9 iterations, not 9 loops
        # of one).
        n_chunks = tl.cdiv(CIN_G, BLOCK_K)
        for t in range(0, KH * KW * n_chunks):
            tap = t // n_chunks
            c0 = (t - tap * n_chunks) * BLOCK_K
            kh = tap // KW
            kw = tap - kh * KW
            ih = ih0 + kh * dil_h
            iw = iw0 + kw * dil_w
            row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)  # [BLOCK_M]
            ci = c0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
            c_ok = ci < CIN_G
            a = tl.load((x_row + ih * sxh + iw * sxw)[:, None] + (ci * sxc)[None, :],
                        mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            b = tl.load((w_col + kh * swh + kw * sww)[None, :] + (ci * swi)[:, None],
                        mask=c_ok[:, None] & co_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)

    conv_epilogue(acc, m_ok, pid_m, M, co_g, co_ok, n_img, oh, ow, C_out, b_ptr, r_ptr, y_ptr, z_ptr, pmean_ptr,
                  pm2_ptr, srn, src, srh, srw, syn, syc, syh, syw, BLOCK_M, HAS_BIAS, HAS_RES, SAVE_Z, STATS, ACT,
                  OUT_VEC)


# M (batch x output pixels) is in the key: batch 1 and batch 256 of one layer want different tiles.
_KEY = ["M", "C_out", "CIN_G", "COUT_G", "H", "W", "OH", "OW", "stride_h", "stride_w", "KH", "KW", "FLAT_K",
        "HAS_RES", "STATS", "sxc", "VEC", "OUT_VEC"]
_PRUNE = {"early_config_prune": prune_gemm_configs}
_conv_gemm_tuned = _common.autotune(_gemm_configs(), key=_KEY, prune_configs_by=_PRUNE)(_conv_gemm)
# Training launches: the row tile is fixed (STATS_BLOCK_M), see above.
_conv_gemm_stats_tuned = _common.autotune(_gemm_configs(STATS_BLOCK_M), key=_KEY, prune_configs_by=_PRUNE)(_conv_gemm)


@triton.jit
def _stats_finalize_kernel(
    pmean_ptr,  # [T, C] float32: per-tile channel means
    pm2_ptr,    # [T, C] float32: per-tile M2 (sum of squared deviations from the tile mean)
    mean_ptr,   # [C] float32 out: batch mean
    var_ptr,    # [C] float32 out: biased batch variance
    T, C, M,    # number of tiles, channels, rows (tile t holds min(TILE_M, M - t*TILE_M) rows)
    TILE_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    n_run = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean_run = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2_run = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < T
        cnt = tl.where(t_ok, tl.minimum(M - t * TILE_M, TILE_M), 0).to(tl.float32)  # [BLOCK_T]
        ok = t_ok[:, None] & c_ok[None, :]
        mu = tl.load(pmean_ptr + t[:, None] * C + c[None, :], mask=ok, other=0.0)
        m2 = tl.load(pm2_ptr + t[:, None] * C + c[None, :], mask=ok, other=0.0)
        # This block of tiles combined (weighted mean, M2 plus the spread of the tile means) ...
        n_b = tl.sum(cnt, axis=0)
        mean_b = tl.sum(cnt[:, None] * mu, axis=0) / n_b
        dev = tl.where(ok, mu - mean_b[None, :], 0.0)
        m2_b = tl.sum(m2, axis=0) + tl.sum(cnt[:, None] * dev * dev, axis=0)
        # ... then merged into the running statistics (Chan, Golub and LeVeque).
        n_new = n_run + n_b
        delta = mean_b - mean_run
        mean_run = mean_run + delta * (n_b / n_new)
        m2_run = m2_run + m2_b + delta * delta * (n_run * (n_b / n_new))
        n_run = n_new
    tl.store(mean_ptr + c, mean_run, mask=c_ok)
    tl.store(var_ptr + c, m2_run / n_run, mask=c_ok)


@triton.jit
def _act_grad_kernel(
    dy_ptr,  # [numel] gradient of the output, dense (same memory format as z)
    z_ptr,   # [numel] saved pre-activation (or the output itself for relu/relu6), dense
    dz_ptr,  # [numel] out: act'(z) * dy, dense, dy's dtype
    numel, ACT: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(dz_ptr + offs, act_bwd(z, dy, ACT).to(dz_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# Launchers. The op (fastnets/ops/conv.py) has checked shapes, dtypes and devices, allocated the
# outputs and chosen this path (not depthwise).

def _flat_k(cin_g: int, kh: int, kw: int) -> bool:
    """Flatten the reduction when a tap has too few channels to fill a BLOCK_K of 16-32."""
    return cin_g < 32 and kh * kw > 1


def _weight_for(x, w):
    """The weight as the kernel reads it. With channels-contiguous input (the NHWC fast path) the
    weight's input channels must be contiguous too (OHWI, channels_last), or its tile loads as
    scalar 16-bit loads that the pipeliner cannot turn into async copies: an OIHW weight is copied
    (C_out * C_in/groups * KH * KW elements, as cuDNN converts it to the input's format)."""
    if x.stride(1) == 1 and w.stride(1) != 1 and w.shape[1] > 1:
        w = w.contiguous(memory_format=torch.channels_last)
    return w


def _weight_strides(w):
    """w's strides, 0 for an extent-1 kh or kw (torch gives those any stride, often 1, which would
    cost the tap offset its alignment: kh * swh with swh == 1 is an arbitrary integer)."""
    swo, swi, swh, sww = w.stride()
    return swo, swi, (0 if w.shape[2] == 1 else swh), (0 if w.shape[3] == 1 else sww)


def _vec(x, w, w_strides, cin_g: int) -> int:
    """VEC for _conv_gemm: 16 bytes of elements when every channel run of x and w starts 16-byte
    aligned (channels contiguous in both, C_in/groups and every other stride a multiple of the
    vector, both base pointers 16-byte aligned), else 1."""
    sxn, sxc, sxh, sxw = x.stride()
    swo, swi, swh, sww = w_strides
    if sxc != 1 or swi != 1:
        return 1
    return _common.vec_elems(x.element_size(), (cin_g, sxn, sxh, sxw, swo, swh, sww), (x, w))


def out_vec(y, res, z, cout_g: int) -> int:
    """OUT_VEC for conv_epilogue: as _vec, for y (and z, which has y's strides) and the residual."""
    ts = [t for t in (y, res, z) if t is not None]
    if any(t.stride(1) != 1 for t in ts):
        return 1
    ints = [cout_g, y.shape[1]] + [s for t in ts for i, s in enumerate(t.stride()) if i != 1]
    return _common.vec_elems(y.element_size(), ints, ts)


def conv_gemm(x, w, b, res, y, z, pmean, pm2, stride, padding, dilation, groups, act):
    """y = act(conv(x, w) + b + res) (z = the pre-activation when given), or, with pmean/pm2
    given, y = conv(x, w) + b and its per-tile statistics (act must be 0 and res None)."""
    N, C_in, H, W = x.shape
    w = _weight_for(x, w)
    C_out, cin_g, KH, KW = w.shape
    ws = _weight_strides(w)
    OH, OW = y.shape[2], y.shape[3]
    M = N * OH * OW
    stats = pmean is not None
    cout_g = C_out // groups
    kernel = _conv_gemm_stats_tuned if stats else _conv_gemm_tuned
    rs = res.stride() if res is not None else (0, 0, 0, 0)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(cout_g, meta["BLOCK_N"]), groups)

    torch.library.wrap_triton(kernel)[grid](
        x, w, b if b is not None else y, res if res is not None else y, y, z if z is not None else y,
        pmean if stats else y, pm2 if stats else y,
        H, W, OH, OW, C_out, *x.stride(), *ws, *rs, *y.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], M, cin_g, cout_g,
        KH=KH, KW=KW, FLAT_K=_flat_k(cin_g, KH, KW), VEC=_vec(x, w, ws, cin_g),
        OUT_VEC=out_vec(y, res, z, cout_g), HAS_BIAS=b is not None, HAS_RES=res is not None,
        SAVE_Z=z is not None, STATS=stats, ACT=act, DOT_PREC=_common.dot_precision(x.dtype, conv=True),
    )


def stats_finalize(pmean, pm2, mean, var, M, tile_m):
    T, C = pmean.shape
    block_c = 32 if _common.INTERPRET else 64
    torch.library.wrap_triton(_stats_finalize_kernel)[(triton.cdiv(C, block_c),)](
        pmean, pm2, mean, var, T, C, M, TILE_M=tile_m, BLOCK_T=32, BLOCK_C=block_c)


def act_grad(dy, z, dz, act):
    n = dz.numel()
    block = 1024
    torch.library.wrap_triton(_act_grad_kernel)[(triton.cdiv(n, block),)](dy, z, dz, n, ACT=act, BLOCK=block)
