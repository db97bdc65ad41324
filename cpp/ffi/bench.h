// Benchmark-only FFI handlers (ffi/bench_ffi.cc) and the host query that reads their events.
// The target names are private to benchmarks/ and may change between versions.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace jax_flashmla {

inline constexpr const char* kEventMarkTarget = "jax_flashmla_bench_event_mark";
inline constexpr const char* kDeviceCopyTarget = "jax_flashmla_bench_device_copy";
// Event slots a program can mark: a timed step needs two.
inline constexpr int64_t kEventSlots = 8;

// Waits for the event of `stop_slot`, then the milliseconds between the two slots' last records.
cudaError_t event_elapsed_ms(int64_t start_slot, int64_t stop_slot, float* ms);

}  // namespace jax_flashmla

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFlashmlaEventMark);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFlashmlaDeviceCopy);
