// Flash attention, CUDA C++: the algorithm of fastnets/kernels/attention.py and attention_bwd.py
// (FlashAttention-2), written for clarity first. Semantics, masks, dropout RNG and the lse
// convention are the Triton kernels' (see csrc/attention.h and fastnets/ops/attention.py).
//
// Each block has 128 threads (4 warps) and works through shared memory:
//  - forward: one block per BM query rows of one (batch, head). Per key/value tile of BN rows:
//    S = Q K^T (tensor cores) into shared memory; each warp then takes whole rows for the online
//    softmax (running max m, normalizer l, rescale of the output accumulator O by exp(m_old - m));
//    O += P V (tensor cores). O stays in shared memory (float32), so the per-row rescale is plain
//    indexing by the softmax warps; the products read and write it in the mma accumulator layout.
//  - backward: delta = rowsum(dO * O); a dK/dV kernel (one block per BN key rows and key/value
//    head, looping over the group's query heads and the query tiles that see it) and a separate
//    dQ kernel (no atomics: deterministic).
// Tensor cores through ldmatrix + mma.sync.m16n8k16 (csrc/mma_sync.h; fp16/bf16 operands, fp32
// accumulate) for fp16 and bf16.
// fp32 inputs take a simpler path: the same tiles multiplied with float32 FMAs on CUDA cores
// (exact fp32 products, no TF32).
// Head dims are padded to D in {32, 64, 128, 256} with zeros (loads past E or EV read 0).
// Operand tiles arrive by 16-byte asynchronous copies (cp.async) when their rows are contiguous and
// aligned (load_tile_async); the forward overlaps the next K tile and the current V tile with the
// math. The operand fragments are read from shared memory by ldmatrix (LDSM) and multiplied by
// mma.sync (HMMA).
// Indices of global memory are int64; the grid is 1-D (x up to 2^31 - 1, no y/z limits).
#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>

#include "attention.h"
#include "mma_sync.h"
#include "vec.h"

namespace fastnets {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kPadT = 8;  // row padding of T tiles (elements): rows stay multiples of 16 bytes (ldmatrix), spread banks
constexpr int kPadF = 4;  // row padding of float tiles
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct Params {
  const void* q;
  const void* k;
  const void* v;
  const void* mask;
  const int64_t* rng;
  const void* out;   // forward output (backward input)
  const void* dout;  // gradient of the output
  void* o;           // forward: the output
  float* lse;        // [B * H, L]
  float* delta;      // [B * H, L]
  void* dq;
  void* dk;
  void* dv;
  float* ds;  // [B, H, L, S] or null
  int64_t B, H, L, S, E, EV, group;
  int64_t sq[4], sk[4], sv[4], sm[4], so[4], sdo[4], sdq[4], sdk[4], sdv[4];
  float scale, p_drop, drop_scale;
  int mask_kind;
  bool causal, dropout;
};

template <class T>
constexpr bool kIsF32 = std::is_same<T, float>::value;

// Tile sizes per element type and padded head dim (shared memory within sm_80's 163 KB).
template <class T, int D>
struct Tiles {
  static constexpr int FWD_M = kIsF32<T> ? (D >= 256 ? 32 : 64) : 64;
  static constexpr int FWD_N = kIsF32<T> ? (D >= 128 ? 32 : 64) : (D >= 256 ? 32 : 64);
  static constexpr int BWD_M = kIsF32<T> ? (D >= 256 ? 16 : 32) : (D >= 128 ? 32 : 64);
  static constexpr int BWD_N = kIsF32<T> ? (D >= 256 ? 16 : 32) : (D >= 256 ? 32 : 64);
};

constexpr size_t align128(size_t n) { return (n + 127) / 128 * 128; }
constexpr size_t kMaxSmem = 163 * 1024;  // sm_80's per-block opt-in limit (sm_90: 227 KB)

// ---------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al. 2011): counter (col, row, bh, 0), key = the 64-bit seed; the first
// output word decides: kept iff (word >> 8) * 2^-24 >= p. Same function as the Triton kernels'.
__device__ __forceinline__ bool philox_keep(uint64_t seed, uint32_t bh, uint32_t row, uint32_t col, float p) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = col, c1 = row, c2 = bh, c3 = 0;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return static_cast<float>(c0 >> 8) * 5.9604644775390625e-08f >= p;
}

__device__ __forceinline__ int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The score of element (i, j) in base 2: dot * scale * log2(e) (+ mask * log2(e)); -inf where
// masked out, past the sequences, or above the diagonal under is_causal (j > i, top-left aligned).
template <class T>
__device__ __forceinline__ float score(const Params& p, float dot, int64_t b, int64_t h, int64_t i, int64_t j) {
  if (i >= p.L || j >= p.S || (p.causal && j > i)) return -INFINITY;
  float s = dot * (p.scale * kLog2e);
  if (p.mask_kind != 0) {
    const int64_t off = b * p.sm[0] + h * p.sm[1] + i * p.sm[2] + j * p.sm[3];
    if (p.mask_kind == 1) {
      if (static_cast<const uint8_t*>(p.mask)[off] == 0) s = -INFINITY;
    } else if (p.mask_kind == 2) {
      s += static_cast<const float*>(p.mask)[off] * kLog2e;
    } else {
      s += to_float(static_cast<const T*>(p.mask)[off]) * kLog2e;
    }
  }
  return s;
}

// dst[r][c] (row stride ld) = src[(row0 + r) * s_row + c * s_col] for rows < rows_valid and
// columns < cols_valid, else 0; `rows` x D elements. Issues the copies and returns: 16-byte
// asynchronous copies (cp.async, zero-filled past the valid rows and columns) when the columns are
// contiguous, cols_valid and s_row are multiples of 16 bytes of T and src is 16-byte aligned (the
// check is uniform across the block); plain loads and stores otherwise. The caller commits the
// group (cp_async_commit) and waits for it (cp_async_wait) before the barrier that publishes dst.
template <class T, int D>
__device__ __forceinline__ void load_tile_async(T* dst, int ld, const T* src, int64_t s_row, int64_t s_col,
                                                int64_t row0, int64_t rows_valid, int64_t cols_valid, int rows) {
  constexpr int V = 16 / sizeof(T);
  static_assert(D % V == 0, "whole 16-byte chunks per row");
  const bool fast = s_col == 1 && cols_valid % V == 0 && s_row % V == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0;
  if (fast) {
    for (int idx = threadIdx.x; idx < rows * (D / V); idx += kThreads) {
      const int r = idx / (D / V), c = (idx % (D / V)) * V;
      const int64_t row = row0 + r;
      const bool ok = row < rows_valid && c < cols_valid;
      cp_async16(dst + r * ld + c, ok ? src + row * s_row + c : src, ok);
    }
  } else {
    for (int idx = threadIdx.x; idx < rows * D; idx += kThreads) {
      const int r = idx / D, c = idx % D;
      const int64_t row = row0 + r;
      dst[r * ld + c] = (row < rows_valid && c < cols_valid) ? src[row * s_row + c * s_col] : from_float<T>(0.f);
    }
  }
}

// load_tile_async, then this thread's copies completed (a barrier still publishes them).
template <class T, int D>
__device__ __forceinline__ void load_tile(T* dst, int ld, const T* src, int64_t s_row, int64_t s_col, int64_t row0,
                                          int64_t rows_valid, int64_t cols_valid, int rows) {
  load_tile_async<T, D>(dst, ld, src, s_row, s_col, row0, rows_valid, cols_valid, rows);
  cp_async_commit();
  cp_async_wait<0>();
}

// dst[(row0 + r) * s_row + c * s_col] = src[r][c] * mul for rows < rows_valid, cols < cols_valid.
template <class T, int D>
__device__ __forceinline__ void store_tile(T* dst, int64_t s_row, int64_t s_col, int64_t row0, int64_t rows_valid,
                                           int64_t cols_valid, const float* src, int ld, int rows, float mul) {
  for (int idx = threadIdx.x; idx < rows * D; idx += kThreads) {
    const int r = idx / D, c = idx % D;
    const int64_t row = row0 + r;
    if (row < rows_valid && c < cols_valid) dst[row * s_row + c * s_col] = from_float<T>(src[r * ld + c] * mul);
  }
}

__device__ __forceinline__ void fill(float* dst, int n, float value) {
  for (int i = threadIdx.x; i < n; i += kThreads) dst[i] = value;
}

// C[M x N] (float, row stride ldc) = (accumulate ? C : 0) + A[M x K] * B[K x N], all in shared
// memory. A is stored row-major (A[m * lda + k]) or, if A_T, transposed (A[k * lda + m]); B is
// stored row-major (B[k * ldb + n]) or, if B_T, transposed (B[n * ldb + k]). M, N, K are multiples
// of 16. Half types: 16 x 16 output tiles spread over the warps, each two m16n8k16 mma.sync per 16
// of K, operands by ldmatrix (A_T: .trans; B row-major: .trans; csrc/mma_sync.h has the fragment
// layouts), C read and written in the mma accumulator layout; float: one output per thread.
// Alignment for ldmatrix: A, B 16-byte aligned, lda and ldb multiples of 8 elements (every tile
// below starts at align128 with rows of D + kPadT or BN + kPadT elements); C 8-byte aligned, ldc even.
// Callers synchronize the block before (operands written) and after (C read).
template <class T, bool A_T, bool B_T>
__device__ __forceinline__ void mma_smem(float* C, int ldc, const T* A, int lda, const T* B, int ldb, int M, int N,
                                         int K, bool accumulate) {
  if constexpr (kIsF32<T>) {
    for (int idx = threadIdx.x; idx < M * N; idx += kThreads) {
      const int m = idx / N, n = idx % N;
      float acc = accumulate ? C[m * ldc + n] : 0.f;
      for (int kk = 0; kk < K; ++kk) {
        const float a = A_T ? A[kk * lda + m] : A[m * lda + kk];
        const float b = B_T ? B[n * ldb + kk] : B[kk * ldb + n];
        acc = fmaf(a, b, acc);
      }
      C[m * ldc + n] = acc;
    }
  } else {
    const int warp = threadIdx.x / 32;
    const int tiles_n = N / 16;
    for (int t = warp; t < (M / 16) * tiles_n; t += kWarps) {  // uniform per warp: mma.sync's .aligned
      const int tm = (t / tiles_n) * 16, tn = (t % tiles_n) * 16;
      float acc[2][4];  // columns tn..tn+7 and tn+8..tn+15 (mma accumulator layout)
      if (accumulate) {
        load_acc(acc[0], C + tm * ldc + tn, ldc);
        load_acc(acc[1], C + tm * ldc + tn + 8, ldc);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[0][e] = acc[1][e] = 0.f;
      }
      for (int kk = 0; kk < K; kk += 16) {
        uint32_t a[4], b[4];
        if constexpr (A_T)
          load_a_frag_t(a, A + kk * lda + tm, lda);
        else
          load_a_frag(a, A + tm * lda + kk, lda);
        if constexpr (B_T)
          load_b_frags_nk(b, B + tn * ldb + kk, ldb);
        else
          load_b_frags_kn(b, B + kk * ldb + tn, ldb);
        mma_16816<T>(acc[0], a, b[0], b[1]);
        mma_16816<T>(acc[1], a, b[2], b[3]);
      }
      store_acc(C + tm * ldc + tn, ldc, acc[0]);
      store_acc(C + tm * ldc + tn + 8, ldc, acc[1]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward.

template <class T, int D, int BM, int BN>
struct FwdLayout {
  static constexpr int LDT = D + kPadT, LDS = BN + kPadF, LDP = BN + kPadT, LDO = D + kPadF;
  static constexpr size_t Q = 0;                                    // T [BM][LDT]
  static constexpr size_t K = Q + align128(sizeof(T) * BM * LDT);   // T [BN][LDT]
  static constexpr size_t V = K + align128(sizeof(T) * BN * LDT);   // T [BN][LDT]
  static constexpr size_t S = V + align128(sizeof(T) * BN * LDT);   // float [BM][LDS] scores
  static constexpr size_t P = S + align128(sizeof(float) * BM * LDS);  // T [BM][LDP] probabilities
  static constexpr size_t O = P + align128(sizeof(T) * BM * LDP);   // float [BM][LDO] accumulator
  static constexpr size_t M = O + align128(sizeof(float) * BM * LDO);  // float [BM] running max
  static constexpr size_t Lsum = M + align128(sizeof(float) * BM);     // float [BM] normalizer
  static constexpr size_t BYTES = Lsum + align128(sizeof(float) * BM);
  static_assert(BYTES <= kMaxSmem, "forward tiles exceed shared memory");
};

template <class T, int D, int BM, int BN>
__global__ void __launch_bounds__(kThreads, 1) attn_fwd_kernel(const Params p) {
  using Lay = FwdLayout<T, D, BM, BN>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem + Lay::Q);
  T* sK = reinterpret_cast<T*>(smem + Lay::K);
  T* sV = reinterpret_cast<T*>(smem + Lay::V);
  float* sS = reinterpret_cast<float*>(smem + Lay::S);
  T* sP = reinterpret_cast<T*>(smem + Lay::P);
  float* sO = reinterpret_cast<float*>(smem + Lay::O);
  float* sM = reinterpret_cast<float*>(smem + Lay::M);
  float* sL = reinterpret_cast<float*>(smem + Lay::Lsum);

  const int64_t n_mblocks = cdiv(p.L, BM);
  const int64_t bh = blockIdx.x / n_mblocks;
  const int64_t m0 = (n_mblocks - 1 - blockIdx.x % n_mblocks) * BM;  // longest causal rows first
  const int64_t b = bh / p.H, h = bh % p.H, hk = h / p.group;
  const T* q = static_cast<const T*>(p.q) + b * p.sq[0] + h * p.sq[1];
  const T* k = static_cast<const T*>(p.k) + b * p.sk[0] + hk * p.sk[1];
  const T* v = static_cast<const T*>(p.v) + b * p.sv[0] + hk * p.sv[1];
  const uint64_t seed = p.dropout ? static_cast<uint64_t>(*p.rng) : 0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // Copies in flight overlap the math: K of tile t + 1 loads during tile t's softmax and P V, and
  // V of tile t during its Q K^T and softmax. Groups, in commit order: {Q, K(0)}, then per tile
  // {V(t)}, {K(t + 1)} (possibly empty); wait_group 1 leaves only the most recent one pending.
  const int64_t n_end = (p.causal && m0 + BM < p.S) ? m0 + BM : p.S;  // causal: columns j <= i only
  load_tile_async<T, D>(sQ, Lay::LDT, q, p.sq[2], p.sq[3], m0, p.L, p.E, BM);
  if (n_end > 0) load_tile_async<T, D>(sK, Lay::LDT, k, p.sk[2], p.sk[3], 0, p.S, p.E, BN);
  cp_async_commit();
  fill(sO, BM * Lay::LDO, 0.f);
  fill(sM, BM, -INFINITY);
  fill(sL, BM, 0.f);
  for (int64_t n0 = 0; n0 < n_end; n0 += BN) {
    __syncthreads();  // the previous tile's V and P are consumed
    load_tile_async<T, D>(sV, Lay::LDT, v, p.sv[2], p.sv[3], n0, p.S, p.EV, BN);
    cp_async_commit();
    cp_async_wait<1>();  // K(t) (and Q) landed; V(t) may be in flight
    __syncthreads();
    mma_smem<T, false, true>(sS, Lay::LDS, sQ, Lay::LDT, sK, Lay::LDT, BM, BN, D, false);  // S = Q K^T
    __syncthreads();  // K(t) consumed
    if (n0 + BN < n_end) load_tile_async<T, D>(sK, Lay::LDT, k, p.sk[2], p.sk[3], n0 + BN, p.S, p.E, BN);
    cp_async_commit();
    // Online softmax, one warp per row. fmaxf ignores NaN in the max, but NaN scores still make
    // p, l and the row's output NaN, as in torch.
    for (int r = warp; r < BM; r += kWarps) {
      const int64_t i = m0 + r;
      float* srow = sS + r * Lay::LDS;
      float mx = -INFINITY;
      for (int c = lane; c < BN; c += 32) {
        const float s = score<T>(p, srow[c], b, h, i, n0 + c);
        srow[c] = s;
        mx = fmaxf(mx, s);
      }
      mx = warp_max(mx);
      const float m_old = sM[r];
      const float m_new = fmaxf(m_old, mx);
      const float m_safe = m_new == -INFINITY ? 0.f : m_new;  // a row fully masked so far
      const float alpha = exp2f(m_old - m_safe);
      float sum = 0.f;
      for (int c = lane; c < BN; c += 32) {
        float pr = exp2f(srow[c] - m_safe);
        sum += pr;  // the normalizer is formed before dropout
        if (p.dropout && !philox_keep(seed, static_cast<uint32_t>(bh), static_cast<uint32_t>(i),
                                      static_cast<uint32_t>(n0 + c), p.p_drop)) {
          pr = 0.f;
        }
        sP[r * Lay::LDP + c] = from_float<T>(pr);
      }
      sum = warp_sum(sum);  // every lane has read sM[r] and sL[r] before lane 0 writes them
      for (int d = lane; d < D; d += 32) sO[r * Lay::LDO + d] *= alpha;
      if (lane == 0) {
        sL[r] = sL[r] * alpha + sum;
        sM[r] = m_new;
      }
    }
    cp_async_wait<1>();  // V(t) landed; K(t + 1) may be in flight
    __syncthreads();
    mma_smem<T, false, false>(sO, Lay::LDO, sP, Lay::LDP, sV, Lay::LDT, BM, D, BN, true);  // O += P V
  }
  cp_async_wait<0>();
  __syncthreads();
  for (int idx = threadIdx.x; idx < BM * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    const int64_t i = m0 + r;
    if (i < p.L && d < p.EV) {
      const float l = sL[r];
      static_cast<T*>(p.o)[b * p.so[0] + h * p.so[1] + i * p.so[2] + d * p.so[3]] =
          from_float<T>(sO[r * Lay::LDO + d] * (p.drop_scale / (l == 0.f ? 1.f : l)));
    }
  }
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    const int64_t i = m0 + r;
    if (i < p.L) {
      const float l = sL[r];  // 0: every score was -inf; the row's output is 0 and lse = +inf
      p.lse[bh * p.L + i] = l == 0.f ? INFINITY : (sM[r] + log2f(l)) * kLn2;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward.

template <class T>
__global__ void __launch_bounds__(kThreads) attn_bwd_delta_kernel(const Params p) {
  // One warp per row of [B * H * L]: delta = sum_d dO * O.
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= p.B * p.H * p.L) return;  // whole warps return together
  const int64_t bh = row / p.L, i = row % p.L, b = bh / p.H, h = bh % p.H;
  const T* o = static_cast<const T*>(p.out) + b * p.so[0] + h * p.so[1] + i * p.so[2];
  const T* g = static_cast<const T*>(p.dout) + b * p.sdo[0] + h * p.sdo[1] + i * p.sdo[2];
  float acc = 0.f;
  for (int64_t d = threadIdx.x % 32; d < p.EV; d += 32) acc += to_float(o[d * p.so[3]]) * to_float(g[d * p.sdo[3]]);
  acc = warp_sum(acc);
  if (threadIdx.x % 32 == 0) p.delta[row] = acc;
}

// The 128-bit path of attn_bwd_delta_kernel (O and dO with a contiguous last dim, EV and the other
// strides multiples of V = vec_width<T>(), both pointers 16-byte aligned): kDeltaLanes lanes per
// row, V elements per lane and load (8 x 16 bytes: a 64-wide fp16 row per step). The lanes' partial
// sums meet in shared memory (in lane order), not through shuffles, whose divergence fallbacks
// would branch back over the store.
constexpr int kDeltaLanes = 8;

template <class T>
__global__ void __launch_bounds__(kThreads) attn_bwd_delta_vec_kernel(const Params p) {
  constexpr int V = vec_width<T>();
  __shared__ float part[kThreads];
  const int sub = threadIdx.x % kDeltaLanes;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / kDeltaLanes) + threadIdx.x / kDeltaLanes;
  const bool live = row < p.B * p.H * p.L;
  float acc = 0.f;
  if (live) {
    const int64_t bh = row / p.L, i = row % p.L, b = bh / p.H, h = bh % p.H;
    const T* o = static_cast<const T*>(p.out) + b * p.so[0] + h * p.so[1] + i * p.so[2];
    const T* g = static_cast<const T*>(p.dout) + b * p.sdo[0] + h * p.sdo[1] + i * p.sdo[2];
    for (int64_t d = sub * V; d < p.EV; d += kDeltaLanes * V) {
      float ov[V], gv[V];
      load_vec<V>(o + d, ov);
      load_vec<V>(g + d, gv);
#pragma unroll
      for (int j = 0; j < V; ++j) acc += ov[j] * gv[j];
    }
  }
  part[threadIdx.x] = acc;
  __syncthreads();
  if (live && sub == 0) {
    float s = 0.f;
#pragma unroll
    for (int l = 0; l < kDeltaLanes; ++l) s += part[threadIdx.x + l];
    p.delta[row] = s;
  }
}

// Shared by both backward kernels: for a tile of BM query rows (i = m0 + r) and BN key rows
// (j = n0 + c), with sS = Q K^T and sdP = dO V^T computed, writes P with dropout (sPd) and
// dS = P * (dP - delta) (sdS) in T, and dS in float32 to p.ds when requested.
template <class T, int BM, int BN, int LDS, int LDP>
__device__ __forceinline__ void probs_and_ds(const Params& p, const float* sS, const float* sdP, const float* sLse,
                                             const float* sDelta, T* sPd, T* sdS, int64_t b, int64_t h, int64_t bh,
                                             int64_t m0, int64_t n0, uint64_t seed, bool store_ds) {
  for (int idx = threadIdx.x; idx < BM * BN; idx += kThreads) {
    const int r = idx / BN, c = idx % BN;
    const int64_t i = m0 + r, j = n0 + c;
    const float pr = exp2f(score<T>(p, sS[r * LDS + c], b, h, i, j) - sLse[r]);  // lse = +inf: 0
    float pd = pr, dp = sdP[r * LDS + c];
    if (p.dropout) {
      const bool keep = philox_keep(seed, static_cast<uint32_t>(bh), static_cast<uint32_t>(i),
                                    static_cast<uint32_t>(j), p.p_drop);
      pd = keep ? pr * p.drop_scale : 0.f;
      dp = keep ? dp * p.drop_scale : 0.f;
    }
    const float dsv = pr * (dp - sDelta[r]);
    sPd[r * LDP + c] = from_float<T>(pd);
    sdS[r * LDP + c] = from_float<T>(dsv);
    if (store_ds && i < p.L && j < p.S) p.ds[(bh * p.L + i) * p.S + j] = dsv;
  }
}

// The query-side tile loads of both backward kernels: Q, dO, and lse (base 2; +inf past L), delta.
template <class T, int D, int BM>
__device__ __forceinline__ void load_query_side(const Params& p, T* sQ, T* sdO, float* sLse, float* sDelta, int ld,
                                                int64_t b, int64_t h, int64_t bh, int64_t m0) {
  load_tile<T, D>(sQ, ld, static_cast<const T*>(p.q) + b * p.sq[0] + h * p.sq[1], p.sq[2], p.sq[3], m0, p.L, p.E, BM);
  load_tile<T, D>(sdO, ld, static_cast<const T*>(p.dout) + b * p.sdo[0] + h * p.sdo[1], p.sdo[2], p.sdo[3], m0, p.L,
                  p.EV, BM);
  // One thread per row, no loop: inside the dK/dV kernel's query loop these two 4-byte loads would
  // otherwise be unrolled into a dozen (the audit's loop async share counts them against the
  // 16-byte copies of Q and dO).
  static_assert(BM <= kThreads, "one thread per query row");
  if (threadIdx.x < BM) {
    const int r = threadIdx.x;
    const int64_t i = m0 + r;
    sLse[r] = i < p.L ? p.lse[bh * p.L + i] * kLog2e : INFINITY;
    sDelta[r] = i < p.L ? p.delta[bh * p.L + i] : 0.f;
  }
}

template <class T, int D, int BM, int BN>
struct BwdLayout {
  static constexpr int LDT = D + kPadT, LDS = BN + kPadF, LDP = BN + kPadT, LDF = D + kPadF;
  static constexpr size_t Q = 0;                                         // T [BM][LDT]
  static constexpr size_t dO = Q + align128(sizeof(T) * BM * LDT);       // T [BM][LDT]
  static constexpr size_t K = dO + align128(sizeof(T) * BM * LDT);      // T [BN][LDT]
  static constexpr size_t V = K + align128(sizeof(T) * BN * LDT);        // T [BN][LDT]
  static constexpr size_t S = V + align128(sizeof(T) * BN * LDT);        // float [BM][LDS]
  static constexpr size_t dP = S + align128(sizeof(float) * BM * LDS);  // float [BM][LDS]
  static constexpr size_t Pd = dP + align128(sizeof(float) * BM * LDS); // T [BM][LDP]
  static constexpr size_t dS = Pd + align128(sizeof(T) * BM * LDP);     // T [BM][LDP]
  static constexpr size_t Lse = dS + align128(sizeof(T) * BM * LDP);    // float [BM]
  static constexpr size_t Delta = Lse + align128(sizeof(float) * BM);   // float [BM]
  static constexpr size_t Acc = Delta + align128(sizeof(float) * BM);   // float accumulators
  // dK/dV kernel: two [BN][LDF] accumulators; dQ kernel: one [BM][LDF].
  static constexpr size_t DKDV_BYTES = Acc + 2 * align128(sizeof(float) * BN * LDF);
  static constexpr size_t DQ_BYTES = Acc + align128(sizeof(float) * BM * LDF);
  static_assert(DKDV_BYTES <= kMaxSmem && DQ_BYTES <= kMaxSmem, "backward tiles exceed shared memory");
};

template <class T, int D, int BM, int BN>
__global__ void __launch_bounds__(kThreads, 1) attn_bwd_dkdv_kernel(const Params p) {
  using Lay = BwdLayout<T, D, BM, BN>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem + Lay::Q);
  T* sdO = reinterpret_cast<T*>(smem + Lay::dO);
  T* sK = reinterpret_cast<T*>(smem + Lay::K);
  T* sV = reinterpret_cast<T*>(smem + Lay::V);
  float* sS = reinterpret_cast<float*>(smem + Lay::S);
  float* sdP = reinterpret_cast<float*>(smem + Lay::dP);
  T* sPd = reinterpret_cast<T*>(smem + Lay::Pd);
  T* sdS = reinterpret_cast<T*>(smem + Lay::dS);
  float* sLse = reinterpret_cast<float*>(smem + Lay::Lse);
  float* sDelta = reinterpret_cast<float*>(smem + Lay::Delta);
  float* sdK = reinterpret_cast<float*>(smem + Lay::Acc);
  float* sdV = reinterpret_cast<float*>(smem + Lay::Acc + align128(sizeof(float) * BN * Lay::LDF));

  const int64_t hkv = p.H / p.group;
  const int64_t n_nblocks = cdiv(p.S, BN);
  const int64_t bhk = blockIdx.x / n_nblocks;
  const int64_t n0 = (blockIdx.x % n_nblocks) * BN;
  const int64_t b = bhk / hkv, hk = bhk % hkv;
  const uint64_t seed = p.dropout ? static_cast<uint64_t>(*p.rng) : 0;

  load_tile<T, D>(sK, Lay::LDT, static_cast<const T*>(p.k) + b * p.sk[0] + hk * p.sk[1], p.sk[2], p.sk[3], n0, p.S,
                  p.E, BN);
  load_tile<T, D>(sV, Lay::LDT, static_cast<const T*>(p.v) + b * p.sv[0] + hk * p.sv[1], p.sv[2], p.sv[3], n0, p.S,
                  p.EV, BN);
  fill(sdK, BN * Lay::LDF, 0.f);
  fill(sdV, BN * Lay::LDF, 0.f);
  for (int64_t g = 0; g < p.group; ++g) {
    const int64_t h = hk * p.group + g, bh = b * p.H + h;
    // Under is_causal only query rows i >= n0 see this key block.
    for (int64_t m0 = p.causal ? (n0 / BM) * BM : 0; m0 < p.L; m0 += BM) {
      __syncthreads();  // the previous tile is consumed
      load_query_side<T, D, BM>(p, sQ, sdO, sLse, sDelta, Lay::LDT, b, h, bh, m0);
      __syncthreads();
      mma_smem<T, false, true>(sS, Lay::LDS, sQ, Lay::LDT, sK, Lay::LDT, BM, BN, D, false);    // S = Q K^T
      mma_smem<T, false, true>(sdP, Lay::LDS, sdO, Lay::LDT, sV, Lay::LDT, BM, BN, D, false);  // dP = dO V^T
      __syncthreads();
      probs_and_ds<T, BM, BN, Lay::LDS, Lay::LDP>(p, sS, sdP, sLse, sDelta, sPd, sdS, b, h, bh, m0, n0, seed, false);
      __syncthreads();
      mma_smem<T, true, false>(sdV, Lay::LDF, sPd, Lay::LDP, sdO, Lay::LDT, BN, D, BM, true);  // dV += Pd^T dO
      mma_smem<T, true, false>(sdK, Lay::LDF, sdS, Lay::LDP, sQ, Lay::LDT, BN, D, BM, true);   // dK += dS^T Q
    }
  }
  __syncthreads();
  store_tile<T, D>(static_cast<T*>(p.dk) + b * p.sdk[0] + hk * p.sdk[1], p.sdk[2], p.sdk[3], n0, p.S, p.E, sdK,
                   Lay::LDF, BN, p.scale);
  store_tile<T, D>(static_cast<T*>(p.dv) + b * p.sdv[0] + hk * p.sdv[1], p.sdv[2], p.sdv[3], n0, p.S, p.EV, sdV,
                   Lay::LDF, BN, 1.f);
}

template <class T, int D, int BM, int BN>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_kernel(const Params p) {
  using Lay = BwdLayout<T, D, BM, BN>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem + Lay::Q);
  T* sdO = reinterpret_cast<T*>(smem + Lay::dO);
  T* sK = reinterpret_cast<T*>(smem + Lay::K);
  T* sV = reinterpret_cast<T*>(smem + Lay::V);
  float* sS = reinterpret_cast<float*>(smem + Lay::S);
  float* sdP = reinterpret_cast<float*>(smem + Lay::dP);
  T* sPd = reinterpret_cast<T*>(smem + Lay::Pd);
  T* sdS = reinterpret_cast<T*>(smem + Lay::dS);
  float* sLse = reinterpret_cast<float*>(smem + Lay::Lse);
  float* sDelta = reinterpret_cast<float*>(smem + Lay::Delta);
  float* sdQ = reinterpret_cast<float*>(smem + Lay::Acc);

  const int64_t n_mblocks = cdiv(p.L, BM);
  const int64_t bh = blockIdx.x / n_mblocks;
  const int64_t m0 = (n_mblocks - 1 - blockIdx.x % n_mblocks) * BM;
  const int64_t b = bh / p.H, h = bh % p.H, hk = h / p.group;
  const T* k = static_cast<const T*>(p.k) + b * p.sk[0] + hk * p.sk[1];
  const T* v = static_cast<const T*>(p.v) + b * p.sv[0] + hk * p.sv[1];
  const uint64_t seed = p.dropout ? static_cast<uint64_t>(*p.rng) : 0;

  load_query_side<T, D, BM>(p, sQ, sdO, sLse, sDelta, Lay::LDT, b, h, bh, m0);
  fill(sdQ, BM * Lay::LDF, 0.f);
  const int64_t n_end = (p.causal && m0 + BM < p.S) ? m0 + BM : p.S;
  for (int64_t n0 = 0; n0 < n_end; n0 += BN) {
    __syncthreads();
    load_tile<T, D>(sK, Lay::LDT, k, p.sk[2], p.sk[3], n0, p.S, p.E, BN);
    load_tile<T, D>(sV, Lay::LDT, v, p.sv[2], p.sv[3], n0, p.S, p.EV, BN);
    __syncthreads();
    mma_smem<T, false, true>(sS, Lay::LDS, sQ, Lay::LDT, sK, Lay::LDT, BM, BN, D, false);    // S = Q K^T
    mma_smem<T, false, true>(sdP, Lay::LDS, sdO, Lay::LDT, sV, Lay::LDT, BM, BN, D, false);  // dP = dO V^T
    __syncthreads();
    probs_and_ds<T, BM, BN, Lay::LDS, Lay::LDP>(p, sS, sdP, sLse, sDelta, sPd, sdS, b, h, bh, m0, n0, seed,
                                               p.ds != nullptr);
    __syncthreads();
    mma_smem<T, false, false>(sdQ, Lay::LDF, sdS, Lay::LDP, sK, Lay::LDT, BM, D, BN, true);  // dQ += dS K
  }
  __syncthreads();
  store_tile<T, D>(static_cast<T*>(p.dq) + b * p.sdq[0] + h * p.sdq[1], p.sdq[2], p.sdq[3], m0, p.L, p.E, sdQ,
                   Lay::LDF, BM, p.scale);
}

__global__ void attn_dropout_mask_kernel(const int64_t* rng, uint8_t* keep, int64_t BH, int64_t L, int64_t S,
                                         float p_drop) {
  const uint64_t seed = static_cast<uint64_t>(*rng);
  const int64_t total = BH * L * S;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = idx % S, t = idx / S, i = t % L, bh = t / L;
    keep[idx] = philox_keep(seed, static_cast<uint32_t>(bh), static_cast<uint32_t>(i), static_cast<uint32_t>(j),
                            p_drop) ? 1 : 0;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

template <class F>
void dispatch_head_dim(int64_t d, F&& f) {
  if (d <= 32) {
    f(std::integral_constant<int, 32>{});
  } else if (d <= 64) {
    f(std::integral_constant<int, 64>{});
  } else if (d <= 128) {
    f(std::integral_constant<int, 128>{});
  } else if (d <= 256) {
    f(std::integral_constant<int, 256>{});
  } else {
    throw std::invalid_argument("fastnets._C: attention head dims above 256 are not supported, got " +
                                std::to_string(d));
  }
}

template <class Kernel>
void launch(Kernel kernel, const char* name, int64_t blocks, size_t smem_bytes, const Params& p, cudaStream_t stream) {
  if (blocks <= 0) return;
  require(blocks <= 2147483647LL, std::string(name) + ": too many blocks for a 1-D grid");
  const int bytes = static_cast<int>(smem_bytes);
  FN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  kernel<<<static_cast<unsigned int>(blocks), kThreads, smem_bytes, stream>>>(p);
  check_cuda(cudaGetLastError(), (std::string("launch of ") + name).c_str());
}

void copy4(int64_t* dst, const Shape& src, const char* name) {
  require(src.size() == 4, std::string("attention: ") + name + " must have 4 strides");
  for (int i = 0; i < 4; ++i) dst[i] = src[i];
}

Params make_params(const Shape& sizes, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t mask,
                   int mask_kind, std::uintptr_t rng, const Shape& sq, const Shape& sk, const Shape& sv,
                   const Shape& sm, double scale, double p_drop, double drop_scale, bool causal) {
  require(sizes.size() == 7, "attention: sizes must be [B, H, L, S, E, EV, GROUP]");
  for (int64_t s : sizes) require(s >= 0, "attention: sizes must be non-negative");
  require(sizes[6] >= 1 && sizes[1] % sizes[6] == 0, "attention: GROUP must divide the query heads");
  require(mask_kind >= 0 && mask_kind <= 3, "attention: mask_kind must be 0, 1, 2 or 3");
  require(mask_kind == 0 || mask != 0, "attention: a mask kind without a mask pointer");
  Params p{};
  p.q = as_ptr<const void>(q);
  p.k = as_ptr<const void>(k);
  p.v = as_ptr<const void>(v);
  p.mask = as_ptr<const void>(mask);
  p.rng = as_ptr<const int64_t>(rng);
  p.B = sizes[0], p.H = sizes[1], p.L = sizes[2], p.S = sizes[3], p.E = sizes[4], p.EV = sizes[5], p.group = sizes[6];
  copy4(p.sq, sq, "sq");
  copy4(p.sk, sk, "sk");
  copy4(p.sv, sv, "sv");
  copy4(p.sm, sm, "sm");
  p.scale = static_cast<float>(scale);
  p.p_drop = static_cast<float>(p_drop);
  p.drop_scale = static_cast<float>(drop_scale);
  p.mask_kind = mask_kind;
  p.causal = causal;
  p.dropout = rng != 0;
  constexpr int64_t k32 = int64_t{1} << 32;  // the dropout RNG's counters are 32-bit words
  require(p.B * p.H < k32 && p.L < k32 && p.S < k32, "attention: B * H, L and S must be below 2^32");
  return p;
}

}  // namespace

void attention_fwd(const Shape& sizes, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t mask,
                   int mask_kind, std::uintptr_t rng, std::uintptr_t out, std::uintptr_t lse, const Shape& sq,
                   const Shape& sk, const Shape& sv, const Shape& sm, const Shape& so, double scale, double p_drop,
                   double drop_scale, bool causal, int dtype, std::uintptr_t stream) {
  Params p = make_params(sizes, q, k, v, mask, mask_kind, rng, sq, sk, sv, sm, scale, p_drop, drop_scale, causal);
  p.o = as_ptr<void>(out);
  p.lse = as_ptr<float>(lse);
  copy4(p.so, so, "so");
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(std::max(p.E, p.EV), [&](auto dtag) {
      constexpr int D = decltype(dtag)::value;
      constexpr int BM = Tiles<T, D>::FWD_M, BN = Tiles<T, D>::FWD_N;
      launch(attn_fwd_kernel<T, D, BM, BN>, "attn_fwd_kernel", ceil_div(p.L, BM) * p.B * p.H,
             FwdLayout<T, D, BM, BN>::BYTES, p, as_stream(stream));
    });
  });
}

void attention_bwd(const Shape& sizes, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t mask,
                   int mask_kind, std::uintptr_t rng, std::uintptr_t out, std::uintptr_t dout, std::uintptr_t lse,
                   std::uintptr_t delta, std::uintptr_t dq, std::uintptr_t dk, std::uintptr_t dv, std::uintptr_t ds,
                   const Shape& sq, const Shape& sk, const Shape& sv, const Shape& sm, const Shape& so,
                   const Shape& sdo, const Shape& sdq, const Shape& sdk, const Shape& sdv, double scale,
                   double p_drop, double drop_scale, bool causal, int dtype, std::uintptr_t stream) {
  Params p = make_params(sizes, q, k, v, mask, mask_kind, rng, sq, sk, sv, sm, scale, p_drop, drop_scale, causal);
  p.out = as_ptr<const void>(out);
  p.dout = as_ptr<const void>(dout);
  p.lse = as_ptr<float>(lse);
  p.delta = as_ptr<float>(delta);
  p.dq = as_ptr<void>(dq);
  p.dk = as_ptr<void>(dk);
  p.dv = as_ptr<void>(dv);
  p.ds = as_ptr<float>(ds);
  copy4(p.so, so, "so");
  copy4(p.sdo, sdo, "sdo");
  copy4(p.sdq, sdq, "sdq");
  copy4(p.sdk, sdk, "sdk");
  copy4(p.sdv, sdv, "sdv");
  cudaStream_t st = as_stream(stream);
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    // delta = rowsum(dO * O): 16 bytes per load when both have a contiguous last dim, EV and the other
    // strides multiples of V and aligned pointers; else one warp per row, element by element.
    constexpr int64_t V = vec_width<T>();
    const bool delta_vec = p.so[3] == 1 && p.sdo[3] == 1 && p.EV % V == 0 &&
                           multiple({p.so[0], p.so[1], p.so[2], p.sdo[0], p.sdo[1], p.sdo[2]}, V) &&
                           aligned({out, dout});
    if (delta_vec) {
      launch(attn_bwd_delta_vec_kernel<T>, "attn_bwd_delta_vec_kernel",
             ceil_div(p.B * p.H * p.L, kThreads / kDeltaLanes), 0, p, st);
    } else {
      launch(attn_bwd_delta_kernel<T>, "attn_bwd_delta_kernel", ceil_div(p.B * p.H * p.L, kWarps), 0, p, st);
    }
    dispatch_head_dim(std::max(p.E, p.EV), [&](auto dtag) {
      constexpr int D = decltype(dtag)::value;
      constexpr int BM = Tiles<T, D>::BWD_M, BN = Tiles<T, D>::BWD_N;
      using Lay = BwdLayout<T, D, BM, BN>;
      launch(attn_bwd_dkdv_kernel<T, D, BM, BN>, "attn_bwd_dkdv_kernel", ceil_div(p.S, BN) * p.B * (p.H / p.group),
             Lay::DKDV_BYTES, p, st);
      launch(attn_bwd_dq_kernel<T, D, BM, BN>, "attn_bwd_dq_kernel", ceil_div(p.L, BM) * p.B * p.H, Lay::DQ_BYTES,
             p, st);
    });
  });
}

void attention_dropout_mask(std::uintptr_t rng, std::uintptr_t keep, int64_t BH, int64_t L, int64_t S, double p_drop,
                            std::uintptr_t stream) {
  require(rng != 0, "attention_dropout_mask: no seed");
  const int64_t total = BH * L * S;
  if (total <= 0) return;
  attn_dropout_mask_kernel<<<grid_x(std::min<int64_t>(ceil_div(total, 256), 65536)), 256, 0, as_stream(stream)>>>(
      as_ptr<const int64_t>(rng), as_ptr<uint8_t>(keep), BH, L, S, static_cast<float>(p_drop));
  FN_LAUNCH_CHECK("attn_dropout_mask_kernel");
}

}  // namespace fastnets
