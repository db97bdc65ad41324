// Split-KV scheduler kernel: one CTA per schedule.
//
// The greedy pass of jax_flashmla/_scheduler.py is serial in partitions (where one ends depends
// on where the previous one did). On the cost line, where request i occupies [S_i, S_i + nblk_i
// + F) (F = kFixedOverheadBlocks, S the exclusive prefix of nblk + F, B the budget):
//   - a partition starting at a request boundary (block 0) sits at S_j and ends at S_j + B;
//   - one starting inside request j at block blk > 0 sits at S_j + F + blk and ends B - F later,
//     because that piece pays its fixed overhead again;
//   - its end e falls in request j2 (S_j2 <= e < S_j2+1). The requests before j2 are done. If
//     e - S_j2 <= F the budget left cannot pay j2's overhead plus one block: the partition ends
//     there and the next starts at (j2, 0) on S_j2 (it "snaps" to the boundary). Otherwise it
//     takes e - S_j2 - F blocks of j2 and the next starts at (j2, e - S_j2 - F) on e.
// This is the greedy rule restated, and is bit-identical to it (tests/test_gpu.py compares the
// two on random batches).
//
// So after a partition that starts on boundary j, the ends advance by exactly B - F until one
// snaps, and where the first snap lands depends on j alone. The CTA
//   1. scans the costs in parallel (cub);
//   2. links every boundary j whose run snaps at its first end to the boundary it snaps to (all
//      threads, one boundary each: one search of the prefix);
//   3. follows the links from boundary 0 (warp 0: one shared-memory load per linked run, and a
//      scan of the request boundaries, 32 per warp step, where a run was not linked; the only
//      serial part, ~P steps where every partition snaps, a few where runs are long);
//   4. places every partition from its run's boundary and its index in the run (all threads);
//   5.-7. counts the partitions that start inside a request, and fills every metadata row and
//      every num_splits entry in parallel from the starts.
// A batch over kSchedulerSmemRequests, or of more than kSchedulerLinkRequestsPerPart requests per
// partition (whose runs are short: a scan costs ~1000 cycles a run), places the partitions by
// the one-warp walk of the rule above instead, one step per partition (~200 cycles each), with
// its prefix in global memory when it does not fit in shared memory.
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

// Largest i in [lo, b] with prefix[i] <= e, given prefix[lo] <= e. prefix is strictly
// increasing (every cost >= 1). The search gallops up or down from `guess` (clamped to [lo, b]),
// then bisects: each step is a dependent shared-memory load (~100-150 cycles with its branch on
// the H100), and a guess from the mean cost is usually within a few requests.
__device__ __forceinline__ int last_at_or_below(const int* prefix, int b, int lo, int e, int guess) {
  const int g = min(max(guess, lo), b);
  int hi = b + 1;  // prefix[lo] <= e < prefix[hi], with prefix[b + 1] read as +inf
  if (prefix[g] <= e) {
    lo = g;
    for (int step = 1; lo + step <= b; step *= 2) {
      if (prefix[lo + step] > e) {
        hi = lo + step;
        break;
      }
      lo += step;
    }
  } else {
    hi = g;
    for (int step = 1; hi - step > lo; step *= 2) {
      if (prefix[hi - step] <= e) {
        lo = hi - step;
        break;
      }
      hi -= step;
    }
  }
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (prefix[mid] <= e) lo = mid; else hi = mid;
  }
  return lo;
}

// Where a search for the request holding cost position e starts, from a request j at or before
// it: requests_per_cost = b / total, the inverse of the mean cost.
__device__ __forceinline__ int guess_request(const int* prefix, int j, int e, float requests_per_cost) {
  return j + static_cast<int>(static_cast<float>(e - prefix[j]) * requests_per_cost);
}

// A boundary whose run does not snap at its first end: step 3 scans that run.
inline constexpr int kUnlinked = -1;

// Step 2: for every boundary j whose run of partitions snaps at its first end (or finishes the
// batch), link[j] = (the boundary it snaps to, or b; 1 partition): in a batch of equal requests
// that is every run. Longer runs (requests shorter than the budget, and a snap every few dozen
// ends, as in varlen batches) are left kUnlinked: most are never used, and step 3 scans the ones
// it meets.
__device__ __forceinline__ void link_boundaries(const int* prefix, int b, int budget, float requests_per_cost,
                                                int2* link) {
  for (int j = threadIdx.x; j < b; j += kSchedulerThreads) {
    const int e = prefix[j] + budget;
    const int i = last_at_or_below(prefix, b, j, e, guess_request(prefix, j, e, requests_per_cost));
    link[j] = i >= b || e - prefix[i] <= kFixedOverheadBlocks ? make_int2(i, 1) : make_int2(kUnlinked, 0);
  }
}

// The run from boundary j, by warp 0. Its ends form the progression e_m = S_j + B + m (B - F)
// until one snaps, so each boundary i > j can tell on its own which end of the run it would snap
// (the first end at or past S_i, if within F of it): the lanes take 32 boundaries at a time, with
// no dependent search, and the first boundary that snaps an end gives the run's (boundaries are
// sorted, and so are the ends they snap). A run that reaches the end of the batch first ends
// there. Returns its link.
__device__ __forceinline__ int2 scan_run(const int* prefix, int b, int budget, int j) {
  const int lane = threadIdx.x % 32;
  const int stride = budget - kFixedOverheadBlocks;
  const int e0 = prefix[j] + budget;
  const int total = prefix[b];
  const int m_end = e0 >= total ? 0 : (total - e0 + stride - 1) / stride;  // first end past the batch
  const int last_end = e0 + m_end * stride;
  for (int base = j + 1; base < b; base += 32) {
    const int i = base + lane;
    const int s = i < b ? prefix[i] : INT_MAX;
    const int m = i < b && s > e0 ? (s - e0 + stride - 1) / stride : 0;  // the first end at or past S_i
    const unsigned snaps = __ballot_sync(0xffffffffu, i < b && e0 + m * stride - s <= kFixedOverheadBlocks);
    if (snaps != 0) {
      const int first = __ffs(snaps) - 1;
      const int m_snap = __shfl_sync(0xffffffffu, m, first);
      if (m_snap >= m_end) break;
      // An end snaps to the last boundary at or below it, and that is this one: the next boundary
      // lies at least F + 1 past it (every request costs at least F + 1), so past the end.
      return make_int2(base + first, m_snap + 1);
    }
    if (__shfl_sync(0xffffffffu, s, 31) > last_end) break;  // the next boundaries lie past the run
  }
  return make_int2(b, m_end + 1);
}

// Step 3 (warp 0): follows the links from boundary 0, scanning the unlinked runs it meets, and
// rewrites link[c] = (boundary, first partition) of the c-th run, in place: the c-th run's
// boundary is >= c, and the links still to be read are beyond it. link[runs] = (b, partitions
// used). Returns the number of runs (in every lane).
// Lane 0 alone follows linked runs, and alone reads and writes `link`: one load per run on the
// dependent chain, where a warp-wide step costs twice that in convergence and a broadcast.
__device__ __forceinline__ int follow_links(const int* prefix, int b, int budget, int2* link) {
  const int lane = threadIdx.x % 32;
  int j = 0, part = 0, c = 0;
  for (;;) {
    if (lane == 0 && j < b) {
      for (;;) {
        const int2 l = link[j];
        // Written before the test, so that the store does not wait for the load; an unlinked run
        // rewrites the same entry once it is scanned.
        link[c] = make_int2(j, part);
        // One test on the chain for both exits: unlinked (-1) or the end of the batch (b).
        if (static_cast<unsigned>(l.x) >= static_cast<unsigned>(b)) {
          if (l.x == b) {
            ++c;
            part += l.y;
            j = b;
          }
          break;
        }
        ++c;
        part += l.y;
        j = l.x;
      }
    }
    if (lane == 0 && j >= b) link[c] = make_int2(b, part);
    j = __shfl_sync(0xffffffffu, j, 0);
    part = __shfl_sync(0xffffffffu, part, 0);
    c = __shfl_sync(0xffffffffu, c, 0);
    if (j >= b) return c;
    const int2 l = scan_run(prefix, b, budget, j);
    if (lane == 0) link[c] = make_int2(j, part);
    ++c;
    part += l.y;
    j = l.x;
  }
}

// Step 4: every partition's start from its run: the run's boundary for its first partition;
// for the m-th after it, where the (m - 1)-th ended (no end before the run's last one snaps).
// Partitions past the last run are empty. The contract's budget always places every request
// within num_parts partitions, so the runs never hold more than that.
__device__ __forceinline__ void place_partitions(const int* prefix, int b, int budget, float requests_per_cost,
                                                 const int2* runs, int num_runs, SchedulerView& view) {
  const int stride = budget - kFixedOverheadBlocks;
  for (int part = threadIdx.x; part < view.num_parts; part += kSchedulerThreads) {
    int req = b, blk = 0;
    if (part < runs[num_runs].y) {
      int lo = 0, hi = num_runs;  // last run that starts at or before `part`
      while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (runs[mid].y <= part) lo = mid; else hi = mid;
      }
      const int j = runs[lo].x, m = part - runs[lo].y;
      req = j;
      if (m > 0) {
        const int e = prefix[j] + budget + (m - 1) * stride;
        req = last_at_or_below(prefix, b, j, e, guess_request(prefix, j, e, requests_per_cost));
        blk = e - prefix[req] - kFixedOverheadBlocks;
      }
    }
    view.req[part * view.stride] = req;
    view.blk[part * view.stride] = blk;
  }
  view.end_req = b;
  view.end_blk = 0;
}

// The walk (warp 0), for a batch over kSchedulerSmemRequests or of many requests per partition:
// writes every partition's start through `view` and returns where it ended. Its steps form one
// dependent chain, so nothing in a step may wait on memory: the lanes hold a window of 32 prefix
// values in registers (lane i: S[base + i]) and a step is a ballot and a shuffle; the window
// slides, by a load, only when every value in it is passed. (A shared-memory load per step made
// a step ~330 cycles: 26 us for 132 partitions on the H100.)
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

// Dynamic shared memory of a schedule of `b` requests: the links (b + 1 int2), then the prefix
// (b + 1 int); none over kSchedulerSmemRequests.
__host__ __device__ constexpr int scheduler_smem_bytes(int b) {
  return b <= kSchedulerSmemRequests ? (b + 1) * int(sizeof(int2) + sizeof(int)) : 0;
}

__global__ void __launch_bounds__(kSchedulerThreads) mla_metadata_kernel(const MetadataParams p) {
  // The decode's attention kernel, launched right after as a programmatic dependent, may take the
  // other SMs now: it waits for this grid to complete before it reads the metadata.
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  using BlockScan = cub::BlockScan<int, kSchedulerThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ int s_req[kSchedulerSmemParts], s_blk[kSchedulerSmemParts], s_count[kSchedulerSmemParts];
  __shared__ int s_end[2];
  __shared__ int s_runs;
  extern __shared__ int2 s_dynamic[];

  const int b = p.batch;
  const int* seqlens = p.cache_seqlens + static_cast<size_t>(blockIdx.x) * b;
  int* metadata = p.metadata + static_cast<size_t>(blockIdx.x) * p.num_parts * kMetadataCols;
  int* num_splits = p.num_splits + static_cast<size_t>(blockIdx.x) * (b + 1);
  // S: [b + 1] exclusive prefix of the costs. A batch too large for shared memory keeps it in
  // num_splits, which has the same size and is written only once S is no longer read (step 7).
  const bool requests_shared = b <= kSchedulerSmemRequests;
  int2* link = s_dynamic;  // [b + 1] when requests_shared
  int* prefix = requests_shared ? reinterpret_cast<int*>(s_dynamic + b + 1) : num_splits;
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

  // ---- 2.-4. where each partition starts ----
  if (requests_shared && (b + kSchedulerLinkRequestsPerPart - 1) / kSchedulerLinkRequestsPerPart <= p.num_parts) {
    const float requests_per_cost = static_cast<float>(b) / static_cast<float>(total);
    link_boundaries(prefix, b, budget, requests_per_cost, link);
    __syncthreads();
    if (threadIdx.x < 32) {
      const int runs = follow_links(prefix, b, budget, link);
      if (threadIdx.x == 0) s_runs = runs;
    }
    __syncthreads();
    place_partitions(prefix, b, budget, requests_per_cost, link, s_runs, view);
  } else {
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
  }
  __syncthreads();

  // ---- 5. count, per partition, the partitions up to it that start inside a request ----
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

  // ---- 6. metadata rows: a partition runs from its start to the next one's ----
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
  __syncthreads();  // S may live in num_splits, which the next step overwrites

  // ---- 7. num_splits: request i has 1 + (partitions starting inside it) pieces ----
  for (int i = threadIdx.x; i < b; i += kSchedulerThreads) {
    const int starts = min(view.count_starts_below(i, true), p.num_parts);
    num_splits[i + 1] = i + 1 + view.splits_before(starts);
  }
  if (threadIdx.x == 0) num_splits[0] = 0;
  __syncthreads();  // num_splits read the counts, which may be in the reserved column

  for (int part = threadIdx.x; part < p.num_parts; part += kSchedulerThreads) {
    metadata[part * kMetadataCols + kSplitCountCol] = 0;
  }
}

}  // namespace jax_flashmla
