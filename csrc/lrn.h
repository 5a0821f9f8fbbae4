// Local response normalization (CUDA C++): host launchers, bound in csrc/lrn_bind.cpp and called by
// fastnets/ops/lrn.py. Tensors are seen as [N, C, S0, S1, S2] (the op merges trailing dims where
// the strides allow); dims, strides are 5 int64 each, in elements; the op checks every argument.
#pragma once
#include <cstdint>

#include "common.h"

namespace fastnets {

// y = x / (k + alpha/size * sum_{window} x^2)^beta, the window [c - size/2, c + (size-1)/2].
void lrn_forward(std::uintptr_t x, std::uintptr_t y, const Shape& dims, const Shape& sx, const Shape& sy,
                 int64_t size, double alpha, double beta, double k, int dtype, std::uintptr_t stream);

// dx = g / d^beta - (2 alpha beta / size) * x * sum_{i in T(c)} g[i] x[i] / (d[i]^beta d[i]),
// T(c) = [c - (size-1)/2, c + size/2], the channels whose window contains c.
void lrn_backward(std::uintptr_t g, std::uintptr_t x, std::uintptr_t dx, const Shape& dims, const Shape& sg,
                  const Shape& sx, const Shape& sdx, int64_t size, double alpha, double beta, double k,
                  int dtype, std::uintptr_t stream);

}  // namespace fastnets
