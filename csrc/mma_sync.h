// Warp-level tensor-core primitives (sm_80+) for the conv implicit GEMM and attention kernels:
// `ldmatrix` (LDSM in SASS) reads 16-bit operand fragments from shared memory and
// `mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32` (HMMA) multiplies them with
// float32 accumulation. One code path for float16 and bfloat16 (WMMA's bf16 loads compile to plain
// LDS without ldmatrix under CUDA 13, its fp16 loads to LDSM: explicit PTX gives LDSM for both).
//
// Fragment layouts, from the PTX ISA ("Matrix fragments for mma.m16n8k16 with floating point type"
// and "ldmatrix"). In a warp, lane l has g = l / 4 (groupID) and t = l % 4 (threadID_in_group).
//  - A (16 x 16, m x k), four .b32 registers of two 16-bit elements each (low half = lower k):
//      a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, +9]   a[3] = A[g+8][2t+8, +9]
//  - B (16 x 8, k x n), two registers:  b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//  - C / D (16 x 8, float32), four registers:
//      c[0], c[1] = C[g][2t], C[g][2t+1]        c[2], c[3] = C[g+8][2t], C[g+8][2t+1]
//  - ldmatrix.m8n8.x4.b16: lanes 8q .. 8q+7 give the addresses of rows 0..7 of matrix q (16 bytes
//    each, 16-byte aligned); register r[q] of lane l receives, of matrix q (X[row][col]):
//      without .trans: X[g][2t], X[g][2t+1]        with .trans: X[2t][g], X[2t+1][g]
//    (16-bit element pairs, the first in the low half, as the mma operands want them).
// So a register of an mma operand is one ldmatrix matrix when the 8 x 8 block is chosen as below:
//  - A stored row-major (A[m][k] at p[m * ld + k]): a[q] without .trans from the block of rows
//    m0 = (q % 2) * 8 and columns k0 = (q / 2) * 8: X[g][2t] = A[m0 + g][k0 + 2t]. Lane l points at
//    row l % 16, column (l / 16) * 8.
//  - A stored transposed (A[m][k] at p[k * ld + m]): a[q] with .trans from the stored block of rows
//    k0 = (q / 2) * 8, columns m0 = (q % 2) * 8: X[2t][g] = p[(k0 + 2t) * ld + m0 + g] = A[m0 + g][k0 + 2t].
//    Lane l (q = l / 8, r = l % 8) points at row (q / 2) * 8 + r, column (q % 2) * 8.
//  - B stored n-major (B[k][n] at p[n * ld + k], "col" for mma), two n8 fragments (n 0..7, n 8..15):
//    r[q] without .trans from the stored block of rows n0 = (q / 2) * 8, columns k0 = (q % 2) * 8:
//    X[g][2t] = p[(n0 + g) * ld + k0 + 2t] = B[k0 + 2t][n0 + g]; so {r[0], r[1]} is n 0..7 (k 0..7,
//    k 8..15) and {r[2], r[3]} is n 8..15. Lane l points at row (q / 2) * 8 + r, column (q % 2) * 8.
//  - B stored k-major (B[k][n] at p[k * ld + n]): r[q] with .trans from the stored block of rows
//    k0 = (q % 2) * 8, columns n0 = (q / 2) * 8: X[2t][g] = B[k0 + 2t][n0 + g]; same register order.
//    Lane l points at row (q % 2) * 8 + r = l % 16, column (q / 2) * 8 = (l / 16) * 8.
// Every row address must be 16-byte aligned: the callers' shared tiles have row lengths that are
// multiples of 8 elements and the fragment origins sit at multiples of 8 elements.
#pragma once
#include <cstdint>

#include "common.h"

namespace fastnets {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// "memory" clobber: the shared tiles are written by plain stores or cp.async of other threads and
// published by __syncthreads(); the loads must not move across it.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row))
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row))
               : "memory");
}

// The 16 x 16 A fragment at p (the element (0, 0) of the block), A[m][k] = p[m * ld + k].
template <class T>
__device__ __forceinline__ void load_a_frag(uint32_t (&a)[4], const T* p, int ld) {
  const int l = threadIdx.x & 31;
  ldsm_x4(a, p + (l & 15) * ld + (l >> 4) * 8);
}
// The 16 x 16 A fragment stored transposed: A[m][k] = p[k * ld + m].
template <class T>
__device__ __forceinline__ void load_a_frag_t(uint32_t (&a)[4], const T* p, int ld) {
  const int l = threadIdx.x & 31, q = l >> 3, r = l & 7;
  ldsm_x4_trans(a, p + ((q >> 1) * 8 + r) * ld + (q & 1) * 8);
}
// Two B fragments (16 x 8 each: n 0..7 in b[0], b[1]; n 8..15 in b[2], b[3]) stored n-major:
// B[k][n] = p[n * ld + k].
template <class T>
__device__ __forceinline__ void load_b_frags_nk(uint32_t (&b)[4], const T* p, int ld) {
  const int l = threadIdx.x & 31, q = l >> 3, r = l & 7;
  ldsm_x4(b, p + ((q >> 1) * 8 + r) * ld + (q & 1) * 8);
}
// Two B fragments stored k-major: B[k][n] = p[k * ld + n].
template <class T>
__device__ __forceinline__ void load_b_frags_kn(uint32_t (&b)[4], const T* p, int ld) {
  const int l = threadIdx.x & 31;
  ldsm_x4_trans(b, p + (l & 15) * ld + (l >> 4) * 8);
}

// d += A (16 x 16) * B (16 x 8), float32 accumulators in the C layout above.
template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The accumulator rows and columns of this lane in a 16 x 8 block: (g, 2t), (g, 2t + 1),
// (g + 8, 2t), (g + 8, 2t + 1) for c[0..3].
__device__ __forceinline__ int acc_row() { return (threadIdx.x & 31) >> 2; }
__device__ __forceinline__ int acc_col() { return (threadIdx.x & 3) * 2; }

// C[16 x 8] (float, row stride ldc, C 8-byte aligned, ldc even) <-> accumulators.
__device__ __forceinline__ void load_acc(float (&c)[4], const float* C, int ldc) {
  const float2 lo = *reinterpret_cast<const float2*>(C + acc_row() * ldc + acc_col());
  const float2 hi = *reinterpret_cast<const float2*>(C + (acc_row() + 8) * ldc + acc_col());
  c[0] = lo.x, c[1] = lo.y, c[2] = hi.x, c[3] = hi.y;
}
__device__ __forceinline__ void store_acc(float* C, int ldc, const float (&c)[4]) {
  *reinterpret_cast<float2*>(C + acc_row() * ldc + acc_col()) = make_float2(c[0], c[1]);
  *reinterpret_cast<float2*>(C + (acc_row() + 8) * ldc + acc_col()) = make_float2(c[2], c[3]);
}

}  // namespace fastnets
