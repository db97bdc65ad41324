"""The decode a JAX user writes today without this library: gather, einsum, masked softmax, einsum."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def xla_einsum_decode(q, k_cache, block_table, cache_seqlens, *, softmax_scale, causal, head_dim_v=512):
    """Dense attention over each request's gathered pages.

    Args:
      q: [b, s_q, h_q, 576] array.
      k_cache: [num_blocks, 64, h_kv, 576] array.
      block_table: [b, max_blocks] int32 array (every entry a valid page).
      cache_seqlens: [b] int32 array.

    Returns:
      [b, s_q, h_q, head_dim_v] array of the dtype of ``q``.
    """
    b, s_q, h_q, d = q.shape
    h_kv = k_cache.shape[2]
    kv = k_cache[block_table].reshape(b, -1, h_kv, d)  # [b, max_blocks * 64, h_kv, d]
    qg = q.reshape(b, s_q, h_kv, h_q // h_kv, d)
    logits = jnp.einsum("btkgd,bnkd->bkgtn", qg, kv, preferred_element_type=jnp.float32) * softmax_scale
    pos = jnp.arange(kv.shape[1])
    limit = cache_seqlens[:, None] - ((s_q - 1 - jnp.arange(s_q))[None, :] if causal else 0)  # [b, s_q]
    visible = pos[None, None, :] < limit[:, :, None]
    logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgtn,bnkv->btkgv", probs, kv[..., :head_dim_v], preferred_element_type=jnp.float32)
    return out.reshape(b, s_q, h_q, head_dim_v).astype(q.dtype)
