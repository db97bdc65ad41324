// The split-KV MLA decode kernel: one CTA per (row block, KV head, partition) walks the pieces
// of its partition (scheduler/mla_metadata.h) block by block.
//
// Per 64-token block, both warpgroups:
//   1. once both are past the previous block's PV, the stage that block used is free | kBarStageFree
//   2. S_half = Q K_half^T      (wgmma; warpgroup w takes keys [32w, 32w + 32) of the block);
//      while it runs, thread 0 issues the TMA copies of the next block into the free stage
//   3. scale to base 2, mask by replacement, block row max -> shared memory      | kBarRowMax
//   4. reference max from both halves, P = exp2(S - m), rescale O when the reference moved,
//      P -> shared memory, zero V rows past the length in the last block       | kBarP
//   5. O_half += P V_half        (wgmma; warpgroup w owns channels [256w, 256w + 256))
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "config.h"
#include "decode/decode_params.h"
#include "decode/epilogue.cuh"
#include "decode/kernel_traits.cuh"
#include "decode/mainloop.cuh"
#include "decode/phase_clocks.cuh"
#include "decode/softmax.cuh"
#include "scheduler/mla_metadata.h"

namespace jax_flashmla::decode {

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

  if (threadIdx.x == 0) {
    cute::prefetch_tma_descriptor(tma_k.get_tma_descriptor());
    for (int s = 0; s < kKStages; ++s) cutlass::arch::ClusterTransactionBarrier::init(&smem.k_full[s], 1);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  const int* meta = p.metadata + int64_t(part) * kMetadataCols;
  const int first_req = meta[kFirstReq];
  const int first_block = meta[kFirstBlock];
  const int last_req = meta[kLastReq];
  const int last_block_end = meta[kLastBlockEnd];
  const int first_slot = meta[kFirstSlot];

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

  // K blocks this CTA has consumed: stage = loaded % kKStages, and the barrier parity of that
  // stage's next use is (loaded / kKStages) & 1.
  int loaded = 0;
  PhaseClock clk;
  clk.start();
  for (int req = first_req, slot = first_slot; req <= last_req; ++req, ++slot) {
    const int seqlen = p.cache_seqlens[req];
    const bool bad_len = seqlen < 0 || int64_t(seqlen) > int64_t(p.max_blocks) * kBlockN;
    // Blocks the scheduler counted (never 0) and blocks that actually hold tokens.
    const int kv_blocks = bad_len ? 0 : seqlen / kBlockN + (seqlen % kBlockN != 0);
    const int begin = req == first_req ? first_block : 0;
    const int end = req == last_req ? last_block_end : max(kv_blocks, 1);
    const int n_end = min(end, kv_blocks);
    const PieceTarget tg{req, kv_head, row_block, p.num_splits[req + 1] - p.num_splits[req] > 1, slot};
    const int* pages = p.block_table + int64_t(req) * p.max_blocks;

    __syncthreads();  // the previous piece is done with Q, both K stages and the row arrays
    bool bad_page = false;
    for (int n = begin + int(threadIdx.x); n < n_end; n += kDecodeThreads)
      bad_page |= pages[n] < 0 || pages[n] >= p.num_pages;
    if (__syncthreads_or(bad_page) || bad_len) {
      write_nan_piece<T>(p, tg);
      clk.mark(kPhPieceStart);
      continue;
    }

    if (begin < n_end) {
      // Both stages are free (the barrier above): fill both before the synchronous Q load.
      if (threadIdx.x == 0) {
        issue_k_block(tma_k, p, smem, loaded % kKStages, pages[begin], kv_head);
        if (begin + 1 < n_end) issue_k_block(tma_k, p, smem, (loaded + 1) % kKStages, pages[begin + 1], kv_head);
      }
      load_q(p, smem, req, kv_head, row_block);
    }

    // Bottom-right causal limit of each of this thread's rows: token t sees keys < L - (s_q-1-t).
    int limit[kRowsPerThread];
    for (int r = 0; r < kRowsPerThread; ++r) {
      const int row = min(row_block * kBlockM + rows[r], p.rows - 1);  // padding rows: any limit
      limit[r] = p.causal ? seqlen - (p.s_q - 1 - row / p.heads_per_kv) : seqlen;
    }
    const int min_limit = p.causal ? seqlen - (p.s_q - 1) : seqlen;

    // Page of the next block to issue, read one block ahead by the issuing thread, so that its
    // global-memory latency is off the critical path.
    int next_page = threadIdx.x == 0 && begin + 2 < n_end ? pages[begin + 2] : 0;
    SoftmaxState st;
    st.reset();
    clear(tOrO);
    clk.mark(kPhPieceStart);
    for (int n = begin; n < n_end; ++n, ++loaded) {
      const int stage = loaded % kKStages;
      // The other stage held block n - 1. Refill it once both warpgroups are past that block's
      // PV: warp 0 waits for that, the other warps arrive and go on.
      const bool refill = n > begin && n + 1 < n_end;
      if (refill) {
        if (threadIdx.x < 32)
          cutlass::arch::NamedBarrier::sync(kDecodeThreads, kBarStageFree);
        else
          cutlass::arch::NamedBarrier::arrive(kDecodeThreads, kBarStageFree);
      }
      clk.mark(kPhStageFree);
      // The TMA unit accepts a 64x64 box every ~80 cycles, so issuing a block's 9 boxes holds the
      // issuing warp for ~700-900 cycles (benchmarks/probes/phase_probe.cu); before QK^T that
      // delayed its warpgroup and, through the row-max exchange, the other one. So once block n
      // has landed, the refill is issued behind QK^T's wgmmas and overlaps the tensor work; while
      // block n is still landing (loads are the limit), it is issued at once, as the warp
      // waits anyway and the memory gets the next block earlier.
      const int phase = (loaded / kKStages) & 1;
      const bool refill_now =
          refill && threadIdx.x == 0 && !cutlass::arch::ClusterBarrier::test_wait(&smem.k_full[stage], phase, 1);
      auto issue_refill = [&] {
        issue_k_block(tma_k, p, smem, (loaded + 1) % kKStages, next_page, kv_head);
        if (n + 2 < n_end) next_page = pages[n + 2];
      };
      if (refill_now) issue_refill();
      issue_qk(smem, stage, phase, wg, tSrS);
      if (refill && threadIdx.x == 0 && !refill_now) issue_refill();
      clk.mark(kPhIssue);
      wait_qk(tSrS);
      clk.mark(kPhQK);

      const int key0 = n * kBlockN + wg * kHalfBlockN;
      scale_and_mask(tSrS, cS, p.scale_log2, (n + 1) * kBlockN > min_limit, key0, limit);
      float mx[kRowsPerThread];
      block_row_max(tSrS, cS, mx);
      if (lane % 4 == 0)
        for (int r = 0; r < kRowsPerThread; ++r) smem.row_max[wg][rows[r]] = mx[r];
      cutlass::arch::NamedBarrier::arrive_and_wait(kDecodeThreads, kBarRowMax);
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
      if (n == kv_blocks - 1 && seqlen % kBlockN != 0) zero_tail_v(smem, stage, wg, seqlen % kBlockN);
      cutlass::arch::fence_view_async_shared();  // generic-proxy writes, read by wgmma
      cutlass::arch::NamedBarrier::arrive_and_wait(kDecodeThreads, kBarP);
      clk.mark(kPhSoftmax);

      gemm_pv(smem, stage, wg, tOrO);
      clk.mark(kPhPV);
      clk.count_block();
    }
    write_piece(p, smem, tOrO, cO, st, rows, wg, tg);
    clk.mark(kPhEpilogue);
  }
}

}  // namespace jax_flashmla::decode
