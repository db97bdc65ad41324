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
struct Pair<float> {
  using type = float2;
  static __device__ type make(float a, float b) { return make_float2(a, b); }
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

// Row of packed row `row` (KV head `kv_head`) in accumulator slot `slot`: out_accum and
// lse_accum are [b + num_parts, h_kv, rows(, kHeadDimV)]. The epilogue writes it, the combine
// reads it.
__device__ __forceinline__ int64_t accum_row(const DecodeParams& p, int slot, int kv_head, int row) {
  return (int64_t(slot) * p.h_kv + kv_head) * p.rows + row;
}
__device__ __forceinline__ int64_t accum_row(const DecodeParams& p, const PieceTarget& tg, int row) {
  return accum_row(p, tg.slot, tg.kv_head, row);
}

// Where packed row `row` of request `req` (KV head `kv_head`) ends up: its row of `out`
// ([batch, s_q, h_q] flattened) and its index in `lse` ([batch, h_q, s_q]). Written by the
// epilogue for unsplit requests, by the combine for split ones.
struct OutRow {
  int64_t out;
  int64_t lse;
};
__device__ __forceinline__ OutRow out_row(const DecodeParams& p, int req, int kv_head, int row) {
  const PackedRow pr = unpack_row(p, kv_head, row);
  return {(int64_t(req) * p.s_q + pr.token) * p.h_q + pr.head, (int64_t(req) * p.h_q + pr.head) * p.s_q + pr.token};
}
__device__ __forceinline__ OutRow out_row(const DecodeParams& p, const PieceTarget& tg, int row) {
  return out_row(p, tg.req, tg.kv_head, row);
}

// A 16-byte global store to an address that came through a shuffle (the compiler cannot tell
// its state space, and would emit a generic store).
__device__ __forceinline__ void store_global_16(uintptr_t addr, const uint4& v) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// Writes this warp's [kEpiRowsPerWarp, kHalfDimV] slab of normalised output as `Out` (fp32
// partials or the final dtype): in passes of kEpiRowBytes per row, the fragments go to the
// warp's staging slice (a 16-byte chunk c of row r sits at chunk c ^ (r % 8), so the 8 rows of
// a fragment store fall on different banks), then each row leaves as one 512-byte store of the
// whole warp. `row_dst` (lanes < kEpiRowsPerWarp) is where each row's first column goes.
template <typename Out, typename FragO, typename CoordO>
__device__ __forceinline__ void store_rows_staged(const FragO& o, const CoordO& cO, const float (&inv_l)[kRowsPerThread],
                                                  int slab_row0, char* stage_buf, char* row_dst,
                                                  uint32_t valid_rows) {
  constexpr int kElemsPerPass = kEpiRowBytes / int(sizeof(Out));
  constexpr int kPasses = kHalfDimV / kElemsPerPass;
  constexpr int kFragPerPass = int(size(FragO{})) / kPasses;
  static_assert(kPasses * kElemsPerPass == kHalfDimV, "whole passes");
  using Pair2 = typename Pair<Out>::type;
  const int lane = threadIdx.x % 32;
  CUTE_UNROLL
  for (int pass = 0; pass < kPasses; ++pass) {
    // Fragment element i covers columns 8 * (i / 4) + 2 * (lane % 4) + (i % 2) (the SM90
    // accumulator layout), so pass `pass` holds elements [pass, pass + 1) * kFragPerPass.
    CUTE_UNROLL
    for (int i = pass * kFragPerPass; i < (pass + 1) * kFragPerPass; i += 2) {
      const int r = get<0>(cO(i)) - slab_row0;  // 0 .. kEpiRowsPerWarp - 1
      const int byte = (get<1>(cO(i)) - pass * kElemsPerPass) * int(sizeof(Out));
      const int chunk = (byte / kEpiChunkBytes) ^ (r % 8);
      const float s = inv_l[row_slot(get<0>(cO(i)))];
      *reinterpret_cast<Pair2*>(stage_buf + r * kEpiRowBytes + chunk * kEpiChunkBytes + byte % kEpiChunkBytes) =
          Pair<Out>::make(o(i) * s, o(i + 1) * s);
    }
    __syncwarp();
    // Groups of rows: the group's shared-memory reads are in flight together.
    constexpr int kRowGroup = 4;
    CUTE_UNROLL
    for (int r0 = 0; r0 < kEpiRowsPerWarp; r0 += kRowGroup) {
      uint4 v[kRowGroup];
      uintptr_t dst[kRowGroup];
      CUTE_UNROLL
      for (int u = 0; u < kRowGroup; ++u) {
        const int r = r0 + u;
        dst[u] = __shfl_sync(0xffffffff, reinterpret_cast<uintptr_t>(row_dst), r);
        v[u] = *reinterpret_cast<const uint4*>(stage_buf + r * kEpiRowBytes + ((lane ^ (r % 8)) * kEpiChunkBytes));
      }
      CUTE_UNROLL
      for (int u = 0; u < kRowGroup; ++u) {
        if (valid_rows >> (r0 + u) & 1)
          store_global_16(dst[u] + pass * kEpiRowBytes + lane * kEpiChunkBytes, v[u]);
      }
    }
    // The next pass overwrites the slice: every lane's reads of this one come first.
    __syncwarp();
  }
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

  // Lane l < kEpiRowsPerWarp holds where row l of this warp's slab goes (bytes, at this
  // warpgroup's first column), computed once per piece: per-row index arithmetic (an int64
  // product, or a division by heads_per_kv) kept out of the unrolled stores keeps this code
  // small; it is fetched cold once per piece.
  const int warp_in_wg = (threadIdx.x % kWarpgroupThreads) / 32;
  const int slab_row0 = warp_in_wg * kEpiRowsPerWarp;  // first tile row of this warp
  const int col0 = wg * kHalfDimV;
  char* row_dst = nullptr;
  bool lane_row_valid = false;
  if (lane < kEpiRowsPerWarp) {
    const int row = tg.row_block * kBlockM + slab_row0 + lane;
    lane_row_valid = row < p.rows;
    const int safe_row = lane_row_valid ? row : 0;
    row_dst = tg.split ? reinterpret_cast<char*>(p.out_accum + accum_row(p, tg, safe_row) * kHeadDimV + col0)
                       : reinterpret_cast<char*>(static_cast<T*>(p.out) + out_row(p, tg, safe_row).out * kHeadDimV + col0);
  }
  const uint32_t valid_rows = __ballot_sync(0xffffffff, lane_row_valid);
  // The Q tile is free: warpgroup 0's last QK^T completed before the row-sum barrier, and
  // warpgroup 1 never reads Q. The next piece's Q load comes after the piece barrier.
  static_assert(kConsumerWarps * kEpiWarpBytes <= int(sizeof(smem.q)), "every warp's staging slice fits in Q");
  char* stage_buf = reinterpret_cast<char*>(smem.q) + (threadIdx.x / 32) * kEpiWarpBytes;
  clk.mark(kPhEpiSetup);
  const auto store_rows = [&] {
    if (tg.split) {
      store_rows_staged<float>(o, cO, inv_l, slab_row0, stage_buf, row_dst, valid_rows);
    } else {
      store_rows_staged<T>(o, cO, inv_l, slab_row0, stage_buf, row_dst, valid_rows);
    }
  };
  store_rows();
  clk.mark(kPhEpilogue);
#ifdef JAX_FLASHMLA_PROBE_EPI_TWICE
  // Probe only: the same stores again, now with their code and addresses warm. If this pass is
  // much cheaper than the first, the first paid for cold instructions, not for the bytes.
  store_rows();
  clk.mark(kPhEpiRepeat);
#endif

  if (wg == 0 && lane % 4 == 0) {
    for (int r = 0; r < kRowsPerThread; ++r) {
      const int row = tg.row_block * kBlockM + rows[r];
      if (row >= p.rows) continue;
      if (tg.split) {
        p.lse_accum[accum_row(p, tg, row)] = lse2[r];
      } else {
        // A row with no visible key has lse = log(0) of the empty sum, reported as +inf.
        p.lse[out_row(p, tg, row).lse] = lse2[r] == -INFINITY ? INFINITY : lse2[r] * kLn2;
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
