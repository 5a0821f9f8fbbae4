// Device queries used by fastnets.backends() and the benchmark harness.
#include "device.h"

namespace fastnets {

int device_count_or_error(std::string* reason) {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    *reason = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return n;
}

std::string device_name(int device) {
  cudaDeviceProp prop;
  FN_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return prop.name;
}

int runtime_version() {
  int v = 0;
  FN_CUDA_CHECK(cudaRuntimeGetVersion(&v));
  return v;
}

void synchronize(std::uintptr_t stream) { FN_CUDA_CHECK(cudaStreamSynchronize(as_stream(stream))); }

}  // namespace fastnets
