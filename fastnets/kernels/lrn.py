"""Local response normalization: Triton kernels (forward and backward) and their launchers.

torch's definition (torch.nn.functional.local_response_norm), for input x of shape (N, C, *):
    d[c]  = k + alpha / size * sum_{j = c - size//2}^{c + (size-1)//2} x[j]^2   (x = 0 outside [0, C))
    y[c]  = x[c] / d[c]^beta
and its gradient, with g = dL/dy and T(c) = {i : c in window(i)} = [c - (size-1)//2, c + size//2]
(the transposed window; asymmetric for even sizes):
    dx[c] = g[c] / d[c]^beta - (2 alpha beta / size) * x[c] * sum_{i in T(c)} g[i] x[i] / (d[i]^beta d[i])

The tensors are seen as [N, C, S0, S1, S2]: the ops merge the trailing dims where the strides of
every tensor allow it (a contiguous NCHW or channels_last tensor has one spatial dim), so the
common layouts need no index division. One program computes a [BLOCK_C, BLOCK_S] tile of outputs
of one image. Each pass reads its inputs once from DRAM: the window's neighbouring channels are
re-read by the same program and come from L1/L2 (the forward reads each element `size` + 1 times
from cache, the backward size * (size + 2) times, since it recomputes d over the transposed window
instead of saving it from the forward).

Vector loads (issue 12). Channels-last (the fast path, channels contiguous): with WHOLE_C a tile
holds every channel of its positions, loaded once (128-bit when the channel runs are 16-byte
aligned), and the window's neighbours come from registers (tl.gather along the channels) instead of
shifted loads that no vector could serve (a run shifted by one channel is 2 bytes off alignment).
NCHW (positions contiguous): the window's neighbours are whole rows S elements apart, each aligned
when S is a multiple of 8 (fp16; 4 for fp32). VEC tells the kernels the strides' alignment beyond
what the JIT's divisibility-16 specialization proves. The sums run in the same order either way, so
the results are identical. (An NCHW plane of odd size, AlexNet's 55x55, starts every channel row 2
bytes off alignment: no vector width fits there; that layout is not the fast path.)
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastnets.kernels._common import INTERPRET, aligned, next_pow2, vec_elems


@triton.jit
def _spatial_offset(s, S1, S2, st0, st1, st2, SPATIAL: tl.constexpr):
    """Element offset of flat spatial indices s (int64) in dims [S0, S1, S2] with strides st*.
    SPATIAL: how many spatial dims are in use (1: [S0]; 2: [S0, S1]; 3: [S0, S1, S2])."""
    if SPATIAL == 1:
        off = s * st0
    elif SPATIAL == 2:
        off = (s // S1) * st0 + (s % S1) * st1
    else:
        t = s // S2
        off = (t // S1) * st0 + (t % S1) * st1 + (s % S2) * st2
    return off


@triton.jit
def _pow(d, beta, neg_factor):
    """d ** beta with C's pow semantics (torch's): 0 ** b = 0 (b > 0) or inf (b < 0), x ** 0 = 1
    even for NaN, and a negative base gives NaN unless beta is an integer, whose parity gives the
    sign: neg_factor is -1 (odd integer beta), 1 (even) or NaN (not an integer)."""
    p = tl.exp2(beta * tl.log2(tl.abs(d)))
    p = tl.where(d < 0, p * neg_factor, p)
    return tl.where(beta == 0, 1.0, p)


@triton.jit
def _window_d(x_ptr, base, c, s_off, mask, C, sxc, size, half_before, alpha_over_size, k):
    """d = k + alpha/size * (sum of x^2 over channels c - half_before .. c - half_before + size - 1)
    for a tile: base [1,1] batch offset, c [BLOCK_C, 1] channels, s_off [1, BLOCK_S] spatial offsets."""
    acc = tl.zeros(mask.shape, dtype=tl.float32)
    for o in range(0, size):
        cc = c + (o - half_before)
        m = mask & (cc >= 0) & (cc < C)
        v = tl.load(x_ptr + base + cc.to(tl.int64) * sxc + s_off, mask=m, other=0.0).to(tl.float32)
        acc += v * v
    return k + alpha_over_size * acc


@triton.jit
def _window_gather(v, c, C, lo, n, BLOCK_C: tl.constexpr):
    """Sum over o < n of v at channel c + lo + o (0 outside [0, C)), from the registers of a tile
    v [BLOCK_C, BLOCK_S] that holds every channel (c [BLOCK_C, 1]); the order of _window_d's sum."""
    acc = tl.zeros(v.shape, dtype=tl.float32)
    for o in range(0, n):
        cc = c + (lo + o)
        idx = tl.minimum(tl.maximum(cc, 0), BLOCK_C - 1) + tl.zeros(v.shape, dtype=tl.int32)
        acc += tl.where((cc >= 0) & (cc < C), tl.gather(v, idx, 0), 0.0)
    return acc


@triton.jit
def lrn_fwd_kernel(
    x_ptr,  # input [N, C, S0, S1, S2] (dims merged by the op), any strides; fp32/fp16/bf16
    y_ptr,  # output [N, C, S0, S1, S2], own strides, x's dtype
    C, S, S1, S2,  # channels; S = S0*S1*S2 spatial positions; S1, S2 split a flat spatial index
    sxn, sxc, sx0, sx1, sx2,  # x strides in elements
    syn, syc, sy0, sy1, sy2,  # y strides in elements
    n_cblocks, n_sblocks,  # cdiv(C, BLOCK_C), cdiv(S, BLOCK_S)
    size, alpha_over_size, beta, k, neg_factor,  # LRN parameters (alpha already divided by size)
    SPATIAL: tl.constexpr,  # spatial dims in use, 1..3
    WHOLE_C: tl.constexpr,  # one channel block holds every channel: the window from registers
    CH_INNER: tl.constexpr,  # VEC applies to the channels (contiguous), else to the positions (SPATIAL == 1)
    VEC: tl.constexpr,  # the contiguous runs are VEC-element (16-byte) aligned: the other strides, and C
                        # (CH_INNER) or S, are multiples of VEC (else 1); see _vec()
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    if CH_INNER:
        C = aligned(C, VEC)
        sx0 = aligned(sx0, VEC)
        sy0 = aligned(sy0, VEC)
    else:
        S = aligned(S, VEC)
        sxc = aligned(sxc, VEC)
        syc = aligned(syc, VEC)
    sxn = aligned(sxn, VEC)
    syn = aligned(syn, VEC)
    pid = tl.program_id(0)  # over N * n_cblocks * n_sblocks tiles, spatial blocks fastest
    sb = pid % n_sblocks
    cb = (pid // n_sblocks) % n_cblocks
    n = (pid // n_sblocks // n_cblocks).to(tl.int64)
    c = (cb * BLOCK_C + tl.arange(0, BLOCK_C))[:, None]  # [BLOCK_C, 1]
    s = (sb * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)[None, :]  # [1, BLOCK_S]
    mask = (c < C) & (s < S)
    sx = _spatial_offset(s, S1, S2, sx0, sx1, sx2, SPATIAL)
    x = tl.load(x_ptr + n * sxn + c.to(tl.int64) * sxc + sx, mask=mask, other=0.0).to(tl.float32)
    if WHOLE_C:
        d = k + alpha_over_size * _window_gather(x * x, c, C, -(size // 2), size, BLOCK_C)
    else:
        d = _window_d(x_ptr, n * sxn, c, sx, mask, C, sxc, size, size // 2, alpha_over_size, k)
    y = x / _pow(d, beta, neg_factor)
    sy = _spatial_offset(s, S1, S2, sy0, sy1, sy2, SPATIAL)
    tl.store(y_ptr + n * syn + c.to(tl.int64) * syc + sy, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def lrn_bwd_kernel(
    g_ptr,  # grad of the output [N, C, S0, S1, S2], any strides (stride 0 from expand is fine)
    x_ptr,  # forward input [N, C, S0, S1, S2], any strides
    dx_ptr,  # grad of the input [N, C, S0, S1, S2], own strides, x's dtype
    C, S, S1, S2,  # as in lrn_fwd_kernel
    sgn, sgc, sg0, sg1, sg2,  # g strides
    sxn, sxc, sx0, sx1, sx2,  # x strides
    syn, syc, sy0, sy1, sy2,  # dx strides
    n_cblocks, n_sblocks,
    size, alpha_over_size, beta, k, neg_factor, coef,  # coef = 2 * alpha * beta / size
    SPATIAL: tl.constexpr, WHOLE_C: tl.constexpr, CH_INNER: tl.constexpr, VEC: tl.constexpr,  # as in the forward
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    if CH_INNER:
        C = aligned(C, VEC)
        sg0 = aligned(sg0, VEC)
        sx0 = aligned(sx0, VEC)
        sy0 = aligned(sy0, VEC)
    else:
        S = aligned(S, VEC)
        sgc = aligned(sgc, VEC)
        sxc = aligned(sxc, VEC)
        syc = aligned(syc, VEC)
    sgn = aligned(sgn, VEC)
    sxn = aligned(sxn, VEC)
    syn = aligned(syn, VEC)
    pid = tl.program_id(0)
    sb = pid % n_sblocks
    cb = (pid // n_sblocks) % n_cblocks
    n = (pid // n_sblocks // n_cblocks).to(tl.int64)
    c = (cb * BLOCK_C + tl.arange(0, BLOCK_C))[:, None]
    s = (sb * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)[None, :]
    mask = (c < C) & (s < S)
    sx = _spatial_offset(s, S1, S2, sx0, sx1, sx2, SPATIAL)
    sg = _spatial_offset(s, S1, S2, sg0, sg1, sg2, SPATIAL)
    xbase = n * sxn
    gbase = n * sgn
    # Over the transposed window: i = c - (size-1)//2 + o. The term for i = c (o == center)
    # also gives this channel's own d^beta, g and x.
    center = (size - 1) // 2
    if WHOLE_C:
        # Every channel in the tile: d, g and x once, the transposed window from registers.
        c64 = c.to(tl.int64)
        x_c = tl.load(x_ptr + xbase + c64 * sxc + sx, mask=mask, other=0.0).to(tl.float32)
        g_c = tl.load(g_ptr + gbase + c64 * sgc + sg, mask=mask, other=0.0).to(tl.float32)
        d_c = k + alpha_over_size * _window_gather(x_c * x_c, c, C, -(size // 2), size, BLOCK_C)
        p_c = _pow(d_c, beta, neg_factor)
        acc = _window_gather(g_c * x_c / (p_c * d_c), c, C, -center, size, BLOCK_C)
    else:
        acc = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
        p_c = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
        g_c = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
        x_c = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
        for o in range(0, size):
            i = c + (o - center)
            m = mask & (i >= 0) & (i < C)
            d_i = _window_d(x_ptr, xbase, i, sx, m, C, sxc, size, size // 2, alpha_over_size, k)
            p_i = _pow(d_i, beta, neg_factor)
            i64 = i.to(tl.int64)
            x_i = tl.load(x_ptr + xbase + i64 * sxc + sx, mask=m, other=0.0).to(tl.float32)
            g_i = tl.load(g_ptr + gbase + i64 * sgc + sg, mask=m, other=0.0).to(tl.float32)
            acc += tl.where(m, g_i * x_i / (p_i * d_i), 0.0)
            is_c = o == center
            p_c = tl.where(is_c, p_i, p_c)
            g_c = tl.where(is_c, g_i, g_c)
            x_c = tl.where(is_c, x_i, x_c)
    # torch's pow backward gives exactly 0 for beta == 0: the second term is then 2 x * 0 (NaN only
    # where x is not finite), even where the window sum is not finite.
    second = tl.where(beta == 0, x_c * 0.0, coef * x_c * acc)
    dx = g_c / p_c - second
    sy = _spatial_offset(s, S1, S2, sy0, sy1, sy2, SPATIAL)
    tl.store(dx_ptr + n * syn + c.to(tl.int64) * syc + sy, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _blocks(C: int, S: int, channels_inner: bool) -> tuple[int, int, int, bool]:
    """(BLOCK_C, BLOCK_S, num_warps, WHOLE_C): the tile runs along the axis that is contiguous in
    memory, 8 elements per thread (one 128-bit access of fp16; two of fp32). In the interpreter a
    program costs Python overhead per operation, so tiles are larger there."""
    budget = 4096 if INTERPRET else 1024
    if channels_inner and next_pow2(C) <= budget:
        # channels_last: every channel of a few positions, so that the window comes from registers.
        bc = next_pow2(C)
        return bc, max(1, min(next_pow2(S), budget // bc)), 4, True
    if channels_inner:  # more than `budget` channels: blocks of 128 with the window re-read from cache
        return 128, max(1, min(next_pow2(S), budget // 128)), 4, False
    # NCHW: rows of 64+ positions (coalesced) in up to 16 channels, so that the window's halo (size - 1
    # rows, re-read by the neighbouring channel block) stays a small fraction
    bc = min(next_pow2(C), 64 if INTERPRET else 16)
    bs = max(1, min(next_pow2(S), max(64, budget // bc)))
    return bc, bs, 4, False


def _vec(tensors, strides, C: int, S: int, spatial: int, channels_inner: bool) -> int:
    """VEC: 16 bytes of elements when every contiguous run (channels when channels_inner, else the
    positions, one spatial dim) starts 16-byte aligned: the other strides, the batch stride and C
    (channels_inner) or S (else) multiples of the vector, every base pointer 16-byte aligned."""
    if spatial != 1:
        return 1
    ints = [C if channels_inner else S]
    for st in strides:
        ints += [st[0], st[2] if channels_inner else st[1]]
    return vec_elems(tensors[0].element_size(), ints, tensors)


def _grid_args(C, S, channels_inner, N, vec):
    bc, bs, warps, whole = _blocks(C, S, channels_inner)
    ncb, nsb = triton.cdiv(C, bc), triton.cdiv(S, bs)
    total = N * ncb * nsb
    if total >= 2**31:
        raise ValueError(f"local_response_norm: the input is too large for one launch ({total} tiles)")
    return (total,), ncb, nsb, dict(BLOCK_C=bc, BLOCK_S=bs, num_warps=warps, WHOLE_C=whole,
                                    CH_INNER=channels_inner, VEC=vec)


def lrn_forward(x, y, dims, sx, sy, spatial, size, alpha, beta, k, neg_factor):
    """x, y: tensors; dims = (N, C, S0, S1, S2) after merging; sx, sy: their 5 strides each;
    spatial: number of spatial dims in use (1..3)."""
    from torch.library import wrap_triton

    N, C, S0, S1, S2 = dims
    S = S0 * S1 * S2
    inner = sx[1] == 1 or S == 1
    vec = _vec((x, y), (sx, sy), C, S, spatial, inner)
    grid, ncb, nsb, meta = _grid_args(C, S, inner, N, vec)
    wrap_triton(lrn_fwd_kernel)[grid](
        x, y, C, S, S1, S2, *sx, *sy, ncb, nsb,
        size, alpha / size, beta, k, neg_factor, SPATIAL=spatial, **meta)


def lrn_backward(g, x, dx, dims, sg, sx, sy, spatial, size, alpha, beta, k, neg_factor):
    """As lrn_forward; g: the output's gradient with strides sg; dx: the input's gradient."""
    from torch.library import wrap_triton

    N, C, S0, S1, S2 = dims
    S = S0 * S1 * S2
    inner = sx[1] == 1 or S == 1
    vec = _vec((g, x, dx), (sg, sx, sy), C, S, spatial, inner)
    grid, ncb, nsb, meta = _grid_args(C, S, inner, N, vec)
    wrap_triton(lrn_bwd_kernel)[grid](
        g, x, dx, C, S, S1, S2, *sg, *sx, *sy, ncb, nsb,
        size, alpha / size, beta, k, neg_factor, 2.0 * alpha * beta / size, SPATIAL=spatial, **meta)
