"""On an sm_90 GPU with the CUDA extension: the kernels against the pure-JAX specification.

Skipped elsewhere with the reason (see conftest.py). Today the scheduler runs as a CUDA kernel;
the decode kernels come with the kernels issue, until then the decode runs the pure-JAX path on
the GPU and these tests check that path there.
"""

from __future__ import annotations

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
from helpers import HEAD_DIM_V, assert_matches_reference, check_case, decode_step, fresh_seed, make_case, reference, to_f64

pytestmark = pytest.mark.gpu


def _metadata(lengths, rows, h_kv, implementation, num_sm=None):
    fn = jax.jit(lambda L: jf.get_mla_metadata(L, rows, h_kv, num_sm=num_sm, implementation=implementation))
    return fn, fn(jnp.asarray(lengths, jnp.int32))


def test_targets_registered_for_this_gpu():
    info = jf.build_info()
    assert info["cuda_extension"] and info["cuda_arch"] == "sm_90a", info
    assert _ffi.METADATA_TARGET in info["registered_targets"], info
    assert jf.device_num_sm() == jax.devices()[0].core_count


@pytest.mark.parametrize("b, high, zeros", [(1, 100_000, 0.0), (128, 9000, 0.0), (1024, 300, 0.0), (256, 6000, 0.8), (9000, 70_000, 0.1), (3, 0, 1.0)])
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


GRID = pairwise_cases()[::4]


@pytest.mark.parametrize("params", GRID, ids=[case_id(c) for c in GRID])
def test_decode_on_gpu_matches_reference(params):
    check_case(make_case(**params))


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
    assert _ffi.METADATA_TARGET in hlo
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
    import sys, numpy as np, jax, jax.numpy as jnp
    import jax_flashmla as jf
    lengths = jnp.asarray(np.random.default_rng(int(sys.argv[1])).integers(0, 40_000, size=200), jnp.int32)
    step = jax.jit(lambda L: jf.get_mla_metadata(L, 128, 1, implementation="cuda"))
    for _ in range(3):
        meta, splits = step(lengths)
    np.save(sys.argv[2], np.concatenate([np.asarray(meta).ravel(), np.asarray(splits)]))
    """
)


def test_results_identical_with_and_without_command_buffers(tmp_path):
    seed = str(fresh_seed())
    results = {}
    for name, flags in (("on", "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"),
                        ("off", "--xla_gpu_enable_command_buffer=")):
        env = dict(os.environ, XLA_FLAGS=flags, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        path = tmp_path / f"{name}.npy"
        # cwd outside the checkout, so that the installed package (with its extension) is imported.
        run = subprocess.run([sys.executable, "-c", _COMMAND_BUFFER_SCRIPT, seed, str(path)], env=env, capture_output=True, text=True, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        results[name] = np.load(path)
    np.testing.assert_array_equal(results["on"], results["off"])
