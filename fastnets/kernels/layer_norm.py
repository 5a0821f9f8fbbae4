"""Layer normalization over the last dim of a [M, N] view (with an optional residual added first):
Triton kernels and launchers.

Forward, per row:  s = x (+ residual);  mean, var = mean(s), mean((s - mean)^2) (biased, float32);
    rstd = 1 / sqrt(var + eps);  y = (s - mean) * rstd * w + b.   Saves mean and rstd [M] (float32).
    With STORE_SUM (add_layer_norm) s is rounded to the input dtype, stored, and normalized as
    rounded, so that the backward (which reads the stored s) sees exactly the forward's input.
Backward, per row, with xhat = (s - mean) * rstd, wdy = dy * w:
    dx = rstd * (wdy - mean(wdy) - xhat * mean(wdy * xhat))   (+ dsum for add_layer_norm),
    dw = sum over rows of dy * xhat,  db = sum over rows of dy:
each program owns a set of rows and writes its partial dw, db row ([P, N], float32); a second
small kernel sums the P partials per column in a fixed order (deterministic, no atomics).

A row fits one tile when N <= MAX_BLOCK (then it is read once and kept in registers); wider rows
are read in chunks of MAX_BLOCK columns, statistics merged chunk by chunk (Chan's formula), and read
again (from L2) to normalize.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastnets import _dispatch
from fastnets.kernels._common import INTERPRET, next_pow2

# Widest row held in one tile; wider rows are processed in chunks of this many columns. Small in the
# interpreter so that its tests exercise the chunked path at modest widths.
MAX_BLOCK = 512 if INTERPRET else 8192


@triton.jit
def _load_row(x_ptr, r_ptr, s_ptr, rows, cols, mask, sxm, sxn, srm, srn, N,
              HAS_RES: tl.constexpr, STORE_SUM: tl.constexpr):
    """s = x (+ r) in float32 for a [ROWS, BLOCK] tile; with STORE_SUM, rounded to x's dtype and
    stored to s_ptr ([M, N] contiguous)."""
    r64 = rows.to(tl.int64)
    v = tl.load(x_ptr + r64 * sxm + cols.to(tl.int64) * sxn, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        v += tl.load(r_ptr + r64 * srm + cols.to(tl.int64) * srn, mask=mask, other=0.0).to(tl.float32)
    if STORE_SUM:
        rounded = v.to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + r64 * N + cols, rounded, mask=mask)
        v = rounded.to(tl.float32)
    return v


@triton.jit
def ln_fwd_kernel(
    x_ptr,  # input [M, N], strides (sxm, sxn); fp32/fp16/bf16
    r_ptr,  # residual [M, N], strides (srm, srn), x's dtype (unused without HAS_RES)
    w_ptr,  # weight [N] contiguous, x's dtype or float32 (unused without HAS_W)
    b_ptr,  # bias [N] contiguous, as the weight (unused without HAS_B)
    y_ptr,  # output [M, N] contiguous, x's dtype
    s_ptr,  # sum x + r [M, N] contiguous, x's dtype (written only with STORE_SUM)
    mean_ptr,  # [M] float32 out
    rstd_ptr,  # [M] float32 out
    M, N, sxm, sxn, srm, srn, eps,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, STORE_SUM: tl.constexpr,
    ROWS: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # columns per tile: >= N (one tile) or MAX_BLOCK (chunks)
    SINGLE: tl.constexpr,  # BLOCK_N >= N: the whole row in one tile
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]  # [ROWS, 1]
    row_ok = rows < M
    cols0 = tl.arange(0, BLOCK_N)[None, :]  # [1, BLOCK_N]
    if SINGLE:  # the whole row in one tile, kept in registers
        mask = row_ok & (cols0 < N)
        v = _load_row(x_ptr, r_ptr, s_ptr, rows, cols0, mask, sxm, sxn, srm, srn, N, HAS_RES, STORE_SUM)
        mean = tl.sum(v, axis=1) / N
        vc = tl.where(mask, v - mean[:, None], 0.0)
        var = tl.sum(vc * vc, axis=1) / N
    else:  # chunks of BLOCK_N columns; per-row (count, mean, M2) merged with Chan's formula
        mean = tl.zeros((ROWS,), dtype=tl.float32)
        m2 = tl.zeros((ROWS,), dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + cols0
            mask = row_ok & (cols < N)
            v = _load_row(x_ptr, r_ptr, s_ptr, rows, cols, mask, sxm, sxn, srm, srn, N, HAS_RES, STORE_SUM)
            nb = tl.minimum(N - start, BLOCK_N) * 1.0
            mb = tl.sum(v, axis=1) / nb
            vc = tl.where(mask, v - mb[:, None], 0.0)
            m2b = tl.sum(vc * vc, axis=1)
            na = start * 1.0
            delta = mb - mean
            mean += delta * (nb / (na + nb))
            m2 += m2b + delta * delta * (na * nb / (na + nb))
        var = m2 / N
    rstd = 1.0 / tl.sqrt(var + eps)
    rows1 = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    tl.store(mean_ptr + rows1, mean, mask=rows1 < M)
    tl.store(rstd_ptr + rows1, rstd, mask=rows1 < M)
    for start in range(0, N, BLOCK_N):
        cols = start + cols0
        mask = row_ok & (cols < N)
        if not SINGLE:  # reload the chunk (the stored sum when there is one: it is already rounded)
            if STORE_SUM:
                v = tl.load(s_ptr + rows.to(tl.int64) * N + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                v = _load_row(x_ptr, r_ptr, s_ptr, rows, cols, mask, sxm, sxn, srm, srn, N, HAS_RES, False)
        y = (v - mean[:, None]) * rstd[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows.to(tl.int64) * N + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _xhat_wdy(dy_ptr, x_ptr, r_ptr, w_ptr, rows, cols, mask, mean, rstd,
              sdym, sdyn, sxm, sxn, srm, srn, N, HAS_RES: tl.constexpr, HAS_W: tl.constexpr):
    """(dy, xhat, wdy) in float32 for a [ROWS, BLOCK] tile; zero where masked."""
    dy = tl.load(dy_ptr + rows.to(tl.int64) * sdym + cols.to(tl.int64) * sdyn, mask=mask, other=0.0).to(tl.float32)
    v = _load_row(x_ptr, r_ptr, x_ptr, rows, cols, mask, sxm, sxn, srm, srn, N, HAS_RES, False)
    xhat = tl.where(mask, (v - mean[:, None]) * rstd[:, None], 0.0)
    wdy = dy
    if HAS_W:
        wdy = dy * tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    return dy, xhat, wdy


@triton.jit
def ln_bwd_kernel(
    dy_ptr,  # grad of the output [M, N], strides (sdym, sdyn)
    ds_ptr,  # grad of the stored sum [M, N], strides (sdsm, sdsn) (only with HAS_DS)
    x_ptr,  # forward input [M, N] (for add_layer_norm: the stored sum), strides (sxm, sxn)
    r_ptr,  # residual [M, N], strides (srm, srn) (only with HAS_RES: layer_norm(residual=))
    w_ptr,  # weight [N] (only with HAS_W)
    mean_ptr, rstd_ptr,  # [M] float32, saved by the forward
    dx_ptr,  # grad of the input (and of the residual) [M, N] contiguous, x's dtype
    dwp_ptr,  # partial grad of the weight [P, N] float32 (only with NEED_DW)
    dbp_ptr,  # partial grad of the bias [P, N] float32 (only with NEED_DB)
    M, N, rows_per_prog,  # this program's rows: [pid * rows_per_prog, (pid + 1) * rows_per_prog)
    sdym, sdyn, sdsm, sdsn, sxm, sxn, srm, srn,
    HAS_DS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,  # as in ln_fwd_kernel
):
    pid = tl.program_id(0)
    row_end = tl.minimum((pid + 1) * rows_per_prog, M)
    cols0 = tl.arange(0, BLOCK_N)[None, :]
    pbase = pid.to(tl.int64) * N
    if SINGLE:
        dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(pid * rows_per_prog, row_end, ROWS):
        rows = r0 + tl.arange(0, ROWS)[:, None]
        row_ok = rows < row_end
        rows1 = r0 + tl.arange(0, ROWS)
        mean = tl.load(mean_ptr + rows1, mask=rows1 < row_end, other=0.0)
        rstd = tl.load(rstd_ptr + rows1, mask=rows1 < row_end, other=0.0)
        # c1 = mean(wdy * xhat), c2 = mean(wdy) over the row
        c1 = tl.zeros((ROWS,), dtype=tl.float32)
        c2 = tl.zeros((ROWS,), dtype=tl.float32)
        if not SINGLE:
            for start in range(0, N, BLOCK_N):
                cols = start + cols0
                mask = row_ok & (cols < N)
                dy, xhat, wdy = _xhat_wdy(dy_ptr, x_ptr, r_ptr, w_ptr, rows, cols, mask, mean, rstd,
                                          sdym, sdyn, sxm, sxn, srm, srn, N, HAS_RES, HAS_W)
                c1 += tl.sum(wdy * xhat, axis=1)
                c2 += tl.sum(wdy, axis=1)
        for start in range(0, N, BLOCK_N):
            cols = start + cols0
            mask = row_ok & (cols < N)
            dy, xhat, wdy = _xhat_wdy(dy_ptr, x_ptr, r_ptr, w_ptr, rows, cols, mask, mean, rstd,
                                      sdym, sdyn, sxm, sxn, srm, srn, N, HAS_RES, HAS_W)
            if SINGLE:
                c1 = tl.sum(wdy * xhat, axis=1)
                c2 = tl.sum(wdy, axis=1)
            dx = (wdy - (xhat * (c1 / N)[:, None] + (c2 / N)[:, None])) * rstd[:, None]
            if HAS_DS:
                dx += tl.load(ds_ptr + rows.to(tl.int64) * sdsm + cols.to(tl.int64) * sdsn, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + rows.to(tl.int64) * N + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if SINGLE:
                if NEED_DW:
                    dw_acc += tl.sum(dy * xhat, axis=0)
                if NEED_DB:
                    db_acc += tl.sum(dy, axis=0)
            else:  # this program's own partial row, zeroed by the launcher: no other program writes it
                c = start + tl.arange(0, BLOCK_N)
                if NEED_DW:
                    p = dwp_ptr + pbase + c
                    tl.store(p, tl.load(p, mask=c < N) + tl.sum(dy * xhat, axis=0), mask=c < N)
                if NEED_DB:
                    p = dbp_ptr + pbase + c
                    tl.store(p, tl.load(p, mask=c < N) + tl.sum(dy, axis=0), mask=c < N)
    if SINGLE:
        c = tl.arange(0, BLOCK_N)
        if NEED_DW:
            tl.store(dwp_ptr + pbase + c, dw_acc, mask=c < N)
        if NEED_DB:
            tl.store(dbp_ptr + pbase + c, db_acc, mask=c < N)


@triton.jit
def column_sum_kernel(
    p_ptr,  # partial sums [P, N] float32, contiguous
    out_ptr,  # [N] in the parameter's dtype
    P, N,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):  # a fixed order: the result does not depend on scheduling
        rows = p0 + tl.arange(0, BLOCK_P)[:, None]
        m = (rows < P) & (cols[None, :] < N)
        acc += tl.sum(tl.load(p_ptr + rows.to(tl.int64) * N + cols[None, :], mask=m, other=0.0), axis=0)
    tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < N)


def _tile(N: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_N, num_warps) for rows of width N."""
    block = min(next_pow2(N), MAX_BLOCK)
    budget = 8192 if INTERPRET else 2048  # elements per tile
    rows = max(1, min(64, budget // block))
    tile = block * rows
    warps = 4 if tile <= 2048 else (8 if tile <= 4096 else 16)  # at most ~16 fp32 values per thread and tile
    return rows, block, warps


def _num_programs(M: int, rows: int, device) -> int:
    """Programs of the backward: enough to fill the GPU, each owning whole row chunks."""
    if INTERPRET:
        target = 3  # a few partials, so that the second-level sum is exercised
    else:
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(M, rows), target))


def ln_forward(x, r, w, b, y, s, mean, rstd, eps):
    """x, r: [M, N] views (r may be None); w, b: [N] or None; y: [M, N]; s: [M, N] or None (store the
    sum); mean, rstd: [M] float32."""
    from torch.library import wrap_triton

    M, N = x.shape
    rows, block, warps = _tile(N)
    srm, srn = r.stride() if r is not None else (0, 0)
    wrap_triton(ln_fwd_kernel)[(triton.cdiv(M, rows),)](
        x, r if r is not None else x, w if w is not None else x, b if b is not None else x, y,
        s if s is not None else y, mean, rstd, M, N, x.stride(0), x.stride(1), srm, srn, eps,
        HAS_RES=r is not None, HAS_W=w is not None, HAS_B=b is not None, STORE_SUM=s is not None,
        ROWS=rows, BLOCK_N=block, SINGLE=block >= N, num_warps=warps)


def ln_backward(dy, ds, x, r, w, mean, rstd, dx, dw, db):
    """dy, ds (or None), x, r (or None): [M, N] views; w: [N] or None; mean, rstd: [M];
    dx: [M, N] contiguous; dw, db: [N] outputs or None when not needed."""
    from torch.library import wrap_triton

    M, N = x.shape
    rows, block, warps = _tile(N)
    P = _num_programs(M, rows, x.device)
    rows_per_prog = triton.cdiv(triton.cdiv(M, P), rows) * rows
    P = triton.cdiv(M, rows_per_prog)
    # The chunked path accumulates in place; the one-tile path writes every partial (NaN-poisoned
    # under FASTNETS_POISON=1, so that a partial it failed to write cannot pass).
    make = torch.zeros if block < N else _dispatch.empty
    dwp = make((P, N), dtype=torch.float32, device=x.device) if dw is not None else None
    dbp = make((P, N), dtype=torch.float32, device=x.device) if db is not None else None
    sdsm, sdsn = ds.stride() if ds is not None else (0, 0)
    srm, srn = r.stride() if r is not None else (0, 0)
    wrap_triton(ln_bwd_kernel)[(P,)](
        dy, ds if ds is not None else dy, x, r if r is not None else x, w if w is not None else x,
        mean, rstd, dx, dwp if dwp is not None else mean, dbp if dbp is not None else mean,
        M, N, rows_per_prog, dy.stride(0), dy.stride(1), sdsm, sdsn, x.stride(0), x.stride(1), srm, srn,
        HAS_DS=ds is not None, HAS_RES=r is not None, HAS_W=w is not None,
        NEED_DW=dw is not None, NEED_DB=db is not None, ROWS=rows, BLOCK_N=block, SINGLE=block >= N,
        num_warps=warps)
    for part, out in ((dwp, dw), (dbp, db)):
        if out is not None:
            bn = min(next_pow2(N), 256 if INTERPRET else 64)  # on a GPU: more programs share the sum
            wrap_triton(column_sum_kernel)[(triton.cdiv(N, bn),)](part, out, P, N, BLOCK_P=32, BLOCK_N=bn)
