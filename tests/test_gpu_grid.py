"""The full test grid of the contract (section 7) on the GPU: every combination, bf16 and fp16.

4608 cases would take hours with host-side data and one compiled reference per shape, so here
the data is drawn on the device and the reference is dense float32 attention in PyTorch (eager,
nothing to compile, full-precision matmuls, and a code base independent of everything it checks). Paging, poisoning and
the comparison are the shared helpers'. Shapes depend only on the grid point, not on the drawn
lengths (the table and the pool are sized for the longest length drawn, capped at 3 * s_k), so
the fixed-length and varlen cases of a grid point share one compiled decode step.
"""

from __future__ import annotations

import functools
import itertools
import os
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
torch = pytest.importorskip("torch", reason="the full-grid GPU test uses PyTorch as its on-device reference")

B, S_Q, S_K, HEADS, VARLEN, CAUSAL, DTYPE = AXES
FULL_GRID = [
    dict(b=b, s_q=s_q, s_k=s_k, h_q=h_q, h_kv=h_kv, varlen=v, causal=c, dtype=d)
    for b, s_q, s_k, (h_q, h_kv), v, c, d in itertools.product(B, S_Q, S_K, HEADS, VARLEN, CAUSAL, DTYPE)
]
# JAX_FLASHMLA_GRID_SHARD=i/n runs every n-th case from the i-th, to split the grid over runs.
_shard = os.environ.get("JAX_FLASHMLA_GRID_SHARD")
if _shard:
    _i, _n = map(int, _shard.split("/"))
    FULL_GRID = FULL_GRID[_i::_n]
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
    """Dense float32 attention (full-precision matmuls, no TF32) from the definition (contract,
    section 3): all requests at once, each padded to the longest, one KV head at a time."""
    torch.backends.cuda.matmul.allow_tf32 = False
    b, s_q, h_q, d = q.shape
    num_pages, _, h_kv, _ = cache.shape
    g = h_q // h_kv
    lengths = torch.as_tensor(paging.lengths.astype(np.int64), device="cuda")
    blocks = max(-(-int(paging.lengths.max()) // PAGE), 1)
    table = paging.block_table[:, :blocks].astype(np.int64)
    table = torch.as_tensor(np.where((table >= 0) & (table < num_pages), table, 0), device="cuda")
    pos = torch.arange(blocks * PAGE, device="cuda")
    in_seq = (pos[None, :] < lengths[:, None])[:, :, None]  # [b, n, 1]
    t = torch.arange(s_q, device="cuda")
    limit = lengths[:, None] - ((s_q - 1 - t)[None, :] if causal else 0)  # [b, s_q]
    visible = pos[None, None, :] < limit[:, :, None]  # [b, s_q, n]
    out = torch.empty(b, s_q, h_q, HEAD_DIM_V, device="cuda")
    lse = torch.empty(b, h_q, s_q, device="cuda")
    for k in range(h_kv):
        heads = slice(k * g, (k + 1) * g)
        kv = cache[table, :, k].reshape(b, blocks * PAGE, d)
        kv = torch.where(in_seq, kv, 0.0).float()  # slots past the length hold NaN
        logits = d**-0.5 * torch.einsum("btgd,bnd->bgtn", q[:, :, heads].float(), kv)
        logits = logits.masked_fill(~visible[:, None], -torch.inf)
        row_lse = torch.logsumexp(logits, dim=-1)  # [b, g, s_q]; -inf where nothing is visible
        seen = torch.isfinite(row_lse)
        probs = torch.where(seen[..., None], torch.exp(logits - row_lse[..., None]), 0.0)
        out[:, :, heads] = torch.einsum("bgtn,bnv->btgv", probs, kv[..., :HEAD_DIM_V])
        lse[:, heads] = torch.where(seen, row_lse, torch.inf)
    return out.double().cpu().numpy(), lse.double().cpu().numpy()


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
