// Shared by the TMA streaming probes (tma_stream.cu, l2_delivery.cu): the decode kernel's K block
// geometry, raw mbarrier/TMA helpers, a kernel in which 132 CTAs stream pages into shared memory
// with no compute, and the tensor map of a paged bf16 K cache.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>
#include <cstdio>

constexpr int kTok = 64, kCh = 576, kBoxCh = 64, kTiles = 9;
constexpr int kBlockBytes = kTok * kCh * 2;

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"((unsigned)__cvta_generic_to_shared(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect(uint64_t* bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"((unsigned)__cvta_generic_to_shared(bar)), "r"(bytes));
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, int phase) {
  asm volatile("{\n .reg .pred p;\n W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra W;\n}\n"
               :: "r"((unsigned)__cvta_generic_to_shared(bar)), "r"(phase));
}
__device__ __forceinline__ void tma_box(const CUtensorMap* map, void* dst, uint64_t* bar, int c0, int c1, int c2, uint64_t policy) {
  asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, {%2, %3, %4}], [%5], %6;"
               :: "r"((unsigned)__cvta_generic_to_shared(dst)), "l"(map), "r"(c0), "r"(c1), "r"(c2),
                  "r"((unsigned)__cvta_generic_to_shared(bar)), "l"(policy) : "memory");
}

__global__ void stream(const __grid_constant__ CUtensorMap map, const int* pages, int per_cta, int stages, int evict_first, int* sink) {
  extern __shared__ __align__(1024) char smem[];
  __shared__ uint64_t bars[4];
  uint64_t policy;
  if (evict_first) asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  else asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(policy));
  if (threadIdx.x == 0) { for (int s = 0; s < stages; ++s) mbar_init(&bars[s], 1); asm volatile("fence.mbarrier_init.release.cluster;"); }
  __syncthreads();
  const int* my = pages + blockIdx.x * per_cta;
  auto issue = [&](int i) {
    const int s = i % stages;
    mbar_expect(&bars[s], kBlockBytes);
    for (int t = 0; t < kTiles; ++t) tma_box(&map, smem + s * kBlockBytes + t * kTok * kBoxCh * 2, &bars[s], t * kBoxCh, 0, my[i], policy);
  };
  if (threadIdx.x == 0) for (int i = 0; i < stages && i < per_cta; ++i) issue(i);
  int acc = 0;
  for (int i = 0; i < per_cta; ++i) {
    mbar_wait(&bars[i % stages], (i / stages) & 1);
    acc += smem[(i % stages) * kBlockBytes + threadIdx.x * 4];
    __syncthreads();
    if (threadIdx.x == 0 && i + stages < per_cta) issue(i + stages);
  }
  if (acc == 12345) *sink = acc;
}

typedef CUresult (*EncodeFn)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*, const cuuint64_t*,
                             const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                             CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The driver's cuTensorMapEncodeTiled (no -lcuda needed), or nullptr.
inline EncodeFn load_encoder() {
  EncodeFn encode = nullptr;
  cudaDriverEntryPointQueryResult q;
  cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", (void**)&encode, cudaEnableDefault, &q);
  return encode;
}

// The K cache [num_pages, kTok, kCh] bf16 as the decode kernel's TMA boxes ([kTok tokens, kBoxCh
// channels], 128-byte swizzle) see it.
inline CUresult encode_k_map(EncodeFn encode, CUtensorMap* map, void* kv, int num_pages, CUtensorMapL2promotion promo) {
  cuuint64_t dims[3] = {kCh, kTok, (cuuint64_t)num_pages};
  cuuint64_t strides[2] = {kCh * 2, (cuuint64_t)kBlockBytes};
  cuuint32_t box[3] = {kBoxCh, kTok, 1}, estr[3] = {1, 1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, kv, dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, promo, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
}
