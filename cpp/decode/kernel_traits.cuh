// Shared-memory layouts, tensor-core tiles and the shared-storage struct of the decode kernel.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "config.h"

namespace jax_flashmla::decode {

using namespace cute;

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
  // P [kBlockM rows, kBlockN keys], the A operand of PV; each warpgroup writes its 32 keys.
  using SmemLayoutP = decltype(tile_to_shape(AtomK{}, Shape<Int<kBlockM>, Int<kBlockN>>{}));

  // S half = Q K_half^T: one warpgroup, [kBlockM, kHalfBlockN] fp32 accumulators.
  using TiledMmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<T, T, float, Shape<Int<kBlockM>, Int<kHalfBlockN>, Int<kHeadDimTile>>,
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
  alignas(1024) T p[cosize_v<typename Traits::SmemLayoutP>];
  // Per-warpgroup row maxima and row sums, exchanged so that both halves rescale identically.
  float row_max[kNumWarpgroups][kBlockM];
  float row_sum[kNumWarpgroups][kBlockM];
  // One transaction barrier per K stage: it completes when all kNumKTiles boxes have landed.
  alignas(8) uint64_t k_full[kKStages];
  // One barrier per K stage that the kConsumerWarps arrive on once their PV on it is done: the
  // producer refills the stage after it completes.
  alignas(8) uint64_t k_empty[kKStages];
};

// Named barriers (ids above CUTLASS's reserved ones); each is used by the kConsumerThreads,
// except kBarProducerPiece (the producer warpgroup's threads alone).
enum NamedBarrierId : uint32_t {
  kBarRowMax = 0,  // both warpgroups' block row maxima are in shared memory
  kBarP = 1,       // both halves of P (and zeroed tail rows of V) are in shared memory
  kBarRowSum = 2,  // both warpgroups' row sums are in shared memory
  kBarQ = 3,       // the Q tile is in shared memory
  kBarPiece = 4,   // a piece starts: its page ids are checked, the previous piece is done
  kBarProducerPiece = 5,  // the producer's own check of a piece's page ids
};

}  // namespace jax_flashmla::decode
