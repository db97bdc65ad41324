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
#include <vector>
#include <random>
#include <algorithm>

#include "tma_probe.cuh"

int main() {
  EncodeFn encode = load_encoder();
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
    CUresult r = encode_k_map(encode, &map, kv, num_pages, promos[pi]);
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
