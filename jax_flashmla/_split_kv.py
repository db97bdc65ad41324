"""Split-KV MLA decode in pure JAX: the CPU path and the executable specification of the kernels.

It follows the scheduler's metadata the way the GPU does: every partition walks its own stream
of 64-token blocks (all partitions advance together, one block per step), keeps an online
softmax in base 2 for the piece it is on, and when a piece ends writes the normalised fp32
output and the base-2 LSE of that piece into accumulator slot ``first_slot + k``. The combine
then merges the pieces of each request, weighting piece ``s`` by ``exp2(lse_s - lse_total)``.

For a request with one piece the weight is exactly 1, so its output is the piece's output
rounded once to the input dtype: what the kernel writes directly for unsplit requests.

Numerics shared with the kernels:

- query rows are packed per KV head, s_q-major then heads: row ``r`` is token ``r // g`` of
  head ``kv_head * g + r % g`` with ``g = h_q / h_kv``;
- logits are ``<q, k> * softmax_scale * log2(e)`` in fp32 from dtype inputs;
- invisible logits are replaced by -inf (not added to), and cache rows past the request's
  length are zeroed before both products, so NaN in unused slots cannot leak (0 * NaN = NaN);
- P is rounded to the input dtype before the PV product, which accumulates in fp32;
- a row with no visible key has ``l = 0``: output 0 and base-2 LSE -inf; the final natural
  LSE is +inf there;
- a length outside ``[0, 64 * max_blocks_per_seq]`` or a page id outside ``[0, num_blocks)``
  for a block that holds tokens yields NaN for that request instead of reading out of bounds;
  every "is this row empty" test is written as ``== 0`` / ``== -inf`` so that such a NaN
  propagates to the output rather than being mistaken for an empty row.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from . import _scheduler as sch
from ._config import BLOCK_N

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
# A page index that every gather treats as out of range, so that it reads NaN (mode="fill").
_NO_PAGE = jnp.iinfo(jnp.int32).max


def pack_rows(q: jax.Array, h_kv: int) -> jax.Array:
    """[b, s_q, h_q, d] -> [b, h_kv, s_q * h_q / h_kv, d], rows s_q-major then heads."""
    b, s_q, h_q, d = q.shape
    g = h_q // h_kv
    return q.reshape(b, s_q, h_kv, g, d).transpose(0, 2, 1, 3, 4).reshape(b, h_kv, s_q * g, d)


def unpack_rows(x: jax.Array, s_q: int) -> jax.Array:
    """[b, h_kv, rows, ...] -> [b, s_q, h_q, ...], the inverse of ``pack_rows``."""
    b, h_kv, rows = x.shape[:3]
    g = rows // s_q
    x = x.reshape(b, h_kv, s_q, g, *x.shape[3:])
    return jnp.moveaxis(x, 2, 1).reshape(b, s_q, h_kv * g, *x.shape[4:])


def row_causal_shift(s_q: int, g: int, causal: bool) -> jax.Array:
    """Per packed row, how many of the newest keys its token may not see: [rows] int32.

    Bottom-right aligned causal masking: token ``t`` of ``s_q`` sees keys ``j < L - (s_q-1-t)``.
    """
    t = jnp.arange(s_q * g, dtype=jnp.int32) // g
    return (s_q - 1 - t) if causal else jnp.zeros_like(t)


def split_kv_attention(
    q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, *, softmax_scale, causal, head_dim_v
):
    """Per-piece attention of every partition into the accumulators.

    Args:
      q: [b, s_q, h_q, 576] array.
      k_cache: [num_blocks, 64, h_kv, 576] array, dtype of ``q``.
      block_table: [b, max_blocks_per_seq] int32 array.
      cache_seqlens: [b] int32 array.
      tile_scheduler_metadata: [num_parts, 8] int32 array (layout in ``_scheduler``).

    Returns:
      ``(out_accum, lse_accum)``: [b + num_parts, h_kv, rows, head_dim_v] float32 normalised
      piece outputs and [b + num_parts, h_kv, rows] float32 base-2 piece LSEs. Slots that no
      piece uses hold 0 and -inf.
    """
    b, s_q, h_q, _ = q.shape
    num_pages, _, h_kv, _ = k_cache.shape
    max_blocks = block_table.shape[1]
    num_parts = tile_scheduler_metadata.shape[0]
    g = h_q // h_kv
    rows = s_q * g
    f32 = jnp.float32

    qp = pack_rows(q, h_kv)
    shift = row_causal_shift(s_q, g, causal)
    scale_log2 = f32(softmax_scale * _LOG2E)
    nblk = sch.num_blocks(cache_seqlens)
    meta = tile_scheduler_metadata
    last_req, last_end, n_blocks = meta[:, sch.LAST_REQ], meta[:, sch.LAST_BLOCK_END], meta[:, sch.NUM_BLOCKS]
    offsets = jnp.arange(BLOCK_N, dtype=jnp.int32)
    no_slot = b + num_parts  # scatter index that mode="drop" discards

    def step(t, carry):
        req, blk, slot, m, l, o, acc_o, acc_lse = carry
        active = t < n_blocks
        r = jnp.clip(req, 0, b - 1)
        seqlen = cache_seqlens[r]
        tok = blk[:, None] * BLOCK_N + offsets  # [P, 64] token positions of this block
        in_seq = tok < seqlen[:, None]
        # The block table is read only for blocks that hold tokens; other blocks get no page.
        page = block_table[r, jnp.clip(blk, 0, max_blocks - 1)]
        page_ok = (blk < max_blocks) & (page >= 0)
        page = jnp.where(blk * BLOCK_N < seqlen, jnp.where(page_ok, page, _NO_PAGE), _NO_PAGE)
        kv = jnp.take(k_cache, page, axis=0, mode="fill", fill_value=jnp.nan)  # [P, 64, h_kv, d]
        # Rows past the length are zeroed (they may hold NaN); a missing page stays NaN only
        # where the request claims tokens, which is the error signal.
        kv = jnp.where(in_seq[:, :, None, None], kv, jnp.zeros((), kv.dtype))

        s = jnp.einsum("phrd,pnhd->phrn", qp[r], kv, preferred_element_type=f32) * scale_log2
        limit = seqlen[:, None] - shift[None, :]  # [P, rows]
        visible = tok[:, None, None, :] < limit[:, None, :, None]
        s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        # While a row has seen no visible key its max is -inf; exponentiate against 0 instead
        # so that exp2(-inf - -inf) never appears.
        m_ref = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_ref)
        p = jnp.exp2(s - m_ref[..., None])
        l = alpha * l + p.sum(axis=-1)
        pv = jnp.einsum("phrn,pnhv->phrv", p.astype(q.dtype), kv[..., :head_dim_v], preferred_element_type=f32)
        o = alpha[..., None] * o + pv
        m = m_new

        piece_end = jnp.where(req == last_req, last_end, nblk[r])
        finish = active & (blk + 1 == piece_end)
        # Tested as ``l == 0``, not ``l > 0``: a NaN (a page id out of range) must stay NaN.
        no_keys = l == 0
        l_safe = jnp.where(no_keys, 1.0, l)
        o_piece = jnp.where(no_keys[..., None], 0.0, o / l_safe[..., None])
        lse_piece = jnp.where(no_keys, -jnp.inf, m + jnp.log2(l_safe))
        target = jnp.where(finish, slot, no_slot)
        acc_o = acc_o.at[target].set(o_piece, mode="drop")
        acc_lse = acc_lse.at[target].set(lse_piece, mode="drop")

        reset = finish[:, None, None]
        return (
            jnp.where(finish, req + 1, req),
            jnp.where(finish, 0, jnp.where(active, blk + 1, blk)),
            slot + finish.astype(jnp.int32),
            jnp.where(reset, -jnp.inf, m),
            jnp.where(reset, 0.0, l),
            jnp.where(reset[..., None], 0.0, o),
            acc_o,
            acc_lse,
        )

    init = (
        meta[:, sch.FIRST_REQ],
        meta[:, sch.FIRST_BLOCK],
        meta[:, sch.FIRST_SLOT],
        jnp.full((num_parts, h_kv, rows), -jnp.inf, f32),
        jnp.zeros((num_parts, h_kv, rows), f32),
        jnp.zeros((num_parts, h_kv, rows, head_dim_v), f32),
        jnp.zeros((b + num_parts, h_kv, rows, head_dim_v), f32),
        jnp.full((b + num_parts, h_kv, rows), -jnp.inf, f32),
    )
    carry = lax.fori_loop(0, jnp.max(n_blocks), step, init)
    return carry[-2], carry[-1]


def combine(out_accum, lse_accum, num_splits, cache_seqlens, max_blocks_per_seq):
    """LSE-weighted merge of the pieces of every request.

    Args:
      out_accum: [b + num_parts, h_kv, rows, dv] float32 normalised piece outputs.
      lse_accum: [b + num_parts, h_kv, rows] float32 base-2 piece LSEs.
      num_splits: [b + 1] int32 prefix sums of pieces per request.
      cache_seqlens: [b] int32, to flag lengths the block table cannot hold.
      max_blocks_per_seq: static width of the block table.

    Returns:
      ``(out, lse)``: [b, h_kv, rows, dv] float32 and [b, h_kv, rows] float32 natural-log LSE
      (+inf for rows without a visible key).
    """
    b = num_splits.shape[0] - 1
    slots = jnp.arange(out_accum.shape[0], dtype=jnp.int32)
    # Request of each slot; slots past num_splits[b] map to b, which the segment ops drop.
    seg = jnp.searchsorted(num_splits[1:], slots, side="right").astype(jnp.int32)
    seg_c = jnp.minimum(seg, b - 1)
    lse_max = jax.ops.segment_max(lse_accum, seg, num_segments=b)
    lse_ref = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
    total = jax.ops.segment_sum(jnp.exp2(lse_accum - lse_ref[seg_c]), seg, num_segments=b)
    # Emptiness is tested as == 0 / == -inf so that a NaN (invalid data) propagates.
    empty = total == 0
    lse2 = jnp.where(empty, -jnp.inf, lse_ref + jnp.log2(jnp.where(empty, 1.0, total)))
    lse2_slot = lse2[seg_c]
    w = jnp.where(lse2_slot == -jnp.inf, 0.0, jnp.exp2(lse_accum - lse2_slot))
    out = jax.ops.segment_sum(w[..., None] * out_accum, seg, num_segments=b)
    lse = jnp.where(lse2 == -jnp.inf, jnp.inf, lse2 * _LN2)
    bad_len = (cache_seqlens < 0) | (cache_seqlens > max_blocks_per_seq * BLOCK_N)
    out = jnp.where(bad_len[:, None, None, None], jnp.nan, out)
    lse = jnp.where(bad_len[:, None, None], jnp.nan, lse)
    return out, lse


def mla_decode(
    q,
    k_cache,
    block_table,
    cache_seqlens,
    tile_scheduler_metadata,
    num_splits,
    *,
    softmax_scale: float,
    causal: bool,
    head_dim_v: int,
):
    """The whole decode step: pieces, then combine.

    Returns:
      ``(out, lse, out_accum, lse_accum)``: [b, s_q, h_q, head_dim_v] dtype of ``q``,
      [b, h_q, s_q] float32, and the two accumulators of ``split_kv_attention``.
    """
    s_q = q.shape[1]
    out_accum, lse_accum = split_kv_attention(
        q,
        k_cache,
        block_table,
        cache_seqlens,
        tile_scheduler_metadata,
        softmax_scale=softmax_scale,
        causal=causal,
        head_dim_v=head_dim_v,
    )
    out, lse = combine(out_accum, lse_accum, num_splits, cache_seqlens, block_table.shape[1])
    out = unpack_rows(out, s_q).astype(q.dtype)
    # [b, h_kv, rows] -> [b, s_q, h_q] -> [b, h_q, s_q]
    lse = jnp.swapaxes(unpack_rows(lse, s_q), 1, 2)
    return out, lse, out_accum, lse_accum
