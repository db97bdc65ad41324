"""Build and packaging: constants mirrored between C++ and Python, the FFI version rule, the
AUTO/ON/OFF switch, and the extension as installed."""

from __future__ import annotations

import importlib.util
import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import jax_flashmla as jf
from jax_flashmla import _config, _ffi

REPO = Path(__file__).resolve().parents[1]


def test_cpp_config_matches_python():
    text = (REPO / "cpp" / "config.h").read_text()
    cpp = {m[0]: int(m[1]) for m in re.findall(r"inline constexpr int (k\w+) = (\d+);", text)}
    mirrored = {
        "kHeadDim": _config.HEAD_DIM,
        "kHeadDimV": _config.HEAD_DIM_V,
        "kPageBlockSize": _config.PAGE_BLOCK_SIZE,
        "kBlockN": _config.BLOCK_N,
        "kBlockM": _config.BLOCK_M,
        "kFixedOverheadBlocks": _config.FIXED_OVERHEAD_BLOCKS,
        "kMetadataCols": _config.METADATA_COLS,
    }
    assert {k: cpp.get(k) for k in mirrored} == mirrored


def test_cpp_metadata_columns_match_python():
    from jax_flashmla import _scheduler as sch

    text = (REPO / "cpp" / "scheduler" / "mla_metadata.h").read_text()
    cpp = {m[0]: int(m[1]) for m in re.findall(r"(k\w+) = (\d+),", text)}
    assert cpp == {
        "kFirstReq": sch.FIRST_REQ,
        "kFirstBlock": sch.FIRST_BLOCK,
        "kLastReq": sch.LAST_REQ,
        "kLastBlockEnd": sch.LAST_BLOCK_END,
        "kFirstSplit": sch.FIRST_SPLIT,
        "kNumBlocks": sch.NUM_BLOCKS,
        "kFirstSlot": sch.FIRST_SLOT,
    }


def test_cpp_target_names_are_known_to_python():
    names = set(re.findall(r'"(jax_flashmla_\w+_v\d+)"', (REPO / "cpp" / "ffi" / "handlers.h").read_text()))
    assert names and names <= set(_ffi.ALL_TARGETS)


@pytest.mark.parametrize(
    "built, runtime, ok",
    [((0, 3), (0, 3), True), ((0, 3), (0, 4), True), ((0, 4), (0, 3), False), ((1, 0), (0, 4), False),
     ((0, 3), (1, 0), False), ((0, 3), None, True)],
)
def test_ffi_api_version_rule(built, runtime, ok):
    if ok:
        _ffi.check_ffi_api_version(built, runtime)
    else:
        with pytest.raises(ImportError, match=r"FFI API .* no newer than its own"):
            _ffi.check_ffi_api_version(built, runtime)


def test_runtime_ffi_api_version_is_read():
    version = _ffi.runtime_ffi_api_version()
    assert version is not None and version >= (0, 3), version


def test_installed_extension():
    info = jf.build_info()
    if os.environ.get("JAX_FLASHMLA_EXPECT_EXTENSION") == "1":
        assert info["cuda_extension"], f"the CUDA extension should have been built: {info['why_no_extension']}"
    if not info["cuda_extension"]:
        pytest.skip(f"no CUDA extension here: {info['why_no_extension']}")
    assert info["cuda_arch"] == "sm_90a"
    assert info["extension_ffi_api"] <= info["runtime_ffi_api"]
    assert set(info["registered_targets"]) <= set(_ffi.ALL_TARGETS)
    assert _ffi.METADATA_TARGET in info["registered_targets"]


def test_import_refuses_an_extension_newer_than_jaxlib(tmp_path):
    if not _ffi.extension_loaded():
        pytest.skip("no CUDA extension installed to refuse")
    fake = tmp_path / "xla" / "ffi" / "api"
    fake.mkdir(parents=True)
    (fake / "c_api.h").write_text("#define XLA_FFI_API_MAJOR 0\n#define XLA_FFI_API_MINOR 1\n")
    script = textwrap.dedent(
        f"""
        import jax
        jax.ffi.include_dir = lambda: {str(tmp_path)!r}
        try:
            import jax_flashmla
        except ImportError as e:
            print("REFUSED:", e)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert "REFUSED:" in result.stdout and "FFI API 0.1" in result.stdout, result.stdout + result.stderr


def _backend():
    pytest.importorskip("scikit_build_core")
    spec = importlib.util.spec_from_file_location("backend", REPO / "_build_backend" / "jax_flashmla_backend.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_nvcc(monkeypatch, tmp_path):
    """An environment where no nvcc can be found."""
    for var in ("CUDACXX", "CUDA_HOME", "CUDA_PATH", "JAX_FLASHMLA_CUDA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    backend = _backend()
    monkeypatch.setattr(backend.shutil, "which", lambda name: None)
    return backend


def test_switch_auto_without_nvcc_builds_pure_jax(no_nvcc):
    cuda, settings = no_nvcc._resolve(None)
    assert not cuda and settings["cmake.define.JAX_FLASHMLA_CUDA"] == "OFF"


def test_switch_on_without_nvcc_fails_clearly(no_nvcc, monkeypatch):
    monkeypatch.setenv("JAX_FLASHMLA_CUDA", "ON")
    with pytest.raises(RuntimeError, match="JAX_FLASHMLA_CUDA=ON but no nvcc"):
        no_nvcc._resolve(None)


def test_switch_auto_with_nvcc_builds_cuda(monkeypatch, tmp_path):
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    monkeypatch.delenv("JAX_FLASHMLA_CUDA", raising=False)
    monkeypatch.setenv("CUDACXX", str(nvcc))
    cuda, settings = _backend()._resolve(None)
    assert cuda and settings["cmake.define.CMAKE_CUDA_COMPILER"] == str(nvcc)
    assert settings["cmake.define.JAX_FLASHMLA_CUDA"] == "ON"


def test_switch_off_wins_and_config_settings_override_env(monkeypatch):
    backend = _backend()
    monkeypatch.setenv("JAX_FLASHMLA_CUDA", "ON")
    cuda, _ = backend._resolve({"cmake.define.JAX_FLASHMLA_CUDA": "off"})
    assert not cuda
    monkeypatch.setenv("JAX_FLASHMLA_CUDA", "maybe")
    with pytest.raises(ValueError, match="AUTO, ON or OFF"):
        backend._resolve(None)


def _cutlass_include() -> Path | None:
    env = os.environ.get("JAX_FLASHMLA_CUTLASS_INCLUDE_DIR")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("cutlass_library")
    return Path(spec.submodule_search_locations[0]) / "source" / "include" if spec else None


def test_decode_kernels_compile_without_spills_or_serialised_wgmma(tmp_path):
    """ptxas's resource report for the decode kernels: no register spills, and no wgmma chain
    that ptxas had to fence or serialise: an injected warpgroup.arrive (C7519) or "wgmma.mma_async
    instructions are serialized" (C7510-C7520: a drain after every wgmma of the kernel). An
    injected warpgroup.wait (C7517) is allowed: it delays one instruction until a wgmma is done
    (a kernel that rescales O while its QK^T is in flight gets one, and the PV issued next would
    wait for that QK^T anyway: one warpgroup's wgmmas run in order)."""
    nvcc = _backend()._find_nvcc()  # the same nvcc a CUDA build would use
    include = _cutlass_include()
    if nvcc is None or include is None or not (include / "cute" / "tensor.hpp").exists():
        pytest.skip("needs nvcc and the CUTLASS headers (nvidia-cutlass, or JAX_FLASHMLA_CUTLASS_INCLUDE_DIR)")
    cmd = [nvcc, "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr",
           "-Icpp", "-isystem", str(include), "-Xptxas", "-v", "-c", "cpp/decode/decode_launch.cu",
           "-o", str(tmp_path / "decode_launch.o")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-3000:]
    fenced = [line[:200] for line in report.splitlines() if re.search(r"\(C7519\)|serialized", line)]
    assert not fenced, fenced[:3]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert spills, report[-2000:]
    assert all(s == "0" and l == "0" for s, l in spills), spills
