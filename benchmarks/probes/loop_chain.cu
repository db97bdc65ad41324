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
//   today-2S:     warpgroup 0 issues QK^T(b + 1) before softmax(b) and does not wait for its
//                 PV(b) until the next block's scores are needed (two S accumulators).
//   three:        S warpgroup: QK^T and softmax only; two PV warpgroups (three_role_proto.cu's
//                 order, without its ring).
//   three-2S:     the same, S issuing QK^T(b + 1) before softmax(b) (attempt 66's order).
// Printed per case: cycles a block (mean over CTAs), and the same as % of the bare mix's 2323.
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -Icpp \
//     -isystem <cutlass include> -o .device/loop_chain benchmarks/probes/loop_chain.cu
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "config.h"
#include "decode/kernel_traits.cuh"
#include "decode/softmax.cuh"

using namespace cute;
using namespace jax_flashmla;
using namespace jax_flashmla::decode;

namespace chain {

using T = cutlass::bfloat16_t;
using Traits = KernelTraits<T>;
using MmaS = typename Traits::TiledMmaS;
using MmaO = typename Traits::TiledMmaO;

enum Order : int { kToday, kTodayDoubleS, kThree, kThreeDoubleS };
const char* order_name(int o) {
  static const char* names[] = {"today", "today-2S", "three", "three-2S"};
  return names[o];
}
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
  alignas(1024) T p[kPBufs][cosize_v<typename Traits::SmemLayoutP>];
  float alpha[kPBufs][kBlockM];
  alignas(8) uint64_t p_full[kPBufs];  // P(b) and its factors stored: the S side's threads arrive
  alignas(8) uint64_t p_free[kPBufs];  // PV(b) done: every thread that ran a PV on it arrives
};

// Opaque pointer: operands re-addressed each block, as in the loop whose stages move (otherwise
// ptxas hoists a QK^T's 72 descriptors into registers).
template <class P>
__device__ __forceinline__ P* launder(P* p) {
  asm volatile("" : "+l"(p));
  return p;
}

// The loop's pieces, for one warpgroup.
struct Parts {
  Smem& s;
  int tid;
  int rows[kRowsPerThread];  // the two tile rows this thread holds, in S and in O alike
  MmaS mma_s;
  MmaO mma_o;

  // QK^T(b) into acc, no wait: two batches and commits (the kernel's two landing groups) or,
  // where another batch may be in flight, one (ptxas follows wgmma.wait_group counts of single
  // commits only: with two it serialised the double-S orders, C7514/C7515).
  template <bool kTwoBatches, class Acc>
  __device__ void qk_issue(Acc& acc) {
    auto thr = mma_s.get_thread_slice(tid);
    Tensor tQ = thr.partition_fragment_A(make_tensor(make_smem_ptr(launder(s.q)), typename Traits::SmemLayoutQ{}));
    Tensor tK = thr.partition_fragment_B(make_tensor(make_smem_ptr(launder(s.k)), typename Traits::SmemLayoutK{}));
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

  // O_half += P(buf) V_half: one commit, no wait.
  template <class Acc>
  __device__ void pv_issue(Acc& o, int buf, int half) {
    auto thr = mma_o.get_thread_slice(tid);
    Tensor sVt = make_tensor(make_smem_ptr(launder(s.k)), typename Traits::SmemLayoutVt{});
    Tensor tP = thr.partition_fragment_A(make_tensor(make_smem_ptr(launder(s.p[buf])), typename Traits::SmemLayoutP{}));
    Tensor tV = thr.partition_fragment_B(local_tile(sVt, Shape<Int<kHalfDimV>, Int<kBlockN>>{}, make_coord(half, _0{})));
    warpgroup_fence_operand(o);
    warpgroup_arrive();
    mma_o.accumulate_ = GMMA::ScaleOut::One;
    CUTE_UNROLL
    for (int k = 0; k < size<2>(tP); ++k) cute::gemm(mma_o, tP(_, _, k), tV(_, _, k), o);
    warpgroup_commit_batch();
  }

  // Softmax of finished scores (or none: P = S, alpha = 1), then P(b) and the factors into
  // buffer b % kPBufs once the PVs of b - kPBufs are done, and the hand-over.
  template <bool kSoftmax, class Acc>
  __device__ void softmax_hand_over(Acc& acc, int b, SoftmaxState& st, float (&alpha)[kRowsPerThread]) {
    Tensor cS = mma_s.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
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
    Tensor sP = make_tensor(make_smem_ptr(s.p[buf]), typename Traits::SmemLayoutP{});
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

template <class Acc>
__device__ __forceinline__ float acc_sum(Acc const& acc) {
  float x = 0.f;
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) x += acc(i);
  return x;
}

template <int kOrder, bool kSoftmax>
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

  Parts parts{s, tid};
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
    Tensor sA = partition_fragment_C(parts.mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
    if constexpr (kOrder == kToday || kOrder == kThree) {
      Tensor o = partition_fragment_C(parts.mma_o, Shape<Int<kBlockM>, Int<kHalfDimV>>{});
      if constexpr (!kThreeRoles) clear(o);
      for (int b = 0; b < iters; ++b) {
        parts.qk_issue<true>(sA);
        warpgroup_wait<0>();
        warpgroup_fence_operand(sA);
        parts.softmax_hand_over<kSoftmax>(sA, b, st, alpha);
        if constexpr (!kThreeRoles) {
          rescale_output(o, cO, alpha);
          parts.pv_issue(o, b % kPBufs, 0);
          warpgroup_wait<0>();
          warpgroup_fence_operand(o);
          cutlass::arch::ClusterBarrier::arrive(&s.p_free[b % kPBufs]);
        }
      }
      if constexpr (!kThreeRoles) out += acc_sum(o);
    } else {
      // Two score accumulators: QK^T(b + 1) runs while softmax(b) does. Blocks go in pairs so that
      // each accumulator's role is fixed at compile time (a run-time choice makes ptxas see a
      // path that reads scores in flight, and serialise every wgmma).
      Tensor sB = partition_fragment_C(parts.mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
      Tensor o = partition_fragment_C(parts.mma_o, Shape<Int<kBlockM>, Int<kHalfDimV>>{});
      if constexpr (!kThreeRoles) clear(o);
      auto step = [&](auto& cur, auto& nxt, int b) {
        // QK^T(b) is done (the previous step's wait); QK^T(b + 1) runs under softmax(b).
        parts.qk_issue<false>(nxt);
        parts.softmax_hand_over<kSoftmax>(cur, b, st, alpha);
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
      parts.qk_issue<false>(sA);
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

template <int kOrder, bool kSoftmax>
void run_case(const T* d_init, int sms, int iters, long long* d_cycles, float* d_sink) {
  auto kernel = chain_kernel<kOrder, kSoftmax>;
  constexpr int kThreads = consumer_wgs(kOrder) * kWarpgroupThreads;
  const int smem = int(sizeof(Smem));
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  kernel<<<sms, kThreads, smem>>>(d_init, 2, d_cycles, d_sink);  // warm-up
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0), cudaEventCreate(&e1);
  cudaEventRecord(e0);
  kernel<<<sms, kThreads, smem>>>(d_init, iters, d_cycles, d_sink);
  cudaEventRecord(e1);
  cudaError_t err = cudaEventSynchronize(e1);
  if (err == cudaSuccess) err = cudaGetLastError();
  std::vector<long long> cyc(sms);
  cudaMemcpy(cyc.data(), d_cycles, sms * sizeof(long long), cudaMemcpyDeviceToHost);
  float ms = 0.f;
  cudaEventElapsedTime(&ms, e0, e1);
  long long mx = 0;
  double mean = 0;
  for (long long c : cyc) mx = std::max(mx, c), mean += double(c) / sms;
  const double per_block = mean / iters;
  std::printf("%-9s | softmax %-3s | %6.0f cyc/block | %5.1f%% of the bare mix's period | %4.0f MHz%s%s\n",
              order_name(kOrder), kSoftmax ? "yes" : "no", per_block, 100.0 * kBareBlockCycles / per_block,
              mx / (ms * 1e3), err == cudaSuccess ? "" : " | ", err == cudaSuccess ? "" : cudaGetErrorString(err));
  cudaEventDestroy(e0), cudaEventDestroy(e1);
}

}  // namespace chain

int main(int argc, char** argv) {
  using namespace chain;
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  int iters = argc > 1 ? std::atoi(argv[1]) : 4000;
  iters += iters % 2;  // the double-S orders walk pairs
  const size_t elems = offsetof(Smem, alpha) / sizeof(T);
  std::vector<T> h(elems);
  std::mt19937 gen(1);
  std::normal_distribution<float> nd(0.f, 0.1f);
  for (auto& x : h) x = T(std::max(-1.f, std::min(1.f, nd(gen))));
  T* d_init;
  long long* d_cycles;
  float* d_sink;
  cudaMalloc(&d_init, elems * sizeof(T));
  cudaMalloc(&d_cycles, sms * sizeof(long long));
  cudaMalloc(&d_sink, sms * sizeof(float));
  cudaMemcpy(d_init, h.data(), elems * sizeof(T), cudaMemcpyHostToDevice);
  std::printf("loop chains without loads, %d CTAs (one per SM), %d blocks each\n", sms, iters);
  run_case<kToday, false>(d_init, sms, iters, d_cycles, d_sink);
  run_case<kToday, true>(d_init, sms, iters, d_cycles, d_sink);
  run_case<kTodayDoubleS, false>(d_init, sms, iters, d_cycles, d_sink);
  run_case<kTodayDoubleS, true>(d_init, sms, iters, d_cycles, d_sink);
  run_case<kThree, false>(d_init, sms, iters, d_cycles, d_sink);
  run_case<kThree, true>(d_init, sms, iters, d_cycles, d_sink);
  run_case<kThreeDoubleS, false>(d_init, sms, iters, d_cycles, d_sink);
  run_case<kThreeDoubleS, true>(d_init, sms, iters, d_cycles, d_sink);
  return 0;
}
