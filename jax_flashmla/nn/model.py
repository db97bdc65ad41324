"""A small decoder-only language model built from ``MLAAttention`` blocks (random weights)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import ops
from ..cache import PagedLatentCache, is_concrete
from .attention import MLAAttention
from .config import DecoderConfig

__all__ = ["MLP", "DecoderBlock", "MLADecoder"]


class MLP(nnx.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, mlp_hidden_size: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        linear = functools.partial(nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = linear(hidden_size, mlp_hidden_size)
        self.up = linear(hidden_size, mlp_hidden_size)
        self.down = linear(mlp_hidden_size, hidden_size)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(nnx.silu(self.gate(x)) * self.up(x))


class DecoderBlock(nnx.Module):
    """Pre-norm residual block: MLA attention, then the MLP."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        a = config.attention
        norm = functools.partial(nnx.RMSNorm, epsilon=a.rms_norm_eps, dtype=a.dtype, param_dtype=a.param_dtype, rngs=rngs)
        self.attn_norm = norm(a.hidden_size)
        self.attention = MLAAttention(a, rngs=rngs)
        self.mlp_norm = norm(a.hidden_size)
        self.mlp = MLP(a.hidden_size, config.mlp_hidden_size, dtype=a.dtype, param_dtype=a.param_dtype, rngs=rngs)

    def _finish(self, x, h):
        x = x + h
        return x + self.mlp(self.mlp_norm(x))

    def prefill(self, x, pages, view):
        h, pages = self.attention.prefill(self.attn_norm(x), pages, view)
        return self._finish(x, h), pages

    def decode(self, x, pages, view, metadata, *, implementation=None):
        h, pages = self.attention.decode(self.attn_norm(x), pages, view, metadata, implementation=implementation)
        return self._finish(x, h), pages


class MLADecoder(nnx.Module):
    """Embeddings, ``num_layers`` MLA blocks, a final RMSNorm and an LM head.

    Args:
      config: model sizes; ``config.attention`` is every block's ``MLAConfig``.
      rngs: parameter initialisation.
    """

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        a = config.attention
        self.embed = nnx.Embed(config.vocab_size, a.hidden_size, dtype=a.dtype, param_dtype=a.param_dtype, rngs=rngs)
        self.blocks = nnx.List([DecoderBlock(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = nnx.RMSNorm(a.hidden_size, epsilon=a.rms_norm_eps, dtype=a.dtype, param_dtype=a.param_dtype, rngs=rngs)
        # Logits in float32: bf16 logits tie often at the top of a large vocabulary, and greedy
        # decoding would then pick between equals by rounding noise.
        self.lm_head = nnx.Linear(a.hidden_size, config.vocab_size, use_bias=False, dtype=jnp.float32,
                                  param_dtype=a.param_dtype, rngs=rngs)

    def init_cache(
        self, batch: int, num_pages: int, max_blocks_per_seq: int, *, shared_layout: bool = True, fill: float = 0.0
    ) -> PagedLatentCache:
        """An empty paged latent cache for this model (see ``PagedLatentCache.create``)."""
        return PagedLatentCache.create(
            self.config.num_layers, batch, num_pages, max_blocks_per_seq,
            dtype=self.config.attention.dtype, shared_layout=shared_layout, fill=fill,
        )

    def _check_tokens(self, name: str, tokens, cache: PagedLatentCache):
        if tokens.ndim != 2 or tokens.dtype != jnp.int32:
            raise TypeError(f"MLADecoder.{name}: tokens must be int32 [batch, t]; got {tokens.dtype} {tuple(tokens.shape)}")
        if cache.num_layers != self.config.num_layers or tokens.shape[0] != cache.tables[0].batch:
            raise ValueError(
                f"MLADecoder.{name}: cache has {cache.num_layers} layers and batch {cache.tables[0].batch}; the model "
                f"has {self.config.num_layers} layers and tokens.shape={tuple(tokens.shape)}"
            )

    def _logits(self, x):
        return self.lm_head(self.final_norm(x))

    def prefill(
        self, tokens: jax.Array, prompt_lens: jax.Array, cache: PagedLatentCache
    ) -> tuple[jax.Array, PagedLatentCache]:
        """Runs fresh prompts and caches them.

        Args:
          tokens: [batch, t] int32 prompts, right-padded to a common length ``t``.
          prompt_lens: [batch] int32 prompt lengths in [0, t]; 0 leaves a slot untouched.
          cache: the model's cache; requests with a prompt must be empty (length 0).

        Returns:
          ``(logits, cache)``: [batch, vocab] float32 logits at each request's last prompt token.
        """
        self._check_tokens("prefill", tokens, cache)
        b, t = tokens.shape
        if is_concrete(prompt_lens, cache.lengths):
            busy = np.asarray((np.asarray(prompt_lens) > 0) & (np.asarray(cache.lengths) > 0))
            if busy.any():
                raise ValueError(
                    f"MLADecoder.prefill: requests {np.flatnonzero(busy).tolist()} already hold tokens; prefill "
                    "starts requests from an empty cache (free them first, or feed more tokens with decode)"
                )
        cache, views = cache.append(prompt_lens, t)
        x = self.embed(tokens)
        for layer, block in enumerate(self.blocks):
            x, pages = block.prefill(x, cache.pages[layer], views[layer])
            cache = cache.with_pages(layer, pages)
        last = jnp.clip(prompt_lens - 1, 0, t - 1)
        x_last = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        return self._logits(x_last), cache

    def decode(
        self, tokens: jax.Array, active: jax.Array, cache: PagedLatentCache, *, implementation: str | None = None
    ) -> tuple[jax.Array, PagedLatentCache]:
        """One decode step: ``t`` new tokens for each active request.

        The schedule (``get_mla_metadata``) is computed once here and shared by every layer.

        Args:
          tokens: [batch, t] int32 new tokens.
          active: [batch] bool; inactive requests append nothing (their logits are garbage).
          cache: the model's cache.
          implementation: passed to the attention ops (None: the CUDA kernel where it runs).

        Returns:
          ``(logits, cache)``: [batch, t, vocab] float32.
        """
        self._check_tokens("decode", tokens, cache)
        b, t = tokens.shape
        if active.shape != (b,) or active.dtype != jnp.bool_:
            raise TypeError(f"MLADecoder.decode: active must be bool [{b}]; got {active.dtype} {tuple(active.shape)}")
        a = self.config.attention
        cache, views = cache.append(jnp.where(active, t, 0).astype(jnp.int32), t)
        metadata = ops.get_mla_metadata(cache.lengths, t * a.num_heads, 1, implementation=implementation)
        x = self.embed(tokens)
        for layer, block in enumerate(self.blocks):
            x, pages = block.decode(x, cache.pages[layer], views[layer], metadata, implementation=implementation)
            cache = cache.with_pages(layer, pages)
        return self._logits(x), cache
