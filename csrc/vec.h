// 128-bit global loads and stores for the bandwidth kernels' fast paths (bias_act, norm_act,
// layer_norm, LRN, pooling in NHWC).
//
// A fast path moves V = vec_width<T>() neighbouring elements (16 bytes of T: 8 halves or bf16s, 4
// floats) with one LDG.E.128 / STG.E.128 per 16 bytes. Its launcher takes it only when every
// pointer it loads through is 16-byte aligned, the vectorized axis is contiguous (stride 1) and
// every other stride and the vectorized extent are multiples of V (aligned() and multiple() below),
// so every vector starts on a 16-byte boundary; otherwise the scalar kernel runs. Loaded values are
// converted to float32, the accumulation type of every kernel.
#pragma once
#include <cstdint>
#include <initializer_list>

#include "common.h"

namespace fastnets {

template <class T>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(T));
}

// Bits of one element, and back: a 16-byte word is packed and unpacked with integer operations, so
// that it stays in registers and moves with one 128-bit instruction.
__device__ __forceinline__ uint32_t bits_of(float v) { return __float_as_uint(v); }
__device__ __forceinline__ uint32_t bits_of(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t bits_of(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
template <class T> __device__ __forceinline__ float float_of_bits(uint32_t b);
template <> __device__ __forceinline__ float float_of_bits<float>(uint32_t b) { return __uint_as_float(b); }
template <> __device__ __forceinline__ float float_of_bits<__half>(uint32_t b) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
}
template <> __device__ __forceinline__ float float_of_bits<__nv_bfloat16>(uint32_t b) {
  return __uint_as_float(b << 16);  // bf16 is the top half of a float32
}

// out[i] = p[i] for i < V, in float32; p must be 16-byte aligned and V * sizeof(T) a multiple of 16
// (V = vec_width<T>() for the tensor itself, or its value for another type, e.g. float32 weights
// beside a half tensor: two 128-bit loads).
template <int V, class T>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[V]) {
  static_assert((V * sizeof(T)) % 16 == 0, "a vector is a whole number of 16-byte words");
  constexpr int kWords = static_cast<int>(V * sizeof(T) / 16);
  constexpr int kPer32 = static_cast<int>(4 / sizeof(T));  // elements per 32-bit lane
#pragma unroll
  for (int w = 0; w < kWords; ++w) {
    const uint4 raw = reinterpret_cast<const uint4*>(p)[w];
    const uint32_t lanes[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int l = 0; l < 4; ++l) {
#pragma unroll
      for (int e = 0; e < kPer32; ++e) {
        out[(w * 4 + l) * kPer32 + e] = float_of_bits<T>(kPer32 == 1 ? lanes[l] : (lanes[l] >> (16 * e)) & 0xffffu);
      }
    }
  }
}

// p[i] = in[i] rounded to T, for i < V; the same alignment rules as load_vec.
template <int V, class T>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&in)[V]) {
  static_assert((V * sizeof(T)) % 16 == 0, "a vector is a whole number of 16-byte words");
  constexpr int kWords = static_cast<int>(V * sizeof(T) / 16);
  constexpr int kPer32 = static_cast<int>(4 / sizeof(T));
#pragma unroll
  for (int w = 0; w < kWords; ++w) {
    uint32_t lanes[4];
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      lanes[l] = 0;
#pragma unroll
      for (int e = 0; e < kPer32; ++e) lanes[l] |= bits_of(from_float<T>(in[(w * 4 + l) * kPer32 + e])) << (16 * e);
    }
    // One st.global.v4 (a plain uint4 store of float bits gets split into 32-bit stores by the
    // compiler in some kernels).
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(reinterpret_cast<uint4*>(p) + w), "r"(lanes[0]),
                 "r"(lanes[1]), "r"(lanes[2]), "r"(lanes[3])
                 : "memory");
  }
}

// Asynchronous 16-byte copies global -> shared (cp.async.cg, sm_80+; LDGSTS.128 in SASS) for the
// GEMM operands of conv and attention. full = false writes 16 zero bytes and reads nothing (gmem
// must still be a valid address). A thread's copies become visible to itself after
// cp_async_wait<n>() (at most n of its most recent groups still pending) and to the block after a
// __syncthreads() that follows it.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool full) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = full ? 16 : 0;  // 0: no global read, 16 zero bytes written
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Host side: every non-null pointer is 16-byte aligned.
inline bool aligned(std::initializer_list<std::uintptr_t> ptrs) {
  for (std::uintptr_t p : ptrs) {
    if (p % 16 != 0) return false;
  }
  return true;
}

// Host side: every value is a multiple of v.
inline bool multiple(std::initializer_list<int64_t> values, int64_t v) {
  for (int64_t x : values) {
    if (x % v != 0) return false;
  }
  return true;
}

}  // namespace fastnets
