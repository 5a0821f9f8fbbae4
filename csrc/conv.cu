// Fused convolution kernels (declared in conv.h): implicit GEMM with tensor cores (ldmatrix +
// mma.sync.m16n8k16, csrc/mma_sync.h) for fp16/bf16 (float32 accumulate) and an FMA-tiled path
// for fp32, a direct depthwise kernel, the statistics finalize (Chan's merge) and the activation
// gradient. Simple on purpose: one tile shape, operands staged through shared memory, every index
// that can pass 2^31 in int64. The 16-bit
// GEMM has an asynchronous-copy fast path (conv_gemm_async_kernel) for channels_last inputs and
// OHWI weights with channel counts that are multiples of 8.
#include <climits>
#include <type_traits>

#include "activation.h"
#include "conv.h"
#include "mma_sync.h"
#include "vec.h"

namespace fastnets {
namespace {

struct ConvParams {
  int64_t N, C, H, W;         // input
  int64_t K, OH, OW;          // output channels and size
  int64_t KH, KW, Cg, Kg;     // kernel; input and output channels per group
  int64_t M;                  // N * OH * OW, the GEMM rows
  int64_t sx[4], sw[4], sr[4], sy[4];  // strides (elements) of x, w, residual, y (and z)
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int act;
  bool res_vec;  // residual channels contiguous, Kg and its other strides multiples of 8, 16-byte aligned
};

// ---------------------------------------------------------------------------------------------
// Implicit GEMM: C[m, n] = sum_k A[m, k] * B[k, n] with m = (image, oh, ow), n = output channel
// of the group blockIdx.z, k = (kh, kw, ci) flattened. A block computes a BM x BN tile with 4 warps.
constexpr int BM = 64, BN = 64, BK = 32, kThreads = 128;
constexpr int kFarAway = -(1 << 29);  // row_ih of rows past M: every tap falls outside the input

// The rows' (output pixels') geometry, for the BM rows of a tile (threads 0..BM-1).
__device__ __forceinline__ void setup_rows(const ConvParams& p, int64_t m0, int64_t g, int64_t* row_x, int* row_ih,
                                           int* row_iw, int64_t* row_n, int* row_oh, int* row_ow) {
  const int tid = threadIdx.x;
  const int64_t ohw = p.OH * p.OW;
  if (tid < BM) {
    const int64_t m = m0 + tid;
    if (m < p.M) {
      const int64_t n = m / ohw, rem = m % ohw;
      const int oh = static_cast<int>(rem / p.OW), ow = static_cast<int>(rem % p.OW);
      row_x[tid] = n * p.sx[0] + g * p.Cg * p.sx[1];
      row_ih[tid] = oh * p.stride_h - p.pad_h;
      row_iw[tid] = ow * p.stride_w - p.pad_w;
      row_n[tid] = n;
      row_oh[tid] = oh;
      row_ow[tid] = ow;
    } else {
      row_x[tid] = 0;
      row_ih[tid] = kFarAway;
      row_iw[tid] = kFarAway;
      row_n[tid] = -1;
      row_oh[tid] = 0;
      row_ow[tid] = 0;
    }
  }
}

// The bias of output channel n0 + c of group g (0 past Kg or without bias).
__device__ __forceinline__ float bias_at(const ConvParams& p, const float* __restrict__ bias, int64_t n0, int64_t g,
                                         int c) {
  return (bias != nullptr && n0 + c < p.Kg) ? bias[g * p.Kg + n0 + c] : 0.f;
}

// An accumulator on its way to Cs: bias added; in training, the value rounded to the output dtype
// (the statistics are those of the stored conv output, which the batch-norm normalizes, as torch's
// batch-norm sees them).
template <class T>
__device__ __forceinline__ float finish_acc(float v, float b, bool round) {
  v += b;
  return round ? to_float(from_float<T>(v)) : v;
}

// The epilogue of a BM x BN tile Cs (accumulators with bias, already rounded in training):
// statistics (training), residual, pre-activation, activation, stores. The residual comes from Rs
// ([BM][BN + 8], staged by the caller) when Rs is not null, else from global memory. Ends with no
// barrier pending; every thread calls it.
template <class T>
__device__ __forceinline__ void conv_epilogue(const ConvParams& p, float (*Cs)[BN + 4], const int64_t* row_n,
                                              const int* row_oh, const int* row_ow, int64_t m0, int64_t n0,
                                              int64_t g, const T* __restrict__ res, const T* Rs, T* __restrict__ y,
                                              T* __restrict__ z, float* __restrict__ pmean, float* __restrict__ pm2) {
  const int tid = threadIdx.x;
  // Epilogue 2 (training): this tile's per-channel mean and M2 over its valid rows.
  if (pmean != nullptr) {
    const int rows = static_cast<int>(p.M - m0 < BM ? p.M - m0 : BM);
    for (int c = tid; c < BN; c += kThreads) {
      if (n0 + c >= p.Kg) continue;
      float s = 0.f;
      for (int r = 0; r < rows; ++r) s += Cs[r][c];
      const float mean = s / rows;
      float m2 = 0.f;
      for (int r = 0; r < rows; ++r) {
        const float d = Cs[r][c] - mean;
        m2 += d * d;
      }
      const int64_t at = static_cast<int64_t>(blockIdx.x) * p.K + g * p.Kg + n0 + c;
      pmean[at] = mean;
      pm2[at] = m2;
    }
  }
  // Epilogue 3: residual, pre-activation, activation, one store per output (channels fastest).
  for (int idx = tid; idx < BM * BN; idx += kThreads) {
    const int r = idx / BN, c = idx % BN;
    if (row_n[r] < 0 || n0 + c >= p.Kg) continue;
    const int64_t co = g * p.Kg + n0 + c;
    float v = Cs[r][c];
    if (Rs != nullptr)
      v += to_float(Rs[r * (BN + 8) + c]);
    else if (res != nullptr)
      v += to_float(res[row_n[r] * p.sr[0] + co * p.sr[1] + row_oh[r] * p.sr[2] + row_ow[r] * p.sr[3]]);
    const int64_t off = row_n[r] * p.sy[0] + co * p.sy[1] + row_oh[r] * p.sy[2] + row_ow[r] * p.sy[3];
    if (z != nullptr) z[off] = from_float<T>(v);
    y[off] = from_float<T>(act_fwd(v, p.act));
  }
}

// The warp's 32 x 32 share of a tile, one 16-deep step of k: acc[i][j] += A[i * 16.., k 0..15] *
// B[k 0..15, j * 8..] with acc[i][j] in the mma C layout (rows i * 16 + {g, g + 8}, columns j * 8 +
// {2t, 2t + 1} of the warp's block; csrc/mma_sync.h). a: the warp's first row of A (A[m][k] =
// a[m * lda + k], row-major); b: the warp's first column of B, stored n-major (b[n * ldb + k]) if
// kBnk, else k-major (b[k * ldb + n]). Two ldmatrix.x4 for A (one per 16 rows), two for B (16
// columns each: n8 fragments j = 2jj and 2jj + 1), eight mma.sync.
template <class T, bool kBnk>
__device__ __forceinline__ void warp_mma_k16(float (&acc)[2][4][4], const T* a, int lda, const T* b, int ldb) {
  uint32_t af[2][4], bf[2][4];
#pragma unroll
  for (int i = 0; i < 2; ++i) load_a_frag(af[i], a + i * 16 * lda, lda);
#pragma unroll
  for (int jj = 0; jj < 2; ++jj) {
    if constexpr (kBnk)
      load_b_frags_nk(bf[jj], b + jj * 16 * ldb, ldb);
    else
      load_b_frags_kn(bf[jj], b + jj * 16, ldb);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) mma_16816<T>(acc[i][j], af[i], bf[j >> 1][(j & 1) * 2], bf[j >> 1][(j & 1) * 2 + 1]);
}

// The warp (wm, wn)'s accumulators (rows wm * 32.., columns wn * 32..) into Cs, bias added and
// rounded to T in training (finish_acc). The bias loads are unrolled, outside every loop.
template <class T>
__device__ __forceinline__ void warp_acc_to_smem(const ConvParams& p, float (*Cs)[BN + 4], const float (&acc)[2][4][4],
                                                 int wm, int wn, int64_t n0, int64_t g, const float* __restrict__ bias,
                                                 bool round) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int c = wn * 32 + j * 8 + acc_col();
    const float b0 = bias_at(p, bias, n0, g, c), b1 = bias_at(p, bias, n0, g, c + 1);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = wm * 32 + i * 16 + acc_row();
      *reinterpret_cast<float2*>(&Cs[r][c]) =
          make_float2(finish_acc<T>(acc[i][j][0], b0, round), finish_acc<T>(acc[i][j][1], b1, round));
      *reinterpret_cast<float2*>(&Cs[r + 8][c]) =
          make_float2(finish_acc<T>(acc[i][j][2], b0, round), finish_acc<T>(acc[i][j][3], b1, round));
    }
  }
}

// x [N, C, H, W] (strides p.sx), w [K, Cg, KH, KW] (p.sw), bias [K] float32 or null, res
// [N, K, OH, OW] (p.sr) or null, y [N, K, OH, OW] (p.sy), z (y's strides) or null, pmean/pm2
// [gridDim.x, K] float32 or null (training). Grid (ceil(M/BM), ceil(Kg/BN), groups), 128 threads.
// The element gather for every layout and dtype (the fallback of conv_gemm_async_kernel).
template <class T, bool kMma>
__global__ void __launch_bounds__(kThreads)
conv_gemm_kernel(ConvParams p, const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ bias,
                 const T* __restrict__ res, T* __restrict__ y, T* __restrict__ z, float* __restrict__ pmean,
                 float* __restrict__ pm2) {
  using S = typename std::conditional<kMma, T, float>::type;  // shared-memory operand type
  // Row lengths: 40 and 72 elements (80 and 144 bytes for 16-bit types): multiples of 16 bytes, so
  // every ldmatrix row address is 16-byte aligned, and 8 consecutive rows hit 8 different 16-byte
  // bank groups (80 / 16 = 5 and 144 / 16 = 9 are odd).
  __shared__ __align__(128) S As[BM][BK + 8];   // A tile [m][k]
  __shared__ __align__(128) S Bs[BK][BN + 8];   // B tile [k][n] (k-major: ldmatrix.trans for mma)
  __shared__ __align__(32) float Cs[BM][BN + 4];  // accumulators for the epilogue
  __shared__ int64_t row_x[BM];                 // x offset of the row's image and group
  __shared__ int row_ih[BM], row_iw[BM];        // top-left input coordinate of the row's window
  __shared__ int64_t row_n[BM];
  __shared__ int row_oh[BM], row_ow[BM];
  __shared__ int col_ci[BK], col_kh[BK], col_kw[BK];  // (ci, kh, kw) of the tile's k, ci -1 past K

  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int64_t g = blockIdx.z;

  setup_rows(p, m0, g, row_x, row_ih, row_iw, row_n, row_oh, row_ow);

  const int64_t Ktot = p.KH * p.KW * p.Cg;
  // mma: warp (wm, wn) owns rows wm*32..+32 and columns wn*32..+32 (warp_mma_k16).
  // FMA: thread (tr, tc) owns rows tr*4..+4 and columns tc*8..+8.
  const int warp = tid / 32, wm = warp / 2, wn = warp % 2;
  const int tr = tid / 8, tc = tid % 8;
  float acc[2][4][4];  // mma
  float facc[4][8];    // FMA
  if constexpr (kMma) {
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 4; ++j)
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  } else {
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 8; ++j) facc[i][j] = 0.f;
  }

  for (int64_t k0 = 0; k0 < Ktot; k0 += BK) {
    if (tid < BK) {
      const int64_t k = k0 + tid;
      if (k < Ktot) {
        const int64_t tap = k / p.Cg;
        col_ci[tid] = static_cast<int>(k % p.Cg);
        col_kh[tid] = static_cast<int>(tap / p.KW);
        col_kw[tid] = static_cast<int>(tap % p.KW);
      } else {
        col_ci[tid] = -1;
        col_kh[tid] = 0;
        col_kw[tid] = 0;
      }
    }
    __syncthreads();  // row_* (first iteration) and col_* ready; previous tile consumed
    // A: consecutive threads read consecutive input channels (contiguous in NHWC).
    for (int idx = tid; idx < BM * BK; idx += kThreads) {
      const int r = idx / BK, kk = idx % BK;
      const int ci = col_ci[kk];
      S v = S(0.f);
      if (ci >= 0) {
        const int ih = row_ih[r] + col_kh[kk] * p.dil_h;
        const int iw = row_iw[r] + col_kw[kk] * p.dil_w;
        if (ih >= 0 && ih < p.H && iw >= 0 && iw < p.W) {
          const T xv = x[row_x[r] + ih * p.sx[2] + iw * p.sx[3] + ci * p.sx[1]];
          if constexpr (kMma) v = xv; else v = to_float(xv);
        }
      }
      As[r][kk] = v;
    }
    // B: consecutive threads read consecutive input channels of one output channel (OHWI weights).
    for (int idx = tid; idx < BN * BK; idx += kThreads) {
      const int nn = idx / BK, kk = idx % BK;
      const int ci = col_ci[kk];
      const int64_t co = n0 + nn;
      S v = S(0.f);
      if (ci >= 0 && co < p.Kg) {
        const T wv = w[(g * p.Kg + co) * p.sw[0] + ci * p.sw[1] + col_kh[kk] * p.sw[2] + col_kw[kk] * p.sw[3]];
        if constexpr (kMma) v = wv; else v = to_float(wv);
      }
      Bs[kk][nn] = v;
    }
    __syncthreads();
    if constexpr (kMma) {
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16)
        warp_mma_k16<T, false>(acc, &As[wm * 32][kk], BK + 8, &Bs[kk][wn * 32], BN + 8);
    } else {
      for (int kk = 0; kk < BK; ++kk) {
        float a[4], b[8];
        for (int i = 0; i < 4; ++i) a[i] = As[tr * 4 + i][kk];
        for (int j = 0; j < 8; ++j) b[j] = Bs[kk][tc * 8 + j];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 8; ++j) facc[i][j] = fmaf(a[i], b[j], facc[i][j]);
      }
    }
    __syncthreads();
  }

  if constexpr (kMma) {
    warp_acc_to_smem<T>(p, Cs, acc, wm, wn, n0, g, bias, pmean != nullptr);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float bj = bias_at(p, bias, n0, g, tc * 8 + j);
#pragma unroll
      for (int i = 0; i < 4; ++i) Cs[tr * 4 + i][tc * 8 + j] = finish_acc<T>(facc[i][j], bj, pmean != nullptr);
    }
  }
  __syncthreads();

  conv_epilogue<T>(p, Cs, row_n, row_oh, row_ow, m0, n0, g, res, nullptr, y, z, pmean, pm2);
}

// ---------------------------------------------------------------------------------------------
// The fast path of the implicit GEMM for 16-bit types: both operands arrive in shared memory by
// 16-byte asynchronous copies (cp.async.cg, LDGSTS.128), double-buffered so that tile t + 1 loads
// while the tensor cores work on tile t; fragments are read from shared memory by ldmatrix (LDSM)
// and multiplied by mma.sync (HMMA). Taken when the input's channels are contiguous (channels_last)
// and the weights' input channels too (OHWI), Cg and every other stride multiples of 8, and both
// pointers 16-byte aligned: then 8 consecutive k = (kh, kw, ci..ci+7) of a tile are 16 contiguous
// bytes in both. Out-of-range chunks (padding, rows past M, k past K, channels past Kg) are
// zero-filled by the copy (source size 0). The B tile is kept [n][k] (n-major: plain ldmatrix gives
// the mma's "col" B fragments) so its chunks are contiguous. The residual tile (if any) is staged in
// shared memory after the main loop, by 16-byte copies when p.res_vec.
constexpr int kChunk = 8;                      // elements per 16-byte copy
constexpr int kChunksPerRow = BK / kChunk;     // 4
constexpr int kLd = BK + 8;                    // shared row length: 80 bytes, a multiple of 16
constexpr int kLdR = BN + 8;                   // the staged residual's row length: 144 bytes

template <class T>
__global__ void __launch_bounds__(kThreads)
conv_gemm_async_kernel(ConvParams p, const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ bias,
                       const T* __restrict__ res, T* __restrict__ y, T* __restrict__ z, float* __restrict__ pmean,
                       float* __restrict__ pm2) {
  __shared__ __align__(128) T As[2][BM][kLd];  // A tiles [stage][m][k]; the residual tile after the loop
  __shared__ __align__(128) T Bs[2][BN][kLd];  // B tiles [stage][n][k]
  __shared__ __align__(32) float Cs[BM][BN + 4];
  __shared__ int64_t row_x[BM];
  __shared__ int row_ih[BM], row_iw[BM];
  __shared__ int64_t row_n[BM];
  __shared__ int row_oh[BM], row_ow[BM];
  static_assert(BM * kLdR <= 2 * BM * kLd, "the residual tile fits in the A stages");

  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int64_t g = blockIdx.z;
  setup_rows(p, m0, g, row_x, row_ih, row_iw, row_n, row_oh, row_ow);
  __syncthreads();

  const int64_t Ktot = p.KH * p.KW * p.Cg;
  const int64_t tiles = (Ktot + BK - 1) / BK;
  // This thread's chunks: rows (A) / output channels (B) tid / 4 and tid / 4 + 32, chunk tid % 4.
  const int kc = tid % kChunksPerRow;
  const int r0 = tid / kChunksPerRow;
  constexpr int kRowStep = kThreads / kChunksPerRow;  // 32
  const T* wg = w + g * p.Kg * p.sw[0];

  const auto load_tile = [&](int stage, int64_t k0) {
    const int64_t k = k0 + kc * kChunk;
    const bool k_ok = k < Ktot;
    const int64_t tap = k_ok ? k / p.Cg : 0;
    const int ci = k_ok ? static_cast<int>(k - tap * p.Cg) : 0;
    const int kh = static_cast<int>(tap / p.KW), kw = static_cast<int>(tap % p.KW);
#pragma unroll
    for (int i = 0; i < BM / kRowStep; ++i) {
      const int r = r0 + i * kRowStep;
      const int ih = row_ih[r] + kh * p.dil_h, iw = row_iw[r] + kw * p.dil_w;
      const bool ok = k_ok && ih >= 0 && ih < p.H && iw >= 0 && iw < p.W;
      const T* src = ok ? x + row_x[r] + ih * p.sx[2] + iw * p.sx[3] + ci : x;
      cp_async16(&As[stage][r][kc * kChunk], src, ok);
    }
#pragma unroll
    for (int i = 0; i < BN / kRowStep; ++i) {
      const int nn = r0 + i * kRowStep;
      const bool ok = k_ok && n0 + nn < p.Kg;
      const T* src = ok ? wg + (n0 + nn) * p.sw[0] + ci + kh * p.sw[2] + kw * p.sw[3] : w;
      cp_async16(&Bs[stage][nn][kc * kChunk], src, ok);
    }
  };

  const int warp = tid / 32, wm = warp / 2, wn = warp % 2;
  float acc[2][4][4];  // warp (wm, wn): rows wm*32..+32, columns wn*32..+32 (warp_mma_k16)
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  load_tile(0, 0);
  cp_async_commit();
  for (int64_t t = 0; t < tiles; ++t) {
    const int stage = static_cast<int>(t & 1);
    // The next tile goes into the other stage, which every warp finished reading before the
    // barrier that ended the previous iteration.
    if (t + 1 < tiles) load_tile(stage ^ 1, (t + 1) * BK);
    cp_async_commit();  // possibly empty: keeps the group count uniform
    cp_async_wait<1>();  // this thread's copies of tile t have landed
    __syncthreads();     // ... and every other thread's
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16)
      warp_mma_k16<T, true>(acc, &As[stage][wm * 32][kk], kLd, &Bs[stage][wn * 32][kk], kLd);
    __syncthreads();
  }
  cp_async_wait<0>();  // only empty groups can be pending here

  // The residual tile [BM][BN] into the A stages (free: the loop ended with a barrier), in flight
  // while the accumulators go to Cs. Vector: one 16-byte copy per 8 channels of a row, zero past M
  // and Kg (Kg a multiple of 8, so a chunk is all in or all out).
  T* Rs = &As[0][0][0];
  if (res != nullptr) {
    if (p.res_vec) {
      for (int idx = tid; idx < BM * (BN / kChunk); idx += kThreads) {
        const int r = idx / (BN / kChunk), c = (idx % (BN / kChunk)) * kChunk;
        const bool ok = row_n[r] >= 0 && n0 + c < p.Kg;
        const T* src = ok ? res + row_n[r] * p.sr[0] + (g * p.Kg + n0 + c) + row_oh[r] * p.sr[2] + row_ow[r] * p.sr[3]
                          : res;
        cp_async16(Rs + r * kLdR + c, src, ok);
      }
      cp_async_commit();
    } else {
      for (int idx = tid; idx < BM * BN; idx += kThreads) {
        const int r = idx / BN, c = idx % BN;
        const int64_t co = g * p.Kg + n0 + c;
        Rs[r * kLdR + c] = (row_n[r] >= 0 && n0 + c < p.Kg)
                               ? res[row_n[r] * p.sr[0] + co * p.sr[1] + row_oh[r] * p.sr[2] + row_ow[r] * p.sr[3]]
                               : from_float<T>(0.f);
      }
    }
  }
  warp_acc_to_smem<T>(p, Cs, acc, wm, wn, n0, g, bias, pmean != nullptr);
  cp_async_wait<0>();
  __syncthreads();
  conv_epilogue<T>(p, Cs, row_n, row_oh, row_ow, m0, n0, g, res, res != nullptr ? Rs : nullptr, y, z, pmean, pm2);
}

// ---------------------------------------------------------------------------------------------
// Depthwise: output channel c reads input channel c / mult only. A block computes DW_TP output
// pixels x DW_TC channels; threadIdx.x runs over channels (contiguous in NHWC).
constexpr int DW_TP = 64, DW_TC = 32, DW_ROWS = 8;

// Arguments as conv_gemm_kernel (w [K, 1, KH, KW]); grid (ceil(M/DW_TP), ceil(K/DW_TC)), block
// (DW_TC, DW_ROWS).
// I: the index type of the pixel decomposition (int32_t when M fits: no 64-bit division calls).
template <class T, class I>
__global__ void __launch_bounds__(DW_TC * DW_ROWS)
conv_depthwise_kernel(ConvParams p, const T* __restrict__ x, const T* __restrict__ w,
                      const float* __restrict__ bias, const T* __restrict__ res, T* __restrict__ y,
                      T* __restrict__ z, float* __restrict__ pmean, float* __restrict__ pm2) {
  __shared__ float vals[DW_TP][DW_TC + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.y) * DW_TC + threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * DW_TP;
  const int mult = static_cast<int>(p.K) / static_cast<int>(p.C);  // K < 2^21 (the grid's limit)
  const int64_t ci = static_cast<int>(c) / mult;
  const I ohw = static_cast<I>(p.OH * p.OW), OW = static_cast<I>(p.OW);
  for (int r = threadIdx.y; r < DW_TP; r += DW_ROWS) {
    const int64_t m = m0 + r;
    if (m >= p.M || c >= p.K) continue;
    const I mi = static_cast<I>(m), rem = mi % ohw;
    const int64_t n = mi / ohw;
    const int oh = static_cast<int>(rem / OW), ow = static_cast<int>(rem % OW);
    const T* xc = x + n * p.sx[0] + ci * p.sx[1];
    const T* wc = w + c * p.sw[0];
    float acc = 0.f;
    for (int kh = 0; kh < p.KH; ++kh) {
      const int ih = oh * p.stride_h - p.pad_h + kh * p.dil_h;
      if (ih < 0 || ih >= p.H) continue;
      for (int kw = 0; kw < p.KW; ++kw) {
        const int iw = ow * p.stride_w - p.pad_w + kw * p.dil_w;
        if (iw < 0 || iw >= p.W) continue;
        acc = fmaf(to_float(xc[ih * p.sx[2] + iw * p.sx[3]]), to_float(wc[kh * p.sw[2] + kw * p.sw[3]]), acc);
      }
    }
    if (bias != nullptr) acc += bias[c];
    const int64_t off = n * p.sy[0] + c * p.sy[1] + oh * p.sy[2] + ow * p.sy[3];
    if (pmean != nullptr) {  // training: statistics of the stored (rounded) value, as in conv_gemm_kernel
      const T stored = from_float<T>(acc);
      vals[r][threadIdx.x] = to_float(stored);
      y[off] = stored;
      continue;
    }
    if (res != nullptr) acc += to_float(res[n * p.sr[0] + c * p.sr[1] + oh * p.sr[2] + ow * p.sr[3]]);
    if (z != nullptr) z[off] = from_float<T>(acc);
    y[off] = from_float<T>(act_fwd(acc, p.act));
  }
  if (pmean == nullptr) return;
  __syncthreads();
  if (threadIdx.y == 0 && c < p.K) {
    const int rows = static_cast<int>(p.M - m0 < DW_TP ? p.M - m0 : DW_TP);
    float s = 0.f;
    for (int r = 0; r < rows; ++r) s += vals[r][threadIdx.x];
    const float mean = s / rows;
    float m2 = 0.f;
    for (int r = 0; r < rows; ++r) {
      const float d = vals[r][threadIdx.x] - mean;
      m2 += d * d;
    }
    pmean[static_cast<int64_t>(blockIdx.x) * p.K + c] = mean;
    pm2[static_cast<int64_t>(blockIdx.x) * p.K + c] = m2;
  }
}

// The 128-bit path of conv_depthwise_kernel: one input channel per output channel (K == C), every
// tensor's channels contiguous (x, y, z, residual in NHWC; w as [KH, KW, K], w_stride[0] == 1: the
// launcher's copy), C and the other strides multiples of V = vec_width<T>(), every pointer (bias,
// pmean, pm2 included) 16-byte aligned. A thread computes V neighbouring channels of one output
// pixel, every load and store 16 bytes; a block DW_TP pixels (DW_VROWS rows of threads) x
// DW_VTC * V channels. Per channel, the same operations in the same order as the scalar kernel.
constexpr int DW_VTC = 8, DW_VROWS = 64;

template <class T, class I>
__global__ void __launch_bounds__(DW_VTC * DW_VROWS)
conv_depthwise_vec_kernel(ConvParams p, const T* __restrict__ x, const T* __restrict__ w,
                          const float* __restrict__ bias, const T* __restrict__ res, T* __restrict__ y,
                          T* __restrict__ z, float* __restrict__ pmean, float* __restrict__ pm2) {
  constexpr int V = vec_width<T>();
  constexpr int TCH = DW_VTC * V;  // channels per block
  __shared__ float vals[DW_TP][TCH + 1];
  __shared__ float smean[TCH], sm2[TCH];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * DW_VTC + tx) * V;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * DW_TP;
  const I ohw = static_cast<I>(p.OH * p.OW), OW = static_cast<I>(p.OW);
  for (int r = ty; r < DW_TP; r += DW_VROWS) {
    const int64_t m = m0 + r;
    if (m >= p.M || c0 >= p.K) break;  // rows ascend: no later row of this thread is valid either
    const I mi = static_cast<I>(m), rem = mi % ohw;
    const int64_t n = mi / ohw;
    const int oh = static_cast<int>(rem / OW), ow = static_cast<int>(rem % OW);
    const T* xc = x + n * p.sx[0] + c0;
    const T* wc = w + c0;
    float acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = 0.f;
    for (int kh = 0; kh < p.KH; ++kh) {
      const int ih = oh * p.stride_h - p.pad_h + kh * p.dil_h;
      if (ih < 0 || ih >= p.H) continue;
      for (int kw = 0; kw < p.KW; ++kw) {
        const int iw = ow * p.stride_w - p.pad_w + kw * p.dil_w;
        if (iw < 0 || iw >= p.W) continue;
        float xv[V], wv[V];
        load_vec<V>(xc + ih * p.sx[2] + iw * p.sx[3], xv);
        load_vec<V>(wc + kh * p.sw[2] + kw * p.sw[3], wv);
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] = fmaf(xv[j], wv[j], acc[j]);
      }
    }
    if (bias != nullptr) {
      float bv[V];
      load_vec<V>(bias + c0, bv);
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] += bv[j];
    }
    const int64_t off = n * p.sy[0] + c0 + oh * p.sy[2] + ow * p.sy[3];
    if (pmean != nullptr) {  // training: statistics of the stored (rounded) values
#pragma unroll
      for (int j = 0; j < V; ++j) vals[r][tx * V + j] = to_float(from_float<T>(acc[j]));
      store_vec<V>(y + off, acc);
      continue;
    }
    if (res != nullptr) {
      float rv[V];
      load_vec<V>(res + n * p.sr[0] + c0 + oh * p.sr[2] + ow * p.sr[3], rv);
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] += rv[j];
    }
    if (z != nullptr) store_vec<V>(z + off, acc);
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = act_fwd(acc[j], p.act);
    store_vec<V>(y + off, acc);
  }
  if (pmean == nullptr) return;
  __syncthreads();
  // One thread per channel of the block: the tile's mean and M2 (as the scalar kernel), then the
  // block's channels by 128-bit stores.
  const int t = ty * DW_VTC + tx;
  const int64_t cb = static_cast<int64_t>(blockIdx.y) * TCH;
  if (t < TCH && cb + t < p.K) {
    const int rows = static_cast<int>(p.M - m0 < DW_TP ? p.M - m0 : DW_TP);
    float s = 0.f;
    for (int r = 0; r < rows; ++r) s += vals[r][t];
    const float mean = s / rows;
    float m2 = 0.f;
    for (int r = 0; r < rows; ++r) {
      const float d = vals[r][t] - mean;
      m2 += d * d;
    }
    smean[t] = mean;
    sm2[t] = m2;
  }
  __syncthreads();
  if (ty == 0 && c0 < p.K) {
    float mv[V], qv[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      mv[j] = smean[tx * V + j];
      qv[j] = sm2[tx * V + j];
    }
    store_vec<V>(pmean + static_cast<int64_t>(blockIdx.x) * p.K + c0, mv);
    store_vec<V>(pm2 + static_cast<int64_t>(blockIdx.x) * p.K + c0, qv);
  }
}

// ---------------------------------------------------------------------------------------------
// One thread per channel merges the tiles in order: deterministic, Chan's stable formula.
__global__ void stats_finalize_kernel(const float* __restrict__ pmean, const float* __restrict__ pm2,
                                      float* __restrict__ mean, float* __restrict__ var, int64_t tiles,
                                      int64_t channels, int64_t rows, int64_t tile) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  float n_run = 0.f, mean_run = 0.f, m2_run = 0.f;
  for (int64_t t = 0; t < tiles; ++t) {
    const float n_b = static_cast<float>(rows - t * tile < tile ? rows - t * tile : tile);
    const float mean_b = pmean[t * channels + c];
    const float n_new = n_run + n_b;
    const float delta = mean_b - mean_run;
    mean_run += delta * (n_b / n_new);
    m2_run += pm2[t * channels + c] + delta * delta * (n_run * (n_b / n_new));
    n_run = n_new;
  }
  mean[c] = mean_run;
  var[c] = m2_run / n_run;
}

template <class T>
__global__ void act_grad_kernel(const T* __restrict__ dy, const T* __restrict__ z, T* __restrict__ dz, int64_t n,
                                int act) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dz[i] = from_float<T>(act_bwd(to_float(z[i]), to_float(dy[i]), act));
}

// The 128-bit path of act_grad_kernel (dy, z and dz 16-byte aligned): nv vectors of V =
// vec_width<T>() elements, one per thread and iteration; the launcher gives the n % V tail to
// act_grad_kernel.
template <class T>
__global__ void act_grad_vec_kernel(const T* __restrict__ dy, const T* __restrict__ z, T* __restrict__ dz,
                                    int64_t nv, int act) {
  constexpr int V = vec_width<T>();
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nv;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float zv[V], gv[V];
    load_vec<V>(z + i * V, zv);
    load_vec<V>(dy + i * V, gv);
#pragma unroll
    for (int j = 0; j < V; ++j) zv[j] = act_bwd(zv[j], gv[j], act);
    store_vec<V>(dz + i * V, zv);
  }
}

}  // namespace

int64_t conv_stats_tile(bool depthwise) { return depthwise ? DW_TP : BM; }

void conv_fwd(std::uintptr_t x, const Shape& x_size, const Shape& x_stride, std::uintptr_t w, const Shape& w_size,
              const Shape& w_stride, std::uintptr_t bias, std::uintptr_t res, const Shape& res_stride,
              std::uintptr_t y, const Shape& y_size, const Shape& y_stride, std::uintptr_t z, std::uintptr_t pmean,
              std::uintptr_t pm2, const Shape& stride, const Shape& padding, const Shape& dilation, int64_t groups,
              int act, int dtype, std::uintptr_t stream) {
  require(x_size.size() == 4 && x_stride.size() == 4 && w_size.size() == 4 && w_stride.size() == 4 &&
              y_size.size() == 4 && y_stride.size() == 4 && res_stride.size() == 4,
          "conv_fwd: x, w, y and the residual strides must be 4-d");
  require(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, "conv_fwd: stride/padding/dilation");
  require(groups >= 1 && groups < 65536, "conv_fwd: groups must be in [1, 65535]");
  require((pmean == 0) == (pm2 == 0), "conv_fwd: pmean and pm2 go together");
  ConvParams p{};
  p.N = x_size[0]; p.C = x_size[1]; p.H = x_size[2]; p.W = x_size[3];
  p.K = w_size[0]; p.KH = w_size[2]; p.KW = w_size[3];
  p.OH = y_size[2]; p.OW = y_size[3];
  p.Cg = w_size[1];
  p.Kg = p.K / groups;
  p.M = p.N * p.OH * p.OW;
  require(p.Cg * groups == p.C && p.Kg * groups == p.K && y_size[0] == p.N && y_size[1] == p.K,
          "conv_fwd: inconsistent channels and groups");
  require(p.H < INT_MAX / 2 && p.W < INT_MAX / 2 && p.KH * p.KW * p.Cg < INT_MAX, "conv_fwd: sizes too large");
  for (int i = 0; i < 4; ++i) {
    p.sx[i] = x_stride[i];
    p.sw[i] = w_stride[i];
    p.sr[i] = res_stride[i];
    p.sy[i] = y_stride[i];
  }
  p.stride_h = static_cast<int>(stride[0]); p.stride_w = static_cast<int>(stride[1]);
  p.pad_h = static_cast<int>(padding[0]); p.pad_w = static_cast<int>(padding[1]);
  p.dil_h = static_cast<int>(dilation[0]); p.dil_w = static_cast<int>(dilation[1]);
  p.act = act;
  if (p.M == 0 || p.K == 0) return;
  const bool depthwise = groups == p.C && p.Cg == 1;
  cudaStream_t s = as_stream(stream);
  const float* b = as_ptr<const float>(bias);
  float* pmn = as_ptr<float>(pmean);
  float* pm2p = as_ptr<float>(pm2);
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = as_ptr<const T>(x);
    const T* wp = as_ptr<const T>(w);
    const T* rp = as_ptr<const T>(res);
    T* yp = as_ptr<T>(y);
    T* zp = as_ptr<T>(z);
    // The depthwise 128-bit path: K == C, channels contiguous in every tensor (w as [KH, KW, K]), C
    // and the other strides multiples of V, every pointer 16-byte aligned.
    constexpr int64_t V = vec_width<T>();
    const bool dw_vec = depthwise && p.K == p.C && p.C % V == 0 && p.sx[1] == 1 && p.sw[0] == 1 && p.sy[1] == 1 &&
                        multiple({p.sx[0], p.sx[2], p.sx[3], p.sw[2], p.sw[3], p.sy[0], p.sy[2], p.sy[3]}, V) &&
                        (res == 0 || (p.sr[1] == 1 && multiple({p.sr[0], p.sr[2], p.sr[3]}, V))) &&
                        aligned({x, w, bias, res, y, z, pmean, pm2});
    if (dw_vec) {
      const int64_t gy = ceil_div(p.K, DW_VTC * V);
      require(gy < 65536, "conv_fwd: too many channels for the depthwise grid");
      require(ceil_div(p.M, DW_TP) <= 2147483647LL, "conv_fwd: too many output pixels");
      dim3 grid(grid_x(ceil_div(p.M, DW_TP)), static_cast<unsigned>(gy));
      if (p.M <= INT_MAX) {  // m < M: the pixel decomposition in int32
        conv_depthwise_vec_kernel<T, int32_t>
            <<<grid, dim3(DW_VTC, DW_VROWS), 0, s>>>(p, xp, wp, b, rp, yp, zp, pmn, pm2p);
      } else {
        conv_depthwise_vec_kernel<T, int64_t>
            <<<grid, dim3(DW_VTC, DW_VROWS), 0, s>>>(p, xp, wp, b, rp, yp, zp, pmn, pm2p);
      }
      FN_LAUNCH_CHECK("conv_depthwise_vec_kernel");
    } else if (depthwise) {
      const int64_t gy = ceil_div(p.K, DW_TC);
      require(gy < 65536, "conv_fwd: too many channels for the depthwise grid");
      dim3 grid(grid_x(ceil_div(p.M, DW_TP)), static_cast<unsigned>(gy));
      require(ceil_div(p.M, DW_TP) <= 2147483647LL, "conv_fwd: too many output pixels");
      if (p.M <= INT_MAX) {
        conv_depthwise_kernel<T, int32_t><<<grid, dim3(DW_TC, DW_ROWS), 0, s>>>(p, xp, wp, b, rp, yp, zp, pmn, pm2p);
      } else {
        conv_depthwise_kernel<T, int64_t><<<grid, dim3(DW_TC, DW_ROWS), 0, s>>>(p, xp, wp, b, rp, yp, zp, pmn, pm2p);
      }
      FN_LAUNCH_CHECK("conv_depthwise_kernel");
    } else {
      const int64_t gy = ceil_div(p.Kg, BN);
      require(gy < 65536, "conv_fwd: too many output channels per group for the grid");
      require(ceil_div(p.M, BM) <= 2147483647LL, "conv_fwd: too many output pixels");
      dim3 grid(grid_x(ceil_div(p.M, BM)), static_cast<unsigned>(gy), static_cast<unsigned>(groups));
      constexpr bool kMma = !std::is_same<T, float>::value;
      // The asynchronous-copy path (16-bit types): channels contiguous in x and w, Cg and the other
      // strides multiples of 8, both pointers 16-byte aligned.
      const bool async = kMma && p.sx[1] == 1 && p.sw[1] == 1 && p.Cg % kChunk == 0 &&
                         p.sx[0] % kChunk == 0 && p.sx[2] % kChunk == 0 && p.sx[3] % kChunk == 0 &&
                         p.sw[0] % kChunk == 0 && p.sw[2] % kChunk == 0 && p.sw[3] % kChunk == 0 && x % 16 == 0 &&
                         w % 16 == 0;
      // Its residual tile by 16-byte copies: channels contiguous, Kg (so every group's first
      // channel) and the other strides multiples of 8, the pointer 16-byte aligned.
      p.res_vec = res != 0 && p.sr[1] == 1 && p.Kg % kChunk == 0 && p.sr[0] % kChunk == 0 &&
                  p.sr[2] % kChunk == 0 && p.sr[3] % kChunk == 0 && res % 16 == 0;
      if constexpr (kMma) {
        if (async) {
          conv_gemm_async_kernel<T><<<grid, kThreads, 0, s>>>(p, xp, wp, b, rp, yp, zp, pmn, pm2p);
          FN_LAUNCH_CHECK("conv_gemm_async_kernel");
          return;
        }
      }
      conv_gemm_kernel<T, kMma><<<grid, kThreads, 0, s>>>(p, xp, wp, b, rp, yp, zp, pmn, pm2p);
      FN_LAUNCH_CHECK("conv_gemm_kernel");
    }
  });
}

void conv_stats_finalize(std::uintptr_t pmean, std::uintptr_t pm2, std::uintptr_t mean, std::uintptr_t var,
                         int64_t tiles, int64_t channels, int64_t rows, int64_t tile, std::uintptr_t stream) {
  require(tiles == ceil_div(rows, tile) && tile > 0, "conv_stats_finalize: tiles must be ceil(rows / tile)");
  if (channels == 0 || tiles == 0) return;
  const int threads = 256;
  stats_finalize_kernel<<<grid_x(ceil_div(channels, threads)), threads, 0, as_stream(stream)>>>(
      as_ptr<const float>(pmean), as_ptr<const float>(pm2), as_ptr<float>(mean), as_ptr<float>(var), tiles,
      channels, rows, tile);
  FN_LAUNCH_CHECK("stats_finalize_kernel");
}

void conv_act_grad(std::uintptr_t dy, std::uintptr_t z, std::uintptr_t dz, int64_t n, int act, int dtype,
                   std::uintptr_t stream) {
  if (n == 0) return;
  const int threads = 256;
  const int64_t blocks = ceil_div(n, threads) < 65536 * 8 ? ceil_div(n, threads) : 65536 * 8;
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int64_t V = vec_width<T>();
    // Aligned pointers: the whole vectors by the 128-bit kernel, the n % V tail by the scalar one.
    const int64_t nv = aligned({dy, z, dz}) ? n / V : 0;
    if (nv > 0) {
      const int64_t vblocks = ceil_div(nv, threads) < 65536 * 8 ? ceil_div(nv, threads) : 65536 * 8;
      act_grad_vec_kernel<T><<<grid_x(vblocks), threads, 0, as_stream(stream)>>>(
          as_ptr<const T>(dy), as_ptr<const T>(z), as_ptr<T>(dz), nv, act);
      FN_LAUNCH_CHECK("act_grad_vec_kernel");
    }
    const int64_t done = nv * V, rest = n - done;
    if (rest > 0) {
      const int64_t sblocks = ceil_div(rest, threads) < 65536 * 8 ? ceil_div(rest, threads) : 65536 * 8;
      act_grad_kernel<T><<<grid_x(sblocks), threads, 0, as_stream(stream)>>>(
          as_ptr<const T>(dy) + done, as_ptr<const T>(z) + done, as_ptr<T>(dz) + done, rest, act);
      FN_LAUNCH_CHECK("act_grad_kernel");
    }
  });
}

}  // namespace fastnets
