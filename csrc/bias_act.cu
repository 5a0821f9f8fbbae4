// Bias + activation over an [M, F] view, CUDA C++ (the algorithm of fastnets/kernels/bias_act.py).
//
// Forward: one thread per element in row-major order (y is contiguous), z = x + b and the
// activation in float32. Backward: 32 x 8 thread blocks, threads along x on neighbouring columns;
// a block walks its share of the rows, writes dx = act'(z) * dy and sums dx per column into a
// partial row [P, F] (float32, stream-ordered scratch), summed over P in a fixed order by a second
// kernel: grad_bias without atomics, identical on every run.
// Both kernels have a 128-bit path (V neighbouring columns per thread, csrc/vec.h) taken when the
// columns are contiguous, F and the row strides are multiples of V and the pointers are aligned.
#include <algorithm>

#include "activation.h"
#include "column_reduce.h"
#include "bias_act.h"
#include "vec.h"

namespace fastnets {
namespace {

constexpr int kThreads = 256;
constexpr int kCols = 32, kRows = 8;  // backward block: 32 columns x 8 row lanes

// V = 1: one element per thread, any strides. V = vec_width<T>(): V neighbouring columns per thread
// by 128-bit loads and stores (the launcher checks sxf == 1, F, sxm multiples of V, aligned pointers).
template <class T, class B, int V>
__global__ void __launch_bounds__(kThreads) bias_act_fwd_kernel(
    const T* __restrict__ x, int64_t sxm, int64_t sxf,  // [M, F]
    const B* __restrict__ b,                            // [F] or null
    T* __restrict__ y,                                  // [M, F] contiguous
    int64_t M, int64_t F, int act) {
  const int64_t total = M * F / V;  // vectors
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i * V / F, col = i * V - row * F;
    float z[V];
    if constexpr (V == 1) {
      z[0] = to_float(x[row * sxm + col * sxf]);
    } else {
      load_vec<V>(x + row * sxm + col, z);
    }
    if (b != nullptr) {
      float bv[V];
      if constexpr (V == 1) {
        bv[0] = to_float(b[col]);
      } else {
        load_vec<V>(b + col, bv);
      }
#pragma unroll
      for (int k = 0; k < V; ++k) z[k] += bv[k];
    }
#pragma unroll
    for (int k = 0; k < V; ++k) z[k] = act_fwd(z[k], act);
    if constexpr (V == 1) {
      y[i] = from_float<T>(z[0]);
    } else {
      store_vec<V>(y + i * V, z);
    }
  }
}

// A block covers kCols * V columns (V as in the forward; the vector path needs sdyf == sxf == 1 and
// F, sdym, sxm multiples of V).
template <class T, class B, int V>
__global__ void __launch_bounds__(kCols * kRows) bias_act_bwd_kernel(
    const T* __restrict__ dy, int64_t sdym, int64_t sdyf,  // [M, F]
    const T* __restrict__ x, int64_t sxm, int64_t sxf,     // [M, F]
    const B* __restrict__ b,                               // [F] or null
    T* __restrict__ dx,                                    // [M, F] contiguous
    float* __restrict__ part,                              // [gridDim.y, F] partial column sums, or null
    int64_t M, int64_t F, int64_t rows_per_block, int act) {
  __shared__ float red[kRows][kCols * V];
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kCols + threadIdx.x) * V;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t row_end = std::min<int64_t>(row0 + rows_per_block, M);
  float acc[V];
#pragma unroll
  for (int k = 0; k < V; ++k) acc[k] = 0.f;
  if (col < F) {
    float bias[V];
#pragma unroll
    for (int k = 0; k < V; ++k) bias[k] = 0.f;
    if (b != nullptr) {
      if constexpr (V == 1) {
        bias[0] = to_float(b[col]);
      } else {
        load_vec<V>(b + col, bias);
      }
    }
    for (int64_t row = row0 + threadIdx.y; row < row_end; row += kRows) {
      float z[V], g[V];
      if constexpr (V == 1) {
        z[0] = to_float(x[row * sxm + col * sxf]);
        g[0] = to_float(dy[row * sdym + col * sdyf]);
      } else {
        load_vec<V>(x + row * sxm + col, z);
        load_vec<V>(dy + row * sdym + col, g);
      }
#pragma unroll
      for (int k = 0; k < V; ++k) {
        g[k] = act_bwd(z[k] + bias[k], g[k], act);
        acc[k] += g[k];
      }
      if constexpr (V == 1) {
        dx[row * F + col] = from_float<T>(g[0]);
      } else {
        store_vec<V>(dx + row * F + col, g);
      }
    }
  }
  if (part == nullptr) return;  // uniform across the block
#pragma unroll
  for (int k = 0; k < V; ++k) red[threadIdx.y][threadIdx.x * V + k] = acc[k];
  __syncthreads();
  if (threadIdx.y == 0 && col < F) {
    float sum[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      sum[k] = 0.f;
      for (int i = 0; i < kRows; ++i) sum[k] += red[i][threadIdx.x * V + k];  // a fixed order
    }
    if constexpr (V == 1) {
      part[static_cast<int64_t>(blockIdx.y) * F + col] = sum[0];
    } else {
      store_vec<V>(part + static_cast<int64_t>(blockIdx.y) * F + col, sum);
    }
  }
}


void check(int64_t M, int64_t F, const Shape& sx, int act) {
  require(M >= 1 && F >= 1, "bias_act: M and F must be >= 1 (the op returns early for empty input)");
  require(sx.size() == 2, "bias_act: strides must be [row, column]");
  require(act >= kActNone && act <= kActSigmoid, "bias_act: unknown activation code " + std::to_string(act));
}

}  // namespace

void bias_act_forward(std::uintptr_t x, std::uintptr_t b, std::uintptr_t y, int64_t M, int64_t F, const Shape& sx,
                      bool has_bias, int act, int dtype, int bdtype, std::uintptr_t stream) {
  check(M, F, sx, act);
  dispatch_pair(dtype, bdtype, "bias_act", [&](auto t, auto bt) {
    using T = decltype(t);
    using B = decltype(bt);
    constexpr int V = vec_width<T>();
    const B* bp = has_bias ? as_ptr<const B>(b) : nullptr;
    if (sx[1] == 1 && multiple({F, sx[0]}, V) && aligned({x, has_bias ? b : 0, y})) {
      const int64_t blocks = std::min<int64_t>(ceil_div(M * F / V, kThreads), int64_t{1} << 20);
      bias_act_fwd_kernel<T, B, V><<<grid_x(blocks), kThreads, 0, as_stream(stream)>>>(
          as_ptr<const T>(x), sx[0], sx[1], bp, as_ptr<T>(y), M, F, act);
      FN_LAUNCH_CHECK("bias_act_fwd_kernel (128-bit)");
    } else {
      const int64_t blocks = std::min<int64_t>(ceil_div(M * F, kThreads), int64_t{1} << 20);
      bias_act_fwd_kernel<T, B, 1><<<grid_x(blocks), kThreads, 0, as_stream(stream)>>>(
          as_ptr<const T>(x), sx[0], sx[1], bp, as_ptr<T>(y), M, F, act);
      FN_LAUNCH_CHECK("bias_act_fwd_kernel");
    }
  });
}

void bias_act_backward(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t b, std::uintptr_t dx, std::uintptr_t db,
                       int64_t M, int64_t F, const Shape& sdy, const Shape& sx, bool has_bias, int act, int dtype,
                       int bdtype, std::uintptr_t stream) {
  check(M, F, sx, act);
  require(sdy.size() == 2, "bias_act: strides must be [row, column]");
  require(db == 0 || has_bias, "bias_act: grad of a bias that is absent");
  cudaStream_t st = as_stream(stream);
  // 128-bit path: contiguous columns, F and row strides multiples of V, aligned pointers (the
  // partial rows come from cudaMallocAsync, 256-byte aligned, with F a multiple of V).
  const int V = dtype == kFloat32 ? 4 : 8;
  const bool vec = sx[1] == 1 && sdy[1] == 1 && multiple({F, sx[0], sdy[0]}, V) &&
                   aligned({dy, x, has_bias ? b : 0, dx});
  const int64_t col_blocks = ceil_div(F, kCols * (vec ? V : 1));
  // Row groups: enough blocks to fill the GPU, each at least kRows rows, at most 65535 (grid y).
  int64_t groups = std::max<int64_t>(1, 8LL * sm_count() / col_blocks);
  groups = std::min<int64_t>({groups, ceil_div(M, kRows), 65535});
  const int64_t rows_per_block = ceil_div(M, groups);
  groups = ceil_div(M, rows_per_block);
  require(col_blocks <= 2147483647LL, "bias_act: too many columns");
  float* part = nullptr;
  if (db != 0) FN_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&part), sizeof(float) * groups * F, st));
  try {
    dispatch_pair(dtype, bdtype, "bias_act", [&](auto t, auto bt) {
      using T = decltype(t);
      using B = decltype(bt);
      static_assert(vec_width<T>() == (sizeof(T) == 4 ? 4 : 8), "V above is vec_width<T>()");
      const dim3 grid(static_cast<unsigned int>(col_blocks), static_cast<unsigned int>(groups));
      const B* bp = has_bias ? as_ptr<const B>(b) : nullptr;
      if (vec) {
        bias_act_bwd_kernel<T, B, vec_width<T>()><<<grid, dim3(kCols, kRows), 0, st>>>(
            as_ptr<const T>(dy), sdy[0], sdy[1], as_ptr<const T>(x), sx[0], sx[1], bp, as_ptr<T>(dx), part, M, F,
            rows_per_block, act);
        FN_LAUNCH_CHECK("bias_act_bwd_kernel (128-bit)");
      } else {
        bias_act_bwd_kernel<T, B, 1><<<grid, dim3(kCols, kRows), 0, st>>>(
            as_ptr<const T>(dy), sdy[0], sdy[1], as_ptr<const T>(x), sx[0], sx[1], bp, as_ptr<T>(dx), part, M, F,
            rows_per_block, act);
        FN_LAUNCH_CHECK("bias_act_bwd_kernel");
      }
      if (part != nullptr) {
        const unsigned int cblocks = grid_x(std::min<int64_t>(ceil_div(F, kThreads), 65536));
        column_sum_kernel<B><<<cblocks, kThreads, 0, st>>>(part, as_ptr<B>(db), groups, F);
        FN_LAUNCH_CHECK("column_sum_kernel (bias)");
      }
    });
  } catch (...) {
    if (part != nullptr) cudaFreeAsync(part, st);
    throw;
  }
  if (part != nullptr) FN_CUDA_CHECK(cudaFreeAsync(part, st));
}

}  // namespace fastnets
