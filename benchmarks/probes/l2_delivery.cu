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
#include <vector>
#include <random>

#include "tma_probe.cuh"

int main() {
  EncodeFn encode = load_encoder();
  const int num_pages = 16384, ctas = 132, per_cta = 496;  // P6: ~500 blocks per CTA
  void* kv; cudaMalloc(&kv, size_t(num_pages) * kBlockBytes); cudaMemset(kv, 1, size_t(num_pages) * kBlockBytes);
  int *dpages, *sink; cudaMalloc(&dpages, size_t(ctas) * per_cta * 4); cudaMalloc(&sink, 4);
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  CUtensorMap map;
  if (encode_k_map(encode, &map, kv, num_pages, CU_TENSOR_MAP_L2_PROMOTION_L2_128B) != CUDA_SUCCESS) {
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
