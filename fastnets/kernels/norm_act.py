"""Batch-norm + residual + activation: Triton kernels and their launchers.

    z = (x - mean) * invstd * w + b (+ residual),   y = act(z),   invstd = 1 / sqrt(var + eps)

Every tensor is seen as [N, C, S] with its own strides (sn, sc, ss): the op (fastnets/ops/norm_act.py)
merges the spatial dims, and N into S where every tensor allows it (channels_last, 2-D input), so
NCHW, channels_last and strided views need no index division. A tile is [BLOCK_S, BLOCK_C]:
positions s of one image n times channels; the launcher makes it long along the axis that is
contiguous in memory (s for NCHW, c for channels_last). A "work item" is one (n, block of s).

Training statistics, two levels, deterministic (no atomics):
  1. stats_partial_kernel: grid (channel blocks, P); program p owns a contiguous range of items and
     keeps, per channel, (count, mean, M2) of x - K, K = x[0, c, 0] a shift that keeps the sums of
     the order of the spread (a large mean then costs no precision; the mean is K + the shifted
     mean, rounded once). Each tile's mean and M2 are exact within the tile (mean first, then the
     sum of squared deviations from it), merged into the running triple with Chan's formula.
     Writes [P, C] means, M2s and counts.
  2. stats_finalize_kernel: per channel, merges the P partials in a fixed order (chunks of BLOCK_P
     combined exactly, then Chan's formula), writes the batch mean and biased variance (float32 [C])
     and updates the running statistics in place: r = (1 - momentum) * r + momentum * batch, the
     variance unbiased by n / (n - 1). Given the batch statistics (the fused convolution computed
     them), it only copies them and updates the running statistics.
  3. apply_kernel: one pass, y = act(z). In eval mode, with the running statistics, it is the whole
     forward: read x (and the residual), write y, the memory floor.
The mean is merged as a weighted average (not mean_a + delta * n_b / n) so that an Inf input gives
an Inf mean, as torch's, rather than NaN.

Backward (dy = dL/dy), with xhat = (x - mean) * invstd and dz = act'(z) * dy:
  dx = invstd * w * (dz - mean(dz) - xhat * mean(dz * xhat))   (training)
  dx = invstd * w * dz                                          (eval: the statistics are constants)
  grad_weight = sum(dz * xhat), grad_bias = sum(dz), grad_residual = dz.
The pre-activation z is recomputed from x (and the residual) rather than saved or inverted from y:
relu, relu6 and gelu are not invertible, and saving z would cost a write in the forward and a
tensor of memory per layer (what a fused pre-activation layer exists to avoid). The reductions run
as bwd_reduce_kernel (partials [P, C]) + bwd_finalize_kernel (a fixed-order sum), then
bwd_apply_kernel writes dx (and grad_residual). Bytes moved, E = the size of x in bytes:
  training forward  read x twice (statistics, apply), write y: 3E (floor 2E: x read once, y written)
  training backward read x, dy twice (reduce, apply), write dx: 5E (floor 3E), + 2 reads and a
                    write of the residual's size when there is one (its gradient, when needed)
  eval forward      2E, the floor (+ 1E read of the residual). Eval backward without parameter
                    gradients: read x (for act'(z)) and dy, write dx: 3E.
Reading x twice is the price of not keeping a [N, C, S] tensor on chip; L2 catches the second read
only for small layers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastnets.kernels._activation import act_bwd, act_fwd
from fastnets.kernels._common import INTERPRET, next_pow2


@triton.jit
def _tile(item, cb, n_sblocks, C, S, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """The tile of work item `item` (= n * n_sblocks + block of s) and channel block cb: returns
    n (int64 scalar), s [BLOCK_S, 1] int64, c [1, BLOCK_C] int64, mask [BLOCK_S, BLOCK_C], and
    the number of valid positions (float32 scalar)."""
    n = (item // n_sblocks).to(tl.int64)
    s0 = (item % n_sblocks) * BLOCK_S
    s = (s0 + tl.arange(0, BLOCK_S)).to(tl.int64)[:, None]
    c = (cb * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)[None, :]
    mask = (s < S) & (c < C)
    rows = tl.minimum(S - s0, BLOCK_S).to(tl.float32)
    return n, s, c, mask, rows


@triton.jit
def _channel(ptr, c, cmask, DEFAULT: tl.constexpr, PRESENT: tl.constexpr):
    """A per-channel float32 vector value ([1, BLOCK_C]) of a [C] float32 tensor, or DEFAULT."""
    if PRESENT:
        v = tl.load(ptr + c, mask=cmask, other=DEFAULT)
    else:
        v = tl.full(c.shape, DEFAULT, tl.float32)
    return v


@triton.jit
def _z(x_ptr, r_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, n, s, c, mask, cvalid,
       sxn, sxc, sxs, srn, src, srs, eps,
       HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr):
    """(xhat, z, scale) of one tile in float32: xhat = (x - mean) * invstd, z = xhat * w + b (+ r),
    scale = invstd * w ([1, BLOCK_C]). cvalid: [1, BLOCK_C] channel mask. The forward and both
    backward kernels compute z with these same operations, so they agree on which side of an
    activation's kink each element lies."""
    x = tl.load(x_ptr + n * sxn + c * sxc + s * sxs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + c, mask=cvalid, other=0.0)
    var = tl.load(var_ptr + c, mask=cvalid, other=1.0)
    invstd = 1.0 / tl.sqrt(var + eps)
    w = _channel(w_ptr, c, cvalid, 1.0, HAS_W)
    b = _channel(b_ptr, c, cvalid, 0.0, HAS_B)
    xhat = (x - mean) * invstd
    z = xhat * w + b
    if HAS_R:
        z += tl.load(r_ptr + n * srn + c * src + s * srs, mask=mask, other=0.0).to(tl.float32)
    return xhat, z, invstd * w


@triton.jit
def _shift(x_ptr, c, sxc, C):
    """Each channel's shift K = x[0, c, 0] (0 where that value is not finite): the statistics are
    accumulated on x - K, which is of the order of the spread rather than of the mean, so that a
    large mean costs no precision; the mean is K + the shifted mean, rounded once at the end.
    c: channels (int64), any shape."""
    k = tl.load(x_ptr + c * sxc, mask=c < C, other=0.0).to(tl.float32)
    return tl.where(tl.abs(k) < float("inf"), k, 0.0)


@triton.jit
def stats_partial_kernel(
    x_ptr,  # input [N, C, S], strides (sxn, sxc, sxs); fp32/fp16/bf16
    pmean_ptr,  # out [P, C] float32: mean of x - K over partial p's positions, per channel (K: _shift)
    pm2_ptr,  # out [P, C] float32: sum of squared deviations from that mean
    pcount_ptr,  # out [P, C] float32: positions in partial p (the same for every channel)
    C, S, n_sblocks,  # channels, positions per image, cdiv(S, BLOCK_S)
    n_items, items_per_prog,  # N * n_sblocks work items; program p owns [p, p + 1) * items_per_prog
    sxn, sxc, sxs,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cb = tl.program_id(0)
    p = tl.program_id(1)
    start = p * items_per_prog
    end = tl.minimum(start + items_per_prog, n_items)
    k = _shift(x_ptr, (cb * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)[None, :], sxc, C)  # [1, BLOCK_C]
    cnt = tl.zeros((1, BLOCK_C), dtype=tl.float32)
    mean = tl.zeros((1, BLOCK_C), dtype=tl.float32)
    m2 = tl.zeros((1, BLOCK_C), dtype=tl.float32)
    for item in range(start, end):
        n, s, c, mask, rows = _tile(item, cb, n_sblocks, C, S, BLOCK_S, BLOCK_C)
        x = tl.load(x_ptr + n * sxn + c * sxc + s * sxs, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x - k, 0.0)
        # This tile's statistics, exact: its mean, then the squared deviations from it.
        mean_t = tl.sum(x, axis=0)[None, :] / rows
        d = tl.where(mask, x - mean_t, 0.0)
        m2_t = tl.sum(d * d, axis=0)[None, :]
        # Chan's merge of (cnt, mean, m2) with (rows, mean_t, m2_t).
        tot = cnt + rows
        delta = mean_t - mean
        mean = mean * (cnt / tot) + mean_t * (rows / tot)
        m2 = m2 + m2_t + delta * delta * (cnt * rows / tot)
        cnt = tot
    c = (cb * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)[None, :]
    out = p.to(tl.int64) * C + c
    tl.store(pmean_ptr + out, mean, mask=c < C)
    tl.store(pm2_ptr + out, m2, mask=c < C)
    tl.store(pcount_ptr + out, cnt, mask=c < C)


@triton.jit
def stats_finalize_kernel(
    x_ptr,  # input [N, C, S] (only x[0, c, 0], the shift; unused without HAS_PARTIALS)
    pmean_ptr, pm2_ptr,  # [P, C] float32 partials (unused without HAS_PARTIALS)
    pcount_ptr,  # [P, C] float32 partial counts (unused without HAS_PARTIALS)
    bmean_ptr, bvar_ptr,  # [C] float32 given batch mean and biased variance (used without HAS_PARTIALS)
    mean_ptr, var_ptr,  # out [C] float32: batch mean, biased variance
    rmean_ptr, rvar_ptr,  # [C] running mean and variance, updated in place (with UPDATE), any float dtype
    P, C, sxc,
    momentum, unbias,  # running-stat factor; n / (n - 1), the unbiased variance's factor
    HAS_PARTIALS: tl.constexpr, UPDATE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    if HAS_PARTIALS:
        cnt = tl.zeros((BLOCK_C,), dtype=tl.float32)
        mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
        m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):  # a fixed order: the result does not depend on scheduling
            p = p0 + tl.arange(0, BLOCK_P)[:, None]
            m = (p < P) & cmask[None, :]
            off = p.to(tl.int64) * C + c[None, :]
            pm = tl.load(pmean_ptr + off, mask=m, other=0.0)
            pq = tl.load(pm2_ptr + off, mask=m, other=0.0)
            pn = tl.load(pcount_ptr + off, mask=m, other=0.0)
            # This chunk of partials combined exactly: weighted mean, then M2 about it.
            nb = tl.where(cmask, tl.sum(pn, axis=0), 1.0)  # 1 in the masked channels: no 0 / 0
            mb = tl.sum(pm * pn, axis=0) / nb
            d = tl.where(m, pm - mb[None, :], 0.0)
            m2b = tl.sum(pq + pn * d * d, axis=0)
            tot = cnt + nb
            delta = mb - mean
            mean = mean * (cnt / tot) + mb * (nb / tot)
            m2 = m2 + m2b + delta * delta * (cnt * nb / tot)
            cnt = tot
        mean = _shift(x_ptr, c.to(tl.int64), sxc, C) + mean
        var = m2 / cnt
    else:
        mean = tl.load(bmean_ptr + c, mask=cmask, other=0.0)
        var = tl.load(bvar_ptr + c, mask=cmask, other=0.0)
    tl.store(mean_ptr + c, mean, mask=cmask)
    tl.store(var_ptr + c, var, mask=cmask)
    if UPDATE:
        rm = tl.load(rmean_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        rv = tl.load(rvar_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        rm = momentum * mean + (1.0 - momentum) * rm
        rv = momentum * (var * unbias) + (1.0 - momentum) * rv
        tl.store(rmean_ptr + c, rm.to(rmean_ptr.dtype.element_ty), mask=cmask)
        tl.store(rvar_ptr + c, rv.to(rvar_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def apply_kernel(
    x_ptr,  # input [N, C, S], strides (sxn, sxc, sxs); fp32/fp16/bf16
    r_ptr,  # residual [N, C, S], strides (srn, src, srs) (0 where broadcast), x's dtype (unused without HAS_R)
    y_ptr,  # out [N, C, S], strides (syn, syc, sys), x's dtype
    mean_ptr, var_ptr,  # [C] float32: the statistics (batch ones in training, running ones in eval)
    w_ptr, b_ptr,  # [C] float32 affine weight and bias (unused without HAS_W / HAS_B)
    C, S, n_sblocks, n_cblocks,
    sxn, sxc, sxs, srn, src, srs, syn, syc, sys,
    eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr, ACT: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)  # over n_items * n_cblocks tiles, channel blocks fastest
    cb = pid % n_cblocks
    item = pid // n_cblocks
    n, s, c, mask, rows = _tile(item, cb, n_sblocks, C, S, BLOCK_S, BLOCK_C)
    xhat, z, scale = _z(x_ptr, r_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, n, s, c, mask, c < C,
                        sxn, sxc, sxs, srn, src, srs, eps, HAS_W, HAS_B, HAS_R)
    y = act_fwd(z, ACT)
    tl.store(y_ptr + n * syn + c * syc + s * sys, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bwd_reduce_kernel(
    dy_ptr,  # grad of the output [N, C, S], strides (sdn, sdc, sds) (0 where broadcast)
    x_ptr,  # forward input [N, C, S], strides (sxn, sxc, sxs)
    r_ptr,  # residual [N, C, S], strides (srn, src, srs) (with HAS_R: only when the activation needs z)
    mean_ptr, var_ptr, w_ptr, b_ptr,  # [C] float32, as apply_kernel
    psum_dz_ptr,  # out [P, C] float32: partial sums of dz
    psum_dzx_ptr,  # out [P, C] float32: partial sums of dz * xhat
    C, S, n_sblocks, n_items, items_per_prog,
    sdn, sdc, sds, sxn, sxc, sxs, srn, src, srs,
    eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr, ACT: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cb = tl.program_id(0)
    p = tl.program_id(1)
    start = p * items_per_prog
    end = tl.minimum(start + items_per_prog, n_items)
    acc_dz = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc_dzx = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for item in range(start, end):
        n, s, c, mask, rows = _tile(item, cb, n_sblocks, C, S, BLOCK_S, BLOCK_C)
        xhat, z, scale = _z(x_ptr, r_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, n, s, c, mask, c < C,
                            sxn, sxc, sxs, srn, src, srs, eps, HAS_W, HAS_B, HAS_R)
        dy = tl.load(dy_ptr + n * sdn + c * sdc + s * sds, mask=mask, other=0.0).to(tl.float32)
        dz = tl.where(mask, act_bwd(z, dy, ACT), 0.0)
        acc_dz += tl.sum(dz, axis=0)
        acc_dzx += tl.sum(dz * xhat, axis=0)
    c = (cb * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    out = p.to(tl.int64) * C + c
    tl.store(psum_dz_ptr + out, acc_dz, mask=c < C)
    tl.store(psum_dzx_ptr + out, acc_dzx, mask=c < C)


@triton.jit
def bwd_finalize_kernel(
    psum_dz_ptr, psum_dzx_ptr,  # [P, C] float32 partials
    sum_dz_ptr, sum_dzx_ptr,  # out [C] float32: sum(dz) (grad of the bias), sum(dz * xhat) (of the weight)
    P, C,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc_dz = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc_dzx = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):  # a fixed order: deterministic
        p = p0 + tl.arange(0, BLOCK_P)[:, None]
        m = (p < P) & (c[None, :] < C)
        off = p.to(tl.int64) * C + c[None, :]
        acc_dz += tl.sum(tl.load(psum_dz_ptr + off, mask=m, other=0.0), axis=0)
        acc_dzx += tl.sum(tl.load(psum_dzx_ptr + off, mask=m, other=0.0), axis=0)
    tl.store(sum_dz_ptr + c, acc_dz, mask=c < C)
    tl.store(sum_dzx_ptr + c, acc_dzx, mask=c < C)


@triton.jit
def bwd_apply_kernel(
    dy_ptr, x_ptr, r_ptr,  # [N, C, S] with strides as bwd_reduce_kernel
    mean_ptr, var_ptr, w_ptr, b_ptr,  # [C] float32
    sum_dz_ptr, sum_dzx_ptr,  # [C] float32 from bwd_finalize_kernel (read only with TRAIN)
    dx_ptr,  # out [N, C, S], strides (sxn', sxc', sxs') = (dxn, dxc, dxs), x's dtype (with NEED_DX)
    dr_ptr,  # out [N, C, S], strides (drn, drc, drs), x's dtype: grad of the residual = dz (with NEED_DR)
    C, S, n_sblocks, n_cblocks,
    sdn, sdc, sds, sxn, sxc, sxs, srn, src, srs, dxn, dxc, dxs, drn, drc, drs,
    eps, inv_count,  # 1 / (N * S), for the means of dz and dz * xhat
    TRAIN: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr,
    ACT: tl.constexpr, NEED_DX: tl.constexpr, NEED_DR: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cb = pid % n_cblocks
    item = pid // n_cblocks
    n, s, c, mask, rows = _tile(item, cb, n_sblocks, C, S, BLOCK_S, BLOCK_C)
    cvalid = c < C
    xhat, z, scale = _z(x_ptr, r_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, n, s, c, mask, cvalid,
                        sxn, sxc, sxs, srn, src, srs, eps, HAS_W, HAS_B, HAS_R)
    dy = tl.load(dy_ptr + n * sdn + c * sdc + s * sds, mask=mask, other=0.0).to(tl.float32)
    dz = act_bwd(z, dy, ACT)
    if NEED_DR:
        tl.store(dr_ptr + n * drn + c * drc + s * drs, dz.to(dr_ptr.dtype.element_ty), mask=mask)
    if NEED_DX:
        if TRAIN:
            mean_dz = tl.load(sum_dz_ptr + c, mask=cvalid, other=0.0) * inv_count
            mean_dzx = tl.load(sum_dzx_ptr + c, mask=cvalid, other=0.0) * inv_count
            dx = (dz - mean_dz - xhat * mean_dzx) * scale
        else:
            dx = dz * scale
        tl.store(dx_ptr + n * dxn + c * dxc + s * dxs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers. dims = (N, C, S) of the op's [N, C, S] view; each tensor comes with its 3 strides.

def _blocks(C: int, S: int, channels_inner: bool) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_C, num_warps): the tile runs along the axis that is contiguous in memory.
    In the interpreter a program costs Python overhead per operation, so tiles are larger there."""
    budget = 8192 if INTERPRET else 2048
    if channels_inner:  # channels_last: many channels at a few positions
        bc = min(next_pow2(C), 128)
        bs = max(1, min(next_pow2(S), budget // bc))
    else:  # NCHW: many positions of a few channels
        bs = min(next_pow2(S), 1024)
        bc = max(1, min(next_pow2(C), budget // bs))
    return bs, bc, 4 if bs * bc <= 1024 else 8


def _partition(n_items: int, n_cblocks: int, device) -> tuple[int, int]:
    """(P, items per program) of the reduction kernels: enough programs to fill the GPU, each owning
    a contiguous range of work items. In the interpreter, 3 partials so that the merge is tested."""
    if INTERPRET:
        target = 3
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        target = triton.cdiv(4 * sms, n_cblocks)
    per = triton.cdiv(n_items, max(1, min(n_items, target, 65535)))
    return triton.cdiv(n_items, per), per


def _block_p(P: int) -> int:
    return min(next_pow2(P), 2 if INTERPRET else 64)  # 2 in the interpreter: tests the chunked merge


def _geometry(dims, channels_inner):
    N, C, S = dims
    bs, bc, warps = _blocks(C, S, channels_inner)
    nsb, ncb = triton.cdiv(S, bs), triton.cdiv(C, bc)
    n_items = N * nsb
    if n_items * ncb >= 2**31:
        raise ValueError(f"batch_norm_act: the input is too large for one launch ({n_items * ncb} tiles)")
    return N, C, S, bs, bc, warps, nsb, ncb, n_items


def stats(x, sx, dims, channels_inner, mean, var, bmean, bvar, rmean, rvar, momentum, unbias):
    """Batch mean and biased variance of x [N, C, S] (strides sx) into mean, var ([C] float32), or
    copies of the given bmean, bvar when they are not None; then, when rmean/rvar are not None, the
    running-statistics update in place ([C] contiguous, any float dtype)."""
    from torch.library import wrap_triton

    N, C, S, bs, bc, warps, nsb, ncb, n_items = _geometry(dims, channels_inner)
    given = bmean is not None
    P, per, bp = 1, 1, 1
    pmean = pm2 = pcount = mean  # placeholders (unused pointers) when the statistics are given
    if not given:
        P, per = _partition(n_items, ncb, x.device)
        pmean = torch.empty((P, C), dtype=torch.float32, device=x.device)
        pm2 = torch.empty((P, C), dtype=torch.float32, device=x.device)
        pcount = torch.empty((P, C), dtype=torch.float32, device=x.device)
        wrap_triton(stats_partial_kernel)[(ncb, P)](
            x, pmean, pm2, pcount, C, S, nsb, n_items, per, *sx, BLOCK_S=bs, BLOCK_C=bc, num_warps=warps)
        bp = _block_p(P)
    fbc = min(next_pow2(C), 256)
    update = rmean is not None
    wrap_triton(stats_finalize_kernel)[(triton.cdiv(C, fbc),)](
        x, pmean, pm2, pcount, bmean if given else mean, bvar if given else var, mean, var,
        rmean if update else mean, rvar if update else var, P, C, sx[1], float(momentum), float(unbias),
        HAS_PARTIALS=not given, UPDATE=update, BLOCK_P=bp, BLOCK_C=fbc, num_warps=4)


def apply(x, sx, r, sr, y, sy, dims, channels_inner, mean, var, w, b, eps, act):
    """y = act((x - mean) * invstd * w + b + r) over [N, C, S] views (r, w, b may be None)."""
    from torch.library import wrap_triton

    N, C, S, bs, bc, warps, nsb, ncb, n_items = _geometry(dims, channels_inner)
    wrap_triton(apply_kernel)[(n_items * ncb,)](
        x, r if r is not None else x, y, mean, var, w if w is not None else mean, b if b is not None else mean,
        C, S, nsb, ncb, *sx, *(sr if r is not None else (0, 0, 0)), *sy, float(eps),
        HAS_W=w is not None, HAS_B=b is not None, HAS_R=r is not None, ACT=act,
        BLOCK_S=bs, BLOCK_C=bc, num_warps=warps)


def backward(dy, sdy, x, sx, r, sr, dx, sdx, dr, sdr, dims, channels_inner, mean, var, w, b, eps, act,
             train, sum_dz, sum_dzx):
    """The backward over [N, C, S] views. sum_dz, sum_dzx: [C] float32 outputs (the bias and weight
    gradients), or None when neither they nor (eval mode) dx need the reductions; dx, dr: outputs or
    None when not needed."""
    from torch.library import wrap_triton

    N, C, S, bs, bc, warps, nsb, ncb, n_items = _geometry(dims, channels_inner)
    wp = w if w is not None else mean
    bp_ = b if b is not None else mean
    if act == 0:
        r = None  # z is needed only for act'(z): without an activation the residual is not read
    rr, srr = (r, sr) if r is not None else (x, (0, 0, 0))
    if sum_dz is not None:
        P, per = _partition(n_items, ncb, x.device)
        psum_dz = torch.empty((P, C), dtype=torch.float32, device=x.device)
        psum_dzx = torch.empty((P, C), dtype=torch.float32, device=x.device)
        wrap_triton(bwd_reduce_kernel)[(ncb, P)](
            dy, x, rr, mean, var, wp, bp_, psum_dz, psum_dzx, C, S, nsb, n_items, per, *sdy, *sx, *srr,
            float(eps), HAS_W=w is not None, HAS_B=b is not None, HAS_R=r is not None, ACT=act,
            BLOCK_S=bs, BLOCK_C=bc, num_warps=warps)
        fbc = min(next_pow2(C), 256)
        wrap_triton(bwd_finalize_kernel)[(triton.cdiv(C, fbc),)](
            psum_dz, psum_dzx, sum_dz, sum_dzx, P, C, BLOCK_P=_block_p(P), BLOCK_C=fbc, num_warps=4)
    if dx is None and dr is None:
        return
    wrap_triton(bwd_apply_kernel)[(n_items * ncb,)](
        dy, x, rr, mean, var, wp, bp_, sum_dz if sum_dz is not None else mean,
        sum_dzx if sum_dzx is not None else mean, dx if dx is not None else x, dr if dr is not None else x,
        C, S, nsb, ncb, *sdy, *sx, *srr, *(sdx if dx is not None else (0, 0, 0)),
        *(sdr if dr is not None else (0, 0, 0)), float(eps), 1.0 / (N * S),
        TRAIN=train, HAS_W=w is not None, HAS_B=b is not None, HAS_R=r is not None, ACT=act,
        NEED_DX=dx is not None, NEED_DR=dr is not None, BLOCK_S=bs, BLOCK_C=bc, num_warps=warps)
