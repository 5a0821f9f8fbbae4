// Flash attention (CUDA C++): host launchers, bound in csrc/attention_bind.cpp and called by
// fastnets/ops/attention.py, which checks every argument first.
//
// sizes = [B, H, L, S, E, EV, GROUP]: batch, query heads, query and key lengths, head dims of
// query/key and of value, query heads per key/value head (key and value have H / GROUP heads).
// Tensors are seen as [B, heads, rows, cols] with 4 strides each, in elements (a stride may be 0
// where a tensor is broadcast, as masks are). lse and delta are float32 [B * H, L], contiguous.
// mask_kind: 0 none, 1 bool (uint8, nonzero = takes part), 2 additive float32, 3 additive in the
// inputs' dtype. rng: device pointer to the int64 Philox seed, or 0 for no dropout.
#pragma once
#include <cstdint>

#include "common.h"

namespace fastnets {

// out = softmax(q k^T * scale + mask) v (dropout on the probabilities); lse = the rows' log-sum-exp
// (natural log; +inf for a fully masked row, whose output is 0).
void attention_fwd(const Shape& sizes, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t mask,
                   int mask_kind, std::uintptr_t rng, std::uintptr_t out, std::uintptr_t lse, const Shape& sq,
                   const Shape& sk, const Shape& sv, const Shape& sm, const Shape& so, double scale, double p_drop,
                   double drop_scale, bool causal, int dtype, std::uintptr_t stream);

// dq, dk, dv (dk and dv summed over each group of query heads); ds (float32 [B, H, L, S],
// contiguous, zero-filled) receives the scores' gradient when nonzero. delta: float32 scratch.
void attention_bwd(const Shape& sizes, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t mask,
                   int mask_kind, std::uintptr_t rng, std::uintptr_t out, std::uintptr_t dout, std::uintptr_t lse,
                   std::uintptr_t delta, std::uintptr_t dq, std::uintptr_t dk, std::uintptr_t dv, std::uintptr_t ds,
                   const Shape& sq, const Shape& sk, const Shape& sv, const Shape& sm, const Shape& so,
                   const Shape& sdo, const Shape& sdq, const Shape& sdk, const Shape& sdv, double scale,
                   double p_drop, double drop_scale, bool causal, int dtype, std::uintptr_t stream);

// The dropout keep mask (uint8 [BH, L, S], contiguous, 1 = kept) for the seed at `rng`: the RNG alone.
void attention_dropout_mask(std::uintptr_t rng, std::uintptr_t keep, int64_t BH, int64_t L, int64_t S, double p_drop,
                            std::uintptr_t stream);

}  // namespace fastnets
