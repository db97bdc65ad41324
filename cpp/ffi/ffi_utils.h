// Helpers shared by the FFI handlers: argument checks with readable messages, CUDA errors as
// FFI errors.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace jax_flashmla {

namespace ffi = xla::ffi;

// Only called on error paths, so formatting stays off the per-call path. std::to_string, not
// std::ostringstream: an ostringstream in the handler segfaulted on the H100 build (2026-11-25).
inline std::string shape_string(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// "jax_flashmla <op>: CUDA error <name>: <description>", for FFI errors and Python exceptions.
inline std::string cuda_error_text(const std::string& op, cudaError_t err) {
  return "jax_flashmla " + op + ": CUDA error " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
}

// A CUDA error of `op` as an FFI error that names it.
inline ffi::Error cuda_error(const char* op, cudaError_t err) { return ffi::Error::Internal(cuda_error_text(op, err)); }

// Any CUDA error left by the launches of `op` becomes an FFI error that names it.
inline ffi::Error cuda_status(const char* op) {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? ffi::Error::Success() : cuda_error(op, err);
}

inline ffi::Error invalid_argument(const char* op, const std::string& what) {
  return ffi::Error::InvalidArgument(std::string("jax_flashmla ") + op + ": " + what);
}

}  // namespace jax_flashmla
