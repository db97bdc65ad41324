"""Sizes fixed by the MLA decode contract and by the scheduler.

The CUDA side mirrors these in ``cpp/config.h``; a test checks that the two agree.
"""

# Width of a cached latent token: 512 compressed-KV channels plus 64 decoupled RoPE channels.
HEAD_DIM = 576
# V is the first HEAD_DIM_V channels of K (shared KV).
HEAD_DIM_V = 512
# Tokens per page of the paged cache.
PAGE_BLOCK_SIZE = 64
# Tokens per scheduling block; equal to the page size, so a split never cuts a page.
BLOCK_N = 64
# Packed query rows per tile; fixes how many SMs one KV head's rows need.
BLOCK_M = 64
# Fixed cost of one piece of work (loading Q, the epilogue, the combine), in blocks.
FIXED_OVERHEAD_BLOCKS = 5
# int32 columns per row of tile_scheduler_metadata (see _scheduler.py for the layout).
METADATA_COLS = 8
# Multiprocessor count of an H100/H800/H200 SXM: used where no GPU can be asked (CPU backend),
# so that a CPU run reproduces the H100 schedule.
DEFAULT_NUM_SM = 132
# Values accepted for ``implementation=``.
IMPLEMENTATIONS = (None, "xla", "cuda")
