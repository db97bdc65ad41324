"""Configurations of the MLA layer and of the small decoder model."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from .._config import HEAD_DIM, HEAD_DIM_V

# The decode kernel's cached token is the 512-channel compressed KV plus a 64-channel RoPE key.
KV_LORA_RANK = HEAD_DIM_V
QK_ROPE_HEAD_DIM = HEAD_DIM - HEAD_DIM_V


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN context extension of the RoPE frequencies (DeepSeek-V2/V3's ``rope_scaling``).

    Frequencies that turn fewer than ``beta_slow`` times over ``original_max_position`` are
    divided by ``factor``; those that turn more than ``beta_fast`` times are kept; a linear ramp
    blends the two between. ``mscale``/``mscale_all_dim`` set the attention temperature.
    """

    factor: float = 40.0
    original_max_position: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    def __post_init__(self):
        if not self.factor >= 1.0:
            raise ValueError(f"YarnScaling: factor must be >= 1; got {self.factor}")
        if not self.beta_fast > self.beta_slow > 0:
            raise ValueError(f"YarnScaling: need beta_fast > beta_slow > 0; got {self.beta_fast}, {self.beta_slow}")


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention temperature: ``0.1 * mscale * ln(factor) + 1`` (1 without extension)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Sizes of one DeepSeek-style Multi-head Latent Attention layer.

    ``kv_lora_rank`` and ``qk_rope_head_dim`` are fixed by the decode kernel (512 + 64 = the 576
    cached values per token). ``q_lora_rank=None`` projects queries directly from the hidden
    state (DeepSeek-V2-Lite); an int adds the low-rank query path with its RMSNorm (V2/V3).
    """

    hidden_size: int = 256
    num_heads: int = 8
    q_lora_rank: int | None = 128
    kv_lora_rank: int = KV_LORA_RANK
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = QK_ROPE_HEAD_DIM
    v_head_dim: int = 64
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None
    rms_norm_eps: float = 1e-6
    dtype: Any = jnp.bfloat16  # activations, the cache and the attention's queries
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("hidden_size", "num_heads", "qk_nope_head_dim", "v_head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"MLAConfig: {name} must be a positive int; got {v!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 1):
            raise ValueError(f"MLAConfig: q_lora_rank must be None or a positive int; got {self.q_lora_rank!r}")
        if self.kv_lora_rank != KV_LORA_RANK:
            raise ValueError(
                f"MLAConfig: kv_lora_rank must be {KV_LORA_RANK} (the decode kernel caches 512 latent "
                f"+ 64 RoPE values per token); got {self.kv_lora_rank}"
            )
        if self.qk_rope_head_dim != QK_ROPE_HEAD_DIM:
            raise ValueError(f"MLAConfig: qk_rope_head_dim must be {QK_ROPE_HEAD_DIM}; got {self.qk_rope_head_dim}")
        if jnp.dtype(self.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise TypeError(f"MLAConfig: dtype must be bfloat16 or float16 (the kernel's); got {jnp.dtype(self.dtype)}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """DeepSeek's logit scale: ``qk_head_dim ** -0.5``, times YaRN's mscale squared."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
            m = yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale *= m * m
        return scale


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """A small decoder-only language model built from ``MLAAttention`` blocks."""

    vocab_size: int = 1024
    num_layers: int = 2
    mlp_hidden_size: int = 512
    attention: MLAConfig = MLAConfig()

    def __post_init__(self):
        for name in ("vocab_size", "num_layers", "mlp_hidden_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"DecoderConfig: {name} must be a positive int; got {v!r}")


# Model sizes of the demo (``--size``). All use the kernel's 512 + 64 latent.
PRESETS = {
    # Seconds on a CPU.
    "tiny": DecoderConfig(
        vocab_size=1024, num_layers=2, mlp_hidden_size=512,
        attention=MLAConfig(hidden_size=256, num_heads=8, q_lora_rank=128, qk_nope_head_dim=64, v_head_dim=64),
    ),
    # A few DeepSeek-V2-Lite-like layers: 16 heads of 128 + 64, direct query projection.
    "small": DecoderConfig(
        vocab_size=32000, num_layers=8, mlp_hidden_size=4096,
        attention=MLAConfig(hidden_size=2048, num_heads=16, q_lora_rank=None, qk_nope_head_dim=128, v_head_dim=128,
                            rope_scaling=YarnScaling(factor=40.0, original_max_position=4096)),
    ),
    # DeepSeek-V3's attention shape (128 heads, q_lora_rank 1536) with a few layers.
    "v3-attention": DecoderConfig(
        vocab_size=32000, num_layers=4, mlp_hidden_size=4096,
        attention=MLAConfig(hidden_size=7168, num_heads=128, q_lora_rank=1536, qk_nope_head_dim=128, v_head_dim=128,
                            rope_scaling=YarnScaling(factor=40.0, original_max_position=4096)),
    ),
}
