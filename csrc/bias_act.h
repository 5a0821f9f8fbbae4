// Bias + activation over an [M, F] view (CUDA C++): host launchers, bound in csrc/bias_act_bind.cpp
// and called by fastnets/ops/bias_act.py, which checks every argument. Strides are [row, column]
// in elements; activation codes as csrc/activation.h.
#pragma once
#include <cstdint>

#include "common.h"

namespace fastnets {

// y = act(x + b) ([M, F] contiguous); b [F] (dtype bdtype: x's or float32) when has_bias.
void bias_act_forward(std::uintptr_t x, std::uintptr_t b, std::uintptr_t y, int64_t M, int64_t F, const Shape& sx,
                      bool has_bias, int act, int dtype, int bdtype, std::uintptr_t stream);

// dx = act'(x + b) * dy ([M, F] contiguous); db = column sums of dx (when db is not 0), two-level
// and deterministic.
void bias_act_backward(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t b, std::uintptr_t dx, std::uintptr_t db,
                       int64_t M, int64_t F, const Shape& sdy, const Shape& sx, bool has_bias, int act, int dtype,
                       int bdtype, std::uintptr_t stream);

}  // namespace fastnets
