// Probe (not the library's kernel): the tensor-core rate of the decode loop's wgmma shapes, with
// every operand already in shared memory or registers, no loads, no softmax, no hand-overs.
// Question (benchmarks/NOTES.md, thirty-third session): both block loops, today's and the
// three-role prototype, bottom out at ~3150-3250 cycles a 64-token block once refills and softmax
// are removed, 75% of the nominal 4096 bf16 FLOP a cycle. Is that the rate these instructions
// run at, whoever issues them, or a cost of how the loops issue them?
//
// Each case gives up to three warpgroups a role, and every warpgroup runs `iters` iterations of
// its role's wgmma batch (arrive, the batch, one commit, wait). With `coupled`, all warpgroups
// meet at a named barrier after every iteration, as the block loop's warpgroups meet once a
// block. One CTA per SM (the operands fill shared memory), 132 CTAs. Printed per case: cycles
// an iteration, FLOP a cycle per SM, % of 4096, and the cycles a 64-token block's 8.9 MFLOP
// would take at that rate.
// H100, 2026-12-07 (NOTES, thirty-fourth session): every shape reaches 4096 FLOP a cycle with two
// warpgroups issuing (one alone: QK^T 91-96%, PV N = 256 86%); today's mix, coupled, 2323 cycles a
// block. So the loops' ~3150-cycle floor is their hand-overs, not the instructions (loop_chain.cu
// measures those). Sustained, the tensor work alone holds the card at its 700 W cap at ~1620 MHz.
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -Icpp \
//     -isystem <cutlass include> -o /tmp/wgmma_rate benchmarks/probes/wgmma_rate.cu
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "config.h"
#include "decode/kernel_traits.cuh"
#include "probe_common.cuh"

using namespace cute;
using namespace jax_flashmla;
using namespace jax_flashmla::decode;

namespace rate {

using T = cutlass::bfloat16_t;
using Traits = KernelTraits<T>;

// What one warpgroup issues per iteration.
enum Role : int {
  kIdle = 0,
  kQkSs,      // QK^T of a block: [64 rows, 576] x [64 tokens, 576]^T, 36 SS m64n64k16
  kQkRs,      // the same with Q's A fragments in registers (one column tile's, reused), 36 RS
  kQkSs128,   // QK^T of two blocks at once: 36 SS m64n128k16 (N = 128 tokens)
  kPv256,     // one warpgroup's PV half: [64, 64 keys] x [64 keys, 256 channels], 4 SS m64n256k16
  kPv64,      // the same as 4 chunks of N = 64: 16 SS m64n64k16 (the prototype's single tiles)
  kQkPv256,   // today's warpgroup 0: kQkSs, wait, then kPv256
};

__host__ __device__ constexpr double role_flops(int r) {
  constexpr double qk = 2.0 * kBlockM * kBlockN * kHeadDim, pv = 2.0 * kBlockM * kBlockN * kHalfDimV;
  return r == kQkSs || r == kQkRs ? qk : r == kQkSs128 ? 2 * qk : r == kPv256 || r == kPv64 ? pv : r == kQkPv256 ? qk + pv : 0;
}

// A 64-token block's tensor work: its QK^T and both PV halves (8.9 MFLOP).
constexpr double kBlockFlops = role_flops(kQkSs) + 2 * role_flops(kPv256);
// Dense bf16 FLOP a cycle per SM at the nominal rate (989 TFLOP/s at 1830 MHz over 132 SMs).
constexpr double kNominalFlopPerClk = 4096;

constexpr int kWideN = 2 * kBlockN;  // tokens of kQkSs128
struct Smem {
  alignas(1024) T q[cosize_v<typename Traits::SmemLayoutQ>];
  // Two blocks of K: kQkSs128 reads both, the other roles the first (V^T over its first 64 KiB).
  alignas(1024) T k[2 * cosize_v<typename Traits::SmemLayoutK>];
  alignas(1024) T p[cosize_v<typename Traits::SmemLayoutP>];
};

using MmaQkSs = typename Traits::TiledMmaS;
using MmaQkRs = decltype(make_tiled_mma(GMMA::rs_op_selector<T, T, float, Shape<Int<kBlockM>, Int<kBlockN>, Int<kHeadDimTile>>,
                                                             GMMA::Major::K, GMMA::Major::K>()));
using MmaQkWide = decltype(make_tiled_mma(GMMA::ss_op_selector<T, T, float, Shape<Int<kBlockM>, Int<kWideN>, Int<kHeadDimTile>>,
                                                               GMMA::Major::K, GMMA::Major::K>()));
using MmaPv256 = typename Traits::TiledMmaO;
using MmaPv64 = decltype(make_tiled_mma(GMMA::ss_op_selector<T, T, float, Shape<Int<kBlockM>, Int<kHeadDimTile>, Int<kBlockN>>,
                                                             GMMA::Major::K, GMMA::Major::MN>()));

// One wgmma batch on acc: the wgmmas that `issue` makes, one commit, and the wait for them.
template <class Acc, class Issue>
__device__ __forceinline__ void batch(Acc& acc, Issue&& issue) {
  warpgroup_fence_operand(acc);
  warpgroup_arrive();
  issue();
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc);
}

// The common batch: acc += a b over every k-step of the fragments.
template <class Mma, class TA, class TB, class Acc>
__device__ __forceinline__ void batch(Mma& mma, TA const& a, TB const& b, Acc& acc) {
  batch(acc, [&] {
    CUTE_UNROLL
    for (int k = 0; k < size<2>(a); ++k) cute::gemm(mma, a(_, _, k), b(_, _, k), acc);
  });
}

using probe::acc_sum;
using probe::launder;

// One warpgroup's role for `iters` iterations; returns a sum of its accumulators (kept so that
// nothing is dead code).
template <int kRole>
__device__ float run_role(Smem& s, int iters, bool coupled, int threads) {
  const int tid = thread_in_warpgroup();
  const int half = (threadIdx.x / kWarpgroupThreads) & 1;  // two PV warpgroups read different V halves
  auto sQ = [&] { return make_tensor(make_smem_ptr(launder(s.q)), typename Traits::SmemLayoutQ{}); };
  auto sK = [&] { return make_tensor(make_smem_ptr(launder(s.k)), typename Traits::SmemLayoutK{}); };
  auto sP = [&] { return make_tensor(make_smem_ptr(launder(s.p)), typename Traits::SmemLayoutP{}); };
  auto sVt = [&] { return make_tensor(make_smem_ptr(launder(s.k)), typename Traits::SmemLayoutVt{}); };
  auto sync = [&] {
    if (coupled) cutlass::arch::NamedBarrier::sync(threads, 1);
  };
  MmaQkSs mqk;
  MmaPv256 mpv;
  mqk.accumulate_ = mpv.accumulate_ = GMMA::ScaleOut::One;
  auto tqk = mqk.get_thread_slice(tid);
  auto tpv = mpv.get_thread_slice(tid);
  auto qk = [&](auto& acc) { batch(mqk, tqk.partition_fragment_A(sQ()), tqk.partition_fragment_B(sK()), acc); };
  auto pv = [&](auto& o, int h) {
    batch(mpv, tpv.partition_fragment_A(sP()),
          tpv.partition_fragment_B(local_tile(sVt(), Shape<Int<kHalfDimV>, Int<kBlockN>>{}, make_coord(h, _0{}))), o);
  };
  float out = 0.f;
  if constexpr (kRole == kQkSs) {
    Tensor acc = partition_fragment_C(mqk, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc);
    for (int i = 0; i < iters; ++i) qk(acc), sync();
    out += acc_sum(acc);
  } else if constexpr (kRole == kQkPv256) {
    Tensor acc = partition_fragment_C(mqk, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor o = partition_fragment_C(mpv, Shape<Int<kBlockM>, Int<kHalfDimV>>{});
    clear(acc), clear(o);
    for (int i = 0; i < iters; ++i) qk(acc), pv(o, 0), sync();
    out += acc_sum(acc) + acc_sum(o);
  } else if constexpr (kRole == kPv256) {
    Tensor o = partition_fragment_C(mpv, Shape<Int<kBlockM>, Int<kHalfDimV>>{});
    clear(o);
    for (int i = 0; i < iters; ++i) pv(o, half), sync();
    out += acc_sum(o);
  } else if constexpr (kRole == kQkRs) {
    MmaQkRs mma;
    mma.accumulate_ = GMMA::ScaleOut::One;
    auto thr = mma.get_thread_slice(tid);
    // One column tile's A fragments in registers, reused for all nine tiles: the rate does not
    // depend on the values, and all of Q would not fit beside the accumulators.
    Tensor sQ0 = local_tile(sQ(), Shape<Int<kBlockM>, Int<kHeadDimTile>>{}, make_coord(_0{}, _0{}));
    Tensor a = thr.partition_fragment_A(sQ0);
    Tensor cA = thr.partition_A(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDimTile>>{}));
    CUTE_UNROLL
    for (int i = 0; i < size(a); ++i) a(i) = sQ0(get<0>(cA(i)), get<1>(cA(i)));
    Tensor acc = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc);
    constexpr int kSteps = kHeadDimTile / 16;
    for (int i = 0; i < iters; ++i) {
      Tensor b = thr.partition_fragment_B(sK());
      batch(acc, [&] {
        CUTE_UNROLL
        for (int k = 0; k < size<2>(b); ++k) cute::gemm(mma, a(_, _, k % kSteps), b(_, _, k), acc);
      });
      sync();
    }
    out += acc_sum(acc);
  } else if constexpr (kRole == kQkSs128) {
    MmaQkWide mma;
    mma.accumulate_ = GMMA::ScaleOut::One;
    auto thr = mma.get_thread_slice(tid);
    Tensor acc = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kWideN>>{});
    clear(acc);
    for (int i = 0; i < iters; ++i) {
      Tensor sK2 = make_tensor(make_smem_ptr(launder(s.k)), tile_to_shape(typename Traits::AtomK{}, Shape<Int<kWideN>, Int<kHeadDim>>{}));
      batch(mma, thr.partition_fragment_A(sQ()), thr.partition_fragment_B(sK2), acc), sync();
    }
    out += acc_sum(acc);
  } else if constexpr (kRole == kPv64) {
    MmaPv64 mma;
    mma.accumulate_ = GMMA::ScaleOut::One;
    auto thr = mma.get_thread_slice(tid);
    constexpr int kChunks = kHalfDimV / kHeadDimTile;
    Tensor o = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kHalfDimV>>{});  // (MMA, 1, kChunks)
    clear(o);
    for (int i = 0; i < iters; ++i) {
      Tensor a = thr.partition_fragment_A(sP());
      batch(o, [&] {
        CUTE_UNROLL
        for (int j = 0; j < kChunks; ++j) {
          Tensor b = thr.partition_fragment_B(
              local_tile(sVt(), Shape<Int<kHeadDimTile>, Int<kBlockN>>{}, make_coord(half * kChunks + j, _0{})));
          Tensor acc = make_tensor(o.data() + j * size<0>(o), make_layout(make_shape(shape<0>(o), _1{}, _1{})));
          CUTE_UNROLL
          for (int k = 0; k < size<2>(a); ++k) cute::gemm(mma, a(_, _, k), b(_, _, k), acc);
        }
      });
      sync();
    }
    out += acc_sum(o);
  }
  return out;
}

constexpr int count_wgs(int r0, int r1, int r2) { return (r0 != kIdle) + (r1 != kIdle) + (r2 != kIdle); }

template <int R0, int R1, int R2>
__global__ void __launch_bounds__(count_wgs(R0, R1, R2) * kWarpgroupThreads, 1)
    rate_kernel(const T* __restrict__ init, int iters, int coupled, long long* __restrict__ cycles, float* __restrict__ sink) {
  extern __shared__ char smem_raw[];
  Smem& s = *reinterpret_cast<Smem*>(smem_raw);
  constexpr int kThreads = count_wgs(R0, R1, R2) * kWarpgroupThreads;
  // Random operands (what the tensor cores toggle on costs power, not rate, but keep it real).
  T* flat = reinterpret_cast<T*>(&s);
  constexpr int kElems = sizeof(Smem) / sizeof(T);
  for (int i = threadIdx.x; i < kElems; i += kThreads) flat[i] = init[i];
  cutlass::arch::fence_view_async_shared();
  __syncthreads();
  const int wg = threadIdx.x / kWarpgroupThreads;
  const long long t0 = clock64();
  float out = 0.f;
  if (wg == 0) out = run_role<R0>(s, iters, coupled, kThreads);
  if constexpr (R1 != kIdle)
    if (wg == 1) out = run_role<R1>(s, iters, coupled, kThreads);
  if constexpr (R2 != kIdle)
    if (wg == 2) out = run_role<R2>(s, iters, coupled, kThreads);
  __syncthreads();
  const long long t1 = clock64();
  if (threadIdx.x == 0) cycles[blockIdx.x] = t1 - t0;
  if (out == 12345.f) sink[blockIdx.x] = out;  // never true in practice; keeps the sums live
}

const char* role_name(int r) {
  static const char* names[] = {"-", "QK SS n64", "QK RS n64", "QK SS n128", "PV SS n256", "PV SS n64x4", "QK SS n64 + PV n256"};
  return names[r];
}

template <int R0, int R1, int R2>
void run_case(const T* d_init, int sms, int iters, bool coupled, long long* d_cycles, float* d_sink) {
  auto kernel = rate_kernel<R0, R1, R2>;
  constexpr int kThreads = count_wgs(R0, R1, R2) * kWarpgroupThreads;
  const int smem = int(sizeof(Smem));
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  const probe::Timing t = probe::time_launch(
      [&](int n) {
        kernel<<<sms, kThreads, smem>>>(d_init, n, coupled, d_cycles, d_sink);
        return cudaSuccess;
      },
      iters, sms, d_cycles);
  const double flops = role_flops(R0) + role_flops(R1) + role_flops(R2);  // per iteration, per SM
  const double per_iter = t.mean_cycles / iters, rate = flops / per_iter;
  std::printf("%-20s | %-20s | %-20s | %-7s | %8.0f cyc/iter | %6.0f FLOP/clk (%5.1f%%) | block %5.0f cyc | %4.0f MHz%s\n",
              role_name(R0), role_name(R1), role_name(R2), coupled ? "coupled" : "free", per_iter, rate,
              100.0 * rate / kNominalFlopPerClk, kBlockFlops / rate, t.mhz, t.err == cudaSuccess ? "" : cudaGetErrorString(t.err));
}

}  // namespace rate

int main(int argc, char** argv) {
  using namespace rate;
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const int iters = argc > 1 ? std::atoi(argv[1]) : 4000;
  // Optional: seconds of today's mix, coupled, launched back to back (each launch ~iters x 10
  // blocks), to read the clock it settles at under the power limit (nvidia-smi beside it).
  const double sustain_s = argc > 2 ? std::atof(argv[2]) : 0.0;
  const T* d_init = probe::random_operands<T>(sizeof(Smem) / sizeof(T));
  long long* d_cycles;
  float* d_sink;
  cudaMalloc(&d_cycles, sms * sizeof(long long));
  cudaMalloc(&d_sink, sms * sizeof(float));
  std::printf("wgmma rates, %d CTAs (one per SM), %d iterations; FLOP/clk per SM against the nominal %.0f;\n"
              "\"block\": cycles for a 64-token block's QK^T + both PV halves (%.2f MFLOP) at that rate\n",
              sms, iters, kNominalFlopPerClk, kBlockFlops / 1e6);
  // One role at a time, 1-3 warpgroups.
  run_case<kQkSs, kIdle, kIdle>(d_init, sms, iters, false, d_cycles, d_sink);
  run_case<kQkSs, kQkSs, kIdle>(d_init, sms, iters, false, d_cycles, d_sink);
  run_case<kQkSs, kQkSs, kQkSs>(d_init, sms, iters, false, d_cycles, d_sink);
  run_case<kQkRs, kIdle, kIdle>(d_init, sms, iters, false, d_cycles, d_sink);
  run_case<kQkRs, kQkRs, kIdle>(d_init, sms, iters, false, d_cycles, d_sink);
  run_case<kQkSs128, kIdle, kIdle>(d_init, sms, iters / 2, false, d_cycles, d_sink);
  run_case<kQkSs128, kQkSs128, kIdle>(d_init, sms, iters / 2, false, d_cycles, d_sink);
  run_case<kPv256, kIdle, kIdle>(d_init, sms, iters, false, d_cycles, d_sink);
  run_case<kPv256, kPv256, kIdle>(d_init, sms, iters, false, d_cycles, d_sink);
  run_case<kPv64, kPv64, kIdle>(d_init, sms, iters, false, d_cycles, d_sink);
  // The loops' mixes, one block of tensor work per iteration: today's two warpgroups, and the
  // three-role prototype's S + two PV warpgroups (N = 256 and N = 64 PVs), free and coupled.
  run_case<kQkPv256, kPv256, kIdle>(d_init, sms, iters, false, d_cycles, d_sink);
  run_case<kQkPv256, kPv256, kIdle>(d_init, sms, iters, true, d_cycles, d_sink);
  run_case<kQkSs, kPv256, kPv256>(d_init, sms, iters, false, d_cycles, d_sink);
  run_case<kQkSs, kPv256, kPv256>(d_init, sms, iters, true, d_cycles, d_sink);
  run_case<kQkSs, kPv64, kPv64>(d_init, sms, iters, true, d_cycles, d_sink);
  run_case<kQkRs, kPv256, kPv256>(d_init, sms, iters, true, d_cycles, d_sink);
  run_case<kQkSs128, kPv256, kPv256>(d_init, sms, iters / 2, true, d_cycles, d_sink);
  if (sustain_s > 0) {
    std::printf("sustained: today's mix, coupled, %d iterations a launch, for %.1f s\n", 10 * iters, sustain_s);
    probe::sustain(sustain_s, [&] {
      run_case<kQkPv256, kPv256, kIdle>(d_init, sms, 10 * iters, true, d_cycles, d_sink);  // prints its clock
      return 0.0;
    });
  }
  return 0;
}
