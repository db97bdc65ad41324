// FFI handler of the split-KV decode: checks every argument's dtype and shape, fills
// DecodeParams, launches attention + combine.
//
// Command-buffer compatible: the grids depend only on static shapes, nothing is read back to the
// host, and nothing is allocated (the split-KV accumulators are extra results of the custom
// call, which the Python API drops).
#include <cmath>
#include <cstdint>
#include <string>

#include "config.h"
#include "decode/decode_params.h"
#include "ffi/ffi_utils.h"
#include "ffi/handlers.h"

namespace jax_flashmla {
namespace {

constexpr const char* kOp = "mla_decode";
constexpr double kLog2e = 1.4426950408889634;


bool is_16bit_float(ffi::DataType t) { return t == ffi::DataType::BF16 || t == ffi::DataType::F16; }

ffi::Error MlaDecodeImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                         ffi::Buffer<ffi::S32> block_table, ffi::Buffer<ffi::S32> cache_seqlens,
                         ffi::Buffer<ffi::S32> metadata, ffi::Buffer<ffi::S32> num_splits,
                         ffi::Result<ffi::AnyBuffer> out, ffi::ResultBuffer<ffi::F32> lse,
                         ffi::ResultBuffer<ffi::F32> out_accum, ffi::ResultBuffer<ffi::F32> lse_accum,
                         float softmax_scale, bool causal) {
  const auto qd = q.dimensions();
  const auto kd = k_cache.dimensions();
  const auto btd = block_table.dimensions();
  const auto sd = cache_seqlens.dimensions();
  const auto md = metadata.dimensions();
  const auto nd = num_splits.dimensions();
  const auto od = out->dimensions();
  const auto ld = lse->dimensions();
  const auto oad = out_accum->dimensions();
  const auto lad = lse_accum->dimensions();
  auto bad = [&](const std::string& what) {
    return invalid_argument(
        kOp, what + "; got q " + shape_string(qd) + ", k_cache " + shape_string(kd) + ", block_table " +
                 shape_string(btd) + ", cache_seqlens " + shape_string(sd) + ", metadata " + shape_string(md) +
                 ", num_splits " + shape_string(nd) + ", out " + shape_string(od) + ", lse " + shape_string(ld) +
                 ", out_accum " + shape_string(oad) + ", lse_accum " + shape_string(lad));
  };

  if (!is_16bit_float(q.element_type()) || k_cache.element_type() != q.element_type() ||
      out->element_type() != q.element_type()) {
    return bad("q, k_cache and out must share one dtype, bfloat16 or float16");
  }
  if (qd.size() != 4 || kd.size() != 4 || btd.size() != 2 || sd.size() != 1 || md.size() != 2 ||
      nd.size() != 1 || od.size() != 4 || ld.size() != 3 || oad.size() != 4 || lad.size() != 3) {
    return bad("wrong ranks");
  }
  const int64_t b = qd[0], s_q = qd[1], h_q = qd[2];
  const int64_t pages = kd[0], h_kv = kd[2];
  const int64_t parts = md[0];
  if (qd[3] != kHeadDim || kd[1] != kPageBlockSize || kd[3] != kHeadDim) {
    return bad("expected q [b, s_q, h_q, " + std::to_string(kHeadDim) + "] and k_cache [pages, " +
               std::to_string(kPageBlockSize) + ", h_kv, " + std::to_string(kHeadDim) + "]");
  }
  if (h_kv < 1 || h_q % h_kv != 0) return bad("h_q must be a multiple of h_kv >= 1");
  const int64_t rows = s_q * (h_q / h_kv);
  if (btd[0] != b || sd[0] != b || nd[0] != b + 1 || md[1] != kMetadataCols || parts < 1) {
    return bad("block_table [b, max_blocks], cache_seqlens [b], metadata [P, " + std::to_string(kMetadataCols) +
               "], num_splits [b + 1] disagree");
  }
  if (od[0] != b || od[1] != s_q || od[2] != h_q || od[3] != kHeadDimV || ld[0] != b || ld[1] != h_q ||
      ld[2] != s_q) {
    return bad("out must be [b, s_q, h_q, " + std::to_string(kHeadDimV) + "] and lse [b, h_q, s_q]");
  }
  if (oad[0] != b + parts || oad[1] != h_kv || oad[2] != rows || oad[3] != kHeadDimV || lad[0] != b + parts ||
      lad[1] != h_kv || lad[2] != rows) {
    return bad("accumulators must be [b + P, h_kv, rows, " + std::to_string(kHeadDimV) + "] and [b + P, h_kv, rows]");
  }
  if (b > INT32_MAX - parts || rows > INT32_MAX || pages > INT32_MAX || btd[1] > INT32_MAX / kBlockN ||
      h_kv > kMaxGridYZ || parts > kMaxGridYZ) {
    return bad("sizes beyond the kernel's int32 indexing or grid limits");
  }
  // > 0: the kernel takes the row max of raw logits and scales it afterwards.
  if (!std::isfinite(softmax_scale) || !(softmax_scale > 0.f)) return bad("softmax_scale must be finite and > 0");

  DecodeParams p;
  p.q = q.untyped_data();
  p.k_cache = k_cache.untyped_data();
  p.block_table = block_table.typed_data();
  p.cache_seqlens = cache_seqlens.typed_data();
  p.metadata = metadata.typed_data();
  p.num_splits = num_splits.typed_data();
  p.out = out->untyped_data();
  p.lse = lse->typed_data();
  p.out_accum = out_accum->typed_data();
  p.lse_accum = lse_accum->typed_data();
  p.batch = static_cast<int>(b);
  p.s_q = static_cast<int>(s_q);
  p.h_q = static_cast<int>(h_q);
  p.h_kv = static_cast<int>(h_kv);
  p.heads_per_kv = static_cast<int>(h_q / h_kv);
  p.rows = static_cast<int>(rows);
  p.num_pages = static_cast<int>(pages);
  p.max_blocks = static_cast<int>(btd[1]);
  p.num_parts = static_cast<int>(parts);
  p.scale_log2 = static_cast<float>(softmax_scale * kLog2e);
  p.causal = causal;
  p.dtype = q.element_type() == ffi::DataType::BF16 ? DecodeDtype::kBF16 : DecodeDtype::kFP16;

  const cudaError_t err = run_mla_decode(p, stream);
  return err == cudaSuccess ? cuda_status(kOp) : cuda_error(kOp, err);
}

}  // namespace
}  // namespace jax_flashmla

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFlashmlaMlaDecode, jax_flashmla::MlaDecodeImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()                    // q
                                  .Arg<xla::ffi::AnyBuffer>()                    // k_cache
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()        // block_table
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()        // cache_seqlens
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()        // tile_scheduler_metadata
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()        // num_splits
                                  .Ret<xla::ffi::AnyBuffer>()                    // out
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()        // lse
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()        // out_accum
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()        // lse_accum
                                  .Attr<float>("softmax_scale")
                                  .Attr<bool>("causal"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
