"""DeepSeek-style Multi-head Latent Attention with a paged latent cache.

Per token, the layer caches only ``c_kv`` (the RMS-normalised 512-channel KV compression) and
``k_pe`` (a 64-channel RoPE key shared by all heads): 576 values instead of per-head K and V.

- Prefill runs standard attention: per-head keys and values are expanded from ``c_kv``
  through ``W_UK``/``W_UV`` (the up-projection ``kv_b_proj``), causal over the prompt.
- Decode absorbs ``W_UK`` into the query (``q_nope @ W_UK`` lands in the 512-d latent space,
  next to the 64-d RoPE query: 576 channels), so one ``flash_mla_with_kvcache`` call attends
  straight over the cached latents with V = ``c_kv``; ``W_UV`` then maps the latent output to
  ``v_head_dim`` per head. Both paths compute the same function up to rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from .. import ops
from ..cache import StepView
from .config import MLAConfig
from .rope import apply_rope, rope_frequencies

__all__ = ["MLAAttention"]


@functools.lru_cache(maxsize=None)
def _rope_table(config: MLAConfig):
    return rope_frequencies(config.qk_rope_head_dim, config.rope_theta, config.rope_scaling)


def _check_input(name: str, x, config: MLAConfig, view: StepView) -> None:
    b, t = view.slots.page.shape
    if x.ndim != 3 or x.shape != (b, t, config.hidden_size):
        raise ValueError(
            f"MLAAttention.{name}: x must have shape [batch={b}, t={t}, hidden_size={config.hidden_size}] "
            f"(batch and t from the cache's StepView); got x.shape={tuple(x.shape)}"
        )


class MLAAttention(nnx.Module):
    """Multi-head Latent Attention (DeepSeek-V2/V3) over a paged latent cache.

    Args:
      config: the layer's sizes, RoPE and dtypes.
      rngs: parameter initialisation.
    """

    def __init__(self, config: MLAConfig, *, rngs: nnx.Rngs):
        self.config = c = config
        linear = functools.partial(nnx.Linear, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        norm = functools.partial(nnx.RMSNorm, epsilon=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        if c.q_lora_rank is None:
            self.q_proj = linear(c.hidden_size, c.num_heads * c.qk_head_dim)
        else:
            self.q_a_proj = linear(c.hidden_size, c.q_lora_rank)
            self.q_a_norm = norm(c.q_lora_rank)
            self.q_b_proj = linear(c.q_lora_rank, c.num_heads * c.qk_head_dim)
        self.kv_a_proj = linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim)
        self.kv_a_norm = norm(c.kv_lora_rank)
        # Columns per head: qk_nope_head_dim of W_UK, then v_head_dim of W_UV.
        self.kv_b_proj = linear(c.kv_lora_rank, c.num_heads * (c.qk_nope_head_dim + c.v_head_dim))
        self.o_proj = linear(c.num_heads * c.v_head_dim, c.hidden_size)

    # -- shared by both paths ---------------------------------------------------------------

    def up_projections(self) -> tuple[jax.Array, jax.Array]:
        """``(W_UK, W_UV)``: [512, heads, qk_nope_head_dim] and [512, heads, v_head_dim] in the
        compute dtype."""
        c = self.config
        w = self.kv_b_proj.kernel[...].reshape(c.kv_lora_rank, c.num_heads, c.qk_nope_head_dim + c.v_head_dim)
        w = w.astype(c.dtype)
        return w[..., : c.qk_nope_head_dim], w[..., c.qk_nope_head_dim :]

    def _project(self, x: jax.Array, positions: jax.Array):
        """Queries and the token's cache entry.

        Returns:
          q_nope [b, t, heads, nope], q_pe [b, t, heads, 64] (rotated),
          latent [b, t, 576]: c_kv (normalised) then k_pe (rotated), in the compute dtype.
        """
        c = self.config
        b, t, _ = x.shape
        if c.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q = q.reshape(b, t, c.num_heads, c.qk_head_dim)
        inv_freq, magnitude = _rope_table(c)
        q_nope = q[..., : c.qk_nope_head_dim]
        q_pe = apply_rope(q[..., c.qk_nope_head_dim :], positions, inv_freq, magnitude)
        kv = self.kv_a_proj(x)
        c_kv = self.kv_a_norm(kv[..., : c.kv_lora_rank])
        k_pe = apply_rope(kv[..., c.kv_lora_rank :], positions, inv_freq, magnitude)
        latent = jnp.concatenate([c_kv.astype(c.dtype), k_pe.astype(c.dtype)], axis=-1)
        return q_nope.astype(c.dtype), q_pe.astype(c.dtype), latent

    def _project_and_cache(self, name: str, x: jax.Array, pages: jax.Array, view: StepView):
        """Both paths' start: queries, and this step's latents written into the pages."""
        _check_input(name, x, self.config, view)
        q_nope, q_pe, latent = self._project(x, view.positions)
        return q_nope, q_pe, latent, view.slots.write(pages, latent)

    def _output(self, o: jax.Array) -> jax.Array:
        b, t = o.shape[:2]
        return self.o_proj(o.reshape(b, t, -1).astype(self.config.dtype))

    # -- prefill: standard attention over the prompt ----------------------------------------

    def prefill(self, x: jax.Array, pages: jax.Array, view: StepView) -> tuple[jax.Array, jax.Array]:
        """Causal attention over fresh prompts, writing their latents into the cache.

        Requests start empty: the keys are this step's tokens only. Request ``i``'s first
        ``view.num_new[i]`` tokens are real; the rest is padding (its outputs are garbage and
        are not cached).

        Args:
          x: [batch, t, hidden_size] array of the compute dtype.
          pages: [num_pages, 64, 1, 576] array, this layer's pages.
          view: this step's ``StepView`` from ``PagedLatentCache.append``.

        Returns:
          ``(y, pages)``: [batch, t, hidden_size] and the updated pages.
        """
        c = self.config
        q_nope, q_pe, latent, pages = self._project_and_cache("prefill", x, pages, view)
        w_uk, w_uv = self.up_projections()
        c_kv, k_pe = latent[..., : c.kv_lora_rank], latent[..., c.kv_lora_rank :]
        # Per-head keys and values, expanded from the latent (what absorption avoids).
        k_nope = jnp.einsum("bkc,chn->bkhn", c_kv, w_uk, preferred_element_type=jnp.float32).astype(c.dtype)
        v = jnp.einsum("bkc,chv->bkhv", c_kv, w_uv, preferred_element_type=jnp.float32).astype(c.dtype)
        logits = jnp.einsum("bqhn,bkhn->bhqk", q_nope, k_nope, preferred_element_type=jnp.float32)
        logits += jnp.einsum("bqhr,bkr->bhqk", q_pe, k_pe, preferred_element_type=jnp.float32)
        logits *= c.softmax_scale
        t = x.shape[1]
        idx = jnp.arange(t)
        visible = (idx[None, :] <= idx[:, None])[None] & (idx[None, None, :] < view.num_new[:, None, None])
        logits = jnp.where(visible[:, None], logits, -jnp.inf)
        # Padding queries of an empty request see no key: give them zeros, not NaN.
        row_max = jnp.max(logits, axis=-1, keepdims=True)
        p = jnp.exp(logits - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
        p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
        o = jnp.einsum("bhqk,bkhv->bqhv", p.astype(c.dtype), v, preferred_element_type=jnp.float32)
        return self._output(o), pages

    # -- decode: absorbed attention with the kernel -----------------------------------------

    def decode(
        self,
        x: jax.Array,
        pages: jax.Array,
        view: StepView,
        metadata: tuple[jax.Array, jax.Array],
        *,
        implementation: str | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Attention of ``t`` new tokens per request over everything cached, with ``W_UK`` absorbed.

        Every active request appends exactly ``t`` tokens in this step (its ``num_new`` is ``t``);
        an inactive one (``num_new == 0``) gets outputs that the caller ignores.

        Args:
          x: [batch, t, hidden_size] array of the compute dtype.
          pages: [num_pages, 64, 1, 576] array, this layer's pages.
          view: this step's ``StepView`` from ``PagedLatentCache.append``.
          metadata: ``get_mla_metadata(view.seqlens, t * heads, 1)``, computed once per step.
          implementation: passed to ``flash_mla_with_kvcache``.

        Returns:
          ``(y, pages)``: [batch, t, hidden_size] and the updated pages.
        """
        c = self.config
        q_nope, q_pe, _, pages = self._project_and_cache("decode", x, pages, view)
        w_uk, w_uv = self.up_projections()
        q_latent = jnp.einsum("bthn,chn->bthc", q_nope, w_uk, preferred_element_type=jnp.float32).astype(c.dtype)
        q = jnp.concatenate([q_latent, q_pe], axis=-1)  # [b, t, heads, 576]
        tile_metadata, num_splits = metadata
        o_latent, _ = ops.flash_mla_with_kvcache(
            q, pages, view.block_table, view.seqlens, c.kv_lora_rank, tile_metadata, num_splits,
            softmax_scale=c.softmax_scale, causal=True, implementation=implementation,
        )
        o = jnp.einsum("bthc,chv->bthv", o_latent, w_uv, preferred_element_type=jnp.float32)
        return self._output(o), pages
