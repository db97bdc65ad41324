// Launcher of the split-KV scheduler.
#include "scheduler/mla_metadata.h"
#include "scheduler/mla_metadata_kernel.cuh"

namespace jax_flashmla {

void run_mla_metadata(const MetadataParams& params, cudaStream_t stream) {
  if (params.num_schedules == 0) return;  // an empty grid is a launch error, and there is no work
  // Above 48 KiB of dynamic shared memory a kernel must opt in (per device, so on every call, as
  // the decode launcher does). A failure is also the next cudaGetLastError, which the caller reads.
  const int smem_bytes = scheduler_smem_bytes(params.batch);
  if (cudaFuncSetAttribute(mla_metadata_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes) != cudaSuccess)
    return;
  mla_metadata_kernel<<<params.num_schedules, kSchedulerThreads, smem_bytes, stream>>>(params);
}

}  // namespace jax_flashmla
