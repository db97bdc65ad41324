// Probe: how fast 132 CTAs stream random 72 KiB pages with the decode kernel's TMA pattern (9 boxes
// of 64 tokens x 64 channels, 128-byte swizzle) and no compute, by L2 promotion, K stages in
// flight and L2 eviction hint. The volume is P1's (8192 pages, 604 MB). It answers whether the
// access pattern, rather than the kernel's compute, keeps the decode below the copy bandwidth.
//
//   nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a -o /tmp/tma_stream benchmarks/probes/tma_stream.cu
//   /tmp/tma_stream
//
// H100, 2026-11-25: 2925-2981 GB/s in every configuration, one stage in flight included
// (benchmarks/NOTES.md, fourth session).
#include <cuda.h>
#include <cuda_runtime.h>
#include <cstdio>
#include <vector>
#include <random>
#include <algorithm>

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

int main() {
  EncodeFn encode = nullptr;
  cudaDriverEntryPointQueryResult q;
  cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", (void**)&encode, cudaEnableDefault, &q);
  const int num_pages = 8192 * 2, ctas = 132, per_cta = 8192 / ctas;  // 604 MB read per run, pool 1.2 GB
  void* kv; cudaMalloc(&kv, size_t(num_pages) * kBlockBytes); cudaMemset(kv, 1, size_t(num_pages) * kBlockBytes);
  std::vector<int> perm(num_pages); for (int i = 0; i < num_pages; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), std::mt19937(7));
  int *dpages, *sink; cudaMalloc(&dpages, num_pages * 4); cudaMalloc(&sink, 4);
  cudaMemcpy(dpages, perm.data(), num_pages * 4, cudaMemcpyHostToDevice);
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  const CUtensorMapL2promotion promos[] = {CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B};
  const char* names[] = {"none", "128B", "256B"};
  cudaFuncSetAttribute(stream, cudaFuncAttributeMaxDynamicSharedMemorySize, 3 * kBlockBytes);
  // warm the clocks
  for (int w = 0; w < 3; ++w) cudaMemcpy((char*)kv + 0, (char*)kv + size_t(num_pages / 2) * kBlockBytes, size_t(num_pages / 2) * kBlockBytes, cudaMemcpyDeviceToDevice);
  for (int pi = 0; pi < 3; ++pi) {
    CUtensorMap map;
    cuuint64_t dims[3] = {kCh, kTok, (cuuint64_t)num_pages};
    cuuint64_t strides[2] = {kCh * 2, (cuuint64_t)kBlockBytes};
    cuuint32_t box[3] = {kBoxCh, kTok, 1}, estr[3] = {1, 1, 1};
    CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, kv, dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                        CU_TENSOR_MAP_SWIZZLE_128B, promos[pi], CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) { printf("encode failed %d\n", r); return 1; }
    for (int stages = 1; stages <= 3; ++stages) for (int ef = 0; ef < 2; ++ef) {
      float best = 1e9, tot = 0; const int reps = 8;
      for (int rep = 0; rep < reps + 1; ++rep) {
        cudaEventRecord(a);
        stream<<<ctas, 128, stages * kBlockBytes>>>(map, dpages + (rep % 2) * 8192, per_cta, stages, ef, sink);
        cudaEventRecord(b); cudaEventSynchronize(b);
        float ms; cudaEventElapsedTime(&ms, a, b); if (rep) { best = std::min(best, ms); tot += ms; }
      }
      const double bytes = double(ctas) * per_cta * kBlockBytes;
      printf("promo %-4s stages %d evict_%s: median-ish %.1f us, %.0f GB/s (best %.0f)  %s\n", names[pi], stages, ef ? "first " : "normal",
             tot / reps * 1e3, bytes / (tot / reps * 1e-3) / 1e9, bytes / (best * 1e-3) / 1e9, cudaGetErrorString(cudaGetLastError()));
    }
  }
  return 0;
}
