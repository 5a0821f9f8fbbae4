// Pooling (CUDA C++): host launchers, bound in csrc/pool_bind.cpp and called by fastnets/ops/pool.py,
// which checks every argument first. Tensors are 4-D [N, C, H, W] (3-D inputs arrive with N = 1):
// a device pointer, 4 sizes and 4 strides in elements. `window` is {kh, kw, sh, sw, ph, pw, dh, dw}
// (kernel, stride, padding, dilation) for fixed windows and is ignored for adaptive ones. Indices
// are int64, flat within the plane (h * W + w), torch's. dtype: common.h DType. stream: cudaStream_t.
#pragma once
#include <cstdint>

#include "common.h"

namespace fastnets {

// out [N, C, OH, OW] = max or average of x [N, C, H, W] over each window (fixed or adaptive), and
// the argmax into `indices` (strides idx_strides) when is_max and indices != 0. Average: divide by
// `divisor` when it is not 0, else by the padded window size (count_include_pad) or the number of
// in-bounds elements; adaptive windows by their area.
void pool2d_forward(std::uintptr_t x, const Shape& x_shape, const Shape& x_strides, std::uintptr_t out,
                    const Shape& out_shape, const Shape& out_strides, std::uintptr_t indices,
                    const Shape& idx_strides, int dtype, bool is_max, bool adaptive, const Shape& window,
                    bool count_include_pad, int64_t divisor, std::uintptr_t stream);

// grad_in [N, C, H, W] (every element written) from grad_out [N, C, OH, OW]: each input element
// gathers, in a fixed order, the gradient of the windows that contain it (max: whose argmax it is;
// average: over that window's divisor). Deterministic, no atomics.
void pool2d_backward(std::uintptr_t grad_out, const Shape& go_shape, const Shape& go_strides,
                     std::uintptr_t indices, const Shape& idx_strides, std::uintptr_t grad_in,
                     const Shape& gi_shape, const Shape& gi_strides, int dtype, bool is_max, bool adaptive,
                     const Shape& window, bool count_include_pad, int64_t divisor, std::uintptr_t stream);

// out [N, C, 1, 1] = max or mean of each (n, c) plane of x [N, C, H, W] (and its argmax when
// indices != 0): one reduction per plane.
void global_pool2d(std::uintptr_t x, const Shape& x_shape, const Shape& x_strides, std::uintptr_t out,
                   const Shape& out_strides, std::uintptr_t indices, const Shape& idx_strides, int dtype,
                   bool is_max, std::uintptr_t stream);

}  // namespace fastnets
