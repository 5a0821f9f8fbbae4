"""Pooling kernels (Triton): max and average pooling over fixed or adaptive windows, the global (1x1)
pool, and the backward passes, with their launchers. fastnets/ops/pool.py checks the arguments,
allocates the outputs and calls the launchers with 4-D (N, C, H, W) views.

Tiles. Every kernel reads and writes through strides, so every layout runs without a copy. A
program computes a 2-D tile whose rows and columns depend on the layout (_tile):
  - channels_last (channel stride 1): rows are BLOCK_P pixels of the batch, flattened (n, y, x);
    columns are BLOCK_C contiguous channels, so each load of a window element reads BLOCK_C
    channels side by side (vectorized) and a row's index arithmetic serves all its channels;
  - NCHW and other layouts ("planar"): rows are BLOCK_Q (n, c) planes; columns a BLOCK_Y x BLOCK_X
    block of pixels of each plane, x fastest, so lanes run along W. The extents are powers of two:
    splitting a column index into (y, x) is a shift and a mask, not a division. Small planes (7x7)
    pack many planes per program.
(y, x) are output pixels in the forward and input pixels in the backward.

Windows. Fixed windows (max_pool2d, avg_pool2d): rows oh*SH - PH + kh*DH for kh < KH (columns
alike); out-of-range rows are padding. Adaptive windows: rows floor(oh*H/OH) to ceil((oh+1)*H/OH)
- 1, the loop runs over the largest window (KH) with a mask.

Max pooling follows torch's scan exactly: start from -inf with the first in-bounds element of the
window as the argmax, take every element that is larger or NaN in row-major order. So the first
maximum wins ties, a NaN wins over everything, a later NaN over an earlier one, and an all -inf
window gives -inf at its first element. Indices are flat within the plane (h * W + w), int64.

Backward passes are gathers: a program owns a tile of input pixels and sums, in a fixed order, the
gradient of every output window that contains the pixel (max: whose argmax is the pixel; average:
divided by that window's divisor). Every input element is written exactly once: deterministic, no
atomics, no zero-fill pass.

Byte floors (e = bytes per element; X = N*C*H*W input elements, Y = N*C*OH*OW outputs; 8 = int64):
  pool2d forward, max:       X*e read + Y*e written (+ Y*8 with indices)
  pool2d forward, average:   X*e read + Y*e written
  (X counts the elements some window covers: fewer when the stride exceeds the window)
  pool2d backward, max:      Y*(e + 8) read (gradient, indices) + X*e written
  pool2d backward, average:  Y*e read + X*e written
  global pool (1x1 output):  X*e read + N*C*e written (+ N*C*8 with indices)
Overlapping windows (3x3 stride 2) re-read neighbours, which the caches serve: DRAM traffic stays at
the floor when a tile's rows fit in L1/L2.

Vector widths (issue 12, SASS for sm_80/sm_90 as the JIT specializes). Channels_last, the fast path:
a window element is BLOCK_C contiguous channels, loaded and stored by 128-bit instructions when C is
a multiple of 16 (fp16) or the JIT can prove the alignment otherwise. Planar (NCHW) stays scalar,
and is not the fast path: a strided window (3x3 stride 2: the stem, AlexNet) reads every other
element of a row, so no two lanes' elements are adjacent; a stride-1 window's taps are the row
shifted by one element, 2 bytes off any vector boundary; and an odd plane (55x55) starts every
row off alignment. Vectorizing it would need the rows staged through shared memory.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastnets.kernels._common import INTERPRET, autotune, configs, next_pow2

_I32_MAX = 2**31 - 1
_MAX_BLOCK_PIX = 1024  # planar tiles: at most this many pixels of one plane (<= the smallest TILE)

# TILE: elements per program (channels_last: BLOCK_P = TILE // BLOCK_C pixels; planar: BLOCK_Q =
# TILE // (BLOCK_Y * BLOCK_X) planes). One large tile in the interpreter, where the number of
# programs, not the tile size, sets the cost.
_CONFIGS = configs([triton.Config({"TILE": t}, num_warps=w) for t in (1024, 2048, 4096) for w in (4, 8)],
                   triton.Config({"TILE": 4096}, num_warps=4))
_GLOBAL_CONFIGS = configs([triton.Config({}, num_warps=w) for w in (2, 4, 8)], triton.Config({}, num_warps=4))
_KEY = ["C", "H", "W", "OH", "OW", "KH", "KW", "IS_MAX", "ADAPTIVE", "PLANAR", "BLOCK_C", "BLOCK_Y", "BLOCK_X"]


@triton.jit
def _tile(pid, NQ, NP, C, Y, X, PLANAR: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Y: tl.constexpr,
          BLOCK_X: tl.constexpr, TILE: tl.constexpr):
    """Program pid's tile over [N, C, Y, X] (NQ = N * C planes, NP = N * Y * X pixels, passed by the
    launcher so that they are int64 when large): (n, c, y, x, ok), broadcastable 2-D tensors: n, c
    of shape [rows, 1] or [rows, cols], y, x of shape [rows, 1] (channels_last) or [1, cols]
    (planar); ok marks the tile elements inside the tensor."""
    if PLANAR:
        BLOCK_Q: tl.constexpr = TILE // (BLOCK_Y * BLOCK_X)
        n_xb = tl.cdiv(X, BLOCK_X)
        n_yb = tl.cdiv(Y, BLOCK_Y)
        q = (pid // (n_xb * n_yb)) * BLOCK_Q + tl.arange(0, BLOCK_Q)[:, None]  # [BLOCK_Q, 1] planes
        i = tl.arange(0, BLOCK_Y * BLOCK_X)[None, :]  # [1, BLOCK_Y * BLOCK_X]
        y = ((pid // n_xb) % n_yb) * BLOCK_Y + i // BLOCK_X
        x = (pid % n_xb) * BLOCK_X + i % BLOCK_X
        n = q // C
        c = q % C
        ok = (q < NQ) & (y < Y) & (x < X)
    else:
        BLOCK_P: tl.constexpr = TILE // BLOCK_C
        n_pb = tl.cdiv(NP, BLOCK_P)
        p = (pid % n_pb) * BLOCK_P + tl.arange(0, BLOCK_P)[:, None]  # [BLOCK_P, 1] pixels
        c = (pid // n_pb) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]  # [1, BLOCK_C] channels
        x = p % X
        y = (p // X) % Y
        n = p // (X * Y)
        ok = (p < NP) & (c < C)
    return n, c, y, x, ok


@triton.jit
def _avg_divisor(oh, ow, H, W, OH, OW, SH, SW, PH, PW, count_include_pad, divisor,
                 KH: tl.constexpr, KW: tl.constexpr, ADAPTIVE: tl.constexpr):
    """The divisor of the average window of output (oh, ow), and whether the window holds any input
    element (torch writes 0 for one that does not), as torch's avg_pool2d computes them: the padded
    window size (clipped at H + PH, W + PW), or the number of in-bounds elements when
    count_include_pad is 0; divisor_override when not 0; the window's area when ADAPTIVE."""
    if ADAPTIVE:
        h0 = (oh * H) // OH
        h1 = ((oh + 1) * H + OH - 1) // OH
        w0 = (ow * W) // OW
        w1 = ((ow + 1) * W + OW - 1) // OW
        cnt = (h1 - h0) * (w1 - w0)
        nonempty = cnt > 0
    else:
        h0 = oh * SH - PH
        w0 = ow * SW - PW
        h1 = tl.minimum(h0 + KH, H + PH)
        w1 = tl.minimum(w0 + KW, W + PW)
        padded = (h1 - h0) * (w1 - w0)
        hs = tl.maximum(h0, 0)
        ws = tl.maximum(w0, 0)
        he = tl.minimum(h1, H)
        we = tl.minimum(w1, W)
        cnt = tl.where(count_include_pad != 0, padded, (he - hs) * (we - ws))
        nonempty = (he > hs) & (we > ws)
    cnt = tl.where(divisor != 0, divisor, cnt)
    cnt = tl.where(cnt == 0, 1, cnt)  # only lanes outside the tensor or empty windows; never divides
    return cnt.to(tl.float32), nonempty


@triton.jit
def _pool2d_fwd_kernel(
    x_ptr,    # [N, C, H, W] input, any strides
    out_ptr,  # [N, C, OH, OW] output, any strides
    idx_ptr,  # [N, C, OH, OW] int64 argmax h * W + w, strides of out (written when WRITE_INDICES)
    C, H, W, OH, OW,  # sizes
    NQ, NP,  # N * C planes, N * OH * OW output pixels
    sxn, sxc, sxh, sxw,  # input strides (elements)
    son, soc, soh, sow,  # output strides (elements), also those of idx
    SH, SW, PH, PW, DH, DW,  # fixed windows: stride, padding, dilation (unused when ADAPTIVE)
    count_include_pad,  # average over fixed windows: 1 divides by the padded window size
    divisor,  # average: divisor_override, 0 when None
    KH: tl.constexpr, KW: tl.constexpr,  # window extent: kernel size, or the largest adaptive window
    IS_MAX: tl.constexpr,  # max (True) or average (False)
    ADAPTIVE: tl.constexpr,  # adaptive windows (True) or fixed ones (False)
    WRITE_INDICES: tl.constexpr,  # max: also write the argmax
    WIDE: tl.constexpr,  # int64 index arithmetic (an offset or product can pass 2^31)
    PLANAR: tl.constexpr,  # tile layout (see _tile): planes x pixel blocks, else pixels x channels
    BLOCK_C: tl.constexpr,  # channels_last: channels per tile (a power of two)
    BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,  # planar: pixel block of a plane (powers of two)
    TILE: tl.constexpr,  # elements per program
):
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    n, c, oh, ow, ok_tile = _tile(pid, NQ, NP, C, OH, OW, PLANAR, BLOCK_C, BLOCK_Y, BLOCK_X, TILE)
    x_nc = n * sxn + c * sxc

    if ADAPTIVE:
        h0 = (oh * H) // OH
        h1 = ((oh + 1) * H + OH - 1) // OH
        w0 = (ow * W) // OW
        w1 = ((ow + 1) * W + OW - 1) // OW
    else:
        h0 = oh * SH - PH
        w0 = ow * SW - PW

    if IS_MAX:
        if ADAPTIVE:
            hf = h0
            wf = w0
        else:  # the first in-bounds row and column of the dilated window
            hf = h0 + ((tl.maximum(-h0, 0) + DH - 1) // DH) * DH
            wf = w0 + ((tl.maximum(-w0, 0) + DW - 1) // DW) * DW
        best = tl.full(ok_tile.shape, float("-inf"), tl.float32)
        arg = tl.broadcast_to(hf * W + wf, ok_tile.shape)
    else:
        acc = tl.zeros(ok_tile.shape, tl.float32)

    for kh in range(KH):
        if ADAPTIVE:
            h = h0 + kh
            h_ok = h < h1
        else:
            h = h0 + kh * DH
            h_ok = (h >= 0) & (h < H)
        for kw in range(KW):
            if ADAPTIVE:
                w = w0 + kw
                w_ok = w < w1
            else:
                w = w0 + kw * DW
                w_ok = (w >= 0) & (w < W)
            ok = ok_tile & h_ok & w_ok
            v = tl.load(x_ptr + x_nc + h * sxh + w * sxw, mask=ok, other=0.0).to(tl.float32)
            if IS_MAX:
                take = ok & ((v > best) | (v != v))
                best = tl.where(take, v, best)
                arg = tl.where(take, h * W + w, arg)
            else:
                acc += v

    if IS_MAX:
        res = best
    else:
        cnt, nonempty = _avg_divisor(oh, ow, H, W, OH, OW, SH, SW, PH, PW, count_include_pad, divisor,
                                     KH, KW, ADAPTIVE)
        res = tl.where(nonempty, acc / cnt, 0.0)
    o_off = n * son + c * soc + oh * soh + ow * sow
    tl.store(out_ptr + o_off, res.to(out_ptr.dtype.element_ty), mask=ok_tile)
    if WRITE_INDICES:
        tl.store(idx_ptr + o_off, arg.to(tl.int64), mask=ok_tile)


@triton.jit
def _pool2d_bwd_kernel(
    gout_ptr,  # [N, C, OH, OW] gradient of the output, any strides (0 for an expanded gradient)
    idx_ptr,  # [N, C, OH, OW] int64 argmax of the forward (IS_MAX), any strides
    gin_ptr,  # [N, C, H, W] gradient of the input, any strides: written whole
    C, H, W, OH, OW,  # sizes
    NQ, NP,  # N * C planes, N * H * W input pixels
    sgn, sgc, sgh, sgw,  # gradient-of-output strides
    sin, sic, sih, siw,  # index strides
    sxn, sxc, sxh, sxw,  # gradient-of-input strides
    SH, SW, PH, PW, DH, DW,  # fixed windows: stride, padding, dilation
    count_include_pad, divisor,  # average: as in the forward
    KH: tl.constexpr, KW: tl.constexpr,  # fixed windows: kernel size (unused when ADAPTIVE)
    CH: tl.constexpr, CW: tl.constexpr,  # the most windows that contain one input row / column
    IS_MAX: tl.constexpr, ADAPTIVE: tl.constexpr, WIDE: tl.constexpr,
    PLANAR: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
    TILE: tl.constexpr,  # as in the forward, over input pixels
):
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    n, c, h, w, ok_tile = _tile(pid, NQ, NP, C, H, W, PLANAR, BLOCK_C, BLOCK_Y, BLOCK_X, TILE)

    # The output rows [oh0, oh1) and columns [ow0, ow1) whose windows span pixel (h, w).
    if ADAPTIVE:
        oh0 = (h * OH) // H
        oh1 = tl.minimum(((h + 1) * OH + H - 1) // H, OH)
        ow0 = (w * OW) // W
        ow1 = tl.minimum(((w + 1) * OW + W - 1) // W, OW)
    else:
        top = h + PH - (KH - 1) * DH  # a window starting at row `top` or later ends at or after h
        left = w + PW - (KW - 1) * DW
        oh0 = tl.where(top > 0, (tl.maximum(top, 0) + SH - 1) // SH, 0)
        ow0 = tl.where(left > 0, (tl.maximum(left, 0) + SW - 1) // SW, 0)
        oh1 = tl.minimum((h + PH) // SH + 1, OH)
        ow1 = tl.minimum((w + PW) // SW + 1, OW)

    g_nc = n * sgn + c * sgc
    i_nc = n * sin + c * sic
    target = h * W + w
    acc = tl.zeros(ok_tile.shape, tl.float32)
    for i in range(CH):
        oh = oh0 + i
        for j in range(CW):
            ow = ow0 + j
            ok = ok_tile & (oh < oh1) & (ow < ow1)
            g = tl.load(gout_ptr + g_nc + oh * sgh + ow * sgw, mask=ok, other=0.0).to(tl.float32)
            if IS_MAX:
                a = tl.load(idx_ptr + i_nc + oh * sih + ow * siw, mask=ok, other=-1)
                acc += tl.where(a == target, g, 0.0)
            else:
                cnt, nonempty = _avg_divisor(oh, ow, H, W, OH, OW, SH, SW, PH, PW, count_include_pad,
                                             divisor, KH, KW, ADAPTIVE)
                acc += tl.where(ok, g / cnt, 0.0)
    tl.store(gin_ptr + n * sxn + c * sxc + h * sxh + w * sxw, acc.to(gin_ptr.dtype.element_ty), mask=ok_tile)


@triton.jit
def _global_pool_kernel(
    x_ptr,  # [N, C, H, W] input, any strides
    out_ptr,  # [N, C, 1, 1] output: strides son, soc
    idx_ptr,  # [N, C, 1, 1] int64 argmax h * W + w, strides of out (IS_MAX and WRITE_INDICES)
    C, W, R,  # channels, width, R = H * W (the reduction length)
    sxn, sxc, sxh, sxw,  # input strides
    son, soc,  # output strides
    IS_MAX: tl.constexpr, WRITE_INDICES: tl.constexpr,
    FLAT: tl.constexpr,  # sxh == W * sxw: pixel r sits at r * sxw (no division)
    WIDE: tl.constexpr,  # int64 index arithmetic
    BLOCK_R: tl.constexpr,  # pixels per step: a power of two
    BLOCK_C: tl.constexpr,  # (n, c) planes per program, channels of one image: a power of two
):
    """One reduction per (n, c) plane, BLOCK_C planes per program. Channels-last input reads
    BLOCK_C contiguous channels per pixel; NCHW reads BLOCK_R contiguous pixels per plane."""
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    n_cblocks = tl.cdiv(C, BLOCK_C)
    n = pid // n_cblocks
    c = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    c_ok = c < C
    base = n * sxn + c * sxc  # [BLOCK_C]
    if IS_MAX:
        # Per lane (pixels r = lane + k * BLOCK_R, in order) torch's scan; then the lanes combine
        # under the order the scan implies: a NaN beats everything and a later NaN an earlier one;
        # else the larger value, and the earlier index among equal values.
        best = tl.full([BLOCK_R, BLOCK_C], float("-inf"), tl.float32)
        if WIDE:
            arg = tl.zeros([BLOCK_R, BLOCK_C], tl.int64) + R  # R: the lane has seen no element
        else:
            arg = tl.zeros([BLOCK_R, BLOCK_C], tl.int32) + R
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        if WIDE:
            r = r.to(tl.int64)
        if FLAT:
            off = r * sxw
        else:
            off = (r // W) * sxh + (r % W) * sxw
        ok = (r < R)[:, None] & c_ok[None, :]
        v = tl.load(x_ptr + base[None, :] + off[:, None], mask=ok, other=0.0).to(tl.float32)
        if IS_MAX:
            take = ok & ((v > best) | (v != v) | (arg == R))
            best = tl.where(take, v, best)
            arg = tl.where(take, r[:, None], arg)
        else:
            acc += v
    if IS_MAX:
        nan = best != best
        nan_arg = tl.max(tl.where(nan, arg, -1), axis=0)  # [BLOCK_C] the last NaN, or -1
        val = tl.where(nan, float("-inf"), best)
        top = tl.max(val, axis=0)  # [BLOCK_C]
        first = tl.min(tl.where((val == top[None, :]) & (arg < R) & ~nan, arg, R), axis=0)
        has_nan = nan_arg >= 0
        res = tl.where(has_nan, float("nan"), top)
        arg_out = tl.where(has_nan, nan_arg, first)
    else:
        res = tl.sum(acc, axis=0) / R
    o_off = n * son + c * soc
    tl.store(out_ptr + o_off, res.to(out_ptr.dtype.element_ty), mask=c_ok)
    if IS_MAX:
        if WRITE_INDICES:
            tl.store(idx_ptr + o_off, arg_out.to(tl.int64), mask=c_ok)



def _arch_major() -> int:
    if INTERPRET or not torch.cuda.is_available():
        return 0
    return torch.cuda.get_device_capability()[0]


ARCH_MAJOR = _arch_major()  # read at import, as the conv kernels' candidate lists are
# (TILE, warps) that spill registers (LDL/STL in the SASS; issue 12, the audit's first fp16 launch,
# 8x64x56x56 max 3x3/2 planar, Triton 3.6 and 3.9): the backward's TILE=4096 over 4 warps on both
# architectures and Tritons (3-52 LDL/STL); under Triton 3.6, the forward's TILE=1024/4 warps on sm_80
# (2 LDL/STL) and the backward's TILE=1024/8 warps on sm_90 (1). Pruned before the autotuner times them.
FWD_SPILLS = {8: {(1024, 4)}}
BWD_SPILLS = {8: {(4096, 4)}, 9: {(4096, 4), (1024, 8)}}


def _element_size(named_args) -> int | None:
    """The element size of the launch's first tensor argument (the data pooled), or None."""
    for v in named_args.values():
        if isinstance(v, torch.Tensor):
            return v.element_size()
    return None


def _pruner(spills):
    """Drops the (TILE, warps) that spill on this architecture, and the tiles that give a thread
    fewer than 16 bytes of the data (TILE / (32 * warps) elements: 4 halves over 8 warps): their
    loads cannot be 128-bit (the SASS audit's sm_80 first fp16 candidate once (1024, 4) is pruned)."""
    def prune(configs, named_args, **kwargs):
        drop = spills.get(ARCH_MAJOR, set())
        esize = _element_size(named_args)
        keep = [c for c in configs if (c.kwargs["TILE"], c.num_warps) not in drop
                and (esize is None or c.kwargs["TILE"] // (32 * c.num_warps) * esize >= 16)]
        return keep or configs
    return {"early_config_prune": prune}


_fwd = autotune(_CONFIGS, key=_KEY, prune_configs_by=_pruner(FWD_SPILLS))(_pool2d_fwd_kernel)
_bwd = autotune(_CONFIGS, key=_KEY, prune_configs_by=_pruner(BWD_SPILLS))(_pool2d_bwd_kernel)
_global = autotune(_GLOBAL_CONFIGS, key=["C", "R", "BLOCK_R", "BLOCK_C", "IS_MAX"])(_global_pool_kernel)


# ------------------------------------------------------------------------------------------------
# Launchers. Tensors are 4-D (N, C, H, W) views; the op has checked every argument.

def _span(t: torch.Tensor) -> int:
    """One past the largest element offset of t."""
    return 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))


def _wide(*tensors: torch.Tensor, extra: int = 0) -> bool:
    return max([_span(t) for t in tensors] + [extra]) > _I32_MAX


def _tiling(t: torch.Tensor, Y: int, X: int) -> dict:
    """The tile layout for pixels [Y, X] of t (the tensor whose layout the writes follow): channels
    side by side when they are contiguous, else planar blocks of at most _MAX_BLOCK_PIX pixels."""
    C = t.shape[1]
    if t.stride(1) == 1 and C > 1:
        return dict(PLANAR=False, BLOCK_C=min(next_pow2(C), 64), BLOCK_Y=1, BLOCK_X=1)
    bx = min(next_pow2(X), 64)
    by = min(next_pow2(Y), _MAX_BLOCK_PIX // bx)
    return dict(PLANAR=True, BLOCK_C=1, BLOCK_Y=by, BLOCK_X=bx)


def _grid(N, C, Y, X, tiling):
    def grid(meta):
        if tiling["PLANAR"]:
            pix = tiling["BLOCK_Y"] * tiling["BLOCK_X"]
            return (triton.cdiv(N * C, meta["TILE"] // pix) * triton.cdiv(Y, tiling["BLOCK_Y"])
                    * triton.cdiv(X, tiling["BLOCK_X"]),)
        bc = tiling["BLOCK_C"]
        return (triton.cdiv(N * Y * X, meta["TILE"] // bc) * triton.cdiv(C, bc),)
    return grid


@functools.lru_cache(maxsize=256)
def adaptive_extent(size: int, out: int) -> int:
    """The largest adaptive window: max over o of ceil((o+1)*size/out) - floor(o*size/out)."""
    return max(((o + 1) * size + out - 1) // out - (o * size) // out for o in range(out))


@functools.lru_cache(maxsize=256)
def adaptive_cover(size: int, out: int) -> int:
    """The most adaptive windows that contain one input index."""
    return max(min(((i + 1) * out + size - 1) // size, out) - (i * out) // size for i in range(size))


def _window_args(adaptive, kernel, stride, padding, dilation, H, W, OH, OW):
    if adaptive:  # int(): sizes may be SymInts under torch.compile (specialized here)
        return (adaptive_extent(int(H), int(OH)), adaptive_extent(int(W), int(OW))), (1, 1, 0, 0, 1, 1)
    return tuple(kernel), (*stride, *padding, *dilation)


def _products(N, C, H, W, OH, OW):
    """The largest intermediate of the kernels' index arithmetic besides tensor offsets."""
    return max(H, OH) * (max(H, OH) + 1) + max(W, OW) * (max(W, OW) + 1) + N * C * max(H * W, OH * OW)


def pool2d_forward(x, out, idx, *, is_max, adaptive, kernel=(1, 1), stride=(1, 1), padding=(0, 0),
                   dilation=(1, 1), count_include_pad=True, divisor=0):
    """Max or average pooling of x [N, C, H, W] into out [N, C, OH, OW] (and the argmax into idx,
    same strides as out, when it is not None)."""
    N, C, H, W = x.shape
    OH, OW = out.shape[2:]
    (KH, KW), geom = _window_args(adaptive, kernel, stride, padding, dilation, H, W, OH, OW)
    tiling = _tiling(out, OH, OW)
    wrap_triton(_fwd)[_grid(N, C, OH, OW, tiling)](
        x, out, idx if idx is not None else out, C, H, W, OH, OW, N * C, N * OH * OW,
        *x.stride(), *out.stride(), *geom, int(count_include_pad), int(divisor),
        KH=KH, KW=KW, IS_MAX=is_max, ADAPTIVE=adaptive, WRITE_INDICES=idx is not None,
        WIDE=_wide(x, out, extra=_products(N, C, H, W, OH, OW)), **tiling)


def pool2d_backward(grad_out, idx, grad_in, *, is_max, adaptive, kernel=(1, 1), stride=(1, 1),
                    padding=(0, 0), dilation=(1, 1), count_include_pad=True, divisor=0):
    """grad_in [N, C, H, W] from grad_out [N, C, OH, OW] (and idx, the forward's argmax, for max)."""
    N, C, H, W = grad_in.shape
    OH, OW = grad_out.shape[2:]
    (KH, KW), geom = _window_args(adaptive, kernel, stride, padding, dilation, H, W, OH, OW)
    if adaptive:
        CH, CW = adaptive_cover(int(H), int(OH)), adaptive_cover(int(W), int(OW))
    else:  # the windows spanning one row: those starting in the (KH-1)*DH rows above it, every SH
        CH = ((KH - 1) * dilation[0]) // stride[0] + 1
        CW = ((KW - 1) * dilation[1]) // stride[1] + 1
    tiling = _tiling(grad_in, H, W)
    tensors = (grad_out, grad_in) + ((idx,) if is_max else ())
    idx = idx if is_max else grad_out
    wrap_triton(_bwd)[_grid(N, C, H, W, tiling)](
        grad_out, idx, grad_in, C, H, W, OH, OW, N * C, N * H * W,
        *grad_out.stride(), *idx.stride(), *grad_in.stride(), *geom, int(count_include_pad), int(divisor),
        KH=KH, KW=KW, CH=CH, CW=CW, IS_MAX=is_max, ADAPTIVE=adaptive,
        WIDE=_wide(*tensors, extra=_products(N, C, H, W, OH, OW)), **tiling)


def global_pool2d(x, out, idx, *, is_max):
    """Global max or average pool of x [N, C, H, W] into out [N, C, 1, 1] (idx: argmax or None)."""
    N, C, H, W = x.shape
    R = H * W
    sxn, sxc, sxh, sxw = x.stride()
    if sxc == 1 and C > 1:  # channels contiguous: BLOCK_C channels per load, BLOCK_R pixels per step
        block_c = min(next_pow2(C), 128)
        block_r = min(next_pow2(R), max(1, 2048 // block_c))
    else:  # NCHW: BLOCK_R contiguous pixels of BLOCK_C planes per step
        block_r = min(next_pow2(R), 1024)
        block_c = min(next_pow2(C), max(1, 2048 // block_r))
    wide = _wide(x, out, extra=R + N * C)
    grid = (N * triton.cdiv(C, block_c),)
    wrap_triton(_global)[grid](
        x, out, idx if idx is not None else out, C, W, R, sxn, sxc, sxh, sxw, out.stride(0), out.stride(1),
        IS_MAX=is_max, WRITE_INDICES=idx is not None, FLAT=(H == 1 or sxh == W * sxw), WIDE=wide,
        BLOCK_R=block_r, BLOCK_C=block_c)
