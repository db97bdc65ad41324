"""JAX primitives: abstract evaluation, lowerings (CUDA custom call or pure JAX) and batching.

Two primitives:

- ``mla_metadata``: ``cache_seqlens [..., b] int32 -> (metadata [..., P, 8], num_splits [..., b+1])``.
  Leading dims are independent schedules; that is also how it batches.
- ``mla_decode``: ``(q, k_cache, block_table, cache_seqlens, metadata, num_splits) -> (out, lse)``.
  Its CUDA custom call has two more results, the split-KV accumulators
  ``[b + P, h_kv, rows, 512]`` and ``[b + P, h_kv, rows]`` float32: XLA allocates them, so the
  handler allocates nothing and stays CUDA-graph safe; the lowering drops them.

Lowering on the CUDA platform (``implementation``): ``"xla"`` always lowers to pure JAX;
``"cuda"`` always emits the custom call; ``None`` (auto) emits the custom call when every local
CUDA device is sm_90 and the extension registered the target, lowers to pure JAX when a local
GPU cannot run it, and emits the custom call when there is no local GPU at all (exporting for
CUDA from a CPU host). Every other platform lowers to pure JAX.

Inputs are validated by the public ops (``ops.py``); the rules here assume valid shapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir, xla

from . import _ffi, _scheduler, _split_kv
from ._config import METADATA_COLS

# --------------------------------------------------------------------------------------------
# Shared lowering choice


def _use_kernel(target: str, implementation: str | None) -> bool:
    if implementation == "xla":
        return False
    if implementation == "cuda":
        return True
    devices = _ffi.local_cuda_devices()
    if not devices:
        return True
    return _ffi.has_target(target) and all(_ffi.is_sm90(d) for d in devices)


def _register_lowerings(prim: Primitive, xla_fn, cuda_rule, target: str) -> None:
    pure_rule = mlir.lower_fun(xla_fn, multiple_results=True)

    def cuda_or_pure(ctx, *args, **params):
        if _use_kernel(target, params["implementation"]):
            return cuda_rule(ctx, *args, **params)
        return pure_rule(ctx, *args, **params)

    mlir.register_lowering(prim, pure_rule)
    mlir.register_lowering(prim, cuda_or_pure, platform="cuda")


def _reject_varying_manual_axes(name: str, *avals) -> None:
    """Inside ``jax.shard_map(check_vma=True)`` inputs carry varying manual axes, which these
    primitives do not propagate; say so instead of failing later inside the lowering."""
    for aval in avals:
        varying = getattr(getattr(aval, "mat", None), "varying", None)
        if varying:
            raise NotImplementedError(
                f"jax_flashmla: {name} inside jax.shard_map needs check_vma=False (its inputs vary "
                f"over manual axes {sorted(map(str, varying))}, and the op does not track them)"
            )


def _define(name: str) -> Primitive:
    prim = Primitive(name)
    prim.multiple_results = True
    prim.def_impl(functools.partial(xla.apply_primitive, prim))
    return prim


# --------------------------------------------------------------------------------------------
# Scheduler metadata

metadata_p = _define("jax_flashmla_mla_metadata")


def _metadata_abstract_eval(cache_seqlens, *, num_parts, implementation):
    del implementation
    _reject_varying_manual_axes("get_mla_metadata", cache_seqlens)
    *lead, b = cache_seqlens.shape
    return (
        jax.core.ShapedArray((*lead, num_parts, METADATA_COLS), jnp.int32),
        jax.core.ShapedArray((*lead, b + 1), jnp.int32),
    )


def _metadata_xla(cache_seqlens, *, num_parts, implementation):
    del implementation
    return _scheduler.schedule(cache_seqlens, num_parts)


def _metadata_cuda(ctx, cache_seqlens, *, num_parts, implementation):
    del num_parts, implementation  # the handler reads both from the result shapes
    return jax.ffi.ffi_lowering(_ffi.METADATA_TARGET)(ctx, cache_seqlens)


def _metadata_batch(args, dims, *, num_parts, implementation):
    (cache_seqlens,), (dim,) = args, dims
    cache_seqlens = jnp.moveaxis(cache_seqlens, dim, 0)
    outs = metadata_p.bind(cache_seqlens, num_parts=num_parts, implementation=implementation)
    return outs, (0, 0)


metadata_p.def_abstract_eval(_metadata_abstract_eval)
_register_lowerings(metadata_p, _metadata_xla, _metadata_cuda, _ffi.METADATA_TARGET)
batching.primitive_batchers[metadata_p] = _metadata_batch


# --------------------------------------------------------------------------------------------
# Decode


decode_p = _define("jax_flashmla_mla_decode")


def _decode_abstract_eval(q, k_cache, block_table, cache_seqlens, metadata, num_splits, *, head_dim_v, **_):
    _reject_varying_manual_axes("flash_mla_with_kvcache", q, k_cache, block_table, cache_seqlens, metadata, num_splits)
    b, s_q, h_q, _ = q.shape
    return (
        jax.core.ShapedArray((b, s_q, h_q, head_dim_v), q.dtype),
        jax.core.ShapedArray((b, h_q, s_q), jnp.float32),
    )


def _accumulator_avals(q, k_cache, metadata, head_dim_v):
    """Avals of the custom call's extra results, the split-KV accumulators."""
    b, s_q, h_q, _ = q.shape
    h_kv = k_cache.shape[2]
    slots, rows = b + metadata.shape[0], s_q * h_q // h_kv
    return (
        jax.core.ShapedArray((slots, h_kv, rows, head_dim_v), jnp.float32),
        jax.core.ShapedArray((slots, h_kv, rows), jnp.float32),
    )


def _decode_xla(*args, softmax_scale, causal, head_dim_v, implementation):
    del implementation
    out, lse, _, _ = _split_kv.mla_decode(
        *args, softmax_scale=softmax_scale, causal=causal, head_dim_v=head_dim_v
    )
    return out, lse


def _decode_cuda(ctx, *args, softmax_scale, causal, head_dim_v, implementation):
    del implementation
    q, k_cache, _, _, metadata, _ = ctx.avals_in
    accumulators = _accumulator_avals(q, k_cache, metadata, head_dim_v)
    ctx = ctx.replace(avals_out=[*ctx.avals_out, *accumulators])
    results = jax.ffi.ffi_lowering(_ffi.DECODE_TARGET)(
        ctx, *args, softmax_scale=np.float32(softmax_scale), causal=bool(causal)
    )
    return results[:2]


def _decode_batch(args, dims, **params):
    """Folds the mapped axis into the batch and reschedules the folded batch.

    The schedule only decides how the work is cut, not what is computed, so the batched call
    computes the same attention (up to the rounding of split merging) in one launch.
    """
    q, k_cache, block_table, cache_seqlens, metadata, _ = args
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)

    def leading(x, dim):
        if dim is None:
            return jnp.broadcast_to(x, (size, *x.shape))
        return jnp.moveaxis(x, dim, 0)

    qd, kd, btd, sd = dims[:4]
    q = leading(q, qd)
    block_table = leading(block_table, btd)
    cache_seqlens = leading(cache_seqlens, sd)
    n, b = q.shape[:2]
    if kd is not None:
        # Each mapped element has its own cache: stack them and shift its page ids. Ids outside
        # an element's own cache must stay invalid after folding, so they become -1.
        k_cache = jnp.moveaxis(k_cache, kd, 0)
        pages = k_cache.shape[1]
        k_cache = k_cache.reshape(n * pages, *k_cache.shape[2:])
        offset = (jnp.arange(n, dtype=jnp.int32) * pages)[:, None, None]
        valid = (block_table >= 0) & (block_table < pages)
        block_table = jnp.where(valid, block_table + offset, -1)
    q = q.reshape(n * b, *q.shape[2:])
    block_table = block_table.reshape(n * b, block_table.shape[-1])
    cache_seqlens = cache_seqlens.reshape(n * b)
    metadata, num_splits = metadata_p.bind(
        cache_seqlens, num_parts=metadata.shape[-2], implementation=params["implementation"]
    )
    out, lse = decode_p.bind(q, k_cache, block_table, cache_seqlens, metadata, num_splits, **params)
    return (out.reshape(n, b, *out.shape[1:]), lse.reshape(n, b, *lse.shape[1:])), (0, 0)


decode_p.def_abstract_eval(_decode_abstract_eval)
_register_lowerings(decode_p, _decode_xla, _decode_cuda, _ffi.DECODE_TARGET)
batching.primitive_batchers[decode_p] = _decode_batch
