// Probe: device time per launch of the scheduler kernel, 200 launches back to back behind a spin
// kernel (so that the host has queued them all), for a few batch sizes and partition counts; and
// the SM clock under load.
//
//   nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a -Icpp -o /tmp/scheduler_probe \
//     benchmarks/probes/scheduler_probe.cu cpp/scheduler/mla_metadata.cu && /tmp/scheduler_probe
#include <cstdio>
#include <vector>
#include <random>
#include "scheduler/mla_metadata.h"

__global__ void spin(long long cycles, long long* out) {
  long long t0 = clock64(); while (clock64() - t0 < cycles) {} if (threadIdx.x == 0) *out = t0;
}

int main() {
  long long* dummy; cudaMalloc(&dummy, 8);
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  // clock rate under load
  spin<<<132, 32>>>(2000000, dummy); cudaDeviceSynchronize();
  cudaEventRecord(a); spin<<<1, 32>>>(20000000, dummy); cudaEventRecord(b); cudaEventSynchronize(b);
  float ms; cudaEventElapsedTime(&ms, a, b); printf("spin 20M cycles: %.3f ms -> %.2f GHz\n", ms, 20000000 / (ms * 1e6));
  // fixed: every request maxlen tokens (P1/P4-like: every partition ends on a request boundary)
  struct C { int b, parts, maxlen; bool fixed; } cases[] = {
      {128, 132, 8192, false}, {128, 1, 8192, false}, {128, 33, 8192, false}, {1, 66, 65536, false},
      {1, 1, 65536, false},    {1024, 132, 4096, false}, {128, 132, 4096, true}, {128, 66, 4096, true}};
  std::mt19937 rng(1);
  for (auto c : cases) {
    std::vector<int> lens(c.b); for (int& L : lens) L = c.fixed ? c.maxlen : rng() % c.maxlen + 1;
    int *dl, *dm, *ds; cudaMalloc(&dl, c.b * 4); cudaMalloc(&dm, c.parts * 32); cudaMalloc(&ds, (c.b + 1) * 4);
    cudaMemcpy(dl, lens.data(), c.b * 4, cudaMemcpyHostToDevice);
    jax_flashmla::MetadataParams p{dl, dm, ds, c.b, c.parts, 1};
    for (int i = 0; i < 20; ++i) jax_flashmla::run_mla_metadata(p, 0);
    spin<<<1, 32>>>(4000000, dummy);  // keeps the GPU busy while the launches queue
    const int n = 200;
    cudaEventRecord(a);
    for (int i = 0; i < n; ++i) jax_flashmla::run_mla_metadata(p, 0);
    cudaEventRecord(b); cudaEventSynchronize(b);
    cudaEventElapsedTime(&ms, a, b);
    printf("b=%d parts=%d%s: %.2f us per launch (%s)\n", c.b, c.parts, c.fixed ? " fixed" : "", ms * 1e3 / n, cudaGetErrorString(cudaGetLastError()));
  }
  return 0;
}
