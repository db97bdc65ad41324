// Launcher of the decode: builds the TMA descriptor of the paged cache, then enqueues the
// attention kernel and the combine (programmatic dependent launch) on one stream.
#include <algorithm>

#include <cute/tensor.hpp>

#include "config.h"
#include "decode/combine_kernel.cuh"
#include "decode/decode_kernel.cuh"
#include "decode/decode_params.h"
#include "decode/kernel_traits.cuh"

namespace jax_flashmla {
namespace {

using namespace cute;

template <typename T>
auto make_tma_k(const DecodeParams& p) {
  using Traits = decode::KernelTraits<T>;
  // With no pages every page id fails the kernel's range check, so the descriptor is never
  // used; it still needs a valid address and a non-zero extent to be encoded.
  const bool empty = p.num_pages == 0;
  const T* base = static_cast<const T*>(empty ? p.q : p.k_cache);
  const int pages = empty ? 1 : p.num_pages;
  const int h_kv = empty ? 1 : p.h_kv;
  // [tokens of a page, channels, KV head, page]: a TMA box is 64 tokens x 64 channels of one
  // page and head, addressed by the page id read from the block table.
  Tensor gK = make_tensor(
      make_gmem_ptr(base),
      make_layout(make_shape(Int<kPageBlockSize>{}, Int<kHeadDim>{}, h_kv, pages),
                  make_stride(int64_t(h_kv) * kHeadDim, _1{}, int64_t(kHeadDim),
                              int64_t(kPageBlockSize) * h_kv * kHeadDim)));
  return make_tma_copy(SM90_TMA_LOAD{}, gK, typename Traits::SmemLayoutKTile{},
                       Shape<Int<kBlockN>, Int<kHeadDimTile>>{}, _1{});
}

template <typename T>
cudaError_t run_typed(const DecodeParams& p, cudaStream_t stream) {
  auto tma_k = make_tma_k<T>(p);
  auto kernel = decode::mla_decode_kernel<T, decltype(tma_k)>;
  constexpr int kSmemBytes = int(sizeof(decode::SharedStorage<T>));
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid((p.rows + kBlockM - 1) / kBlockM, p.h_kv, p.num_parts);
  kernel<<<grid, kDecodeThreads, kSmemBytes, stream>>>(p, tma_k);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  // The combine launches once every attention CTA runs (that kernel triggers at its start); its
  // CTAs of split requests then wait on griddepcontrol.wait.
  // The pieces are known on the device only; (batch + parts) / batch is their mean per request
  // (each partition boundary adds at most one). Past kCombineWidePieces, the wide combine puts
  // kCombineWarps CTAs on each row. A boundary also splits at most one request, so with fewer
  // partitions than requests the grid goes over partitions (mla_combine_kernel).
  const bool wide = int64_t(p.batch) + p.num_parts > int64_t(kCombineWidePieces) * p.batch;
  const bool by_partition = p.num_parts - 1 < p.batch;
  const int columns = by_partition ? std::max(p.num_parts - 1, 1) : p.batch;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(columns, p.h_kv, std::min(decode::combine_items(p.rows, wide), kMaxGridYZ));
  config.blockDim = dim3(kCombineThreads);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, decode::mla_combine_kernel<T>, p, by_partition, wide);
}

}  // namespace

cudaError_t run_mla_decode(const DecodeParams& params, cudaStream_t stream) {
  if (params.batch == 0 || params.rows == 0 || params.h_kv == 0) return cudaSuccess;  // no work
  if (params.dtype == DecodeDtype::kBF16) return run_typed<cutlass::bfloat16_t>(params, stream);
  return run_typed<cutlass::half_t>(params, stream);
}

}  // namespace jax_flashmla
