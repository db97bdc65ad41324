"""Device-side timing and a copy probe, for ``benchmarks/`` (private; needs the CUDA extension).

``timed(fn)`` wraps a function so that, under ``jax.jit``, a CUDA event is recorded on XLA's
stream before any of its work and another one after all of its outputs exist; ``elapsed_ms()``
then reads the time between them. This is the contract's "timed end to end on the device": the
host's dispatch and wake-up latency stay out of the number, launch gaps inside the step stay in.

``device_copy(x)`` copies ``x`` with ``cudaMemcpyAsync``, for the copy-bandwidth ceiling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import _ffi

EVENT_MARK_TARGET = "jax_flashmla_bench_event_mark"
DEVICE_COPY_TARGET = "jax_flashmla_bench_device_copy"
_registered = False


def available() -> bool:
    """Whether the extension has the benchmark targets and a CUDA device is visible."""
    ext = _ffi._ext
    return ext is not None and hasattr(ext, "bench_registrations") and bool(_ffi.local_cuda_devices())


def _register() -> None:
    global _registered
    if not available():
        raise RuntimeError("jax_flashmla device timing needs the CUDA extension (with its benchmark targets) and a GPU")
    if not _registered:
        for name, capsule in _ffi._ext.bench_registrations().items():
            jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
        _registered = True


def mark(slot: int, *after) -> jax.Array:
    """Records event ``slot`` once every array in ``after`` exists; returns an int32 scalar
    (its value is unspecified) through which later work can be ordered after the mark."""
    _register()
    call = jax.ffi.ffi_call(EVENT_MARK_TARGET, jax.ShapeDtypeStruct((), jnp.int32), has_side_effect=True)
    return call(*after, slot=np.int64(slot))


def elapsed_ms(start_slot: int = 0, stop_slot: int = 1) -> float:
    """Milliseconds between the last records of two slots; waits for the stop event."""
    return float(_ffi._ext.event_elapsed_ms(start_slot, stop_slot))


def bracket(fn, args, *after, start_slot: int = 0, stop_slot: int = 1):
    """Traces ``fn(*args)`` between two event marks: the start once every array in ``after``
    exists and before any of fn's work, the stop after all of its outputs. Returns
    ``(fn's outputs, stop-mark scalar)``."""
    start = mark(start_slot, *after)
    # Every input passes through a barrier with the start mark, so no work of fn can be
    # scheduled before the mark.
    args, _ = jax.lax.optimization_barrier((args, start))
    out = fn(*args)
    return out, mark(stop_slot, *jax.tree.leaves(out))


def timed(fn, start_slot: int = 0, stop_slot: int = 1):
    """``fn`` bracketed by two event marks (``bracket``). Returns a function giving ``(fn's
    outputs, stop-mark scalar)``; jit it."""
    return lambda *args: bracket(fn, args, start_slot=start_slot, stop_slot=stop_slot)


def device_copy(x: jax.Array) -> jax.Array:
    """A copy of ``x`` made by ``cudaMemcpyAsync`` (device to device)."""
    _register()
    return jax.ffi.ffi_call(DEVICE_COPY_TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype))(x)
