"""Trace-time checks of the public ops' arguments: clear errors naming the argument and shapes.

Nothing is reshaped or cast: a wrong dtype is a TypeError, a wrong shape or value a ValueError.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
import numpy as np

from ._config import HEAD_DIM, HEAD_DIM_V, IMPLEMENTATIONS, METADATA_COLS, PAGE_BLOCK_SIZE


def _fail(exc, op: str, msg: str):
    raise exc(f"{op}: {msg}")


def array(op: str, name: str, x, rank: int, layout: str):
    """Checks that ``x`` is an array of ``rank`` dims. It is returned as given: dtype checks must
    see the caller's dtype (``jnp.asarray`` would turn int64 into int32 without x64)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        _fail(TypeError, op, f"{name} must be an array of shape {layout}; got {type(x).__name__}")
    if len(x.shape) != rank:
        _fail(ValueError, op, f"{name} must have shape {layout} (rank {rank}); got {name}.shape={tuple(x.shape)}")
    return x


def int32(op: str, name: str, x, layout: str):
    if x.dtype != jnp.int32:
        _fail(TypeError, op, f"{name} must be int32 {layout}; got {name}.dtype={x.dtype} (cast it yourself, nothing is cast here)")


def static_int(op: str, name: str, value, minimum: int = 1) -> int:
    if isinstance(value, (bool, np.bool_)) or isinstance(value, jax.core.Tracer):
        _fail(TypeError, op, f"{name} must be a static Python int; got {type(value).__name__}")
    try:
        value = operator.index(value)
    except TypeError:
        _fail(TypeError, op, f"{name} must be a static Python int; got {type(value).__name__}")
    if value < minimum:
        _fail(ValueError, op, f"{name} must be >= {minimum}; got {value}")
    return value


def implementation(op: str, value):
    if value not in IMPLEMENTATIONS:
        _fail(ValueError, op, f"implementation must be one of {IMPLEMENTATIONS}; got {value!r}")


def metadata_args(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_sm, impl):
    op = "get_mla_metadata"
    cache_seqlens = array(op, "cache_seqlens", cache_seqlens, 1, "[batch]")
    int32(op, "cache_seqlens", cache_seqlens, "[batch]")
    rows = static_int(op, "num_q_tokens_per_head_k", num_q_tokens_per_head_k)
    h_kv = static_int(op, "num_heads_k", num_heads_k)
    if num_sm is not None:
        num_sm = static_int(op, "num_sm", num_sm)
    implementation(op, impl)
    return jnp.asarray(cache_seqlens), rows, h_kv, num_sm


def softmax_scale(op: str, value, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, jax.core.Tracer):
        _fail(TypeError, op, "softmax_scale must be a static Python float (it is compiled into the kernel); got a traced value")
    try:
        value = float(value)
    except (TypeError, ValueError):
        _fail(TypeError, op, f"softmax_scale must be a Python float; got {type(value).__name__}")
    if not np.isfinite(value) or value <= 0:
        _fail(ValueError, op, f"softmax_scale must be finite and > 0; got {value}")
    return value


def decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v, metadata, num_splits, scale, causal, impl):
    op = "flash_mla_with_kvcache"
    q = array(op, "q", q, 4, "[batch, s_q, h_q, 576]")
    k_cache = array(op, "k_cache", k_cache, 4, "[num_blocks, 64, h_kv, 576]")
    block_table = array(op, "block_table", block_table, 2, "[batch, max_blocks_per_seq]")
    cache_seqlens = array(op, "cache_seqlens", cache_seqlens, 1, "[batch]")
    metadata = array(op, "tile_scheduler_metadata", metadata, 2, "[num_sm_parts, 8]")
    num_splits = array(op, "num_splits", num_splits, 1, "[batch + 1]")

    if q.dtype not in (jnp.bfloat16, jnp.float16):
        _fail(TypeError, op, f"q must be bfloat16 or float16; got q.dtype={q.dtype}")
    if k_cache.dtype != q.dtype:
        _fail(TypeError, op, f"k_cache must have the dtype of q ({q.dtype}); got k_cache.dtype={k_cache.dtype}")
    int32(op, "block_table", block_table, "[batch, max_blocks_per_seq]")
    int32(op, "cache_seqlens", cache_seqlens, "[batch]")
    int32(op, "tile_scheduler_metadata", metadata, "[num_sm_parts, 8]")
    int32(op, "num_splits", num_splits, "[batch + 1]")

    b, s_q, h_q, d = q.shape
    num_blocks, page, h_kv, d_k = k_cache.shape
    shapes = f"q.shape={tuple(q.shape)}, k_cache.shape={tuple(k_cache.shape)}"
    if d != HEAD_DIM:
        _fail(ValueError, op, f"q must have head dim {HEAD_DIM} (512 latent + 64 RoPE); got q.shape={tuple(q.shape)}")
    if d_k != d:
        _fail(ValueError, op, f"k_cache must have the head dim of q ({d}); got {shapes}")
    if page != PAGE_BLOCK_SIZE:
        _fail(ValueError, op, f"k_cache page_block_size (dim 1) must be {PAGE_BLOCK_SIZE}; got k_cache.shape={tuple(k_cache.shape)}")
    if b < 1 or s_q < 1 or h_q < 1 or h_kv < 1 or num_blocks < 1:
        _fail(ValueError, op, f"batch, s_q, h_q, h_kv and num_blocks must all be >= 1; got {shapes}")
    if h_q % h_kv:
        _fail(ValueError, op, f"h_q must be a multiple of h_kv; got h_q={h_q}, h_kv={h_kv} ({shapes})")
    if block_table.shape[0] != b or block_table.shape[1] < 1:
        _fail(ValueError, op, f"block_table must have shape [batch={b}, max_blocks_per_seq >= 1]; got block_table.shape={tuple(block_table.shape)}")
    if cache_seqlens.shape != (b,):
        _fail(ValueError, op, f"cache_seqlens must have shape [batch={b}]; got cache_seqlens.shape={tuple(cache_seqlens.shape)}")
    if metadata.shape[1] != METADATA_COLS or metadata.shape[0] < 1:
        _fail(ValueError, op, f"tile_scheduler_metadata must have shape [num_sm_parts >= 1, {METADATA_COLS}]; got {tuple(metadata.shape)}")
    if num_splits.shape != (b + 1,):
        _fail(ValueError, op, f"num_splits must have shape [batch + 1 = {b + 1}]; got num_splits.shape={tuple(num_splits.shape)} (metadata computed for another batch?)")
    if static_int(op, "head_dim_v", head_dim_v) != HEAD_DIM_V:
        _fail(ValueError, op, f"head_dim_v must be {HEAD_DIM_V} (V is the first {HEAD_DIM_V} channels of K); got {head_dim_v}")
    if not isinstance(causal, (bool, np.bool_)):
        _fail(TypeError, op, f"causal must be a Python bool; got {type(causal).__name__}")
    implementation(op, impl)
    scale = softmax_scale(op, scale, d**-0.5)
    arrays = (q, k_cache, block_table, cache_seqlens, metadata, num_splits)
    return (*map(jnp.asarray, arrays), scale, bool(causal))
