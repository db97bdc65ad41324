// Probe: how fast 132 CTAs can have K blocks delivered into shared memory by TMA (the decode
// kernel's 9 boxes of 64 tokens x 64 channels, 128-byte swizzle, no compute) when groups of CTAs
// read the same pages, as the row-block CTAs of one partition do (P4: 2 per group, P6: 4), or
// when every page is already in L2. It asks whether the compute-bound cells are held by the L2 ->
// SM delivery rather than by the kernel's block loop (benchmarks/NOTES.md, thirtieth session).
//
//   nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a -o /tmp/l2_delivery benchmarks/probes/l2_delivery.cu
//   /tmp/l2_delivery
//
// Reports, per case, the bytes delivered into shared memory (all CTAs) per second, and the DRAM
// bytes (distinct pages) per second.
//
// H100, 2026-12-07 (2 / 3 stages in flight; GB/s delivered): own pages 3283 / 3280 (HBM reads
// alone reach ~3.3 TB/s, above the read+write copy ceiling of ~3.0); pairs 6420 / 6368; groups of
// four 6696 / 7122; L2-resident pool 7363 / 7574. The decode kernel delivers ~4.8-5.1 TB/s on
// P4-P6, so the fabric is not its ceiling (benchmarks/NOTES.md, thirtieth session).
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
  const int num_pages = 16384, ctas = 132, per_cta = 496;  // P6: ~500 blocks per CTA
  void* kv; cudaMalloc(&kv, size_t(num_pages) * kBlockBytes); cudaMemset(kv, 1, size_t(num_pages) * kBlockBytes);
  int *dpages, *sink; cudaMalloc(&dpages, size_t(ctas) * per_cta * 4); cudaMalloc(&sink, 4);
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  CUtensorMap map;
  cuuint64_t dims[3] = {kCh, kTok, (cuuint64_t)num_pages};
  cuuint64_t strides[2] = {kCh * 2, (cuuint64_t)kBlockBytes};
  cuuint32_t box[3] = {kBoxCh, kTok, 1}, estr[3] = {1, 1, 1};
  if (encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, kv, dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
             CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS) {
    printf("encode failed\n");
    return 1;
  }
  cudaFuncSetAttribute(stream, cudaFuncAttributeMaxDynamicSharedMemorySize, 3 * kBlockBytes);
  for (int w = 0; w < 3; ++w) cudaMemcpy(kv, (char*)kv + size_t(num_pages / 2) * kBlockBytes, size_t(num_pages / 2) * kBlockBytes, cudaMemcpyDeviceToDevice);
  struct Case { const char* name; int group; int pool; };
  const Case cases[] = {{"every CTA its own pages (HBM)", 1, num_pages}, {"groups of 2 CTAs share pages (P4-like)", 2, num_pages},
                        {"groups of 4 CTAs share pages (P6-like)", 4, num_pages}, {"a 64-page pool (L2-resident)", 1, 64}};
  std::mt19937 rng(7);
  for (const Case& c : cases) {
    std::vector<int> pages(size_t(ctas) * per_cta);
    const int groups = ctas / c.group;
    for (int g = 0; g < groups; ++g)
      for (int i = 0; i < per_cta; ++i) {
        const int page = int(rng() % c.pool);
        for (int m = 0; m < c.group; ++m) pages[size_t(g * c.group + m) * per_cta + i] = page;
      }
    cudaMemcpy(dpages, pages.data(), pages.size() * 4, cudaMemcpyHostToDevice);
    for (int stages = 2; stages <= 3; ++stages) {
      float tot = 0; const int reps = 6;
      for (int rep = 0; rep < reps + 1; ++rep) {
        cudaEventRecord(a);
        stream<<<ctas, 128, stages * kBlockBytes>>>(map, dpages, per_cta, stages, 0, sink);
        cudaEventRecord(b); cudaEventSynchronize(b);
        float ms; cudaEventElapsedTime(&ms, a, b); if (rep) tot += ms;
      }
      const double s = tot / reps * 1e-3;
      const double delivered = double(ctas) * per_cta * kBlockBytes;
      printf("%-42s stages %d: %.1f us, delivered %.0f GB/s, distinct pages %.0f GB/s  %s\n", c.name, stages, s * 1e6,
             delivered / s / 1e9, delivered / c.group / s / 1e9, cudaGetErrorString(cudaGetLastError()));
    }
  }
  return 0;
}
