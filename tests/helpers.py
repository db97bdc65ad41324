"""Shared test helpers: data generation per the contract's test protocol, and comparison.

Every case draws fresh random inputs; the seed is in every failure message, and
``JAX_FLASHMLA_TEST_SEED`` replays one.
"""

from __future__ import annotations

import dataclasses
import os
import secrets

import jax.numpy as jnp
import numpy as np

HEAD_DIM, HEAD_DIM_V, PAGE = 576, 512, 64
# Unused block-table entries: a page id far out of range, so a read of one cannot go unnoticed.
POISON_PAGE = 2147480000

DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16}


def kernel_skip_reason() -> str | None:
    """Why the CUDA kernels do not run here (None where they do): the GPU marker's skip rule, and
    which attention path a model takes by default."""
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


def fresh_seed() -> int:
    env = os.environ.get("JAX_FLASHMLA_TEST_SEED")
    return int(env) if env else secrets.randbits(32)


@dataclasses.dataclass
class Case:
    """Inputs of one decode call, as numpy arrays, plus how they were drawn."""

    q: np.ndarray  # [b, s_q, h_q, 576] in the test dtype
    k_cache: np.ndarray  # [num_pages, 64, h_kv, 576] in the test dtype; NaN where unused
    block_table: np.ndarray  # [b, max_blocks] int32; POISON_PAGE where unused
    cache_seqlens: np.ndarray  # [b] int32
    causal: bool
    seed: int

    @property
    def h_kv(self) -> int:
        return self.k_cache.shape[2]

    @property
    def rows(self) -> int:
        b, s_q, h_q, _ = self.q.shape
        return s_q * h_q // self.h_kv

    def arrays(self) -> tuple:
        """(q, k_cache, block_table, cache_seqlens) as jax arrays: the decode step's inputs."""
        return tuple(jnp.asarray(x) for x in (self.q, self.k_cache, self.block_table, self.cache_seqlens))

    def describe(self) -> str:
        b, s_q, h_q, _ = self.q.shape
        lens = self.cache_seqlens
        return (
            f"seed={self.seed} b={b} s_q={s_q} h_q={h_q} h_kv={self.h_kv} causal={self.causal} "
            f"dtype={self.q.dtype} lens[min={lens.min()}, max={lens.max()}, zeros={(lens == 0).sum()}]"
        )


def draw_lengths(rng, b: int, s_k: int, s_q: int, varlen: bool, zero_fraction: float = 0.0) -> np.ndarray:
    """Fixed ``s_k``, or ``max(int(Normal(s_k, s_k/2)), s_q)`` per request; then some zeros."""
    if varlen:
        lens = np.maximum(rng.normal(s_k, s_k / 2, size=b).astype(np.int64), s_q)
    else:
        lens = np.full(b, s_k, np.int64)
    if zero_fraction:
        lens[rng.random(b) < zero_fraction] = 0
    return lens.astype(np.int32)


def _randn(rng, shape) -> np.ndarray:
    return np.clip(rng.standard_normal(shape, dtype=np.float32) / 10, -1, 1)


@dataclasses.dataclass
class Paging:
    """Where each request's tokens live in the paged cache."""

    lengths: np.ndarray  # [b] int32
    block_table: np.ndarray  # [b, max_blocks] int32; POISON_PAGE where unused
    num_pages: int
    page_len: np.ndarray  # [num_pages] valid tokens of every page (0 for spare pages)

    def valid_slots(self) -> np.ndarray:
        """[num_pages, 64] bool: the cache slots that hold a token; all others get NaN."""
        return np.arange(PAGE)[None, :] < self.page_len[:, None]


def make_paging(rng, lengths, *, spare_blocks: int = 1, max_blocks: int | None = None, num_pages: int | None = None) -> Paging:
    """A random paging of ``lengths``: page ids are a random permutation of a pool that holds
    every used page plus spare ones nothing refers to; block-table entries past ``ceil(L / 64)``
    are ``POISON_PAGE``. ``max_blocks`` / ``num_pages`` fix the shapes (at least what is needed);
    by default the table has ``spare_blocks`` more columns than the longest request needs.
    """
    lengths = np.asarray(lengths, np.int32)
    b = lengths.shape[0]
    used_blocks = -(-np.maximum(lengths, 0).astype(np.int64) // PAGE)
    need_blocks = int(max(used_blocks.max(initial=0), 1))
    max_blocks = need_blocks + spare_blocks if max_blocks is None else max_blocks
    total = int(used_blocks.sum())
    num_pages = total + max(4, total // 8) if num_pages is None else num_pages
    assert max_blocks >= need_blocks and num_pages >= total, (max_blocks, need_blocks, num_pages, total)
    pages = rng.permutation(num_pages)
    table = np.full((b, max_blocks), POISON_PAGE, np.int32)
    used = np.arange(max_blocks)[None, :] < used_blocks[:, None]
    table[used] = pages[:total]
    # Page table[i, j] holds tokens j*64 .. j*64+63 of request i.
    page_len = np.zeros(num_pages, np.int64)
    rows, cols = np.nonzero(used)
    page_len[table[rows, cols]] = np.minimum(lengths[rows] - cols * PAGE, PAGE)
    return Paging(lengths, table, num_pages, page_len)


def make_case(
    *,
    b: int,
    s_q: int,
    h_q: int,
    h_kv: int,
    s_k: int | None = None,
    lengths=None,
    varlen: bool = False,
    causal: bool = False,
    dtype: str = "bf16",
    zero_fraction: float = 0.0,
    spare_blocks: int = 1,
    seed: int | None = None,
) -> Case:
    """A poisoned decode case per the contract's test protocol (section 7).

    Page ids are a random permutation of the pool; cache slots past each length are NaN (the
    rest of the last page, and spare pages nothing refers to); block-table entries past
    ``ceil(L / 64)`` are ``POISON_PAGE``; the table has ``spare_blocks`` more columns than the
    longest request needs.
    """
    seed = fresh_seed() if seed is None else seed
    rng = np.random.default_rng(seed)
    if lengths is None:
        lengths = draw_lengths(rng, b, s_k, s_q, varlen, zero_fraction)
    paging = make_paging(rng, lengths, spare_blocks=spare_blocks)
    valid = paging.valid_slots()
    cache = np.where(valid[:, :, None, None], _randn(rng, (paging.num_pages, PAGE, h_kv, HEAD_DIM)), np.nan)

    np_dtype = jnp.dtype(DTYPES[dtype])
    return Case(
        q=_randn(rng, (b, s_q, h_q, HEAD_DIM)).astype(np_dtype),
        k_cache=cache.astype(np_dtype),
        block_table=paging.block_table,
        cache_seqlens=paging.lengths,
        causal=causal,
        seed=seed,
    )


def reference(case: Case, softmax_scale=None):
    from jax_flashmla.reference import mla_decode_reference

    return to_f64(*mla_decode_reference(*case.arrays(), HEAD_DIM_V, softmax_scale, case.causal))


def to_f64(out, lse):
    """Decode results as float64 numpy arrays, for comparison."""
    return np.asarray(out.astype(jnp.float32), np.float64), np.asarray(lse, np.float64)


def decode_step(case: Case, *, num_sm=None, softmax_scale=None, implementation=None):
    """``(q, k_cache, block_table, cache_seqlens) -> (out, lse)``: metadata + decode through the
    public API, as a decode step calls them (not jitted)."""
    import jax_flashmla as jf

    def step(q, k_cache, block_table, cache_seqlens):
        meta, splits = jf.get_mla_metadata(
            cache_seqlens, case.rows, case.h_kv, num_sm=num_sm, implementation=implementation
        )
        return jf.flash_mla_with_kvcache(
            q, k_cache, block_table, cache_seqlens, HEAD_DIM_V, meta, splits,
            softmax_scale=softmax_scale, causal=case.causal, implementation=implementation,
        )

    return step


def run_decode(case: Case, **step_kwargs):
    """The jitted decode step on the case's inputs, as float64 arrays."""
    import jax

    return to_f64(*jax.jit(decode_step(case, **step_kwargs))(*case.arrays()))


# Tolerances of the contract (section 7), for bf16 and used for fp16 as well.
OUT_ATOL, OUT_RTOL, OUT_MAX_COS_DIFF = 8e-4, 2.01 / 128, 5e-6
LSE_ATOL, LSE_RTOL = 1e-6, 8.01 / 65536


def _same_specials(name, x, y, where):
    for kind, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        a, b = test(x), test(y)
        if not np.array_equal(a, b):
            bad = np.argwhere(a != b)[:5].tolist()
            raise AssertionError(f"{name}: {kind} positions differ from the reference at {bad} ({where})")


def _elementwise(name, x, y, atol, rtol, where):
    finite = np.isfinite(y)
    with np.errstate(invalid="ignore"):  # inf - inf where both are +inf, already checked
        err = np.abs(x - y)
    ok = (err <= atol) | (err <= rtol * np.abs(y)) | ~finite
    if not ok.all():
        idx = np.argwhere(~ok)
        first = tuple(idx[0])
        raise AssertionError(
            f"{name}: {len(idx)} elements outside abs {atol:g} / rel {rtol:g}; first at {first}: "
            f"got {x[first]!r}, reference {y[first]!r}; max abs err {err[finite].max():.3g} ({where})"
        )


def cosine_diff(x, y) -> float:
    """``1 - 2<x,y> / (|x|^2 + |y|^2)`` over the finite positions, in float64 (0 for two zeros)."""
    m = np.isfinite(x) & np.isfinite(y)
    x, y = x[m].astype(np.float64), y[m].astype(np.float64)
    denom = (x * x).sum() + (y * y).sum()
    return 0.0 if denom == 0 else float(1 - 2 * (x * y).sum() / denom)


def assert_matches_reference(out, lse, ref_out, ref_lse, where: str):
    """The contract's comparison: specials at the same places, then elementwise and cosine."""
    assert out.shape == ref_out.shape, (out.shape, ref_out.shape, where)
    assert lse.shape == ref_lse.shape, (lse.shape, ref_lse.shape, where)
    _same_specials("out", out, ref_out, where)
    _same_specials("lse", lse, ref_lse, where)
    _elementwise("out", out, ref_out, OUT_ATOL, OUT_RTOL, where)
    diff = cosine_diff(out, ref_out)
    assert diff <= OUT_MAX_COS_DIFF, f"out: cosine difference {diff:.3g} > {OUT_MAX_COS_DIFF:g} ({where})"
    _elementwise("lse", lse, ref_lse, LSE_ATOL, LSE_RTOL, where)


def check_case(case: Case, **run_kwargs):
    out, lse = run_decode(case, **run_kwargs)
    ref_out, ref_lse = reference(case, softmax_scale=run_kwargs.get("softmax_scale"))
    assert_matches_reference(out, lse, ref_out, ref_lse, case.describe())
    return out, lse
