// Local response normalization, CUDA C++ (the algorithm of fastnets/kernels/lrn.py).
//
// One thread per output element, in the output's memory order (channels fastest for channels_last,
// spatial positions fastest for NCHW) so that neighbouring threads touch neighbouring addresses.
// A thread re-reads the window's neighbouring channels, which its neighbours read too: one pass
// over DRAM, the repeats come from L1/L2. The backward recomputes d over the transposed window
// instead of reading a saved copy. Math in float32; powf as torch's pow (NaN, 0 and negative bases).
// Index arithmetic in I = int32 when every offset fits, else int64. channels_last tensors with C a
// multiple of 8 (16-bit) or 4 (fp32) and windows of at most 9 channels take a 128-bit path (below).
#include <algorithm>
#include <cstdlib>
#include <utility>

#include "lrn.h"
#include "vec.h"

namespace fastnets {
namespace {

template <class I>
struct Geometry {
  I N, C, S, S1, S2;    // S = S0 * S1 * S2 spatial positions; S1, S2 split a flat spatial index
  I total;              // N * C * S
  bool channels_inner;  // thread order: channels fastest (channels_last) or positions fastest
};

template <class I>
struct Strides {
  I n, c, s0, s1, s2;
};

template <class I>
__device__ __forceinline__ I spatial_offset(I s, const Geometry<I>& g, const Strides<I>& st) {
  if (g.S1 == 1 && g.S2 == 1) return s * st.s0;
  I s2 = s % g.S2;
  I t = s / g.S2;
  return (t / g.S1) * st.s0 + (t % g.S1) * st.s1 + s2 * st.s2;
}

template <class I>
__device__ __forceinline__ void split(I idx, const Geometry<I>& g, I* n, I* c, I* s) {
  if (g.channels_inner) {
    *c = idx % g.C;
    I t = idx / g.C;
    *s = t % g.S;
    *n = t / g.S;
  } else {
    *s = idx % g.S;
    I t = idx / g.S;
    *c = t % g.C;
    *n = t / g.C;
  }
}

// d = k + alpha/size * sum of x^2 over channels [c - size/2, c + (size-1)/2] within [0, C).
// xb points at x[n, 0, s].
template <class T, class I>
__device__ __forceinline__ float window_d(const T* __restrict__ xb, I c, I C, I stride_c, int size,
                                          float alpha_over_size, float k) {
  const I lo = std::max<I>(c - size / 2, 0);
  const I hi = std::min<I>(c - size / 2 + size, C);  // exclusive
  float acc = 0.f;
  for (I j = lo; j < hi; ++j) {
    const float v = to_float(xb[j * stride_c]);
    acc += v * v;
  }
  return k + alpha_over_size * acc;
}

template <class T, class I>
__global__ void lrn_fwd_kernel(const T* __restrict__ x,  // input [N, C, S0, S1, S2], strides sx
                               T* __restrict__ y,        // output [N, C, S0, S1, S2], strides sy
                               Geometry<I> g,            // sizes, element count, thread order
                               Strides<I> sx, Strides<I> sy,
                               int size, float alpha_over_size, float beta, float k) {  // alpha / size
  const I step = static_cast<I>(gridDim.x) * blockDim.x;
  for (I idx = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; idx < g.total; idx += step) {
    I n, c, s;
    split(idx, g, &n, &c, &s);
    const T* xb = x + n * sx.n + spatial_offset(s, g, sx);
    const float d = window_d(xb, c, g.C, sx.c, size, alpha_over_size, k);
    const float v = to_float(xb[c * sx.c]);
    y[n * sy.n + c * sy.c + spatial_offset(s, g, sy)] = from_float<T>(v / powf(d, beta));
  }
}

template <class T, class I>
__global__ void lrn_bwd_kernel(const T* __restrict__ gy,  // grad of the output [N, C, S0, S1, S2], strides sg
                               const T* __restrict__ x,   // forward input, strides sx
                               T* __restrict__ dx,        // grad of the input, strides sdx
                               Geometry<I> g, Strides<I> sg, Strides<I> sx, Strides<I> sdx, int size,
                               float alpha_over_size, float beta, float k,
                               float coef) {  // 2 * alpha * beta / size
  const I step = static_cast<I>(gridDim.x) * blockDim.x;
  for (I idx = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; idx < g.total; idx += step) {
    I n, c, s;
    split(idx, g, &n, &c, &s);
    const T* xb = x + n * sx.n + spatial_offset(s, g, sx);
    const T* gb = gy + n * sg.n + spatial_offset(s, g, sg);
    // The channels i whose window contains c: [c - (size-1)/2, c + size/2] within [0, C).
    const I lo = std::max<I>(c - (size - 1) / 2, 0);
    const I hi = std::min<I>(c - (size - 1) / 2 + size, g.C);  // exclusive; c is in [lo, hi)
    float acc = 0.f, p_c = 1.f;
    for (I i = lo; i < hi; ++i) {
      const float d_i = window_d(xb, i, g.C, sx.c, size, alpha_over_size, k);
      const float p_i = powf(d_i, beta);
      acc += to_float(gb[i * sg.c]) * to_float(xb[i * sx.c]) / (p_i * d_i);
      if (i == c) p_c = p_i;
    }
    const float g_c = to_float(gb[c * sg.c]);
    const float x_c = to_float(xb[c * sx.c]);
    // torch's pow backward is exactly zero for a zero exponent: the second term is then 2 x * 0
    // (NaN only where x is not finite), even where the window sum is not finite.
    const float second = beta == 0.f ? x_c * 0.f : coef * x_c * acc;
    dx[n * sdx.n + c * sdx.c + spatial_offset(s, g, sdx)] = from_float<T>(g_c / p_c - second);
  }
}

// ---------------------------------------------------------------------------------------------
// The 128-bit path for channels_last (every tensor with channel stride 1, C and the other strides
// multiples of V = vec_width<T>(), aligned pointers) and size <= kMaxVecSize: a thread computes V
// neighbouring channels of one position. It takes its own vector and H neighbouring vectors on
// each side (zeros outside [0, C)) from the block's vectors staged in shared memory (every global
// access 128-bit), enough for every window it needs (offsets -4..4 around a channel for the
// forward; the backward needs the windows of the channels within 4 of its own, 8 away), so that
// every register index is a compile-time constant. The sums run over the window in the
// same ascending order as the scalar kernels, and a channel outside [0, C) adds an exact zero.
constexpr int kMaxVecSize = 9;  // window offsets within [-4, 4]
constexpr int kReach = kMaxVecSize / 2;

// The window sum of squares around register index P (a compile-time constant): offsets w with
// lo <= w <= hi (lo = -(size / 2), hi = size - 1 - size / 2, both within [-4, 4]).
template <int P, int L>
__device__ __forceinline__ float window_sum(const float (&v)[L], int lo, int hi) {
  static_assert(P - kReach >= 0 && P + kReach < L, "the window stays inside the loaded registers");
  float acc = 0.f;
#pragma unroll
  for (int w = -kReach; w <= kReach; ++w) {
    if (w >= lo && w <= hi) acc += v[P + w] * v[P + w];
  }
  return acc;
}

template <int V, int P, int L>
__device__ __forceinline__ void window_sums(const float (&v)[L], int lo, int hi, float (&out)[V]) {
  if constexpr (P < V) {
    out[P] = window_sum<P + (L - V) / 2, L>(v, lo, hi);
    window_sums<V, P + 1, L>(v, lo, hi, out);
  }
}

template <int V, class I>
__device__ __forceinline__ void split_vec(I q, const Geometry<I>& g, I* n, I* c0, I* s) {
  const I e = q * V;
  *c0 = e % g.C;
  const I t = e / g.C;
  *s = t % g.S;
  *n = t / g.S;
}

// A block of the vector kernels stages its vectors of a tensor through shared memory: sh[k] holds
// the 16 bytes of vector q = base - H + k (flat vector index in thread order, zeros outside
// [0, nvec)), k < kVecBlock + 2 * H, each loaded by one 128-bit instruction and stored whole. A
// thread then takes its own vector and its H neighbours on each side from there. (Loaded directly,
// a neighbouring vector of which a thread uses only 4 channels is narrowed by ptxas to LDG.64.)
constexpr int kVecBlock = 256;  // threads per block of the vector kernels

template <int V, int H, class T, class I>
__device__ __forceinline__ void stage_vectors(const T* __restrict__ t, const Strides<I>& st, const Geometry<I>& g,
                                              I base, I nvec, uint4* sh) {
  for (int k = threadIdx.x; k < kVecBlock + 2 * H; k += kVecBlock) {
    const I q = base - H + k;
    uint4 w = make_uint4(0u, 0u, 0u, 0u);
    if (q >= 0 && q < nvec) {
      I n, c0, s;
      split_vec<V>(q, g, &n, &c0, &s);
      w = *reinterpret_cast<const uint4*>(t + n * st.n + spatial_offset(s, g, st) + c0);
    }
    sh[k] = w;
  }
}

// The (2 * H + 1) * V values of channels [c0 - H * V, c0 + (H + 1) * V) of thread tid's position
// from the staged vectors, zeros outside [0, C): vector q + h (at sh[tid + H + h]) is channel
// c0 + h * V of the same position exactly when that channel lies in [0, C).
template <int V, int H, class T, class I>
__device__ __forceinline__ void staged_neighbourhood(const uint4* sh, int tid, I c0, I C,
                                                     float (&v)[(2 * H + 1) * V]) {
  constexpr int kPer32 = static_cast<int>(4 / sizeof(T));
#pragma unroll
  for (int h = -H; h <= H; ++h) {
    const I cc = c0 + h * V;
    const bool in = cc >= 0 && cc < C;
    const uint4 w = sh[tid + H + h];
    const uint32_t lanes[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int l = 0; l < 4; ++l) {
#pragma unroll
      for (int e = 0; e < kPer32; ++e) {
        const float f = float_of_bits<T>(kPer32 == 1 ? lanes[l] : (lanes[l] >> (16 * e)) & 0xffffu);
        v[(h + H) * V + l * kPer32 + e] = in ? f : 0.f;
      }
    }
  }
}

template <class T, class I>
__global__ void lrn_fwd_vec_kernel(const T* __restrict__ x, T* __restrict__ y, Geometry<I> g, Strides<I> sx,
                                   Strides<I> sy, int size, float alpha_over_size, float beta, float k) {
  constexpr int V = vec_width<T>();
  constexpr int H = (kReach + V - 1) / V;
  constexpr int L = (2 * H + 1) * V;
  __shared__ uint4 sx_vec[kVecBlock + 2 * H];
  const int lo = -(size / 2), hi = size - 1 - size / 2;
  const I nvec = g.total / V;
  const I step = static_cast<I>(gridDim.x) * kVecBlock;
  for (I base = static_cast<I>(blockIdx.x) * kVecBlock; base < nvec; base += step) {  // uniform per block
    stage_vectors<V, H>(x, sx, g, base, nvec, sx_vec);
    __syncthreads();
    const I q = base + static_cast<I>(threadIdx.x);
    if (q < nvec) {
      I n, c0, s;
      split_vec<V>(q, g, &n, &c0, &s);
      float v[L];
      staged_neighbourhood<V, H, T>(sx_vec, threadIdx.x, c0, g.C, v);
      float d[V];
      window_sums<V, 0, L>(v, lo, hi, d);
      float out[V];
#pragma unroll
      for (int j = 0; j < V; ++j) out[j] = v[H * V + j] / powf(k + alpha_over_size * d[j], beta);
      store_vec<V>(y + n * sy.n + spatial_offset(s, g, sy) + c0, out);
    }
    __syncthreads();  // every thread has read sx_vec before the next iteration stages over it
  }
}

// The backward over channels i = c + u, ulo <= u <= uhi (ulo = -((size - 1) / 2)): the terms
// g_i x_i / (p_i d_i) for the V + 8 channels [c0 - 4, c0 + V + 4), then their window sums.
template <int V, int P, int L, int M, class I>
__device__ __forceinline__ void backward_terms(const float (&xv)[L], const float (&gv)[L], int lo, int hi,
                                               float alpha_over_size, float beta, float k, I ch0, I C,
                                               float (&term)[M], float (&pw)[M]) {
  if constexpr (P < M) {
    constexpr int R = (L - M) / 2 + P;  // register index of channel c0 - 4 + P
    const float d = k + alpha_over_size * window_sum<R, L>(xv, lo, hi);
    const float p = powf(d, beta);
    const I ch = ch0 + P;
    term[P] = (ch >= 0 && ch < C) ? gv[R] * xv[R] / (p * d) : 0.f;
    pw[P] = p;
    backward_terms<V, P + 1, L, M, I>(xv, gv, lo, hi, alpha_over_size, beta, k, ch0, C, term, pw);
  }
}

template <class T, class I>
__global__ void lrn_bwd_vec_kernel(const T* __restrict__ gy, const T* __restrict__ x, T* __restrict__ dx,
                                   Geometry<I> g, Strides<I> sg, Strides<I> sx, Strides<I> sdx, int size,
                                   float alpha_over_size, float beta, float k, float coef) {
  constexpr int V = vec_width<T>();
  constexpr int H = (2 * kReach + V - 1) / V;
  constexpr int L = (2 * H + 1) * V;
  constexpr int M = V + 2 * kReach;  // channels c0 - 4 .. c0 + V + 3
  const int lo = -(size / 2), hi = size - 1 - size / 2;        // window of d
  const int ulo = -((size - 1) / 2), uhi = size - 1 - (size - 1) / 2;  // channels whose window holds c
  __shared__ uint4 sx_vec[kVecBlock + 2 * H], sg_vec[kVecBlock + 2 * H];
  const I nvec = g.total / V;
  const I step = static_cast<I>(gridDim.x) * kVecBlock;
  for (I base = static_cast<I>(blockIdx.x) * kVecBlock; base < nvec; base += step) {  // uniform per block
    stage_vectors<V, H>(x, sx, g, base, nvec, sx_vec);
    stage_vectors<V, H>(gy, sg, g, base, nvec, sg_vec);
    __syncthreads();
    const I q = base + static_cast<I>(threadIdx.x);
    if (q < nvec) {
      I n, c0, s;
      split_vec<V>(q, g, &n, &c0, &s);
      float xv[L], gv[L];
      staged_neighbourhood<V, H, T>(sx_vec, threadIdx.x, c0, g.C, xv);
      staged_neighbourhood<V, H, T>(sg_vec, threadIdx.x, c0, g.C, gv);
      float term[M], pw[M];
      backward_terms<V, 0, L, M, I>(xv, gv, lo, hi, alpha_over_size, beta, k, c0 - kReach, g.C, term, pw);
      float out[V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float acc = 0.f;
#pragma unroll
        for (int u = -kReach; u <= kReach; ++u) {
          if (u >= ulo && u <= uhi) acc += term[kReach + j + u];
        }
        const float g_c = gv[H * V + j], x_c = xv[H * V + j];
        const float second = beta == 0.f ? x_c * 0.f : coef * x_c * acc;
        out[j] = g_c / pw[kReach + j] - second;
      }
      store_vec<V>(dx + n * sdx.n + spatial_offset(s, g, sdx) + c0, out);
    }
    __syncthreads();  // every thread has read the staged vectors before the next iteration
  }
}

// Whether the 128-bit path applies: channels_last (channel stride 1) in every tensor, C and every
// other stride multiples of V, aligned pointers, size <= kMaxVecSize.
bool vector_path(const Shape& dims, std::initializer_list<std::pair<std::uintptr_t, const Shape*>> ts, int64_t size,
                 int dtype) {
  const int64_t V = dtype == kFloat32 ? 4 : 8;
  if (size > kMaxVecSize || dims[1] % V != 0 || dims[2] * dims[3] * dims[4] < 2) return false;
  for (const auto& [p, st] : ts) {
    const Shape& v = *st;
    if (!aligned({p}) || v[1] != 1 || !multiple({v[0], v[2], v[3], v[4]}, V)) return false;
  }
  return true;
}

void check_shape(const Shape& dims, std::initializer_list<const Shape*> strides, int64_t size) {
  require(dims.size() == 5, "LRN: dims must be [N, C, S0, S1, S2]");
  for (const Shape* st : strides) require(st->size() == 5, "LRN: every tensor needs 5 strides");
  for (int64_t d : dims) require(d >= 1, "LRN: every dim must be >= 1 (the op returns early for empty input)");
  require(size >= 1 && size <= (int64_t{1} << 30), "LRN: size must be in [1, 2^30]");
}

// True when every element offset fits in int32, and the element count with room for the
// grid-stride step (at most 2^20 blocks * 256 threads = 2^28) on top.
bool fits_int32(const Shape& dims, std::initializer_list<const Shape*> strides) {
  int64_t total = 1;
  for (int64_t d : dims) total *= d;
  if (total >= (int64_t{1} << 30)) return false;
  for (const Shape* st : strides) {
    int64_t last = 0;
    for (int i = 0; i < 5; ++i) last += (dims[i] - 1) * std::abs((*st)[i]);
    if (last >= (int64_t{1} << 31)) return false;
  }
  return true;
}

template <class I>
Geometry<I> geometry(const Shape& dims, const Shape& sx) {
  Geometry<I> g;
  g.N = static_cast<I>(dims[0]);
  g.C = static_cast<I>(dims[1]);
  g.S = static_cast<I>(dims[2] * dims[3] * dims[4]);
  g.S1 = static_cast<I>(dims[3]);
  g.S2 = static_cast<I>(dims[4]);
  g.total = g.N * g.C * g.S;
  g.channels_inner = sx[1] == 1 && g.S > 1;
  return g;
}

template <class I>
Strides<I> strides(const Shape& st) {
  return Strides<I>{static_cast<I>(st[0]), static_cast<I>(st[1]), static_cast<I>(st[2]), static_cast<I>(st[3]),
                    static_cast<I>(st[4])};
}

constexpr int kThreads = 256;
static_assert(kThreads == kVecBlock, "the vector kernels stage kVecBlock vectors per block");

template <class I>
unsigned int blocks_for(I total) {
  // A grid-stride loop covers the rest; 2^20 blocks of 256 threads fill any current GPU.
  return grid_x(std::min<int64_t>(ceil_div(static_cast<int64_t>(total), kThreads), int64_t{1} << 20));
}

template <class I>
void launch_forward(std::uintptr_t x, std::uintptr_t y, const Shape& dims, const Shape& sx, const Shape& sy,
                    int size, float alpha_over_size, float beta, float k, int dtype, cudaStream_t stream) {
  const Geometry<I> g = geometry<I>(dims, sx);
  const bool vec = vector_path(dims, {{x, &sx}, {y, &sy}}, size, dtype);
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (vec) {
      lrn_fwd_vec_kernel<T, I><<<blocks_for(g.total / vec_width<T>()), kThreads, 0, stream>>>(
          as_ptr<const T>(x), as_ptr<T>(y), g, strides<I>(sx), strides<I>(sy), size, alpha_over_size, beta, k);
      FN_LAUNCH_CHECK("lrn_fwd_vec_kernel");
      return;
    }
    lrn_fwd_kernel<T, I><<<blocks_for(g.total), kThreads, 0, stream>>>(
        as_ptr<const T>(x), as_ptr<T>(y), g, strides<I>(sx), strides<I>(sy), size, alpha_over_size, beta, k);
    FN_LAUNCH_CHECK("lrn_fwd_kernel");
  });
}

template <class I>
void launch_backward(std::uintptr_t gy, std::uintptr_t x, std::uintptr_t dx, const Shape& dims, const Shape& sg,
                     const Shape& sx, const Shape& sdx, int size, float alpha_over_size, float beta, float k,
                     float coef, int dtype, cudaStream_t stream) {
  const Geometry<I> g = geometry<I>(dims, sx);
  const bool vec = vector_path(dims, {{gy, &sg}, {x, &sx}, {dx, &sdx}}, size, dtype);
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (vec) {
      lrn_bwd_vec_kernel<T, I><<<blocks_for(g.total / vec_width<T>()), kThreads, 0, stream>>>(
          as_ptr<const T>(gy), as_ptr<const T>(x), as_ptr<T>(dx), g, strides<I>(sg), strides<I>(sx),
          strides<I>(sdx), size, alpha_over_size, beta, k, coef);
      FN_LAUNCH_CHECK("lrn_bwd_vec_kernel");
      return;
    }
    lrn_bwd_kernel<T, I><<<blocks_for(g.total), kThreads, 0, stream>>>(
        as_ptr<const T>(gy), as_ptr<const T>(x), as_ptr<T>(dx), g, strides<I>(sg), strides<I>(sx),
        strides<I>(sdx), size, alpha_over_size, beta, k, coef);
    FN_LAUNCH_CHECK("lrn_bwd_kernel");
  });
}

}  // namespace

void lrn_forward(std::uintptr_t x, std::uintptr_t y, const Shape& dims, const Shape& sx, const Shape& sy,
                 int64_t size, double alpha, double beta, double k, int dtype, std::uintptr_t stream) {
  check_shape(dims, {&sx, &sy}, size);
  const float a = static_cast<float>(alpha / static_cast<double>(size));
  if (fits_int32(dims, {&sx, &sy})) {
    launch_forward<int32_t>(x, y, dims, sx, sy, static_cast<int>(size), a, static_cast<float>(beta),
                            static_cast<float>(k), dtype, as_stream(stream));
  } else {
    launch_forward<int64_t>(x, y, dims, sx, sy, static_cast<int>(size), a, static_cast<float>(beta),
                            static_cast<float>(k), dtype, as_stream(stream));
  }
}

void lrn_backward(std::uintptr_t g, std::uintptr_t x, std::uintptr_t dx, const Shape& dims, const Shape& sg,
                  const Shape& sx, const Shape& sdx, int64_t size, double alpha, double beta, double k,
                  int dtype, std::uintptr_t stream) {
  check_shape(dims, {&sg, &sx, &sdx}, size);
  const float a = static_cast<float>(alpha / static_cast<double>(size));
  const float coef = static_cast<float>(2.0 * alpha * beta / static_cast<double>(size));
  if (fits_int32(dims, {&sg, &sx, &sdx})) {
    launch_backward<int32_t>(g, x, dx, dims, sg, sx, sdx, static_cast<int>(size), a, static_cast<float>(beta),
                             static_cast<float>(k), coef, dtype, as_stream(stream));
  } else {
    launch_backward<int64_t>(g, x, dx, dims, sg, sx, sdx, static_cast<int>(size), a, static_cast<float>(beta),
                             static_cast<float>(k), coef, dtype, as_stream(stream));
  }
}

}  // namespace fastnets
