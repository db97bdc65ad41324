// Data movement and tensor-core work of the decode kernel: the Q tile (cp.async), K blocks
// (TMA through the block table), L2 prefetches of a partition's first loads, QK^T and PV (wgmma).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/memory_sm80.h>

#include "decode/decode_params.h"
#include "decode/kernel_traits.cuh"
#include "scheduler/mla_metadata.h"

namespace jax_flashmla::decode {

// Packed row r of KV head h is token r / heads_per_kv of query head h * heads_per_kv +
// r % heads_per_kv (s_q-major, then heads).
struct PackedRow {
  int token;
  int head;
};
__device__ __forceinline__ PackedRow unpack_row(const DecodeParams& p, int kv_head, int row) {
  return {row / p.heads_per_kv, kv_head * p.heads_per_kv + row % p.heads_per_kv};
}

// Loads the Q tile of (request, KV head, row block) into shared memory; rows past `rows` are
// zero so that their (never written) results stay finite. All consumer threads; ends with the
// tile visible to wgmma.
template <typename T>
__device__ void load_q(const DecodeParams& p, SharedStorage<T>& smem, int req, int kv_head, int row_block) {
  using Traits = KernelTraits<T>;
  constexpr int kChunkElems = 16 / int(sizeof(T));  // one 16-byte cp.async
  constexpr int kChunksPerRow = kHeadDim / kChunkElems;
  Tensor sQ = make_tensor(make_smem_ptr(smem.q), typename Traits::SmemLayoutQ{});
  const T* q = static_cast<const T*>(p.q) + int64_t(req) * p.s_q * p.h_q * kHeadDim;
  for (int idx = threadIdx.x; idx < kBlockM * kChunksPerRow; idx += kConsumerThreads) {
    const int r = idx / kChunksPerRow;
    const int c = (idx % kChunksPerRow) * kChunkElems;
    const int row = row_block * kBlockM + r;
    const bool valid = row < p.rows;
    const PackedRow pr = unpack_row(p, kv_head, valid ? row : 0);
    const T* src = q + (int64_t(pr.token) * p.h_q + pr.head) * kHeadDim + c;
    // The 128-byte swizzle permutes 16-byte chunks, so a chunk stays contiguous in shared memory.
    cutlass::arch::cp_async_zfill<16>(&sQ(r, c), src, valid);
  }
  cutlass::arch::cp_async_wait<0>();
  // cp.async writes through the generic proxy; wgmma reads through the async proxy.
  cutlass::arch::fence_view_async_shared();
  cutlass::arch::NamedBarrier::arrive_and_wait(kConsumerThreads, kBarQ);
}

// Asks L2 to fetch [ptr, ptr + bytes) (16-byte aligned, a multiple of 16 bytes). A hint: it
// changes no memory, completes on its own and is never waited for.
__device__ __forceinline__ void prefetch_l2(const void* ptr, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(ptr), "r"(bytes) : "memory");
}

// Before griddepcontrol.wait (one thread): L2 prefetches of the Q rows and the first kKStages
// K blocks of the partition's first piece, so that the kernel's first loads, issued by every CTA
// at once, hit L2 instead of queueing for DRAM (measured P10 -1.2%, P7 -1.6%, 30 steps). The
// kernel is a programmatic dependent of the previous op on the stream (the previous layer's
// combine), so the metadata, lengths and block table read here may still be in the making: they
// are read through L2 only (ld.global.cg, so no stale line stays in L1 for the reads after the
// wait), and every index is clamped, so a stale value only prefetches the wrong bytes of the
// right buffers.
template <typename T>
__device__ void prefetch_first_piece(const DecodeParams& p, int part, int kv_head, int row_block) {
  constexpr uint32_t kRowBytes = kHeadDim * sizeof(T);
  // Where no request is split, every partition holds whole requests and the CTAs end together:
  // the next grid's CTAs find no SM early, and the prefetches would only queue ahead of their own
  // copies in the copy engine (measured P4 +2.7%; benchmarks/NOTES.md, attempt 51).
  if (__ldcg(p.num_splits + p.batch) == p.batch) return;
  const int* meta = p.metadata + int64_t(part) * kMetadataCols;
  const int req = __ldcg(meta + kFirstReq);
  if (req < 0 || req >= p.batch) return;  // an empty partition (or a value not yet written)
  const int row_begin = row_block * kBlockM;
  const int row_end = min(row_begin + kBlockM, p.rows);
  const T* q = static_cast<const T*>(p.q) + int64_t(req) * p.s_q * p.h_q * kHeadDim;
  if (p.h_kv == 1) {  // packed rows are q's rows: one contiguous range
    prefetch_l2(q + int64_t(row_begin) * kHeadDim, uint32_t(row_end - row_begin) * kRowBytes);
  } else {  // a token's heads of this KV head are contiguous: one range from each token's first row
    for (int t = row_begin / p.heads_per_kv; t <= (row_end - 1) / p.heads_per_kv; ++t) {
      const PackedRow pr = unpack_row(p, kv_head, t * p.heads_per_kv);
      prefetch_l2(q + (int64_t(pr.token) * p.h_q + pr.head) * kHeadDim, p.heads_per_kv * kRowBytes);
    }
  }
  const int first_block = max(__ldcg(meta + kFirstBlock), 0);
  const int seqlen = __ldcg(p.cache_seqlens + req);
  const int* pages = p.block_table + int64_t(req) * p.max_blocks;
  const T* k = static_cast<const T*>(p.k_cache);
  for (int n = first_block; n < first_block + kKStages && n < p.max_blocks && int64_t(n) * kBlockN < seqlen; ++n) {
    const int page = __ldcg(pages + n);
    if (page < 0 || page >= p.num_pages) continue;
    const T* page_k = k + (int64_t(page) * kPageBlockSize * p.h_kv + kv_head) * kHeadDim;
    if (p.h_kv == 1) {
      prefetch_l2(page_k, kPageBlockSize * kRowBytes);
    } else {
      for (int t = 0; t < kPageBlockSize; ++t) prefetch_l2(page_k + int64_t(t) * p.h_kv * kHeadDim, kRowBytes);
    }
  }
}

// Issues the kNumKTiles TMA copies of one K block (one page) into `stage`, the first
// kQkFirstTiles counted by k_full[stage][0], the rest by k_full[stage][1], all with the L2 policy
// `hint` (the caller's: it depends on whether the combine reads partials back). One thread (of the
// producer warpgroup: the TMA unit takes ~80-90 cycles to accept each 64x64 box and the issuing
// warp stalls meanwhile, ~800 cycles a block that a consumer warp would add to every block;
// benchmarks/probes/phase_probe.cu).
template <typename T, typename TmaK>
__device__ void issue_k_block(const TmaK& tma_k, const DecodeParams& p, SharedStorage<T>& smem, int stage,
                              int page, int kv_head, TMA::CacheHintSm90 hint) {
  using Traits = KernelTraits<T>;
  Tensor mK = tma_k.get_tma_tensor(make_shape(Int<kPageBlockSize>{}, Int<kHeadDim>{}, p.h_kv, p.num_pages));
  Tensor gK = mK(_, _, kv_head, page);  // [kPageBlockSize, kHeadDim] coordinates
  auto cta_tma = tma_k.get_slice(_0{});
  CUTE_UNROLL
  for (int group = 0; group < 2; ++group) {
    uint64_t& bar = smem.k_full[stage][group];
    const int first = group == 0 ? 0 : kQkFirstTiles;
    const int last = group == 0 ? kQkFirstTiles : kNumKTiles;
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&bar, (last - first) * Traits::kTileBytes);
    CUTE_UNROLL
    for (int t = first; t < last; ++t) {
      Tensor gTile = local_tile(gK, Shape<Int<kBlockN>, Int<kHeadDimTile>>{}, make_coord(_0{}, t));
      Tensor sTile = make_tensor(make_smem_ptr(smem.k[stage] + t * Traits::kTileElems),
                                 typename Traits::SmemLayoutKTile{});
      copy(tma_k.with(bar, 0, hint), cta_tma.partition_S(gTile),
           cta_tma.partition_D(sTile));
    }
  }
}

// P [kBlockM, kBlockN] of the block in `stage`, over the stage's RoPE tile: warpgroup 0 writes
// it once its QK^T (the tile's only reader) is done, both PVs read it.
template <typename T>
__device__ __forceinline__ auto p_tile(SharedStorage<T>& smem, int stage) {
  using Traits = KernelTraits<T>;
  return make_tensor(make_smem_ptr(smem.k[stage] + kRopeTile * Traits::kTileElems), typename Traits::SmemLayoutP{});
}

// S [kBlockM, kBlockN] = Q K^T for the block in `stage` (warpgroup 0), in two wgmma batches, one
// per landing group: the first starts once its kQkFirstTiles column tiles have landed, the
// second after a wait on the rest. Two batches, each opened by its own wgmma.fence: a barrier wait
// inside one batch makes ptxas fence the chain itself (C7519, "warpgroup.arrive injected").
template <typename T, typename FragS>
__device__ void gemm_qk(SharedStorage<T>& smem, int stage, int phase, FragS& tSrS) {
  using Traits = KernelTraits<T>;
  typename Traits::TiledMmaS mma;
  auto thr = mma.get_thread_slice(thread_in_warpgroup());
  Tensor sQ = make_tensor(make_smem_ptr(smem.q), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem.k[stage]), typename Traits::SmemLayoutK{});
  Tensor tSrQ = thr.partition_fragment_A(sQ);  // (MMA, MMA_M, kHeadDim / 16)
  Tensor tSrK = thr.partition_fragment_B(sK);  // (MMA, MMA_N, kHeadDim / 16)

  // wgmma k-steps per column tile, from the fragment's K extent rather than restating wgmma's K.
  constexpr int kSteps = decltype(size<2>(tSrQ))::value;
  constexpr int kStepsPerTile = kSteps / kNumKTiles;
  static_assert(kStepsPerTile * kNumKTiles == kSteps, "whole column tiles per landing group");
  cutlass::arch::ClusterTransactionBarrier::wait(&smem.k_full[stage][0], phase);
  warpgroup_fence_operand(tSrS);
  warpgroup_arrive();
  mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int kb = 0; kb < kQkFirstTiles * kStepsPerTile; ++kb) {
    cute::gemm(mma, tSrQ(_, _, kb), tSrK(_, _, kb), tSrS);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  cutlass::arch::ClusterTransactionBarrier::wait(&smem.k_full[stage][1], phase);
  warpgroup_arrive();
  CUTE_UNROLL
  for (int kb = kQkFirstTiles * kStepsPerTile; kb < kSteps; ++kb)
    cute::gemm(mma, tSrQ(_, _, kb), tSrK(_, _, kb), tSrS);
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  warpgroup_fence_operand(tSrS);
}

// O_half [kBlockM, kHalfDimV] += P V[:, wg half of the channels] for the block in `stage`, P
// read from the stage's RoPE tile.
template <typename T, typename FragO>
__device__ void gemm_pv(SharedStorage<T>& smem, int stage, int wg, FragO& tOrO) {
  using Traits = KernelTraits<T>;
  typename Traits::TiledMmaO mma;
  auto thr = mma.get_thread_slice(thread_in_warpgroup());
  Tensor sP = p_tile(smem, stage);
  Tensor sVt = make_tensor(make_smem_ptr(smem.k[stage]), typename Traits::SmemLayoutVt{});
  Tensor sVtHalf = local_tile(sVt, Shape<Int<kHalfDimV>, Int<kBlockN>>{}, make_coord(wg, _0{}));
  Tensor tOrP = thr.partition_fragment_A(sP);
  Tensor tOrV = thr.partition_fragment_B(sVtHalf);

  warpgroup_fence_operand(tOrO);
  warpgroup_arrive();
  mma.accumulate_ = GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(tOrP); ++kb) cute::gemm(mma, tOrP(_, _, kb), tOrV(_, _, kb), tOrO);
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  warpgroup_fence_operand(tOrO);
}

// Zeroes tokens [valid, kBlockN) of every V channel in `stage`. Those cache slots may hold NaN,
// and P = 0 there does not help: 0 * NaN = NaN. One warpgroup (warpgroup 0, after its QK^T,
// which read those rows); the caller fences and synchronises before PV.
template <typename T>
__device__ void zero_tail_v(SharedStorage<T>& smem, int stage, int valid) {
  using Traits = KernelTraits<T>;
  constexpr int kChunkElems = 16 / int(sizeof(T));
  constexpr int kChunksPerRow = kHeadDimV / kChunkElems;
  Tensor sK = make_tensor(make_smem_ptr(smem.k[stage]), typename Traits::SmemLayoutK{});
  const int tid = thread_in_warpgroup();
  for (int idx = tid; idx < (kBlockN - valid) * kChunksPerRow; idx += kWarpgroupThreads) {
    const int token = valid + idx / kChunksPerRow;
    const int channel = (idx % kChunksPerRow) * kChunkElems;
    *reinterpret_cast<uint4*>(&sK(token, channel)) = make_uint4(0, 0, 0, 0);
  }
}

}  // namespace jax_flashmla::decode
