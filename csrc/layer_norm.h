// Layer normalization over the rows of an [M, N] view (CUDA C++): host launchers, bound in
// csrc/layer_norm_bind.cpp and called by fastnets/ops/layer_norm.py, which checks every argument.
// Strides are [row, column] in elements; a pointer of 0 marks an absent tensor where allowed.
#pragma once
#include <cstdint>

#include "common.h"

namespace fastnets {

// s = x (+ r); y = (s - mean) * rstd * w + b; mean, rstd [M] float32. With store_sum, s is rounded
// to x's dtype, written to s_out ([M, N] contiguous) and normalized as rounded. y is [M, N]
// contiguous. dtype: x, r, y, s; wdtype: w and b (x's dtype or float32).
void layer_norm_forward(std::uintptr_t x, std::uintptr_t r, std::uintptr_t w, std::uintptr_t b, std::uintptr_t y,
                        std::uintptr_t s_out, std::uintptr_t mean, std::uintptr_t rstd, int64_t M, int64_t N,
                        const Shape& sx, const Shape& sr, double eps, bool has_res, bool has_w, bool has_b,
                        bool store_sum, int dtype, int wdtype, std::uintptr_t stream);

// dx = rstd * (wdy - mean(wdy) - xhat * mean(wdy * xhat)) (+ ds), wdy = dy * w; dw = sum dy * xhat,
// db = sum dy over rows (written when their pointer is not 0; two-level, deterministic).
// x is the forward input (plus r when has_res), or add_layer_norm's stored sum.
void layer_norm_backward(std::uintptr_t dy, std::uintptr_t ds, std::uintptr_t x, std::uintptr_t r,
                         std::uintptr_t w, std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t dx,
                         std::uintptr_t dw, std::uintptr_t db, int64_t M, int64_t N, const Shape& sdy,
                         const Shape& sds, const Shape& sx, const Shape& sr, bool has_ds, bool has_res, bool has_w,
                         int dtype, int wdtype, std::uintptr_t stream);

}  // namespace fastnets
