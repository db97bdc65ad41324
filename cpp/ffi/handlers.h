// FFI handlers exported to the nanobind module, and their custom-call target names.
// The names are part of the ABI of exported modules (jax.export), hence versioned; they must
// match jax_flashmla/_ffi.py.
#pragma once

#include "xla/ffi/api/ffi.h"

namespace jax_flashmla {
inline constexpr const char* kMetadataTarget = "jax_flashmla_mla_metadata_v1";
inline constexpr const char* kDecodeTarget = "jax_flashmla_mla_decode_v1";
}  // namespace jax_flashmla

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFlashmlaMlaMetadata);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFlashmlaMlaDecode);
