// Batch-norm + residual + activation, CUDA C++ (the algorithm of fastnets/kernels/norm_act.py,
// where the byte counts against the memory floor are worked out).
//
// Every tensor is [N, C, S] with its own strides. Rows are r = n * S + s (N * S = R per channel).
// Reductions (training statistics; the backward's sums of dz and dz * xhat) run in two levels and
// in a fixed order, so the results are deterministic (no atomics):
//   1. a block of (TC channels) x (TR row lanes) threads owns a contiguous range of rows_per rows
//      (blockIdx.y = the partial p): each thread accumulates its rows (Welford on x - K for the
//      statistics, K a per-channel shift; plain sums for the backward), the block merges its TR
//      lanes in a tree in shared memory (Chan's formula for the statistics) and writes the partial
//      [p, c];
//   2. one thread per channel merges the P partials in order, then writes the result (and updates
//      the running statistics).
// TC = 32 channels with TR = 8 lanes when the channels are contiguous (channels_last: a warp reads
// 32 neighbouring channels), TC = 1 with TR = 256 lanes along the positions otherwise (NCHW).
// Elementwise passes (forward, the backward's dx) take one element per thread in the memory order
// of x (channels fastest for channels_last, positions fastest for NCHW), in a grid-stride loop.
// The elementwise passes and the reductions have a 128-bit path for channels_last (V channels per
// thread, csrc/vec.h).
// Math in float32. Index arithmetic in I = int32 when every offset fits with margin, else int64.
#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <type_traits>

#include "activation.h"
#include "norm_act.h"
#include "vec.h"

namespace fastnets {
namespace {

constexpr int kThreads = 256;     // threads per block, every kernel
constexpr int kChannelTile = 32;  // channels per block of the reductions when channels are contiguous

template <class I>
struct Geo {
  I N, C, S;
  I R;      // N * S rows per channel
  I total;  // N * C * S elements
  bool channels_inner;
};

template <class I>
struct View {  // strides in elements
  I n, c, s;
  __device__ __forceinline__ I at(I n_, I c_, I s_) const { return n_ * n + c_ * c + s_ * s; }
};

struct Channel {   // per-channel float32 [C] vectors
  const float* mean;
  const float* var;
  const float* w;  // may be null: 1
  const float* b;  // may be null: 0
  float eps;
};

// Merges the statistics (nb, mb, qb) (count, mean, M2) into (na, ma, qa): Chan et al.'s formula,
// with the mean as a weighted average so that an Inf value gives an Inf mean (as torch's).
__device__ __forceinline__ void chan_merge(float& na, float& ma, float& qa, float nb, float mb, float qb) {
  if (nb == 0.f) return;
  if (na == 0.f) {
    na = nb;
    ma = mb;
    qa = qb;
    return;
  }
  const float n = na + nb;
  const float wb = nb / n;
  const float delta = mb - ma;
  ma = ma * (na / n) + mb * wb;
  qa = qa + qb + delta * delta * na * wb;
  na = n;
}

// Each channel's shift K = x[0, c, 0] (0 where that value is not finite). The statistics are
// accumulated on x - K, which is of the order of the spread rather than of the mean, so that a large
// mean costs no precision (Welford's running mean of raw values would drift by ulps of the mean at
// every update); the batch mean is K + the shifted mean, rounded once.
template <class T>
__device__ __forceinline__ float shift_of(const T* __restrict__ x, int64_t c, int64_t stride_c) {
  const float k = to_float(x[c * stride_c]);
  return fabsf(k) < INFINITY ? k : 0.f;
}

template <class I>
__device__ __forceinline__ void split(I idx, const Geo<I>& g, I* n, I* c, I* s) {
  if (g.channels_inner) {
    *c = idx % g.C;
    const I t = idx / g.C;
    *s = t % g.S;
    *n = t / g.S;
  } else {
    *s = idx % g.S;
    const I t = idx / g.S;
    *c = t % g.C;
    *n = t / g.C;
  }
}

// z = xhat * w + b (+ r), xhat = (x - mean) * invstd; also returns xhat and invstd * w. Every kernel
// computes z with these same operations, so they agree on the side of an activation's kink.
template <class T, class I>
__device__ __forceinline__ float pre_activation(const T* __restrict__ x, const T* __restrict__ r, const View<I>& sx,
                                                const View<I>& sr, I n, I c, I s, const Channel& ch, float* xhat,
                                                float* scale) {
  const float invstd = 1.f / sqrtf(ch.var[c] + ch.eps);
  const float w = ch.w ? ch.w[c] : 1.f;
  const float b = ch.b ? ch.b[c] : 0.f;
  *xhat = (to_float(x[sx.at(n, c, s)]) - ch.mean[c]) * invstd;
  *scale = invstd * w;
  float z = *xhat * w + b;
  if (r) z += to_float(r[sr.at(n, c, s)]);
  return z;
}

// ---------------------------------------------------------------------------------------------
// Training statistics.

// V = 1: one channel per thread, any strides. V = vec_width<T>() (channels_last, channel stride 1,
// C and the other strides multiples of V, x, pmean and pm2 aligned): V neighbouring channels per
// thread, one 128-bit load per row (and for the shifts), the float32 partials by 128-bit stores; per
// channel the same operations in the same order.
template <class T, class I, int V>
__global__ void stats_partial_kernel(const T* __restrict__ x, Geo<I> g, View<I> sx, I rows_per,
                                     float* __restrict__ pmean, float* __restrict__ pm2) {
  __shared__ float sh_n[kThreads], sh_mean[kThreads * V], sh_m2[kThreads * V];
  const int tc = threadIdx.x, tr = threadIdx.y, TC = blockDim.x, TR = blockDim.y;
  const I c = (static_cast<I>(blockIdx.x) * TC + tc) * V;
  const I p = static_cast<I>(blockIdx.y);
  const I r0 = p * rows_per;
  const I r1 = std::min<I>(r0 + rows_per, g.R);
  float cnt = 0.f, mean[V], m2[V], k[V];
#pragma unroll
  for (int j = 0; j < V; ++j) mean[j] = m2[j] = k[j] = 0.f;
  if (c < g.C) {
    if constexpr (V == 1) {
      k[0] = shift_of(x, c, sx.c);
    } else {  // channel stride 1 on the vector path: the V shifts by one 128-bit load
      load_vec<V>(x + c, k);
#pragma unroll
      for (int j = 0; j < V; ++j) k[j] = fabsf(k[j]) < INFINITY ? k[j] : 0.f;
    }
    for (I r = r0 + tr; r < r1; r += TR) {  // Welford on x - K, one value at a time
      const I n = r / g.S;
      float v[V];
      if constexpr (V == 1) {
        v[0] = to_float(x[sx.at(n, c, r - n * g.S)]);
      } else {
        load_vec<V>(x + sx.at(n, c, r - n * g.S), v);
      }
      cnt += 1.f;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float vj = v[j] - k[j];
        const float d = vj - mean[j];
        mean[j] += d / cnt;
        m2[j] += d * (vj - mean[j]);
      }
    }
  }
  const int t = tr * TC + tc;
  sh_n[t] = cnt;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    sh_mean[t * V + j] = mean[j];
    sh_m2[t * V + j] = m2[j];
  }
  __syncthreads();
  for (int half = TR / 2; half > 0; half >>= 1) {  // a fixed tree: deterministic
    if (tr < half) {
      const int o = (tr + half) * TC + tc;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float na = sh_n[t];
        chan_merge(na, sh_mean[t * V + j], sh_m2[t * V + j], sh_n[o], sh_mean[o * V + j], sh_m2[o * V + j]);
        if (j == V - 1) sh_n[t] = na;
      }
    }
    __syncthreads();
  }
  if (tr == 0 && c < g.C) {
    const int64_t out = static_cast<int64_t>(p) * g.C + c;
    if constexpr (V == 1) {
      pmean[out] = sh_mean[tc];
      pm2[out] = sh_m2[tc];
    } else {  // C a multiple of V and pmean/pm2 16-byte aligned (vector_path): float32 partials by 128-bit stores
      float mo[V], qo[V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        mo[j] = sh_mean[tc * V + j];
        qo[j] = sh_m2[tc * V + j];
      }
      store_vec<V>(pmean + out, mo);
      store_vec<V>(pm2 + out, qo);
    }
  }
}

template <class T>
__global__ void stats_finalize_kernel(const T* __restrict__ x, int64_t stride_c, const float* __restrict__ pmean,
                                      const float* __restrict__ pm2, int64_t P,
                                      int64_t rows_per, int64_t R, const float* __restrict__ bmean,
                                      const float* __restrict__ bvar, float* __restrict__ mean,
                                      float* __restrict__ var, float* __restrict__ rmean, float* __restrict__ rvar,
                                      int64_t C, float momentum, float unbias) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float m, v;
  if (pmean) {
    float cnt = 0.f, mu = 0.f, q = 0.f;
    for (int64_t p = 0; p < P; ++p) {  // in order: deterministic
      const float nb = static_cast<float>(std::min<int64_t>(rows_per, R - p * rows_per));
      chan_merge(cnt, mu, q, nb, pmean[p * C + c], pm2[p * C + c]);
    }
    m = shift_of(x, c, stride_c) + mu;
    v = q / cnt;
  } else {
    m = bmean[c];
    v = bvar[c];
  }
  mean[c] = m;
  var[c] = v;
  if (rmean) {
    rmean[c] = momentum * m + (1.f - momentum) * rmean[c];
    rvar[c] = momentum * (v * unbias) + (1.f - momentum) * rvar[c];
  }
}

// ---------------------------------------------------------------------------------------------
// Forward: one pass.

template <class T, class I>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ y, Geo<I> g,
                               View<I> sx, View<I> sr, View<I> sy, Channel ch, int act) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < g.total; i += step) {
    I n, c, s;
    split(static_cast<I>(i), g, &n, &c, &s);
    float xhat, scale;
    const float z = pre_activation(x, r, sx, sr, n, c, s, ch, &xhat, &scale);
    y[sy.at(n, c, s)] = from_float<T>(act_fwd(z, act));
  }
}

// The 128-bit path of the elementwise passes (channels_last): V = vec_width<T>() neighbouring
// channels of one position per thread; every tensor has channel stride 1, C and the other strides
// are multiples of V, and every pointer (the float32 per-channel vectors too) is 16-byte aligned.
// The same operations as pre_activation, channel by channel.
template <int V, class T, class I>
__device__ __forceinline__ void pre_activation_vec(const T* __restrict__ x, const T* __restrict__ r,
                                                   const View<I>& sx, const View<I>& sr, I n, I c, I s,
                                                   const Channel& ch, float (&z)[V], float (&xhat)[V],
                                                   float (&scale)[V]) {
  float xv[V], mean[V], var[V], w[V], b[V], rv[V];
  load_vec<V>(x + sx.at(n, c, s), xv);
  load_vec<V>(ch.mean + c, mean);
  load_vec<V>(ch.var + c, var);
  if (ch.w) load_vec<V>(ch.w + c, w);
  if (ch.b) load_vec<V>(ch.b + c, b);
  if (r) load_vec<V>(r + sr.at(n, c, s), rv);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const float invstd = 1.f / sqrtf(var[k] + ch.eps);
    const float wk = ch.w ? w[k] : 1.f;
    const float bk = ch.b ? b[k] : 0.f;
    xhat[k] = (xv[k] - mean[k]) * invstd;
    scale[k] = invstd * wk;
    z[k] = xhat[k] * wk + bk;
    if (r) z[k] += rv[k];
  }
}

// The flat vector index i (channels fastest) as (n, first channel, s).
template <int V, class I>
__device__ __forceinline__ void split_vec(int64_t i, const Geo<I>& g, I* n, I* c, I* s) {
  const I e = static_cast<I>(i * V);
  *c = e % g.C;
  const I t = e / g.C;
  *s = t % g.S;
  *n = t / g.S;
}

template <class T, class I>
__global__ void forward_vec_kernel(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ y, Geo<I> g,
                                   View<I> sx, View<I> sr, View<I> sy, Channel ch, int act) {
  constexpr int V = vec_width<T>();
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < g.total / V; i += step) {
    I n, c, s;
    split_vec<V>(i, g, &n, &c, &s);
    float z[V], xhat[V], scale[V];
    pre_activation_vec<V>(x, r, sx, sr, n, c, s, ch, z, xhat, scale);
#pragma unroll
    for (int k = 0; k < V; ++k) z[k] = act_fwd(z[k], act);
    store_vec<V>(y + sy.at(n, c, s), z);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: the reduction pass (partials, then a fixed-order sum), then the elementwise pass.

// V as in stats_partial_kernel (the vector path also needs dy and the residual channels_last).
template <class T, class I, int V>
__global__ void bwd_reduce_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ r,
                                  Geo<I> g, View<I> sdy, View<I> sx, View<I> sr, Channel ch, int act, I rows_per,
                                  float* __restrict__ psum_dz, float* __restrict__ psum_dzx) {
  __shared__ float sh_a[kThreads * V], sh_b[kThreads * V];
  const int tc = threadIdx.x, tr = threadIdx.y, TC = blockDim.x, TR = blockDim.y;
  const I c = (static_cast<I>(blockIdx.x) * TC + tc) * V;
  const I p = static_cast<I>(blockIdx.y);
  const I r0 = p * rows_per;
  const I r1 = std::min<I>(r0 + rows_per, g.R);
  float a[V], b[V];
#pragma unroll
  for (int j = 0; j < V; ++j) a[j] = b[j] = 0.f;
  if (c < g.C) {
    for (I row = r0 + tr; row < r1; row += TR) {
      const I n = row / g.S, s = row - n * g.S;
      if constexpr (V == 1) {
        float xhat, scale;
        const float z = pre_activation(x, r, sx, sr, n, c, s, ch, &xhat, &scale);
        const float dz = act_bwd(z, to_float(dy[sdy.at(n, c, s)]), act);
        a[0] += dz;
        b[0] += dz * xhat;
      } else {
        float z[V], xhat[V], scale[V], gv[V];
        pre_activation_vec<V>(x, r, sx, sr, n, c, s, ch, z, xhat, scale);
        load_vec<V>(dy + sdy.at(n, c, s), gv);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float dz = act_bwd(z[j], gv[j], act);
          a[j] += dz;
          b[j] += dz * xhat[j];
        }
      }
    }
  }
  const int t = tr * TC + tc;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    sh_a[t * V + j] = a[j];
    sh_b[t * V + j] = b[j];
  }
  __syncthreads();
  for (int half = TR / 2; half > 0; half >>= 1) {
    if (tr < half) {
      const int o = (tr + half) * TC + tc;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        sh_a[t * V + j] += sh_a[o * V + j];
        sh_b[t * V + j] += sh_b[o * V + j];
      }
    }
    __syncthreads();
  }
  if (tr == 0 && c < g.C) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t out = static_cast<int64_t>(p) * g.C + c + j;
      psum_dz[out] = sh_a[tc * V + j];
      psum_dzx[out] = sh_b[tc * V + j];
    }
  }
}

__global__ void bwd_finalize_kernel(const float* __restrict__ psum_dz, const float* __restrict__ psum_dzx, int64_t P,
                                    float* __restrict__ sum_dz, float* __restrict__ sum_dzx, int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float a = 0.f, b = 0.f;
  for (int64_t p = 0; p < P; ++p) {  // in order: deterministic
    a += psum_dz[p * C + c];
    b += psum_dzx[p * C + c];
  }
  sum_dz[c] = a;
  sum_dzx[c] = b;
}

template <class T, class I>
__global__ void bwd_apply_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ r,
                                 T* __restrict__ dx, T* __restrict__ dr, Geo<I> g, View<I> sdy, View<I> sx,
                                 View<I> sr, View<I> sdx, View<I> sdr, Channel ch, int act,
                                 const float* __restrict__ sum_dz, const float* __restrict__ sum_dzx, float inv_count,
                                 bool train) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < g.total; i += step) {
    I n, c, s;
    split(static_cast<I>(i), g, &n, &c, &s);
    float xhat, scale;
    const float z = pre_activation(x, r, sx, sr, n, c, s, ch, &xhat, &scale);
    const float dz = act_bwd(z, to_float(dy[sdy.at(n, c, s)]), act);
    if (dr) dr[sdr.at(n, c, s)] = from_float<T>(dz);
    if (dx) {
      const float v = train ? (dz - sum_dz[c] * inv_count - xhat * (sum_dzx[c] * inv_count)) * scale : dz * scale;
      dx[sdx.at(n, c, s)] = from_float<T>(v);
    }
  }
}

template <class T, class I>
__global__ void bwd_apply_vec_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ r,
                                     T* __restrict__ dx, T* __restrict__ dr, Geo<I> g, View<I> sdy, View<I> sx,
                                     View<I> sr, View<I> sdx, View<I> sdr, Channel ch, int act,
                                     const float* __restrict__ sum_dz, const float* __restrict__ sum_dzx,
                                     float inv_count, bool train) {
  constexpr int V = vec_width<T>();
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < g.total / V; i += step) {
    I n, c, s;
    split_vec<V>(i, g, &n, &c, &s);
    float z[V], xhat[V], scale[V], dz[V];
    pre_activation_vec<V>(x, r, sx, sr, n, c, s, ch, z, xhat, scale);
    load_vec<V>(dy + sdy.at(n, c, s), dz);
#pragma unroll
    for (int k = 0; k < V; ++k) dz[k] = act_bwd(z[k], dz[k], act);
    if (dr) store_vec<V>(dr + sdr.at(n, c, s), dz);
    if (dx) {
      float a[V], b[V], v[V];
      if (train) {
        load_vec<V>(sum_dz + c, a);
        load_vec<V>(sum_dzx + c, b);
      }
#pragma unroll
      for (int k = 0; k < V; ++k) {
        v[k] = train ? (dz[k] - a[k] * inv_count - xhat[k] * (b[k] * inv_count)) * scale[k] : dz[k] * scale[k];
      }
      store_vec<V>(dx + sdx.at(n, c, s), v);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

void check_dims(const Shape& dims, std::initializer_list<const Shape*> strides) {
  require(dims.size() == 3, "norm_act: dims must be [N, C, S]");
  for (const Shape* st : strides) require(st->size() == 3, "norm_act: every tensor needs 3 strides");
  for (int64_t d : dims) require(d >= 1, "norm_act: every dim must be >= 1 (the op returns early for empty input)");
}

// int32 indexing when the element count (with room for a grid-stride step and a row range) and
// every tensor's largest offset fit.
bool fits_int32(const Shape& dims, std::initializer_list<const Shape*> strides) {
  const int64_t total = dims[0] * dims[1] * dims[2];
  if (total >= (int64_t{1} << 30)) return false;
  for (const Shape* st : strides) {
    int64_t last = 0;
    for (int i = 0; i < 3; ++i) last += (dims[i] - 1) * std::abs((*st)[i]);
    if (last >= (int64_t{1} << 31)) return false;
  }
  return true;
}

template <class I>
Geo<I> geometry(const Shape& dims, bool channels_inner) {
  Geo<I> g;
  g.N = static_cast<I>(dims[0]);
  g.C = static_cast<I>(dims[1]);
  g.S = static_cast<I>(dims[2]);
  g.R = g.N * g.S;
  g.total = g.R * g.C;
  g.channels_inner = channels_inner;
  return g;
}

template <class I>
View<I> view(const Shape& st) {
  return View<I>{static_cast<I>(st[0]), static_cast<I>(st[1]), static_cast<I>(st[2])};
}

Channel channel(std::uintptr_t mean, std::uintptr_t var, std::uintptr_t w, std::uintptr_t b, double eps) {
  require(mean != 0 && var != 0, "norm_act: mean and var are required");
  return Channel{as_ptr<const float>(mean), as_ptr<const float>(var), as_ptr<const float>(w), as_ptr<const float>(b),
                 static_cast<float>(eps)};
}

// The reductions' block: TC channels x TR row lanes, TC * TR = kThreads, both powers of two.
dim3 reduce_block(int64_t C, bool channels_inner) {
  int tc = 1;
  if (channels_inner) {
    while (tc < kChannelTile && tc < C) tc *= 2;
  }
  return dim3(tc, kThreads / tc);
}

void check_partition(int64_t P, int64_t rows_per, int64_t R) {
  require(P >= 1 && P <= 65535, "norm_act: P (partials, grid y) must be in [1, 65535]");
  require(rows_per >= 1 && (P - 1) * rows_per < R && P * rows_per >= R,
          "norm_act: P ranges of rows_per rows must cover the N * S rows exactly");
}

unsigned int elementwise_blocks(int64_t total) {
  // A grid-stride loop covers the rest; 2^20 blocks of 256 threads fill any current GPU.
  return grid_x(std::min<int64_t>(ceil_div(total, kThreads), int64_t{1} << 20));
}

// The elementwise passes' 128-bit path: channels_last, C a multiple of V, every tensor that is used
// (pointer not 0) 16-byte aligned with channel stride 1 and its other strides multiples of V, and
// the float32 per-channel vectors aligned.
struct Operand {
  std::uintptr_t ptr;
  const Shape* strides;  // null: a float32 [C] vector
};
bool vector_path(int dtype, bool channels_inner, const Shape& dims, std::initializer_list<Operand> ops,
                 const Channel& ch) {
  const int64_t V = dtype == kFloat32 ? 4 : 8;
  if (!channels_inner || dims[1] % V != 0) return false;
  for (const Operand& o : ops) {
    if (o.ptr == 0) continue;
    if (!aligned({o.ptr})) return false;
    if (o.strides && ((*o.strides)[1] != 1 || !multiple({(*o.strides)[0], (*o.strides)[2]}, V))) return false;
  }
  return aligned({reinterpret_cast<std::uintptr_t>(ch.mean), reinterpret_cast<std::uintptr_t>(ch.var),
                  reinterpret_cast<std::uintptr_t>(ch.w), reinterpret_cast<std::uintptr_t>(ch.b)});
}

template <class I>
void launch_stats_partial(std::uintptr_t x, const Shape& dims, const Shape& sx, bool channels_inner,
                          std::uintptr_t pmean, std::uintptr_t pm2, int64_t P, int64_t rows_per, int dtype,
                          cudaStream_t stream) {
  const Geo<I> g = geometry<I>(dims, channels_inner);
  const bool vec = vector_path(dtype, channels_inner, dims, {{x, &sx}, {pmean, nullptr}, {pm2, nullptr}}, Channel{});
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto launch = [&](auto v_tag) {
      constexpr int V = decltype(v_tag)::value;
      const dim3 block = reduce_block(dims[1] / V, channels_inner);
      const dim3 grid(grid_x(ceil_div(dims[1], static_cast<int64_t>(block.x) * V)), static_cast<unsigned int>(P));
      stats_partial_kernel<T, I, V><<<grid, block, 0, stream>>>(as_ptr<const T>(x), g, view<I>(sx),
                                                                static_cast<I>(rows_per), as_ptr<float>(pmean),
                                                                as_ptr<float>(pm2));
      FN_LAUNCH_CHECK("stats_partial_kernel");
    };
    if (vec) {
      launch(std::integral_constant<int, vec_width<T>()>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
}

template <class I>
void launch_forward(std::uintptr_t x, std::uintptr_t r, std::uintptr_t y, const Shape& dims, const Shape& sx,
                    const Shape& sr, const Shape& sy, const Channel& ch, int act, bool channels_inner, int dtype,
                    cudaStream_t stream) {
  const Geo<I> g = geometry<I>(dims, channels_inner);
  const bool vec = vector_path(dtype, channels_inner, dims, {{x, &sx}, {r, &sr}, {y, &sy}}, ch);
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (vec) {
      forward_vec_kernel<T, I><<<elementwise_blocks(g.total / vec_width<T>()), kThreads, 0, stream>>>(
          as_ptr<const T>(x), as_ptr<const T>(r), as_ptr<T>(y), g, view<I>(sx), view<I>(sr), view<I>(sy), ch, act);
      FN_LAUNCH_CHECK("forward_vec_kernel");
      return;
    }
    forward_kernel<T, I><<<elementwise_blocks(g.total), kThreads, 0, stream>>>(
        as_ptr<const T>(x), as_ptr<const T>(r), as_ptr<T>(y), g, view<I>(sx), view<I>(sr), view<I>(sy), ch, act);
    FN_LAUNCH_CHECK("forward_kernel");
  });
}

template <class I>
void launch_backward(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t r, std::uintptr_t dx, std::uintptr_t dr,
                     const Shape& dims, const Shape& sdy, const Shape& sx, const Shape& sr, const Shape& sdx,
                     const Shape& sdr, const Channel& ch, std::uintptr_t psum_dz, std::uintptr_t psum_dzx, int64_t P,
                     int64_t rows_per, std::uintptr_t sum_dz, std::uintptr_t sum_dzx, int act, bool train,
                     bool channels_inner, int dtype, cudaStream_t stream) {
  const Geo<I> g = geometry<I>(dims, channels_inner);
  const int64_t C = dims[1];
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (sum_dz) {
      const auto launch = [&](auto v_tag) {
        constexpr int V = decltype(v_tag)::value;
        const dim3 block = reduce_block(C / V, channels_inner);
        const dim3 grid(grid_x(ceil_div(C, static_cast<int64_t>(block.x) * V)), static_cast<unsigned int>(P));
        bwd_reduce_kernel<T, I, V><<<grid, block, 0, stream>>>(
            as_ptr<const T>(dy), as_ptr<const T>(x), as_ptr<const T>(r), g, view<I>(sdy), view<I>(sx), view<I>(sr),
            ch, act, static_cast<I>(rows_per), as_ptr<float>(psum_dz), as_ptr<float>(psum_dzx));
        FN_LAUNCH_CHECK("bwd_reduce_kernel");
      };
      if (vector_path(dtype, channels_inner, dims, {{dy, &sdy}, {x, &sx}, {r, &sr}}, ch)) {
        launch(std::integral_constant<int, vec_width<T>()>{});
      } else {
        launch(std::integral_constant<int, 1>{});
      }
      bwd_finalize_kernel<<<grid_x(ceil_div(C, kThreads)), kThreads, 0, stream>>>(
          as_ptr<const float>(psum_dz), as_ptr<const float>(psum_dzx), P, as_ptr<float>(sum_dz),
          as_ptr<float>(sum_dzx), C);
      FN_LAUNCH_CHECK("bwd_finalize_kernel");
    }
    if (dx || dr) {
      const float inv_count = static_cast<float>(1.0 / static_cast<double>(dims[0] * dims[2]));
      const bool vec = vector_path(dtype, channels_inner, dims,
                                   {{dy, &sdy}, {x, &sx}, {r, &sr}, {dx, &sdx}, {dr, &sdr}, {sum_dz, nullptr},
                                    {sum_dzx, nullptr}},
                                   ch);
      if (vec) {
        bwd_apply_vec_kernel<T, I><<<elementwise_blocks(g.total / vec_width<T>()), kThreads, 0, stream>>>(
            as_ptr<const T>(dy), as_ptr<const T>(x), as_ptr<const T>(r), as_ptr<T>(dx), as_ptr<T>(dr), g,
            view<I>(sdy), view<I>(sx), view<I>(sr), view<I>(sdx), view<I>(sdr), ch, act, as_ptr<const float>(sum_dz),
            as_ptr<const float>(sum_dzx), inv_count, train);
        FN_LAUNCH_CHECK("bwd_apply_vec_kernel");
        return;
      }
      bwd_apply_kernel<T, I><<<elementwise_blocks(g.total), kThreads, 0, stream>>>(
          as_ptr<const T>(dy), as_ptr<const T>(x), as_ptr<const T>(r), as_ptr<T>(dx), as_ptr<T>(dr), g, view<I>(sdy),
          view<I>(sx), view<I>(sr), view<I>(sdx), view<I>(sdr), ch, act, as_ptr<const float>(sum_dz),
          as_ptr<const float>(sum_dzx), inv_count, train);
      FN_LAUNCH_CHECK("bwd_apply_kernel");
    }
  });
}

}  // namespace

void norm_act_stats(std::uintptr_t x, const Shape& dims, const Shape& sx, bool channels_inner, std::uintptr_t pmean,
                    std::uintptr_t pm2, int64_t P, int64_t rows_per, std::uintptr_t bmean, std::uintptr_t bvar,
                    std::uintptr_t mean, std::uintptr_t var, std::uintptr_t rmean, std::uintptr_t rvar,
                    double momentum, double unbias, int dtype, std::uintptr_t stream) {
  check_dims(dims, {&sx});
  require(mean != 0 && var != 0, "norm_act_stats: mean and var outputs are required");
  require((rmean != 0) == (rvar != 0), "norm_act_stats: running mean and variance go together");
  const int64_t C = dims[1], R = dims[0] * dims[2];
  const cudaStream_t s = as_stream(stream);
  if (bmean == 0) {
    require(x != 0 && pmean != 0 && pm2 != 0, "norm_act_stats: x and the partial buffers are required");
    check_partition(P, rows_per, R);
    if (fits_int32(dims, {&sx})) {
      launch_stats_partial<int32_t>(x, dims, sx, channels_inner, pmean, pm2, P, rows_per, dtype, s);
    } else {
      launch_stats_partial<int64_t>(x, dims, sx, channels_inner, pmean, pm2, P, rows_per, dtype, s);
    }
  } else {
    require(bvar != 0, "norm_act_stats: batch_var is required with batch_mean");
  }
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    stats_finalize_kernel<T><<<grid_x(ceil_div(C, kThreads)), kThreads, 0, s>>>(
        as_ptr<const T>(x), sx[1], bmean == 0 ? as_ptr<const float>(pmean) : nullptr, as_ptr<const float>(pm2), P,
        rows_per, R, as_ptr<const float>(bmean), as_ptr<const float>(bvar), as_ptr<float>(mean), as_ptr<float>(var),
        as_ptr<float>(rmean), as_ptr<float>(rvar), C, static_cast<float>(momentum), static_cast<float>(unbias));
    FN_LAUNCH_CHECK("stats_finalize_kernel");
  });
}

void norm_act_forward(std::uintptr_t x, std::uintptr_t r, std::uintptr_t y, const Shape& dims, const Shape& sx,
                      const Shape& sr, const Shape& sy, std::uintptr_t mean, std::uintptr_t var, std::uintptr_t w,
                      std::uintptr_t b, double eps, int act, bool channels_inner, int dtype, std::uintptr_t stream) {
  check_dims(dims, {&sx, &sr, &sy});
  require(x != 0 && y != 0, "norm_act_forward: x and y are required");
  require(act >= kActNone && act <= kActSigmoid, "norm_act_forward: unknown activation code");
  const Channel ch = channel(mean, var, w, b, eps);
  if (fits_int32(dims, {&sx, &sr, &sy})) {
    launch_forward<int32_t>(x, r, y, dims, sx, sr, sy, ch, act, channels_inner, dtype, as_stream(stream));
  } else {
    launch_forward<int64_t>(x, r, y, dims, sx, sr, sy, ch, act, channels_inner, dtype, as_stream(stream));
  }
}

void norm_act_backward(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t r, std::uintptr_t dx, std::uintptr_t dr,
                       const Shape& dims, const Shape& sdy, const Shape& sx, const Shape& sr, const Shape& sdx,
                       const Shape& sdr, std::uintptr_t mean, std::uintptr_t var, std::uintptr_t w, std::uintptr_t b,
                       std::uintptr_t psum_dz, std::uintptr_t psum_dzx, int64_t P, int64_t rows_per,
                       std::uintptr_t sum_dz, std::uintptr_t sum_dzx, double eps, int act, bool train,
                       bool channels_inner, int dtype, std::uintptr_t stream) {
  check_dims(dims, {&sdy, &sx, &sr, &sdx, &sdr});
  require(dy != 0 && x != 0, "norm_act_backward: dy and x are required");
  require(act >= kActNone && act <= kActSigmoid, "norm_act_backward: unknown activation code");
  require((sum_dz != 0) == (sum_dzx != 0), "norm_act_backward: sum_dz and sum_dzx go together");
  require(!(train && dx != 0) || sum_dz != 0, "norm_act_backward: dx in training needs the reductions");
  if (sum_dz) {
    require(psum_dz != 0 && psum_dzx != 0, "norm_act_backward: the partial buffers are required");
    check_partition(P, rows_per, dims[0] * dims[2]);
  }
  // The residual is read only for z, which only an activation needs.
  const std::uintptr_t r_used = act == kActNone ? 0 : r;
  const Channel ch = channel(mean, var, w, b, eps);
  if (fits_int32(dims, {&sdy, &sx, &sr, &sdx, &sdr})) {
    launch_backward<int32_t>(dy, x, r_used, dx, dr, dims, sdy, sx, sr, sdx, sdr, ch, psum_dz, psum_dzx, P, rows_per,
                             sum_dz, sum_dzx, act, train, channels_inner, dtype, as_stream(stream));
  } else {
    launch_backward<int64_t>(dy, x, r_used, dx, dr, dims, sdy, sx, sr, sdx, sdr, ch, psum_dz, psum_dzx, P, rows_per,
                             sum_dz, sum_dzx, act, train, channels_inner, dtype, as_stream(stream));
  }
}

}  // namespace fastnets
