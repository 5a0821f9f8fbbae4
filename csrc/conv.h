// Fused convolution + bias + residual + activation, and the training statistics epilogue
// (fastnets/ops/conv.py calls these through csrc/conv_bind.cpp). No torch header: every tensor is
// a device pointer with its sizes and strides in elements; Python has checked shapes, dtypes and
// devices (all tensors on one CUDA device, x/w/residual/y/z in one dtype, bias float32).
#pragma once
#include "common.h"

namespace fastnets {

// y = act(conv(x, w) + bias + residual), and z = the pre-activation when z != 0 (inference and
// training without batch-norm); or, when pmean != 0 (training with batch-norm), y = conv(x, w) +
// bias and this launch's per-(row tile, channel) mean and M2 in pmean/pm2 ([T, C_out] float32,
// T = ceil(N*OH*OW / conv_stats_tile(depthwise))); act must then be 0 and res 0.
//   x [N, C_in, H, W], w [C_out, C_in/groups, KH, KW], res and y and z [N, C_out, OH, OW] (z has
//   y's strides), bias [C_out] float32 contiguous or 0; stride/padding/dilation: {h, w}.
// groups == C_in with one input channel per group runs the direct depthwise kernel; everything
// else the implicit GEMM (ldmatrix + mma.sync tensor cores for fp16/bf16, FMA tiles for fp32).
void conv_fwd(std::uintptr_t x, const Shape& x_size, const Shape& x_stride, std::uintptr_t w, const Shape& w_size,
              const Shape& w_stride, std::uintptr_t bias, std::uintptr_t res, const Shape& res_stride,
              std::uintptr_t y, const Shape& y_size, const Shape& y_stride, std::uintptr_t z, std::uintptr_t pmean,
              std::uintptr_t pm2, const Shape& stride, const Shape& padding, const Shape& dilation, int64_t groups,
              int act, int dtype, std::uintptr_t stream);

// Rows (output pixels) per tile of the statistics written by conv_fwd.
int64_t conv_stats_tile(bool depthwise);

// Merges the per-tile statistics (Chan's formula) into mean[C] and the biased var[C] (float32).
void conv_stats_finalize(std::uintptr_t pmean, std::uintptr_t pm2, std::uintptr_t mean, std::uintptr_t var,
                         int64_t tiles, int64_t channels, int64_t rows, int64_t tile, std::uintptr_t stream);

// dz = act'(z) * dy over n elements of dense tensors of one dtype and one memory layout.
void conv_act_grad(std::uintptr_t dy, std::uintptr_t z, std::uintptr_t dz, int64_t n, int act, int dtype,
                   std::uintptr_t stream);

}  // namespace fastnets
