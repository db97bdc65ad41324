// What the tensor-core probes (wgmma_rate.cu, loop_chain.cu) share: keeping ptxas from hoisting
// operand addresses, keeping accumulators live, random operands, one timed launch, and a
// sustained run under the power limit. Probes only; the library does not include it.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <random>
#include <vector>

#include <cute/tensor.hpp>

namespace probe {

// The pointer as an opaque value: operands are re-addressed every iteration, as in the block
// loop (whose stages move), instead of ptxas hoisting all 72 descriptors of a QK^T into registers
// (which spills once O's 128 accumulators are live too).
template <class P>
__device__ __forceinline__ P* launder(P* p) {
  asm volatile("" : "+l"(p));
  return p;
}

// A sum of an accumulator fragment, stored where it never is read: keeps the wgmmas live.
template <class Acc>
__device__ __forceinline__ float acc_sum(Acc const& acc) {
  float s = 0.f;
  CUTE_UNROLL
  for (int i = 0; i < cute::size(acc); ++i) s += acc(i);
  return s;
}

// `elems` operands clamp(N(0, 0.1), -1, 1) (seed 1) on the device: what the tensor cores toggle
// on costs power, not rate, but keep it real.
template <class T>
T* random_operands(size_t elems) {
  std::vector<T> h(elems);
  std::mt19937 gen(1);
  std::normal_distribution<float> nd(0.f, 0.1f);
  for (auto& x : h) x = T(std::max(-1.f, std::min(1.f, nd(gen))));
  T* d = nullptr;
  cudaMalloc(&d, elems * sizeof(T));
  cudaMemcpy(d, h.data(), elems * sizeof(T), cudaMemcpyHostToDevice);
  return d;
}

// One timed launch of a kernel whose CTAs write their clock64 span to cycles[blockIdx.x].
struct Timing {
  double mean_cycles;  // over the CTAs
  double mhz;          // the slowest CTA's cycles over the launch's event time
  cudaError_t err;
};

// launch(n) launches the kernel for n iterations and returns the launch's error. A 2-iteration
// warm-up first (module load, first-touch), then the timed launch between two events.
template <class Launch>
Timing time_launch(Launch&& launch, int iters, int ctas, const long long* d_cycles) {
  launch(2);
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0), cudaEventCreate(&e1);
  cudaEventRecord(e0);
  cudaError_t err = launch(iters);
  cudaEventRecord(e1);
  if (err == cudaSuccess) err = cudaEventSynchronize(e1);
  if (err == cudaSuccess) err = cudaGetLastError();
  std::vector<long long> cyc(ctas);
  cudaMemcpy(cyc.data(), d_cycles, ctas * sizeof(long long), cudaMemcpyDeviceToHost);
  float ms = 0.f;
  cudaEventElapsedTime(&ms, e0, e1);
  long long mx = 0;
  double mean = 0;
  for (long long c : cyc) mx = std::max(mx, c), mean += double(c) / ctas;
  cudaEventDestroy(e0), cudaEventDestroy(e1);
  return {mean, mx / (ms * 1e3), err};
}

// run() back to back (one timed launch each, returning its clock in MHz) for `seconds`: the
// clock a kernel settles at under the power limit (read nvidia-smi beside it).
struct Sustained {
  int launches;
  double mhz;      // mean over the launches
  double seconds;  // wall time of the whole run
};
template <class Run>
Sustained sustain(double seconds, Run&& run) {
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0), cudaEventCreate(&e1);
  cudaEventRecord(e0);
  float ms = 0.f;
  double mhz_sum = 0;
  int launches = 0;
  while (ms < seconds * 1e3) {
    mhz_sum += run();
    ++launches;
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    cudaEventElapsedTime(&ms, e0, e1);
  }
  cudaEventDestroy(e0), cudaEventDestroy(e1);
  return {launches, mhz_sum / launches, ms / 1e3};
}

}  // namespace probe
