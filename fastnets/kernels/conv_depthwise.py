"""Triton direct kernel of the depthwise convolution (groups == C_in, one input channel per group;
C_out = C_in * multiplier), with the same fused epilogues as the implicit GEMM of kernels/conv.py.

Each program computes a [BLOCK_P output pixels, BLOCK_C channels] tile: output channel c reads
input channel c // MULT only, KH*KW taps, multiply-adds in float32 (no GEMM with mostly zeros).
Vectorized over channels, which are contiguous in channels_last (NHWC) tensors, the fast path;
any strides are read.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastnets.kernels import _common
from fastnets.kernels.conv import conv_epilogue, out_vec

# Pixels per tile of the training (statistics) launches: fixed so that the host knows how many
# rows of partial statistics to allocate.
STATS_BLOCK_P = 32 if _common.INTERPRET else 64


def _configs(block_p: int | None = None):
    gpu = [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w)
           for p, c, w in ((64, 64, 4), (32, 128, 4), (128, 32, 4), (64, 128, 8), (16, 64, 2))
           if block_p is None or p == block_p]
    return _common.configs(gpu, triton.Config({"BLOCK_P": block_p or 32, "BLOCK_C": 16}))


@triton.jit
def _conv_depthwise(
    x_ptr,      # input [N, C_in, H, W], strides (sxn, sxc, sxh, sxw), fp32/fp16/bf16
    w_ptr,      # weight [C_out, 1, KH, KW], strides (swo, swh, sww), input dtype (the launcher passes it
                # as [KH, KW, C_out] contiguous when the input's channels are: swo == 1)
    b_ptr,      # bias [C_out] (float32 or input dtype); read when HAS_BIAS
    r_ptr,      # residual [N, C_out, OH, OW], strides (srn, src, srh, srw); read when HAS_RES
    y_ptr,      # output [N, C_out, OH, OW], strides (syn, syc, syh, syw), input dtype
    z_ptr,      # pre-activation, y's shape and strides; written when SAVE_Z
    pmean_ptr,  # [cdiv(M, BLOCK_P), C_out] float32: per-tile channel mean; written when STATS
    pm2_ptr,    # [cdiv(M, BLOCK_P), C_out] float32: per-tile M2
    H, W, OH, OW, C_out,
    sxn, sxc, sxh, sxw, swo, swh, sww, srn, src, srh, srw, syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    M,          # N * OH * OW
    MULT,       # output channels per input channel (C_out // C_in)
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SAVE_Z: tl.constexpr, STATS: tl.constexpr,
    ACT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    VEC: tl.constexpr,      # x's and w's channel runs are VEC-element (16-byte) aligned (sxc == swo == MULT == 1,
                            # C_out and the other x and w strides multiples of VEC), else 1: see _vec()
    OUT_VEC: tl.constexpr,  # the same for y, z and the residual (conv_epilogue)
):
    C_out = _common.aligned(C_out, VEC)
    sxn = _common.aligned(sxn, VEC)
    sxh = _common.aligned(sxh, VEC)
    sxw = _common.aligned(sxw, VEC)
    swh = _common.aligned(swh, VEC)
    sww = _common.aligned(sww, VEC)
    pid_p = tl.program_id(0)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P] output pixels (n, oh, ow)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C] output channels
    p_ok = p < M
    c_ok = c < C_out
    ohw = OH * OW
    n_img = p // ohw
    oh = (p % ohw) // OW
    ow = p % OW
    x_pix = x_ptr + n_img.to(tl.int64) * sxn  # [BLOCK_P] pointers
    x_chan = (c // MULT) * sxc                # [BLOCK_C] offsets of the input channel
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    # kh as a loop, kw unrolled: fully unrolled, the compiler issues all KH*KW taps' vector loads up
    # front and spills them (5x5: 4 KB of stack per thread on sm_90); one row of taps at a time fits.
    for kh in range(KH):
        ih = oh * stride_h - pad_h + kh * dil_h
        for kw in tl.static_range(KW):
            iw = ow * stride_w - pad_w + kw * dil_w
            pix_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xv = tl.load((x_pix + ih * sxh + iw * sxw)[:, None] + x_chan[None, :],
                         mask=pix_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + c * swo + kh * swh + kw * sww, mask=c_ok, other=0.0).to(tl.float32)
            acc += xv * wv[None, :]

    conv_epilogue(acc, p_ok, pid_p, M, c, c_ok, n_img, oh, ow, C_out, b_ptr, r_ptr, y_ptr, z_ptr, pmean_ptr, pm2_ptr,
                  srn, src, srh, srw, syn, syc, syh, syw, BLOCK_P, HAS_BIAS, HAS_RES, SAVE_Z, STATS, ACT, OUT_VEC)


_KEY = ["C_out", "H", "W", "OH", "OW", "stride_h", "stride_w", "KH", "KW", "HAS_RES", "STATS", "sxc", "VEC",
        "OUT_VEC"]
_conv_depthwise_tuned = _common.autotune(_configs(), key=_KEY)(_conv_depthwise)
_conv_depthwise_stats_tuned = _common.autotune(_configs(STATS_BLOCK_P), key=_KEY)(_conv_depthwise)


def _vec(x, w, ws, C_out: int, C_in: int) -> int:
    """VEC for _conv_depthwise: 16 bytes of elements when x's and the [KH, KW, C_out] weight's channel
    runs all start 16-byte aligned (one output channel per input channel), else 1."""
    if x.stride(1) != 1 or ws[0] != 1 or C_out != C_in:
        return 1
    return _common.vec_elems(x.element_size(), (C_out, x.stride(0), x.stride(2), x.stride(3), ws[1], ws[2]), (x, w))


def conv_depthwise(x, w, b, res, y, z, pmean, pm2, stride, padding, dilation, act):
    """As kernels.conv.conv_gemm, for groups == C_in (w: [C_out, 1, KH, KW])."""
    N, C_in, H, W = x.shape
    C_out, _, KH, KW = w.shape
    OH, OW = y.shape[2], y.shape[3]
    M = N * OH * OW
    stats = pmean is not None
    kernel = _conv_depthwise_stats_tuned if stats else _conv_depthwise_tuned
    rs = res.stride() if res is not None else (0, 0, 0, 0)
    if x.stride(1) == 1 and C_out == C_in:
        # Channels contiguous (the NHWC fast path): the weight as [KH, KW, C_out], channels contiguous
        # too, so that a tap's BLOCK_C weights load as vectors (KH*KW*C_out elements copied).
        wt = w.reshape(C_out, KH, KW).permute(1, 2, 0).contiguous()
        w, ws = wt, (1, wt.stride(0), wt.stride(1))
    else:
        ws = (w.stride(0), w.stride(2), w.stride(3))
    vec = _vec(x, w, ws, C_out, C_in)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_P"]), triton.cdiv(C_out, meta["BLOCK_C"]))

    torch.library.wrap_triton(kernel)[grid](
        x, w, b if b is not None else y, res if res is not None else y, y, z if z is not None else y,
        pmean if stats else y, pm2 if stats else y,
        H, W, OH, OW, C_out, *x.stride(), *ws, *rs, *y.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], M, C_out // C_in,
        KH=KH, KW=KW, HAS_BIAS=b is not None, HAS_RES=res is not None, SAVE_Z=z is not None,
        STATS=stats, ACT=act, VEC=vec, OUT_VEC=out_vec(y, res, z, C_out),
    )
