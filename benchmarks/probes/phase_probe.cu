// Probe: where the time of a 64-token block goes in the decode kernel. Builds the kernel with
// JAX_FLASHMLA_PHASE_CLOCKS (cpp/decode/phase_clocks.cuh), runs benchmark-like cells (random
// pages, equal lengths, the benchmark's partition count) and prints SM cycles per block of each
// phase, per warpgroup, next to the kernel's event time without the counters.
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -Icpp \
//     -I<cutlass>/include -o /tmp/phase_probe benchmarks/probes/phase_probe.cu \
//     cpp/scheduler/mla_metadata.cu && /tmp/phase_probe
#define JAX_FLASHMLA_PHASE_CLOCKS 1
#include "decode/decode_launch.cu"

#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "scheduler/mla_metadata.h"

using namespace jax_flashmla;
using decode::kNumPhases;

namespace {

struct Cell {
  const char* name;
  int b, s_q, h_q, s_k;
  bool causal;
};

const char* kPhaseNames[] = {"K wait",     "QK^T",        "row max", "softmax+P", "PV+release", "piece start",
                             "epi stores", "epi barrier", "Q load",  "epi setup", "epi repeat", "epi LSE"};
static_assert(sizeof(kPhaseNames) / sizeof(kPhaseNames[0]) == kNumPhases, "a name per phase");

void run_cell(const Cell& c, int num_sm) {
  const int rows = c.s_q * c.h_q;  // h_kv = 1
  const int row_blocks = (rows + kBlockM - 1) / kBlockM;
  const int parts = std::max(1, num_sm / row_blocks);
  const int blocks_per_req = (c.s_k + kBlockN - 1) / kBlockN;
  const int pages = c.b * blocks_per_req;
  std::mt19937 rng(7);
  std::vector<int> perm(pages);
  for (int i = 0; i < pages; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int> lens(c.b, c.s_k), table(perm);

  const size_t cache_n = size_t(pages) * kPageBlockSize * kHeadDim;
  const size_t q_n = size_t(c.b) * rows * kHeadDim;
  const size_t slots = size_t(c.b + parts) * rows;
  void *d_cache, *d_q, *d_out;
  int *d_lens, *d_table, *d_meta, *d_splits;
  float *d_lse, *d_oacc, *d_lacc;
  cudaMalloc(&d_cache, cache_n * 2);
  cudaMalloc(&d_q, q_n * 2);
  cudaMalloc(&d_out, size_t(c.b) * rows * kHeadDimV * 2);
  cudaMalloc(&d_lse, size_t(c.b) * rows * 4);
  cudaMalloc(&d_oacc, slots * kHeadDimV * 4);
  cudaMalloc(&d_lacc, slots * 4);
  cudaMalloc(&d_lens, c.b * 4);
  cudaMalloc(&d_table, pages * 4);
  cudaMalloc(&d_meta, parts * kMetadataCols * 4);
  cudaMalloc(&d_splits, (c.b + 1) * 4);
  // Small random values (0x3c00-ish bf16 bit patterns are avoided: any finite data will do).
  std::vector<uint16_t> host(std::max(cache_n, q_n));
  for (auto& x : host) x = uint16_t(0x3800 + (rng() & 0x3ff));  // bf16 in [2^-15, 2^-14): finite
  cudaMemcpy(d_cache, host.data(), cache_n * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(d_q, host.data(), q_n * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(d_lens, lens.data(), c.b * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(d_table, table.data(), pages * 4, cudaMemcpyHostToDevice);
  MetadataParams mp{d_lens, d_meta, d_splits, c.b, parts, 1};
  run_mla_metadata(mp, nullptr);

  DecodeParams p{};
  p.q = d_q; p.k_cache = d_cache; p.block_table = d_table; p.cache_seqlens = d_lens;
  p.metadata = d_meta; p.num_splits = d_splits; p.out = d_out; p.lse = d_lse;
  p.out_accum = d_oacc; p.lse_accum = d_lacc;
  p.batch = c.b; p.s_q = c.s_q; p.h_q = c.h_q; p.h_kv = 1; p.heads_per_kv = c.h_q; p.rows = rows;
  p.num_pages = pages; p.max_blocks = blocks_per_req; p.num_parts = parts;
  p.scale_log2 = 0.06f; p.causal = c.causal; p.dtype = DecodeDtype::kBF16;

  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  for (int i = 0; i < 3; ++i) run_mla_decode(p, nullptr);
  unsigned long long zero[kNumPhases + 1][kNumWarpgroups] = {};
  cudaMemcpyToSymbol(decode::g_phase_cycles, zero, sizeof(zero));
  static unsigned long long zero_hist[decode::kNumWaitHists][decode::kNumWaitBuckets][2] = {};
  cudaMemcpyToSymbol(decode::g_wait_hist, zero_hist, sizeof(zero_hist));
  unsigned long long zero_rf[decode::kNumRefillPhases + 1] = {};
  cudaMemcpyToSymbol(decode::g_refill_cycles, zero_rf, sizeof(zero_rf));
  const int reps = 5;
  cudaEventRecord(e0);
  for (int i = 0; i < reps; ++i) run_mla_decode(p, nullptr);
  cudaEventRecord(e1);
  cudaError_t err = cudaDeviceSynchronize();
  float ms = 0;
  cudaEventElapsedTime(&ms, e0, e1);
  unsigned long long got[kNumPhases + 1][kNumWarpgroups];
  cudaMemcpyFromSymbol(got, decode::g_phase_cycles, sizeof(got));
  std::printf("%s: b=%d s_q=%d h_q=%d s_k=%d parts=%d  %.1f us per call (attention+combine, counters on)  %s\n",
              c.name, c.b, c.s_q, c.h_q, c.s_k, parts, 1000.f * ms / reps, cudaGetErrorString(err));
  double total[kNumWarpgroups] = {};
  for (int ph = 0; ph < kNumPhases; ++ph) {
    std::printf("  %-12s", kPhaseNames[ph]);
    for (int w = 0; w < kNumWarpgroups; ++w) {
      const double per_block = double(got[ph][w]) / double(got[kNumPhases][w]);
      total[w] += per_block;
      std::printf("  wg%d %7.0f cyc/block", w, per_block);
    }
    std::printf("\n");
  }
  std::printf("  %-12s  wg0 %7.0f cyc/block  wg1 %7.0f  (blocks per CTA-warpgroup total %llu)\n", "sum", total[0],
              total[1], got[kNumPhases][0] / reps);
  // Pieces of the schedule (num_splits[b]; every row block walks them all): the per-piece phases
  // above are amortised per block, so a piece costs (piece start + Q load + epilogue) x blocks /
  // pieces.
  int splits_total = 0;
  cudaMemcpy(&splits_total, d_splits + c.b, sizeof(int), cudaMemcpyDeviceToHost);
  const long long pieces = splits_total;
  const double blocks = double(got[kNumPhases][0]) / reps;
  const double piece_div = double(reps) * double(pieces * row_blocks);
  const double per_piece = (got[decode::kPhPieceStart][0] + got[decode::kPhQLoad][0] + got[decode::kPhEpilogue][0] +
                            got[decode::kPhEpiBarrier][0] + got[decode::kPhEpiSetup][0] + got[decode::kPhEpiLse][0]) /
                           piece_div;
  std::printf("  pieces %lld (x %d row blocks), blocks per piece %.1f; wg0 piece overhead %.0f cyc per piece\n",
              pieces, row_blocks, blocks / double(pieces * row_blocks), per_piece);
  // The epilogue per piece, by part (warpgroup 0): the repeat is non-zero only in a build with
  // JAX_FLASHMLA_PROBE_EPI_TWICE, and is not in the piece overhead above.
  std::printf("  epilogue per piece, wg0: barrier %.0f, setup %.0f, stores %.0f, repeat %.0f, LSE %.0f cyc\n",
              got[decode::kPhEpiBarrier][0] / piece_div, got[decode::kPhEpiSetup][0] / piece_div,
              got[decode::kPhEpilogue][0] / piece_div, got[decode::kPhEpiRepeat][0] / piece_div,
              got[decode::kPhEpiLse][0] / piece_div);
  unsigned long long rf[decode::kNumRefillPhases + 1];
  cudaMemcpyFromSymbol(rf, decode::g_refill_cycles, sizeof(rf));
  const double refills = rf[decode::kNumRefillPhases] > 0 ? double(rf[decode::kNumRefillPhases]) : 1.0;
  std::printf("  refill (cyc per refill): release->wake %.0f, issue %.0f, issue->group 0 landed %.0f, "
              "group 0->group 1 %.0f\n",
              rf[decode::kRfReleaseToWake] / refills, rf[decode::kRfIssue] / refills,
              rf[decode::kRfIssueToGroup0] / refills, rf[decode::kRfGroup0ToGroup1] / refills);
  static unsigned long long hist[decode::kNumWaitHists][decode::kNumWaitBuckets][2];
  cudaMemcpyFromSymbol(hist, decode::g_wait_hist, sizeof(hist));
  const char* hist_names[] = {"K wait, first block of a piece", "K wait, later, landed before", "K wait, later, not landed",
                              "stage release->K wait done", "release->group 0 landed"};
  for (int h = 0; h < decode::kNumWaitHists; ++h) {
    std::printf("  %-30s", hist_names[h]);
    for (int b = 0; b < decode::kNumWaitBuckets; ++b)
      std::printf(" <%-5d n=%-6llu %5.1fM", b == decode::kNumWaitBuckets - 1 ? 99999 : 64 << (2 * b),
                  hist[h][b][0] / reps, hist[h][b][1] / reps / 1e6);
    std::printf("\n");
  }
  // The last rep's per-CTA totals: the spread of K wait and of the CTA time across SMs.
  const int ctas = std::min(row_blocks * parts, decode::kMaxProbeCtas);
  std::vector<unsigned long long> kw(ctas), cy(ctas);
  cudaMemcpyFromSymbol(kw.data(), decode::g_cta_kwait, ctas * 8);
  cudaMemcpyFromSymbol(cy.data(), decode::g_cta_cycles, ctas * 8);
  auto stats = [&](const char* what, std::vector<unsigned long long> v) {
    std::sort(v.begin(), v.end());
    double mean = 0;
    for (auto x : v) mean += double(x) / v.size();
    std::printf("  per CTA %-10s min %9llu  p10 %9llu  median %9llu  p90 %9llu  max %9llu  mean %9.0f\n", what, v[0],
                v[v.size() / 10], v[v.size() / 2], v[v.size() * 9 / 10], v.back(), mean);
  };
  stats("K wait", kw);
  stats("cycles", cy);
  for (void* ptr : {d_cache, d_q, d_out, (void*)d_lse, (void*)d_oacc, (void*)d_lacc, (void*)d_lens, (void*)d_table,
                    (void*)d_meta, (void*)d_splits})
    cudaFree(ptr);
}

}  // namespace

int main() {
  int num_sm = 0;
  cudaDeviceGetAttribute(&num_sm, cudaDevAttrMultiProcessorCount, 0);
  const Cell cells[] = {
      {"P1", 128, 1, 16, 4096, false},
      {"P3", 128, 1, 64, 8192, false},
      {"P4", 128, 1, 128, 4096, false},
      {"P8", 1, 1, 128, 65536, false},
      {"P10", 32, 4, 32, 4096, true},
      {"P6", 128, 2, 128, 8192, true},
      {"P9", 8, 1, 16, 32768, false},
  };
  for (const Cell& c : cells) run_cell(c, num_sm);
  return 0;
}
