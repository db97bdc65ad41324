"""Dense float32 MLA decode attention: the reference every implementation is tested against.

Written straight from the definition (contract, section 3), one request at a time, without the
scheduler, the split pieces or base-2 arithmetic, so that it shares no code path with the
split-KV implementation it checks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ._config import HEAD_DIM_V

__all__ = ["mla_decode_reference"]


def mla_decode_reference(
    q: jax.Array,
    k_cache: jax.Array,
    block_table: jax.Array,
    cache_seqlens: jax.Array,
    head_dim_v: int = HEAD_DIM_V,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Dense attention per request in float32 at the highest matmul precision.

    Args:
      q: [b, s_q, h_q, d] array.
      k_cache: [num_blocks, page_block_size, h_kv, d] array.
      block_table: [b, max_blocks_per_seq] int array of page ids.
      cache_seqlens: [b] int array of tokens per request.
      head_dim_v: V is ``k[..., :head_dim_v]``.
      softmax_scale: defaults to ``d ** -0.5``.
      causal: bottom-right aligned causal mask over the last ``s_q`` keys.

    Returns:
      ``(out, lse)``: [b, s_q, h_q, head_dim_v] float32 and [b, h_q, s_q] float32. Rows with no
      visible key give ``out = 0`` and ``lse = +inf``; a request whose length the block table
      cannot hold, or whose tokens sit on a page id outside the cache, gives NaN.
    """
    b, s_q, h_q, d = q.shape
    num_pages, page, h_kv, _ = k_cache.shape
    g = h_q // h_kv
    capacity = block_table.shape[1] * page
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    hi = lax.Precision.HIGHEST

    def one_request(args):
        qi, pages, length = args
        pages = jnp.where(pages < 0, jnp.iinfo(jnp.int32).max, pages)
        kv = jnp.take(k_cache, pages, axis=0, mode="fill", fill_value=jnp.nan)
        kv = kv.reshape(capacity, h_kv, d).astype(jnp.float32)
        pos = jnp.arange(capacity)
        kv = jnp.where((pos < length)[:, None, None], kv, 0.0)
        qg = qi.astype(jnp.float32).reshape(s_q, h_kv, g, d)
        logits = scale * jnp.einsum("tkgd,nkd->kgtn", qg, kv, precision=hi)
        t = jnp.arange(s_q)
        limit = length - (s_q - 1 - t) if causal else jnp.full((s_q,), length)
        logits = jnp.where(pos[None, None, None, :] < limit[None, None, :, None], logits, -jnp.inf)
        lse = jax.nn.logsumexp(logits, axis=-1)  # [h_kv, g, s_q]; -inf where nothing is visible
        probs = jnp.where(jnp.isfinite(lse)[..., None], jnp.exp(logits - lse[..., None]), 0.0)
        out = jnp.einsum("kgtn,nkv->tkgv", probs, kv[..., :head_dim_v], precision=hi)
        out = out.reshape(s_q, h_q, head_dim_v)
        lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf).reshape(h_q, s_q)
        bad = (length < 0) | (length > capacity)
        return jnp.where(bad, jnp.nan, out), jnp.where(bad, jnp.nan, lse)

    return lax.map(one_request, (q, block_table, cache_seqlens))
