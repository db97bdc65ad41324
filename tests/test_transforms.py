"""jit, vmap (batching rules, not loops), jax.export and shard_map."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as jf
from jax_flashmla._ffi import DECODE_TARGET, METADATA_TARGET
from helpers import HEAD_DIM_V, assert_matches_reference, decode_step, make_case, reference, run_decode, to_f64


def test_eager_equals_jit():
    case = make_case(b=3, s_q=2, s_k=300, h_q=16, h_kv=1, varlen=True, causal=True)
    eager = to_f64(*decode_step(case)(*case.arrays()))
    jitted = run_decode(case)
    assert_matches_reference(*eager, *jitted, case.describe())


def test_jaxpr_has_one_primitive_per_op():
    case = make_case(b=2, s_q=1, s_k=100, h_q=16, h_kv=1)
    jaxpr = jax.make_jaxpr(decode_step(case))(*case.arrays())
    names = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
    assert names == ["jax_flashmla_mla_metadata", "jax_flashmla_mla_decode"], names


def test_vmap_over_q_shares_cache_and_schedule():
    case = make_case(b=3, s_q=2, s_k=400, h_q=16, h_kv=2, varlen=True, causal=True)
    q, k_cache, block_table, cache_seqlens = case.arrays()
    qs = jnp.stack([q, q[::-1] * 0.5, -q])
    meta, splits = jf.get_mla_metadata(cache_seqlens, case.rows, case.h_kv)

    def one(q):
        return jf.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, HEAD_DIM_V, meta, splits, causal=True)

    jaxpr = jax.make_jaxpr(jax.vmap(one))(qs)
    assert "while" not in str(jaxpr).split("jax_flashmla_mla_decode")[0], "vmap must not loop"
    out, lse = jax.jit(jax.vmap(one))(qs)
    for i in range(3):
        want = to_f64(*jax.jit(one)(qs[i]))
        assert_matches_reference(*to_f64(out[i], lse[i]), *want, f"vmapped element {i}, {case.describe()}")


@pytest.mark.parametrize("cache_axis", [0, 2])
def test_vmap_everything_with_own_caches(cache_axis):
    cases = [make_case(b=2, s_q=1, lengths=lens, h_q=16, h_kv=1) for lens in ([70, 300], [5, 0], [129, 64])]
    width = max(c.block_table.shape[1] for c in cases)
    pages = max(c.k_cache.shape[0] for c in cases)

    def pad(c):
        table = np.pad(c.block_table, ((0, 0), (0, width - c.block_table.shape[1])), constant_values=-7)
        cache = np.pad(c.k_cache, ((0, pages - c.k_cache.shape[0]), (0, 0), (0, 0), (0, 0)), constant_values=np.nan)
        return c.q, cache, table, c.cache_seqlens

    q, k_cache, block_table, cache_seqlens = (jnp.asarray(np.stack(x)) for x in zip(*map(pad, cases)))
    k_cache = jnp.moveaxis(k_cache, 0, cache_axis)
    fn = decode_step(cases[0])
    out, lse = jax.jit(jax.vmap(fn, in_axes=(0, cache_axis, 0, 0)))(q, k_cache, block_table, cache_seqlens)
    for i, c in enumerate(cases):
        assert_matches_reference(*to_f64(out[i], lse[i]), *reference(c), f"element {i}: {c.describe()}")


def test_nested_vmap():
    case = make_case(b=2, s_q=1, s_k=200, h_q=16, h_kv=1, varlen=True)
    q, k_cache, block_table, cache_seqlens = case.arrays()
    qs = jnp.stack([jnp.stack([q, -q]), jnp.stack([q * 0.5, q[::-1]])])  # [2, 2, b, ...]
    fn = decode_step(case)
    out, lse = jax.jit(jax.vmap(jax.vmap(fn, in_axes=(0, None, None, None)), in_axes=(0, None, None, None)))(
        qs, k_cache, block_table, cache_seqlens
    )
    assert out.shape == (2, 2, *case.q.shape[:3], HEAD_DIM_V)
    for i in range(2):
        for j in range(2):
            want = to_f64(*jax.jit(fn)(qs[i, j], k_cache, block_table, cache_seqlens))
            assert_matches_reference(*to_f64(out[i, j], lse[i, j]), *want, f"element {i},{j}")


def _export(case, platforms, **kw):
    avals = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in case.arrays()]
    return jax.export.export(jax.jit(decode_step(case, **kw)), platforms=platforms, disabled_checks=jf.export_disabled_checks())(*avals)


def _targets(module_text: str) -> set[str]:
    return set(re.findall(r"custom_call @(\w+)", module_text)) | set(re.findall(r'call_target_name = "(\w+)"', module_text))


def test_export_cuda_and_cpu_shows_targets_and_runs_on_cpu():
    case = make_case(b=3, s_q=2, s_k=300, h_q=32, h_kv=1, varlen=True, causal=True)
    exported = _export(case, ["cuda", "cpu"])
    assert {METADATA_TARGET, DECODE_TARGET} <= _targets(exported.mlir_module())
    restored = jax.export.deserialize(exported.serialize())
    if jax.devices()[0].platform == "cpu":
        got = to_f64(*restored.call(*case.arrays()))
        assert_matches_reference(*got, *reference(case), case.describe())


def test_export_cpu_only_has_no_custom_calls():
    case = make_case(b=2, s_q=1, s_k=100, h_q=16, h_kv=1)
    assert not _targets(_export(case, ["cpu"]).mlir_module()) & {METADATA_TARGET, DECODE_TARGET}


def test_export_implementation_xla_has_no_custom_calls():
    case = make_case(b=2, s_q=1, s_k=100, h_q=16, h_kv=1)
    module = _export(case, ["cuda"], implementation="xla").mlir_module()
    assert not _targets(module) & {METADATA_TARGET, DECODE_TARGET}


def test_export_refuses_our_targets_without_the_disabled_checks():
    case = make_case(b=2, s_q=1, s_k=100, h_q=16, h_kv=1)
    avals = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in case.arrays()]
    with pytest.raises(ValueError, match="custom call"):
        jax.export.export(jax.jit(decode_step(case, implementation="cuda")), platforms=["cuda"])(*avals)


def test_inside_shard_map():
    # Custom primitives do not declare varying manual axes, so shard_map runs them with
    # check_vma=False (as it does any primitive without a vma rule).
    from jax.sharding import Mesh, PartitionSpec as P

    case = make_case(b=4, s_q=1, s_k=200, h_q=16, h_kv=1, varlen=True)
    mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))
    fn = jax.shard_map(
        decode_step(case), mesh=mesh, in_specs=(P("batch"), P(), P("batch"), P("batch")), out_specs=(P("batch"), P("batch")),
        check_vma=False,
    )
    got = to_f64(*jax.jit(fn)(*case.arrays()))
    assert_matches_reference(*got, *reference(case), case.describe())


def test_shard_map_with_vma_checks_says_what_to_do():
    from jax.sharding import Mesh, PartitionSpec as P

    case = make_case(b=2, s_q=1, s_k=100, h_q=16, h_kv=1)
    mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))
    fn = jax.shard_map(
        decode_step(case), mesh=mesh, in_specs=(P("batch"), P(), P("batch"), P("batch")), out_specs=(P("batch"), P("batch"))
    )
    with pytest.raises(NotImplementedError, match="check_vma=False"):
        jax.jit(fn)(*case.arrays())
