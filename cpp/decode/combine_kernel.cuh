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

// Grid (batch, h_kv, ceil(rows / kCombineRowsPerCta)); one warp per packed row.
template <typename T>
__global__ void __launch_bounds__(kCombineThreads)
    mla_combine_kernel(__grid_constant__ const DecodeParams p) {
  // Launched as a programmatic dependent of the attention kernel: wait until its writes (the
  // accumulators) are complete and visible. Nothing before this line may read them.
  asm volatile("griddepcontrol.wait;" ::: "memory");

  constexpr int kVecs = kHeadDimV / (32 * 4);  // float4 per lane per row
  const int req = blockIdx.x;
  const int kv_head = blockIdx.y;
  const int first = p.num_splits[req];
  const int pieces = p.num_splits[req + 1] - first;
  if (pieces <= 1) return;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  for (int r = warp; r < kCombineRowsPerCta; r += kCombineWarps) {
    const int row = blockIdx.z * kCombineRowsPerCta + r;
    if (row >= p.rows) break;
    auto accum_row = [&](int k) { return (int64_t(first + k) * p.h_kv + kv_head) * p.rows + row; };

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

    float4 acc[kVecs];
    float lse;
    if (nan || m == -INFINITY) {
      // NaN: invalid length or page id. -inf everywhere: no visible key, out 0 and lse +inf.
      const float fill = nan ? __int_as_float(0x7fc00000) : 0.f;
      for (int j = 0; j < kVecs; ++j) acc[j] = make_float4(fill, fill, fill, fill);
      lse = nan ? fill : INFINITY;
    } else {
      float sum = 0.f;
      for (int k = lane; k < pieces; k += 32) sum += exp2f(p.lse_accum[accum_row(k)] - m);
      const float lse2 = m + log2f(warp_sum(sum));
      for (int j = 0; j < kVecs; ++j) acc[j] = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int k = 0; k < pieces; ++k) {
        const float w = exp2f(p.lse_accum[accum_row(k)] - lse2);
        const float4* src = reinterpret_cast<const float4*>(p.out_accum + accum_row(k) * kHeadDimV);
        for (int j = 0; j < kVecs; ++j) {
          const float4 v = src[lane + 32 * j];
          acc[j].x += w * v.x;
          acc[j].y += w * v.y;
          acc[j].z += w * v.z;
          acc[j].w += w * v.w;
        }
      }
      lse = lse2 * kLn2;
    }

    const PackedRow pr = unpack_row(p, kv_head, row);
    T* out = static_cast<T*>(p.out) + ((int64_t(req) * p.s_q + pr.token) * p.h_q + pr.head) * kHeadDimV;
    using Pair2 = typename Pair<T>::type;
    for (int j = 0; j < kVecs; ++j) {
      Pair2* dst = reinterpret_cast<Pair2*>(out + (lane + 32 * j) * 4);
      dst[0] = Pair<T>::make(acc[j].x, acc[j].y);
      dst[1] = Pair<T>::make(acc[j].z, acc[j].w);
    }
    if (lane == 0) p.lse[(int64_t(req) * p.h_q + pr.head) * p.s_q + pr.token] = lse;
  }
}

}  // namespace jax_flashmla::decode
