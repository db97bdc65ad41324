// Combine: the LSE-weighted merge of the pieces of every split request. Unsplit requests were
// finished by the attention kernel and are skipped.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cutlass/numeric_types.h>

#include "config.h"
#include "decode/decode_params.h"
#include "decode/epilogue.cuh"
#include "decode/mainloop.cuh"
#include "scheduler/mla_metadata.h"

namespace jax_flashmla::decode {

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
  return x;
}

// Drops the 128-byte L2 line at `line` without writing it back to DRAM (its contents become
// undefined). The combine is the last reader of each partial output: without this, every dirty
// line of fp32 partials that the attention kernel wrote is written back to DRAM when the next
// layer's cache stream evicts it (measured in the step with `kernel_times.py --traffic`: the
// next attention kernel's DRAM writes fell from 29.5 to 17.4 MB a layer on P3, 14.7 to 4.9 on P2).
// Issued only after the warp's last load is consumed: in the loop, the discards (ordered by their
// "memory" clobber) stalled every piece's loads (P3 +1.4%, benchmarks/NOTES.md attempt 57).
__device__ __forceinline__ void discard_l2_line(const void* line) {
  asm volatile("discard.global.L2 [%0], 128;" ::"l"(line) : "memory");
}

// Which request blockIdx.x merges. By request: x is the request. By partition (the launcher's
// choice when there are fewer partitions than requests): x is a partition, and it merges the
// split request whose first piece it holds. That request is the partition's last one (it goes on
// into the next partition), and its piece there is its first when the partition began before it
// or at its first block; so every split request has exactly one such partition, and the grid
// needs num_parts - 1 columns (the last partition continues nowhere) instead of batch. Returns -1
// when x merges nothing.
__device__ __forceinline__ int combine_request(const DecodeParams& p, bool by_partition) {
  if (!by_partition) return blockIdx.x;
  const int* meta = p.metadata + int64_t(blockIdx.x) * kMetadataCols;
  const int first_req = meta[kFirstReq];
  const int last_req = meta[kLastReq];  // first_req - 1 in an empty partition
  if (last_req < first_req || (last_req == first_req && meta[kFirstSplit] != 0)) return -1;
  return last_req;
}

// Work items of one (request, KV head): narrow, kCombineWarps rows each; wide, one channel slice
// of one row each. The launcher sizes the grid's z by it, the kernel walks it. Fits an int: 2^29
// rows of one request would be a q of over 600 GB.
__host__ __device__ __forceinline__ int combine_items(int rows, bool wide) {
  return wide ? rows * kCombineWarps : (rows + kCombineWarps - 1) / kCombineWarps;
}

// Grid (requests or partitions (combine_request), h_kv, min(items, 65535)), kCombineThreads
// threads. Narrow: an item is kCombineWarps consecutive packed rows, one per warp, each lane
// kCombineVecsPerLane float4 of the row (channels lane * 4 + v * 128). Wide: an item is one
// kCombineChannelsPerWarp slice of one row; warp w takes pieces w, w + kCombineWarps, ... and
// the warps add their sums in shared memory.
template <typename T, bool kWide>
__global__ void __launch_bounds__(kCombineThreads, kWide ? kCombineMinCtasPerSm : kCombineNarrowMinCtasPerSm)
    mla_combine_kernel(__grid_constant__ const DecodeParams p, bool by_partition) {
  constexpr bool wide = kWide;
  constexpr int kLoadsPerGroup = kWide ? kCombineLoadsPerGroup : kCombineNarrowLoadsPerGroup;
  // The next layer's attention kernel (a programmatic dependent of this one) may launch once
  // every CTA of this grid has started: it waits for this grid to complete before it touches
  // memory, and meanwhile takes SMs as they empty.
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  // This grid completes only after the attention grid has: CTA (0, 0, 0) always waits for it.
  // That is what the next attention kernel's wait relies on (it waits for this grid alone).
  const bool anchor = blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0;
  // The metadata and num_splits come from the metadata kernel, complete before the attention
  // kernel passed its own wait (and only then triggered this launch): CTAs with nothing to merge
  // leave without waiting, on SMs the attention kernel has freed.
  const int req = combine_request(p, by_partition);
  const int first = req < 0 ? 0 : p.num_splits[req];
  const int pieces = req < 0 ? 0 : p.num_splits[req + 1] - first;
  if (pieces <= 1 && !anchor) return;
  // Launched as a programmatic dependent of the attention kernel: wait until its writes (the
  // accumulators) are complete and visible. Nothing before this line may read them.
  asm volatile("griddepcontrol.wait;" ::: "memory");
  if (pieces <= 1) return;
  const int kv_head = blockIdx.y;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  constexpr int kVecStride = 32 * 4;  // channels between a lane's narrow vectors
  // Per load group: pieces, and the pieces between two of this warp's pieces.
  const int group_pieces = wide ? kLoadsPerGroup : kLoadsPerGroup / kCombineVecsPerLane;
  const int piece_step = wide ? kCombineWarps : 1;
  const int warp_first = wide ? warp : 0;
  __shared__ float4 partial[kCombineWarps][32];  // wide: each warp's sum over its pieces
  const int items = combine_items(p.rows, wide);
  // A partial row is kHeadDimV floats (16 lines), so its lines are whole L2 lines exactly when
  // the buffer starts on one; otherwise nothing is discarded.
  static_assert(kHeadDimV * sizeof(float) % kL2LineBytes == 0, "partial rows are whole L2 lines");
  const bool discard = reinterpret_cast<uintptr_t>(p.out_accum) % kL2LineBytes == 0;
  // Lanes whose float4 starts an L2 line (8 lanes' vectors make one line).
  constexpr int kLanesPerLine = kL2LineBytes / int(sizeof(float4));
  const bool line_lane = lane % kLanesPerLine == 0;
  // Items beyond the grid's z limit (65535) wrap around: a CTA may take several.
  for (int item = blockIdx.z; item < items; item += gridDim.z) {
    const int row = wide ? item / kCombineWarps : item * kCombineWarps + warp;
    if (row >= p.rows) continue;  // narrow only (no barrier there): the last item's spare warps
    const int channel = (wide ? item % kCombineWarps : 0) * kCombineChannelsPerWarp + lane * 4;
    auto piece_row = [&](int k) { return accum_row(p, first + k, kv_head, row); };

    // Every warp of a wide row reduces the same LSEs (a few hundred bytes): cheaper than a barrier.
    float m = -INFINITY;
    bool nan = false;
    for (int k = lane; k < pieces; k += 32) {
      const float v = p.lse_accum[piece_row(k)];
      nan |= isnan(v);
      m = fmaxf(m, v);
    }
    m = warp_max(m);
    // fmaxf drops NaN, so a piece that hit invalid data is tracked separately and wins.
    nan = __any_sync(0xffffffff, nan);

    // Narrow: acc[j] is the lane's vector j. Wide: all four are the lane's one vector, acc[j]
    // summing the pieces of load slots u with u % kCombineVecsPerLane == j; added up below.
    float4 acc[kCombineVecsPerLane];
    float lse;
    if (nan || m == -INFINITY) {
      // NaN: invalid length or page id. -inf everywhere: no visible key, out 0 and lse +inf.
      const float fill = nan ? __int_as_float(0x7fc00000) : 0.f;
      for (auto& a : acc) a = make_float4(fill, fill, fill, fill);
      lse = nan ? fill : INFINITY;
    } else {
      float sum = 0.f;
      for (int k = lane; k < pieces; k += 32) sum += exp2f(p.lse_accum[piece_row(k)] - m);
      const float lse2 = m + log2f(warp_sum(sum));
      for (auto& a : acc) a = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int k0 = warp_first; k0 < pieces; k0 += group_pieces * piece_step) {
        float w[kLoadsPerGroup];
        float4 v[kLoadsPerGroup];
#pragma unroll
        for (int u = 0; u < kLoadsPerGroup; ++u) {
          // Past the last piece: reload the group's first piece (a valid address, and no
          // branch to keep the compiler from issuing the group's loads together). It is this
          // warp's own and its lines are dropped only after all its groups, so no load here reads
          // a discarded line.
          const int k_u = k0 + (wide ? u : u / kCombineVecsPerLane) * piece_step;
          const int k = k_u < pieces ? k_u : k0;
          const int c = channel + (wide ? 0 : (u % kCombineVecsPerLane) * kVecStride);
          v[u] = __ldg(reinterpret_cast<const float4*>(p.out_accum + piece_row(k) * kHeadDimV + c));
          if (k_u >= pieces) v[u] = make_float4(0.f, 0.f, 0.f, 0.f);  // dropped, not weighted by 0
          w[u] = k_u < pieces ? exp2f(__ldg(p.lse_accum + piece_row(k)) - lse2) : 0.f;
        }
#pragma unroll
        for (int u = 0; u < kLoadsPerGroup; ++u) {
          float4& a = acc[u % kCombineVecsPerLane];
          a.x += w[u] * v[u].x;
          a.y += w[u] * v[u].y;
          a.z += w[u] * v[u].z;
          a.w += w[u] * v[u].w;
        }
      }
      // All of this warp's loads are consumed (the sums above): its partial lines are read for
      // good, each by this warp alone. Dropping them only now keeps the discards out of the
      // load chain of the pieces.
      __syncwarp();
      if (discard && line_lane) {
        for (int k = warp_first; k < pieces; k += piece_step) {
#pragma unroll
          for (int j = 0; j < (wide ? 1 : kCombineVecsPerLane); ++j)
            discard_l2_line(p.out_accum + piece_row(k) * kHeadDimV + channel + j * kVecStride);
        }
      }
      lse = lse2 * kLn2;
    }

    bool writer = true;
    if (wide) {
      float4 s = acc[0];
      for (int j = 1; j < kCombineVecsPerLane; ++j) {
        s.x += acc[j].x;
        s.y += acc[j].y;
        s.z += acc[j].z;
        s.w += acc[j].w;
      }
      partial[warp][lane] = s;
      __syncthreads();
      writer = warp == 0;
      if (writer) {
        for (int w = 1; w < kCombineWarps; ++w) {
          const float4 o = partial[w][lane];
          s.x += o.x;
          s.y += o.y;
          s.z += o.z;
          s.w += o.w;
        }
        acc[0] = s;
      }
      __syncthreads();  // the next item's partial sums overwrite these
    }
    if (writer) {
      const OutRow dst_row = out_row(p, req, kv_head, row);
      T* out = static_cast<T*>(p.out) + dst_row.out * kHeadDimV + channel;
      using Pair2 = typename Pair<T>::type;
      for (int j = 0; j < (wide ? 1 : kCombineVecsPerLane); ++j) {
        Pair2* dst = reinterpret_cast<Pair2*>(out + j * kVecStride);
        dst[0] = Pair<T>::make(acc[j].x, acc[j].y);
        dst[1] = Pair<T>::make(acc[j].z, acc[j].w);
      }
      if (lane == 0 && (!wide || (warp == 0 && item % kCombineWarps == 0)))
        p.lse[dst_row.lse] = lse;
    }
  }
}

}  // namespace jax_flashmla::decode
