// Shared-memory layouts, tensor-core tiles and the shared-storage struct of the decode kernel.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "config.h"

namespace jax_flashmla::decode {

using namespace cute;

// This thread's index within its warpgroup, as an int. Every CuTe thread slice is taken at it:
// CuTe's coordinates take the signedness of that index, and the causal mask compares them with
// limits that can be negative (softmax.cuh's mask_invisible).
__device__ __forceinline__ int thread_in_warpgroup() { return int(threadIdx.x % kWarpgroupThreads); }

template <typename T>
struct KernelTraits {
  static_assert(sizeof(T) == 2, "the kernels take bf16 or fp16");
  using Element = T;

  // 128-byte swizzled atoms: one atom row is kHeadDimTile 16-bit values, the width of a TMA box,
  // so a TMA box lands in exactly the layout wgmma reads, without bank conflicts.
  using AtomK = GMMA::Layout_K_SW128_Atom<T>;    // [8 rows, 64 channels], channels contiguous
  using AtomMN = GMMA::Layout_MN_SW128_Atom<T>;  // [64 channels, 8 rows], channels contiguous

  // Q tile [kBlockM rows, kHeadDim]: every 64-channel column tile is one contiguous 8 KiB chunk.
  using SmemLayoutQ = decltype(tile_to_shape(AtomK{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  // K block [kBlockN tokens, kHeadDim], the same arrangement: column tile t is TMA box t.
  using SmemLayoutK = decltype(tile_to_shape(AtomK{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  // One TMA box: [kBlockN tokens, kHeadDimTile channels].
  using SmemLayoutKTile = decltype(tile_to_shape(AtomK{}, Shape<Int<kBlockN>, Int<kHeadDimTile>>{}));
  // V^T [kHeadDimV, kBlockN] over the same bytes as the K block (V is the first kHeadDimV
  // channels of K). Row-blocks of 8 tokens vary fastest, then 64-channel tiles: exactly the
  // offsets of SmemLayoutK, so V is never loaded or copied separately.
  using SmemLayoutVt =
      decltype(tile_to_shape(AtomMN{}, Shape<Int<kHeadDimV>, Int<kBlockN>>{}, Step<_2, _1>{}));
  // P [kBlockM rows, kBlockN keys], the A operand of PV, over the block's RoPE tile (the same
  // [64, 64] swizzled arrangement as a K column tile).
  using SmemLayoutP = decltype(tile_to_shape(AtomK{}, Shape<Int<kBlockM>, Int<kBlockN>>{}));

  // S = Q K^T of a whole block: warpgroup 0, [kBlockM, kBlockN] fp32 accumulators.
  using TiledMmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<T, T, float, Shape<Int<kBlockM>, Int<kBlockN>, Int<kHeadDimTile>>,
                           GMMA::Major::K, GMMA::Major::K>()));
  // O half += P V_half: one warpgroup, [kBlockM, kHalfDimV] fp32 accumulators; V is
  // channel-contiguous (MN-major), which wgmma reads through its transpose mode.
  using TiledMmaO = decltype(make_tiled_mma(
      GMMA::ss_op_selector<T, T, float, Shape<Int<kBlockM>, Int<kHalfDimV>, Int<kBlockN>>,
                           GMMA::Major::K, GMMA::Major::MN>()));

  static constexpr int kTileElems = kBlockN * kHeadDimTile;
  static constexpr int kTileBytes = kTileElems * int(sizeof(T));
  static constexpr int kBlockBytes = kNumKTiles * kTileBytes;
};

template <typename T>
struct SharedStorage {
  using Traits = KernelTraits<T>;
  // 1024-byte alignment: the period of the 128-byte swizzle, which TMA and wgmma both assume.
  alignas(1024) T q[cosize_v<typename Traits::SmemLayoutQ>];
  alignas(1024) T k[kKStages][cosize_v<typename Traits::SmemLayoutK>];
  // Factor O must be rescaled by before the PV of the block in stage s: [kKStages][kBlockM],
  // written by warpgroup 0 with P, read by warpgroup 1 (per stage: warpgroup 0 rewrites a
  // stage's factors only after the stage was released, i.e. after warpgroup 1 read them).
  float row_alpha[kKStages][kBlockM];
  // Row sums for the epilogue: [kBlockM], written by warpgroup 0 (the one that computes P), read
  // by both.
  float row_sum[kBlockM];
  // Two transaction barriers per K stage, [stage][group]: group 0 completes when column tiles
  // [0, kQkFirstTiles) have landed, group 1 when the rest have (QK^T starts on group 0).
  alignas(8) uint64_t k_full[kKStages][2];
  // One barrier per K stage that the kConsumerWarps arrive on once their PV on it is done: the
  // producer refills the stage after it completes.
  alignas(8) uint64_t k_empty[kKStages];
  // One barrier per K stage that warpgroup 0's threads arrive on once P, the rescale factors and
  // the zeroed V tail of the stage's block are in shared memory; warpgroup 1 waits on it (its
  // phase per use is that of k_full). An mbarrier rather than a named barrier: warpgroup 0 never
  // waits, and the two sides are different code.
  alignas(8) uint64_t p_full[kKStages];
  // One barrier per K stage that warpgroup 1's threads arrive on once they have read the stage's
  // rescale factors; warpgroup 0 waits on the previous phase before writing the next ones.
  alignas(8) uint64_t alpha_free[kKStages];
};

// Named barriers (ids above CUTLASS's reserved ones); each is used by the kConsumerThreads,
// except kBarProducerPiece (the producer warpgroup's threads alone).
enum NamedBarrierId : uint32_t {
  kBarRowSum = 0,  // warpgroup 0's row sums are in shared memory
  kBarQ,       // the Q tile is in shared memory
  kBarPiece,   // a piece starts: its page ids are checked, the previous piece is done
  kBarProducerPiece,  // the producer's own check of a piece's page ids
};

}  // namespace jax_flashmla::decode
