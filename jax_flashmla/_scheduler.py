"""The split-KV scheduler in jnp: the CPU path and the specification of the CUDA scheduler.

Work is cut into ``num_parts`` partitions of nearly equal cost in one greedy pass over the
requests in order (contract, section 4):

- cost of request ``i`` = ``nblk_i + 5`` with ``nblk_i = max(ceil(L_i / 64), 1)``;
- budget of a partition = ``ceil(sum(cost) / num_parts) + 5``;
- a partition takes whole requests while they fit; when the next one does not, it takes
  ``remaining_budget - 5`` blocks of it if that is positive, and the rest of the request
  continues in the next partition.

Everything is int32 arithmetic, so the CUDA scheduler is required to be bit-identical.

Layout of ``tile_scheduler_metadata[p]`` (int32, ``METADATA_COLS`` = 8 columns):

====  ================  ==================================================================
col   name              meaning
====  ================  ==================================================================
0     first_req         request of the partition's first piece (``b`` when it is empty)
1     first_block       first 64-token block of that piece
2     last_req          request of the last piece, inclusive (``first_req - 1`` when empty)
3     last_block_end    one past the last block of the last piece (0 when empty)
4     first_split       split index of the first piece within its request
5     num_blocks        blocks in the partition, all pieces together
6     first_slot        accumulator slot of the first piece: ``num_splits[first_req] + first_split``
7     (reserved)        0
====  ================  ==================================================================

Pieces of a partition are the requests ``first_req .. last_req``; the first starts at
``first_block``, the last ends at ``last_block_end``, the others are whole. Piece ``k`` of the
partition lives in accumulator slot ``first_slot + k``: slots are numbered request-major, which
is also the order in which partitions visit pieces.

``num_splits`` ([b + 1] int32) holds prefix sums of the number of pieces per request, so split
``j`` of request ``i`` is slot ``num_splits[i] + j`` and ``num_splits[b]`` pieces exist, at most
``b + num_parts - 1``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ._config import BLOCK_M, BLOCK_N, FIXED_OVERHEAD_BLOCKS, METADATA_COLS

# Column indices of tile_scheduler_metadata.
FIRST_REQ, FIRST_BLOCK, LAST_REQ, LAST_BLOCK_END, FIRST_SPLIT, NUM_BLOCKS, FIRST_SLOT = range(7)


def num_sm_parts(num_sm: int, num_heads_k: int, num_q_tokens_per_head_k: int) -> int:
    """Number of partitions: one per SM left after each KV head's row tiles take theirs."""
    row_tiles = -(-num_q_tokens_per_head_k // BLOCK_M)
    return max(1, num_sm // num_heads_k // row_tiles)


def num_blocks(cache_seqlens: jax.Array) -> jax.Array:
    """``max(ceil(L / 64), 1)`` per request, without overflow near the int32 limit."""
    whole = cache_seqlens // BLOCK_N
    partial = (cache_seqlens % BLOCK_N != 0).astype(jnp.int32)
    return jnp.maximum(whole + partial, 1)


def _schedule_one(cache_seqlens: jax.Array, num_parts: int) -> tuple[jax.Array, jax.Array]:
    """Schedule of one batch: ``cache_seqlens`` [b] int32 -> ([num_parts, 8], [b + 1]) int32."""
    b = cache_seqlens.shape[0]
    i32 = jnp.int32
    nblk = num_blocks(cache_seqlens)
    # One padding entry so that reads at index b (the loop's exit state) stay in bounds.
    nblk_ext = jnp.concatenate([nblk, jnp.zeros((1,), i32)])
    total = jnp.sum(nblk + FIXED_OVERHEAD_BLOCKS, dtype=i32)
    budget = (total + num_parts - 1) // num_parts + FIXED_OVERHEAD_BLOCKS

    def fill_partition(carry):
        idx, blk, nsplit, remain, cum, taken, splits, stop = carry
        rest = nblk_ext[idx] - blk
        cost = rest + FIXED_OVERHEAD_BLOCKS
        fits = remain >= cost
        # The request (or its remainder) fits: it ends here and its piece count is final.
        done_cum = cum + nsplit + 1
        splits = splits.at[jnp.where(fits, idx + 1, b + 1)].set(done_cum, mode="drop")
        # It does not fit: take what the budget leaves after this piece's fixed overhead.
        part = remain - FIXED_OVERHEAD_BLOCKS
        split_here = jnp.logical_and(~fits, part > 0)
        return (
            jnp.where(fits, idx + 1, idx),
            jnp.where(fits, 0, jnp.where(split_here, blk + part, blk)),
            jnp.where(fits, 0, jnp.where(split_here, nsplit + 1, nsplit)),
            jnp.where(fits, remain - cost, remain),
            jnp.where(fits, done_cum, cum),
            taken + jnp.where(fits, rest, jnp.where(split_here, part, 0)),
            splits,
            ~fits,
        )

    def keep_filling(carry):
        idx, *_, stop = carry
        return jnp.logical_and(idx < b, ~stop)

    def partition(p, carry):
        idx, blk, nsplit, cum, splits, meta = carry
        first_req, first_block, first_split, first_slot = idx, blk, nsplit, cum + nsplit
        idx, blk, nsplit, _, cum, taken, splits, _ = lax.while_loop(
            keep_filling,
            fill_partition,
            (idx, blk, nsplit, budget, cum, i32(0), splits, jnp.bool_(False)),
        )
        # A partition ends inside a request only when it split it (blk > 0); otherwise its last
        # piece is the whole of request idx - 1.
        ends_inside = blk > 0
        empty = first_req >= b
        last_req = jnp.where(ends_inside, idx, idx - 1)
        last_end = jnp.where(ends_inside, blk, nblk_ext[jnp.maximum(idx - 1, 0)])
        row = jnp.stack(
            [
                first_req,
                first_block,
                last_req,
                jnp.where(empty, 0, last_end),
                first_split,
                taken,
                first_slot,
                i32(0),
            ]
        ).astype(i32)
        meta = meta.at[p].set(row)
        return idx, blk, nsplit, cum, splits, meta

    init = (
        i32(0),
        i32(0),
        i32(0),
        i32(0),
        jnp.zeros((b + 1,), i32),
        jnp.zeros((num_parts, METADATA_COLS), i32),
    )
    *_, splits, meta = lax.fori_loop(0, num_parts, partition, init)
    return meta, splits


def schedule(cache_seqlens: jax.Array, num_parts: int) -> tuple[jax.Array, jax.Array]:
    """Schedules of any number of batches at once.

    Args:
      cache_seqlens: [..., b] int32 array of cached tokens per request.
      num_parts: number of partitions (static).

    Returns:
      ``(tile_scheduler_metadata, num_splits)``: [..., num_parts, 8] and [..., b + 1] int32.
    """
    fn = lambda s: _schedule_one(s, num_parts)
    for _ in range(cache_seqlens.ndim - 1):
        fn = jax.vmap(fn)
    return fn(cache_seqlens)
