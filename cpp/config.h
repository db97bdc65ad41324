// Compile-time constants of the MLA decode kernels. The Python side mirrors the shared ones in
// jax_flashmla/_config.py; tests/test_build.py checks that both agree.
#pragma once

namespace jax_flashmla {

// Width of a cached latent token: 512 compressed-KV channels + 64 decoupled RoPE channels.
inline constexpr int kHeadDim = 576;
// V is the first kHeadDimV channels of K (shared KV), so V never needs its own load.
inline constexpr int kHeadDimV = 512;
// Tokens per page of the paged cache.
inline constexpr int kPageBlockSize = 64;
// Tokens per scheduling block; equal to the page size so that a split never cuts a page.
inline constexpr int kBlockN = 64;
// Packed query rows per tile: the M of one wgmma tile, and what fixes SMs per KV head.
inline constexpr int kBlockM = 64;
// Scheduler cost of one piece of work (Q load, epilogue, combine share), in blocks.
inline constexpr int kFixedOverheadBlocks = 5;
// int32 columns of one tile_scheduler_metadata row (layout: scheduler/mla_metadata.h).
inline constexpr int kMetadataCols = 8;

// Scheduler kernel: threads that stage per-request block counts and reduce their sum.
inline constexpr int kSchedulerThreads = 128;
// Requests whose block counts are staged in shared memory (32 KiB, under the 48 KiB static
// limit); the serial pass reads later ones from global memory.
inline constexpr int kSchedulerSmemRequests = 8192;

}  // namespace jax_flashmla
