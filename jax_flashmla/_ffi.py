"""Loads the CUDA extension (when it was built), checks its FFI API version, registers its targets.

XLA accepts an FFI handler compiled against an FFI API version no newer than its own. The
extension reports the version of the headers it was compiled with; the running jaxlib's is read
from the headers it ships. A build that is newer than the runtime (or of another major version)
is refused here, at import, with a message, instead of failing inside XLA later.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import re
from pathlib import Path

import jax

# Custom-call target names: part of the ABI of exported (jax.export) modules, hence versioned.
METADATA_TARGET = "jax_flashmla_mla_metadata_v1"
DECODE_TARGET = "jax_flashmla_mla_decode_v1"
ALL_TARGETS = (METADATA_TARGET, DECODE_TARGET)

_EXTENSION = "jax_flashmla._flashmla_cuda"


def runtime_ffi_api_version() -> tuple[int, int] | None:
    """(major, minor) FFI API version of the running jaxlib, or None if its headers are absent."""
    header = os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "c_api.h")
    try:
        with open(header, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    major = re.search(r"^#define XLA_FFI_API_MAJOR (\d+)", text, re.M)
    minor = re.search(r"^#define XLA_FFI_API_MINOR (\d+)", text, re.M)
    if not (major and minor):
        return None
    return int(major.group(1)), int(minor.group(1))


def check_ffi_api_version(built: tuple[int, int], runtime: tuple[int, int] | None) -> None:
    """Raises ImportError if a handler built against FFI API ``built`` cannot run on ``runtime``."""
    if runtime is None:
        return
    if built[0] != runtime[0] or built[1] > runtime[1]:
        raise ImportError(
            f"jax_flashmla's CUDA extension was compiled against XLA FFI API {built[0]}.{built[1]}, "
            f"but the running jaxlib {jax.__version__} provides FFI API {runtime[0]}.{runtime[1]}; "
            "XLA only runs handlers built against an FFI API no newer than its own. Rebuild the "
            "extension against the oldest supported jaxlib headers (pip install reinstalls with "
            "the pinned jaxlib), upgrade jaxlib, or install with JAX_FLASHMLA_CUDA=OFF for the "
            "pure-JAX path alone."
        )


def _shadowed_install() -> str | None:
    """Names an installed copy with the extension when this import came from a source checkout
    (``python -m ...`` run inside the checkout puts it first on ``sys.path``)."""
    here = Path(__file__).resolve().parent
    if not (here.parent / "pyproject.toml").exists():
        return None
    try:
        files = importlib.metadata.distribution("jax_flashmla").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name.startswith("_flashmla_cuda"):
            installed = Path(f.locate()).resolve().parent
            if installed != here:
                return (
                    f"jax_flashmla was imported from the source checkout {here}, which has no compiled "
                    f"extension; the installed copy in {installed} has it. Run from another directory, "
                    "or with python -P (3.11+), so that the checkout is not first on sys.path"
                )
    return None


def _load():
    try:
        ext = importlib.import_module(_EXTENSION)
    except ModuleNotFoundError as e:
        if e.name == _EXTENSION:
            return None, _shadowed_install() or (
                "the CUDA extension was not built (no nvcc at install time, or JAX_FLASHMLA_CUDA=OFF)"
            )
        raise
    built = tuple(int(v) for v in ext.ffi_api_version())
    check_ffi_api_version(built, runtime_ffi_api_version())
    for name, capsule in ext.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
    return ext, None


_ext, _why_not = _load()


def extension_loaded() -> bool:
    return _ext is not None


def has_target(name: str) -> bool:
    """Whether the loaded extension registered a handler for custom-call target ``name``."""
    return _ext is not None and name in _ext.registrations()


@functools.cache
def local_cuda_devices() -> tuple:
    try:
        return tuple(jax.devices("cuda"))
    except RuntimeError:
        return ()


def is_sm90(device) -> bool:
    """The kernels are built for sm_90a, which only compute capability 9.0 runs."""
    return str(getattr(device, "compute_capability", "")) == "9.0"


def build_info() -> dict:
    """What was built and what runs here: for bug reports and the README's 'what runs where'."""
    devices = local_cuda_devices()
    return {
        "cuda_extension": _ext is not None,
        "why_no_extension": _why_not,
        "extension_ffi_api": tuple(_ext.ffi_api_version()) if _ext is not None else None,
        "runtime_ffi_api": runtime_ffi_api_version(),
        "cuda_arch": _ext.cuda_arch() if _ext is not None else None,
        "registered_targets": sorted(_ext.registrations()) if _ext is not None else [],
        "cuda_devices": [f"{d.device_kind} (compute capability {getattr(d, 'compute_capability', '?')})" for d in devices],
        "jax": jax.__version__,
    }
