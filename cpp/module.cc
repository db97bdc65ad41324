// nanobind module: the FFI handlers as capsules for jax.ffi.register_ffi_target, and what the
// extension was built against.
#include <cuda_runtime_api.h>
#include <nanobind/nanobind.h>

#include <stdexcept>
#include <string>

#include "ffi/bench.h"
#include "ffi/ffi_utils.h"
#include "ffi/handlers.h"
#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;

namespace {

template <typename Fn>
nb::capsule handler_capsule(Fn* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, Fn, XLA_FFI_CallFrame*>,
                "an XLA FFI handler takes a call frame and returns an error");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_flashmla_cuda, m) {
  m.doc() = "jax_flashmla CUDA kernels as XLA FFI handlers (sm_90a)";
  m.def("registrations", []() {
    nb::dict targets;
    targets[jax_flashmla::kMetadataTarget] = handler_capsule(JaxFlashmlaMlaMetadata);
    targets[jax_flashmla::kDecodeTarget] = handler_capsule(JaxFlashmlaMlaDecode);
    return targets;
  }, "Custom-call target name -> FFI handler capsule, for platform CUDA.");
  m.def("bench_registrations", []() {
    nb::dict targets;
    targets[jax_flashmla::kEventMarkTarget] = handler_capsule(JaxFlashmlaEventMark);
    targets[jax_flashmla::kDeviceCopyTarget] = handler_capsule(JaxFlashmlaDeviceCopy);
    return targets;
  }, "Benchmark-only targets (an event mark, a device copy): not part of the public API.");
  m.def("event_elapsed_ms", [](int64_t start_slot, int64_t stop_slot) {
    float ms = 0.f;
    const cudaError_t err = jax_flashmla::event_elapsed_ms(start_slot, stop_slot, &ms);
    if (err != cudaSuccess) {
      throw std::runtime_error(jax_flashmla::cuda_error_text(
          "event_elapsed_ms(" + std::to_string(start_slot) + ", " + std::to_string(stop_slot) + ")", err));
    }
    return ms;
  }, "Milliseconds between the last records of two event-mark slots (waits for the second).");
  m.def("ffi_api_version", []() { return nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR); },
        "(major, minor) XLA FFI API version of the headers this extension was compiled with.");
  m.def("cuda_arch", []() { return JAX_FLASHMLA_CUDA_ARCH; }, "GPU architecture the kernels were compiled for.");
  m.def("cuda_runtime_version", []() { return CUDART_VERSION; },
        "CUDA runtime version the extension was compiled against (linked statically).");
}
