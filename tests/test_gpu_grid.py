"""The full test grid of the contract (section 7) on the GPU: every combination, bf16 and fp16.

4608 cases would take hours with host-side data and one compiled reference per shape, so here
the data is drawn on the device and the reference is dense float64 attention in PyTorch (eager,
nothing to compile, and a code base independent of everything it checks). Paging, poisoning and
the comparison are the shared helpers'. Shapes depend only on the grid point, not on the drawn
lengths (the table and the pool are sized for the longest length drawn, capped at 3 * s_k), so
the fixed-length and varlen cases of a grid point share one compiled decode step.
"""

from __future__ import annotations

import functools
import itertools
import types

import jax
import numpy as np
import pytest

from jax_flashmla import _ffi
from grid import AXES, case_id
from helpers import (
    DTYPES,
    HEAD_DIM,
    HEAD_DIM_V,
    PAGE,
    assert_matches_reference,
    decode_step,
    draw_lengths,
    fresh_seed,
    make_paging,
)

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch", reason="the full-grid GPU test uses PyTorch as its on-device float64 reference")

B, S_Q, S_K, HEADS, VARLEN, CAUSAL, DTYPE = AXES
FULL_GRID = [
    dict(b=b, s_q=s_q, s_k=s_k, h_q=h_q, h_kv=h_kv, varlen=v, causal=c, dtype=d)
    for b, s_q, s_k, (h_q, h_kv), v, c, d in itertools.product(B, S_Q, S_K, HEADS, VARLEN, CAUSAL, DTYPE)
]
# Varlen lengths are Normal(s_k, s_k/2); capping them at 3 * s_k (4 sigma) fixes the shapes.
LENGTH_CAP = 3


def _shapes(b: int, s_k: int) -> tuple[int, int]:
    """(max_blocks, num_pages) of a grid point: room for the capped lengths, plus spare pages."""
    max_blocks = -(-LENGTH_CAP * s_k // PAGE) + 1
    return max_blocks, b * max_blocks + 4


@functools.lru_cache(maxsize=None)
def _compiled_step(b, s_q, h_q, h_kv, causal):
    return jax.jit(decode_step(types.SimpleNamespace(rows=s_q * h_q // h_kv, h_kv=h_kv, causal=causal)))


_checked_lowering = set()


def _assert_kernel_runs(step, args, key):
    """Once per compiled step: the decode lowers to the CUDA custom call, not the pure-JAX path."""
    if key not in _checked_lowering:
        assert _ffi.DECODE_TARGET in step.lower(*args).as_text(), "the decode kernel must run"
        _checked_lowering.add(key)


def _torch_dtype(name):
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _draw(p, seed):
    rng = np.random.default_rng(seed)
    lengths = np.minimum(draw_lengths(rng, p["b"], p["s_k"], p["s_q"], p["varlen"]), LENGTH_CAP * p["s_k"])
    max_blocks, num_pages = _shapes(p["b"], p["s_k"])
    paging = make_paging(rng, lengths, max_blocks=max_blocks, num_pages=num_pages)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dtype = _torch_dtype(p["dtype"])

    def randn(*shape):  # drawn in the test dtype: the largest pool is 7 GiB in bf16
        return (torch.randn(*shape, generator=gen, device="cuda", dtype=dtype) / 10).clamp_(-1, 1)

    valid = torch.as_tensor(paging.valid_slots(), device="cuda")
    cache = randn(num_pages, PAGE, p["h_kv"], HEAD_DIM)
    cache = torch.where(valid[:, :, None, None], cache, torch.nan)
    q = randn(p["b"], p["s_q"], p["h_q"], HEAD_DIM)
    torch.cuda.synchronize()  # JAX reads these buffers on its own stream
    return q, cache, paging


def _reference(q, cache, paging, causal):
    """Dense float64 attention per request, from the definition (contract, section 3)."""
    b, s_q, h_q, d = q.shape
    h_kv = cache.shape[2]
    g = h_q // h_kv
    scale = d**-0.5
    out = torch.zeros(b, s_q, h_q, HEAD_DIM_V, dtype=torch.float64, device="cuda")
    lse = torch.full((b, h_q, s_q), torch.inf, dtype=torch.float64, device="cuda")
    for i, length in enumerate(paging.lengths.tolist()):
        if length == 0:
            continue
        blocks = -(-length // PAGE)
        pages = torch.as_tensor(paging.block_table[i, :blocks].astype(np.int64), device="cuda")
        kv = cache[pages].reshape(blocks * PAGE, h_kv, d)[:length].double()  # the request's tokens only
        qi = q[i].double().reshape(s_q, h_kv, g, d)
        logits = scale * torch.einsum("tkgd,nkd->kgtn", qi, kv)
        t = torch.arange(s_q, device="cuda")
        limit = length - (s_q - 1 - t) if causal else torch.full((s_q,), length, device="cuda")
        visible = torch.arange(length, device="cuda")[None, :] < limit[:, None]  # [s_q, n]
        logits = logits.masked_fill(~visible[None, None], -torch.inf)
        row_lse = torch.logsumexp(logits, dim=-1)  # [h_kv, g, s_q]; -inf where nothing is visible
        seen = torch.isfinite(row_lse)
        probs = torch.where(seen[..., None], torch.exp(logits - row_lse[..., None]), 0.0)
        out[i] = torch.einsum("kgtn,nkv->tkgv", probs, kv[..., :HEAD_DIM_V]).reshape(s_q, h_q, HEAD_DIM_V)
        lse[i] = torch.where(seen, row_lse, torch.inf).reshape(h_q, s_q)
    return out.cpu().numpy(), lse.cpu().numpy()


@pytest.mark.parametrize("p", FULL_GRID, ids=[case_id(c) for c in FULL_GRID])
def test_full_grid(p):
    seed = fresh_seed()
    q, cache, paging = _draw(p, seed)
    key = (p["b"], p["s_q"], p["h_q"], p["h_kv"], p["causal"])
    step = _compiled_step(*key)
    args = (
        jax.dlpack.from_dlpack(q),
        jax.dlpack.from_dlpack(cache),
        jax.numpy.asarray(paging.block_table),
        jax.numpy.asarray(paging.lengths),
    )
    _assert_kernel_runs(step, args, key + (p["dtype"],))
    out, lse = step(*args)
    assert out.dtype == DTYPES[p["dtype"]]
    got_out = np.asarray(out.astype(jax.numpy.float32), np.float64)
    got_lse = np.asarray(lse, np.float64)
    ref_out, ref_lse = _reference(q, cache, paging, p["causal"])
    lens = paging.lengths
    where = f"seed={seed} {case_id(p)} lens[min={lens.min()}, max={lens.max()}]"
    assert_matches_reference(got_out, got_lse, ref_out, ref_lse, where)
