"""The contract's test grid (section 7), reduced to a pairwise covering for CPU time.

Every pair of values of any two axes (b, s_q, s_k, (h_q, h_kv), varlen, causal, dtype) appears in
at least one case; among the cases that cover the most new pairs, the cheapest is taken. The
selection is deterministic, so the same grid runs in CI and on the GPU.
"""

from __future__ import annotations

import itertools

B = (1, 2, 6, 64)
S_Q = (1, 2, 4)
S_K = (20, 140, 4096)
H_Q = (1, 3, 9, 63, 64, 126, 128)
H_KV = (1, 2, 3, 8)
HEADS = tuple((hq, hk) for hq in H_Q for hk in H_KV if hq % hk == 0)
VARLEN = (False, True)
CAUSAL = (False, True)
DTYPE = ("bf16", "fp16")

AXES = (B, S_Q, S_K, HEADS, VARLEN, CAUSAL, DTYPE)
NAMES = ("b", "s_q", "s_k", "heads", "varlen", "causal", "dtype")


def _cost(case) -> float:
    b, s_q, s_k, (h_q, _), varlen, _, _ = case
    return b * s_q * h_q * (s_k * (1.3 if varlen else 1.0) + 64)


def pairwise_cases() -> list[dict]:
    def pairs(case):
        return {(i, case[i], j, case[j]) for i, j in itertools.combinations(range(len(AXES)), 2)}

    candidates = list(itertools.product(*AXES))
    uncovered = set().union(*(pairs(c) for c in candidates))
    chosen = []
    while uncovered:
        best = max(candidates, key=lambda c: (len(pairs(c) & uncovered), -_cost(c)))
        chosen.append(best)
        uncovered -= pairs(best)
    out = []
    for b, s_q, s_k, (h_q, h_kv), varlen, causal, dtype in chosen:
        out.append(dict(b=b, s_q=s_q, s_k=s_k, h_q=h_q, h_kv=h_kv, varlen=varlen, causal=causal, dtype=dtype))
    return out


def case_id(c: dict) -> str:
    return (
        f"b{c['b']}-sq{c['s_q']}-sk{c['s_k']}-hq{c['h_q']}-hkv{c['h_kv']}"
        f"{'-varlen' if c['varlen'] else ''}{'-causal' if c['causal'] else ''}-{c['dtype']}"
    )
