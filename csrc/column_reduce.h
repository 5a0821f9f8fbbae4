// Pieces shared by the kernels that reduce per-program partial rows into a per-column result
// (layer_norm's weight/bias gradients, bias_act's bias gradient), and their launchers.
#pragma once
#include <string>

#include "common.h"

namespace fastnets {
namespace {  // internal linkage: each .cu that includes this gets its own copy of the kernel

// out[j] = sum over p of part[p, j], p in order (deterministic). part [P, N] float32; out [N].
template <class W>
__global__ void column_sum_kernel(const float* __restrict__ part, W* __restrict__ out, int64_t P, int64_t N) {
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < N;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc = 0.f;
    for (int64_t p = 0; p < P; ++p) acc += part[p * N + j];
    out[j] = from_float<W>(acc);
  }
}

// Multiprocessors of the current device.
inline int sm_count() {
  int device = 0, sms = 0;
  FN_CUDA_CHECK(cudaGetDevice(&device));
  FN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// Calls f(T{}, W{}) for the (input, parameter) dtype pair: W is T or float32; `what` names the
// op in the error for any other pair.
template <class F>
void dispatch_pair(int dtype, int wdtype, const char* what, F&& f) {
  dispatch_float(dtype, [&](auto t) {
    using T = decltype(t);
    if (wdtype == dtype) {
      f(t, T{});
    } else if (wdtype == kFloat32) {
      f(t, float{});
    } else {
      throw std::invalid_argument(std::string("fastnets._C: ") + what +
                                  ": the parameters must have the input's dtype or float32");
    }
  });
}

}  // namespace
}  // namespace fastnets
