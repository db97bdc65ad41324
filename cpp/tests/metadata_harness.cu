// Standalone harness of the scheduler kernel for compute-sanitizer (no JAX in the process, so
// racecheck/synccheck/initcheck see only this kernel). Checks the invariants the decode relies on
// and prints one line per case; exit code 1 on any violation or CUDA error.
#include <cuda_runtime.h>

#include <cstdio>
#include <random>
#include <vector>

#include "config.h"
#include "scheduler/mla_metadata.h"

using namespace jax_flashmla;

namespace {

bool check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) std::printf("CUDA error in %s: %s\n", what, cudaGetErrorString(err));
  return err == cudaSuccess;
}

int blocks_of(int seqlen) { return seqlen <= 0 ? 1 : (seqlen + kBlockN - 1) / kBlockN; }

// Every block of every request placed exactly once, in slot order; num_splits a prefix array.
bool invariants(const std::vector<int>& lens, int parts, const std::vector<int>& meta, const std::vector<int>& splits) {
  const int b = static_cast<int>(lens.size());
  std::vector<int> next_block(b, 0), pieces(b, 0);
  int slot = 0;
  for (int p = 0; p < parts; ++p) {
    const int* row = &meta[p * kMetadataCols];
    if (row[kFirstSlot] != slot) return false;
    for (int r = row[kFirstReq]; r <= row[kLastReq]; ++r) {
      const int nblk = blocks_of(lens[r]);
      const int start = r == row[kFirstReq] ? row[kFirstBlock] : 0;
      const int end = r == row[kLastReq] ? row[kLastBlockEnd] : nblk;
      if (start != next_block[r] || end <= start || end > nblk) return false;
      next_block[r] = end;
      ++pieces[r];
      ++slot;
    }
  }
  if (splits[0] != 0 || splits[b] != slot) return false;
  for (int r = 0; r < b; ++r) {
    if (next_block[r] != blocks_of(lens[r]) || splits[r + 1] - splits[r] != pieces[r]) return false;
  }
  return true;
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  struct Case { int b, max_len, parts, schedules; };
  const Case cases[] = {{1, 100000, 66, 1}, {5, 300, 132, 1}, {128, 9000, 66, 2}, {1024, 300, 132, 1},
                        {kSchedulerSmemRequests + 500, 2000, 132, 1}, {3, 0, 7, 3}};
  bool ok = true;
  for (const Case& c : cases) {
    std::vector<int> lens(static_cast<size_t>(c.b) * c.schedules);
    for (int& L : lens) L = c.max_len ? static_cast<int>(rng() % (c.max_len + 1)) : 0;
    int *d_lens, *d_meta, *d_splits;
    const size_t meta_n = static_cast<size_t>(c.schedules) * c.parts * kMetadataCols;
    const size_t splits_n = static_cast<size_t>(c.schedules) * (c.b + 1);
    ok &= check(cudaMalloc(&d_lens, lens.size() * sizeof(int)), "malloc");
    ok &= check(cudaMalloc(&d_meta, meta_n * sizeof(int)), "malloc");
    ok &= check(cudaMalloc(&d_splits, splits_n * sizeof(int)), "malloc");
    ok &= check(cudaMemcpy(d_lens, lens.data(), lens.size() * sizeof(int), cudaMemcpyHostToDevice), "copy");
    MetadataParams params{d_lens, d_meta, d_splits, c.b, c.parts, c.schedules};
    run_mla_metadata(params, nullptr);
    ok &= check(cudaGetLastError(), "launch") && check(cudaDeviceSynchronize(), "kernel");
    std::vector<int> meta(meta_n), splits(splits_n);
    ok &= check(cudaMemcpy(meta.data(), d_meta, meta_n * sizeof(int), cudaMemcpyDeviceToHost), "copy");
    ok &= check(cudaMemcpy(splits.data(), d_splits, splits_n * sizeof(int), cudaMemcpyDeviceToHost), "copy");
    for (int s = 0; s < c.schedules; ++s) {
      const std::vector<int> l(lens.begin() + s * c.b, lens.begin() + (s + 1) * c.b);
      const std::vector<int> m(meta.begin() + s * c.parts * kMetadataCols, meta.begin() + (s + 1) * c.parts * kMetadataCols);
      const std::vector<int> sp(splits.begin() + s * (c.b + 1), splits.begin() + (s + 1) * (c.b + 1));
      const bool good = invariants(l, c.parts, m, sp);
      ok &= good;
      std::printf("b=%d parts=%d schedule %d: %s (%d pieces)\n", c.b, c.parts, s, good ? "ok" : "VIOLATED", sp[c.b]);
    }
    cudaFree(d_lens);
    cudaFree(d_meta);
    cudaFree(d_splits);
  }
  std::printf("%s\n", ok ? "all cases ok" : "FAILURES");
  return ok ? 0 : 1;
}
