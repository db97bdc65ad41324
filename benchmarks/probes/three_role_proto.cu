// Prototype (probe, not the library's kernel): the three-role block loop of benchmarks/NOTES.md
// (thirtieth session), to measure whether it beats today's loop before anyone integrates it.
//   warpgroup 0 (S, 160 registers): QK^T with kQRegTiles of Q's column tiles as RS A fragments
//     and the rest from shared memory, the online softmax, P into one of two P buffers;
//   warpgroups 1, 2 (PV, 160): O half += P V_half, the rescale;
//   warpgroup 3 (producer, 32): one thread copies K tile by tile into a ring of kRingTiles.
// A V tile's slot is freed by its PV warpgroup, the RoPE tile's by S after QK^T, so the ring
// keeps ~2.6 blocks in flight where today's two stages keep two. Two ring geometries (Ring<>):
// a slot per tile with N = 64 PV wgmmas, or V tiles in slots of two with N = 128 ones.
// Bounds (wrong output on purpose): -DPROTO_SKIP_SOFTMAX, -DPROTO_SKIP_PV, -DPROTO_NO_REFILL; -DPROTO_QK_ONE_BATCH
// waits for a block's nine tiles and then issues QK^T as one wgmma batch; -DPROTO_QK_FIRST hands
// P(b - 1) to the PV warpgroups only after QK^T(b) is issued (tensor-core queue order), with
// -DPROTO_PV_AFTER_QK only after QK^T(b) has finished. -DPROTO_DOUBLE_S: S keeps two score
// accumulators and issues the first PROTO_EARLY_TILES tiles of QK^T(b + 1) before softmax(b), the
// rest after handing P(b) over, so that the tensor cores have queued work while the softmax runs
// (FlashAttention-3's intra-warpgroup overlap; NOTES, thirty-second session). It needs 32 more
// registers in S, so fewer of Q's tiles in registers and a ring that shrinks to what fits.
// H100, 2026-12-07, single tiles: P4-like 274-277 us (4400 cycles a block), P6-like 970-983 us;
// V pairs: 271 us, 946-958 us. Slower than today's kernel, and no hand-over order helps; the
// bounds, a model of the period and the next steps are in benchmarks/NOTES.md (attempt 65,
// thirtieth and thirty-first sessions). -DPROTO_DOUBLE_S (thirty-third session): level with the
// prototype (P6-like 3969 against 3945 cycles a block), the tensor work stretching to fill the
// period; with refills and softmax removed both orders sit at ~3150-3250, as today's kernel does.
// The design is retired; the file stays as the record of what was measured.
// Work: every CTA one piece of `blocks` full 64-token blocks and 64 query rows, h_kv = 1; CTAs
// in groups of `share` read the same pages (P4: 2 row blocks a request, P6: 4). Output: the
// normalised O (bf16), checked against a float64 CPU reference on a small case, then timed on a
// P4-sized case (132 CTAs x 124 blocks, pairs: the work of P4's attention kernel).
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -Icpp \
//     -isystem <cutlass include> -o /tmp/three_role_proto benchmarks/probes/three_role_proto.cu
// (scripts/proto_check.sh builds and runs its variants on the device.)
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/memory_sm80.h>
#include <cutlass/arch/reg_reconfig.h>

#include "config.h"
#include "tma_probe.cuh"  // the driver's tensor-map encoder and the K map of the TMA probes
#include "decode/kernel_traits.cuh"
#include "decode/softmax.cuh"

using namespace cute;
using namespace jax_flashmla;
using namespace jax_flashmla::decode;

namespace proto {

#if defined(PROTO_PV_AFTER_QK) && !defined(PROTO_QK_FIRST)
#define PROTO_QK_FIRST  // the later hand-over moves the same arrive further
#endif

#if defined(PROTO_DOUBLE_S) && (defined(PROTO_QK_FIRST) || defined(PROTO_QK_ONE_BATCH))
#error "PROTO_DOUBLE_S has its own issue order"
#endif
#ifndef Q_REG_TILES
#ifdef PROTO_DOUBLE_S
#define Q_REG_TILES 4
#else
#define Q_REG_TILES 6
#endif
#endif
#ifndef PROTO_EARLY_TILES
#define PROTO_EARLY_TILES 3
#endif
// Q column tiles in S's registers. At 160 registers 5 and 6 compile without spills; 7 spills and
// serialises the wgmma chain (build with -DQ_REG_TILES=7 -Xptxas -v to see it).
constexpr int kQRegTiles = Q_REG_TILES;
constexpr int kQSmemTiles = kNumKTiles - kQRegTiles;
constexpr int kPBufs = 2;
// Tiles of QK^T(b + 1) issued before softmax(b) (PROTO_DOUBLE_S). Their slots held block b - 2's
// last tiles or b - 1's first, so with a ring of 21-23 tiles they have landed by then; later
// ones would wait for PV(b - 1)'s release and a refill.
constexpr int kEarlyTiles = PROTO_EARLY_TILES;
static_assert(kEarlyTiles > 0 && kEarlyTiles < kNumKTiles, "both issue groups non-empty");
#ifndef PROTO_S_REGS
#define PROTO_S_REGS 160
#endif
#ifndef PROTO_PROD_REGS
#define PROTO_PROD_REGS 32
#endif
#ifndef PROTO_PV_REGS
#define PROTO_PV_REGS 160
#endif
constexpr int kSRegs = PROTO_S_REGS, kPvRegs = PROTO_PV_REGS, kProdRegs = PROTO_PROD_REGS;
// 8 KiB K tiles the ring holds, either geometry: what the Q tiles in shared memory, the P buffers
// and ~2 KiB of row state and barriers leave of the 227 KiB (23 with 6 of Q's tiles in registers).
constexpr int kSmemLimit = 227 * 1024, kSmemSmall = 2048;
constexpr int kRingTiles = (kSmemLimit - kSmemSmall - (kQSmemTiles + kPBufs) * kHeadDimTile * kBlockN * 2) /
                           (kHeadDimTile * kBlockN * 2);
constexpr int kThreads = 4 * kWarpgroupThreads;
constexpr int kVTilesPerHalf = kHalfDimV / kHeadDimTile;
static_assert((kSRegs + 2 * kPvRegs + kProdRegs) * kWarpgroupThreads <= 65536, "register file");

using T = cutlass::bfloat16_t;
using Traits = KernelTraits<T>;

struct Smem {
  alignas(1024) T q[kQSmemTiles * Traits::kTileElems];
  alignas(1024) T ring[kRingTiles * Traits::kTileElems];
  alignas(1024) T p[kPBufs][kBlockM * kBlockN];
  float row_alpha[kPBufs][kBlockM];
  float row_sum[kBlockM];
  alignas(8) uint64_t full[kRingTiles];   // [Ring::kSlots] used
  alignas(8) uint64_t empty[kRingTiles];
  alignas(8) uint64_t p_full[kPBufs];
  alignas(8) uint64_t p_empty[kPBufs];
  alignas(8) uint64_t sum_full;
};

// Where tile t of a CTA's block b lives in the ring, and which slot's barriers count it.
// kPairs = false: one slot per tile, 23 slots. kPairs = true: V tiles in slots of two (so that a
// PV wgmma of N = 128 reads two channel tiles at the stride of SmemLayoutVt), 10 of them (9 with
// PROTO_DOUBLE_S), and the RoPE tile in a ring of its own, 3 slots.
template <bool kPairs>
struct Ring;
template <>
struct Ring<false> {
  static constexpr int kSlots = kRingTiles;
  static constexpr int kPvN = kHeadDimTile;  // PV wgmma N: one channel tile
  __device__ static int slot(int b, int t) { return (b * kNumKTiles + t) % kSlots; }
  __device__ static int use(int b, int t) { return (b * kNumKTiles + t) / kSlots; }
  __device__ static int first_tile(int slot) { return slot; }
  __device__ static int tile_in_slot(int) { return 0; }
  __device__ static int slot_tiles(int) { return 1; }
};
template <>
struct Ring<true> {
  static constexpr int kRopeSlots = 3, kPairSlots = (kRingTiles - kRopeSlots) / 2, kSlots = kPairSlots + kRopeSlots;
  static constexpr int kPairsPerBlock = kRopeTile / 2;
  static constexpr int kPvN = 2 * kHeadDimTile;
  static_assert(2 * kPairSlots + kRopeSlots <= kRingTiles, "no more shared memory than single slots");
  __device__ static int slot(int b, int t) {
    return t < kRopeTile ? (b * kPairsPerBlock + t / 2) % kPairSlots : kPairSlots + b % kRopeSlots;
  }
  __device__ static int use(int b, int t) {
    return t < kRopeTile ? (b * kPairsPerBlock + t / 2) / kPairSlots : b / kRopeSlots;
  }
  __device__ static int first_tile(int slot) { return slot < kPairSlots ? 2 * slot : slot + kPairSlots; }
  __device__ static int tile_in_slot(int t) { return t < kRopeTile ? t % 2 : 0; }
  __device__ static int slot_tiles(int slot) { return slot < kPairSlots ? 2 : 1; }
};

// -DPROTO_TIMELINE: SM clock stamps of CTA 0's roles at the phase edges of kTlBlocks blocks in
// the steady state, printed as offsets from S's block start (where each block's time goes, and
// which role waits for which). One thread per role stores them; nothing else changes.
enum TlEvent {
  kTlSStart,      // S: block b begins (before its tile waits)
  kTlSLanded,     // S: the last tile wait of b returned
  kTlSIssued,     // S: QK^T(b) committed
  kTlSDone,       // S: QK^T(b) finished (wgmma wait)
  kTlSSoftmax,    // S: row max and softmax done
  kTlSHanded,     // S: P(b) stored (and handed over, unless PROTO_QK_FIRST)
  kTlAWake,       // PV A: P(b) seen
  kTlAIssued,     // PV A: PV(b) committed
  kTlADone,       // PV A: PV(b) finished
  kTlBWake,       // PV B: the same three
  kTlBIssued,
  kTlBDone,
  kTlProdSlot,    // producer: b's first slot released to it
  kTlProdIssued,  // producer: b's last tile copy issued
  kTlEvents
};
constexpr int kTlFirst = 48, kTlBlocks = 64;
#ifdef PROTO_TIMELINE
__device__ long long g_timeline[kTlBlocks][kTlEvents];
#define TL(ev, b)                                                                     \
  do {                                                                                \
    if (blockIdx.x == 0 && tid == 0 && (b) >= kTlFirst && (b) < kTlFirst + kTlBlocks) \
      g_timeline[(b) - kTlFirst][ev] = clock64();                                     \
  } while (0)
#else
#define TL(ev, b) \
  do {            \
  } while (0)
#endif

template <bool kPairs>
__device__ __forceinline__ T* tile_ptr(Smem& s, int b, int t) {
  using R = Ring<kPairs>;
  return s.ring + (R::first_tile(R::slot(b, t)) + R::tile_in_slot(t)) * Traits::kTileElems;
}

__device__ __forceinline__ void tma_tile(const CUtensorMap* map, void* dst, uint64_t* bar, int c0, int page) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];" ::"r"(
          unsigned(__cvta_generic_to_shared(dst))),
      "l"(map), "r"(c0), "r"(0), "r"(page), "r"(unsigned(__cvta_generic_to_shared(bar)))
      : "memory");
}

// One elected lane of each warp arrives (barriers counted in warps).
__device__ __forceinline__ void warp_arrive(uint64_t* bar) {
  __syncwarp();
  if (threadIdx.x % 32 == 0) cutlass::arch::ClusterBarrier::arrive(bar);
}

template <bool kPairs>
__global__ void __launch_bounds__(kThreads, 1)
    three_roles(const __grid_constant__ CUtensorMap kmap, const T* q, const int* pages, T* out, int blocks, int share,
                float scale_log2) {
  extern __shared__ __align__(1024) char raw[];
  Smem& s = *reinterpret_cast<Smem*>(raw);
  const int wg = threadIdx.x / kWarpgroupThreads;
  const int tid = thread_in_warpgroup();
  const int* my_pages = pages + int64_t(blockIdx.x / share) * blocks;
  const T* my_q = q + int64_t(blockIdx.x) * kBlockM * kHeadDim;
  using R = Ring<kPairs>;

  if (threadIdx.x == 0) {
    for (int i = 0; i < R::kSlots; ++i) {
      cutlass::arch::ClusterTransactionBarrier::init(&s.full[i], 1);
      cutlass::arch::ClusterBarrier::init(&s.empty[i], 4);  // the 4 warps of the releasing warpgroup
    }
    for (int b = 0; b < kPBufs; ++b) {
      cutlass::arch::ClusterBarrier::init(&s.p_full[b], kWarpgroupThreads);
      cutlass::arch::ClusterBarrier::init(&s.p_empty[b], 8);  // the warps of both PV warpgroups
    }
    cutlass::arch::ClusterBarrier::init(&s.sum_full, kWarpgroupThreads);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  if (wg == 3) {
    cutlass::arch::warpgroup_reg_dealloc<kProdRegs>();
    if (tid == 0) {
      for (int b = 0; b < blocks; ++b) {
        const int page = my_pages[b];
        for (int t = 0; t < kNumKTiles; ++t) {
          const int slot = R::slot(b, t);
          if (R::tile_in_slot(t) == 0) {  // a slot's first tile: wait for its release, then expect all its tiles
            cutlass::arch::ClusterBarrier::wait(&s.empty[slot], (R::use(b, t) & 1) ^ 1);
            if (t == 0) TL(kTlProdSlot, b);
#ifdef PROTO_NO_REFILL  // bound: each slot is copied once, then reused as it is (wrong output on purpose)
            if (R::use(b, t) > 0) {
              cutlass::arch::ClusterBarrier::arrive(&s.full[slot]);
              continue;
            }
#endif
            cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&s.full[slot], R::slot_tiles(slot) * Traits::kTileBytes);
          }
#ifdef PROTO_NO_REFILL
          if (R::use(b, t) > 0) continue;
#endif
          tma_tile(&kmap, tile_ptr<kPairs>(s, b, t), &s.full[slot], t * kHeadDimTile, page);
        }
        TL(kTlProdIssued, b);
      }
    }
    return;
  }

  if (wg == 0) {
    cutlass::arch::warpgroup_reg_alloc<kSRegs>();
    using MmaRs = decltype(make_tiled_mma(GMMA::rs_op_selector<T, T, float, Shape<Int<kBlockM>, Int<kBlockN>, Int<kHeadDimTile>>,
                                                              GMMA::Major::K, GMMA::Major::K>()));
    MmaRs mma_rs;
    typename Traits::TiledMmaS mma_ss;
    auto thr_rs = mma_rs.get_thread_slice(tid);
    auto thr_ss = mma_ss.get_thread_slice(tid);
    // Q's first kQRegTiles column tiles, straight from global memory into the A fragments.
    Tensor gQ = make_tensor(make_gmem_ptr(my_q), make_shape(Int<kBlockM>{}, Int<kHeadDim>{}), make_stride(Int<kHeadDim>{}, _1{}));
    Tensor tQ = thr_rs.partition_fragment_A(make_tensor<T>(make_shape(Int<kBlockM>{}, Int<kQRegTiles * kHeadDimTile>{})));
    Tensor cQ = thr_rs.partition_A(make_identity_tensor(make_shape(Int<kBlockM>{}, Int<kQRegTiles * kHeadDimTile>{})));
    CUTE_UNROLL
    for (int i = 0; i < size(tQ); ++i) tQ(i) = gQ(get<0>(cQ(i)), get<1>(cQ(i)));
    // The other tiles into shared memory (cp.async by warpgroup S alone, then a fence for wgmma).
    Tensor sQ = make_tensor(make_smem_ptr(s.q), tile_to_shape(typename Traits::AtomK{}, Shape<Int<kBlockM>, Int<kQSmemTiles * kHeadDimTile>>{}));
    constexpr int kChunk = 8;  // bf16 per 16-byte copy
    for (int idx = tid; idx < kBlockM * kQSmemTiles * kHeadDimTile / kChunk; idx += kWarpgroupThreads) {
      const int r = idx / (kQSmemTiles * kHeadDimTile / kChunk);
      const int c = (idx % (kQSmemTiles * kHeadDimTile / kChunk)) * kChunk;
      cutlass::arch::cp_async<16>(&sQ(r, c), my_q + r * kHeadDim + kQRegTiles * kHeadDimTile + c);
    }
    cutlass::arch::cp_async_wait<0>();
    cutlass::arch::fence_view_async_shared();
    cutlass::arch::NamedBarrier::sync(kWarpgroupThreads, 1);
    Tensor tSrQ = thr_ss.partition_fragment_A(sQ);
    Tensor cS = thr_ss.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
    Tensor tSrS = partition_fragment_C(mma_ss, Shape<Int<kBlockM>, Int<kBlockN>>{});
    constexpr int kStepsPerTile = kHeadDimTile / 16;
    SoftmaxState st;
    st.reset();
    int rows[kRowsPerThread];
    for (int i = 0; i < size(cS); ++i) rows[row_slot(get<0>(cS(i)))] = get<0>(cS(i));
    auto p_copy = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, T>{}, mma_ss);
    auto p_thr = p_copy.get_thread_slice(tid);
    // QK^T(b)'s column tile t into acc (its RS or SS wgmmas; the caller waits, fences, commits).
    // t must be a constant after unrolling: it indexes Q's register fragments.
    auto qk_tile = [&](auto& acc, int b, int t) {
      Tensor sK = make_tensor(make_smem_ptr(tile_ptr<kPairs>(s, b, t)), typename Traits::SmemLayoutKTile{});
      if (t < kQRegTiles) {
        Tensor tK = thr_rs.partition_fragment_B(sK);
        CUTE_UNROLL
        for (int k = 0; k < kStepsPerTile; ++k) {
          mma_rs.accumulate_ = (t == 0 && k == 0) ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
          cute::gemm(mma_rs, tQ(_, _, t * kStepsPerTile + k), tK(_, _, k), acc);
        }
      } else {
        Tensor tK = thr_ss.partition_fragment_B(sK);
        mma_ss.accumulate_ = GMMA::ScaleOut::One;
        CUTE_UNROLL
        for (int k = 0; k < kStepsPerTile; ++k)
          cute::gemm(mma_ss, tSrQ(_, _, (t - kQRegTiles) * kStepsPerTile + k), tK(_, _, k), acc);
      }
    };
    // Block b's softmax on its finished scores acc, and P(b) with its row factors stored for the
    // PV warpgroups (the caller hands it over); returns P(b)'s buffer.
    auto softmax_store_p = [&](auto& acc, int b) {
      float mx[kRowsPerThread], alpha[kRowsPerThread];
#ifdef PROTO_SKIP_SOFTMAX  // bound: P = S (wrong output on purpose)
      for (int r = 0; r < kRowsPerThread; ++r) alpha[r] = 1.f, st.l[r] = 1.f, (void)mx[r];
#else
      block_row_max(acc, cS, scale_log2, mx);
      softmax_update(acc, cS, scale_log2, st, mx, alpha);
#endif
      TL(kTlSSoftmax, b);
      Tensor rP = make_tensor_like<T>(acc);
      CUTE_UNROLL
      for (int i = 0; i < size(acc); ++i) rP(i) = T(acc(i));
      const int pb = b % kPBufs, puse = b / kPBufs;
      cutlass::arch::ClusterBarrier::wait(&s.p_empty[pb], (puse & 1) ^ 1);
      Tensor sP = make_tensor(make_smem_ptr(s.p[pb]), typename Traits::SmemLayoutP{});
      cute::copy(p_copy, p_thr.retile_S(rP), p_thr.partition_D(sP));
      if (tid % 4 == 0)
        for (int r = 0; r < kRowsPerThread; ++r) s.row_alpha[pb][rows[r]] = alpha[r];
      cutlass::arch::fence_view_async_shared();
      return pb;
    };

#ifdef PROTO_DOUBLE_S
    // Tiles [T0, T1) of QK^T(b) into acc, each issued once it has landed, a commit per tile.
    auto issue_qk = [&](auto& acc, int b, auto T0, auto T1) {
      CUTE_UNROLL
      for (int t = decltype(T0)::value; t < decltype(T1)::value; ++t) {
        cutlass::arch::ClusterTransactionBarrier::wait(&s.full[R::slot(b, t)], R::use(b, t) & 1);
        warpgroup_arrive();
        qk_tile(acc, b, t);
        warpgroup_commit_batch();
      }
    };
    // Block b's softmax on its finished scores while QK^T(b + 1)'s first tiles run on the tensor
    // cores; the rest of QK^T(b + 1) is issued after P(b) is handed over, beside PV(b).
    // kMore is a compile-time flag: with a run-time one, ptxas sees a path on which the early
    // tiles are in flight while the next softmax reads them, and serialises every wgmma (C7514).
    auto step = [&](auto& s_cur, auto& s_nxt, int b, auto kMore) {
      TL(kTlSStart, b);
      constexpr bool more = decltype(kMore)::value;
      if constexpr (more) {
        warpgroup_fence_operand(s_nxt);
        issue_qk(s_nxt, b + 1, Int<0>{}, Int<kEarlyTiles>{});
      }
      TL(kTlSIssued, b);
      warpgroup_fence_operand(s_cur);
      cutlass::arch::ClusterBarrier::arrive(&s.p_full[softmax_store_p(s_cur, b)]);
      TL(kTlSHanded, b);
      if constexpr (more) {
        issue_qk(s_nxt, b + 1, Int<kEarlyTiles>{}, Int<kNumKTiles>{});
        TL(kTlSLanded, b);
        warpgroup_wait<0>();
        warpgroup_fence_operand(s_nxt);
        TL(kTlSDone, b);
        // QK^T was the RoPE tile's only reader.
        warp_arrive(&s.empty[R::slot(b + 1, kRopeTile)]);
      }
    };
    Tensor tSrS1 = partition_fragment_C(mma_ss, Shape<Int<kBlockM>, Int<kBlockN>>{});
    warpgroup_fence_operand(tSrS);
    issue_qk(tSrS, 0, Int<0>{}, Int<kNumKTiles>{});
    warpgroup_wait<0>();
    warpgroup_fence_operand(tSrS);
    warp_arrive(&s.empty[R::slot(0, kRopeTile)]);
    int b = 0;
    for (; b + 2 < blocks; b += 2) {
      step(tSrS, tSrS1, b, true_type{});
      step(tSrS1, tSrS, b + 1, true_type{});
    }
    if (b + 1 < blocks) {
      step(tSrS, tSrS1, b, true_type{});
      step(tSrS1, tSrS, b + 1, false_type{});
    } else {
      step(tSrS, tSrS1, b, false_type{});
    }
#else
    for (int b = 0; b < blocks; ++b) {
      TL(kTlSStart, b);
      warpgroup_fence_operand(tSrS);
#ifdef PROTO_QK_ONE_BATCH  // every tile landed first, then one wgmma batch
      CUTE_UNROLL
      for (int t = 0; t < kNumKTiles; ++t)
        cutlass::arch::ClusterTransactionBarrier::wait(&s.full[R::slot(b, t)], R::use(b, t) & 1);
      TL(kTlSLanded, b);
      warpgroup_arrive();
#endif
      CUTE_UNROLL
      for (int t = 0; t < kNumKTiles; ++t) {
#ifndef PROTO_QK_ONE_BATCH
        // (the second tile of a pair waits on the same phase again, which returns at once)
        cutlass::arch::ClusterTransactionBarrier::wait(&s.full[R::slot(b, t)], R::use(b, t) & 1);
        if (t == kNumKTiles - 1) TL(kTlSLanded, b);
        warpgroup_arrive();
#endif
        qk_tile(tSrS, b, t);
#ifndef PROTO_QK_ONE_BATCH
        warpgroup_commit_batch();
#endif
      }
#ifdef PROTO_QK_ONE_BATCH
      warpgroup_commit_batch();
#endif
      TL(kTlSIssued, b);
#ifdef PROTO_QK_FIRST
      // P(b - 1) is handed over only now, so that QK^T(b) is queued on the tensor cores ahead of
      // PV(b - 1), and PV(b - 1) runs under softmax(b) instead of stretching QK^T(b).
#ifndef PROTO_PV_AFTER_QK
      if (b > 0) cutlass::arch::ClusterBarrier::arrive(&s.p_full[(b - 1) % kPBufs]);
#endif
#endif
      warpgroup_wait<0>();
#ifdef PROTO_PV_AFTER_QK
      // Later still: PV(b - 1) starts when QK^T(b) has finished, so that it shares the tensor
      // cores with nothing and runs under softmax(b).
      if (b > 0) cutlass::arch::ClusterBarrier::arrive(&s.p_full[(b - 1) % kPBufs]);
#endif
      warpgroup_fence_operand(tSrS);
      TL(kTlSDone, b);
      // QK^T was the RoPE tile's only reader.
      warp_arrive(&s.empty[R::slot(b, kRopeTile)]);

      const int pb = softmax_store_p(tSrS, b);
#ifndef PROTO_QK_FIRST
      cutlass::arch::ClusterBarrier::arrive(&s.p_full[pb]);
#else
      (void)pb;  // P(b) is handed over after QK^T(b + 1) is issued
#endif
      TL(kTlSHanded, b);
    }
#endif  // PROTO_DOUBLE_S
#ifdef PROTO_QK_FIRST
    if (blocks > 0) cutlass::arch::ClusterBarrier::arrive(&s.p_full[(blocks - 1) % kPBufs]);
#endif
    for (int r = 0; r < kRowsPerThread; ++r) {
      const float l = quad_sum(st.l[r]);
      if (tid % 4 == 0) s.row_sum[rows[r]] = l;
    }
    cutlass::arch::ClusterBarrier::arrive(&s.sum_full);
    return;
  }

  // PV warpgroups.
  cutlass::arch::warpgroup_reg_alloc<kPvRegs>();
  const int half = wg - 1;
  // N = R::kPvN per wgmma (64: one V tile; 128: a pair). Not 256: ptxas checks each instruction
  // against the launch bound's 128 registers, and an N = 256 fp32 accumulator alone is 128.
  using MmaPv = decltype(make_tiled_mma(GMMA::ss_op_selector<T, T, float, Shape<Int<kBlockM>, Int<R::kPvN>, Int<kBlockN>>,
                                                             GMMA::Major::K, GMMA::Major::MN>()));
  constexpr int kPvChunks = kHalfDimV / R::kPvN;
  constexpr int kTilesPerChunk = R::kPvN / kHeadDimTile;
  MmaPv mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor cO = thr.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHalfDimV>>{}));  // (MMA, 1, kPvChunks)
  Tensor tOrO = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kHalfDimV>>{});
  clear(tOrO);
  int rows[kRowsPerThread];
  for (int i = 0; i < size(cO); ++i) rows[row_slot(get<0>(cO(i)))] = get<0>(cO(i));
  for (int b = 0; b < blocks; ++b) {
    const int pb = b % kPBufs, puse = b / kPBufs;
    cutlass::arch::ClusterBarrier::wait(&s.p_full[pb], puse & 1);
    TL(half ? kTlBWake : kTlAWake, b);
    float alpha[kRowsPerThread];
    for (int r = 0; r < kRowsPerThread; ++r) alpha[r] = s.row_alpha[pb][rows[r]];
    rescale_output(tOrO, cO, alpha);
    Tensor sP = make_tensor(make_smem_ptr(s.p[pb]), typename Traits::SmemLayoutP{});
    Tensor tOrP = thr.partition_fragment_A(sP);
    warpgroup_fence_operand(tOrO);
    warpgroup_arrive();
    CUTE_UNROLL
    for (int j = 0; j < kPvChunks; ++j) {
      const int t0 = half * kVTilesPerHalf + j * kTilesPerChunk;
      // V^T of the chunk: [kPvN channels, 64 tokens] over its tiles' [64 tokens, 64 channels],
      // consecutive tiles 8 KiB apart as in SmemLayoutVt.
      Tensor sVt = make_tensor(make_smem_ptr(tile_ptr<kPairs>(s, b, t0)), typename Traits::SmemLayoutVt{});
      Tensor sVtTile = local_tile(sVt, Shape<Int<R::kPvN>, Int<kBlockN>>{}, make_coord(_0{}, _0{}));
      Tensor tOrV = thr.partition_fragment_B(sVtTile);
      // Chunk j's [64, kPvN] accumulators, as the (V, M, N) tensor that gemm takes.
      Tensor acc = make_tensor(tOrO.data() + j * size<0>(tOrO), make_layout(make_shape(shape<0>(tOrO), _1{}, _1{})));
#ifndef PROTO_SKIP_PV  // bound: no PV (wrong output on purpose)
      CUTE_UNROLL
      for (int k = 0; k < size<2>(tOrP); ++k) cute::gemm(mma, tOrP(_, _, k), tOrV(_, _, k), acc);
#else
      (void)acc;
      (void)tOrV;
#endif
    }
    warpgroup_commit_batch();
    TL(half ? kTlBIssued : kTlAIssued, b);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
    TL(half ? kTlBDone : kTlADone, b);
    CUTE_UNROLL
    for (int j = 0; j < kVTilesPerHalf; j += kTilesPerChunk) warp_arrive(&s.empty[R::slot(b, half * kVTilesPerHalf + j)]);
    warp_arrive(&s.p_empty[pb]);
  }
  cutlass::arch::ClusterBarrier::wait(&s.sum_full, 0);
  float inv_l[kRowsPerThread];
  for (int r = 0; r < kRowsPerThread; ++r) inv_l[r] = 1.f / s.row_sum[rows[r]];
  T* my_out = out + int64_t(blockIdx.x) * kBlockM * kHeadDimV + half * kHalfDimV;
  CUTE_UNROLL
  for (int i = 0; i < size(tOrO); ++i) {
    const int r = get<0>(cO(i)), c = get<1>(cO(i));
    my_out[r * kHeadDimV + c] = T(tOrO(i) * inv_l[row_slot(r)]);
  }
}

static_assert(kCh == kHeadDim && kTok == kBlockN && kBoxCh == kHeadDimTile, "the K map of tma_probe.cuh is this kernel's");

float bf(T x) { return float(x); }

struct Run {
  float us;
  double max_err;
};

template <bool kPairs>
Run run(EncodeFn encode, int ctas, int blocks, int share, int pool_pages, bool check, int reps) {
  std::mt19937 rng(1234 + ctas + blocks);
  std::normal_distribution<float> nd(0.f, 1.f);
  auto draw = [&] { return T(std::clamp(nd(rng) / 10.f, -1.f, 1.f)); };
  std::vector<T> hq(size_t(ctas) * kBlockM * kHeadDim), hk(size_t(pool_pages) * kBlockN * kHeadDim);
  for (auto& x : hq) x = draw();
  // The pool (1.2 GB for P6-like work) from a table of draws picked by xorshift: a normal draw per
  // element took ~20 s of host time per run, most of a device call.
  std::vector<T> table(size_t(1) << 16);
  for (auto& x : table) x = draw();
  uint64_t z = (uint64_t(rng()) << 32) | rng() | 1;
  for (auto& x : hk) {
    z ^= z << 13, z ^= z >> 7, z ^= z << 17;
    x = table[z >> 48];
  }
  const int groups = (ctas + share - 1) / share;
  std::vector<int> perm(pool_pages);
  for (int i = 0; i < pool_pages; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int> hp(size_t(groups) * blocks);
  for (size_t i = 0; i < hp.size(); ++i) hp[i] = perm[i % pool_pages];
  T *dq, *dk, *dout;
  int* dp;
  cudaMalloc(&dq, hq.size() * sizeof(T));
  cudaMalloc(&dk, hk.size() * sizeof(T));
  cudaMalloc(&dout, size_t(ctas) * kBlockM * kHeadDimV * sizeof(T));
  cudaMalloc(&dp, hp.size() * sizeof(int));
  cudaMemcpy(dq, hq.data(), hq.size() * sizeof(T), cudaMemcpyHostToDevice);
  cudaMemcpy(dk, hk.data(), hk.size() * sizeof(T), cudaMemcpyHostToDevice);
  cudaMemcpy(dp, hp.data(), hp.size() * sizeof(int), cudaMemcpyHostToDevice);
  CUtensorMap map;
  if (encode_k_map(encode, &map, dk, pool_pages, CU_TENSOR_MAP_L2_PROMOTION_L2_128B) != CUDA_SUCCESS) {
    std::printf("tensor map encode failed\n");
    return {-1, -1};
  }
  const float scale = 1.f / std::sqrt(float(kHeadDim));
  const float scale_log2 = scale * 1.4426950408889634f;
  cudaEvent_t a, e;
  cudaEventCreate(&a);
  cudaEventCreate(&e);
  std::vector<float> times;
  for (int rep = 0; rep < reps + 1; ++rep) {
    cudaEventRecord(a);
    three_roles<kPairs><<<ctas, kThreads, sizeof(Smem)>>>(map, dq, dp, dout, blocks, share, scale_log2);
    cudaEventRecord(e);
    cudaEventSynchronize(e);
    float ms;
    cudaEventElapsedTime(&ms, a, e);
    if (rep) times.push_back(ms * 1e3f);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    std::printf("CUDA error: %s\n", cudaGetErrorString(err));
    return {-1, -1};
  }
  std::sort(times.begin(), times.end());
  Run res{times[times.size() / 2], 0.0};
  if (check) {
    std::vector<T> hout(size_t(ctas) * kBlockM * kHeadDimV);
    cudaMemcpy(hout.data(), dout, hout.size() * sizeof(T), cudaMemcpyDeviceToHost);
    for (int c = 0; c < ctas; ++c) {
      const int* pg = hp.data() + size_t(c / share) * blocks;
      for (int r = 0; r < kBlockM; ++r) {
        const T* qr = hq.data() + (size_t(c) * kBlockM + r) * kHeadDim;
        std::vector<double> sc(size_t(blocks) * kBlockN);
        double m = -1e300;
        for (int n = 0; n < blocks * kBlockN; ++n) {
          const T* kr = hk.data() + (size_t(pg[n / kBlockN]) * kBlockN + n % kBlockN) * kHeadDim;
          double acc = 0;
          for (int d = 0; d < kHeadDim; ++d) acc += double(bf(qr[d])) * double(bf(kr[d]));
          sc[n] = acc * scale;
          m = std::max(m, sc[n]);
        }
        double l = 0;
        for (auto& x : sc) l += (x = std::exp(x - m));
        for (int d = 0; d < kHeadDimV; ++d) {
          double o = 0;
          for (int n = 0; n < blocks * kBlockN; ++n)
            o += sc[n] * double(bf(hk[(size_t(pg[n / kBlockN]) * kBlockN + n % kBlockN) * kHeadDim + d]));
          o /= l;
          res.max_err = std::max(res.max_err, std::abs(o - double(bf(hout[(size_t(c) * kBlockM + r) * kHeadDimV + d]))));
        }
      }
    }
  }
  cudaFree(dq);
  cudaFree(dk);
  cudaFree(dout);
  cudaFree(dp);
  return res;
}

}  // namespace proto
using namespace proto;

// The last launch's timeline (PROTO_TIMELINE): each event's cycles after S began the same block,
// mean and range over the recorded blocks, and the mean block period.
void print_timeline(const char* what) {
#ifdef PROTO_TIMELINE
#ifdef PROTO_DOUBLE_S  // S's events of step b: b + 1's early tiles, softmax(b), P(b), b + 1's late tiles
  static const char* names[kTlEvents] = {"S start",     "S b+1 late in", "S b+1 early in", "S QK^T b+1 done", "S softmax done",
                                         "S P handed",  "A P seen",      "A PV issued",    "A PV done",       "B P seen",
                                         "B PV issued", "B PV done",     "prod slot",      "prod issued"};
#else
  static const char* names[kTlEvents] = {"S start",     "S tiles landed", "S QK^T issued", "S QK^T done", "S softmax done",
                                         "S P handed",  "A P seen",       "A PV issued",   "A PV done",   "B P seen",
                                         "B PV issued", "B PV done",      "prod slot",     "prod issued"};
#endif
  long long h[kTlBlocks][kTlEvents];
  cudaMemcpyFromSymbol(h, g_timeline, sizeof(h));
  double period = 0;
  for (int i = 0; i + 1 < kTlBlocks; ++i) period += double(h[i + 1][kTlSStart] - h[i][kTlSStart]);
  std::printf("  timeline %s, CTA 0, blocks %d-%d: period %.0f cycles\n", what, kTlFirst, kTlFirst + kTlBlocks - 1,
              period / (kTlBlocks - 1));
  for (int e = 1; e < kTlEvents; ++e) {
    double sum = 0;
    long long lo = 1LL << 62, hi = -lo;
    for (int i = 0; i < kTlBlocks; ++i) {
      const long long d = h[i][e] - h[i][kTlSStart];
      sum += double(d), lo = std::min(lo, d), hi = std::max(hi, d);
    }
    std::printf("    %-15s %+7.0f  (%lld .. %lld)\n", names[e], sum / kTlBlocks, lo, hi);
  }
#else
  (void)what;
#endif
}

template <bool kPairs>
bool run_all(EncodeFn encode) {
  const char* name = kPairs ? "V tile pairs, PV N = 128" : "single tiles, PV N = 64";
  cudaFuncSetAttribute(three_roles<kPairs>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(sizeof(Smem)));
#if defined(PROTO_SKIP_SOFTMAX) || defined(PROTO_SKIP_PV) || defined(PROTO_NO_REFILL)
  const Run c{0.f, 0.0};  // a bound: no check
#else
  // Correctness: 4 CTAs in pairs, 7 blocks (the ring wraps several times), float64 reference.
  const Run c = run<kPairs>(encode, 4, 7, 2, 64, true, 1);
#endif
  const bool ok = c.max_err >= 0 && c.max_err < 2e-3;
  std::printf("[%s] check: 4 CTAs x 7 blocks, max abs err %.3g (%s)\n", name, c.max_err, ok ? "ok" : "FAILED");
  if (!ok) return false;
  // P4's attention kernel: 128 requests x 2 row blocks x 64 blocks = 16384 block tiles on 132 SMs.
  const Run p4 = run<kPairs>(encode, 132, 124, 2, 66 * 124, false, 10);
  std::printf("[%s] P4-like: 132 CTAs x 124 blocks (pairs share pages): %.1f us, %.0f cycles/block at 1980 MHz\n", name,
              p4.us, p4.us * 1980.0 / 124);
  print_timeline("P4-like");
  // P6's sharing: 4 row blocks a request, ~500 blocks a CTA.
  const Run p6 = run<kPairs>(encode, 132, 496, 4, 33 * 496, false, 5);
  std::printf("[%s] P6-like: 132 CTAs x 496 blocks (fours share pages): %.1f us, %.0f cycles/block at 1980 MHz\n", name,
              p6.us, p6.us * 1980.0 / 496);
  print_timeline("P6-like");
  return true;
}

int main() {
  const EncodeFn encode = load_encoder();
  int sm = 0, dev = 0;
  if (encode == nullptr || cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sm, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess || sm != 9) {
    std::printf("needs an sm_90 GPU and the CUDA driver\n");
    return 2;
  }
  std::printf("shared memory %zu bytes, ring %d tiles, Q tiles in registers %d, early tiles %d%s\n", sizeof(Smem), kRingTiles,
              kQRegTiles, kEarlyTiles,
#ifdef PROTO_DOUBLE_S
              ", two S accumulators"
#else
              ""
#endif
  );
  const bool a = run_all<false>(encode);
  const bool b = run_all<true>(encode);
  return a && b ? 0 : 1;
}
