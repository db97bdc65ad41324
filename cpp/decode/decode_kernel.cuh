// The split-KV MLA decode kernel: one CTA per (row block, KV head, partition) walks the pieces
// of its partition (scheduler/mla_metadata.h) block by block.
//
// Per 64-token block, both warpgroups:
//   1. once both are past the previous block's PV, thread 0 issues the TMA copies of the next
//      block into the stage that block used                                    | kBarStageFree
//   2. S_half = Q K_half^T      (wgmma; warpgroup w takes keys [32w, 32w + 32) of the block)
//   3. scale to base 2, mask by replacement, block row max -> shared memory      | kBarRowMax
//   4. running max from both halves, P = exp2(S - m), rescale O, P -> shared memory,
//      zero V rows past the length in the last block                           | kBarP
//   5. O_half += P V_half        (wgmma; warpgroup w owns channels [256w, 256w + 256))
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "config.h"
#include "decode/decode_params.h"
#include "decode/epilogue.cuh"
#include "decode/kernel_traits.cuh"
#include "decode/mainloop.cuh"
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

    SoftmaxState st;
    st.reset();
    clear(tOrO);
    for (int n = begin; n < n_end; ++n, ++loaded) {
      const int stage = loaded % kKStages;
      if (n > begin && n + 1 < n_end) {
        // The other stage held block n - 1. Refill it as soon as both warpgroups are past that
        // block's PV, before this block's QK^T: when loads are slower than compute, this keeps a
        // block in flight at all times (issuing after QK^T left the memory idle for that long).
        // Only warp 0 waits; the others arrive and go on.
        if (threadIdx.x < 32)
          cutlass::arch::NamedBarrier::sync(kDecodeThreads, kBarStageFree);
        else
          cutlass::arch::NamedBarrier::arrive(kDecodeThreads, kBarStageFree);
        if (threadIdx.x == 0) issue_k_block(tma_k, p, smem, (loaded + 1) % kKStages, pages[n + 1], kv_head);
      }
      gemm_qk(smem, stage, (loaded / kKStages) & 1, wg, tSrS);

      const int key0 = n * kBlockN + wg * kHalfBlockN;
      scale_and_mask(tSrS, cS, p.scale_log2, (n + 1) * kBlockN > min_limit, key0, limit);
      float mx[kRowsPerThread];
      block_row_max(tSrS, cS, mx);
      if (lane % 4 == 0)
        for (int r = 0; r < kRowsPerThread; ++r) smem.row_max[wg][rows[r]] = mx[r];
      cutlass::arch::NamedBarrier::arrive_and_wait(kDecodeThreads, kBarRowMax);

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

      gemm_pv(smem, stage, wg, tOrO);
    }
    write_piece(p, smem, tOrO, cO, st, rows, wg, tg);
  }
}

}  // namespace jax_flashmla::decode
