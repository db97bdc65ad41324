// FFI handler of the scheduler: checks shapes, fills MetadataParams, launches.
//
// Command-buffer compatible: the grid depends only on static shapes, nothing is read back to
// the host and nothing is allocated.
#include <cstdint>

#include "ffi/ffi_utils.h"
#include "ffi/handlers.h"
#include "config.h"
#include "scheduler/mla_metadata.h"

namespace jax_flashmla {
namespace {

constexpr const char* kOp = "mla_metadata";

// cache_seqlens [..., b] -> metadata [..., P, 8], num_splits [..., b + 1]; leading dims are
// independent schedules.
ffi::Error MlaMetadataImpl(cudaStream_t stream, ffi::Buffer<ffi::S32> cache_seqlens,
                           ffi::ResultBuffer<ffi::S32> metadata,
                           ffi::ResultBuffer<ffi::S32> num_splits) {
  const auto seq = cache_seqlens.dimensions();
  const auto meta = metadata->dimensions();
  const auto splits = num_splits->dimensions();
  auto bad_shapes = [&](const std::string& what) {
    return invalid_argument(kOp, what + "; got cache_seqlens " + shape_string(seq) + ", metadata " +
                                     shape_string(meta) + ", num_splits " + shape_string(splits));
  };
  if (seq.size() < 1 || meta.size() != seq.size() + 1 || splits.size() != seq.size()) {
    return bad_shapes("expected cache_seqlens [..., b], metadata [..., P, " +
                      std::to_string(kMetadataCols) + "], num_splits [..., b + 1]");
  }
  int64_t schedules = 1;
  for (size_t i = 0; i + 1 < seq.size(); ++i) {
    if (meta[i] != seq[i] || splits[i] != seq[i]) return bad_shapes("leading dims differ");
    schedules *= seq[i];
  }
  const int64_t batch = seq.back();
  const int64_t parts = meta[meta.size() - 2];
  if (meta.back() != kMetadataCols || splits.back() != batch + 1 || parts < 1 ||
      batch > INT32_MAX - 1 || parts > INT32_MAX || schedules > INT32_MAX) {
    return bad_shapes("bad sizes");
  }

  MetadataParams params;
  params.cache_seqlens = cache_seqlens.typed_data();
  params.metadata = metadata->typed_data();
  params.num_splits = num_splits->typed_data();
  params.batch = static_cast<int>(batch);
  params.num_parts = static_cast<int>(parts);
  params.num_schedules = static_cast<int>(schedules);
  run_mla_metadata(params, stream);
  return cuda_status(kOp);
}

}  // namespace
}  // namespace jax_flashmla

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFlashmlaMlaMetadata, jax_flashmla::MlaMetadataImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // cache_seqlens
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()  // metadata
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>(),  // num_splits
                              {xla::ffi::Traits::kCmdBufferCompatible});
