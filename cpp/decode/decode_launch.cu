// Launcher of the decode: builds the TMA descriptor of the paged cache, then enqueues the
// attention kernel and the combine on one stream, each a programmatic dependent of the op before.
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

// A launch configuration on `stream` whose kernel is a programmatic dependent of the previous op
// there: it may start before that op completes, and waits for it in griddepcontrol.wait.
struct DependentLaunch {
  cudaLaunchAttribute attribute[1];
  cudaLaunchConfig_t config;

  DependentLaunch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream) : attribute{}, config{} {
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = attribute;
    config.numAttrs = 1;
  }
  DependentLaunch(const DependentLaunch&) = delete;  // config points into this object
};

template <typename T>
cudaError_t run_typed(const DecodeParams& p, cudaStream_t stream) {
  auto tma_k = make_tma_k<T>(p);
  auto kernel = decode::mla_decode_kernel<T, decltype(tma_k)>;
  constexpr int kSmemBytes = int(sizeof(decode::SharedStorage<T>));
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  // The attention grid may start under the previous op's tail (the previous layer's combine):
  // its CTAs prefetch their first loads into L2 and wait (start_after_previous_grid).
  DependentLaunch attention(dim3((p.rows + kBlockM - 1) / kBlockM, p.h_kv, p.num_parts), dim3(kDecodeThreads),
                            kSmemBytes, stream);
  err = cudaLaunchKernelEx(&attention.config, kernel, p, tma_k);
  if (err != cudaSuccess) return err;

  // The combine launches once every attention CTA is past its own wait (and triggers); its
  // CTAs of split requests then wait on griddepcontrol.wait.
  // The pieces are known on the device only; (batch + parts) / batch is their mean per request
  // (each partition boundary adds at most one). Past kCombineWidePieces, the wide combine puts
  // kCombineWarps CTAs on each row. A boundary also splits at most one request, so with fewer
  // partitions than requests the grid goes over partitions (mla_combine_kernel).
  const bool wide = int64_t(p.batch) + p.num_parts > int64_t(kCombineWidePieces) * p.batch;
  const bool by_partition = p.num_parts - 1 < p.batch;
  const int columns = by_partition ? std::max(p.num_parts - 1, 1) : p.batch;
  DependentLaunch combine(dim3(columns, p.h_kv, std::min(decode::combine_items(p.rows, wide), kMaxGridYZ)),
                          dim3(kCombineThreads), 0, stream);
  return wide ? cudaLaunchKernelEx(&combine.config, decode::mla_combine_kernel<T, true>, p, by_partition)
              : cudaLaunchKernelEx(&combine.config, decode::mla_combine_kernel<T, false>, p, by_partition);
}

}  // namespace

cudaError_t run_mla_decode(const DecodeParams& params, cudaStream_t stream) {
  if (params.batch == 0 || params.rows == 0 || params.h_kv == 0) return cudaSuccess;  // no work
  if (params.dtype == DecodeDtype::kBF16) return run_typed<cutlass::bfloat16_t>(params, stream);
  return run_typed<cutlass::half_t>(params, stream);
}

}  // namespace jax_flashmla
