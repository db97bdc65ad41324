// Split-KV scheduler kernel: one CTA per schedule.
//
// The greedy pass is inherently serial (where a partition ends depends on where the previous
// one did), so the CTA first stages every request's block count in shared memory and reduces
// their total in parallel, then one thread walks requests and partitions. For b = 128 that is
// about 200 iterations on shared memory: a few microseconds, once per decode step.
#pragma once

#include <cub/block/block_reduce.cuh>

#include "config.h"
#include "scheduler/mla_metadata.h"

namespace jax_flashmla {

// max(ceil(L / 64), 1): a zero-length (or negative) request still costs one block of work.
__device__ __forceinline__ int scheduler_num_blocks(int seqlen) {
  return seqlen <= 0 ? 1 : seqlen / kBlockN + (seqlen % kBlockN != 0);
}

__global__ void __launch_bounds__(kSchedulerThreads) mla_metadata_kernel(const MetadataParams p) {
  using BlockReduce = cub::BlockReduce<int, kSchedulerThreads>;
  __shared__ typename BlockReduce::TempStorage reduce_storage;
  __shared__ int s_num_blocks[kSchedulerSmemRequests];

  const int* seqlens = p.cache_seqlens + static_cast<size_t>(blockIdx.x) * p.batch;
  int* metadata = p.metadata + static_cast<size_t>(blockIdx.x) * p.num_parts * kMetadataCols;
  int* num_splits = p.num_splits + static_cast<size_t>(blockIdx.x) * (p.batch + 1);

  int cost = 0;
  for (int i = threadIdx.x; i < p.batch; i += kSchedulerThreads) {
    const int n = scheduler_num_blocks(seqlens[i]);
    if (i < kSchedulerSmemRequests) s_num_blocks[i] = n;
    cost += n + kFixedOverheadBlocks;
  }
  const int total = BlockReduce(reduce_storage).Sum(cost);  // valid in thread 0 only
  __syncthreads();  // s_num_blocks is read below by thread 0
  if (threadIdx.x != 0) return;

  auto num_blocks = [&](int i) {
    return i < kSchedulerSmemRequests ? s_num_blocks[i] : scheduler_num_blocks(seqlens[i]);
  };
  const int budget = (total + p.num_parts - 1) / p.num_parts + kFixedOverheadBlocks;

  num_splits[0] = 0;
  int idx = 0, blk = 0, nsplit = 0, cum = 0;
  for (int part = 0; part < p.num_parts; ++part) {
    const int first_req = idx, first_block = blk, first_split = nsplit, first_slot = cum + nsplit;
    int remain = budget, taken = 0;
    while (idx < p.batch) {
      const int rest = num_blocks(idx) - blk;
      if (remain >= rest + kFixedOverheadBlocks) {  // the request (or its remainder) ends here
        cum += nsplit + 1;
        num_splits[idx + 1] = cum;
        remain -= rest + kFixedOverheadBlocks;
        taken += rest;
        ++idx;
        blk = 0;
        nsplit = 0;
      } else {  // take what the budget leaves after this piece's own fixed overhead
        const int part_blocks = remain - kFixedOverheadBlocks;
        if (part_blocks > 0) {
          blk += part_blocks;
          ++nsplit;
          taken += part_blocks;
        }
        break;
      }
    }
    // A partition ends inside a request only if it split it (blk > 0); otherwise its last
    // piece is the whole of request idx - 1.
    const bool empty = first_req >= p.batch;
    const bool ends_inside = blk > 0;
    int* row = metadata + part * kMetadataCols;
    row[kFirstReq] = first_req;
    row[kFirstBlock] = first_block;
    row[kLastReq] = ends_inside ? idx : idx - 1;
    row[kLastBlockEnd] = empty ? 0 : (ends_inside ? blk : num_blocks(idx - 1));
    row[kFirstSplit] = first_split;
    row[kNumBlocks] = taken;
    row[kFirstSlot] = first_slot;
    row[kMetadataCols - 1] = 0;
  }
}

}  // namespace jax_flashmla
