"""Bias + activation over a [M, F] view (y = act(x + b), b broadcast over rows): Triton kernels and
launchers. Activations are the shared ones (fastnets/kernels/_activation.py, codes as
fastnets/ops/_activation.py), computed in float32.

Forward: one pass (read x, write y). Backward: one pass reads dy and x, recomputes z = x + b,
writes dx = act'(z) * dy and, per program, the partial column sums of dx over its rows ([P, F]
float32); a second small kernel sums the P partials per column in a fixed order: grad_bias, without
atomics, the same on every run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastnets import _dispatch
from fastnets.kernels._activation import act_bwd, act_fwd
from fastnets.kernels._common import INTERPRET, next_pow2


@triton.jit
def bias_act_fwd_kernel(
    x_ptr,  # input [M, F], strides (sxm, sxf); fp32/fp16/bf16
    b_ptr,  # bias [F] contiguous, x's dtype or float32 (unused without HAS_BIAS)
    y_ptr,  # output [M, F] contiguous, x's dtype
    M, F, sxm, sxf, n_fblocks,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
):
    pid = tl.program_id(0)  # over cdiv(M, BLOCK_M) * n_fblocks tiles, column blocks fastest
    rows = (pid // n_fblocks) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = (pid % n_fblocks) * BLOCK_F + tl.arange(0, BLOCK_F)[None, :]
    mask = (rows < M) & (cols < F)
    z = tl.load(x_ptr + rows.to(tl.int64) * sxm + cols.to(tl.int64) * sxf, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=cols < F, other=0.0).to(tl.float32)
    y = act_fwd(z, ACT)
    tl.store(y_ptr + rows.to(tl.int64) * F + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bias_act_bwd_kernel(
    dy_ptr,  # grad of the output [M, F], strides (sdym, sdyf)
    x_ptr,  # forward input [M, F], strides (sxm, sxf)
    b_ptr,  # bias [F] (unused without HAS_BIAS)
    dx_ptr,  # grad of the input [M, F] contiguous, x's dtype
    dbp_ptr,  # partial grad of the bias [P, F] float32, row pid_m (only with NEED_DB)
    M, F, rows_per_prog,  # program (pid_f, pid_m) takes rows [pid_m * rows_per_prog, + rows_per_prog)
    sdym, sdyf, sxm, sxf,
    HAS_BIAS: tl.constexpr, NEED_DB: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
):
    # grid: (column blocks, P): the column blocks on axis 0, which has no 65535 limit (F can pass
    # 65535 * BLOCK_F); P <= 65535 on axis 1.
    pid_m = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)[None, :]
    col_ok = cols < F
    row_end = tl.minimum((pid_m + 1) * rows_per_prog, M)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for r0 in range(pid_m * rows_per_prog, row_end, BLOCK_M):
        rows = (r0 + tl.arange(0, BLOCK_M))[:, None].to(tl.int64)
        mask = (rows < row_end) & col_ok
        z = tl.load(x_ptr + rows * sxm + cols.to(tl.int64) * sxf, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += b
        dy = tl.load(dy_ptr + rows * sdym + cols.to(tl.int64) * sdyf, mask=mask, other=0.0).to(tl.float32)
        dz = tl.where(mask, act_bwd(z, dy, ACT), 0.0)
        tl.store(dx_ptr + rows * F + cols, dz.to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DB:
            acc += tl.sum(dz, axis=0)
    if NEED_DB:
        c = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
        tl.store(dbp_ptr + pid_m.to(tl.int64) * F + c, acc, mask=c < F)


@triton.jit
def column_sum_kernel(
    p_ptr,  # partial sums [P, F] float32, contiguous
    out_ptr,  # [F], the bias's dtype
    P, F,
    BLOCK_P: tl.constexpr, BLOCK_F: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    acc = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):  # a fixed order: the result does not depend on scheduling
        rows = p0 + tl.arange(0, BLOCK_P)[:, None]
        m = (rows < P) & (cols[None, :] < F)
        acc += tl.sum(tl.load(p_ptr + rows.to(tl.int64) * F + cols[None, :], mask=m, other=0.0), axis=0)
    tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < F)


def _tile(F: int) -> tuple[int, int]:
    bf = min(next_pow2(F), 256 if INTERPRET else 128)
    bm = max(1, (8192 if INTERPRET else 2048) // bf)
    return bm, bf


def bias_act_forward(x, b, y, act: int):
    """x: [M, F] view; b: [F] or None; y: [M, F] contiguous output; act: activation code."""
    from torch.library import wrap_triton

    M, F = x.shape
    bm, bf = _tile(F)
    nfb = triton.cdiv(F, bf)
    if triton.cdiv(M, bm) * nfb >= 2**31:
        raise ValueError(f"bias_act: the input is too large for one launch ({M} x {F})")
    wrap_triton(bias_act_fwd_kernel)[(triton.cdiv(M, bm) * nfb,)](
        x, b if b is not None else x, y, M, F, x.stride(0), x.stride(1), nfb,
        HAS_BIAS=b is not None, ACT=act, BLOCK_M=bm, BLOCK_F=bf, num_warps=4)


def bias_act_backward(dy, x, b, dx, db, act: int):
    """dy, x: [M, F] views; b: [F] or None; dx: [M, F] contiguous; db: [F] output or None."""
    from torch.library import wrap_triton

    M, F = x.shape
    bm, bf = _tile(F)
    bm = min(bm, 64)
    nfb = triton.cdiv(F, bf)
    if INTERPRET:
        target = 3  # a few partials, so that the second-level sum is exercised
    else:  # enough programs to fill the GPU with the column blocks
        target = max(1, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count // nfb)
    rows_per_prog = triton.cdiv(triton.cdiv(M, min(target, triton.cdiv(M, bm))), bm) * bm
    P = triton.cdiv(M, rows_per_prog)
    if P > 65535:  # grid axis 1 (and the partial buffer) stays within 65535 rows
        rows_per_prog = triton.cdiv(triton.cdiv(M, 65535), bm) * bm
        P = triton.cdiv(M, rows_per_prog)
    dbp = _dispatch.empty((P, F), dtype=torch.float32, device=x.device) if db is not None else None
    wrap_triton(bias_act_bwd_kernel)[(nfb, P)](
        dy, x, b if b is not None else x, dx, dbp if dbp is not None else dx, M, F, rows_per_prog,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
        HAS_BIAS=b is not None, NEED_DB=db is not None, ACT=act, BLOCK_M=bm, BLOCK_F=bf, num_warps=4)
    if db is not None:
        bn = min(next_pow2(F), 256 if INTERPRET else 64)  # on a GPU: more programs share the sum
        wrap_triton(column_sum_kernel)[(triton.cdiv(F, bn),)](dbp, db, P, F, BLOCK_P=32, BLOCK_F=bn)
