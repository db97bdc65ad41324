// End of a piece: normalise and write the final output + natural LSE (unsplit request), or the
// fp32 partial output + base-2 LSE into the accumulator slot (split request).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "decode/decode_params.h"
#include "decode/kernel_traits.cuh"
#include "decode/mainloop.cuh"
#include "decode/phase_clocks.cuh"
#include "decode/softmax.cuh"

namespace jax_flashmla::decode {

inline constexpr float kLn2 = 0.69314718055994530942f;

template <typename T>
struct Pair;
template <>
struct Pair<cutlass::bfloat16_t> {
  using type = __nv_bfloat162;
  static __device__ type make(float a, float b) { return __floats2bfloat162_rn(a, b); }
};
template <>
struct Pair<cutlass::half_t> {
  using type = __half2;
  static __device__ type make(float a, float b) { return __floats2half2_rn(a, b); }
};

// Where a piece's results go.
struct PieceTarget {
  int req;
  int kv_head;
  int row_block;
  bool split;  // the request has several pieces: write the accumulators, the combine finishes
  int slot;    // accumulator slot of this piece (used when split)
};

__device__ __forceinline__ int64_t accum_row(const DecodeParams& p, const PieceTarget& tg, int row) {
  return (int64_t(tg.slot) * p.h_kv + tg.kv_head) * p.rows + row;
}

// Where packed row `row` of an unsplit request goes: its row of `out` ([batch, s_q, h_q]
// flattened) and its index in `lse` ([batch, h_q, s_q]).
struct OutRow {
  int64_t out;
  int64_t lse;
};
__device__ __forceinline__ OutRow out_row(const DecodeParams& p, const PieceTarget& tg, int row) {
  const PackedRow pr = unpack_row(p, tg.kv_head, row);
  return {(int64_t(tg.req) * p.s_q + pr.token) * p.h_q + pr.head, (int64_t(tg.req) * p.h_q + pr.head) * p.s_q + pr.token};
}

// All threads. `o` holds this warpgroup's [kBlockM, kHalfDimV] unnormalised output; `rows` are
// the two tile rows this thread holds (the same in every 64-row wgmma accumulator).
template <typename T, typename FragO, typename CoordO>
__device__ void write_piece(const DecodeParams& p, SharedStorage<T>& smem, const FragO& o, const CoordO& cO,
                            const SoftmaxState& st, const int (&rows)[kRowsPerThread], int wg,
                            const PieceTarget& tg, PhaseClock& clk) {
  const int lane = threadIdx.x % 32;

  // Warpgroup 0 alone computed P, so its row sums are the rows' whole sums (warpgroup 1's st.l
  // stays 0); both warpgroups normalise by them.
  if (wg == 0) {
    for (int r = 0; r < kRowsPerThread; ++r) {
      const float l = quad_sum(st.l[r]);
      if (lane % 4 == 0) smem.row_sum[rows[r]] = l;
    }
  }
  cutlass::arch::NamedBarrier::arrive_and_wait(kConsumerThreads, kBarRowSum);
  clk.mark(kPhEpiBarrier);

  float inv_l[kRowsPerThread], lse2[kRowsPerThread];
  for (int r = 0; r < kRowsPerThread; ++r) {
    const float l = smem.row_sum[rows[r]];
    // Tested as == 0, not > 0: a NaN must reach the output, not pass for an empty row.
    const bool no_keys = l == 0.f;
    inv_l[r] = no_keys ? 0.f : 1.f / l;
    lse2[r] = no_keys ? -INFINITY : st.m[r] + log2f(l);
  }

  // Where each of the thread's two rows goes, computed once: per element this leaves an add
  // and a store. Per-element row arithmetic (an int64 product, or a division by heads_per_kv)
  // unrolled over the 64 stores made this the largest code of the kernel, fetched cold once per
  // piece.
  const int col0 = wg * kHalfDimV;
  bool valid[kRowsPerThread];
  int64_t acc[kRowsPerThread];
  OutRow dst[kRowsPerThread];
  float* acc_ptr[kRowsPerThread];
  T* out_ptr[kRowsPerThread];
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int row = tg.row_block * kBlockM + rows[r];
    valid[r] = row < p.rows;
    const int safe_row = valid[r] ? row : 0;
    acc[r] = accum_row(p, tg, safe_row);
    dst[r] = out_row(p, tg, safe_row);
    acc_ptr[r] = p.out_accum + acc[r] * kHeadDimV + col0;
    out_ptr[r] = static_cast<T*>(p.out) + dst[r].out * kHeadDimV + col0;
  }
  // Consecutive fragment elements (i, i + 1) are adjacent columns of one row.
  if (tg.split) {
    CUTE_UNROLL
    for (int i = 0; i < size(o); i += 2) {
      const int r = row_slot(get<0>(cO(i)));
      if (!valid[r]) continue;
      *reinterpret_cast<float2*>(acc_ptr[r] + get<1>(cO(i))) = make_float2(o(i) * inv_l[r], o(i + 1) * inv_l[r]);
    }
  } else {
    CUTE_UNROLL
    for (int i = 0; i < size(o); i += 2) {
      const int r = row_slot(get<0>(cO(i)));
      if (!valid[r]) continue;
      *reinterpret_cast<typename Pair<T>::type*>(out_ptr[r] + get<1>(cO(i))) =
          Pair<T>::make(o(i) * inv_l[r], o(i + 1) * inv_l[r]);
    }
  }
  if (wg == 0 && lane % 4 == 0) {
    for (int r = 0; r < kRowsPerThread; ++r) {
      if (!valid[r]) continue;
      if (tg.split) {
        p.lse_accum[acc[r]] = lse2[r];
      } else {
        // A row with no visible key has lse = log(0) of the empty sum, reported as +inf.
        p.lse[dst[r].lse] = lse2[r] == -INFINITY ? INFINITY : lse2[r] * kLn2;
      }
    }
  }
}

// A piece whose request has an invalid length or page id: NaN everywhere it writes, so the
// error reaches the caller (and survives the combine) instead of a read out of bounds. All
// consumer threads.
template <typename T>
__device__ void write_nan_piece(const DecodeParams& p, const PieceTarget& tg) {
  const float nan = __int_as_float(0x7fc00000);
  for (int idx = threadIdx.x; idx < kBlockM * kHeadDimV; idx += kConsumerThreads) {
    const int row = tg.row_block * kBlockM + idx / kHeadDimV;
    const int col = idx % kHeadDimV;
    if (row >= p.rows) continue;
    if (tg.split) {
      p.out_accum[accum_row(p, tg, row) * kHeadDimV + col] = nan;
      if (col == 0) p.lse_accum[accum_row(p, tg, row)] = nan;
    } else {
      const OutRow dst = out_row(p, tg, row);
      static_cast<T*>(p.out)[dst.out * kHeadDimV + col] = T(nan);
      if (col == 0) p.lse[dst.lse] = nan;
    }
  }
}

}  // namespace jax_flashmla::decode
