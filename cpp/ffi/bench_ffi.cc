// FFI handlers for the benchmark, not part of the public API (benchmarks/decode_bench.py):
//   - an event mark: records a CUDA event on XLA's stream, so that a jitted step is timed on the
//     device (the contract's protocol) instead of by the host clock around a blocking call;
//   - a device copy through cudaMemcpyAsync, the copy-bandwidth ceiling. XLA's own elementwise
//     copy measured 2335-2652 GB/s on the H100 from run to run, against ~3000 for a plain copy.
//
// Neither is command-buffer compatible on purpose: each must run on the stream at its place in
// the program, not inside a captured graph.
#include <array>
#include <cstdint>
#include <mutex>
#include <string>

#include "ffi/bench.h"
#include "ffi/ffi_utils.h"

namespace jax_flashmla {
namespace {

// Events of the marks, created on first use (in the CUDA context XLA's stream belongs to).
std::array<cudaEvent_t, kEventSlots> g_events{};
std::mutex g_events_mutex;

cudaError_t event_of(int64_t slot, cudaEvent_t* event) {
  std::lock_guard<std::mutex> lock(g_events_mutex);
  if (g_events[slot] == nullptr) {
    const cudaError_t err = cudaEventCreate(&g_events[slot]);
    if (err != cudaSuccess) return err;
  }
  *event = g_events[slot];
  return cudaSuccess;
}

// The operands are only there to order the mark after their producers; the scalar result lets
// later work be ordered after the mark (its value is unspecified and never read).
ffi::Error EventMarkImpl(cudaStream_t stream, ffi::RemainingArgs, ffi::ResultBuffer<ffi::S32>, int64_t slot) {
  if (slot < 0 || slot >= kEventSlots) {
    return invalid_argument("event_mark", "slot must be in [0, " + std::to_string(kEventSlots) + "); got " +
                                              std::to_string(slot));
  }
  cudaEvent_t event;
  cudaError_t err = event_of(slot, &event);
  if (err != cudaSuccess) return cuda_error("event_mark (cudaEventCreate)", err);
  err = cudaEventRecord(event, stream);
  return err == cudaSuccess ? ffi::Error::Success() : cuda_error("event_mark (cudaEventRecord)", err);
}

ffi::Error DeviceCopyImpl(cudaStream_t stream, ffi::AnyBuffer src, ffi::Result<ffi::AnyBuffer> dst) {
  if (src.size_bytes() != dst->size_bytes()) {
    return invalid_argument("device_copy", "source " + shape_string(src.dimensions()) + " and destination " +
                                               shape_string(dst->dimensions()) + " differ in size");
  }
  const cudaError_t err =
      cudaMemcpyAsync(dst->untyped_data(), src.untyped_data(), src.size_bytes(), cudaMemcpyDeviceToDevice, stream);
  return err == cudaSuccess ? ffi::Error::Success() : cuda_error("device_copy", err);
}

}  // namespace

cudaError_t event_elapsed_ms(int64_t start_slot, int64_t stop_slot, float* ms) {
  if (start_slot < 0 || start_slot >= kEventSlots || stop_slot < 0 || stop_slot >= kEventSlots) {
    return cudaErrorInvalidValue;
  }
  cudaEvent_t start, stop;
  {
    std::lock_guard<std::mutex> lock(g_events_mutex);
    start = g_events[start_slot];
    stop = g_events[stop_slot];
  }
  if (start == nullptr || stop == nullptr) return cudaErrorInvalidResourceHandle;  // never recorded
  const cudaError_t err = cudaEventSynchronize(stop);
  if (err != cudaSuccess) return err;
  return cudaEventElapsedTime(ms, start, stop);
}

}  // namespace jax_flashmla

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFlashmlaEventMark, jax_flashmla::EventMarkImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .RemainingArgs()                          // anything to order after
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()  // [] unspecified value
                                  .Attr<int64_t>("slot"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFlashmlaDeviceCopy, jax_flashmla::DeviceCopyImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()    // source, any shape and dtype
                                  .Ret<xla::ffi::AnyBuffer>());  // destination, same byte size
