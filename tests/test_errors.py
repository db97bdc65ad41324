"""Every bad-input rule (contract section 2) raises at trace time, naming the argument and shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as jf

B, S_Q, H_Q, H_KV, PAGES, WIDTH, P = 2, 1, 16, 1, 8, 4, 132
bf16, i32 = jnp.bfloat16, jnp.int32


def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


GOOD = dict(
    q=spec((B, S_Q, H_Q, 576), bf16),
    k_cache=spec((PAGES, 64, H_KV, 576), bf16),
    block_table=spec((B, WIDTH), i32),
    cache_seqlens=spec((B,), i32),
    head_dim_v=512,
    tile_scheduler_metadata=spec((P, 8), i32),
    num_splits=spec((B + 1,), i32),
    softmax_scale=None,
    causal=False,
    implementation=None,
)
ARRAYS = ("q", "k_cache", "block_table", "cache_seqlens", "tile_scheduler_metadata", "num_splits")


def decode_with(**changes):
    """Traces flash_mla_with_kvcache (no computation) with some arguments replaced."""
    kw = {**GOOD, **changes}
    arrays = {k: kw.pop(k) for k in ARRAYS}
    return jax.eval_shape(lambda a: jf.flash_mla_with_kvcache(**a, **kw), arrays)


DECODE_ERRORS = [
    # (changes, exception, text the message must contain)
    (dict(q=spec((B, H_Q, 576), bf16)), ValueError, "q.shape=(2, 16, 576)"),
    (dict(q=spec((B, S_Q, H_Q, 576), jnp.float32)), TypeError, "q.dtype=float32"),
    (dict(q=spec((B, S_Q, H_Q, 512), bf16), k_cache=spec((PAGES, 64, H_KV, 512), bf16)), ValueError, "q.shape=(2, 1, 16, 512)"),
    (dict(k_cache=spec((PAGES, 64, H_KV, 576), jnp.float16)), TypeError, "k_cache.dtype=float16"),
    (dict(k_cache=spec((PAGES, 64, 576), bf16)), ValueError, "k_cache.shape=(8, 64, 576)"),
    (dict(k_cache=spec((PAGES, 32, H_KV, 576), bf16)), ValueError, "page_block_size"),
    (dict(k_cache=spec((PAGES, 64, H_KV, 512), bf16)), ValueError, "k_cache.shape=(8, 64, 1, 512)"),
    (dict(k_cache=spec((PAGES, 64, 3, 576), bf16)), ValueError, "h_q=16, h_kv=3"),
    (dict(k_cache=spec((0, 64, 1, 576), bf16)), ValueError, "num_blocks"),
    (dict(block_table=spec((B, WIDTH), jnp.int64 if jax.config.jax_enable_x64 else jnp.uint32)), TypeError, "block_table must be int32"),
    (dict(block_table=spec((B + 1, WIDTH), i32)), ValueError, "block_table.shape=(3, 4)"),
    (dict(block_table=spec((B * WIDTH,), i32)), ValueError, "block_table.shape=(8,)"),
    (dict(cache_seqlens=spec((B,), jnp.float32)), TypeError, "cache_seqlens.dtype=float32"),
    (dict(cache_seqlens=spec((B + 1,), i32)), ValueError, "cache_seqlens.shape=(3,)"),
    (dict(tile_scheduler_metadata=spec((P, 4), i32)), ValueError, "(132, 4)"),
    (dict(tile_scheduler_metadata=spec((P, 8), jnp.float32)), TypeError, "tile_scheduler_metadata must be int32"),
    (dict(tile_scheduler_metadata=spec((8,), i32)), ValueError, "tile_scheduler_metadata.shape=(8,)"),
    (dict(num_splits=spec((B,), i32)), ValueError, "num_splits.shape=(2,)"),
    (dict(num_splits=spec((B + 1,), jnp.uint32)), TypeError, "num_splits must be int32"),
    (dict(head_dim_v=576), ValueError, "head_dim_v must be 512"),
    (dict(head_dim_v=512.0), TypeError, "head_dim_v must be a static Python int"),
    (dict(causal=1), TypeError, "causal must be a Python bool"),
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale must be finite and > 0"),
    (dict(softmax_scale="big"), TypeError, "softmax_scale must be a Python float"),
    (dict(implementation="triton"), ValueError, "implementation must be one of"),
    (dict(q=[[1.0]]), TypeError, "q must be an array"),
]


@pytest.mark.parametrize("changes, exc, text", DECODE_ERRORS, ids=[t for _, _, t in DECODE_ERRORS])
def test_decode_rejects(changes, exc, text):
    with pytest.raises(exc, match="flash_mla_with_kvcache") as info:
        decode_with(**changes)
    assert text in str(info.value), str(info.value)


def test_decode_accepts_the_good_arguments():
    out, lse = decode_with()
    assert out.shape == (B, S_Q, H_Q, 512) and out.dtype == bf16
    assert lse.shape == (B, H_Q, S_Q) and lse.dtype == jnp.float32


def test_traced_softmax_scale_is_rejected():
    arrays = {k: GOOD[k] for k in ARRAYS}
    with pytest.raises(TypeError, match="softmax_scale must be a static Python float"):
        jax.eval_shape(lambda a, s: jf.flash_mla_with_kvcache(**a, head_dim_v=512, softmax_scale=s), arrays, spec((), jnp.float32))


def test_numpy_inputs_are_not_cast():
    arrays = {k: np.zeros(GOOD[k].shape, GOOD[k].dtype) for k in ARRAYS if k != "cache_seqlens"}
    arrays["cache_seqlens"] = np.zeros((B,), np.int64)
    with pytest.raises(TypeError, match="cache_seqlens must be int32"):
        jf.flash_mla_with_kvcache(**arrays, head_dim_v=512)


METADATA_ERRORS = [
    (dict(cache_seqlens=spec((B, 3), i32)), ValueError, "cache_seqlens.shape=(2, 3)"),
    (dict(cache_seqlens=spec((B,), jnp.float32)), TypeError, "cache_seqlens.dtype=float32"),
    (dict(cache_seqlens=spec((B,), jnp.uint32)), TypeError, "cache_seqlens.dtype=uint32"),
    (dict(num_q_tokens_per_head_k=0), ValueError, "num_q_tokens_per_head_k must be >= 1"),
    (dict(num_q_tokens_per_head_k=1.5), TypeError, "num_q_tokens_per_head_k must be a static Python int"),
    (dict(num_heads_k=0), ValueError, "num_heads_k must be >= 1"),
    (dict(num_heads_k=True), TypeError, "num_heads_k must be a static Python int"),
    (dict(num_sm=0), ValueError, "num_sm must be >= 1"),
    (dict(implementation="cudnn"), ValueError, "implementation must be one of"),
]


@pytest.mark.parametrize("changes, exc, text", METADATA_ERRORS, ids=[t for _, _, t in METADATA_ERRORS])
def test_metadata_rejects(changes, exc, text):
    kw = dict(cache_seqlens=spec((B,), i32), num_q_tokens_per_head_k=16, num_heads_k=1, num_sm=None, implementation=None)
    kw.update(changes)
    seqlens = kw.pop("cache_seqlens")
    with pytest.raises(exc, match="get_mla_metadata") as info:
        jax.eval_shape(lambda s: jf.get_mla_metadata(s, **kw), seqlens)
    assert text in str(info.value), str(info.value)


def test_metadata_sizes_must_be_static():
    with pytest.raises(TypeError, match="num_q_tokens_per_head_k must be a static Python int"):
        jax.eval_shape(lambda s, n: jf.get_mla_metadata(s, n, 1), spec((B,), i32), spec((), i32))
