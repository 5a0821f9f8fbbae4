// Activations inside CUDA kernels (codes as fastnets/ops/_activation.py), in float32.
// Comparisons are written so that NaN falls through unchanged, as in torch (relu(NaN) is NaN).
#pragma once
#include <cuda_runtime.h>

namespace fastnets {

enum Activation : int { kActNone = 0, kActRelu = 1, kActRelu6 = 2, kActSilu = 3, kActGelu = 4, kActSigmoid = 5 };

__device__ __forceinline__ float act_fwd(float x, int act) {
  switch (act) {
    case kActRelu: return x < 0.f ? 0.f : x;
    case kActRelu6: return x < 0.f ? 0.f : (x > 6.f ? 6.f : x);
    case kActSilu: return x / (1.f + __expf(-x));
    case kActGelu: return 0.5f * x * (1.f + erff(x * 0.7071067811865476f));
    case kActSigmoid: return 1.f / (1.f + __expf(-x));
    default: return x;
  }
}

// d act(z) / dz * g, with z the pre-activation.
__device__ __forceinline__ float act_bwd(float z, float g, int act) {
  switch (act) {
    case kActRelu: return z <= 0.f ? 0.f : g;  // NaN passes the gradient, as in torch
    case kActRelu6: return (z <= 0.f || z >= 6.f) ? 0.f : g;
    case kActSilu: {
      float s = 1.f / (1.f + __expf(-z));
      return g * s * (1.f + z * (1.f - s));
    }
    case kActGelu: {
      float cdf = 0.5f * (1.f + erff(z * 0.7071067811865476f));
      float pdf = __expf(-0.5f * z * z) * 0.3989422804014327f;
      return g * (cdf + z * pdf);
    }
    case kActSigmoid: {
      float s = 1.f / (1.f + __expf(-z));
      return g * s * (1.f - s);
    }
    default: return g;
  }
}

}  // namespace fastnets
