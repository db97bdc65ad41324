"""Pytest configuration: the GPU marker's skip rule."""

from __future__ import annotations

import pytest


def _gpu_skip_reason() -> str | None:
    import jax_flashmla._ffi as ffi

    devices = ffi.local_cuda_devices()
    if not devices:
        return "no CUDA device visible to JAX (GPU tests need an sm_90 H100/H200/H800)"
    if not all(ffi.is_sm90(d) for d in devices):
        kinds = ", ".join(sorted({d.device_kind for d in devices}))
        return f"CUDA devices are not sm_90 ({kinds}); the kernels are built for sm_90a only"
    if not ffi.extension_loaded():
        return f"the CUDA extension is not installed: {ffi.build_info()['why_no_extension']}"
    return None


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    reason = _gpu_skip_reason()
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))
