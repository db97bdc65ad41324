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

namespace jax_flashmla::decode {

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
  return x;
}

// Grid (batch, h_kv, min(rows * ctas_per_row, 65535)). Narrow (`wide` false): one CTA
// per packed row, warp w owns channels [w, w + 1) * kCombineChannelsPerWarp and walks every
// piece. Wide: kCombineWarps CTAs per row, one per channel slice, whose warps take every
// kCombineWarps-th piece and add their sums in shared memory: a request of many pieces (one
// long request over every SM) has few rows, and one warp walking all of a row's pieces keeps
// too few loads in flight.
template <typename T>
__global__ void __launch_bounds__(kCombineThreads, kCombineMinCtasPerSm)
    mla_combine_kernel(__grid_constant__ const DecodeParams p, bool wide) {
  // num_splits comes from the metadata kernel, complete before the attention kernel started:
  // the CTAs of unsplit requests leave without waiting, on SMs the attention kernel has freed.
  const int req = blockIdx.x;
  const int kv_head = blockIdx.y;
  const int first = p.num_splits[req];
  const int pieces = p.num_splits[req + 1] - first;
  if (pieces <= 1) return;
  // Launched as a programmatic dependent of the attention kernel: wait until its writes (the
  // accumulators) are complete and visible. Nothing before this line may read them.
  asm volatile("griddepcontrol.wait;" ::: "memory");
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int ctas_per_row = wide ? kCombineWarps : 1;
  const int piece_step = wide ? kCombineWarps : 1;  // this warp's pieces: warp_first + i * piece_step
  const int warp_first = wide ? warp : 0;
  __shared__ float4 partial[kCombineWarps][32];  // wide: each warp's sum over its pieces
  // Rows beyond the grid's z limit (65535) wrap around: a CTA may merge several rows.
  for (int item = blockIdx.z; item < p.rows * ctas_per_row; item += gridDim.z) {
  const int row = item / ctas_per_row;
  const int channel = (wide ? item % ctas_per_row : warp) * kCombineChannelsPerWarp + lane * 4;
  auto accum_row = [&](int k) { return (int64_t(first + k) * p.h_kv + kv_head) * p.rows + row; };

  // Every warp of the row reduces the same LSEs (a few hundred bytes): cheaper than a barrier.
  float m = -INFINITY;
  bool nan = false;
  for (int k = lane; k < pieces; k += 32) {
    const float v = p.lse_accum[accum_row(k)];
    nan |= isnan(v);
    m = fmaxf(m, v);
  }
  m = warp_max(m);
  // fmaxf drops NaN, so a piece that hit invalid data is tracked separately and wins.
  nan = __any_sync(0xffffffff, nan);

  float4 acc;
  float lse;
  if (nan || m == -INFINITY) {
    // NaN: invalid length or page id. -inf everywhere: no visible key, out 0 and lse +inf.
    const float fill = nan ? __int_as_float(0x7fc00000) : 0.f;
    acc = make_float4(fill, fill, fill, fill);
    lse = nan ? fill : INFINITY;
  } else {
    float sum = 0.f;
    for (int k = lane; k < pieces; k += 32) sum += exp2f(p.lse_accum[accum_row(k)] - m);
    const float lse2 = m + log2f(warp_sum(sum));
    acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int k0 = warp_first; k0 < pieces; k0 += kCombinePieceUnroll * piece_step) {
      float w[kCombinePieceUnroll];
      float4 v[kCombinePieceUnroll];
#pragma unroll
      for (int u = 0; u < kCombinePieceUnroll; ++u) {
        // Past the last piece: reload the last one with weight 0 (a valid address, and no
        // branch to keep the compiler from issuing the group's loads together).
        const int k_u = k0 + u * piece_step;
        const int k = min(k_u, pieces - 1);
        v[u] = __ldg(reinterpret_cast<const float4*>(p.out_accum + accum_row(k) * kHeadDimV + channel));
        w[u] = k_u < pieces ? exp2f(__ldg(p.lse_accum + accum_row(k)) - lse2) : 0.f;
      }
      // In piece order within the warp (the wide sum then adds the warps in order): the
      // rounding does not depend on the load grouping.
#pragma unroll
      for (int u = 0; u < kCombinePieceUnroll; ++u) {
        acc.x += w[u] * v[u].x;
        acc.y += w[u] * v[u].y;
        acc.z += w[u] * v[u].z;
        acc.w += w[u] * v[u].w;
      }
    }
    lse = lse2 * kLn2;
  }

  bool writer = true;
  if (wide) {
    partial[warp][lane] = acc;
    __syncthreads();
    writer = warp == 0;
    if (writer) {
      for (int w = 1; w < kCombineWarps; ++w) {
        const float4 o = partial[w][lane];
        acc.x += o.x;
        acc.y += o.y;
        acc.z += o.z;
        acc.w += o.w;
      }
    }
    __syncthreads();  // the next row's partial sums overwrite these
  }
  if (writer) {
    const PackedRow pr = unpack_row(p, kv_head, row);
    T* out = static_cast<T*>(p.out) + ((int64_t(req) * p.s_q + pr.token) * p.h_q + pr.head) * kHeadDimV + channel;
    using Pair2 = typename Pair<T>::type;
    Pair2* dst = reinterpret_cast<Pair2*>(out);
    dst[0] = Pair<T>::make(acc.x, acc.y);
    dst[1] = Pair<T>::make(acc.z, acc.w);
    if (threadIdx.x == 0 && item % ctas_per_row == 0) p.lse[(int64_t(req) * p.h_q + pr.head) * p.s_q + pr.token] = lse;
  }
  }
}

}  // namespace jax_flashmla::decode
