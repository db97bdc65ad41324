// Launcher of the split-KV scheduler.
#include "scheduler/mla_metadata.h"
#include "scheduler/mla_metadata_kernel.cuh"

namespace jax_flashmla {

void run_mla_metadata(const MetadataParams& params, cudaStream_t stream) {
  if (params.num_schedules == 0) return;  // an empty grid is a launch error, and there is no work
  mla_metadata_kernel<<<params.num_schedules, kSchedulerThreads, 0, stream>>>(params);
}

}  // namespace jax_flashmla
