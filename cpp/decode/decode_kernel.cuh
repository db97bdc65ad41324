// The split-KV MLA decode kernel: one CTA per (row block, KV head, partition) walks the pieces
// of its partition (scheduler/mla_metadata.h) block by block.
//
// Warp specialised. One thread of the producer warpgroup issues the TMA copies of every K block
// into one of kKStages stages, once the consumers have released it (k_empty). Per 64-token
// block:
//   warpgroup 0: 1. S = Q K^T (wgmma, N = 64), as the block's two tile groups land (k_full)
//                2. mask by replacement, row max, reference max, P = exp2(S * scale - m)
//                3. P -> the block's RoPE tile, rescale factors -> shared memory, zero V rows
//                   past the length in the last block                     | p_full[stage]
//   warpgroup 1:    waits for p_full[stage], reads the rescale factors
//   both:        4. rescale O when the reference moved, O_half += P V_half (wgmma; warpgroup w
//                   owns channels [256w, 256w + 256)), then release the stage (k_empty)
// Warpgroup 0 never waits for warpgroup 1 within a piece: the stage it writes P into next was
// released by both, so p_full[stage] cannot complete a phase twice before warpgroup 1 has waited
// on it once.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "config.h"
#include "decode/decode_params.h"
#include "decode/epilogue.cuh"
#include "decode/kernel_traits.cuh"
#include "decode/mainloop.cuh"
#include "decode/phase_clocks.cuh"
#include "decode/softmax.cuh"
#include "scheduler/mla_metadata.h"

namespace jax_flashmla::decode {

// One row of the schedule (scheduler/mla_metadata.h).
struct Partition {
  int first_req, first_block, last_req, last_block_end, first_slot;
};

// Read after setmaxnreg by each role: values live across the register reconfiguration are
// spilled to local memory.
__device__ __forceinline__ Partition read_partition(const DecodeParams& p, int part) {
  const int* meta = p.metadata + int64_t(part) * kMetadataCols;
  return {meta[kFirstReq], meta[kFirstBlock], meta[kLastReq], meta[kLastBlockEnd], meta[kFirstSlot]};
}

// The blocks of one request that a partition covers.
struct Piece {
  int seqlen;
  bool bad_len;   // negative, or longer than the block table
  int kv_blocks;  // blocks that hold tokens
  int begin;      // first block of the piece
  int n_end;      // one past the last block of the piece that holds tokens
};

__device__ __forceinline__ Piece make_piece(const DecodeParams& p, const Partition& pt, int req) {
  Piece pc;
  pc.seqlen = p.cache_seqlens[req];
  pc.bad_len = pc.seqlen < 0 || int64_t(pc.seqlen) > int64_t(p.max_blocks) * kBlockN;
  pc.kv_blocks = pc.bad_len ? 0 : pc.seqlen / kBlockN + (pc.seqlen % kBlockN != 0);
  pc.begin = req == pt.first_req ? pt.first_block : 0;
  // The scheduler counts at least one block per request, even an empty one.
  const int end = req == pt.last_req ? pt.last_block_end : max(pc.kv_blocks, 1);
  pc.n_end = min(end, pc.kv_blocks);
  return pc;
}

// Whether any page id of the piece is out of range, agreed by the role's `threads` threads (a
// named barrier `bar` that only they use, reached from one place in the code). Each role checks
// for itself: both read the same block table, so the producer skips exactly the pieces the
// consumers skip without waiting for them, and runs ahead into the next piece. For the
// consumers it is also the barrier that starts a piece: they are done with the previous piece's
// Q and row arrays.
__device__ __forceinline__ bool piece_has_bad_page(const DecodeParams& p, const int* pages, const Piece& pc,
                                                   int tid, int threads, uint32_t bar) {
  bool bad_page = false;
  for (int n = pc.begin + tid; n < pc.n_end; n += threads) bad_page |= pages[n] < 0 || pages[n] >= p.num_pages;
  uint32_t any_bad;
  asm volatile(
      "{\n\t.reg .pred p, q;\n\tsetp.ne.u32 p, %1, 0;\n\tbarrier.red.or.pred q, %2, %3, p;\n\t"
      "selp.u32 %0, 1, 0, q;\n\t}"
      : "=r"(any_bad)
      : "r"(uint32_t(bad_page)), "r"(bar + cutlass::arch::NamedBarrier::ReservedNamedBarrierCount),
        "r"(uint32_t(threads))
      : "memory");
  return any_bad != 0 || pc.bad_len;
}

// Warpgroup 0's part of a block: S = Q K^T of the block in `stage`, the online softmax, P over
// the stage's RoPE tile (rounded to the input dtype here, before PV, as the pure-JAX path does),
// the rescale factors, zeroed V rows past the length; then p_full[stage] tells warpgroup 1.
// Self-contained (every wgmma it issues is waited for inside): ptxas serialises the wgmma of a
// kernel whose issue and wait sit under different runtime branches.
template <typename T>
__device__ __forceinline__ void compute_p(const DecodeParams& p, SharedStorage<T>& smem, int stage, int phase, int n,
                                          const Piece& pc, int min_limit, const int (&limit)[kRowsPerThread],
                                          const int (&rows)[kRowsPerThread], SoftmaxState& st,
                                          float (&alpha)[kRowsPerThread], PhaseClock& clk) {
  using Traits = KernelTraits<T>;
  typename Traits::TiledMmaS mma_s;
  auto thr_s = mma_s.get_thread_slice(thread_in_warpgroup());
  Tensor cS = thr_s.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
#ifdef JAX_FLASHMLA_PHASE_CLOCKS
  // gemm_qk waits again on the same phase, which then returns at once.
  const bool was_ready = cutlass::arch::ClusterTransactionBarrier::test_wait(&smem.k_full[stage][0], phase, 1);
  cutlass::arch::ClusterTransactionBarrier::wait(&smem.k_full[stage][0], phase);
  clk.mark_kwait(n == pc.begin, was_ready, stage);
#endif
  gemm_qk(smem, stage, phase, tSrS);
  clk.mark(kPhQK);

  if ((n + 1) * kBlockN > min_limit) mask_invisible(tSrS, cS, n * kBlockN, limit);
  float mx[kRowsPerThread];
  block_row_max(tSrS, cS, p.scale_log2, mx);
  clk.mark(kPhRowMax);
  softmax_update(tSrS, cS, p.scale_log2, st, mx, alpha);
  Tensor rP = make_tensor_like<T>(tSrS);
  CUTE_UNROLL
  for (int i = 0; i < size(tSrS); ++i) rP(i) = T(tSrS(i));
  // stmatrix: per-element stores need 32 live swizzled addresses.
  auto p_copy = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, T>{}, mma_s);
  auto p_copy_thr = p_copy.get_thread_slice(thread_in_warpgroup());
  Tensor sP = p_tile(smem, stage);
  cute::copy(p_copy, p_copy_thr.retile_S(rP), p_copy_thr.partition_D(sP));
  // Warpgroup 1 has read the stage's previous factors: every one of its threads arrived on
  // alpha_free after reading. That already follows from the stage's refill (this block landed
  // after warpgroup 1 released the stage), so the wait returns at once; it states the order
  // directly, per thread, which compute-sanitizer's racecheck needs (it does not follow lane 0's
  // k_empty arrival after __syncwarp back to the other lanes' reads).
  cutlass::arch::ClusterBarrier::wait(&smem.alpha_free[stage], phase ^ 1);
  if (threadIdx.x % 4 == 0)
    for (int r = 0; r < kRowsPerThread; ++r) smem.row_alpha[stage][rows[r]] = alpha[r];
  if (n == pc.kv_blocks - 1 && pc.seqlen % kBlockN != 0) zero_tail_v(smem, stage, pc.seqlen % kBlockN);
  cutlass::arch::fence_view_async_shared();  // generic-proxy writes, read by wgmma
  // Release semantics: the writes above are visible to warpgroup 1 once its wait returns.
  cutlass::arch::ClusterBarrier::arrive(&smem.p_full[stage]);
}

// One consumer warpgroup's walk over the partition: warpgroup 0 computes S, the softmax and P
// (compute_p); warpgroup 1 waits for P. Both run PV on their half of V. One code path for both:
// the named barriers they share (piece start, Q, row sums) are each reached from one place, as
// compute-sanitizer's synccheck and racecheck require.
template <typename T>
__device__ __forceinline__ void run_consumer(const DecodeParams& p, SharedStorage<T>& smem, int row_block,
                                             int kv_head, int part, int wg) {
  using Traits = KernelTraits<T>;
  const int lane = threadIdx.x % 32;
  const Partition pt = read_partition(p, part);
  typename Traits::TiledMmaO mma_o;
  auto thr_o = mma_o.get_thread_slice(thread_in_warpgroup());
  // (row, column) of every accumulator element this thread holds.
  Tensor cO = thr_o.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHalfDimV>>{}));
  Tensor tOrO = partition_fragment_C(mma_o, Shape<Int<kBlockM>, Int<kHalfDimV>>{});

  int rows[kRowsPerThread];  // the two tile rows this thread holds, in S and in O alike
  CUTE_UNROLL
  for (int i = 0; i < size(cO); ++i) rows[row_slot(get<0>(cO(i)))] = get<0>(cO(i));

  // K blocks this CTA has consumed: stage = loaded % kKStages, and the k_full parity of that
  // stage's next use is (loaded / kKStages) & 1.
  int loaded = 0;
  PhaseClock clk;
  clk.start();
  for (int req = pt.first_req, slot = pt.first_slot; req <= pt.last_req; ++req, ++slot) {
    const Piece pc = make_piece(p, pt, req);
    const int seqlen = pc.seqlen;
    const PieceTarget tg{req, kv_head, row_block, p.num_splits[req + 1] - p.num_splits[req] > 1, slot};
    const int* pages = p.block_table + int64_t(req) * p.max_blocks;

    if (piece_has_bad_page(p, pages, pc, threadIdx.x, kConsumerThreads, kBarPiece)) {
      write_nan_piece<T>(p, tg);
      clk.mark(kPhPieceStart);
      continue;
    }
    // The producer issues this piece's first blocks meanwhile.
    clk.mark(kPhPieceStart);
    if (pc.begin < pc.n_end) load_q(p, smem, req, kv_head, row_block);
    clk.mark(kPhQLoad);

    // Bottom-right causal limit of each of this thread's rows: token t sees keys < L - (s_q-1-t).
    int limit[kRowsPerThread];
    for (int r = 0; r < kRowsPerThread; ++r) {
      const int row = min(row_block * kBlockM + rows[r], p.rows - 1);  // padding rows: any limit
      limit[r] = p.causal ? seqlen - (p.s_q - 1 - row / p.heads_per_kv) : seqlen;
    }
    const int min_limit = p.causal ? seqlen - (p.s_q - 1) : seqlen;

    SoftmaxState st;
    st.reset();
    clear(tOrO);
    clk.mark(kPhPieceStart);
    for (int n = pc.begin; n < pc.n_end; ++n, ++loaded) {
      const int stage = loaded % kKStages;
      const int phase = (loaded / kKStages) & 1;
      float alpha[kRowsPerThread];
      if (wg == 0) {
        compute_p(p, smem, stage, phase, n, pc, min_limit, limit, rows, st, alpha, clk);
      } else {
        cutlass::arch::ClusterBarrier::wait(&smem.p_full[stage], phase);
        for (int r = 0; r < kRowsPerThread; ++r) alpha[r] = smem.row_alpha[stage][rows[r]];
        cutlass::arch::ClusterBarrier::arrive(&smem.alpha_free[stage]);
      }
      rescale_output(tOrO, cO, alpha);
      clk.mark(kPhSoftmax);

      gemm_pv(smem, stage, wg, tOrO);
      // This warp's wgmmas on the stage are complete (gemm_pv waited): release it.
      __syncwarp();
      if (lane == 0) {
        RefillClock::release(stage);
        cutlass::arch::ClusterBarrier::arrive(&smem.k_empty[stage]);
      }
      clk.mark(kPhPV);
      clk.count_block();
    }
    write_piece(p, smem, tOrO, cO, st, rows, wg, tg, clk);
    clk.mark(kPhEpiLse);
  }
  clk.finish();
}

// The kernel is launched as a programmatic dependent of the previous op on the stream (the
// previous layer's combine, or the scheduler), so its CTAs may start while that op still runs.
// Every thread waits here for it to complete, and for its writes to be visible, before any read
// or write of the kernel's inputs and outputs (outputs too: XLA may give this call memory that
// the previous op still reads). Only L2 prefetches (prefetch_first_piece) come before; the wait
// returns at once after an ordinary launch.
// Then the combine grid may launch, once every CTA of this grid is past this point (not when the
// last one exits): its CTAs cannot share an SM with one of these (registers and shared memory
// are full), so they fill SMs as attention CTAs finish. Those of unsplit requests exit at once;
// the others wait in griddepcontrol.wait for this whole grid and its writes. The combine reads
// the metadata before that wait, so the trigger must come after this grid's own wait.
__device__ __forceinline__ void start_after_previous_grid() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

template <typename T, typename TmaK>
__global__ void __launch_bounds__(kDecodeThreads, 1)
    mla_decode_kernel(__grid_constant__ const DecodeParams p, __grid_constant__ const TmaK tma_k) {
  extern __shared__ __align__(1024) char smem_raw[];
  SharedStorage<T>& smem = *reinterpret_cast<SharedStorage<T>*>(smem_raw);

  const int row_block = blockIdx.x;
  const int kv_head = blockIdx.y;
  const int part = blockIdx.z;
  const int wg = threadIdx.x / kWarpgroupThreads;
  constexpr int kProducerWarpgroup = kNumWarpgroups;
  constexpr int kProducerThread = kProducerWarpgroup * kWarpgroupThreads;

  if (threadIdx.x == kProducerThread) {
    cute::prefetch_tma_descriptor(tma_k.get_tma_descriptor());
    for (int s = 0; s < kKStages; ++s) {
      cutlass::arch::ClusterTransactionBarrier::init(&smem.k_full[s][0], 1);
      cutlass::arch::ClusterTransactionBarrier::init(&smem.k_full[s][1], 1);
      cutlass::arch::ClusterBarrier::init(&smem.k_empty[s], kConsumerWarps);
      cutlass::arch::ClusterBarrier::init(&smem.p_full[s], kWarpgroupThreads);
      cutlass::arch::ClusterBarrier::init(&smem.alpha_free[s], kWarpgroupThreads);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  if (wg == kProducerWarpgroup) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    // One thread of a warp that issues no copies: its prefetches overlap the wait for the
    // previous kernel (when this grid launched early) and hold back no one's first load.
    if (threadIdx.x == kProducerThread + 32) prefetch_first_piece<T>(p, part, kv_head, row_block);
    start_after_previous_grid();
    const Partition pt = read_partition(p, part);
    // Where any request is split, the combine reads partial outputs back from L2: K blocks go
    // first out of L2 so that they do not push those out (evict-normal measured P8 +8%, P10 +5%,
    // and P2, P3, P7 +1% even with split requests alone evict-first). Where none is split, the
    // default policy measured faster (P1 -1.7%, P4 level to -1%; benchmarks/NOTES.md, attempt 48).
    const bool any_split = p.num_splits[p.batch] != p.batch;
    const auto hint = any_split ? TMA::CacheHintSm90::EVICT_FIRST : TMA::CacheHintSm90::EVICT_NORMAL;
    // K blocks issued: stage = issued % kKStages. A stage's k_empty completes a phase per
    // release; waiting on the parity before the current one passes at once on a fresh barrier,
    // so the first kKStages blocks go out without waiting.
    int issued = 0;
    RefillClock rclk;
    for (int req = pt.first_req; req <= pt.last_req; ++req) {
      const Piece pc = make_piece(p, pt, req);
      const int* pages = p.block_table + int64_t(req) * p.max_blocks;
      const bool skip =
          piece_has_bad_page(p, pages, pc, threadIdx.x - kProducerThread, kWarpgroupThreads, kBarProducerPiece);
      if (!skip && threadIdx.x == kProducerThread) {
        for (int n = pc.begin; n < pc.n_end; ++n, ++issued) {
          const int stage = issued % kKStages;
          const int page = pages[n];  // read before the wait, which hides its latency
          cutlass::arch::ClusterBarrier::wait(&smem.k_empty[stage], ((issued / kKStages) & 1) ^ 1);
          rclk.woke(stage, issued);
          issue_k_block(tma_k, p, smem, stage, page, kv_head, hint);
          rclk.issue_done(issued);
        }
      }
      // Probe builds only (a no-op otherwise): the second warp's lane 0 times the landings.
      if (!skip && threadIdx.x == kProducerThread + 32) rclk.watch(smem.k_full, pc.n_end - pc.begin);
      __syncwarp();
    }
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
  start_after_previous_grid();
  run_consumer(p, smem, row_block, kv_head, part, wg);
}

}  // namespace jax_flashmla::decode
