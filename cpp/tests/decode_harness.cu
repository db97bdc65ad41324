// Standalone harness of the decode kernels (scheduler -> attention -> combine) for
// compute-sanitizer: no JAX in the process, so every tool sees only our kernels. Inputs are
// poisoned as in the test protocol (NaN in unused cache slots, 2147480000 in unused block-table
// entries); results are checked against a float64 CPU reference. Exit code 1 on any mismatch or
// CUDA error. `decode_harness quick` runs the first case only (for racecheck, which is slow).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "config.h"
#include "decode/decode_params.h"
#include "scheduler/mla_metadata.h"

using namespace jax_flashmla;

namespace {

constexpr int kPoisonPage = 2147480000;

bool check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) std::printf("CUDA error in %s: %s\n", what, cudaGetErrorString(err));
  return err == cudaSuccess;
}

struct Case {
  DecodeDtype dtype;
  int s_q, h_q, h_kv, parts;
  bool causal;
  std::vector<int> lens;
  // Multiplies Q: 1 gives logits of ~0.01 (near-uniform softmax, the reference max never moves
  // after the first block); 1000 gives ~10, so later blocks raise it past the rescale slack.
  float q_scale = 1.f;
};

uint16_t to_bits(float x, DecodeDtype dt) {
  uint16_t bits;
  if (dt == DecodeDtype::kBF16) {
    __nv_bfloat16 v = __float2bfloat16(x);
    std::memcpy(&bits, &v, 2);
  } else {
    __half v = __float2half(x);
    std::memcpy(&bits, &v, 2);
  }
  return bits;
}

float from_bits(uint16_t bits, DecodeDtype dt) {
  if (dt == DecodeDtype::kBF16) {
    __nv_bfloat16 v;
    std::memcpy(&v, &bits, 2);
    return __bfloat162float(v);
  }
  __half v;
  std::memcpy(&v, &bits, 2);
  return __half2float(v);
}

template <typename T>
T* to_device(const std::vector<T>& host, bool& ok) {
  T* ptr = nullptr;
  ok &= check(cudaMalloc(&ptr, std::max<size_t>(host.size(), 1) * sizeof(T)), "malloc");
  ok &= check(cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "copy in");
  return ptr;
}

template <typename T>
std::vector<T> to_host(const T* ptr, size_t n, bool& ok) {
  std::vector<T> host(n);
  ok &= check(cudaMemcpy(host.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost), "copy out");
  return host;
}

bool run_case(const Case& c, std::mt19937& rng) {
  bool ok = true;
  const int b = static_cast<int>(c.lens.size());
  const int g = c.h_q / c.h_kv;
  const int rows = c.s_q * g;
  int max_blocks = 1, total_blocks = 0;
  for (int L : c.lens) {
    max_blocks = std::max(max_blocks, (L + kBlockN - 1) / kBlockN);
    total_blocks += (L + kBlockN - 1) / kBlockN;
  }
  const int pages = total_blocks + 3;  // spare pages: all NaN
  std::vector<int> perm(pages);
  for (int i = 0; i < pages; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);

  std::normal_distribution<float> normal(0.f, 1.f);
  auto draw = [&] { return std::fmin(std::fmax(normal(rng) / 10.f, -1.f), 1.f); };
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const size_t page_elems = static_cast<size_t>(kPageBlockSize) * c.h_kv * kHeadDim;
  std::vector<uint16_t> cache(pages * page_elems, to_bits(nan, c.dtype));
  std::vector<int> table(static_cast<size_t>(b) * max_blocks, kPoisonPage);
  int next = 0;
  for (int i = 0; i < b; ++i) {
    for (int blk = 0; blk * kBlockN < c.lens[i]; ++blk) {
      const int page = perm[next++];
      table[static_cast<size_t>(i) * max_blocks + blk] = page;
      const int valid = std::min(kBlockN, c.lens[i] - blk * kBlockN);
      for (size_t e = 0; e < static_cast<size_t>(valid) * c.h_kv * kHeadDim; ++e)
        cache[page * page_elems + e] = to_bits(draw(), c.dtype);
    }
  }
  std::vector<uint16_t> q(static_cast<size_t>(b) * c.s_q * c.h_q * kHeadDim);
  for (auto& x : q) x = to_bits(draw() * c.q_scale, c.dtype);

  // Device: scheduler, then attention + combine.
  int* d_lens = to_device(c.lens, ok);
  int* d_table = to_device(table, ok);
  uint16_t* d_q = to_device(q, ok);
  uint16_t* d_cache = to_device(cache, ok);
  int *d_meta, *d_splits;
  void* d_out;
  float *d_lse, *d_out_accum, *d_lse_accum;
  const size_t out_n = static_cast<size_t>(b) * c.s_q * c.h_q * kHeadDimV;
  const size_t lse_n = static_cast<size_t>(b) * c.h_q * c.s_q;
  const size_t slots = static_cast<size_t>(b + c.parts) * c.h_kv * rows;
  ok &= check(cudaMalloc(&d_meta, c.parts * kMetadataCols * sizeof(int)), "malloc");
  ok &= check(cudaMalloc(&d_splits, (b + 1) * sizeof(int)), "malloc");
  ok &= check(cudaMalloc(&d_out, out_n * 2), "malloc");
  ok &= check(cudaMalloc(&d_lse, lse_n * sizeof(float)), "malloc");
  ok &= check(cudaMalloc(&d_out_accum, slots * kHeadDimV * sizeof(float)), "malloc");
  ok &= check(cudaMalloc(&d_lse_accum, slots * sizeof(float)), "malloc");
  // What fresh XLA results may hold: NaN in every accumulator slot. A combine that read a slot
  // no piece wrote would put NaN in the output.
  ok &= check(cudaMemset(d_out_accum, 0xff, slots * kHeadDimV * sizeof(float)), "memset");
  ok &= check(cudaMemset(d_lse_accum, 0xff, slots * sizeof(float)), "memset");
  MetadataParams mp{d_lens, d_meta, d_splits, b, c.parts, 1};
  run_mla_metadata(mp, nullptr);
  ok &= check(cudaGetLastError(), "metadata launch");

  DecodeParams p{};
  p.q = d_q;
  p.k_cache = d_cache;
  p.block_table = d_table;
  p.cache_seqlens = d_lens;
  p.metadata = d_meta;
  p.num_splits = d_splits;
  p.out = d_out;
  p.lse = d_lse;
  p.out_accum = d_out_accum;
  p.lse_accum = d_lse_accum;
  p.batch = b;
  p.s_q = c.s_q;
  p.h_q = c.h_q;
  p.h_kv = c.h_kv;
  p.heads_per_kv = g;
  p.rows = rows;
  p.num_pages = pages;
  p.max_blocks = max_blocks;
  p.num_parts = c.parts;
  const double scale = 1.0 / std::sqrt(static_cast<double>(kHeadDim));
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.causal = c.causal;
  p.dtype = c.dtype;
  ok &= check(run_mla_decode(p, nullptr), "decode launch") && check(cudaDeviceSynchronize(), "decode");
  const std::vector<uint16_t> out = to_host(static_cast<uint16_t*>(d_out), out_n, ok);
  const std::vector<float> lse = to_host(d_lse, lse_n, ok);
  const std::vector<int> splits = to_host(d_splits, b + 1, ok);

  // float64 reference, straight from the definition.
  int bad = 0, bad_lse = 0;
  double max_err = 0;
  // Where the mismatches are: the first few rows in full, and the count of bad rows per request.
  constexpr int kReportRows = 6;
  int reported = 0;
  std::string report;
  std::vector<int> bad_rows(b, 0);
  for (int i = 0; i < b; ++i) {
    const int L = c.lens[i];
    for (int t = 0; t < c.s_q; ++t) {
      const int limit = c.causal ? L - (c.s_q - 1 - t) : L;
      for (int h = 0; h < c.h_q; ++h) {
        const int kvh = h / g;
        const uint16_t* qr = &q[((static_cast<size_t>(i) * c.s_q + t) * c.h_q + h) * kHeadDim];
        auto key = [&](int j) {
          const int page = table[static_cast<size_t>(i) * max_blocks + j / kBlockN];
          return &cache[page * page_elems + (static_cast<size_t>(j % kBlockN) * c.h_kv + kvh) * kHeadDim];
        };
        std::vector<double> logit(std::max(limit, 0));
        double m = -INFINITY;
        for (int j = 0; j < limit; ++j) {
          double s = 0;
          const uint16_t* kr = key(j);
          for (int d = 0; d < kHeadDim; ++d) s += double(from_bits(qr[d], c.dtype)) * from_bits(kr[d], c.dtype);
          logit[j] = s * scale;
          m = std::max(m, logit[j]);
        }
        double sum = 0;
        std::vector<double> acc(kHeadDimV, 0.0);
        for (int j = 0; j < limit; ++j) {
          const double w = std::exp(logit[j] - m);
          sum += w;
          const uint16_t* kr = key(j);
          for (int d = 0; d < kHeadDimV; ++d) acc[d] += w * from_bits(kr[d], c.dtype);
        }
        const double ref_lse = limit > 0 ? m + std::log(sum) : INFINITY;
        const float got_lse = lse[(static_cast<size_t>(i) * c.h_q + h) * c.s_q + t];
        const int bad_before = bad;
        if (!(limit > 0 ? std::fabs(got_lse - ref_lse) <= 1e-3 : std::isinf(got_lse) && got_lse > 0)) {
          ++bad;
          ++bad_lse;
        }
        const uint16_t* orow = &out[((static_cast<size_t>(i) * c.s_q + t) * c.h_q + h) * kHeadDimV];
        auto ref_out = [&](int d) { return limit > 0 ? acc[d] / sum : 0.0; };
        int first_bad_d = -1;
        for (int d = 0; d < kHeadDimV; ++d) {
          const double ref = ref_out(d);
          const double err = std::fabs(from_bits(orow[d], c.dtype) - ref);
          if (!(err <= 2e-3 + 2e-2 * std::fabs(ref))) {
            ++bad;
            if (first_bad_d < 0) first_bad_d = d;
          }
          if (err == err) max_err = std::max(max_err, err);
        }
        if (bad > bad_before) {
          ++bad_rows[i];
          if (reported++ < kReportRows) {
            const int d = std::max(first_bad_d, 0);
            char line[256];
            std::snprintf(line, sizeof(line), "  request %d (length %d) token %d head %d: lse %g (ref %g), out[%d] %g (ref %g)\n",
                          i, L, t, h, got_lse, ref_lse, d, from_bits(orow[d], c.dtype), ref_out(d));
            report += line;
          }
        }
      }
    }
  }
  std::printf("%s b=%d s_q=%d h_q=%d h_kv=%d parts=%d causal=%d q_scale=%g pieces=%d: %s (max abs err %.2e",
              c.dtype == DecodeDtype::kBF16 ? "bf16" : "fp16", b, c.s_q, c.h_q, c.h_kv, c.parts, int(c.causal),
              c.q_scale, splits[b], bad ? "MISMATCH" : "ok", max_err);
  if (bad) std::printf("; %d values off, %d of them lse", bad, bad_lse);
  std::printf(")\n");
  if (bad) {
    std::printf("%s", report.c_str());
    std::printf("  bad rows per request (request:rows):");
    for (int i = 0; i < b; ++i)
      if (bad_rows[i]) std::printf(" %d:%d", i, bad_rows[i]);
    std::printf("\n");
  }
  for (void* ptr : {(void*)d_lens, (void*)d_table, (void*)d_q, (void*)d_cache, (void*)d_meta, (void*)d_splits, d_out,
                    (void*)d_lse, (void*)d_out_accum, (void*)d_lse_accum})
    cudaFree(ptr);
  return ok && bad == 0;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "quick") == 0;
  std::mt19937 rng(4321);
  const Case cases[] = {
      // Split requests (4 partitions over ~6 blocks), a zero-length one, causal rows.
      {DecodeDtype::kBF16, 2, 16, 1, 4, true, {0, 70, 200}},
      {DecodeDtype::kFP16, 1, 128, 1, 8, false, {1000, 64}},
      {DecodeDtype::kBF16, 4, 48, 3, 3, true, {130, 5}},   // 3 KV heads, lengths below s_q
      {DecodeDtype::kBF16, 2, 64, 1, 2, true, {300, 1}},   // 128 rows: two row tiles
      // Peaked softmax: O is rescaled when a later block's max moves the reference.
      {DecodeDtype::kBF16, 1, 64, 1, 4, false, {900, 300}, 1000.f},
      {DecodeDtype::kFP16, 2, 32, 1, 3, true, {650, 70}, 1000.f},
      // More requests than partitions: the combine's grid goes over partitions; 2 KV heads.
      {DecodeDtype::kBF16, 1, 32, 2, 3, false, {500, 0, 130, 64, 900, 10, 260}},
      {DecodeDtype::kFP16, 3, 16, 1, 2, true, {200, 700, 2, 90}, 1000.f},
      // Many pieces per request ((b + parts) > 8 b): the wide combine, rows over two row tiles.
      {DecodeDtype::kBF16, 2, 48, 1, 40, true, {3000, 900}},
      // More CTAs than SMs (2 row tiles x 150 partitions), so the combine launches only once
      // the last wave runs; a budget of one block per partition splits the requests into 79,
      // 47 and 1 pieces: the wide combine over 127.
      {DecodeDtype::kBF16, 3, 32, 1, 150, false, {5000, 3000, 64}},
      // Many short requests (empty ones, and lengths below s_q: rows with no visible key) over
      // 2 row tiles x 150 partitions: ~2 pieces per split request, so the combine goes over
      // requests (narrow), and a split request's pieces may run in different waves.
      {DecodeDtype::kFP16, 3, 32, 1, 150, true, {130, 63, 257, 0, 1, 511, 1, 130, 700, 0, 511, 64, 0, 1, 257, 257, 1, 64, 1, 511, 257, 0, 700, 1, 64, 700, 0, 700, 700, 257, 0, 64, 0, 511, 63, 65, 257, 63, 511, 1}},
  };
  bool ok = true;
  for (const Case& c : cases) {
    ok &= run_case(c, rng);
    if (quick) break;
  }
  std::printf(ok ? "all cases ok\n" : "FAILURES\n");
  return ok ? 0 : 1;
}
