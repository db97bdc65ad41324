// Compile-only probe (ptxas's resource report, no GPU needed): does the register budget of a
// three-role decode block loop fit (benchmarks/NOTES.md, thirtieth session)? 512 threads, 128
// registers each at launch; setmaxnreg gives
//   warpgroup 0 (S):     160: QK^T with kQRegTiles of Q's column tiles as RS A fragments and the
//                            rest from shared memory, the online softmax, P to shared memory;
//   warpgroups 1, 2 (PV): 160: O half [64, 256] fp32 += P V_half (SS wgmma), the rescale;
//   warpgroup 3:          32: (the producer; today's fits 32 without spills).
// (160 + 160 + 160 + 32) x 128 = 65536. Not a kernel: no copies are issued, the barriers and
// shared-memory addresses only stand in for a ring of K tiles, and the output is meaningless.
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -Icpp \
//     -isystem <cutlass include> -Xptxas -v -cubin -o /tmp/three_role.cubin \
//     benchmarks/probes/three_role_regs.cu
// Spills show as "bytes spill stores" of the kernel.
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "config.h"
#include "decode/kernel_traits.cuh"
#include "decode/softmax.cuh"

using namespace cute;
using namespace jax_flashmla;
using namespace jax_flashmla::decode;

#ifndef Q_REG_TILES
#define Q_REG_TILES 5
#endif
constexpr int kQRegTiles = Q_REG_TILES;            // Q column tiles held in registers by warpgroup S
constexpr int kQSmemTiles = kNumKTiles - kQRegTiles;
constexpr int kRingTiles = 23;                     // K tiles in flight (8 KiB each)
constexpr int kSRegs = 160, kPvRegs = 160, kProdRegs = 32;
static_assert((kSRegs + 2 * kPvRegs + kProdRegs) * kWarpgroupThreads <= 65536, "register file");

using T = cutlass::bfloat16_t;
using Traits = KernelTraits<T>;

struct Smem {
  alignas(1024) T q[kQSmemTiles * Traits::kTileElems];
  alignas(1024) T ring[kRingTiles * Traits::kTileElems];
  alignas(1024) T p[kBlockM * kBlockN];
  float row_alpha[kBlockM];
  alignas(8) uint64_t tile_full[kRingTiles];
  alignas(8) uint64_t tile_empty[kRingTiles];
  alignas(8) uint64_t p_full;
  alignas(8) uint64_t p_empty;
};

__device__ __forceinline__ T* ring_tile(Smem& s, int n, int t) {
  return s.ring + ((n * kNumKTiles + t) % kRingTiles) * Traits::kTileElems;
}

__global__ void __launch_bounds__(512, 1) three_roles(const T* q, float* out, int blocks, float scale_log2) {
  extern __shared__ __align__(1024) char raw[];
  Smem& s = *reinterpret_cast<Smem*>(raw);
  const int wg = threadIdx.x / kWarpgroupThreads;
  const int tid = thread_in_warpgroup();
  if (wg == 3) {
    cutlass::arch::warpgroup_reg_dealloc<kProdRegs>();
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
    // Q's register tiles, loaded once per piece (here: once) straight from global memory.
    Tensor gQ = make_tensor(make_gmem_ptr(q), make_shape(Int<kBlockM>{}, Int<kHeadDim>{}), make_stride(Int<kHeadDim>{}, _1{}));
    Tensor tQ = thr_rs.partition_fragment_A(make_tensor<T>(make_shape(Int<kBlockM>{}, Int<kQRegTiles * kHeadDimTile>{})));
    Tensor cQ = thr_rs.partition_A(make_identity_tensor(make_shape(Int<kBlockM>{}, Int<kQRegTiles * kHeadDimTile>{})));
    CUTE_UNROLL
    for (int i = 0; i < size(tQ); ++i) tQ(i) = gQ(get<0>(cQ(i)), get<1>(cQ(i)));
    Tensor sQ = make_tensor(make_smem_ptr(s.q), tile_to_shape(typename Traits::AtomK{}, Shape<Int<kBlockM>, Int<kQSmemTiles * kHeadDimTile>>{}));
    Tensor tSrQ = thr_ss.partition_fragment_A(sQ);
    Tensor cS = thr_ss.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
    Tensor tSrS = partition_fragment_C(mma_ss, Shape<Int<kBlockM>, Int<kBlockN>>{});
    constexpr int kStepsPerTile = kHeadDimTile / 16;
    SoftmaxState st;
    st.reset();
    int rows[kRowsPerThread];
    for (int i = 0; i < size(cS); ++i) rows[row_slot(get<0>(cS(i)))] = get<0>(cS(i));
    for (int n = 0; n < blocks; ++n) {
      const int phase = (n * kNumKTiles / kRingTiles) & 1;  // stands in for the ring's phases
      warpgroup_fence_operand(tSrS);
      CUTE_UNROLL
      for (int t = 0; t < kNumKTiles; ++t) {
        cutlass::arch::ClusterTransactionBarrier::wait(&s.tile_full[(n * kNumKTiles + t) % kRingTiles], phase);
        Tensor sK = make_tensor(make_smem_ptr(ring_tile(s, n, t)), typename Traits::SmemLayoutKTile{});
        warpgroup_arrive();
        if (t < kQRegTiles) {
          Tensor tK = thr_rs.partition_fragment_B(sK);
          CUTE_UNROLL
          for (int k = 0; k < kStepsPerTile; ++k) {
            mma_rs.accumulate_ = (t == 0 && k == 0) ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
            cute::gemm(mma_rs, tQ(_, _, t * kStepsPerTile + k), tK(_, _, k), tSrS);
          }
        } else {
          Tensor tK = thr_ss.partition_fragment_B(sK);
          mma_ss.accumulate_ = GMMA::ScaleOut::One;
          CUTE_UNROLL
          for (int k = 0; k < kStepsPerTile; ++k)
            cute::gemm(mma_ss, tSrQ(_, _, (t - kQRegTiles) * kStepsPerTile + k), tK(_, _, k), tSrS);
        }
        warpgroup_commit_batch();
      }
      warpgroup_wait<0>();
      warpgroup_fence_operand(tSrS);
      // The RoPE tile is free once QK^T is done.
      cutlass::arch::ClusterBarrier::arrive(&s.tile_empty[(n * kNumKTiles + kRopeTile) % kRingTiles]);
      float mx[kRowsPerThread], alpha[kRowsPerThread];
      block_row_max(tSrS, cS, scale_log2, mx);
      softmax_update(tSrS, cS, scale_log2, st, mx, alpha);
      Tensor rP = make_tensor_like<T>(tSrS);
      CUTE_UNROLL
      for (int i = 0; i < size(tSrS); ++i) rP(i) = T(tSrS(i));
      cutlass::arch::ClusterBarrier::wait(&s.p_empty, (n & 1) ^ 1);
      auto p_copy = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, T>{}, mma_ss);
      auto p_thr = p_copy.get_thread_slice(tid);
      Tensor sP = make_tensor(make_smem_ptr(s.p), typename Traits::SmemLayoutP{});
      cute::copy(p_copy, p_thr.retile_S(rP), p_thr.partition_D(sP));
      if (tid % 4 == 0)
        for (int r = 0; r < kRowsPerThread; ++r) s.row_alpha[rows[r]] = alpha[r];
      cutlass::arch::fence_view_async_shared();
      cutlass::arch::ClusterBarrier::arrive(&s.p_full);
    }
    if (tid % 4 == 0) out[tid] = st.l[0] + st.l[1] + st.m[0];
  } else {
    cutlass::arch::warpgroup_reg_alloc<kPvRegs>();
    const int half = wg - 1;
    // N = 128 per instruction: ptxas checks each instruction against the kernel's launch-bound
    // register count (128 at 512 threads), not setmaxnreg's, and an N = 256 fp32 wgmma needs 154.
    auto mma = make_tiled_mma(GMMA::ss_op_selector<T, T, float, Shape<Int<kBlockM>, Int<kHalfDimV / 2>, Int<kBlockN>>,
                                                   GMMA::Major::K, GMMA::Major::MN>(),
                              Layout<Shape<_1, _1, _1>>{}, Tile<Int<kBlockM>, Int<kHalfDimV>, _16>{});
    auto thr = mma.get_thread_slice(tid);
    Tensor cO = thr.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHalfDimV>>{}));
    Tensor tOrO = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kHalfDimV>>{});
    clear(tOrO);
    int rows[kRowsPerThread];
    for (int i = 0; i < size(cO); ++i) rows[row_slot(get<0>(cO(i)))] = get<0>(cO(i));
    Tensor sP = make_tensor(make_smem_ptr(s.p), typename Traits::SmemLayoutP{});
    Tensor tOrP = thr.partition_fragment_A(sP);
    for (int n = 0; n < blocks; ++n) {
      cutlass::arch::ClusterBarrier::wait(&s.p_full, n & 1);
      float alpha[kRowsPerThread];
      for (int r = 0; r < kRowsPerThread; ++r) alpha[r] = s.row_alpha[rows[r]];
      rescale_output(tOrO, cO, alpha);
      // This half's four V tiles, assumed contiguous in the ring (a ring of 4-tile groups).
      Tensor sVt = make_tensor(make_smem_ptr(ring_tile(s, n, half * 4)), typename Traits::SmemLayoutVt{});
      Tensor sVtHalf = local_tile(sVt, Shape<Int<kHalfDimV>, Int<kBlockN>>{}, make_coord(_0{}, _0{}));
      Tensor tOrV = thr.partition_fragment_B(sVtHalf);
      warpgroup_fence_operand(tOrO);
      warpgroup_arrive();
      CUTE_UNROLL
      for (int kb = 0; kb < size<2>(tOrP); ++kb) cute::gemm(mma, tOrP(_, _, kb), tOrV(_, _, kb), tOrO);
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(tOrO);
      cutlass::arch::ClusterBarrier::arrive(&s.p_empty);
      if (tid % 32 == 0)
        for (int t = 0; t < 4; ++t) cutlass::arch::ClusterBarrier::arrive(&s.tile_empty[(n * kNumKTiles + half * 4 + t) % kRingTiles]);
    }
    for (int i = 0; i < size(tOrO); ++i) out[(wg * kWarpgroupThreads + tid) * size(tOrO) + i] = tOrO(i);
  }
}
