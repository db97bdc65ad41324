// Split-KV scheduler kernel: one CTA per schedule.
//
// The greedy pass of jax_flashmla/_scheduler.py is serial in partitions (where one ends depends
// on where the previous one did), but each partition only needs one search in the prefix sums of
// the request costs. So the CTA
//   1. scans the costs in parallel (cub),
//   2. lets one warp walk the partitions, each step a 32-wide search of the prefix array, and
//      keeps only where each partition starts (request, block),
//   3. fills every metadata row and every num_splits entry in parallel from those starts.
// On the H100 (benchmarks/probes/scheduler_probe.cu, launches back to back): 17.6 us for b = 128
// and 132 partitions, 22.9 us for b = 1024, where a single thread walking requests and
// partitions took 34.4 and 104 us. What is left is the walk, ~200 cycles per partition.
//
// The walk, on a cost line where request i occupies [S_i, S_i + nblk_i + F) (F =
// kFixedOverheadBlocks, S the exclusive prefix of nblk + F):
//   - a partition starting at a request boundary (block 0) sits at S_j and covers `budget`;
//   - one starting inside request j at block blk > 0 sits at S_j + F + blk and covers
//     budget - F, because that piece pays its fixed overhead again;
//   - its end e falls in request j2 (S_j2 <= e < S_j2+1). The requests before j2 are done. If
//     e - S_j2 <= F the budget left cannot pay j2's overhead plus one block: the partition ends
//     there and the next starts at (j2, 0) on S_j2. Otherwise it takes e - S_j2 - F blocks of j2
//     and the next starts at (j2, e - S_j2 - F) on e.
// This is the greedy rule restated, and is bit-identical to it (tests/test_gpu.py compares the
// two on random batches).
#pragma once

#include <climits>

#include <cub/block/block_scan.cuh>

#include "config.h"
#include "scheduler/mla_metadata.h"

namespace jax_flashmla {

// max(ceil(L / 64), 1): a zero-length (or negative) request still costs one block of work.
__device__ __forceinline__ int scheduler_num_blocks(int seqlen) {
  return seqlen <= 0 ? 1 : seqlen / kBlockN + (seqlen % kBlockN != 0);
}

// Where the partition starts and their running split count live: shared memory when the
// partitions fit (kSchedulerSmemParts), else the metadata rows themselves (cols kFirstReq and
// kFirstBlock are the starts; the reserved last column holds the count, zeroed at the end).
inline constexpr int kSplitCountCol = kMetadataCols - 1;

struct SchedulerView {
  int* req;        // [num_parts] int32, `stride` apart: first request of each partition
  int* blk;        // [num_parts] int32: first block of that request
  int* count;      // [num_parts] int32: partitions 0..p that start inside a request
  int stride;
  int num_parts;
  int end_req;     // where the walk ended (past the last partition): batch, unless it ran out
  int end_blk;

  __device__ int start_req(int part) const { return part < num_parts ? req[part * stride] : end_req; }
  __device__ int start_blk(int part) const { return part < num_parts ? blk[part * stride] : end_blk; }
  // Partitions before `part` (0 <= part <= num_parts) that start inside a request.
  __device__ int splits_before(int part) const { return part > 0 ? count[(part - 1) * stride] : 0; }
  // Number of starts among partitions 0..num_parts (the end state included) with request < r
  // (strict) or <= r: starts are sorted by request, so a binary search.
  __device__ int count_starts_below(int r, bool inclusive) const {
    int lo = 0, hi = num_parts + 1;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      const int v = start_req(mid);
      if (inclusive ? v <= r : v < r) lo = mid + 1; else hi = mid;
    }
    return lo;
  }
};

// The walk (warp 0): writes every partition's start through `view` and returns where it ended.
// Its steps form one dependent chain, so nothing in a step may wait on memory: the lanes hold a
// window of 32 prefix values in registers (lane i: S[base + i]) and a step is a ballot and a
// shuffle; the window slides, by a load, only when every value in it is passed. (A shared-memory
// load per step made a step ~330 cycles: 26 us for 132 partitions on the H100.)
__device__ __forceinline__ void walk_partitions(const int* prefix, int b, int budget, SchedulerView& view) {
  const int lane = threadIdx.x % 32;
  auto window_at = [&](int base) { return base + lane <= b ? prefix[base + lane] : INT_MAX; };
  int base = 0;                 // invariant: base <= req, so S[base] is passed by every step
  int window = window_at(base);
  int req = 0, blk = 0, pos = 0;  // start of the partition and its position on the cost line
  for (int part = 0; part < view.num_parts; ++part) {
    if (lane == 0) {
      view.req[part * view.stride] = req;
      view.blk[part * view.stride] = blk;
    }
    if (req >= b) continue;  // every request is placed: the rest are empty
    const int end = pos + budget - (blk > 0 ? kFixedOverheadBlocks : 0);
    // j2 = largest index with S[j2] <= end. S is strictly increasing (every cost >= 1), so the
    // lanes that pass form a prefix of the window.
    int passed = __popc(__ballot_sync(0xffffffffu, window <= end));
    while (passed == 32) {  // keep the last passed value as lane 0 of the next window
      base += 31;
      window = window_at(base);
      passed = __popc(__ballot_sync(0xffffffffu, window <= end));
    }
    const int j2 = base + passed - 1;
    const int s_j2 = __shfl_sync(0xffffffffu, window, passed - 1);
    if (j2 >= b) {
      req = b;
      blk = 0;
      continue;
    }
    const int into = end - s_j2;
    req = j2;
    if (into <= kFixedOverheadBlocks) {  // too little left for j2: it starts the next partition
      blk = 0;
      pos = s_j2;
    } else {
      blk = into - kFixedOverheadBlocks;
      pos = end;
    }
  }
  view.end_req = req;
  view.end_blk = blk;
}

__global__ void __launch_bounds__(kSchedulerThreads) mla_metadata_kernel(const MetadataParams p) {
  // The decode's attention kernel, launched right after as a programmatic dependent, may take the
  // other SMs now: it waits for this grid to complete before it reads the metadata.
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  using BlockScan = cub::BlockScan<int, kSchedulerThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ int s_prefix[kSchedulerSmemRequests + 1];
  __shared__ int s_req[kSchedulerSmemParts], s_blk[kSchedulerSmemParts], s_count[kSchedulerSmemParts];
  __shared__ int s_end[2];

  const int b = p.batch;
  const int* seqlens = p.cache_seqlens + static_cast<size_t>(blockIdx.x) * b;
  int* metadata = p.metadata + static_cast<size_t>(blockIdx.x) * p.num_parts * kMetadataCols;
  int* num_splits = p.num_splits + static_cast<size_t>(blockIdx.x) * (b + 1);
  // S: [b + 1] exclusive prefix of the costs. A batch too large for shared memory keeps it in
  // num_splits, which has the same size and is written only once S is no longer read (step 5).
  int* prefix = b <= kSchedulerSmemRequests ? s_prefix : num_splits;
  const bool parts_shared = p.num_parts <= kSchedulerSmemParts;
  SchedulerView view = parts_shared
      ? SchedulerView{s_req, s_blk, s_count, 1, p.num_parts, 0, 0}
      : SchedulerView{metadata + kFirstReq, metadata + kFirstBlock, metadata + kSplitCountCol, kMetadataCols,
                      p.num_parts, 0, 0};

  // ---- 1. prefix of the costs ----
  int total = 0;  // identical in every thread (the scan's block aggregate)
  for (int base = 0; base < b; base += kSchedulerThreads) {
    const int i = base + threadIdx.x;
    const int cost = i < b ? scheduler_num_blocks(seqlens[i]) + kFixedOverheadBlocks : 0;
    int before, chunk_total;
    BlockScan(scan_storage).ExclusiveSum(cost, before, chunk_total);
    if (i < b) prefix[i] = total + before;
    total += chunk_total;
    __syncthreads();  // scan_storage is reused by the next chunk
  }
  if (threadIdx.x == 0) prefix[b] = total;
  __syncthreads();
  const int budget = (total + p.num_parts - 1) / p.num_parts + kFixedOverheadBlocks;

  // ---- 2. the walk: one warp, one step per partition ----
  if (threadIdx.x < 32) {
    walk_partitions(prefix, b, budget, view);
    if (threadIdx.x == 0) {
      s_end[0] = view.end_req;
      s_end[1] = view.end_blk;
    }
  }
  __syncthreads();
  view.end_req = s_end[0];
  view.end_blk = s_end[1];

  // ---- 3. count, per partition, the partitions up to it that start inside a request ----
  int counted = 0;
  for (int base = 0; base < p.num_parts; base += kSchedulerThreads) {
    const int part = base + threadIdx.x;
    const int inside = part < p.num_parts && view.start_blk(part) > 0;
    int upto, chunk_total;
    BlockScan(scan_storage).InclusiveSum(inside, upto, chunk_total);
    if (part < p.num_parts) view.count[part * view.stride] = counted + upto;
    counted += chunk_total;
    __syncthreads();
  }

  // ---- 4. metadata rows: a partition runs from its start to the next one's ----
  // Reads the starts and counts of any partition; writes the other columns of its own row (and,
  // when the starts are in shared memory, its first two).
  auto nblk = [&](int i) { return prefix[i + 1] - prefix[i] - kFixedOverheadBlocks; };
  auto blocks_before = [&](int i) { return prefix[i] - kFixedOverheadBlocks * i; };
  for (int part = threadIdx.x; part < p.num_parts; part += kSchedulerThreads) {
    const int req = view.start_req(part), blk = view.start_blk(part);
    const int next_req = view.start_req(part + 1), next_blk = view.start_blk(part + 1);
    const bool empty = req >= b;
    // The partition's first piece is split number (starts inside `req` up to this one).
    const int first_in_req = view.count_starts_below(req, false);
    int* row = metadata + part * kMetadataCols;
    if (parts_shared) {
      row[kFirstReq] = req;
      row[kFirstBlock] = blk;
    }
    row[kLastReq] = next_blk > 0 ? next_req : next_req - 1;
    row[kLastBlockEnd] = empty ? 0 : (next_blk > 0 ? next_blk : nblk(max(next_req - 1, 0)));
    row[kFirstSplit] = view.splits_before(part + 1) - view.splits_before(first_in_req);
    row[kNumBlocks] = empty ? 0 : blocks_before(min(next_req, b)) - blocks_before(req) - blk + next_blk;
    row[kFirstSlot] = req + view.splits_before(part + 1);
  }
  __syncthreads();  // S may live in num_splits, which step 5 overwrites

  // ---- 5. num_splits: request i has 1 + (partitions starting inside it) pieces ----
  for (int i = threadIdx.x; i < b; i += kSchedulerThreads) {
    const int starts = min(view.count_starts_below(i, true), p.num_parts);
    num_splits[i + 1] = i + 1 + view.splits_before(starts);
  }
  if (threadIdx.x == 0) num_splits[0] = 0;
  __syncthreads();  // step 5 read the counts, which may be in the reserved column

  for (int part = threadIdx.x; part < p.num_parts; part += kSchedulerThreads) {
    metadata[part * kMetadataCols + kSplitCountCol] = 0;
  }
}

}  // namespace jax_flashmla
