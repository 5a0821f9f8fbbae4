// Local response normalization, CUDA C++ (the algorithm of fastnets/kernels/lrn.py).
//
// One thread per output element, in the output's memory order (channels fastest for channels_last,
// spatial positions fastest for NCHW) so that neighbouring threads touch neighbouring addresses.
// A thread re-reads the window's neighbouring channels, which its neighbours read too: one pass
// over DRAM, the repeats come from L1/L2. The backward recomputes d over the transposed window
// instead of reading a saved copy. Math in float32; powf as torch's pow (NaN, 0 and negative bases).
// Index arithmetic in I = int32 when every offset fits, else int64.
#include <algorithm>
#include <cstdlib>

#include "lrn.h"

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

template <class I>
unsigned int blocks_for(I total) {
  // A grid-stride loop covers the rest; 2^20 blocks of 256 threads fill any current GPU.
  return grid_x(std::min<int64_t>(ceil_div(static_cast<int64_t>(total), kThreads), int64_t{1} << 20));
}

template <class I>
void launch_forward(std::uintptr_t x, std::uintptr_t y, const Shape& dims, const Shape& sx, const Shape& sy,
                    int size, float alpha_over_size, float beta, float k, int dtype, cudaStream_t stream) {
  const Geometry<I> g = geometry<I>(dims, sx);
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
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
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
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
