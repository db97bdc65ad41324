"""FlashMLA-class Multi-head Latent Attention decoding for JAX.

On NVIDIA Hopper (sm_90) the ops run CUDA kernels registered as XLA FFI custom calls; everywhere
else (CPU, other GPUs) they run a pure-JAX implementation of the same split-KV algorithm.
"""

from . import reference
from ._ffi import build_info
from .ops import device_num_sm, flash_mla_with_kvcache, get_mla_metadata

__version__ = "0.1.0"

__all__ = [
    "get_mla_metadata",
    "flash_mla_with_kvcache",
    "reference",
    "build_info",
    "device_num_sm",
    "export_disabled_checks",
]


def export_disabled_checks():
    """``jax.export`` safety checks to disable for modules that call this package's kernels.

    ``jax.export`` refuses custom calls it does not know to be stable; ours are versioned in
    their names (``*_v1``). Pass the result as ``jax.export.export(f, disabled_checks=...)``.
    """
    import jax

    from ._ffi import ALL_TARGETS

    return [jax.export.DisabledSafetyCheck.custom_call(t) for t in ALL_TARGETS]
