// Split-KV scheduler: launcher interface (no CUTLASS, no device code).
#pragma once

#include <cuda_runtime.h>

namespace jax_flashmla {

// Columns of a tile_scheduler_metadata row; the full description is in
// jax_flashmla/_scheduler.py, which is the specification this kernel must match bit for bit.
enum MetadataCol : int {
  kFirstReq = 0,      // request of the partition's first piece (batch when empty)
  kFirstBlock = 1,    // first 64-token block of that piece
  kLastReq = 2,       // request of the last piece, inclusive (first_req - 1 when empty)
  kLastBlockEnd = 3,  // one past the last block of the last piece (0 when empty)
  kFirstSplit = 4,    // split index of the first piece within its request
  kNumBlocks = 5,     // blocks in the partition
  kFirstSlot = 6,     // accumulator slot of the first piece
};

struct MetadataParams {
  const int* cache_seqlens;  // [num_schedules, batch] int32
  int* metadata;             // [num_schedules, num_parts, kMetadataCols] int32
  int* num_splits;           // [num_schedules, batch + 1] int32
  int batch;                 // requests per schedule
  int num_parts;             // partitions per schedule (num_sm_parts)
  int num_schedules;         // independent schedules (vmapped leading dims, flattened)
};

// Enqueues the scheduler on `stream`; launch errors are left for cudaGetLastError.
void run_mla_metadata(const MetadataParams& params, cudaStream_t stream);

}  // namespace jax_flashmla
