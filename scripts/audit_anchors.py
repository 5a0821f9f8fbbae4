"""Anchor kernels of the SASS audit: what a well-formed Triton GEMM main loop compiles to.

Written here for the audit (not copied from Triton's tutorials, which cannot be fetched in CI): two
small kernels in the tutorials' style, so the table shows, under the same Triton and the same
compile path, what the fastnets kernels should look like:

- `anchor_matmul`: C = A @ B with a blocked K loop, fp16 operands, fp32 accumulation, row-major
  A [M, K] and B [K, N] read through pointer blocks advanced along K (as Triton's matmul tutorial);
- `anchor_attention`: a minimal flash-attention forward (one query block per program, a loop over
  key/value blocks, online softmax, two tl.dot per iteration), contiguous [B*H, L, D] tensors;
- `anchor_scale`: an elementwise bandwidth kernel (y = alpha * x over contiguous blocks).

`mutants()` gives deliberately degraded launches of the same kernels (misaligned, strided): the
audit must reject them (tests/test_sass_audit.py).

`launches(quick)` gives (kernel, grid, args, kwargs) with CPU tensors of real sizes; the audit
specializes them through Triton's own JIT exactly like the fastnets launches.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def anchor_matmul(a_ptr, b_ptr, c_ptr,  # A [M, K], B [K, N], C [M, N], row-major
                  M, N, K, stride_am, stride_bk, stride_cm,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    row0 = (pid // n_tiles_n) * BLOCK_M
    col0 = (pid % n_tiles_n) * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_blk = a_ptr + (rows % M)[:, None] * stride_am + ks[None, :]
    b_blk = b_ptr + ks[:, None] * stride_bk + (cols % N)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_blk, mask=ks[None, :] < K - k0, other=0.0)
        b = tl.load(b_blk, mask=ks[:, None] < K - k0, other=0.0)
        acc = tl.dot(a, b, acc)
        a_blk += BLOCK_K
        b_blk += BLOCK_K * stride_bk
    c_blk = c_ptr + rows[:, None] * stride_cm + cols[None, :]
    tl.store(c_blk, acc.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def anchor_attention(q_ptr, k_ptr, v_ptr, o_ptr,  # [B*H, L, D] contiguous each
                     L, scale,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    q_blk = tl.program_id(0)
    bh = tl.program_id(1)
    base = bh.to(tl.int64) * L * D
    rows = q_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    q = tl.load(q_ptr + base + rows[:, None] * D + dims[None, :], mask=rows[:, None] < L, other=0.0)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    qk_scale = scale * 1.4426950408889634
    for n0 in range(0, L, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        kt = tl.load(k_ptr + base + keys[None, :] * D + dims[:, None], mask=keys[None, :] < L, other=0.0)
        s = tl.dot(q, kt) * qk_scale
        s = tl.where(keys[None, :] < L, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        corr = tl.math.exp2(m - m_new)
        s_sum = s_sum * corr + tl.sum(p, 1)
        v = tl.load(v_ptr + base + keys[:, None] * D + dims[None, :], mask=keys[:, None] < L, other=0.0)
        acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = acc / s_sum[:, None]
    tl.store(o_ptr + base + rows[:, None] * D + dims[None, :], out.to(o_ptr.dtype.element_ty), mask=rows[:, None] < L)


@triton.jit
def anchor_scale(x_ptr, y_ptr, n, stride, alpha,  # y[i] = alpha * x[i * stride], i < n (fp16)
                 BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs * stride, mask=offs < n)
    tl.store(y_ptr + offs, (x.to(tl.float32) * alpha).to(y_ptr.dtype.element_ty), mask=offs < n)


def mutants():
    """Deliberately degraded launches of the anchors, which the audit must reject: the matmul with
    K and the row strides odd (no 16-byte alignment: operand loads cannot be 128-bit), the scale
    kernel reading every third element (no contiguous run to vectorize)."""
    import torch

    f16 = torch.float16
    M = N = 4096
    K = 4093
    a, b, c = (torch.empty(M, K, dtype=f16), torch.empty(K, N + 3, dtype=f16), torch.empty(M, N, dtype=f16))
    x, y = torch.empty(3 * 2**20, dtype=f16), torch.empty(2**20, dtype=f16)
    return [("mutant matmul fp16 odd K 128x128x32 w4 s4", anchor_matmul, (triton.cdiv(M, 128) * triton.cdiv(N, 128),),
             (a, b, c, M, N, K, a.stride(0), b.stride(0), c.stride(0)),
             dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=4)),
            ("mutant scale fp16 stride 3", anchor_scale, (triton.cdiv(y.numel(), 1024),),
             (x, y, y.numel(), 3, 2.0), dict(BLOCK=1024, num_warps=4))]


def launches():
    """[(name, kernel, grid, args, kwargs)]: fp16, the tutorials' usual tiles, 4 and 8 warps."""
    import torch

    f16 = torch.float16
    M = N = K = 4096
    a, b, c = (torch.empty(M, K, dtype=f16), torch.empty(K, N, dtype=f16), torch.empty(M, N, dtype=f16))
    out = []
    for bm, bn, bk, w, s in ((128, 128, 32, 4, 4), (128, 256, 64, 8, 3)):
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        out.append((f"anchor matmul fp16 {bm}x{bn}x{bk} w{w} s{s}", anchor_matmul, grid,
                    (a, b, c, M, N, K, a.stride(0), b.stride(0), c.stride(0)),
                    dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s)))
    x, y = torch.empty(2**20, dtype=f16), torch.empty(2**20, dtype=f16)
    out.append(("anchor scale fp16 contiguous", anchor_scale, (triton.cdiv(y.numel(), 1024),),
                (x, y, y.numel(), 1, 2.0), dict(BLOCK=1024, num_warps=4)))
    BH, L, D = 32 * 12, 1024, 64
    q, k, v, o = (torch.empty(BH, L, D, dtype=f16) for _ in range(4))
    for bm, bn, w, s in ((128, 64, 4, 3),):
        out.append((f"anchor attention fp16 D{D} {bm}x{bn} w{w} s{s}", anchor_attention, (triton.cdiv(L, bm), BH),
                    (q, k, v, o, L, 0.125), dict(D=D, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)))
    return out
