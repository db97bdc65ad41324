"""Split-KV decode (the pure-JAX path on CPU; the default path wherever it runs) vs the reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from grid import case_id, pairwise_cases
from helpers import (
    POISON_PAGE,
    assert_matches_reference,
    check_case,
    make_case,
    reference,
    run_decode,
)

GRID = pairwise_cases()


@pytest.mark.parametrize("params", GRID, ids=[case_id(c) for c in GRID])
def test_grid(params):
    check_case(make_case(**params))


@pytest.mark.parametrize(
    "params",
    [
        # Contract: zero-length cases at b=128, s_q=2 (padding slots of a fixed-size batch).
        dict(b=128, s_q=2, s_k=140, h_q=16, h_kv=1, varlen=True, causal=True, dtype="bf16"),
        dict(b=128, s_q=2, s_k=4096, h_q=16, h_kv=1, varlen=False, causal=False, dtype="fp16"),
        dict(b=128, s_q=2, s_k=600, h_q=64, h_kv=8, varlen=True, causal=True, dtype="bf16"),
    ],
    # (The dense reference attends over the whole block table of every request, so these
    # stay small enough for a 2-core CI machine.)
    ids=["sk140-hq16-varlen-causal", "sk4096-hq16-fp16", "sk600-hq64-hkv8-varlen-causal"],
)
def test_zero_length_requests(params):
    case = make_case(**params, zero_fraction=0.5)
    out, lse = check_case(case)
    zero = case.cache_seqlens == 0
    assert zero.any()
    assert (out[zero] == 0).all() and np.isposinf(lse[zero]).all()


def test_all_requests_empty():
    case = make_case(b=6, s_q=2, h_q=16, h_kv=1, lengths=[0] * 6, causal=True)
    out, lse = check_case(case)
    assert (out == 0).all() and np.isposinf(lse).all()


@pytest.mark.parametrize("causal", [False, True])
def test_lengths_around_pages_and_shorter_than_s_q(causal):
    # Lengths below s_q leave causal rows without any visible key: out 0, lse +inf.
    lengths = [0, 1, 2, 3, 4, 63, 64, 65, 127, 128, 129, 191]
    case = make_case(b=len(lengths), s_q=4, h_q=32, h_kv=2, lengths=lengths, causal=causal)
    out, lse = check_case(case)
    if causal:
        # token t of request 1 (L=1) sees L - (3 - t) keys: only the last token sees one.
        assert np.isposinf(lse[1, :, :3]).all() and np.isfinite(lse[1, :, 3]).all()


@pytest.mark.parametrize("num_sm", [1, 3, 17, 1000])
def test_any_partition_count(num_sm):
    # From one partition (no split) to far more partitions than blocks (every request split).
    case = make_case(b=5, s_q=2, s_k=900, h_q=24, h_kv=2, varlen=True, causal=True)
    check_case(case, num_sm=num_sm)


def test_long_single_request():
    # One request split across every partition: the combine carries the whole result.
    case = make_case(b=1, s_q=1, s_k=20_000, h_q=16, h_kv=1)
    check_case(case)


def test_many_row_tiles_causal():
    # s_q * h_q / h_kv = 512 packed rows per KV head with per-row causal limits.
    case = make_case(b=2, s_q=4, s_k=300, h_q=128, h_kv=1, varlen=True, causal=True)
    check_case(case)


def test_softmax_scale():
    case = make_case(b=3, s_q=1, s_k=500, h_q=16, h_kv=1, varlen=True)
    check_case(case, softmax_scale=0.3)


def test_result_does_not_depend_on_batch_mates():
    case = make_case(b=7, s_q=2, s_k=700, h_q=16, h_kv=1, varlen=True, causal=True)
    out, lse = run_decode(case)
    for i in range(case.q.shape[0]):
        one = slice(i, i + 1)
        alone = dataclasses.replace(
            case, q=case.q[one], block_table=case.block_table[one], cache_seqlens=case.cache_seqlens[one]
        )
        out_i, lse_i = run_decode(alone)
        # Same request, other split pattern: equal up to the rounding of split merging.
        assert_matches_reference(out_i, lse_i, out[i : i + 1], lse[i : i + 1], f"request {i} of {case.describe()}")


def test_two_runs_bit_identical():
    case = make_case(b=4, s_q=2, s_k=600, h_q=32, h_kv=1, varlen=True, causal=True)
    a = run_decode(case)
    b = run_decode(case)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


class TestInvalidDataGivesNaN:
    """Data errors cannot raise at trace time; they give NaN rows instead of reading out of bounds."""

    def _check(self, case, bad):
        out, lse = run_decode(case)
        ref_out, ref_lse = reference(case)
        assert np.isnan(out[bad]).all() and np.isnan(lse[bad]).all()
        good = ~bad
        assert_matches_reference(out[good], lse[good], ref_out[good], ref_lse[good], case.describe())

    def test_length_beyond_block_table(self):
        case = make_case(b=3, s_q=1, h_q=16, h_kv=1, lengths=[100, 130, 64], spare_blocks=0)
        case.cache_seqlens[1] = case.block_table.shape[1] * 64 + 1
        self._check(case, np.array([False, True, False]))

    def test_negative_length(self):
        case = make_case(b=3, s_q=1, h_q=16, h_kv=1, lengths=[100, 130, 64])
        case.cache_seqlens[2] = -1
        self._check(case, np.array([False, False, True]))

    @pytest.mark.parametrize("page", [-1, POISON_PAGE])
    def test_page_id_out_of_range(self, page):
        case = make_case(b=3, s_q=1, h_q=16, h_kv=1, lengths=[100, 130, 64])
        case.block_table[0, 1] = page
        self._check(case, np.array([True, False, False]))
