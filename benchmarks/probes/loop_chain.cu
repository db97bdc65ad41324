// Probe (not the library's kernel): the block loop's period with its dependency chain but no
// loads. Question (benchmarks/NOTES.md, thirty-fourth session): the bare wgmma mix of a block runs
// in ~2320 cycles (wgmma_rate.cu), both real loops without refills or softmax in ~3150-3250. Which
// hand-over costs what, and which issue order keeps the tensor cores fed?
//
// Every CTA (one per SM) holds a Q tile and one K block in shared memory and runs `iters` blocks
// over them, so nothing is ever loaded: what remains is the loop's own chain. S = Q K^T (the same
// two wgmma batches as mainloop.cuh's gemm_qk), optionally the real online softmax (softmax.cuh),
// P rounded and stored with stmatrix into one of two P buffers, the rescale factors beside it, an
// mbarrier hand-over to the PV warpgroups, O_half += P V_half (N = 256), and an mbarrier back when
// a P buffer may be rewritten. Orders:
//   today:        warpgroup 0: QK^T(b), softmax, P(b), its PV(b); warpgroup 1: PV(b) after P(b)
//                 (decode_kernel.cuh's loop).
//   today-2S:     warpgroup 0 issues QK^T(b + 1) (one batch) before softmax(b), then its PV(b),
//                 and waits for both at the end of the step (two S accumulators).
//   three:        S warpgroup: QK^T and softmax only; two PV warpgroups (three_role_proto.cu's
//                 order, without its ring).
//   three-2S:     the same, S issuing QK^T(b + 1) before softmax(b) (attempt 66's order).
//   no-wait:      today's, warpgroup 0 issuing QK^T(b + 1) without waiting for its PV(b) (attempt
//                 41's order).
//   early-4:      today-2S with only 4 of QK^T(b + 1)'s 9 column tiles before softmax(b).
// Also today and today-2S at 32-token steps (four half-block stages would fit where two blocks
// do). Printed per case: cycles per 64 tokens (mean over CTAs), and the bare mix's 2323 as a %.
// H100, 2026-12-07 (NOTES, thirty-fourth session), with softmax: today 3123, today-2S 2531,
// three 3127, three-2S 2557, no-wait 3081, early-4 2815; 32-token steps today 4198, today-2S
// 3379. Without softmax today-2S and three-2S run at the bare rate (2327, 2331).
// pair-2S (a 2-CTA cluster splitting the channels, below): pair period 4776 (st.async) and 5744
// (bulk copy) cycles without softmax, 4-5x too slow; the exchange-free bound is built, not run.
// Pair-only mode: `loop_chain 4000 0 pair`; build variants -DPAIR_ST_ASYNC (per-thread st.async
// instead of the bulk copy) and -DPAIR_WARP_ARRIVE (a warp's one remote arrival, not 128).
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -Icpp \
//     -isystem <cutlass include> -o .device/loop_chain benchmarks/probes/loop_chain.cu
#include <cuda_runtime.h>

#include <cstdio>
#include <cstddef>
#include <cstdlib>
#include <type_traits>

#include <cute/arch/cluster_sm90.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "config.h"
#include "decode/kernel_traits.cuh"
#include "decode/softmax.cuh"
#include "probe_common.cuh"

using namespace cute;
using namespace jax_flashmla;
using namespace jax_flashmla::decode;

namespace chain {

using T = cutlass::bfloat16_t;
using Traits = KernelTraits<T>;

// Layouts and tensor-core tiles of a step of kN tokens: 64 is the kernel's block (the same types
// as kernel_traits.cuh); 32 is half a block, the step of a loop that would keep four half-block
// stages in the shared memory of today's two (QK^T as N = 32 wgmmas, PV as K = 32).
template <int kN>
struct StepTypes {
  using LayoutK = decltype(tile_to_shape(typename Traits::AtomK{}, Shape<Int<kN>, Int<kHeadDim>>{}));
  using LayoutVt =
      decltype(tile_to_shape(typename Traits::AtomMN{}, Shape<Int<kHeadDimV>, Int<kN>>{}, cute::Step<_2, _1>{}));
  // P's rows are kN keys wide: a 128-byte swizzle row for 64, a 64-byte one for 32.
  using AtomP = std::conditional_t<kN == 64, GMMA::Layout_K_SW128_Atom<T>, GMMA::Layout_K_SW64_Atom<T>>;
  using LayoutP = decltype(tile_to_shape(AtomP{}, Shape<Int<kBlockM>, Int<kN>>{}));
  using MmaS = decltype(make_tiled_mma(GMMA::ss_op_selector<T, T, float, Shape<Int<kBlockM>, Int<kN>, Int<kHeadDimTile>>,
                                                            GMMA::Major::K, GMMA::Major::K>()));
  using MmaO = decltype(make_tiled_mma(GMMA::ss_op_selector<T, T, float, Shape<Int<kBlockM>, Int<kHalfDimV>, Int<kN>>,
                                                            GMMA::Major::K, GMMA::Major::MN>()));
};

enum Order : int { kToday, kTodayDoubleS, kThree, kThreeDoubleS, kTodayNoWait, kTodayEarly };
const char* order_name(int o) {
  static const char* names[] = {"today", "today-2S", "three", "three-2S", "no-wait", "early-4"};
  return names[o];
}
// kTodayEarly: column tiles of QK^T(b + 1) issued before softmax(b); the rest after PV(b). Four
// tiles are ~4 x 130 cycles of tensor work, about the softmax's ~500 (today's order with and
// without it). Residency it needs: block b and four tiles of b + 1 during the softmax.
constexpr int kEarlyTiles = 4;
constexpr int consumer_wgs(int order) { return order == kThree || order == kThreeDoubleS ? 3 : 2; }

// The bare mix's cycles a block (wgmma_rate.cu, H100, thirty-fourth session): today's wgmmas with
// one wait and one barrier a block and no dependency between them.
constexpr double kBareBlockCycles = 2323;
constexpr int kPBufs = 2;
// log2(e) / sqrt(576): the scale of the benchmark's cells.
constexpr float kScaleLog2 = 1.4426950408889634f / 24.f;

struct Smem {
  alignas(1024) T q[cosize_v<typename Traits::SmemLayoutQ>];
  alignas(1024) T k[cosize_v<typename Traits::SmemLayoutK>];
  alignas(1024) T p[kPBufs][cosize_v<typename Traits::SmemLayoutP>];  // a 32-key P uses half
  float alpha[kPBufs][kBlockM];
  alignas(8) uint64_t p_full[kPBufs];  // P(b) and its factors stored: the S side's threads arrive
  alignas(8) uint64_t p_free[kPBufs];  // PV(b) done: every thread that ran a PV on it arrives
};

using probe::acc_sum;
using probe::launder;

// The loop's pieces, for one warpgroup, at kN tokens a step, over shared storage S (Smem, or the
// pair's PairSmem: both have q, k, p, alpha, p_full, p_free).
template <int kN, class S = Smem>
struct Parts {
  using St = StepTypes<kN>;
  S& s;
  int tid;
  int rows[kRowsPerThread];  // the two tile rows this thread holds, in S and in O alike
  typename St::MmaS mma_s;
  typename St::MmaO mma_o;

  // QK^T(b) into acc, no wait: two batches and commits (the kernel's two landing groups) or,
  // where another batch may be in flight, one (ptxas follows wgmma.wait_group counts of single
  // commits only: with two it serialised the double-S orders, C7514/C7515).
  template <bool kTwoBatches, class Acc>
  __device__ void qk_issue(Acc& acc) {
    auto thr = mma_s.get_thread_slice(tid);
    Tensor tQ = thr.partition_fragment_A(make_tensor(make_smem_ptr(launder(s.q)), typename Traits::SmemLayoutQ{}));
    Tensor tK = thr.partition_fragment_B(make_tensor(make_smem_ptr(launder(s.k)), typename St::LayoutK{}));
    constexpr int kSteps = decltype(size<2>(tQ))::value;
    constexpr int kFirst = kSteps / kNumKTiles * kQkFirstTiles;
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    mma_s.accumulate_ = GMMA::ScaleOut::Zero;
    CUTE_UNROLL
    for (int k = 0; k < kFirst; ++k) {
      cute::gemm(mma_s, tQ(_, _, k), tK(_, _, k), acc);
      mma_s.accumulate_ = GMMA::ScaleOut::One;
    }
    if constexpr (kTwoBatches) {
      warpgroup_commit_batch();
      warpgroup_arrive();
    }
    CUTE_UNROLL
    for (int k = kFirst; k < kSteps; ++k) cute::gemm(mma_s, tQ(_, _, k), tK(_, _, k), acc);
    warpgroup_commit_batch();
  }

  // Column tiles [T0, T1) of QK^T into acc (tile 0 starts it from zero): one commit, no wait.
  template <int T0, int T1, class Acc>
  __device__ void qk_tiles(Acc& acc) {
    auto thr = mma_s.get_thread_slice(tid);
    Tensor tQ = thr.partition_fragment_A(make_tensor(make_smem_ptr(launder(s.q)), typename Traits::SmemLayoutQ{}));
    Tensor tK = thr.partition_fragment_B(make_tensor(make_smem_ptr(launder(s.k)), typename St::LayoutK{}));
    constexpr int kPerTile = decltype(size<2>(tQ))::value / kNumKTiles;
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    mma_s.accumulate_ = T0 == 0 ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
    CUTE_UNROLL
    for (int k = T0 * kPerTile; k < T1 * kPerTile; ++k) {
      cute::gemm(mma_s, tQ(_, _, k), tK(_, _, k), acc);
      mma_s.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
  }

  // O_slice += P(buf) V_slice over value channels [slice * kWidth, (slice + 1) * kWidth) with
  // mma (N = kWidth): one commit, no wait.
  template <int kWidth, class Mma, class Acc>
  __device__ void pv_slice(Mma& mma, Acc& o, int buf, int slice) {
    auto thr = mma.get_thread_slice(tid);
    Tensor sVt = make_tensor(make_smem_ptr(launder(s.k)), typename St::LayoutVt{});
    Tensor tP = thr.partition_fragment_A(make_tensor(make_smem_ptr(launder(s.p[buf])), typename St::LayoutP{}));
    Tensor tV = thr.partition_fragment_B(local_tile(sVt, Shape<Int<kWidth>, Int<kN>>{}, make_coord(slice, _0{})));
    warpgroup_fence_operand(o);
    warpgroup_arrive();
    mma.accumulate_ = GMMA::ScaleOut::One;
    CUTE_UNROLL
    for (int k = 0; k < size<2>(tP); ++k) cute::gemm(mma, tP(_, _, k), tV(_, _, k), o);
    warpgroup_commit_batch();
  }

  // O_half += P(buf) V_half: one commit, no wait.
  template <class Acc>
  __device__ void pv_issue(Acc& o, int buf, int half) {
    pv_slice<kHalfDimV>(mma_o, o, buf, half);
  }

  // Softmax of finished scores (or none: P = S, alpha = 1), then P(b) and the factors into
  // buffer b % kPBufs once the PVs of b - kPBufs are done, and the hand-over.
  template <bool kSoftmax, class Acc>
  __device__ void softmax_hand_over(Acc& acc, int b, SoftmaxState& st, float (&alpha)[kRowsPerThread]) {
    Tensor cS = mma_s.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kN>>{}));
    if constexpr (kSoftmax) {
      float mx[kRowsPerThread];
      block_row_max(acc, cS, kScaleLog2, mx);
      softmax_update(acc, cS, kScaleLog2, st, mx, alpha);
    } else {
      for (int r = 0; r < kRowsPerThread; ++r) alpha[r] = 1.f;
    }
    Tensor rP = make_tensor_like<T>(acc);
    CUTE_UNROLL
    for (int i = 0; i < size(acc); ++i) rP(i) = T(acc(i));
    const int buf = b % kPBufs, use = b / kPBufs;
    cutlass::arch::ClusterBarrier::wait(&s.p_free[buf], (use & 1) ^ 1);
    auto p_copy = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, T>{}, mma_s);
    auto p_thr = p_copy.get_thread_slice(tid);
    Tensor sP = make_tensor(make_smem_ptr(s.p[buf]), typename St::LayoutP{});
    cute::copy(p_copy, p_thr.retile_S(rP), p_thr.partition_D(sP));
    if (tid % 4 == 0)
      for (int r = 0; r < kRowsPerThread; ++r) s.alpha[buf][rows[r]] = alpha[r];
    cutlass::arch::fence_view_async_shared();  // generic-proxy writes, read by wgmma
    cutlass::arch::ClusterBarrier::arrive(&s.p_full[buf]);
  }

  // A PV side's wait for P(b) and its factors.
  template <class AccO, class CoordO>
  __device__ int wait_p(AccO& o, const CoordO& cO, int b) {
    const int buf = b % kPBufs, use = b / kPBufs;
    cutlass::arch::ClusterBarrier::wait(&s.p_full[buf], use & 1);
    float alpha[kRowsPerThread];
    for (int r = 0; r < kRowsPerThread; ++r) alpha[r] = s.alpha[buf][rows[r]];
    rescale_output(o, cO, alpha);
    return buf;
  }
};

template <int kOrder, bool kSoftmax, int kN>
__global__ void __launch_bounds__(consumer_wgs(kOrder) * kWarpgroupThreads, 1)
    chain_kernel(const T* __restrict__ init, int iters, long long* __restrict__ cycles, float* __restrict__ sink) {
  extern __shared__ __align__(1024) char smem_raw[];
  Smem& s = *reinterpret_cast<Smem*>(smem_raw);
  constexpr int kThreads = consumer_wgs(kOrder) * kWarpgroupThreads;
  constexpr int kPvThreads = 2 * kWarpgroupThreads;  // both PV halves arrive on p_free
  const int wg = threadIdx.x / kWarpgroupThreads;
  const int tid = thread_in_warpgroup();
  {
    T* flat = reinterpret_cast<T*>(&s);
    constexpr int kElems = offsetof(Smem, alpha) / sizeof(T);
    for (int i = threadIdx.x; i < kElems; i += kThreads) flat[i] = init[i];
  }
  if (threadIdx.x == 0) {
    for (int i = 0; i < kPBufs; ++i) {
      cutlass::arch::ClusterBarrier::init(&s.p_full[i], kWarpgroupThreads);
      cutlass::arch::ClusterBarrier::init(&s.p_free[i], kPvThreads);
    }
    cutlass::arch::fence_barrier_init();
  }
  cutlass::arch::fence_view_async_shared();
  __syncthreads();

  Parts<kN> parts{s, tid};
  Tensor cO = parts.mma_o.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHalfDimV>>{}));
  CUTE_UNROLL
  for (int i = 0; i < size(cO); ++i) parts.rows[row_slot(get<0>(cO(i)))] = get<0>(cO(i));
  float out = 0.f;
  SoftmaxState st;
  st.reset();
  float alpha[kRowsPerThread];
  const long long t0 = clock64();
  constexpr bool kThreeRoles = consumer_wgs(kOrder) == 3;
  const bool is_s = wg == 0;
  const int half = kThreeRoles ? wg - 1 : wg;

  if (is_s) {
    Tensor sA = partition_fragment_C(parts.mma_s, Shape<Int<kBlockM>, Int<kN>>{});
    if constexpr (kOrder == kToday || kOrder == kThree) {
      Tensor o = partition_fragment_C(parts.mma_o, Shape<Int<kBlockM>, Int<kHalfDimV>>{});
      if constexpr (!kThreeRoles) clear(o);
      for (int b = 0; b < iters; ++b) {
        parts.template qk_issue<true>(sA);
        warpgroup_wait<0>();
        warpgroup_fence_operand(sA);
        parts.template softmax_hand_over<kSoftmax>(sA, b, st, alpha);
        if constexpr (!kThreeRoles) {
          rescale_output(o, cO, alpha);
          parts.pv_issue(o, b % kPBufs, 0);
          warpgroup_wait<0>();
          warpgroup_fence_operand(o);
          cutlass::arch::ClusterBarrier::arrive(&s.p_free[b % kPBufs]);
        }
      }
      if constexpr (!kThreeRoles) out += acc_sum(o);
    } else if constexpr (kOrder == kTodayNoWait) {
      // Warpgroup 0 does not wait for its PV(b) before QK^T(b + 1): it learns PV(b) is done at a
      // wait between QK^T(b + 1)'s two batches (attempt 41's order), and releases P(b) there.
      Tensor o = partition_fragment_C(parts.mma_o, Shape<Int<kBlockM>, Int<kHalfDimV>>{});
      clear(o);
      for (int b = 0; b < iters; ++b) {
        parts.template qk_tiles<0, kQkFirstTiles>(sA);
        if (b > 0) {
          warpgroup_wait<1>();
          cutlass::arch::ClusterBarrier::arrive(&s.p_free[(b - 1) % kPBufs]);
        }
        parts.template qk_tiles<kQkFirstTiles, kNumKTiles>(sA);
        warpgroup_wait<0>();
        warpgroup_fence_operand(sA);
        warpgroup_fence_operand(o);
        parts.template softmax_hand_over<kSoftmax>(sA, b, st, alpha);
        rescale_output(o, cO, alpha);
        parts.pv_issue(o, b % kPBufs, 0);
      }
      warpgroup_wait<0>();
      warpgroup_fence_operand(o);
      cutlass::arch::ClusterBarrier::arrive(&s.p_free[(iters - 1) % kPBufs]);
      out += acc_sum(o);
    } else if constexpr (kOrder == kTodayEarly) {
      // Two score accumulators; only kEarlyTiles of QK^T(b + 1) run under softmax(b).
      Tensor sB = partition_fragment_C(parts.mma_s, Shape<Int<kBlockM>, Int<kN>>{});
      Tensor o = partition_fragment_C(parts.mma_o, Shape<Int<kBlockM>, Int<kHalfDimV>>{});
      clear(o);
      auto step = [&](auto& cur, auto& nxt, int b) {
        parts.template qk_tiles<0, kEarlyTiles>(nxt);
        parts.template softmax_hand_over<kSoftmax>(cur, b, st, alpha);
        rescale_output(o, cO, alpha);
        parts.pv_issue(o, b % kPBufs, 0);
        parts.template qk_tiles<kEarlyTiles, kNumKTiles>(nxt);
        warpgroup_wait<0>();
        warpgroup_fence_operand(nxt);
        warpgroup_fence_operand(o);
        cutlass::arch::ClusterBarrier::arrive(&s.p_free[b % kPBufs]);
      };
      parts.template qk_tiles<0, kNumKTiles>(sA);
      warpgroup_wait<0>();
      warpgroup_fence_operand(sA);
      for (int b = 0; b < iters; b += 2) {
        step(sA, sB, b);
        step(sB, sA, b + 1);
      }
      out += acc_sum(o);
    } else {
      // Two score accumulators: QK^T(b + 1) runs while softmax(b) does. Blocks go in pairs so that
      // each accumulator's role is fixed at compile time (a run-time choice makes ptxas see a
      // path that reads scores in flight, and serialise every wgmma).
      Tensor sB = partition_fragment_C(parts.mma_s, Shape<Int<kBlockM>, Int<kN>>{});
      Tensor o = partition_fragment_C(parts.mma_o, Shape<Int<kBlockM>, Int<kHalfDimV>>{});
      if constexpr (!kThreeRoles) clear(o);
      auto step = [&](auto& cur, auto& nxt, int b) {
        // QK^T(b) is done (the previous step's wait); QK^T(b + 1) runs under softmax(b).
        parts.template qk_issue<false>(nxt);
        parts.template softmax_hand_over<kSoftmax>(cur, b, st, alpha);
        if constexpr (!kThreeRoles) {
          rescale_output(o, cO, alpha);
          parts.pv_issue(o, b % kPBufs, 0);
        }
        warpgroup_wait<0>();
        warpgroup_fence_operand(nxt);
        if constexpr (!kThreeRoles) {
          warpgroup_fence_operand(o);
          cutlass::arch::ClusterBarrier::arrive(&s.p_free[b % kPBufs]);
        }
      };
      parts.template qk_issue<false>(sA);
      warpgroup_wait<0>();
      warpgroup_fence_operand(sA);
      for (int b = 0; b < iters; b += 2) {
        step(sA, sB, b);
        step(sB, sA, b + 1);
      }
      if constexpr (!kThreeRoles) out += acc_sum(o);
    }
    out += acc_sum(sA);
  } else {
    // A PV side: warpgroup 1 of the two-warpgroup orders, or either PV warpgroup of three.
    Tensor o = partition_fragment_C(parts.mma_o, Shape<Int<kBlockM>, Int<kHalfDimV>>{});
    clear(o);
    for (int b = 0; b < iters; ++b) {
      const int buf = parts.wait_p(o, cO, b);
      parts.pv_issue(o, buf, half);
      warpgroup_wait<0>();
      warpgroup_fence_operand(o);
      cutlass::arch::ClusterBarrier::arrive(&s.p_free[buf]);
    }
    out += acc_sum(o);
  }
  __syncthreads();
  const long long t1 = clock64();
  if (threadIdx.x == 0) cycles[blockIdx.x] = t1 - t0;
  if (out == 12345.f) sink[blockIdx.x] = out;  // never true in practice; keeps the sums live
}

// What a timed case reports: cycles per 64 tokens (SM-cycles for the pair) and the clock.
struct CaseResult {
  double per_block;
  double mhz;
};

template <int kOrder, bool kSoftmax, int kN = kBlockN>
CaseResult run_case(const T* d_init, int sms, int iters, long long* d_cycles, float* d_sink, bool quiet = false) {
  auto kernel = chain_kernel<kOrder, kSoftmax, kN>;
  constexpr int kThreads = consumer_wgs(kOrder) * kWarpgroupThreads;
  const int smem = int(sizeof(Smem));
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  const probe::Timing t = probe::time_launch(
      [&](int n) {
        kernel<<<sms, kThreads, smem>>>(d_init, n, d_cycles, d_sink);
        return cudaSuccess;
      },
      iters, sms, d_cycles);
  const double per_block = t.mean_cycles / iters * kBlockN / kN;  // per 64 tokens
  if (!quiet)
    std::printf("%-9s | %2d-token steps | softmax %-3s | %6.0f cyc/block | %5.1f%% of the bare mix's period | %4.0f MHz%s%s\n",
                order_name(kOrder), kN, kSoftmax ? "yes" : "no", per_block, 100.0 * kBareBlockCycles / per_block, t.mhz,
                t.err == cudaSuccess ? "" : " | ", t.err == cudaSuccess ? "" : cudaGetErrorString(t.err));
  return {per_block, t.mhz};
}

// Seconds of one case back to back (nvidia-smi beside it): the clock it holds under the power
// limit, and so the time a block takes there, which is what a power-capped cell sees. `run`
// times one launch quietly and returns its CaseResult.
template <class Run>
void report_sustained(const char* name, double seconds, Run&& run) {
  double per_block = 0;  // the same in every launch: SM cycles do not depend on the clock
  const probe::Sustained r = probe::sustain(seconds, [&] {
    const CaseResult c = run();
    per_block = c.per_block;
    return c.mhz;
  });
  std::printf("sustained %-9s (softmax) | %.1f s, %d launches | %6.0f cyc/block | mean %4.0f MHz | %6.1f ns a block\n",
              name, r.seconds, r.launches, per_block, r.mhz, per_block / r.mhz * 1e3);
}

// ---- The channel-split pair (NOTES, thirty-fourth session: the one family the residency
// numbers do not rule out). A 2-CTA cluster shares a row block: CTA r computes the partial
// scores over its half of the 576 channels (column tiles 4r..4r+3 and half of the RoPE tile:
// 18 of the 36 k-steps), the two partials cross through distributed shared memory (st.async into
// the peer's buffer, counted by the peer's transaction barrier), each CTA adds them in the same
// order-free way (a + b == b + a) and so computes the identical softmax, and each runs PV on its
// 256 value channels, split over its two warpgroups (N = 128). Warpgroup 0 issues the next
// block's partial QK^T before the exchange and softmax of this one (two score accumulators).
// Per CTA a block's tensor work is half of today's, so a pair's cycles a block compare with
// today's chain at half: printed as SM-cycles per 64 tokens (2 x the pair's period).
constexpr int kPairSteps = 18;  // k-steps of QK^T per CTA
constexpr int kQuarterV = kHeadDimV / 4;
using MmaO128 = decltype(make_tiled_mma(GMMA::ss_op_selector<T, T, float, Shape<Int<kBlockM>, Int<kQuarterV>, Int<kBlockN>>,
                                                             GMMA::Major::K, GMMA::Major::MN>()));
constexpr int kXFloats = 32;  // a thread's partial scores (a 64 x 64 fp32 tile over 128 threads)
// Exchange buffers (16 KiB each, and as many staging buffers for the bulk copy): two let the
// partial of b + 1 leave before the peer's of b is read; -DPAIR_X_BUFS=1 is the shared-memory
// budget a pair kernel with loads could afford beside four K half-blocks (NOTES, 35th session).
#ifndef PAIR_X_BUFS
#define PAIR_X_BUFS 2
#endif
constexpr int kXBufs = PAIR_X_BUFS;
static_assert(kXBufs == 1 || kXBufs == 2, "one or two exchange buffers");
// Remote arrivals telling the peer its buffer was read: one per thread, or (-DPAIR_WARP_ARRIVE)
// one per warp. Each is a cluster-scope release; 128 of them a block are a suspect for the
// measured exchange cost (NOTES, thirty-fourth session).
#ifdef PAIR_WARP_ARRIVE
constexpr int kXFreeArrivals = kWarpgroupThreads / 32;
#else
constexpr int kXFreeArrivals = kWarpgroupThreads;
#endif

struct PairSmem {
  alignas(1024) T q[cosize_v<typename Traits::SmemLayoutQ>];
  alignas(1024) T k[cosize_v<typename Traits::SmemLayoutK>];
  alignas(1024) T p[kPBufs][cosize_v<typename Traits::SmemLayoutP>];
  alignas(128) float x[kXBufs][kWarpgroupThreads * kXFloats];   // the peer's partial scores
  alignas(128) float xs[kXBufs][kWarpgroupThreads * kXFloats];  // this CTA's, staged for the copy
  float alpha[kPBufs][kBlockM];
  alignas(8) uint64_t p_full[kPBufs];
  alignas(8) uint64_t p_free[kPBufs];
  alignas(8) uint64_t x_full[kXBufs];  // the peer's partial landed (transaction bytes)
  alignas(8) uint64_t x_free[kXBufs];  // the peer has read what this CTA wrote into its buffer
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ uint32_t peer_addr(uint32_t local, uint32_t peer) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(local), "r"(peer));
  return r;
}
__device__ __forceinline__ void wait_cluster(uint64_t* bar, int parity) {
  asm volatile(
      "{\n\t.reg .pred p;\n\tLAB_WAIT:\n\t"
      "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%0], %1;\n\t"
      "@!p bra LAB_WAIT;\n\t}" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}

// kExchange = false: a bound, each CTA's softmax on its own partial scores (wrong on purpose).
// kDepth: score accumulators in warpgroup 0 (2: the exchange of b on b's step; 3: one step ahead).
template <bool kSoftmax, bool kExchange = true, int kDepth = 2>
__global__ void __launch_bounds__(2 * kWarpgroupThreads, 1)
    pair_kernel(const T* __restrict__ init, int iters, long long* __restrict__ cycles, float* __restrict__ sink) {
  extern __shared__ __align__(1024) char smem_raw[];
  PairSmem& s = *reinterpret_cast<PairSmem*>(smem_raw);
  const int wg = threadIdx.x / kWarpgroupThreads;
  const int tid = thread_in_warpgroup();
  const uint32_t rank = cute::block_rank_in_cluster(), peer = rank ^ 1;
  {
    T* flat = reinterpret_cast<T*>(&s);
    constexpr int kElems = offsetof(PairSmem, x) / sizeof(T);
    for (int i = threadIdx.x; i < kElems; i += 2 * kWarpgroupThreads) flat[i] = init[i];
  }
  if (threadIdx.x == 0) {
    for (int i = 0; i < kPBufs; ++i) {
      cutlass::arch::ClusterBarrier::init(&s.p_full[i], kWarpgroupThreads);
      cutlass::arch::ClusterBarrier::init(&s.p_free[i], 2 * kWarpgroupThreads);
    }
    for (int i = 0; i < kXBufs; ++i) {
      cutlass::arch::ClusterBarrier::init(&s.x_full[i], 1);
      cutlass::arch::ClusterBarrier::init(&s.x_free[i], kXFreeArrivals);
    }
    cutlass::arch::fence_barrier_init();
  }
  cutlass::arch::fence_view_async_shared();
  cute::cluster_sync();  // both CTAs' barriers exist before any remote operation

  // The softmax, P hand-over and PV-side wait are the single-CTA orders' (Parts); the pair's own
  // parts are its half of QK^T, the exchange, and PV on a quarter of the value channels.
  Parts<kBlockN, PairSmem> parts{s, tid};
  auto& mma_s = parts.mma_s;
  MmaO128 mma_o;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_o = mma_o.get_thread_slice(tid);
  Tensor cO = thr_o.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kQuarterV>>{}));
  CUTE_UNROLL
  for (int i = 0; i < size(cO); ++i) parts.rows[row_slot(get<0>(cO(i)))] = get<0>(cO(i));
  Tensor o = partition_fragment_C(mma_o, Shape<Int<kBlockM>, Int<kQuarterV>>{});
  clear(o);
  const int quarter = 2 * int(rank) + wg;  // this warpgroup's 128 value channels
  auto pv_issue = [&](int buf) { parts.template pv_slice<kQuarterV>(mma_o, o, buf, quarter); };
  float out = 0.f;
  const long long t0 = clock64();
  if (wg == 0) {
    Tensor sA = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor sB = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
    SoftmaxState st;
    st.reset();
    auto qk_issue = [&](auto& acc) {  // this CTA's 18 k-steps: tiles 4r..4r+3, RoPE steps 2r, 2r+1
      Tensor tQ = thr_s.partition_fragment_A(make_tensor(make_smem_ptr(launder(s.q)), typename Traits::SmemLayoutQ{}));
      Tensor tK = thr_s.partition_fragment_B(make_tensor(make_smem_ptr(launder(s.k)), typename Traits::SmemLayoutK{}));
      warpgroup_fence_operand(acc);
      warpgroup_arrive();
      mma_s.accumulate_ = GMMA::ScaleOut::Zero;
      CUTE_UNROLL
      for (int j = 0; j < kPairSteps; ++j) {
        const int k = j < 16 ? 16 * int(rank) + j : 32 + 2 * int(rank) + (j - 16);
        cute::gemm(mma_s, tQ(_, _, k), tK(_, _, k), acc);
        mma_s.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
    };
    // Partial scores of block b out to the peer (into its buffer b % kXBufs, once it has read
    // b - kXBufs's there), with this CTA's expectation of the peer's partial of b.
    auto send = [&](auto& cur, int b) {
      const int buf = b % kXBufs, use = b / kXBufs;
      wait_cluster(&s.x_free[buf], (use & 1) ^ 1);
#ifdef PAIR_ST_ASYNC
      // Each thread's 32 floats straight into the peer (measured: 1024 transaction completions
      // a block on one barrier, a 4776-cycle pair period without softmax).
      const uint32_t dst = peer_addr(smem_u32(&s.x[buf][tid * kXFloats]), peer);
      const uint32_t bar = peer_addr(smem_u32(&s.x_full[buf]), peer);
      CUTE_UNROLL
      for (int i = 0; i < kXFloats; i += 4)
        asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32 [%0], {%1, %2, %3, %4}, [%5];" ::"r"(
                         dst + 4 * i),
                     "f"(cur(i)), "f"(cur(i + 1)), "f"(cur(i + 2)), "f"(cur(i + 3)), "r"(bar)
                     : "memory");
#else
      // Staged locally, then one bulk copy into the peer with one transaction completion.
      float4* stage = reinterpret_cast<float4*>(&s.xs[buf][tid * kXFloats]);
      CUTE_UNROLL
      for (int i = 0; i < kXFloats; i += 4) stage[i / 4] = make_float4(cur(i), cur(i + 1), cur(i + 2), cur(i + 3));
      cutlass::arch::fence_view_async_shared();
      cutlass::arch::NamedBarrier::sync(kWarpgroupThreads, 1);
      if (tid == 0)
        asm volatile(
            "cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                peer_addr(smem_u32(&s.x[buf][0]), peer)),
            "r"(smem_u32(&s.xs[buf][0])), "r"(kWarpgroupThreads * kXFloats * 4), "r"(peer_addr(smem_u32(&s.x_full[buf]), peer))
            : "memory");
#endif
      if (tid == 0)
        cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&s.x_full[buf], kWarpgroupThreads * kXFloats * 4);
    };
    // The peer's partial of block b added into cur (cur becomes the full scores); the peer told
    // its buffer is free.
    auto receive = [&](auto& cur, int b) {
      const int buf = b % kXBufs, use = b / kXBufs;
      wait_cluster(&s.x_full[buf], use & 1);
      const float4* mine = reinterpret_cast<const float4*>(&s.x[buf][tid * kXFloats]);
      CUTE_UNROLL
      for (int i = 0; i < kXFloats; i += 4) {
        const float4 v = mine[i / 4];
        cur(i) += v.x, cur(i + 1) += v.y, cur(i + 2) += v.z, cur(i + 3) += v.w;
      }
#ifdef PAIR_WARP_ARRIVE
      __syncwarp();
      if (tid % 32 == 0)
#endif
        asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(
                         peer_addr(smem_u32(&s.x_free[buf]), peer))
                     : "memory");
    };
    auto softmax_pv = [&](auto& cur, int b) {
      float alpha[kRowsPerThread];
      parts.template softmax_hand_over<kSoftmax>(cur, b, st, alpha);
      rescale_output(o, cO, alpha);
      pv_issue(b % kPBufs);
    };
    if constexpr (kDepth == 2) {
      // The exchange of b on b's own step: QK^T(b + 1) is the only work under its round trip.
      auto step = [&](auto& cur, auto& nxt, int b) {
        qk_issue(nxt);  // partial QK^T(b + 1) runs under the exchange and softmax of b
        if constexpr (kExchange) send(cur, b), receive(cur, b);
        softmax_pv(cur, b);
        warpgroup_wait<0>();
        warpgroup_fence_operand(nxt);
        warpgroup_fence_operand(o);
        cutlass::arch::ClusterBarrier::arrive(&s.p_free[b % kPBufs]);
      };
      qk_issue(sA);
      warpgroup_wait<0>();
      warpgroup_fence_operand(sA);
      for (int b = 0; b < iters; b += 2) {
        step(sA, sB, b);
        step(sB, sA, b + 1);
      }
    } else {
      // Three score accumulators: the partial of b + 1 leaves a whole step before it is needed,
      // so its round trip runs under QK^T(b + 2), softmax(b) and PV(b). Nothing is in flight
      // across a step's end: with wgmmas in flight into the loop (or a wait<1> over three groups)
      // ptxas serialised every wgmma (C7514/C7515).
      Tensor sC = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
      auto step = [&](auto& cur, auto& nxt, auto& nw, int b) {
        qk_issue(nw);
        // With one exchange buffer the peer's partial of b is read before b + 1 overwrites it.
        if constexpr (kExchange && kXBufs == 1) receive(cur, b), send(nxt, b + 1);
        if constexpr (kExchange && kXBufs == 2) send(nxt, b + 1), receive(cur, b);
        softmax_pv(cur, b);
        warpgroup_wait<0>();
        warpgroup_fence_operand(nw);
        warpgroup_fence_operand(o);
        cutlass::arch::ClusterBarrier::arrive(&s.p_free[b % kPBufs]);
      };
      qk_issue(sA);
      qk_issue(sB);
      warpgroup_wait<0>();
      warpgroup_fence_operand(sA);
      warpgroup_fence_operand(sB);
      if constexpr (kExchange) send(sA, 0);
      for (int b = 0; b < iters; b += 3) {
        step(sA, sB, sC, b);
        step(sB, sC, sA, b + 1);
        step(sC, sA, sB, b + 2);
      }
      if constexpr (kExchange) receive(sA, iters);  // the last step sent block iters
      out += acc_sum(sC);
    }
    out += acc_sum(sA);
  } else {
    for (int b = 0; b < iters; ++b) {
      const int buf = parts.wait_p(o, cO, b);
      pv_issue(buf);
      warpgroup_wait<0>();
      warpgroup_fence_operand(o);
      cutlass::arch::ClusterBarrier::arrive(&s.p_free[buf]);
    }
  }
  out += acc_sum(o);
  const long long t1 = clock64();
  cute::cluster_sync();  // no remote arrival may reach an exited CTA
  if (threadIdx.x == 0) cycles[blockIdx.x] = t1 - t0;
  if (out == 12345.f) sink[blockIdx.x] = out;
}

// Prints SM-cycles per 64 tokens (two SMs share each block).
template <bool kSoftmax, bool kExchange = true, int kDepth = 2>
CaseResult run_pair(const T* d_init, int sms, int iters, long long* d_cycles, float* d_sink, bool quiet = false) {
  auto kernel = pair_kernel<kSoftmax, kExchange, kDepth>;
  const int smem = int(sizeof(PairSmem));
  const int ctas = sms / 2 * 2;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(ctas);
  cfg.blockDim = dim3(2 * kWarpgroupThreads);
  cfg.dynamicSmemBytes = smem;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 2, attr[0].val.clusterDim.y = 1, attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr, cfg.numAttrs = 1;
  const probe::Timing t = probe::time_launch(
      [&](int n) { return cudaLaunchKernelEx(&cfg, kernel, d_init, n, d_cycles, d_sink); }, iters, ctas, d_cycles);
  const double per_block = 2 * t.mean_cycles / iters;
  if (!quiet)
    std::printf("pair-%dS   | %-14s | softmax %-3s | %6.0f SM-cyc/block (pair period %5.0f) | %5.1f%% of the bare mix's | %4.0f MHz%s%s\n",
                kDepth, kExchange ? "channel split" : "no exchange", kSoftmax ? "yes" : "no", per_block, t.mean_cycles / iters,
                100.0 * kBareBlockCycles / per_block, t.mhz, t.err == cudaSuccess ? "" : " | ",
                t.err == cudaSuccess ? "" : cudaGetErrorString(t.err));
  return {per_block, t.mhz};
}

}  // namespace chain

int main(int argc, char** argv) {
  using namespace chain;
  // Line-buffered even into a pipe (pair_check.sh tees it): a case that hangs and is killed by
  // the script's timeout leaves every earlier line in the log (the s36 one-buffer hang left none).
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  int iters = argc > 1 ? std::atoi(argv[1]) : 4000;
  iters = (iters + 5) / 6 * 6;  // the double-S orders walk pairs, the pair's three-S triples
  // Q, K and the P buffers: the same prefix of Smem and PairSmem.
  const T* d_init = probe::random_operands<T>(offsetof(Smem, alpha) / sizeof(T));
  long long* d_cycles;
  float* d_sink;
  cudaMalloc(&d_cycles, sms * sizeof(long long));
  cudaMalloc(&d_sink, sms * sizeof(float));
  std::printf("loop chains without loads, %d CTAs (one per SM), %d 64-token blocks each; cycles per 64 tokens\n", sms, iters);
  // The pair with its exchange, then the bound without it, each without and with the softmax.
  auto pair_cases = [&] {
    run_pair<false>(d_init, sms, iters, d_cycles, d_sink);
    run_pair<true>(d_init, sms, iters, d_cycles, d_sink);
    run_pair<false, false>(d_init, sms, iters, d_cycles, d_sink);
    run_pair<true, false>(d_init, sms, iters, d_cycles, d_sink);
    run_pair<false, true, 3>(d_init, sms, iters, d_cycles, d_sink);
    run_pair<true, true, 3>(d_init, sms, iters, d_cycles, d_sink);
    run_pair<false, false, 3>(d_init, sms, iters, d_cycles, d_sink);
    run_pair<true, false, 3>(d_init, sms, iters, d_cycles, d_sink);
  };
  const double sustain_s = argc > 2 ? std::atof(argv[2]) : 0.0;
#ifdef PAIR_ONLY  // -DPAIR_ONLY: a quicker build of the pair's cases alone, whatever the arguments
  constexpr bool kPairOnly = true;
#else
  constexpr bool kPairOnly = false;
#endif
  // A third argument (or a -DPAIR_ONLY build): the pair alone (and, with seconds, pair-3S under
  // the cap).
  if (kPairOnly || argc > 3) {
    pair_cases();
    if (sustain_s > 0)
      report_sustained("pair-3S", sustain_s,
                       [&] { return run_pair<true, true, 3>(d_init, sms, 10 * iters, d_cycles, d_sink, true); });
    return 0;
  }
#ifndef PAIR_ONLY
  run_case<kToday, false>(d_init, sms, iters, d_cycles, d_sink);
  run_case<kToday, true>(d_init, sms, iters, d_cycles, d_sink);
  run_case<kTodayDoubleS, false>(d_init, sms, iters, d_cycles, d_sink);
  run_case<kTodayDoubleS, true>(d_init, sms, iters, d_cycles, d_sink);
  run_case<kThree, false>(d_init, sms, iters, d_cycles, d_sink);
  run_case<kThree, true>(d_init, sms, iters, d_cycles, d_sink);
  run_case<kThreeDoubleS, false>(d_init, sms, iters, d_cycles, d_sink);
  run_case<kThreeDoubleS, true>(d_init, sms, iters, d_cycles, d_sink);
  run_case<kTodayNoWait, false>(d_init, sms, iters, d_cycles, d_sink);
  run_case<kTodayNoWait, true>(d_init, sms, iters, d_cycles, d_sink);
  run_case<kTodayEarly, false>(d_init, sms, iters, d_cycles, d_sink);
  run_case<kTodayEarly, true>(d_init, sms, iters, d_cycles, d_sink);
  // Half-block steps (twice the steps for the same tokens).
  run_case<kToday, false, 32>(d_init, sms, 2 * iters, d_cycles, d_sink);
  run_case<kToday, true, 32>(d_init, sms, 2 * iters, d_cycles, d_sink);
  run_case<kTodayDoubleS, false, 32>(d_init, sms, 2 * iters, d_cycles, d_sink);
  run_case<kTodayDoubleS, true, 32>(d_init, sms, 2 * iters, d_cycles, d_sink);
  pair_cases();

  // Optional: seconds of each of today's and today-2S's chains (with softmax) under the power cap.
  if (sustain_s > 0) {
    report_sustained("today", sustain_s, [&] { return run_case<kToday, true>(d_init, sms, 10 * iters, d_cycles, d_sink, true); });
    report_sustained("today-2S", sustain_s,
                     [&] { return run_case<kTodayDoubleS, true>(d_init, sms, 10 * iters, d_cycles, d_sink, true); });
    report_sustained("today", sustain_s, [&] { return run_case<kToday, true>(d_init, sms, 10 * iters, d_cycles, d_sink, true); });
    // The pair's "ns a block" is SM-ns (its SM-cycles at the clock), comparable with the others'.
    report_sustained("pair-2S", sustain_s, [&] { return run_pair<true>(d_init, sms, 10 * iters, d_cycles, d_sink, true); });
  }
#endif
  return 0;
}
