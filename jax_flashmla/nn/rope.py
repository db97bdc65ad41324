"""Rotary position embedding of the decoupled RoPE channels, plain or YaRN-extended.

Rotate-half convention: channel ``i`` pairs with channel ``i + d/2`` and turns by
``position * inv_freq[i]``. (DeepSeek's checkpoints store the RoPE channels interleaved; a loader
permutes them once into this order, which keeps the rotation a pair of contiguous halves.)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .config import YarnScaling, yarn_mscale


def _correction_dim(num_rotations: float, dim: int, theta: float, max_position: int) -> float:
    # The channel index whose frequency completes num_rotations turns over max_position tokens.
    return dim * math.log(max_position / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))


def rope_frequencies(dim: int, theta: float, scaling: YarnScaling | None = None) -> tuple[np.ndarray, float]:
    """Inverse frequencies of the ``dim // 2`` rotation pairs, and the cos/sin magnitude.

    Returns:
      ``(inv_freq, magnitude)``: [dim // 2] float64 array, and the factor YaRN applies to cos and
      sin (``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``, 1 for plain RoPE).
    """
    if dim % 2:
        raise ValueError(f"rope_frequencies: dim must be even; got {dim}")
    extrapolated = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if scaling is None:
        return extrapolated, 1.0
    interpolated = extrapolated / scaling.factor
    low = max(math.floor(_correction_dim(scaling.beta_fast, dim, theta, scaling.original_max_position)), 0)
    high = min(math.ceil(_correction_dim(scaling.beta_slow, dim, theta, scaling.original_max_position)), dim - 1)
    if high == low:
        high += 0.001  # a step instead of a ramp; avoids 0/0
    # 0 below `low` (fast, high-frequency pairs: kept), 1 above `high` (slow pairs: interpolated).
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    inv_freq = extrapolated * (1.0 - ramp) + interpolated * ramp
    magnitude = yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim)
    return inv_freq, magnitude


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, magnitude: float = 1.0) -> jax.Array:
    """Rotates the last axis of ``x`` by its positions.

    Args:
      x: [batch, t, ..., dim] array.
      positions: [batch, t] int array.
      inv_freq: [dim // 2] from ``rope_frequencies``.
      magnitude: cos/sin factor from ``rope_frequencies``.

    Returns:
      An array like ``x``; angles and the rotation are computed in float32.
    """
    half = x.shape[-1] // 2
    if inv_freq.shape != (half,):
        raise ValueError(f"apply_rope: inv_freq must have shape ({half},); got {inv_freq.shape}")
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [batch, t, half]
    angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + (half,))
    cos, sin = jnp.cos(angles) * magnitude, jnp.sin(angles) * magnitude
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
