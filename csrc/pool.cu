// Pooling kernels (CUDA C++): max and average pooling over fixed or adaptive windows, their
// backward passes as gathers, and the global (1x1) pool. Declared in csrc/pool.h; the Triton
// versions (fastnets/kernels/pool.py) follow the same rules.
//
// One thread per output element (backward: per input element), or per VEC channels of it when the
// channels are contiguous (channels_last) and every access is VEC-aligned: then a warp reads
// 32 * VEC contiguous channels per window element with 16-byte loads. NCHW threads run along W.
// Index arithmetic is int32 (I = int32_t) when every offset and product fits, else int64.
//
// Max pooling is torch's scan: start from -inf with the first in-bounds element of the window as
// the argmax, take each element that is larger or NaN in row-major order (first maximum on ties;
// NaN wins, the last NaN over earlier ones; an all -inf window gives -inf at its first element).
#include <cmath>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <utility>

#include "pool.h"

namespace fastnets {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kNoIndex = std::numeric_limits<int64_t>::max();  // a global-pool lane with no element

template <class I>
struct Geom {
  I N, C, H, W, OH, OW;  // [N, C, H, W] input side, [N, C, OH, OW] output side
  I sx[4];  // strides of the input side (x, or grad_in)
  I so[4];  // strides of the output side (out, or grad_out)
  I si[4];  // strides of the indices
  I kh, kw, sh, sw, ph, pw, dh, dw;  // fixed windows
  int64_t divisor;  // average: divisor_override, 0 when none
  bool is_max, adaptive, count_include_pad;
  bool channels_last;  // thread order: channels fastest, else columns fastest
  bool idx_pairs;      // the indices' channels are contiguous and 16-byte aligned in pairs: 128-bit access
};

template <class I> __device__ __forceinline__ I imin(I a, I b) { return a < b ? a : b; }
template <class I> __device__ __forceinline__ I imax(I a, I b) { return a > b ? a : b; }
// Adaptive windows: [floor(o * in / out), ceil((o + 1) * in / out)).
template <class I> __device__ __forceinline__ I start_index(I o, I in, I out) { return (o * in) / out; }
template <class I> __device__ __forceinline__ I end_index(I o, I in, I out) { return ((o + 1) * in + out - 1) / out; }

template <class T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <class T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    v[0] = to_float(*p);
  } else {
    const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = to_float(pk.v[j]);
  }
}

template <class T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    *p = from_float<T>(v[0]);
  } else {
    Pack<T, VEC> pk;
#pragma unroll
    for (int j = 0; j < VEC; ++j) pk.v[j] = from_float<T>(v[j]);
    *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
  }
}

// The divisor of the average window of output (oh, ow) as torch computes it (padded window size
// clipped at H + ph, or the in-bounds count; divisor_override; the area of an adaptive window),
// or 0 for a window without input elements (torch writes 0 there).
template <class I>
__device__ float avg_divisor(const Geom<I>& g, I oh, I ow) {
  if (g.adaptive) {
    const I area = (end_index(oh, g.H, g.OH) - start_index(oh, g.H, g.OH)) *
                   (end_index(ow, g.W, g.OW) - start_index(ow, g.W, g.OW));
    return static_cast<float>(area);
  }
  const I h0 = oh * g.sh - g.ph, w0 = ow * g.sw - g.pw;
  const I h1 = imin<I>(h0 + g.kh, g.H + g.ph), w1 = imin<I>(w0 + g.kw, g.W + g.pw);
  const I padded = (h1 - h0) * (w1 - w0);
  const I hs = imax<I>(h0, 0), ws = imax<I>(w0, 0), he = imin<I>(h1, g.H), we = imin<I>(w1, g.W);
  if (he <= hs || we <= ws) return 0.f;
  if (g.divisor != 0) return static_cast<float>(g.divisor);
  return static_cast<float>(g.count_include_pad ? padded : (he - hs) * (we - ws));
}

// Splits a flat thread index into (n, c, y, x) over [N, C, Y, X]: channels fastest (c a multiple
// of VEC) when channels_last, else x fastest.
template <class I, int VEC>
__device__ __forceinline__ void split(I q, const Geom<I>& g, I Y, I X, I& n, I& c, I& y, I& x) {
  if (g.channels_last) {
    const I CV = g.C / VEC;
    c = (q % CV) * VEC;
    q /= CV;
    x = q % X;
    q /= X;
    y = q % Y;
    n = q / Y;
  } else {
    x = q % X;
    q /= X;
    y = q % Y;
    q /= Y;
    c = q % g.C;
    n = q / g.C;
  }
}

// x: [N, C, H, W] input; out, idx: [N, C, OH, OW] (idx nullptr: no indices); total: threads needed.
template <class T, class I, int VEC>
__global__ void __launch_bounds__(kThreads)
pool2d_forward_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t* __restrict__ idx, Geom<I> g,
                      int64_t total) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    I n, c, oh, ow;
    split<I, VEC>(static_cast<I>(t), g, g.OH, g.OW, n, c, oh, ow);
    // Rows h0, h0 + hs, ... < h1 and columns alike: the in-bounds part of the window.
    I h0, h1, hs, w0, w1, ws;
    if (g.adaptive) {
      h0 = start_index(oh, g.H, g.OH), h1 = end_index(oh, g.H, g.OH), hs = 1;
      w0 = start_index(ow, g.W, g.OW), w1 = end_index(ow, g.W, g.OW), ws = 1;
    } else if (g.is_max) {
      h0 = oh * g.sh - g.ph, h1 = imin<I>(h0 + (g.kh - 1) * g.dh + 1, g.H), hs = g.dh;
      w0 = ow * g.sw - g.pw, w1 = imin<I>(w0 + (g.kw - 1) * g.dw + 1, g.W), ws = g.dw;
      if (h0 < 0) h0 += ((-h0 + g.dh - 1) / g.dh) * g.dh;
      if (w0 < 0) w0 += ((-w0 + g.dw - 1) / g.dw) * g.dw;
    } else {
      h0 = oh * g.sh - g.ph, w0 = ow * g.sw - g.pw;
      h1 = imin<I>(h0 + g.kh, g.H), w1 = imin<I>(w0 + g.kw, g.W);
      h0 = imax<I>(h0, 0), w0 = imax<I>(w0, 0), hs = 1, ws = 1;
    }
    const T* xp = x + n * g.sx[0] + c * g.sx[1];
    float acc[VEC];
    I arg[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc[j] = g.is_max ? -INFINITY : 0.f;
      arg[j] = h0 * g.W + w0;
    }
    for (I h = h0; h < h1; h += hs) {
      for (I w = w0; w < w1; w += ws) {
        float v[VEC];
        load_vec<T, VEC>(xp + h * g.sx[2] + w * g.sx[3], v);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if (g.is_max) {
            if (v[j] > acc[j] || isnan(v[j])) {
              acc[j] = v[j];
              arg[j] = h * g.W + w;
            }
          } else {
            acc[j] += v[j];
          }
        }
      }
    }
    if (!g.is_max) {
      const float d = avg_divisor(g, oh, ow);
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] = d == 0.f ? 0.f : acc[j] / d;
    }
    store_vec<T, VEC>(out + n * g.so[0] + c * g.so[1] + oh * g.so[2] + ow * g.so[3], acc);
    if (idx != nullptr) {
      int64_t* ip = idx + n * g.si[0] + c * g.si[1] + oh * g.si[2] + ow * g.si[3];
      if constexpr (VEC >= 2) {
        if (g.idx_pairs) {  // two indices per 128-bit store
#pragma unroll
          for (int j = 0; j < VEC; j += 2) {
            reinterpret_cast<longlong2*>(ip)[j / 2] = make_longlong2(static_cast<int64_t>(arg[j]),
                                                                     static_cast<int64_t>(arg[j + 1]));
          }
          continue;
        }
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) ip[j * g.si[1]] = static_cast<int64_t>(arg[j]);
    }
  }
}

// gout, idx: [N, C, OH, OW] gradient of the output and forward argmax (is_max); gin: [N, C, H, W].
template <class T, class I, int VEC>
__global__ void __launch_bounds__(kThreads)
pool2d_backward_kernel(const T* __restrict__ gout, const int64_t* __restrict__ idx, T* __restrict__ gin,
                       Geom<I> g, int64_t total) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    I n, c, h, w;
    split<I, VEC>(static_cast<I>(t), g, g.H, g.W, n, c, h, w);
    // The outputs [oh0, oh1) x [ow0, ow1) whose windows span (h, w).
    I oh0, oh1, ow0, ow1;
    if (g.adaptive) {
      oh0 = (h * g.OH) / g.H, oh1 = imin<I>(((h + 1) * g.OH + g.H - 1) / g.H, g.OH);
      ow0 = (w * g.OW) / g.W, ow1 = imin<I>(((w + 1) * g.OW + g.W - 1) / g.W, g.OW);
    } else {
      const I top = h + g.ph - (g.kh - 1) * g.dh, left = w + g.pw - (g.kw - 1) * g.dw;
      oh0 = top > 0 ? (top + g.sh - 1) / g.sh : 0, oh1 = imin<I>((h + g.ph) / g.sh + 1, g.OH);
      ow0 = left > 0 ? (left + g.sw - 1) / g.sw : 0, ow1 = imin<I>((w + g.pw) / g.sw + 1, g.OW);
    }
    const I target = h * g.W + w;
    float acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = 0.f;
    for (I oh = oh0; oh < oh1; ++oh) {
      for (I ow = ow0; ow < ow1; ++ow) {
        float gv[VEC];
        load_vec<T, VEC>(gout + n * g.so[0] + c * g.so[1] + oh * g.so[2] + ow * g.so[3], gv);
        if (g.is_max) {
          const int64_t* ip = idx + n * g.si[0] + c * g.si[1] + oh * g.si[2] + ow * g.si[3];
          int64_t iv[VEC];
          if constexpr (VEC >= 2) {  // two indices per 128-bit load (the launcher takes VEC > 1 only with pairs)
#pragma unroll
            for (int j = 0; j < VEC; j += 2) {
              const longlong2 pr = reinterpret_cast<const longlong2*>(ip)[j / 2];
              iv[j] = pr.x;
              iv[j + 1] = pr.y;
            }
          } else {
            iv[0] = ip[0];
          }
#pragma unroll
          for (int j = 0; j < VEC; ++j)
            if (iv[j] == static_cast<int64_t>(target)) acc[j] += gv[j];
        } else {
          const float d = avg_divisor(g, oh, ow);  // not 0: the window holds (h, w)
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[j] += gv[j] / d;
        }
      }
    }
    store_vec<T, VEC>(gin + n * g.sx[0] + c * g.sx[1] + h * g.sx[2] + w * g.sx[3], acc);
  }
}

template <class I>
struct GlobalGeom {
  I N, C, W, R;  // R = H * W
  I sxn, sxc, sxh, sxw;  // input strides
  I son, soc, sin, sic;  // output and index strides (n, c)
  bool is_max;
  bool flat;  // sxh == W * sxw: pixel r sits at r * sxw
};

template <class I>
__device__ __forceinline__ I pixel_offset(const GlobalGeom<I>& g, I r) {
  return g.flat ? r * g.sxw : (r / g.W) * g.sxh + (r % g.W) * g.sxw;
}

// Max over (value, index) pairs in the order torch's scan implies: a NaN beats everything and a
// later NaN an earlier one; otherwise the larger value, and the earlier index among equal values.
// A total order, so partial results combine in any grouping.
__device__ __forceinline__ void max_combine(float& v, int64_t& i, float v2, int64_t i2) {
  const bool nan1 = isnan(v), nan2 = isnan(v2);
  const bool take = (nan1 || nan2) ? (nan2 && (!nan1 || i2 > i)) : (v2 > v || (v2 == v && i2 < i));
  if (take) {
    v = v2;
    i = i2;
  }
}

// One step of torch's scan over a plane (pixels in increasing order within one thread).
__device__ __forceinline__ void scan_step(float& v, int64_t& i, float a, int64_t r) {
  if (i == kNoIndex || a > v || isnan(a)) {
    v = a;
    i = r;
  }
}

// NCHW-like planes: one warp per (n, c) plane, lanes along the (contiguous) pixels.
// x: [N, C, H, W]; out, idx: [N, C] (idx nullptr: no indices).
template <class T, class I>
__global__ void __launch_bounds__(kThreads)
global_pool_rows_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t* __restrict__ idx, GlobalGeom<I> g) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t plane = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32;
       plane < static_cast<int64_t>(g.N) * g.C; plane += warps) {  // uniform within a warp
    const I n = static_cast<I>(plane / g.C), c = static_cast<I>(plane % g.C);
    const T* xp = x + n * g.sxn + c * g.sxc;
    float v = g.is_max ? -INFINITY : 0.f;
    int64_t i = kNoIndex;
    for (I r = lane; r < g.R; r += 32) {
      const float a = to_float(xp[pixel_offset(g, r)]);
      if (g.is_max) scan_step(v, i, a, r);
      else v += a;
    }
    for (int off = 16; off > 0; off /= 2) {
      const float v2 = __shfl_down_sync(0xffffffffu, v, off);
      const int64_t i2 = __shfl_down_sync(0xffffffffu, i, off);
      if (g.is_max) max_combine(v, i, v2, i2);
      else v += v2;
    }
    if (lane == 0) {
      out[n * g.son + c * g.soc] = from_float<T>(g.is_max ? v : v / static_cast<float>(g.R));
      if (idx != nullptr) idx[n * g.sin + c * g.sic] = i;
    }
  }
}

// NCHW planes of contiguous pixels, a whole number of 16-byte vectors each (flat, pixel stride 1,
// R and the plane strides multiples of V = 16 / sizeof(T), x aligned): as global_pool_rows_kernel,
// V neighbouring pixels per lane and 128-bit load; each lane still scans its pixels in increasing
// order, and max_combine is a total order, so the result is torch's. The lanes' partials combine
// through shared memory (lane 0, in lane order): warp shuffles would compile to divergence fallbacks
// that branch back over the stores.
template <class T, class I>
__global__ void __launch_bounds__(kThreads)
global_pool_rows_vec_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t* __restrict__ idx,
                            GlobalGeom<I> g) {
  constexpr int V = 16 / sizeof(T);
  __shared__ float sval[kThreads];
  __shared__ int64_t sidx[kThreads];
  const int lane = threadIdx.x % 32, base = threadIdx.x - lane;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t plane = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32;
       plane < static_cast<int64_t>(g.N) * g.C; plane += warps) {  // uniform within a warp
    const I n = static_cast<I>(plane / g.C), c = static_cast<I>(plane % g.C);
    const T* xp = x + n * g.sxn + c * g.sxc;
    float v = g.is_max ? -INFINITY : 0.f;
    int64_t i = kNoIndex;
    for (I r = lane * V; r < g.R; r += 32 * V) {
      float a[V];
      load_vec<T, V>(xp + r, a);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (g.is_max) scan_step(v, i, a[j], r + j);
        else v += a[j];
      }
    }
    sval[threadIdx.x] = v;
    sidx[threadIdx.x] = i;
    __syncwarp();
    if (lane == 0) {
      for (int l = 1; l < 32; ++l) {
        if (g.is_max) max_combine(v, i, sval[base + l], sidx[base + l]);
        else v += sval[base + l];
      }
      out[n * g.son + c * g.soc] = from_float<T>(g.is_max ? v : v / static_cast<float>(g.R));
      if (idx != nullptr) idx[n * g.sin + c * g.sic] = i;
    }
    __syncwarp();  // lane 0 has read the partials before the next plane overwrites them
  }
}

// Channels-last planes: a block of 32 x VEC channels x 8 pixel slices; each thread scans its slice
// (pixels r = slice, slice + 8, ...) for its VEC neighbouring channels (one 16-byte load per pixel
// when VEC > 1: channel stride 1, C and the other strides multiples of VEC, x aligned), then the 8
// slices combine in shared memory. Per channel, the same operations in the same order for any VEC.
constexpr int kColSlices = 8;
template <class T, class I, int VEC>
__global__ void __launch_bounds__(32 * kColSlices)
global_pool_cols_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t* __restrict__ idx, GlobalGeom<I> g) {
  __shared__ float sval[kColSlices][32 * VEC];
  __shared__ int64_t sidx[kColSlices][32 * VEC];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t groups = (static_cast<int64_t>(g.C) + 32 * VEC - 1) / (32 * VEC);
  for (int64_t b = blockIdx.x; b < static_cast<int64_t>(g.N) * groups; b += gridDim.x) {  // uniform per block
    const I n = static_cast<I>(b / groups), c = static_cast<I>(((b % groups) * 32 + tx) * VEC);
    float v[VEC];
    int64_t i[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      v[j] = g.is_max ? -INFINITY : 0.f;
      i[j] = kNoIndex;
    }
    if (c < g.C) {
      const T* xp = x + n * g.sxn + c * g.sxc;
      for (I r = ty; r < g.R; r += kColSlices) {
        float a[VEC];
        load_vec<T, VEC>(xp + pixel_offset(g, r), a);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if (g.is_max) scan_step(v[j], i[j], a[j], r);
          else v[j] += a[j];
        }
      }
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      sval[ty][tx * VEC + j] = v[j];
      sidx[ty][tx * VEC + j] = i[j];
    }
    __syncthreads();
    if (ty == 0 && c < g.C) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        for (int k = 1; k < kColSlices; ++k) {
          if (g.is_max) max_combine(v[j], i[j], sval[k][tx * VEC + j], sidx[k][tx * VEC + j]);
          else v[j] += sval[k][tx * VEC + j];
        }
        if (!g.is_max) v[j] /= static_cast<float>(g.R);
      }
      if constexpr (VEC == 1) {
        out[n * g.son + c * g.soc] = from_float<T>(v[0]);
        if (idx != nullptr) idx[n * g.sin + c * g.sic] = i[0];
      } else {  // out's channels contiguous and aligned, the indices in pairs (global_pool2d): 128-bit stores
        store_vec<T, VEC>(out + n * g.son + c, v);
        if (idx != nullptr) {
#pragma unroll
          for (int j = 0; j < VEC; j += 2)
            reinterpret_cast<longlong2*>(idx + n * g.sin + c)[j / 2] = make_longlong2(i[j], i[j + 1]);
        }
      }
    }
    __syncthreads();
  }
}

// ------------------------------------------------------------------------------------------------
// Host side.

void require_4d(const Shape& v, const char* what) {
  require(v.size() == 4, std::string(what) + " must have 4 entries, got " + std::to_string(v.size()));
}

// One past the largest element offset of a tensor (sizes > 0).
int64_t span(const Shape& shape, const Shape& strides) {
  int64_t s = 1;
  for (size_t d = 0; d < shape.size(); ++d) s += (shape[d] - 1) * (strides[d] < 0 ? -strides[d] : strides[d]);
  return s;
}

// The widest VEC (16 bytes at most) such that the channels are contiguous in every listed tensor,
// C and every other stride are multiples of VEC and every pointer is VEC-aligned; else 1.
int vec_width(int64_t C, int elem_bytes, std::initializer_list<std::pair<std::uintptr_t, const Shape*>> ts) {
  for (int vec = 16 / elem_bytes; vec > 1; vec /= 2) {
    bool ok = C % vec == 0;
    for (const auto& [p, st] : ts) {
      const Shape& s = *st;
      ok = ok && s[1] == 1 && s[0] % vec == 0 && s[2] % vec == 0 && s[3] % vec == 0 &&
           p % static_cast<std::uintptr_t>(vec * elem_bytes) == 0;
    }
    if (ok) return vec;
  }
  return 1;
}

template <class I>
Geom<I> make_geom(const Shape& in_shape, const Shape& out_shape, const Shape& sx, const Shape& so, const Shape& si,
                  const Shape& window, int64_t divisor, bool is_max, bool adaptive, bool count_include_pad,
                  bool channels_last, bool idx_pairs) {
  Geom<I> g{};
  g.N = static_cast<I>(in_shape[0]), g.C = static_cast<I>(in_shape[1]);
  g.H = static_cast<I>(in_shape[2]), g.W = static_cast<I>(in_shape[3]);
  g.OH = static_cast<I>(out_shape[2]), g.OW = static_cast<I>(out_shape[3]);
  for (int d = 0; d < 4; ++d) {
    g.sx[d] = static_cast<I>(sx[d]);
    g.so[d] = static_cast<I>(so[d]);
    g.si[d] = static_cast<I>(si[d]);
  }
  g.kh = static_cast<I>(window[0]), g.kw = static_cast<I>(window[1]);
  g.sh = static_cast<I>(window[2]), g.sw = static_cast<I>(window[3]);
  g.ph = static_cast<I>(window[4]), g.pw = static_cast<I>(window[5]);
  g.dh = static_cast<I>(window[6]), g.dw = static_cast<I>(window[7]);
  g.divisor = divisor;
  g.is_max = is_max, g.adaptive = adaptive, g.count_include_pad = count_include_pad;
  g.channels_last = channels_last;
  g.idx_pairs = idx_pairs;
  return g;
}

void check_window(bool adaptive, const Shape& window) {
  require(window.size() == 8, "window must be {kh, kw, sh, sw, ph, pw, dh, dw}");
  if (adaptive) return;
  for (int d = 0; d < 2; ++d) {
    require(window[d] > 0 && window[2 + d] > 0 && window[6 + d] > 0, "kernel, stride and dilation must be positive");
    require(window[4 + d] >= 0, "padding must be non-negative");
  }
}

// Whether the int64 indices move two per 128-bit access on the vector paths: channel stride 1,
// the other strides even, the pointer 16-byte aligned (VEC channels start at an even channel).
bool pairs_ok(std::uintptr_t idx, const Shape& si) {
  return idx != 0 && idx % 16 == 0 && si[1] == 1 && si[0] % 2 == 0 && si[2] % 2 == 0 && si[3] % 2 == 0;
}

// Whether int32 indexing is exact: every offset, flat index and product below 2^31.
bool fits_int32(std::initializer_list<int64_t> values) {
  for (int64_t v : values)
    if (v > std::numeric_limits<int32_t>::max()) return false;
  return true;
}

template <class T, class I, int VEC>
void run_forward(const T* x, T* out, int64_t* idx, const Geom<I>& g, cudaStream_t s) {
  const int64_t total = static_cast<int64_t>(g.N) * g.C / VEC * g.OH * g.OW;
  pool2d_forward_kernel<T, I, VEC><<<grid_x(ceil_div(total, kThreads)), kThreads, 0, s>>>(x, out, idx, g, total);
  FN_LAUNCH_CHECK("pool2d_forward_kernel");
}

template <class T, class I, int VEC>
void run_backward(const T* gout, const int64_t* idx, T* gin, const Geom<I>& g, cudaStream_t s) {
  const int64_t total = static_cast<int64_t>(g.N) * g.C / VEC * g.H * g.W;
  pool2d_backward_kernel<T, I, VEC><<<grid_x(ceil_div(total, kThreads)), kThreads, 0, s>>>(gout, idx, gin, g, total);
  FN_LAUNCH_CHECK("pool2d_backward_kernel");
}

// Calls f(VEC) as a compile-time constant.
template <class F>
void dispatch_vec(int vec, F&& f) {
  switch (vec) {
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

}  // namespace

void pool2d_forward(std::uintptr_t x, const Shape& x_shape, const Shape& x_strides, std::uintptr_t out,
                    const Shape& out_shape, const Shape& out_strides, std::uintptr_t indices,
                    const Shape& idx_strides, int dtype, bool is_max, bool adaptive, const Shape& window,
                    bool count_include_pad, int64_t divisor, std::uintptr_t stream) {
  require_4d(x_shape, "x_shape"), require_4d(x_strides, "x_strides"), require_4d(out_shape, "out_shape");
  require_4d(out_strides, "out_strides"), require_4d(idx_strides, "idx_strides");
  check_window(adaptive, window);
  for (int d = 0; d < 4; ++d) require(x_shape[d] > 0 && out_shape[d] > 0, "pool2d_forward: empty tensors launch nothing");
  require(out_shape[0] == x_shape[0] && out_shape[1] == x_shape[1], "x and out must agree in N and C");
  require(x != 0 && out != 0, "null pointer");
  const int64_t H = x_shape[2], W = x_shape[3], OH = out_shape[2], OW = out_shape[3];
  const bool narrow = fits_int32({span(x_shape, x_strides), span(out_shape, out_strides),
                                  indices ? span(out_shape, idx_strides) : 0, x_shape[0] * x_shape[1] * OH * OW,
                                  (H + 1) * (OH + 1), (W + 1) * (OW + 1), H * W,
                                  OH * window[2] + (window[0] + 1) * window[6] + H + window[4],
                                  OW * window[3] + (window[1] + 1) * window[7] + W + window[5]});
  const bool channels_last = out_strides[1] == 1 && x_shape[1] > 1;
  int64_t* idx = is_max && indices ? as_ptr<int64_t>(indices) : nullptr;
  const bool idx_pairs = pairs_ok(idx != nullptr ? indices : 0, idx_strides);
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int vec = channels_last ? vec_width(x_shape[1], sizeof(T), {{x, &x_strides}, {out, &out_strides}}) : 1;
    dispatch_vec(vec, [&](auto v) {
      constexpr int VEC = decltype(v)::value;
      if (narrow) {
        run_forward<T, int32_t, VEC>(as_ptr<const T>(x), as_ptr<T>(out), idx,
                                     make_geom<int32_t>(x_shape, out_shape, x_strides, out_strides, idx_strides, window,
                                                        divisor, is_max, adaptive, count_include_pad, channels_last,
                                                        idx_pairs),
                                     as_stream(stream));
      } else {
        run_forward<T, int64_t, VEC>(as_ptr<const T>(x), as_ptr<T>(out), idx,
                                     make_geom<int64_t>(x_shape, out_shape, x_strides, out_strides, idx_strides, window,
                                                        divisor, is_max, adaptive, count_include_pad, channels_last,
                                                        idx_pairs),
                                     as_stream(stream));
      }
    });
  });
}

void pool2d_backward(std::uintptr_t grad_out, const Shape& go_shape, const Shape& go_strides,
                     std::uintptr_t indices, const Shape& idx_strides, std::uintptr_t grad_in,
                     const Shape& gi_shape, const Shape& gi_strides, int dtype, bool is_max, bool adaptive,
                     const Shape& window, bool count_include_pad, int64_t divisor, std::uintptr_t stream) {
  require_4d(go_shape, "go_shape"), require_4d(go_strides, "go_strides"), require_4d(idx_strides, "idx_strides");
  require_4d(gi_shape, "gi_shape"), require_4d(gi_strides, "gi_strides");
  check_window(adaptive, window);
  for (int d = 0; d < 4; ++d) require(go_shape[d] > 0 && gi_shape[d] > 0, "pool2d_backward: empty tensors launch nothing");
  require(go_shape[0] == gi_shape[0] && go_shape[1] == gi_shape[1], "grad_out and grad_in must agree in N and C");
  require(grad_out != 0 && grad_in != 0 && (!is_max || indices != 0), "null pointer");
  const int64_t H = gi_shape[2], W = gi_shape[3], OH = go_shape[2], OW = go_shape[3];
  const bool narrow = fits_int32({span(go_shape, go_strides), span(gi_shape, gi_strides),
                                  is_max ? span(go_shape, idx_strides) : 0, gi_shape[0] * gi_shape[1] * H * W,
                                  (H + 1) * (OH + 1), (W + 1) * (OW + 1), H * W,
                                  H + window[4] + window[0] * window[6] + window[2],
                                  W + window[5] + window[1] * window[7] + window[3]});
  const bool channels_last = gi_strides[1] == 1 && gi_shape[1] > 1;
  const int64_t* idx = is_max ? as_ptr<const int64_t>(indices) : nullptr;
  const bool idx_pairs = pairs_ok(is_max ? indices : 0, idx_strides);
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    // The vector path of max pooling reads the indices two per 128-bit load (idx_pairs); without
    // pairs, the scalar kernel.
    const int vec = channels_last && (!is_max || idx_pairs)
                        ? vec_width(gi_shape[1], sizeof(T), {{grad_out, &go_strides}, {grad_in, &gi_strides}})
                        : 1;
    dispatch_vec(vec, [&](auto v) {
      constexpr int VEC = decltype(v)::value;
      if (narrow) {
        run_backward<T, int32_t, VEC>(as_ptr<const T>(grad_out), idx, as_ptr<T>(grad_in),
                                      make_geom<int32_t>(gi_shape, go_shape, gi_strides, go_strides, idx_strides, window,
                                                         divisor, is_max, adaptive, count_include_pad, channels_last,
                                                        idx_pairs),
                                      as_stream(stream));
      } else {
        run_backward<T, int64_t, VEC>(as_ptr<const T>(grad_out), idx, as_ptr<T>(grad_in),
                                      make_geom<int64_t>(gi_shape, go_shape, gi_strides, go_strides, idx_strides, window,
                                                         divisor, is_max, adaptive, count_include_pad, channels_last,
                                                        idx_pairs),
                                      as_stream(stream));
      }
    });
  });
}

namespace {
template <class T, class I>
void run_global(const T* x, T* out, int64_t* idx, const GlobalGeom<I>& g, bool channels_last, bool wide,
                cudaStream_t s) {
  // wide: 16 bytes per load (channels_last: of channels, out and idx stored 128-bit; NCHW: of pixels).
  if (channels_last) {
    constexpr int V = 16 / sizeof(T);
    if (wide) {  // 16 bytes of channels per thread
      const int64_t blocks = static_cast<int64_t>(g.N) * ceil_div(g.C, 32 * V);
      global_pool_cols_kernel<T, I, V><<<grid_x(blocks), dim3(32, kColSlices), 0, s>>>(x, out, idx, g);
      FN_LAUNCH_CHECK("global_pool_cols_kernel (128-bit)");
      return;
    }
    const int64_t blocks = static_cast<int64_t>(g.N) * ceil_div(g.C, 32);
    global_pool_cols_kernel<T, I, 1><<<grid_x(blocks), dim3(32, kColSlices), 0, s>>>(x, out, idx, g);
    FN_LAUNCH_CHECK("global_pool_cols_kernel");
  } else {
    const int64_t blocks = ceil_div(static_cast<int64_t>(g.N) * g.C, kThreads / 32);
    if (wide) {
      global_pool_rows_vec_kernel<T, I><<<grid_x(blocks), kThreads, 0, s>>>(x, out, idx, g);
      FN_LAUNCH_CHECK("global_pool_rows_vec_kernel");
      return;
    }
    global_pool_rows_kernel<T, I><<<grid_x(blocks), kThreads, 0, s>>>(x, out, idx, g);
    FN_LAUNCH_CHECK("global_pool_rows_kernel");
  }
}

template <class I>
GlobalGeom<I> make_global_geom(const Shape& shape, const Shape& sx, const Shape& so, const Shape& si, bool is_max) {
  GlobalGeom<I> g{};
  g.N = static_cast<I>(shape[0]), g.C = static_cast<I>(shape[1]), g.W = static_cast<I>(shape[3]);
  g.R = static_cast<I>(shape[2] * shape[3]);
  g.sxn = static_cast<I>(sx[0]), g.sxc = static_cast<I>(sx[1]), g.sxh = static_cast<I>(sx[2]);
  g.sxw = static_cast<I>(sx[3]);
  g.son = static_cast<I>(so[0]), g.soc = static_cast<I>(so[1]);
  g.sin = static_cast<I>(si[0]), g.sic = static_cast<I>(si[1]);
  g.is_max = is_max;
  g.flat = shape[2] == 1 || sx[2] == shape[3] * sx[3];
  return g;
}
}  // namespace

void global_pool2d(std::uintptr_t x, const Shape& x_shape, const Shape& x_strides, std::uintptr_t out,
                   const Shape& out_strides, std::uintptr_t indices, const Shape& idx_strides, int dtype,
                   bool is_max, std::uintptr_t stream) {
  require_4d(x_shape, "x_shape"), require_4d(x_strides, "x_strides"), require_4d(out_strides, "out_strides");
  require_4d(idx_strides, "idx_strides");
  for (int d = 0; d < 4; ++d) require(x_shape[d] > 0, "global_pool2d: empty tensors launch nothing");
  require(x != 0 && out != 0, "null pointer");
  const Shape out_shape{x_shape[0], x_shape[1], 1, 1};
  const bool narrow = fits_int32({span(x_shape, x_strides), span(out_shape, out_strides),
                                  indices ? span(out_shape, idx_strides) : 0, x_shape[0] * x_shape[1],
                                  x_shape[2] * x_shape[3] + 32});
  const bool channels_last = x_strides[1] == 1 && x_shape[1] > 1;
  int64_t* idx = is_max && indices ? as_ptr<int64_t>(indices) : nullptr;
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int64_t V = 16 / sizeof(T);
    // channels_last: x's channels by 16-byte vectors, out's channels contiguous and aligned, the
    // indices (if any) in aligned pairs; NCHW: each plane contiguous, a whole number of vectors.
    const bool wide =
        channels_last
            ? vec_width(x_shape[1], sizeof(T), {{x, &x_strides}}) == static_cast<int>(V) && out_strides[1] == 1 &&
                  out_strides[0] % V == 0 && out % 16 == 0 &&
                  (idx == nullptr || (idx_strides[1] == 1 && idx_strides[0] % 2 == 0 && indices % 16 == 0))
            : x_strides[3] == 1 && (x_shape[2] == 1 || x_strides[2] == x_shape[3]) &&
                  (x_shape[2] * x_shape[3]) % V == 0 && x_strides[0] % V == 0 && x_strides[1] % V == 0 &&
                  x % 16 == 0;
    if (narrow) {
      run_global<T, int32_t>(as_ptr<const T>(x), as_ptr<T>(out), idx,
                             make_global_geom<int32_t>(x_shape, x_strides, out_strides, idx_strides, is_max),
                             channels_last, wide, as_stream(stream));
    } else {
      run_global<T, int64_t>(as_ptr<const T>(x), as_ptr<T>(out), idx,
                             make_global_geom<int64_t>(x_shape, x_strides, out_strides, idx_strides, is_max),
                             channels_last, wide, as_stream(stream));
    }
  });
}

}  // namespace fastnets
