// Batch-norm + residual + activation (CUDA C++): host launchers, bound in csrc/norm_act_bind.cpp
// and called by fastnets/ops/norm_act.py, which checks every argument first. Every tensor is seen
// as [N, C, S] (dims = {N, C, S}) with its own 3 strides {sn, sc, ss} in elements. x, r, y, dy, dx
// and dr share the dtype code `dtype`; every per-channel vector (mean, var, w, b, the partials, the
// sums) is float32 [C] contiguous, and a pointer of 0 marks an absent one where allowed.
// channels_inner: x's channels are closer in memory than its positions (channels_last), which
// decides how threads map to elements.
#pragma once
#include <cstdint>

#include "common.h"

namespace fastnets {

// Training statistics. Without bmean (0): partials of (mean, M2) per channel over P contiguous
// ranges of rows_per rows (r = n * S + s) into pmean, pm2 ([P, C]), then merged in a fixed order
// (Chan's formula) into mean, var (batch mean, biased variance). With bmean/bvar: copied to mean,
// var. Then, when rmean is not 0, rmean/rvar (float32 [C]) are updated in place:
// r = (1 - momentum) * r + momentum * batch, the variance multiplied by unbias = n / (n - 1).
void norm_act_stats(std::uintptr_t x, const Shape& dims, const Shape& sx, bool channels_inner, std::uintptr_t pmean,
                    std::uintptr_t pm2, int64_t P, int64_t rows_per, std::uintptr_t bmean, std::uintptr_t bvar,
                    std::uintptr_t mean, std::uintptr_t var, std::uintptr_t rmean, std::uintptr_t rvar,
                    double momentum, double unbias, int dtype, std::uintptr_t stream);

// y = act((x - mean) / sqrt(var + eps) * w + b + r), one pass; r, w, b may be 0.
void norm_act_forward(std::uintptr_t x, std::uintptr_t r, std::uintptr_t y, const Shape& dims, const Shape& sx,
                      const Shape& sr, const Shape& sy, std::uintptr_t mean, std::uintptr_t var, std::uintptr_t w,
                      std::uintptr_t b, double eps, int act, bool channels_inner, int dtype, std::uintptr_t stream);

// dz = act'(z) * dy with z recomputed from x (and r). When sum_dz is not 0: per-channel sums of dz
// and dz * xhat over P row ranges into psum_dz, psum_dzx ([P, C]), then summed in a fixed order
// into sum_dz, sum_dzx (the bias and weight gradients). Then, when dx or dr is not 0, one
// elementwise pass: dr = dz, dx = invstd * w * (dz - mean(dz) - xhat * mean(dz * xhat)) (train)
// or invstd * w * dz (eval; sum_dz may then be 0).
void norm_act_backward(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t r, std::uintptr_t dx, std::uintptr_t dr,
                       const Shape& dims, const Shape& sdy, const Shape& sx, const Shape& sr, const Shape& sdx,
                       const Shape& sdr, std::uintptr_t mean, std::uintptr_t var, std::uintptr_t w, std::uintptr_t b,
                       std::uintptr_t psum_dz, std::uintptr_t psum_dzx, int64_t P, int64_t rows_per,
                       std::uintptr_t sum_dz, std::uintptr_t sum_dzx, double eps, int act, bool train,
                       bool channels_inner, int dtype, std::uintptr_t stream);

}  // namespace fastnets
