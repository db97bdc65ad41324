// Optional clock counters of the decode kernel's phases, for benchmarks/probes/phase_probe.cu:
// where the ~3 us of a 64-token block go. Compiled out (an empty struct the optimiser removes)
// unless JAX_FLASHMLA_PHASE_CLOCKS is defined; the extension never defines it.
#pragma once

#include "config.h"

namespace jax_flashmla::decode {

enum Phase : int {
  kPhKWait = 0,      // the block's TMA copies land
  kPhQK,             // QK^T issue + completion
  kPhRowMax,         // mask (blocks that reach a limit), block row max
  kPhSoftmax,        // exp2, P to shared memory, p_full; rescale O
  kPhPV,             // PV issue + completion
  kPhPieceStart,     // piece setup: barrier, block-table check
  kPhEpilogue,       // write_piece: stores after the row-sum barrier
  kPhEpiBarrier,     // write_piece: row sums, row-sum barrier
  kPhQLoad,          // the synchronous Q load of a piece
  kNumPhases
};

#ifdef JAX_FLASHMLA_PHASE_CLOCKS
// [phase][consumer warpgroup] SM cycles summed over the leader thread of every consumer
// warpgroup of every CTA;
// [kNumPhases][*] counts blocks.
__device__ unsigned long long g_phase_cycles[kNumPhases + 1][kNumWarpgroups];

struct PhaseClock {
  long long last;
  __device__ void start() { last = clock64(); }
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

struct RefillStamps {
  long long release[kKStages];  // clock64 of the latest release arrival per stage
  long long issue[kKStages];    // clock64 of the producer's wake-up, i.e. the start of the issue
};
__device__ __forceinline__ RefillStamps& refill_stamps() {
  __shared__ RefillStamps stamps;
  return stamps;
}
__device__ __forceinline__ void refill_add(RefillPhase ph, long long cycles) {
  atomicAdd(&g_refill_cycles[ph], static_cast<unsigned long long>(cycles));
}
__device__ __forceinline__ void refill_stamp_release(int stage) {
  *static_cast<volatile long long*>(&refill_stamps().release[stage]) = clock64();
}
#else
struct PhaseClock {
  __device__ void start() {}
  __device__ void mark(Phase) {}
  __device__ void count_block() {}
};
__device__ __forceinline__ void refill_stamp_release(int) {}
#endif

}  // namespace jax_flashmla::decode
