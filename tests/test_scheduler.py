"""The scheduler (contract section 4): worked cases, an independent oracle, and invariants."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as jf
from jax_flashmla._scheduler import num_sm_parts, schedule
from helpers import fresh_seed
from scheduler_oracle import OVERHEAD, blocks_of, oracle_schedule


def metadata(lengths, num_parts: int):
    """Through the public API: one row per KV head and <= 64 rows makes num_sm_parts == num_sm."""
    meta, splits = jf.get_mla_metadata(jnp.asarray(lengths, jnp.int32), 1, 1, num_sm=num_parts)
    assert meta.shape == (num_parts, 8) and splits.shape == (len(lengths) + 1,)
    return np.asarray(meta), np.asarray(splits)


def check_invariants(lengths, meta, splits):
    """Everything the kernels rely on, read from the metadata alone."""
    b, num_parts = len(lengths), meta.shape[0]
    nblk = [blocks_of(int(L)) for L in lengths]
    budget = -(-sum(n + OVERHEAD for n in nblk) // num_parts) + OVERHEAD

    assert splits[0] == 0 and np.all(np.diff(splits) >= 1), f"num_splits is not a prefix array: {splits}"
    assert splits[b] <= b + num_parts - 1, f"{splits[b]} pieces for b={b}, {num_parts} partitions"

    pieces_of = [[] for _ in range(b)]
    slot, seen_empty = 0, False
    for p, (first_req, first_block, last_req, last_end, first_split, n_blocks, first_slot, pad) in enumerate(meta):
        assert pad == 0
        assert first_slot == slot, f"partition {p}: first_slot {first_slot}, expected {slot}"
        if first_req > last_req:  # empty partition: only after all work is placed
            assert (first_req, last_req, first_block, last_end, n_blocks) == (b, b - 1, 0, 0, 0), meta[p]
            seen_empty = True
            continue
        assert not seen_empty, f"partition {p} has work after an empty one"
        assert first_split == first_slot - splits[first_req]
        cost = taken = 0
        for req in range(first_req, last_req + 1):
            start = first_block if req == first_req else 0
            end = last_end if req == last_req else nblk[req]
            assert 0 <= start < end <= nblk[req], f"partition {p}: bad piece {req} [{start}, {end})"
            assert splits[req] + len(pieces_of[req]) == slot, "slots must follow request-major order"
            pieces_of[req].append((start, end))
            taken += end - start
            cost += end - start + OVERHEAD
            slot += 1
        assert taken == n_blocks
        assert cost <= budget, f"partition {p}: cost {cost} over budget {budget}"
    assert slot == splits[b]
    for req, pieces in enumerate(pieces_of):
        # Every block exactly once, in order, split only at block boundaries.
        assert pieces[0][0] == 0 and pieces[-1][1] == nblk[req], (req, pieces)
        assert all(a[1] == c[0] for a, c in zip(pieces, pieces[1:])), (req, pieces)
        assert len(pieces) == splits[req + 1] - splits[req]


def test_worked_case_even_batch():
    # Contract: b=128, L=4096, h_q=128, s_q=1 on 132 SMs -> 66 partitions, 2 whole requests each.
    meta, splits = jf.get_mla_metadata(jnp.full((128,), 4096, jnp.int32), 128, 1, num_sm=132)
    meta, splits = np.asarray(meta), np.asarray(splits)
    assert meta.shape == (66, 8)
    np.testing.assert_array_equal(splits, np.arange(129))
    for p in range(64):
        assert tuple(meta[p, :6]) == (2 * p, 0, 2 * p + 1, 64, 0, 128)
    assert (meta[64:, 0] == 128).all()


def test_worked_case_single_long_request():
    # Contract: b=1, L=32768 -> 64 partitions of 8 blocks, the request split 64 ways.
    meta, splits = jf.get_mla_metadata(jnp.array([32768], jnp.int32), 128, 1, num_sm=132)
    meta, splits = np.asarray(meta), np.asarray(splits)
    np.testing.assert_array_equal(splits, [0, 64])
    for p in range(64):
        assert tuple(meta[p, :7]) == (0, 8 * p, 0, 8 * p + 8, p, 8, p)
    assert (meta[64:, 0] == 1).all()


@pytest.mark.parametrize(
    "num_sm, h_kv, rows, expected",
    [(132, 1, 128, 66), (132, 1, 64, 132), (132, 1, 16, 132), (132, 1, 65, 66), (132, 8, 16, 16),
     (132, 3, 256, 11), (132, 1, 512, 16), (7, 8, 64, 1), (1, 1, 1, 1), (114, 2, 100, 28)],
)
def test_num_sm_parts(num_sm, h_kv, rows, expected):
    assert num_sm_parts(num_sm, h_kv, rows) == expected
    meta, _ = jf.get_mla_metadata(jnp.ones((3,), jnp.int32), rows, h_kv, num_sm=num_sm)
    assert meta.shape == (expected, 8)


def _distribution(name: str, rng) -> np.ndarray:
    if name == "one_request_100k":
        return np.array([100_000])
    if name == "b1024_short":
        return rng.integers(1, 300, size=1024)
    if name == "many_zeros":
        lens = rng.integers(1, 6000, size=256)
        lens[rng.random(256) < 0.8] = 0
        return lens
    if name == "all_zero":
        return np.zeros(128, np.int64)
    if name == "varlen_normal":
        return np.maximum(rng.normal(4096, 2048, size=64).astype(np.int64), 1)
    if name == "log_uniform":
        return np.exp(rng.uniform(0, np.log(65536), size=37)).astype(np.int64)
    if name == "page_boundaries":
        return rng.choice([1, 63, 64, 65, 127, 128, 129, 4096, 4097], size=50)
    if name == "one_long_many_short":
        lens = rng.integers(0, 100, size=200)
        lens[rng.integers(200)] = 200_000
        return lens
    raise ValueError(name)


DISTRIBUTIONS = ["one_request_100k", "b1024_short", "many_zeros", "all_zero", "varlen_normal",
                 "log_uniform", "page_boundaries", "one_long_many_short"]


@pytest.mark.parametrize("num_parts", [1, 2, 7, 66, 132, 300])
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_matches_oracle_and_invariants(dist, num_parts):
    seed = fresh_seed()
    lengths = _distribution(dist, np.random.default_rng(seed)).astype(np.int32)
    meta, splits = metadata(lengths, num_parts)
    want_meta, want_splits = oracle_schedule(lengths.tolist(), num_parts)
    np.testing.assert_array_equal(splits, want_splits, err_msg=f"seed={seed}")
    np.testing.assert_array_equal(meta, want_meta, err_msg=f"seed={seed}")
    check_invariants(lengths, meta, splits)


def test_odd_lengths_count_as_one_block():
    # Negative lengths are invalid input for the decode (it returns NaN for them), but the
    # scheduler must still place them, like zero-length requests, as one block.
    lengths = np.array([-5, 0, -2**31, 1, 2**31 - 64], np.int32)
    meta, splits = metadata(lengths, 4)
    want_meta, want_splits = oracle_schedule(lengths.tolist(), 4)
    np.testing.assert_array_equal(meta, want_meta)
    np.testing.assert_array_equal(splits, want_splits)


def test_large_batch_is_one_schedule():
    lengths = np.random.default_rng(fresh_seed()).integers(0, 70_000, size=9000).astype(np.int32)
    meta, splits = metadata(lengths, 132)
    check_invariants(lengths, meta, splits)


def test_leading_dims_are_independent_schedules():
    rng = np.random.default_rng(fresh_seed())
    lengths = rng.integers(0, 9000, size=(2, 3, 17)).astype(np.int32)
    meta, splits = schedule(jnp.asarray(lengths), 11)
    assert meta.shape == (2, 3, 11, 8) and splits.shape == (2, 3, 18)
    for i in np.ndindex(2, 3):
        want_meta, want_splits = oracle_schedule(lengths[i].tolist(), 11)
        np.testing.assert_array_equal(np.asarray(meta[i]), want_meta)
        np.testing.assert_array_equal(np.asarray(splits[i]), want_splits)


def test_jit_and_vmap():
    rng = np.random.default_rng(fresh_seed())
    lengths = rng.integers(0, 9000, size=(5, 20)).astype(np.int32)
    fn = lambda L: jf.get_mla_metadata(L, 64, 1, num_sm=13)
    meta, splits = jax.jit(jax.vmap(fn))(jnp.asarray(lengths))
    for i in range(5):
        want_meta, want_splits = oracle_schedule(lengths[i].tolist(), 13)
        np.testing.assert_array_equal(np.asarray(meta[i]), want_meta)
        np.testing.assert_array_equal(np.asarray(splits[i]), want_splits)
    # vmap over a non-leading axis
    meta_t, _ = jax.vmap(fn, in_axes=1, out_axes=0)(jnp.asarray(lengths.T))
    np.testing.assert_array_equal(np.asarray(meta_t), np.asarray(meta))


def test_default_num_sm_on_cpu_is_h100():
    if jax.devices()[0].platform != "cpu":
        pytest.skip("default device is not the CPU")
    meta, _ = jf.get_mla_metadata(jnp.ones((4,), jnp.int32), 128, 1)
    assert meta.shape == (66, 8)
