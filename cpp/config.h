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

// Scheduler kernel: threads that scan the request costs and fill the rows in parallel.
inline constexpr int kSchedulerThreads = 256;
// Requests whose cost prefix and boundary links (12 bytes a request, dynamic shared memory: 96 KiB
// at this size) are kept in shared memory. A larger batch keeps the prefix in its num_splits
// output and one warp walks the partitions one by one, at global-memory latency.
inline constexpr int kSchedulerSmemRequests = 8192;
// Requests per partition up to which the partitions are placed by links between request
// boundaries. With more, most runs of partitions between two boundaries are a few partitions
// long and the one-warp walk is faster (H100, benchmarks/probes/scheduler_probe.cu: b = 1024 on
// 132 partitions 23.0 us walked, 25.5 linked; b = 128 on 132, 17.4 -> 8.5 us fixed lengths).
inline constexpr int kSchedulerLinkRequestsPerPart = 2;
// Partitions whose starts are kept in shared memory (3 x 4 KiB of static shared memory); more are
// kept in the metadata rows.
inline constexpr int kSchedulerSmemParts = 1024;

// ---- Split-KV decode kernel (cpp/decode) ----
// Consumer warpgroups per CTA. A 64x512 fp32 output tile is half the register file, so each one
// owns half of the output columns in PV; warpgroup 0 alone computes S = Q K^T and the softmax of
// every block (one N = 64 wgmma chain reads Q and K from shared memory once per block, where two
// N = 32 halves read Q twice and were shared-memory-bound), and hands P to warpgroup 1.
inline constexpr int kNumWarpgroups = 2;
inline constexpr int kWarpgroupThreads = 128;
inline constexpr int kConsumerThreads = kNumWarpgroups * kWarpgroupThreads;
inline constexpr int kConsumerWarps = kConsumerThreads / 32;
// Threads per CTA: the consumers plus one producer warpgroup whose one thread issues the TMA
// copies of K (setmaxnreg needs a whole warpgroup to give its registers away).
inline constexpr int kDecodeThreads = kConsumerThreads + kWarpgroupThreads;
// Registers per thread after setmaxnreg. The launch gives every thread 65536 / 384 -> 168; the
// producer gives back down to 40 (its piece walk and TMA issue fit without spills; 24 did not)
// so that the consumers can hold O, S and the softmax state in 232
// (2 x 128 x 232 + 128 x 40 = 384 x 168).
inline constexpr int kProducerRegs = 40;
inline constexpr int kConsumerRegs = 232;
static_assert(kNumWarpgroups * kWarpgroupThreads * kConsumerRegs + kWarpgroupThreads * kProducerRegs <=
                  kDecodeThreads * (65536 / kDecodeThreads / 8 * 8),
              "setmaxnreg cannot hand out more registers than the launch allocated");
// Channels per shared-memory column tile: one 128-byte swizzle row of 16-bit values. It is both
// the TMA box width and the K extent of one GMMA swizzle atom.
inline constexpr int kHeadDimTile = 64;
// Column tiles of one 64x576 K block: one TMA box each, all counted by the stage's barrier.
inline constexpr int kNumKTiles = kHeadDim / kHeadDimTile;
// The column tile of the 64 RoPE channels: only QK^T reads it, so once QK^T of a block is done
// it holds that block's P (the A operand of both PVs) until the stage is released.
inline constexpr int kRopeTile = kNumKTiles - 1;
static_assert(kHeadDimV == kRopeTile * kHeadDimTile, "V is exactly the tiles before the RoPE tile");
// Output channels per warpgroup in PV.
inline constexpr int kHalfDimV = kHeadDimV / kNumWarpgroups;
// K blocks in flight per CTA: with a 72 KiB Q tile, two 72 KiB K stages are what fits in the
// 227 KiB of shared memory.
inline constexpr int kKStages = 2;
// Column tiles of a K block in its first landing group (its own k_full barrier): QK^T starts on
// them while the rest may still be in flight, instead of waiting for the whole block. Measured
// (benchmarks/NOTES.md, attempt 36): P4 -1%, P8 -2.5%, P10 -1.5%; 5 and 6 are level.
inline constexpr int kQkFirstTiles = 5;
static_assert(kQkFirstTiles > 0 && kQkFirstTiles < kNumKTiles, "two non-empty landing groups");

// Epilogue staging. A 64-row accumulator gives each warp 16 rows; a thread holds 2 adjacent
// columns of a row, so direct stores write 8-32 bytes per row per warp instruction (8 L2
// transactions each). Instead each warp stages its rows in its own slice of the Q tile (free once
// the piece's last QK^T is done) and then stores one row per instruction: 32 lanes x 16 bytes.
inline constexpr int kEpiRowsPerWarp = 16;
inline constexpr int kEpiChunkBytes = 16;                        // one lane's vector store
inline constexpr int kEpiRowBytes = 32 * kEpiChunkBytes;         // one staged row per pass
inline constexpr int kEpiWarpBytes = kEpiRowsPerWarp * kEpiRowBytes;  // 8 KiB per warp per pass

// How far (base 2) a row's running max may rise above the max its P and O are referenced to
// before O is rescaled: P stays below 2^8 = 256, and most blocks skip the 128 multiplies a thread
// of the rescale.
inline constexpr float kRescaleSlackLog2 = 8.f;

// CUDA's limit on gridDim.y and gridDim.z.
inline constexpr int kMaxGridYZ = 65535;

// ---- Combine kernel ----
// A CTA of kCombineWarps warps. Narrow (the common case, few pieces per request): each warp
// merges one packed row, a lane kCombineVecsPerLane float4 of its channels, so a CTA takes
// kCombineWarps rows: most of the combine's cost was launching and retiring CTAs (one per row
// was 16k-33k CTAs on P4-P6), not their loads. Wide (a request of many pieces, e.g. one long
// request over every SM): kCombineWarps CTAs per row, one per channel slice of
// kCombineChannelsPerWarp, whose warps take every kCombineWarps-th piece, so that more warps
// (and SMs) share the few rows.
inline constexpr int kCombineWarps = 4;
inline constexpr int kCombineThreads = kCombineWarps * 32;
inline constexpr int kCombineChannelsPerWarp = kHeadDimV / kCombineWarps;
static_assert(kCombineChannelsPerWarp == 32 * 4, "one float4 per lane per channel slice");
inline constexpr int kCombineVecsPerLane = kHeadDimV / (32 * 4);  // narrow: a whole row per warp
// float4 loads of partial outputs a lane issues before consuming any: the loads of a group are
// independent, so a row costs ceil(loads / group) memory latencies. Wide: one vector of
// kCombineLoadsPerGroup pieces. Narrow: the row's vectors of kCombineNarrowLoadsPerGroup /
// kCombineVecsPerLane pieces (one: the registers of 8 CTAs per SM, below, hold no more).
inline constexpr int kCombineLoadsPerGroup = 8;
inline constexpr int kCombineNarrowLoadsPerGroup = 4;
static_assert(kCombineNarrowLoadsPerGroup % kCombineVecsPerLane == 0, "whole pieces per narrow group");
// Pieces per request past which the launcher picks the wide combine.
inline constexpr int kCombineWidePieces = kCombineLoadsPerGroup;
// Combine CTAs per SM that the register budget must allow: 4 leaves ptxas up to 128 registers,
// enough for a group's kCombineLoadsPerGroup float4 loads and the row's four float4 sums without
// spills, and 16 warps per SM keep ~64 KiB of loads in flight.
inline constexpr int kCombineMinCtasPerSm = 4;
// Narrow combine CTAs per SM: 8 (64 registers) puts a grid of up to 1056 CTAs (P10's 1024) on the
// GPU in one round as the attention CTAs leave, instead of two (benchmarks/NOTES.md, attempts 44
// and 52).
inline constexpr int kCombineNarrowMinCtasPerSm = 8;
// An L2 cache line: the unit in which the combine drops partial outputs it has read
// (discard.global.L2), so that they are never written back to DRAM.
inline constexpr int kL2LineBytes = 128;

}  // namespace jax_flashmla
