// The split-KV MLA decode kernel: one CTA per (row block, KV head, partition) walks the pieces
// of its partition (scheduler/mla_metadata.h) block by block.
//
// Warp specialised. One thread of the producer warpgroup issues the TMA copies of every K block
// into one of kKStages stages, once the consumers have released it (k_empty). Per 64-token
// block, both consumer warpgroups:
//   1. S_half = Q K_half^T      (wgmma; warpgroup w takes keys [32w, 32w + 32) of the block),
//      once the block has landed (k_full)
//   2. scale to base 2, mask by replacement, block row max -> shared memory      | kBarRowMax
//   3. reference max from both halves, P = exp2(S - m), rescale O when the reference moved,
//      P -> shared memory, zero V rows past the length in the last block       | kBarP
//   4. O_half += P V_half        (wgmma; warpgroup w owns channels [256w, 256w + 256)), then
//      release the stage (k_empty)
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

template <typename T, typename TmaK>
__global__ void __launch_bounds__(kDecodeThreads, 1)
    mla_decode_kernel(__grid_constant__ const DecodeParams p, __grid_constant__ const TmaK tma_k) {
  using Traits = KernelTraits<T>;
  extern __shared__ __align__(1024) char smem_raw[];
  SharedStorage<T>& smem = *reinterpret_cast<SharedStorage<T>*>(smem_raw);

  const int row_block = blockIdx.x;
  const int kv_head = blockIdx.y;
  const int part = blockIdx.z;
  const int wg = threadIdx.x / kWarpgroupThreads;
  const int lane = threadIdx.x % 32;
  constexpr int kProducerWarpgroup = kNumWarpgroups;
  constexpr int kProducerThread = kProducerWarpgroup * kWarpgroupThreads;

  if (threadIdx.x == kProducerThread) {
    cute::prefetch_tma_descriptor(tma_k.get_tma_descriptor());
    for (int s = 0; s < kKStages; ++s) {
      cutlass::arch::ClusterTransactionBarrier::init(&smem.k_full[s], 1);
      cutlass::arch::ClusterBarrier::init(&smem.k_empty[s], kConsumerWarps);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  if (wg == kProducerWarpgroup) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    const Partition pt = read_partition(p, part);
    // K blocks issued: stage = issued % kKStages. A stage's k_empty completes a phase per
    // release; waiting on the parity before the current one passes at once on a fresh barrier,
    // so the first kKStages blocks go out without waiting.
    int issued = 0;
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
          issue_k_block(tma_k, p, smem, stage, page, kv_head);
        }
      }
      __syncwarp();
    }
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
  const Partition pt = read_partition(p, part);
  typename Traits::TiledMmaS mma_s;
  typename Traits::TiledMmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(threadIdx.x % kWarpgroupThreads);
  auto thr_o = mma_o.get_thread_slice(threadIdx.x % kWarpgroupThreads);
  // (row, column) of every accumulator element this thread holds.
  Tensor cS = thr_s.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHalfBlockN>>{}));
  Tensor cO = thr_o.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHalfDimV>>{}));
  Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kHalfBlockN>>{});
  Tensor tOrO = partition_fragment_C(mma_o, Shape<Int<kBlockM>, Int<kHalfDimV>>{});
  Tensor sP = make_tensor(make_smem_ptr(smem.p), typename Traits::SmemLayoutP{});

  int rows[kRowsPerThread];  // the two tile rows this thread holds, in S and in O alike
  CUTE_UNROLL
  for (int i = 0; i < size(cS); ++i) rows[row_slot(get<0>(cS(i)))] = get<0>(cS(i));

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
    if (pc.begin < pc.n_end) load_q(p, smem, req, kv_head, row_block);

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
#ifdef JAX_FLASHMLA_PHASE_CLOCKS
      // gemm_qk waits again on the same phase, which then returns at once.
      cutlass::arch::ClusterTransactionBarrier::wait(&smem.k_full[stage], (loaded / kKStages) & 1);
      clk.mark(kPhKWait);
#endif
      gemm_qk(smem, stage, (loaded / kKStages) & 1, wg, tSrS);
      clk.mark(kPhQK);

      const int key0 = n * kBlockN + wg * kHalfBlockN;
      scale_and_mask(tSrS, cS, p.scale_log2, (n + 1) * kBlockN > min_limit, key0, limit);
      float mx[kRowsPerThread];
      block_row_max(tSrS, cS, mx);
      if (lane % 4 == 0)
        for (int r = 0; r < kRowsPerThread; ++r) smem.row_max[wg][rows[r]] = mx[r];
      cutlass::arch::NamedBarrier::arrive_and_wait(kConsumerThreads, kBarRowMax);
      clk.mark(kPhRowMax);

      float mx0[kRowsPerThread], mx1[kRowsPerThread], alpha[kRowsPerThread];
      for (int r = 0; r < kRowsPerThread; ++r) {
        mx0[r] = smem.row_max[0][rows[r]];
        mx1[r] = smem.row_max[1][rows[r]];
      }
      softmax_update(tSrS, cS, st, mx0, mx1, alpha);
      rescale_output(tOrO, cO, alpha);
      // P is rounded to the input dtype here, before PV (as the pure-JAX path does).
      CUTE_UNROLL
      for (int i = 0; i < size(tSrS); ++i) sP(get<0>(cS(i)), wg * kHalfBlockN + get<1>(cS(i))) = T(tSrS(i));
      if (n == pc.kv_blocks - 1 && seqlen % kBlockN != 0) zero_tail_v(smem, stage, wg, seqlen % kBlockN);
      cutlass::arch::fence_view_async_shared();  // generic-proxy writes, read by wgmma
      cutlass::arch::NamedBarrier::arrive_and_wait(kConsumerThreads, kBarP);
      clk.mark(kPhSoftmax);

      gemm_pv(smem, stage, wg, tOrO);
      // This warp's wgmmas on the stage are complete (gemm_pv waited): release it.
      __syncwarp();
      if (lane == 0) cutlass::arch::ClusterBarrier::arrive(&smem.k_empty[stage]);
      clk.mark(kPhPV);
      clk.count_block();
    }
    write_piece(p, smem, tOrO, cO, st, rows, wg, tg);
    clk.mark(kPhEpilogue);
  }
}

}  // namespace jax_flashmla::decode
