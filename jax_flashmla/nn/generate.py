"""Batched greedy generation with the decoder: one compiled prefill, one compiled decode step.

Each step is a single ``jax.jit`` program: page allocation, 1 metadata call, one attention call
per layer, the LM head, the argmax, and freeing the pages of requests that finished. The cache
is donated, so pages are updated in place.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .._ffi import DECODE_TARGET, METADATA_TARGET
from ..cache import PagedLatentCache
from .model import MLADecoder

__all__ = ["GreedyGenerator", "GenerationResult"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """What changes from step to step, besides the cache."""

    tokens: jax.Array  # [batch] int32 last token of each request
    active: jax.Array  # [batch] bool still generating
    remaining: jax.Array  # [batch] int32 tokens each request may still generate


@dataclasses.dataclass
class GenerationResult:
    tokens: np.ndarray  # [batch, steps] int32 generated tokens; -1 after a request finished
    logits: np.ndarray | None  # [batch, steps, vocab] float32 when kept, else None
    prefill_seconds: float  # wall time of the prefill, compiled beforehand
    step_seconds: list  # wall time of each decode step (dispatch to tokens on the host)
    compile_seconds: float
    attention_path: str  # which attention ran in the decode step (from its compiled HLO)


def attention_path(hlo_text: str) -> str:
    """Names the attention path of a lowered decode step."""
    decode_calls = hlo_text.count(DECODE_TARGET)
    if decode_calls:
        return f"CUDA kernels ({decode_calls} x {DECODE_TARGET}, {hlo_text.count(METADATA_TARGET)} x {METADATA_TARGET})"
    return "pure JAX (XLA)"


class GreedyGenerator:
    """Compiles a model's prefill and decode step once, then generates.

    Args:
      model: the decoder (its weights are captured at construction).
      implementation: attention implementation (None: the CUDA kernel where it runs).
      eos_id: a token that ends a request, or None.
    """

    def __init__(self, model: MLADecoder, *, implementation: str | None = None, eos_id: int | None = None):
        graphdef, self._params = nnx.split(model)
        eos = -1 if eos_id is None else int(eos_id)

        def prefill(params, tokens, prompt_lens, budgets, cache, forced):
            m = nnx.merge(graphdef, params)
            logits, cache = m.prefill(tokens, prompt_lens, cache)
            first = _next_token(logits, forced)
            live = prompt_lens > 0
            state = DecodeState(tokens=first, active=live, remaining=jnp.where(live, budgets - 1, 0))
            return _retire(state, first, cache, eos) + (logits,)

        def step(params, state, cache, forced):
            m = nnx.merge(graphdef, params)
            logits, cache = m.decode(state.tokens[:, None], state.active, cache, implementation=implementation)
            logits = logits[:, 0]
            nxt = jnp.where(state.active, _next_token(logits, forced), -1)
            state = dataclasses.replace(state, tokens=nxt, remaining=state.remaining - state.active)
            return _retire(state, nxt, cache, eos) + (logits,)

        self._prefill_fn = jax.jit(prefill, donate_argnums=(4,))
        self._step_fn = jax.jit(step, donate_argnums=(2,))
        self._compiled: dict = {}

    def _compile(self, name: str, fn: Callable, *args):
        key = (name,) + tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(args))
        if key not in self._compiled:
            lowered = fn.lower(*args)
            self._compiled[key] = (lowered.compile(), lowered.as_text())
        return self._compiled[key]

    def generate(
        self,
        prompts: np.ndarray,
        prompt_lens: np.ndarray,
        max_new_tokens: np.ndarray | int,
        cache: PagedLatentCache,
        *,
        keep_logits: bool = False,
        forced_tokens: np.ndarray | None = None,
        on_step: Callable[[int, float], None] | None = None,
    ) -> tuple[GenerationResult, PagedLatentCache]:
        """Greedy generation for a batch of prompts.

        Args:
          prompts: [batch, t] int32 prompts, right-padded.
          prompt_lens: [batch] int32 lengths (0: an empty slot that generates nothing).
          max_new_tokens: int or [batch] int32, tokens to generate per request (>= 1).
          cache: an empty cache of the model (donated: use the returned one).
          keep_logits: also return every step's logits.
          forced_tokens: [batch, max_new_tokens] int32 or None. Where an entry is >= 0, that
            token is emitted (and fed back) instead of the argmax: teacher forcing, to score a
            given continuation; ``logits`` stay the model's.
          on_step: called after each decode step with (step index, seconds).

        Returns:
          ``(result, cache)``; the returned cache has every finished request freed.
        """
        prompts, prompt_lens = np.asarray(prompts), np.asarray(prompt_lens)
        if prompts.ndim != 2 or prompt_lens.shape != prompts.shape[:1]:
            raise ValueError(
                f"GreedyGenerator.generate: prompts must be [batch, t] and prompt_lens [batch]; got "
                f"prompts.shape={prompts.shape}, prompt_lens.shape={prompt_lens.shape}"
            )
        if (prompt_lens < 0).any() or (prompt_lens > prompts.shape[1]).any():
            raise ValueError(
                f"GreedyGenerator.generate: prompt_lens must lie in [0, t={prompts.shape[1]}] (the width of "
                f"prompts); got {prompt_lens.tolist()}"
            )
        b = prompts.shape[0]
        budgets = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (b,))
        if (budgets < 1).any():
            raise ValueError(f"GreedyGenerator.generate: max_new_tokens must be >= 1; got {budgets.tolist()}")
        steps = int(budgets.max()) - 1
        if forced_tokens is None:
            forced = np.full((b, steps + 1), -1, np.int32)
        else:
            forced = np.asarray(forced_tokens, np.int32)
            if forced.shape != (b, steps + 1):
                raise ValueError(f"GreedyGenerator.generate: forced_tokens must have shape {(b, steps + 1)}; got {forced.shape}")
        args = (self._params, jnp.asarray(prompts, jnp.int32), jnp.asarray(prompt_lens, jnp.int32), jnp.asarray(budgets),
                cache, jnp.asarray(forced[:, 0]))
        t0 = time.perf_counter()
        prefill, _ = self._compile("prefill", self._prefill_fn, *args)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        state, cache, logits = prefill(*args)
        first = np.asarray(state.tokens)
        prefill_s = time.perf_counter() - t0
        cache.check()  # prompts that found no page: say so now, not after the whole generation
        t0 = time.perf_counter()
        step, hlo = self._compile("step", self._step_fn, self._params, state, cache, state.tokens)
        compile_s += time.perf_counter() - t0

        tokens = np.full((b, steps + 1), -1, np.int32)
        tokens[:, 0] = np.where(np.asarray(prompt_lens) > 0, first, -1)
        kept = [np.asarray(logits)] if keep_logits else None
        forced_dev = list(jnp.asarray(forced.T))  # per step, on the device before the loop
        seconds = []
        for i in range(steps):
            t0 = time.perf_counter()
            state, cache, logits = step(self._params, state, cache, forced_dev[i + 1])
            tokens[:, i + 1] = np.asarray(state.tokens)  # waits for the step
            seconds.append(time.perf_counter() - t0)
            if keep_logits:
                kept.append(np.asarray(logits))
            if on_step:
                on_step(i, seconds[-1])
            if (tokens[:, i + 1] < 0).all():  # every request finished (eos)
                break
        cache.check()
        result = GenerationResult(
            tokens=tokens,
            logits=np.stack(kept, axis=1) if keep_logits else None,
            prefill_seconds=prefill_s,
            step_seconds=seconds,
            compile_seconds=compile_s,
            attention_path=attention_path(hlo),
        )
        return result, cache


def _next_token(logits: jax.Array, forced: jax.Array) -> jax.Array:
    """The greedy token, or the forced one where ``forced >= 0``."""
    return jnp.where(forced >= 0, forced, jnp.argmax(logits, axis=-1).astype(jnp.int32))


def _retire(state: DecodeState, emitted: jax.Array, cache: PagedLatentCache, eos: int):
    """Ends requests that used their budget or emitted ``eos``, and frees their pages."""
    done = state.active & ((state.remaining <= 0) | (emitted == eos))
    cache = cache.free(done)
    return dataclasses.replace(state, active=state.active & ~done), cache
