// Online softmax in base 2 over the wgmma accumulator fragments of warpgroup 0, which holds all
// kBlockN logits of a block.
//
// Each thread holds two rows of the 64-row tile (the wgmma accumulator layout puts row r and
// r + 8 of a 16-row slab in one thread, a row's columns in the 4 threads of a quad). Warpgroup 1
// computes no logits: it rescales its half of O by the factors warpgroup 0 publishes with P.
#pragma once

#include <cute/tensor.hpp>

#include "decode/kernel_traits.cuh"

namespace jax_flashmla::decode {

inline constexpr int kRowsPerThread = 2;

// Which of the thread's two rows a tile row is: rows r and r + 8 of each 16-row slab.
__device__ __forceinline__ int row_slot(int row) { return (row >> 3) & 1; }

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

struct SoftmaxState {
  float m[kRowsPerThread];  // reference max of the base-2 logits (within kRescaleSlackLog2 of the
                            // running max); -inf until a key is visible
  float l[kRowsPerThread];  // this thread's share of the running row sum

  __device__ void reset() {
    for (int s = 0; s < kRowsPerThread; ++s) {
      m[s] = -INFINITY;
      l[s] = 0.f;
    }
  }
};

// Independent partial results per row in the row max and row sum: one running value would chain
// the 16 logits of a row through 16 dependent instructions (~4 cycles each).
inline constexpr int kReducePartials = 4;
// The fragment holds each row's values in pairs (i, i + 1), rows alternating every pair: the
// partial that element i feeds.
__device__ __forceinline__ constexpr int reduce_partial(int i) { return (i / 4) % kReducePartials; }
static_assert(kReducePartials == 4, "block_row_max and softmax_update combine exactly four partials");

// exp2 without the range fix-up of exp2f (which scales arguments below -126 to keep denormal
// results: three more instructions per logit): a P below 2^-126 of its row's reference is
// flushed to 0, far under the rounding of P to bf16/fp16. ex2(-inf) = +0, ex2(NaN) = NaN.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Replaces invisible raw logits by -inf (replacing, not adding a bias: a logit computed from a
// NaN cache slot must vanish). `key0` is the token of column 0; `limit[s]` is one past the last
// key visible to row slot s. Only blocks that reach a limit call it (a uniform branch outside):
// the per-logit compare and select are a quarter of the softmax's instructions.
// The compare must be signed: a causal row of a request shorter than s_q - 1 has a negative
// limit (it sees no key). CuTe's coordinates take the signedness of the thread index a slice is
// taken at; at an unsigned threadIdx.x they were unsigned, limit -1 became 2^32 - 1, and every
// logit of such a row stayed unmasked (NaN from the poisoned tail of the block; found by the
// decode harness's short-request case). Slices are taken at thread_in_warpgroup() (an int); the
// static_assert keeps it so.
template <typename FragS, typename CoordS>
__device__ void mask_invisible(FragS& s, const CoordS& cS, int key0, const int (&limit)[kRowsPerThread]) {
  static_assert(std::is_signed_v<std::decay_t<decltype(get<1>(cS(0)))>>,
                "take the thread slice at thread_in_warpgroup(): an unsigned key breaks negative limits");
  CUTE_UNROLL
  for (int i = 0; i < size(s); ++i) {
    const int key = key0 + get<1>(cS(i));
    if (key >= limit[row_slot(get<0>(cS(i)))]) s(i) = -INFINITY;
  }
}

// Row maxima of the block's raw logits, reduced over the quad, in base 2: [kRowsPerThread].
// softmax_scale > 0 (validated by the Python side and the FFI handler), so scaling after the max
// is exact.
template <typename FragS, typename CoordS>
__device__ void block_row_max(const FragS& s, const CoordS& cS, float scale_log2, float (&mx)[kRowsPerThread]) {
  float part[kRowsPerThread][kReducePartials];
  for (int r = 0; r < kRowsPerThread; ++r)
    for (int k = 0; k < kReducePartials; ++k) part[r][k] = -INFINITY;
  CUTE_UNROLL
  for (int i = 0; i < size(s); ++i) {
    const int r = row_slot(get<0>(cS(i)));
    part[r][reduce_partial(i)] = fmaxf(part[r][reduce_partial(i)], s(i));
  }
  for (int r = 0; r < kRowsPerThread; ++r) {
    mx[r] = fmaxf(fmaxf(part[r][0], part[r][1]), fmaxf(part[r][2], part[r][3]));
    mx[r] = quad_max(mx[r]) * scale_log2;
  }
}

// Given the block's base-2 row maxima, turns raw logits into P (in place, fp32; one FFMA and
// one ex2 per logit: p = 2^(s * scale_log2 - m)), updates the reference max and this thread's
// row sums, and returns the factor the output must be rescaled by. The reference max of a row
// moves only when a block's max exceeds it by more than kRescaleSlackLog2: until then P is
// exponentiated against the older max (so P < 2^slack, far inside the bf16/fp16 range) and
// alpha is exactly 1, which lets the caller skip rescaling O. The final division by the row sum
// cancels the common factor either way.
template <typename FragS, typename CoordS>
__device__ void softmax_update(FragS& s, const CoordS& cS, float scale_log2, SoftmaxState& st,
                               const float (&mx)[kRowsPerThread], float (&alpha)[kRowsPerThread]) {
  float neg_ref[kRowsPerThread];
  for (int r = 0; r < kRowsPerThread; ++r) {
    // True when the first visible key arrives (m = -inf); false for a NaN block max, which then
    // reaches O through P.
    const float m_blk = mx[r];
    if (m_blk > st.m[r] + kRescaleSlackLog2) {
      alpha[r] = exp2_ftz(st.m[r] - m_blk);
      st.m[r] = m_blk;
      st.l[r] *= alpha[r];
    } else {
      alpha[r] = 1.f;
    }
    // While a row has seen no visible key its max is -inf; exponentiate against 0 instead so
    // that exp2(-inf - -inf) = NaN never appears.
    neg_ref[r] = st.m[r] == -INFINITY ? 0.f : -st.m[r];
  }
  float part[kRowsPerThread][kReducePartials] = {};
  CUTE_UNROLL
  for (int i = 0; i < size(s); ++i) {
    const int r = row_slot(get<0>(cS(i)));
    const float p = exp2_ftz(fmaf(s(i), scale_log2, neg_ref[r]));
    part[r][reduce_partial(i)] += p;
    s(i) = p;
  }
  for (int r = 0; r < kRowsPerThread; ++r) st.l[r] += (part[r][0] + part[r][1]) + (part[r][2] + part[r][3]);
}

// Multiplies O by alpha, unless no thread of the warp has a factor other than 1 (the common case
// once the reference max has settled: 128 multiplies a thread saved).
template <typename FragO, typename CoordO>
__device__ void rescale_output(FragO& o, const CoordO& cO, const float (&alpha)[kRowsPerThread]) {
  if (!__any_sync(0xffffffff, alpha[0] != 1.f || alpha[1] != 1.f)) return;
  CUTE_UNROLL
  for (int i = 0; i < size(o); ++i) o(i) *= alpha[row_slot(get<0>(cO(i)))];
}

}  // namespace jax_flashmla::decode
