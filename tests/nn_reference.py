"""Independent float64 numpy reference of DeepSeek MLA, the naive way: per-head keys and values
expanded from the latent, dense causal attention over a whole sequence. It reads only the
layer's weights; none of the layer's code runs here (RoPE frequencies come from
``rope_frequencies``, which test_nn checks on its own)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jax_flashmla as jf
from jax_flashmla.nn import MLAAttention, MLAConfig, PagedLatentCache, YarnScaling, rope_frequencies

from helpers import fresh_seed

# Unit roundoff of the compute dtype. The layer rounds at ~5 places (projections, cached latent,
# absorbed query, P, latent output). Measured per token: relative L2 error about 3 eps (bf16) and
# up to 5.1 eps (fp16, the naive prefill on the H100); the largest element up to 9 eps x RMS.
# Limits: 8 eps and 24 eps. A wrong scale, norm or rotation errs by 1e-1 or more.
EPS = {"bf16": 2.0**-8, "fp16": 2.0**-11}
DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16}


def _w(param) -> np.ndarray:
    return np.asarray(param[...], np.float64)


def _rms_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray, magnitude: float) -> np.ndarray:
    # x [T, ..., 64]; rotate-half pairs (i, i + 32).
    ang = positions.astype(np.float64)[:, None] * inv_freq[None, :]
    ang = ang.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (inv_freq.size,))
    cos, sin = np.cos(ang) * magnitude, np.sin(ang) * magnitude
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def naive_mla(layer: MLAAttention, x: np.ndarray) -> np.ndarray:
    """Causal MLA over one request's whole sequence.

    Args:
      layer: the layer whose weights to use.
      x: [T, hidden_size] inputs at positions 0..T-1.

    Returns:
      [T, hidden_size] float64 outputs.
    """
    c = layer.config
    x = np.asarray(x, np.float64)
    T = x.shape[0]
    pos = np.arange(T)
    inv_freq, magnitude = rope_frequencies(c.qk_rope_head_dim, c.rope_theta, c.rope_scaling)
    if c.q_lora_rank is None:
        q = x @ _w(layer.q_proj.kernel)
    else:
        q = _rms_norm(x @ _w(layer.q_a_proj.kernel), _w(layer.q_a_norm.scale), c.rms_norm_eps) @ _w(layer.q_b_proj.kernel)
    q = q.reshape(T, c.num_heads, c.qk_head_dim)
    q_nope, q_pe = q[..., : c.qk_nope_head_dim], _rope(q[..., c.qk_nope_head_dim :], pos, inv_freq, magnitude)
    kv = x @ _w(layer.kv_a_proj.kernel)
    c_kv = _rms_norm(kv[:, : c.kv_lora_rank], _w(layer.kv_a_norm.scale), c.rms_norm_eps)
    k_pe = _rope(kv[:, c.kv_lora_rank :], pos, inv_freq, magnitude)  # [T, 64], shared by heads
    w = _w(layer.kv_b_proj.kernel).reshape(c.kv_lora_rank, c.num_heads, c.qk_nope_head_dim + c.v_head_dim)
    k_nope = np.einsum("tc,chn->thn", c_kv, w[..., : c.qk_nope_head_dim])
    v = np.einsum("tc,chv->thv", c_kv, w[..., c.qk_nope_head_dim :])
    k = np.concatenate([k_nope, np.broadcast_to(k_pe[:, None], (T, c.num_heads, c.qk_rope_head_dim))], axis=-1)
    qf = np.concatenate([q_nope, q_pe], axis=-1)
    logits = np.einsum("ihd,jhd->hij", qf, k) * c.softmax_scale
    logits = np.where(np.tril(np.ones((T, T), bool))[None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("hij,jhv->ihv", p, v).reshape(T, c.num_heads * c.v_head_dim)
    return o @ _w(layer.o_proj.kernel)


def assert_layer_close(actual: np.ndarray, expected: np.ndarray, what: str, *, rel_l2: float, rel_max: float) -> None:
    """Layer outputs against the float64 reference, per token: the relative L2 error of the
    token's vector and the largest element error relative to the vector's RMS."""
    actual = np.asarray(actual, np.float64)
    assert np.isfinite(actual).all(), f"{what}: non-finite outputs"
    err = actual - expected
    norm = np.linalg.norm(expected, axis=-1)
    rms = norm / np.sqrt(expected.shape[-1])
    l2 = np.linalg.norm(err, axis=-1) / norm
    mx = np.abs(err).max(-1) / rms
    worst = np.unravel_index(np.argmax(l2), l2.shape)
    assert l2.max() <= rel_l2 and mx.max() <= rel_max, (
        f"{what}: relative L2 error {l2.max():.2e} (limit {rel_l2:.0e}) at token {worst}, "
        f"max element error {mx.max():.2e} x RMS (limit {rel_max:.0e})"
    )


def _small_layer(q_lora, yarn, dtype, seed):
    cfg = MLAConfig(
        hidden_size=96, num_heads=4, q_lora_rank=q_lora, qk_nope_head_dim=32, v_head_dim=48,
        rope_scaling=YarnScaling(factor=8.0, original_max_position=64) if yarn else None, dtype=dtype,
    )
    layer = MLAAttention(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    # Non-trivial norm scales, so that a misplaced norm cannot pass.
    for norm in [layer.kv_a_norm] + ([layer.q_a_norm] if q_lora else []):
        norm.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, norm.scale[...].shape), jnp.float32)
    return layer, rng


def check_layer_against_naive(q_lora, yarn, t_dec: int, dtype: str, *, jit: bool, implementation) -> None:
    """Prefill (naive, in JAX) then decode steps (W_UK absorbed, flash_mla_with_kvcache over the
    paged cache) against float64 naive MLA over each request's whole sequence. Prompts of 62 and
    70 tokens make decode cross a page boundary and prefill span two pages."""
    seed = fresh_seed()
    layer, rng = _small_layer(q_lora, yarn, DTYPES[dtype], seed)
    c = layer.config
    lens = np.array([5, 62, 1, 70], np.int32)
    b, prompt, steps = lens.size, int(lens.max()), 3
    # NaN in every slot never written: a read of one would poison the outputs.
    cache = PagedLatentCache.create(1, b, 24, 4, dtype=c.dtype, fill=np.nan)
    xs = jnp.asarray(rng.standard_normal((b, prompt + steps * t_dec, c.hidden_size)), c.dtype)

    def prefill(x, cache):
        cache, views = cache.append(jnp.asarray(lens), prompt)
        y, pages = layer.prefill(x, cache.pages[0], views[0])
        return y, cache.with_pages(0, pages)

    def decode(x, cache):
        cache, views = cache.append(jnp.full((b,), t_dec, jnp.int32), t_dec)
        metadata = jf.get_mla_metadata(cache.lengths, t_dec * c.num_heads, 1, implementation=implementation)
        y, pages = layer.decode(x, cache.pages[0], views[0], metadata, implementation=implementation)
        return y, cache.with_pages(0, pages)

    if jit:
        prefill, decode = jax.jit(prefill), jax.jit(decode)
    y, cache = prefill(xs[:, :prompt], cache)
    outs = [[np.asarray(y[i, : lens[i]])] for i in range(b)]
    inputs = [[np.asarray(xs[i, : lens[i]])] for i in range(b)]
    for s in range(steps):
        x = xs[:, prompt + s * t_dec : prompt + (s + 1) * t_dec]
        y, cache = decode(x, cache)
        for i in range(b):
            outs[i].append(np.asarray(y[i]))
            inputs[i].append(np.asarray(x[i]))
    eps = EPS[dtype]
    for i in range(b):
        ref = naive_mla(layer, np.concatenate(inputs[i]).astype(np.float64))
        out = np.concatenate(outs[i]).astype(np.float64)
        what = f"seed={seed} request {i} (prompt {lens[i]})"
        assert_layer_close(out[: lens[i]], ref[: lens[i]], f"prefill, {what}", rel_l2=8 * eps, rel_max=24 * eps)
        assert_layer_close(out[lens[i]:], ref[lens[i]:], f"absorbed decode, {what}", rel_l2=8 * eps, rel_max=24 * eps)
