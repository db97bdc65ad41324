"""On an sm_90 GPU with the CUDA extension: the kernels against the pure-JAX scheduler and the
reference.

Skipped elsewhere with the reason (see conftest.py). The full contract grid is in
test_gpu_grid.py; the CPU suite (test_decode.py and the others) also runs the kernels when run on
such a GPU, since the default path is the kernel there.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as jf
from jax_flashmla import _ffi
from grid import case_id, pairwise_cases
from helpers import (
    HEAD_DIM_V,
    POISON_PAGE,
    assert_matches_reference,
    check_case,
    decode_step,
    fresh_seed,
    make_case,
    reference,
    run_decode,
    to_f64,
)

pytestmark = pytest.mark.gpu


def _metadata(lengths, rows, h_kv, implementation, num_sm=None):
    fn = jax.jit(lambda L: jf.get_mla_metadata(L, rows, h_kv, num_sm=num_sm, implementation=implementation))
    return fn, fn(jnp.asarray(lengths, jnp.int32))


def test_targets_registered_for_this_gpu():
    info = jf.build_info()
    assert info["cuda_extension"] and info["cuda_arch"] == "sm_90a", info
    assert {_ffi.METADATA_TARGET, _ffi.DECODE_TARGET} <= set(info["registered_targets"]), info
    assert jf.device_num_sm() == jax.devices()[0].core_count


# 264 and 265 requests on 132 partitions (rows = 1) sit on either side of the kernel's switch from
# links between request boundaries to the one-warp walk (kSchedulerLinkRequestsPerPart = 2).
@pytest.mark.parametrize(
    "b, high, zeros",
    [(1, 100_000, 0.0), (128, 9000, 0.0), (1024, 300, 0.0), (256, 6000, 0.8), (9000, 70_000, 0.1), (3, 0, 1.0),
     (264, 9000, 0.0), (265, 9000, 0.0)],
)
@pytest.mark.parametrize("rows, h_kv", [(1, 1), (128, 1), (16, 8), (512, 1)])
def test_metadata_kernel_is_bit_identical_to_jax(b, high, zeros, rows, h_kv):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, high + 1, size=b)
    lengths[rng.random(b) < zeros] = 0
    fn, (meta, splits) = _metadata(lengths, rows, h_kv, "cuda")
    assert _ffi.METADATA_TARGET in fn.lower(jnp.asarray(lengths, jnp.int32)).as_text(), "the kernel must run"
    _, (want_meta, want_splits) = _metadata(lengths, rows, h_kv, "xla")
    np.testing.assert_array_equal(np.asarray(splits), np.asarray(want_splits), err_msg=f"seed={seed}")
    np.testing.assert_array_equal(np.asarray(meta), np.asarray(want_meta), err_msg=f"seed={seed}")


def test_metadata_kernel_batched_schedules():
    lengths = np.random.default_rng(fresh_seed()).integers(0, 20_000, size=(3, 2, 40)).astype(np.int32)
    fn = lambda L, impl: jf.get_mla_metadata(L, 64, 1, num_sm=33, implementation=impl)
    got = jax.jit(jax.vmap(jax.vmap(lambda L: fn(L, "cuda"))))(jnp.asarray(lengths))
    want = jax.jit(jax.vmap(jax.vmap(lambda L: fn(L, "xla"))))(jnp.asarray(lengths))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_metadata_kernel_two_runs_bit_identical():
    lengths = jnp.asarray(np.random.default_rng(fresh_seed()).integers(0, 50_000, size=300), jnp.int32)
    fn = jax.jit(lambda L: jf.get_mla_metadata(L, 128, 1, implementation="cuda"))
    a, b = fn(lengths), fn(lengths)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


GRID = pairwise_cases()[::4]  # a second, numpy-drawn sample with the JAX reference (full grid: test_gpu_grid.py)


def _lowered_targets(case, **kwargs):
    text = jax.jit(decode_step(case, **kwargs)).lower(*case.arrays()).as_text()
    return {t for t in (_ffi.METADATA_TARGET, _ffi.DECODE_TARGET) if t in text}


def test_default_path_is_the_kernel():
    case = make_case(b=2, s_q=1, s_k=100, h_q=16, h_kv=1)
    assert _lowered_targets(case) == {_ffi.METADATA_TARGET, _ffi.DECODE_TARGET}
    assert _lowered_targets(case, implementation="xla") == set()


@pytest.mark.parametrize("params", GRID, ids=[case_id(c) for c in GRID])
def test_decode_on_gpu_matches_reference(params):
    check_case(make_case(**params), implementation="cuda")


@pytest.mark.parametrize(
    "params",
    [
        dict(b=1, s_q=1, s_k=65536, h_q=128, h_kv=1),  # split across every partition
        dict(b=1, s_q=2, s_k=65536, h_q=64, h_kv=1, causal=True, dtype="fp16"),
        dict(b=2, s_q=1, s_k=30000, h_q=16, h_kv=1, varlen=True),
        dict(b=3, s_q=4, s_k=9000, h_q=128, h_kv=1, varlen=True, causal=True),  # 8 row tiles
    ],
    ids=["L65536-hq128", "L65536-sq2-causal-fp16", "L30000-hq16-varlen", "512rows-causal"],
)
def test_long_requests(params):
    check_case(make_case(**params), implementation="cuda")


@pytest.mark.parametrize("heads", [(16, 1), (128, 1), (64, 8), (126, 3)])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_zero_length_requests_b128(heads, dtype):
    h_q, h_kv = heads
    case = make_case(b=128, s_q=2, s_k=700, h_q=h_q, h_kv=h_kv, varlen=True, causal=True, dtype=dtype, zero_fraction=0.5)
    out, lse = check_case(case, implementation="cuda")
    zero = case.cache_seqlens == 0
    assert zero.any() and (out[zero] == 0).all() and np.isposinf(lse[zero]).all()


@pytest.mark.parametrize("num_sm", [None, 1000])
@pytest.mark.parametrize("heads", [(32, 1), (32, 2)])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_requests_shorter_than_s_q_causal(dtype, heads, num_sm):
    # Token t of a causal request of length L sees L - (s_q - 1 - t) keys, a negative count when
    # L < s_q - 1: such rows see no key (out 0, lse +inf) although the request's one block runs.
    # The kernel once compared that limit unsigned, and these rows came out NaN.
    h_q, h_kv = heads
    lengths = [0, 1, 2, 3, 4, 63, 64, 65, 1, 130, 2, 700]
    case = make_case(b=len(lengths), s_q=4, h_q=h_q, h_kv=h_kv, lengths=lengths, causal=True, dtype=dtype)
    out, lse = check_case(case, num_sm=num_sm, implementation="cuda")
    assert np.isposinf(lse[1, :, :3]).all() and (out[1, :3] == 0).all()
    assert np.isfinite(lse[1, :, 3]).all()


@pytest.mark.parametrize("num_sm", [1, 7, 132, 1000])
def test_decode_any_partition_count(num_sm):
    case = make_case(b=9, s_q=2, s_k=3000, h_q=32, h_kv=2, varlen=True, causal=True, zero_fraction=0.2)
    check_case(case, num_sm=num_sm, implementation="cuda")


def test_decode_two_runs_bit_identical():
    case = make_case(b=5, s_q=2, s_k=20_000, h_q=64, h_kv=1, varlen=True, causal=True)
    step = jax.jit(decode_step(case, implementation="cuda"))
    arrays = case.arrays()
    (o1, l1), (o2, l2) = step(*arrays), step(*arrays)
    np.testing.assert_array_equal(np.asarray(o1.astype(jnp.float32)), np.asarray(o2.astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(l1), np.asarray(l2))


@pytest.mark.parametrize("what", ["page_negative", "page_poison", "first_page_poison", "length_negative", "length_beyond_table"])
@pytest.mark.parametrize("split", [False, True])
def test_invalid_data_gives_nan(what, split):
    # split=True: 1000 partitions cut every request into pieces, so the NaN must survive the
    # combine; split=False: one partition, the attention kernel writes the result itself.
    case = make_case(b=3, s_q=2, h_q=32, h_kv=1, lengths=[300, 1000, 200], spare_blocks=0)
    bad = np.array([False, True, False])
    if what == "page_negative":
        case.block_table[1, 2] = -5
    elif what == "page_poison":
        case.block_table[1, 15] = POISON_PAGE
    elif what == "first_page_poison":  # the block a piece issues first, before its other pages
        case.block_table[1, 0] = POISON_PAGE
    elif what == "length_negative":
        case.cache_seqlens[1] = -3
    else:
        case.cache_seqlens[1] = case.block_table.shape[1] * 64 + 1
    out, lse = run_decode(case, num_sm=1000 if split else 1, implementation="cuda")
    assert np.isnan(out[bad]).all() and np.isnan(lse[bad]).all()
    ref_out, ref_lse = reference(case)
    assert_matches_reference(out[~bad], lse[~bad], ref_out[~bad], ref_lse[~bad], case.describe())


def test_vmap_runs_the_kernel():
    case = make_case(b=3, s_q=1, s_k=800, h_q=16, h_kv=1, varlen=True)
    q, k_cache, table, lengths = case.arrays()
    qs = jnp.stack([q, q * 0.5])
    fn = jax.jit(jax.vmap(decode_step(case), in_axes=(0, None, None, None)))
    assert _ffi.DECODE_TARGET in fn.lower(qs, k_cache, table, lengths).as_text()
    out, lse = fn(qs, k_cache, table, lengths)
    for j in range(2):
        sub = dataclasses.replace(case, q=np.asarray(qs[j]))
        assert_matches_reference(*to_f64(out[j], lse[j]), *reference(sub), sub.describe())


def test_two_layer_step_on_device():
    """Metadata once, two decode calls, one jit: what a decode loop runs per step."""
    case = make_case(b=8, s_q=2, s_k=2000, h_q=32, h_kv=1, varlen=True, causal=True, zero_fraction=0.25)
    other = make_case(b=8, s_q=2, h_q=32, h_kv=1, lengths=case.cache_seqlens, causal=True)

    @jax.jit
    def step(q1, q2, k1, k2, t1, t2, lengths):
        meta, splits = jf.get_mla_metadata(lengths, case.rows, case.h_kv)
        o1, l1 = jf.flash_mla_with_kvcache(q1, k1, t1, lengths, HEAD_DIM_V, meta, splits, causal=True)
        o2, l2 = jf.flash_mla_with_kvcache(q2, k2, t2, lengths, HEAD_DIM_V, meta, splits, causal=True)
        return o1, l1, o2, l2

    (q1, k1, t1, lengths), (q2, k2, t2, _) = case.arrays(), other.arrays()
    arrays = (q1, q2, k1, k2, t1, t2, lengths)
    hlo = step.lower(*arrays).as_text()
    # Metadata once, then two decode calls: all custom calls, nothing computed on the host.
    assert hlo.count(_ffi.METADATA_TARGET) == 1 and hlo.count(_ffi.DECODE_TARGET) == 2
    o1, l1, o2, l2 = step(*arrays)
    for (o, l), c in (((o1, l1), case), ((o2, l2), other)):
        assert_matches_reference(*to_f64(o, l), *reference(c), c.describe())


def test_export_roundtrip_runs_on_gpu():
    case = make_case(b=4, s_q=1, s_k=700, h_q=16, h_kv=1, varlen=True)
    arrays = case.arrays()
    exported = jax.export.export(jax.jit(decode_step(case)), platforms=["cuda", "cpu"], disabled_checks=jf.export_disabled_checks())(
        *[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]
    )
    got = to_f64(*jax.export.deserialize(exported.serialize()).call(*arrays))
    assert_matches_reference(*got, *reference(case), case.describe())


_COMMAND_BUFFER_SCRIPT = textwrap.dedent(
    """
    # A jitted 2-layer decode step (metadata once, two decode calls), run three times.
    import sys, numpy as np, jax, jax.numpy as jnp
    import jax_flashmla as jf
    sys.path.insert(0, sys.argv[3])
    from helpers import make_case
    case = make_case(b=16, s_q=2, s_k=3000, h_q=64, h_kv=1, varlen=True, causal=True, seed=int(sys.argv[1]))
    q, k, table, lengths = case.arrays()

    @jax.jit
    def step(q, k, table, lengths):
        meta, splits = jf.get_mla_metadata(lengths, case.rows, 1, implementation="cuda")
        o1, l1 = jf.flash_mla_with_kvcache(q, k, table, lengths, 512, meta, splits, causal=True, implementation="cuda")
        o2, l2 = jf.flash_mla_with_kvcache(q * 0.5, k, table, lengths, 512, meta, splits, causal=True, implementation="cuda")
        return meta, splits, o1, l1, o2, l2

    for _ in range(3):
        results = step(q, k, table, lengths)
    np.savez(sys.argv[2], *[np.asarray(r.astype(jnp.float32)) for r in results])
    """
)


def test_results_identical_with_and_without_command_buffers(tmp_path):
    seed = str(fresh_seed())
    results = {}
    for name, flags in (("on", "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"),
                        ("off", "--xla_gpu_enable_command_buffer=")):
        env = dict(os.environ, XLA_FLAGS=flags, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        path = tmp_path / f"{name}.npz"
        # cwd outside the checkout, so that the installed package (with its extension) is imported.
        tests_dir = os.path.dirname(os.path.abspath(__file__))
        run = subprocess.run([sys.executable, "-c", _COMMAND_BUFFER_SCRIPT, seed, str(path), tests_dir], env=env, capture_output=True, text=True, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        with np.load(path) as f:
            results[name] = [f[k] for k in sorted(f.files)]
    for on, off in zip(results["on"], results["off"]):
        np.testing.assert_array_equal(on, off)


def test_benchmark_device_timer_and_copy_probe():
    """The benchmark's event marks bracket a jitted step on the device (its time is positive and
    no longer than the host's blocking wait), and its copy probe copies."""
    import time

    from jax_flashmla import _devtime

    assert _devtime.available()
    x = jax.random.bits(jax.random.key(fresh_seed() % 2**31), (1 << 24,), jnp.uint32)
    copy = jax.jit(_devtime.timed(_devtime.device_copy))
    jax.block_until_ready(copy(x))
    start = time.perf_counter()
    y, _ = jax.block_until_ready(copy(x))
    host_ms = (time.perf_counter() - start) * 1e3
    device_ms = _devtime.elapsed_ms()
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    assert 0 < device_ms <= host_ms, (device_ms, host_ms)
    # 128 MiB read + written: faster than 100 GB/s and not faster than any HBM.
    assert 0.04 < device_ms < 2.7, device_ms
    # The stop mark waits for every output: a step with a large and a tiny output is timed by the large one.
    case = make_case(b=64, s_q=1, s_k=4000, h_q=128, h_kv=1)
    q, k, t, lengths = case.arrays()

    def step(q, k, t, lengths):
        meta, splits = jf.get_mla_metadata(lengths, case.rows, case.h_kv)
        return jf.flash_mla_with_kvcache(q, k, t, lengths, HEAD_DIM_V, meta, splits)[0], lengths + 1

    timed = jax.jit(_devtime.timed(step))
    jax.block_until_ready(timed(q, k, t, lengths))
    # 64 x 4000 cached tokens of 1152 bytes, 0.3 GB: at least 0.09 ms at 3.35 TB/s.
    assert _devtime.elapsed_ms() > 0.09
