"""In-tree PEP 517 backend: scikit-build-core, plus the CUDA build's requirements when it builds.

The AUTO/ON/OFF switch (environment variable JAX_FLASHMLA_CUDA, or
``-C cmake.define.JAX_FLASHMLA_CUDA=...``) is resolved here, once, so that the build
requirements (nanobind, the pinned jaxlib for its FFI headers, nvidia-cutlass for CUTLASS/CuTe
headers) and the CMake configuration agree: a pure-JAX install downloads none of them.
"""

from __future__ import annotations

import os
import shutil

from scikit_build_core import build as _skbuild
from scikit_build_core.build import *  # noqa: F401,F403  (the hooks not wrapped below)

# jaxlib 0.10.2 ships FFI API 0.3 headers: the oldest runtime we support, so handlers built
# against them run on every supported jaxlib. nvidia-cutlass 4.2.0.0 ships the CUTLASS headers.
CUDA_BUILD_REQUIRES = ["nanobind>=2.0", "jaxlib==0.10.2", "nvidia-cutlass==4.2.0.0"]
_MODE_KEY = "cmake.define.JAX_FLASHMLA_CUDA"


def _find_nvcc() -> str | None:
    candidates = [os.environ.get("CUDACXX"), "nvcc"]
    candidates += [os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates.append("/usr/local/cuda/bin/nvcc")
    for candidate in candidates:
        found = candidate and shutil.which(candidate)
        if found:
            return found
    return None


def _resolve(config_settings):
    """Returns (build_cuda, config_settings with the switch resolved to ON or OFF)."""
    settings = dict(config_settings or {})
    mode = str(settings.get(_MODE_KEY) or os.environ.get("JAX_FLASHMLA_CUDA") or "AUTO").upper()
    if mode not in ("AUTO", "ON", "OFF"):
        raise ValueError(f"JAX_FLASHMLA_CUDA must be AUTO, ON or OFF; got {mode!r}")
    nvcc = None if mode == "OFF" else _find_nvcc()
    if mode == "ON" and nvcc is None:
        raise RuntimeError(
            "JAX_FLASHMLA_CUDA=ON but no nvcc was found (looked at CUDACXX, PATH, CUDA_HOME, "
            "CUDA_PATH and /usr/local/cuda/bin); install the CUDA toolkit or use AUTO/OFF"
        )
    settings[_MODE_KEY] = "ON" if nvcc else "OFF"
    if nvcc:
        settings["cmake.define.CMAKE_CUDA_COMPILER"] = nvcc
    return nvcc is not None, settings


def get_requires_for_build_wheel(config_settings=None):
    cuda, settings = _resolve(config_settings)
    return [*_skbuild.get_requires_for_build_wheel(settings), *(CUDA_BUILD_REQUIRES if cuda else [])]


def get_requires_for_build_editable(config_settings=None):
    cuda, settings = _resolve(config_settings)
    return [*_skbuild.get_requires_for_build_editable(settings), *(CUDA_BUILD_REQUIRES if cuda else [])]


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _skbuild.build_wheel(wheel_directory, _resolve(config_settings)[1], metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _skbuild.build_editable(wheel_directory, _resolve(config_settings)[1], metadata_directory)
