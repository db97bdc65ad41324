"""Public ops: FlashMLA's API on JAX arrays, jittable, vmappable and exportable."""

from __future__ import annotations

import jax

from . import _validate
from ._config import DEFAULT_NUM_SM
from ._primitives import decode_p, metadata_p
from ._scheduler import num_sm_parts

__all__ = ["get_mla_metadata", "flash_mla_with_kvcache", "device_num_sm"]


def device_num_sm() -> int:
    """Multiprocessor count of the default device; ``DEFAULT_NUM_SM`` (132) off GPUs."""
    device = jax.devices()[0]
    count = getattr(device, "core_count", None)
    if device.platform == "gpu" and count:
        return int(count)
    return DEFAULT_NUM_SM


def get_mla_metadata(
    cache_seqlens: jax.Array,
    num_q_tokens_per_head_k: int,
    num_heads_k: int,
    *,
    num_sm: int | None = None,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Split-KV schedule of one decode step; compute once per step, reuse for every layer.

    Args:
      cache_seqlens: [batch] int32 array, tokens in each request's cache (new tokens included).
      num_q_tokens_per_head_k: ``s_q * h_q // h_kv``, packed query rows per KV head.
      num_heads_k: ``h_kv``.
      num_sm: multiprocessor count to schedule for; the default device's when None (132, the
        H100's, on CPU, so that CPU runs reproduce the H100 schedule).
      implementation: None (CUDA kernel where it runs, else pure JAX), ``"xla"`` (pure JAX
        everywhere) or ``"cuda"`` (the CUDA kernel on every CUDA device).

    Returns:
      ``(tile_scheduler_metadata, num_splits)``: [num_sm_parts, 8] and [batch + 1] int32, with
      ``num_sm_parts = max(1, num_sm // num_heads_k // ceil(num_q_tokens_per_head_k / 64))``.
      The row layout is documented in ``jax_flashmla._scheduler``.
    """
    cache_seqlens, rows, h_kv, num_sm = _validate.metadata_args(
        cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_sm, implementation
    )
    parts = num_sm_parts(device_num_sm() if num_sm is None else num_sm, h_kv, rows)
    metadata, num_splits = metadata_p.bind(cache_seqlens, num_parts=parts, implementation=implementation)
    return metadata, num_splits


def flash_mla_with_kvcache(
    q: jax.Array,
    k_cache: jax.Array,
    block_table: jax.Array,
    cache_seqlens: jax.Array,
    head_dim_v: int,
    tile_scheduler_metadata: jax.Array,
    num_splits: jax.Array,
    softmax_scale: float | None = None,
    causal: bool = False,
    *,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Multi-head latent attention decode against a paged latent cache.

    Args:
      q: [batch, s_q, h_q, 576] bfloat16 or float16 array of new query tokens.
      k_cache: [num_blocks, 64, h_kv, 576] array, dtype of ``q``: the paged latent cache; V is
        its first ``head_dim_v`` channels.
      block_table: [batch, max_blocks_per_seq] int32 array, page ids of each request in order.
        Entries past ``ceil(cache_seqlens[i] / 64)`` are never read and may hold anything.
      cache_seqlens: [batch] int32 array, tokens in each request's cache; 0 is legal.
      head_dim_v: 512.
      tile_scheduler_metadata: [num_sm_parts, 8] int32 array from ``get_mla_metadata``.
      num_splits: [batch + 1] int32 array from ``get_mla_metadata``.
      softmax_scale: logit scale, ``576 ** -0.5`` when None.
      causal: bottom-right aligned causal mask among the ``s_q`` new tokens (no effect when
        ``s_q == 1``).
      implementation: None (CUDA kernel where it runs, else pure JAX), ``"xla"`` or ``"cuda"``.

    Returns:
      ``(out, lse)``: [batch, s_q, h_q, 512] array of the dtype of ``q`` and [batch, h_q, s_q]
      float32 natural-log sum-exp of the scaled logits. A row with no visible key gives 0 and
      +inf. A request whose length is negative or beyond ``64 * max_blocks_per_seq``, or whose
      tokens sit on a page id outside ``[0, num_blocks)``, gives NaN rows.
    """
    q, k_cache, block_table, cache_seqlens, metadata, num_splits, scale, causal = _validate.decode_args(
        q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
        softmax_scale, causal, implementation,
    )
    out, lse = decode_p.bind(
        q,
        k_cache,
        block_table,
        cache_seqlens,
        metadata,
        num_splits,
        softmax_scale=scale,
        causal=causal,
        head_dim_v=int(head_dim_v),
        implementation=implementation,
    )
    return out, lse
