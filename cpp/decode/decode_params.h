// Split-KV MLA decode: launcher interface (no CUTLASS, no device code).
//
// One call enqueues the attention kernel and, right behind it on the same stream, the combine
// kernel (programmatic dependent launch). Semantics: jax_flashmla/_split_kv.py, which is the
// executable specification of both kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace jax_flashmla {

enum class DecodeDtype : int { kBF16 = 0, kFP16 = 1 };

struct DecodeParams {
  const void* q;              // [batch, s_q, h_q, kHeadDim] dtype
  const void* k_cache;        // [num_pages, kPageBlockSize, h_kv, kHeadDim] dtype
  const int* block_table;     // [batch, max_blocks] int32; read only for blocks that hold tokens
  const int* cache_seqlens;   // [batch] int32
  const int* metadata;        // [num_parts, kMetadataCols] int32 (scheduler/mla_metadata.h)
  const int* num_splits;      // [batch + 1] int32 prefix sums of pieces per request
  void* out;                  // [batch, s_q, h_q, kHeadDimV] dtype
  float* lse;                 // [batch, h_q, s_q] f32, natural log
  float* out_accum;           // [batch + num_parts, h_kv, rows, kHeadDimV] f32 piece outputs
  float* lse_accum;           // [batch + num_parts, h_kv, rows] f32 base-2 piece LSEs

  int batch;
  int s_q;
  int h_q;
  int h_kv;
  int heads_per_kv;           // h_q / h_kv
  int rows;                   // packed query rows per KV head: s_q * heads_per_kv
  int num_pages;
  int max_blocks;             // width of block_table
  int num_parts;              // partitions of the schedule (num_sm_parts)
  float scale_log2;           // softmax_scale * log2(e): logits go straight to exp2
  bool causal;
  DecodeDtype dtype;
};

// Enqueues attention + combine on `stream`. Returns cudaSuccess or the first launch/setup error
// (a TMA descriptor that cannot be encoded is reported as cudaErrorInvalidValue).
cudaError_t run_mla_decode(const DecodeParams& params, cudaStream_t stream);

}  // namespace jax_flashmla
