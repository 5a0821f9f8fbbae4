// Layer normalization over the rows of an [M, N] view, CUDA C++ (the algorithm of
// fastnets/kernels/layer_norm.py).
//
// A group of G threads handles one row at a time: a warp (G = 32, 8 rows per 256-thread block) for
// rows of up to 1024 elements, the whole block (G = 256) for wider ones. The forward makes three
// sweeps over the row (sum, centred sum of squares, normalize): the first reads DRAM, the others
// hit L1/L2 (a row is at most a few tens of KiB). Statistics in float32, the variance two-pass.
// The backward gives every group its own partial dw/db row ([groups, N] float32, in stream-ordered
// scratch memory), which only that group's threads touch, each always at the same columns; a
// second kernel sums the partial rows per column in a fixed order (deterministic, no atomics).
// Both kernels have a 128-bit path (V = 8 halves or 4 floats per load, csrc/vec.h) for contiguous
// rows with N a multiple of V and aligned pointers; the scalar path reads through the strides.
#include <algorithm>
#include <type_traits>

#include "column_reduce.h"
#include "layer_norm.h"
#include "vec.h"

namespace fastnets {
namespace {

constexpr int kThreads = 256;

// Sum of v over a group of G threads (G = 32: one warp; G = blockDim.x: the whole block, using
// `red`, kThreads / 32 floats of shared memory). Every thread of the group gets the sum.
template <int G>
__device__ __forceinline__ float group_sum(float v, float* red) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if constexpr (G > 32) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // red may still be read from the previous reduction
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = 0.f;
    for (int i = 0; i < G / 32; ++i) v += red[i];  // the same order in every thread
  }
  return v;
}

struct Rows {
  int64_t M, N;
  int64_t sxm, sxn, srm, srn;  // x and residual strides
};

// Loads V neighbouring elements of row `row` from column j: V = 1 through the strides; V > 1 by
// 128-bit loads (the launcher has checked column stride 1, N and the row strides multiples of V, and
// aligned pointers).
template <int V, class T>
__device__ __forceinline__ void load_row(const T* __restrict__ p, int64_t sm, int64_t sn, int64_t row, int64_t j,
                                         float (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = to_float(p[row * sm + j * sn]);
  } else {
    load_vec<V>(p + row * sm + j, out);
  }
}

template <int V, class T>
__device__ __forceinline__ void store_row(T* __restrict__ p, int64_t off, const float (&in)[V]) {
  if constexpr (V == 1) {
    p[off] = from_float<T>(in[0]);
  } else {
    store_vec<V>(p + off, in);
  }
}

template <int V, class T>
__device__ __forceinline__ void load_sum(const T* __restrict__ x, const T* __restrict__ r, const Rows& a,
                                         bool has_res, int64_t row, int64_t j, float (&v)[V]) {
  load_row<V>(x, a.sxm, a.sxn, row, j, v);
  if (has_res) {
    float rv[V];
    load_row<V>(r, a.srm, a.srn, row, j, rv);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] += rv[k];
  }
}

// V = 1: lane j of a group handles columns j, j + G, ...; V = vec_width<T>(): columns
// [j * V, j * V + V), [(j + G) * V, ...) by 128-bit loads and stores.
template <class T, class W, int G, int V>
__global__ void __launch_bounds__(kThreads) ln_fwd_kernel(
    const T* __restrict__ x,  // [M, N], strides (sxm, sxn)
    const T* __restrict__ r,  // residual [M, N], strides (srm, srn), or null
    const W* __restrict__ w,  // weight [N] or null
    const W* __restrict__ b,  // bias [N] or null
    T* __restrict__ y,        // output [M, N] contiguous
    T* __restrict__ s_out,    // sum [M, N] contiguous (store_sum) or null
    float* __restrict__ mean_out, float* __restrict__ rstd_out,  // [M]
    Rows a, float eps, bool has_res, bool store_sum) {
  __shared__ float red[kThreads / 32];
  const int groups = blockDim.x / G;
  const int lane = threadIdx.x % G;
  // Every thread of a group runs the same iterations (G = blockDim.x: the whole block), so the
  // block-wide barriers inside group_sum are reached by all of its threads.
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * groups + threadIdx.x / G; row < a.M;
       row += static_cast<int64_t>(gridDim.x) * groups) {
    float acc = 0.f;
    for (int64_t j = static_cast<int64_t>(lane) * V; j < a.N; j += G * V) {
      float v[V];
      load_sum<V>(x, r, a, has_res, row, j, v);
      if (store_sum) {
#pragma unroll
        for (int k = 0; k < V; ++k) v[k] = to_float(from_float<T>(v[k]));
        store_row<V>(s_out, row * a.N + j, v);
      }
#pragma unroll
      for (int k = 0; k < V; ++k) acc += v[k];
    }
    const float mean = group_sum<G>(acc, red) / static_cast<float>(a.N);
    float acc2 = 0.f;
    for (int64_t j = static_cast<int64_t>(lane) * V; j < a.N; j += G * V) {  // this thread wrote s_out[row, j..]
      float v[V];
      if (store_sum) {
        load_row<V>(s_out, a.N, 1, row, j, v);
      } else {
        load_sum<V>(x, r, a, has_res, row, j, v);
      }
#pragma unroll
      for (int k = 0; k < V; ++k) acc2 += (v[k] - mean) * (v[k] - mean);
    }
    const float rstd = 1.f / sqrtf(group_sum<G>(acc2, red) / static_cast<float>(a.N) + eps);
    if (lane == 0) {
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
    for (int64_t j = static_cast<int64_t>(lane) * V; j < a.N; j += G * V) {
      float v[V], wv[V], bv[V];
      if (store_sum) {
        load_row<V>(s_out, a.N, 1, row, j, v);
      } else {
        load_sum<V>(x, r, a, has_res, row, j, v);
      }
      if (w != nullptr) load_row<V>(w, 0, 1, 0, j, wv);
      if (b != nullptr) load_row<V>(b, 0, 1, 0, j, bv);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        v[k] = (v[k] - mean) * rstd;
        if (w != nullptr) v[k] *= wv[k];
        if (b != nullptr) v[k] += bv[k];
      }
      store_row<V>(y, row * a.N + j, v);
    }
  }
}

template <class T, class W, int G, int V>
__global__ void __launch_bounds__(kThreads) ln_bwd_kernel(
    const T* __restrict__ dy, int64_t sdym, int64_t sdyn,  // grad of y [M, N]
    const T* __restrict__ ds, int64_t sdsm, int64_t sdsn,  // grad of the stored sum [M, N] or null
    const T* __restrict__ x, const T* __restrict__ r,      // forward input (+ residual or null)
    const W* __restrict__ w,                               // weight [N] or null
    const float* __restrict__ mean_in, const float* __restrict__ rstd_in,  // [M]
    T* __restrict__ dx,                                    // [M, N] contiguous
    float* __restrict__ dwp, float* __restrict__ dbp,      // partials [groups in the grid, N] or null
    Rows a, bool has_res) {
  __shared__ float red[kThreads / 32];
  const int groups = blockDim.x / G;
  const int lane = threadIdx.x % G;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * groups + threadIdx.x / G;
  float* dw_row = dwp != nullptr ? dwp + group * a.N : nullptr;
  float* db_row = dbp != nullptr ? dbp + group * a.N : nullptr;
  const float inv_n = 1.f / static_cast<float>(a.N);
  bool first = true;
  for (int64_t row = group; row < a.M; row += static_cast<int64_t>(gridDim.x) * groups) {
    const float mean = mean_in[row], rstd = rstd_in[row];
    float c1 = 0.f, c2 = 0.f;
    for (int64_t j = static_cast<int64_t>(lane) * V; j < a.N; j += G * V) {
      float xv[V], g[V], wv[V];
      load_sum<V>(x, r, a, has_res, row, j, xv);
      load_row<V>(dy, sdym, sdyn, row, j, g);
      if (w != nullptr) load_row<V>(w, 0, 1, 0, j, wv);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float xhat = (xv[k] - mean) * rstd;
        const float wdy = w != nullptr ? g[k] * wv[k] : g[k];
        c1 += wdy * xhat;
        c2 += wdy;
      }
    }
    c1 = group_sum<G>(c1, red) * inv_n;
    c2 = group_sum<G>(c2, red) * inv_n;
    for (int64_t j = static_cast<int64_t>(lane) * V; j < a.N; j += G * V) {
      float xv[V], g[V], wv[V], d[V];
      load_sum<V>(x, r, a, has_res, row, j, xv);
      load_row<V>(dy, sdym, sdyn, row, j, g);
      if (w != nullptr) load_row<V>(w, 0, 1, 0, j, wv);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        xv[k] = (xv[k] - mean) * rstd;  // xhat
        const float wdy = w != nullptr ? g[k] * wv[k] : g[k];
        d[k] = (wdy - xv[k] * c1 - c2) * rstd;
      }
      if (ds != nullptr) {
        float dsv[V];
        load_row<V>(ds, sdsm, sdsn, row, j, dsv);
#pragma unroll
        for (int k = 0; k < V; ++k) d[k] += dsv[k];
      }
      store_row<V>(dx, row * a.N + j, d);
      // This group's own partial row, at this thread's own columns: no other thread touches them.
      if (dw_row != nullptr) {
        if (!first) load_row<V>(dw_row, 0, 1, 0, j, d);
#pragma unroll
        for (int k = 0; k < V; ++k) d[k] = (first ? 0.f : d[k]) + g[k] * xv[k];
        store_row<V>(dw_row, j, d);
      }
      if (db_row != nullptr) {
        if (!first) load_row<V>(db_row, 0, 1, 0, j, d);
#pragma unroll
        for (int k = 0; k < V; ++k) d[k] = (first ? 0.f : d[k]) + g[k];
        store_row<V>(db_row, j, d);
      }
    }
    first = false;
  }
  if (first) {  // a group without rows still owns a partial row: zero it
    float zero[V];
#pragma unroll
    for (int k = 0; k < V; ++k) zero[k] = 0.f;
    for (int64_t j = static_cast<int64_t>(lane) * V; j < a.N; j += G * V) {
      if (dw_row != nullptr) store_row<V>(dw_row, j, zero);
      if (db_row != nullptr) store_row<V>(db_row, j, zero);
    }
  }
}


void check_common(int64_t M, int64_t N, const Shape& sx, const Shape& sr) {
  require(M >= 1 && N >= 1, "layer_norm: M and N must be >= 1 (the op returns early for empty input)");
  require(sx.size() == 2 && sr.size() == 2, "layer_norm: strides must be [row, column]");
}

}  // namespace

void layer_norm_forward(std::uintptr_t x, std::uintptr_t r, std::uintptr_t w, std::uintptr_t b, std::uintptr_t y,
                        std::uintptr_t s_out, std::uintptr_t mean, std::uintptr_t rstd, int64_t M, int64_t N,
                        const Shape& sx, const Shape& sr, double eps, bool has_res, bool has_w, bool has_b,
                        bool store_sum, int dtype, int wdtype, std::uintptr_t stream) {
  check_common(M, N, sx, sr);
  require(!has_res || r != 0, "layer_norm: residual pointer missing");
  require(!store_sum || (has_res && s_out != 0), "layer_norm: store_sum needs a residual and an output");
  const Rows a{M, N, sx[0], sx[1], has_res ? sr[0] : 0, has_res ? sr[1] : 0};
  cudaStream_t st = as_stream(stream);
  dispatch_pair(dtype, wdtype, "layer_norm", [&](auto t, auto wt) {
    using T = decltype(t);
    using W = decltype(wt);
    const W* wp = has_w ? as_ptr<const W>(w) : nullptr;
    const W* bp = has_b ? as_ptr<const W>(b) : nullptr;
    const auto launch = [&](auto g_tag, auto v_tag) {
      constexpr int G = decltype(g_tag)::value, V = decltype(v_tag)::value;
      const int64_t blocks = std::min<int64_t>(G == 32 ? ceil_div(M, kThreads / 32) : M, 65536);
      ln_fwd_kernel<T, W, G, V><<<grid_x(blocks), kThreads, 0, st>>>(
          as_ptr<const T>(x), as_ptr<const T>(r), wp, bp, as_ptr<T>(y), as_ptr<T>(s_out), as_ptr<float>(mean),
          as_ptr<float>(rstd), a, static_cast<float>(eps), has_res, store_sum);
      FN_LAUNCH_CHECK("ln_fwd_kernel");
    };
    constexpr int V = vec_width<T>();
    // 128-bit path: contiguous rows, N and the row strides multiples of V, aligned pointers.
    const bool vec = sx[1] == 1 && (!has_res || sr[1] == 1) && multiple({N, sx[0], has_res ? sr[0] : 0}, V) &&
                     aligned({x, has_res ? r : 0, has_w ? w : 0, has_b ? b : 0, y, store_sum ? s_out : 0});
    using G32 = std::integral_constant<int, 32>;
    using GBlock = std::integral_constant<int, kThreads>;
    using V1 = std::integral_constant<int, 1>;
    using VW = std::integral_constant<int, V>;
    if (N <= 1024) {
      vec ? launch(G32{}, VW{}) : launch(G32{}, V1{});
    } else {
      vec ? launch(GBlock{}, VW{}) : launch(GBlock{}, V1{});
    }
  });
}

void layer_norm_backward(std::uintptr_t dy, std::uintptr_t ds, std::uintptr_t x, std::uintptr_t r,
                         std::uintptr_t w, std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t dx,
                         std::uintptr_t dw, std::uintptr_t db, int64_t M, int64_t N, const Shape& sdy,
                         const Shape& sds, const Shape& sx, const Shape& sr, bool has_ds, bool has_res, bool has_w,
                         int dtype, int wdtype, std::uintptr_t stream) {
  check_common(M, N, sx, sr);
  require(sdy.size() == 2 && sds.size() == 2, "layer_norm: strides must be [row, column]");
  require(!has_res || r != 0, "layer_norm: residual pointer missing");
  require(!has_ds || ds != 0, "layer_norm: dsum pointer missing");
  const Rows a{M, N, sx[0], sx[1], has_res ? sr[0] : 0, has_res ? sr[1] : 0};
  cudaStream_t st = as_stream(stream);
  const bool wide = N > 1024;
  const int groups_per_block = wide ? 1 : kThreads / 32;
  // Enough groups to fill the GPU (a few blocks per SM), no more than there are rows.
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(M, groups_per_block), 4LL * sm_count()));
  const int64_t P = blocks * groups_per_block;
  float* part = nullptr;
  const int nparts = (dw != 0) + (db != 0);
  if (nparts > 0) {
    FN_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&part), sizeof(float) * P * N * nparts, st));
  }
  float* dwp = dw != 0 ? part : nullptr;
  float* dbp = db != 0 ? part + (dw != 0 ? P * N : 0) : nullptr;
  try {
    dispatch_pair(dtype, wdtype, "layer_norm", [&](auto t, auto wt) {
      using T = decltype(t);
      using W = decltype(wt);
      const W* wp = has_w ? as_ptr<const W>(w) : nullptr;
      const T* dsp = has_ds ? as_ptr<const T>(ds) : nullptr;
      const int64_t sdsm = has_ds ? sds[0] : 0, sdsn = has_ds ? sds[1] : 0;
      const auto launch = [&](auto g_tag, auto v_tag) {
        constexpr int G = decltype(g_tag)::value, V = decltype(v_tag)::value;
        ln_bwd_kernel<T, W, G, V><<<grid_x(blocks), kThreads, 0, st>>>(
            as_ptr<const T>(dy), sdy[0], sdy[1], dsp, sdsm, sdsn, as_ptr<const T>(x), as_ptr<const T>(r), wp,
            as_ptr<const float>(mean), as_ptr<const float>(rstd), as_ptr<T>(dx), dwp, dbp, a, has_res);
        FN_LAUNCH_CHECK("ln_bwd_kernel");
      };
      constexpr int V = vec_width<T>();
      // 128-bit path: contiguous rows, N and the row strides multiples of V, aligned pointers (the
      // partial rows: cudaMallocAsync's 256-byte alignment, offsets P * N floats with N % V == 0).
      const bool vec = sdy[1] == 1 && sx[1] == 1 && (!has_res || sr[1] == 1) && (!has_ds || sdsn == 1) &&
                       multiple({N, sdy[0], sx[0], has_res ? sr[0] : 0, sdsm}, V) &&
                       aligned({dy, has_ds ? ds : 0, x, has_res ? r : 0, has_w ? w : 0, dx});
      using G32 = std::integral_constant<int, 32>;
      using GBlock = std::integral_constant<int, kThreads>;
      using V1 = std::integral_constant<int, 1>;
      using VW = std::integral_constant<int, V>;
      if (wide) {
        vec ? launch(GBlock{}, VW{}) : launch(GBlock{}, V1{});
      } else {
        vec ? launch(G32{}, VW{}) : launch(G32{}, V1{});
      }
      const unsigned int cblocks = grid_x(std::min<int64_t>(ceil_div(N, kThreads), 65536));
      if (dwp != nullptr) {
        column_sum_kernel<W><<<cblocks, kThreads, 0, st>>>(dwp, as_ptr<W>(dw), P, N);
        FN_LAUNCH_CHECK("column_sum_kernel (weight)");
      }
      if (dbp != nullptr) {
        column_sum_kernel<W><<<cblocks, kThreads, 0, st>>>(dbp, as_ptr<W>(db), P, N);
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
