// Optional clock counters of the decode kernel's phases, for benchmarks/probes/phase_probe.cu:
// where the ~3 us of a 64-token block go. Compiled out (an empty struct the optimiser removes)
// unless JAX_FLASHMLA_PHASE_CLOCKS is defined; the extension never defines it.
#pragma once

#include <cstdint>

#include <cutlass/arch/barrier.h>

#include "config.h"

namespace jax_flashmla::decode {

enum Phase : int {
  kPhKWait = 0,      // the block's TMA copies land
  kPhQK,             // QK^T issue + completion
  kPhRowMax,         // mask (blocks that reach a limit), block row max
  kPhSoftmax,        // exp2, P to shared memory, p_full; rescale O
  kPhPV,             // PV issue + completion
  kPhPieceStart,     // piece setup: barrier, block-table check
  kPhEpilogue,       // write_piece: the staged output stores
  kPhEpiBarrier,     // write_piece: row sums, row-sum barrier
  kPhQLoad,          // the synchronous Q load of a piece
  kPhEpiSetup,       // write_piece: 1 / l, LSE, each row's destination, after the row-sum barrier
  kPhEpiRepeat,      // probe builds with JAX_FLASHMLA_PROBE_EPI_TWICE: the stores once more (warm)
  kPhEpiLse,         // write_piece: the LSE stores, to the end of the piece
  kNumPhases
};

#ifdef JAX_FLASHMLA_PHASE_CLOCKS
// [phase][consumer warpgroup] SM cycles summed over the leader thread of every consumer
// warpgroup of every CTA;
// [kNumPhases][*] counts blocks.
__device__ unsigned long long g_phase_cycles[kNumPhases + 1][kNumWarpgroups];

// Distributions, to tell a systematic wait from a tail: [kNumWaitBuckets] log4 buckets of
// cycles (<64, <256, <1024, <4096, <16384, more); per bucket, the count and the cycle sum.
inline constexpr int kNumWaitBuckets = 6;
enum WaitHist : int {
  kHistKWaitFirst = 0,  // K wait of a piece's first block
  kHistKWaitReady,      // K wait of a later block whose group 0 had landed when the wait began
  kHistKWait,           // K wait of a later block that had not landed yet
  kHistSinceRelease,    // a later block: its stage's release to the end of its K wait
  kHistRefill,          // release to group 0 landed, seen by the watcher
  kNumWaitHists
};
// Per stage, clock64 of the latest release arrival (the last consumer warp's wins) and of the
// producer's wake-up for its refill; read by the K-wait and the refill counters alike.
struct RefillStamps {
  long long release[kKStages];
  long long issue[kKStages];
};
__device__ __forceinline__ volatile RefillStamps& refill_stamps() {
  __shared__ RefillStamps s;
  return s;
}
__device__ unsigned long long g_wait_hist[kNumWaitHists][kNumWaitBuckets][2];
// Per CTA (linear block index, up to kMaxProbeCtas): warpgroup 0's K wait cycles and its cycles
// from start to the end of the last piece.
inline constexpr int kMaxProbeCtas = 4096;
__device__ unsigned long long g_cta_kwait[kMaxProbeCtas];
__device__ unsigned long long g_cta_cycles[kMaxProbeCtas];

__device__ __forceinline__ void add_wait(WaitHist h, long long cycles) {
  int b = 0;
  for (long long lim = 64; b < kNumWaitBuckets - 1 && cycles >= lim; lim *= 4) ++b;
  atomicAdd(&g_wait_hist[h][b][0], 1ull);
  atomicAdd(&g_wait_hist[h][b][1], static_cast<unsigned long long>(cycles));
}
__device__ __forceinline__ int cta_index() {
  return int(blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z));
}

struct PhaseClock {
  long long last;
  long long first = 0;
  unsigned long long kwait = 0;
  __device__ void start() { first = last = clock64(); }
  // The K wait of a block (warpgroup 0), kept apart for the first block of a piece.
  __device__ void mark_kwait(bool first_of_piece, bool was_ready, int stage) {
    if (threadIdx.x == 0) {
      const long long now = clock64();
      const long long d = now - last;
      add_wait(first_of_piece ? kHistKWaitFirst : was_ready ? kHistKWaitReady : kHistKWait, d);
      if (!first_of_piece) add_wait(kHistSinceRelease, now - refill_stamps().release[stage]);
      kwait += d;
    }
    mark(kPhKWait);
  }
  // End of the partition (every consumer thread calls it).
  __device__ void finish() {
    if (threadIdx.x == 0 && cta_index() < kMaxProbeCtas) {
      g_cta_kwait[cta_index()] = kwait;
      g_cta_cycles[cta_index()] = clock64() - first;
    }
  }
  __device__ void mark(Phase ph) {
    if (threadIdx.x % kWarpgroupThreads == 0) {
      const long long now = clock64();
      atomicAdd(&g_phase_cycles[ph][threadIdx.x / kWarpgroupThreads], static_cast<unsigned long long>(now - last));
      last = now;
    }
  }
  __device__ void count_block() {
    if (threadIdx.x % kWarpgroupThreads == 0) atomicAdd(&g_phase_cycles[kNumPhases][threadIdx.x / kWarpgroupThreads], 1ull);
  }
};

// Where a stage's refill time goes, per K block issued after a release (SM cycles summed over
// all CTAs; [kNumRefillPhases] counts the refills): the last consumer warp's release to the
// producer's wake-up, the producer's issue of the boxes, the issue to the landing of tile group 0
// (seen by a watcher thread of the producer warpgroup), and group 0 to group 1.
enum RefillPhase : int { kRfReleaseToWake = 0, kRfIssue, kRfIssueToGroup0, kRfGroup0ToGroup1, kNumRefillPhases };
__device__ unsigned long long g_refill_cycles[kNumRefillPhases + 1];

// The producer warpgroup's side of the refill counters: the producer thread stamps its wake-up
// and the end of its issue, and a watcher thread follows the same blocks' landing groups.
struct RefillClock {
  long long wake = 0;
  int watched = 0;  // the watcher's count of the blocks it has seen land

  static __device__ __forceinline__ void add(RefillPhase ph, long long cycles) {
    atomicAdd(&g_refill_cycles[ph], static_cast<unsigned long long>(cycles));
  }
  // A consumer warp releases `stage` (the last one to do so wins the stamp).
  static __device__ __forceinline__ void release(int stage) { refill_stamps().release[stage] = clock64(); }
  // The producer's wait on k_empty for its `issued`-th block returned; the first kKStages blocks
  // are not refills.
  __device__ __forceinline__ void woke(int stage, int issued) {
    wake = clock64();
    refill_stamps().issue[stage] = wake;
    if (issued >= kKStages) {
      add(kRfReleaseToWake, wake - refill_stamps().release[stage]);
      atomicAdd(&g_refill_cycles[kNumRefillPhases], 1ull);
    }
  }
  __device__ __forceinline__ void issue_done(int issued) {
    if (issued >= kKStages) add(kRfIssue, clock64() - wake);
  }
  // The watcher: waits for each of the next `blocks` blocks' two landing groups (k_full
  // [kKStages][2], in the producer's order) and times them against the producer's wake-up.
  __device__ __forceinline__ void watch(uint64_t (*k_full)[2], int blocks) {
    for (int b = 0; b < blocks; ++b, ++watched) {
      const int stage = watched % kKStages;
      const int phase = (watched / kKStages) & 1;
      cutlass::arch::ClusterTransactionBarrier::wait(&k_full[stage][0], phase);
      const long long t0 = clock64();
      cutlass::arch::ClusterTransactionBarrier::wait(&k_full[stage][1], phase);
      const long long t1 = clock64();
      if (watched >= kKStages) {
        add_wait(kHistRefill, t0 - refill_stamps().release[stage]);
        add(kRfIssueToGroup0, t0 - refill_stamps().issue[stage]);
        add(kRfGroup0ToGroup1, t1 - t0);
      }
    }
  }
};
#else
struct PhaseClock {
  __device__ void start() {}
  __device__ void mark(Phase) {}
  __device__ void mark_kwait(bool, bool, int) {}
  __device__ void finish() {}
  __device__ void count_block() {}
};
struct RefillClock {
  static __device__ void release(int) {}
  __device__ void woke(int, int) {}
  __device__ void issue_done(int) {}
  __device__ void watch(uint64_t (*)[2], int) {}
};
#endif

}  // namespace jax_flashmla::decode
