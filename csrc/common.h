// Shared helpers for the fastnets CUDA kernels. No torch header: tensors cross the pybind11
// boundary as raw device pointers (uintptr_t), sizes and strides (int64, in elements), a dtype
// code and the CUDA stream (uintptr_t). Python (fastnets/_ext.py) checks every argument first.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastnets {

// Dtype codes, kept equal to fastnets/_ext.py DTYPE_CODES.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Throws a std::runtime_error (a RuntimeError in Python) naming the CUDA call that failed.
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastnets._C: ") + what + " failed: " +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }
}
#define FN_CUDA_CHECK(call) ::fastnets::check_cuda((call), #call)
// After a kernel launch: reports a bad configuration (grid, shared memory) with the kernel's name.
#define FN_LAUNCH_CHECK(kernel_name) ::fastnets::check_cuda(cudaGetLastError(), "launch of " kernel_name)

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
template <class T>
inline T* as_ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

inline void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("fastnets._C: " + msg);
}

// Loads and stores through float, the accumulation type of every kernel.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Calls f(T{}) with T the element type named by the dtype code.
template <class F>
inline void dispatch_float(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kFloat16: f(__half{}); break;
    case kBFloat16: f(__nv_bfloat16{}); break;
    default: throw std::invalid_argument("fastnets._C: unsupported dtype code " + std::to_string(dtype));
  }
}

// Grid sizes: y and z are limited to 65535; x to 2^31-1. Kernels that need more blocks loop.
inline unsigned int grid_x(int64_t blocks) {
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > 2147483647LL ? 2147483647LL : blocks));
}
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

using Shape = std::vector<int64_t>;

}  // namespace fastnets
