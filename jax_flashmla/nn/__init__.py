"""Flax (nnx) layers: DeepSeek-style Multi-head Latent Attention over the paged latent cache,
and a small decoder model for generation.

Needs ``flax`` (``pip install "jax_flashmla[nn]"``).
"""

try:
    import flax.nnx  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "jax_flashmla.nn needs flax >= 0.12 (the nnx API): pip install 'jax_flashmla[nn]'"
    ) from e

from ..cache import OutOfPagesError, PagedLatentCache, PageTable, StepView, WriteSlots
from .attention import MLAAttention
from .config import PRESETS, DecoderConfig, MLAConfig, YarnScaling, yarn_mscale
from .generate import GenerationResult, GreedyGenerator
from .model import MLADecoder
from .rope import apply_rope, rope_frequencies

__all__ = [
    "MLAAttention",
    "MLAConfig",
    "YarnScaling",
    "yarn_mscale",
    "DecoderConfig",
    "MLADecoder",
    "PRESETS",
    "GreedyGenerator",
    "GenerationResult",
    "PagedLatentCache",
    "PageTable",
    "StepView",
    "WriteSlots",
    "OutOfPagesError",
    "apply_rope",
    "rope_frequencies",
]
