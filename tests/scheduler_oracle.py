"""The scheduler of the contract (section 4), in plain Python: an oracle written as lists of pieces.

Kept deliberately different in shape from ``jax_flashmla._scheduler`` (which is a state machine
in jnp): here each partition is a list of ``(request, first_block, end_block)`` pieces and the
metadata rows are derived from those lists afterwards.
"""

from __future__ import annotations

import numpy as np

BLOCK, OVERHEAD = 64, 5


def blocks_of(length: int) -> int:
    return max(-(-length // BLOCK), 1) if length > 0 else 1


def partition_pieces(lengths, num_parts: int) -> list[list[tuple[int, int, int]]]:
    nblk = [blocks_of(int(L)) for L in lengths]
    budget = -(-sum(n + OVERHEAD for n in nblk) // num_parts) + OVERHEAD
    parts: list[list[tuple[int, int, int]]] = [[] for _ in range(num_parts)]
    req, start = 0, 0
    for pieces in parts:
        left = budget
        while req < len(nblk):
            need = nblk[req] - start + OVERHEAD
            if need <= left:
                pieces.append((req, start, nblk[req]))
                left -= need
                req, start = req + 1, 0
                continue
            if left - OVERHEAD > 0:
                pieces.append((req, start, start + left - OVERHEAD))
                start += left - OVERHEAD
            break
    assert req == len(nblk), "the contract's budget always places every request"
    return parts


def oracle_schedule(lengths, num_parts: int) -> tuple[np.ndarray, np.ndarray]:
    """(metadata [num_parts, 8], num_splits [b + 1]) int32, in the project's documented layout."""
    b = len(lengths)
    parts = partition_pieces(lengths, num_parts)
    count = [0] * b
    for pieces in parts:
        for req, _, _ in pieces:
            count[req] += 1
    num_splits = np.concatenate([[0], np.cumsum(count)]).astype(np.int32)

    rows = []
    seen = [0] * b  # pieces of each request placed by earlier partitions
    for pieces in parts:
        if not pieces:
            rows.append([b, 0, b - 1, 0, 0, 0, int(num_splits[b]), 0])
            continue
        first, last = pieces[0], pieces[-1]
        first_split = seen[first[0]]
        rows.append(
            [
                first[0],
                first[1],
                last[0],
                last[2],
                first_split,
                sum(end - start for _, start, end in pieces),
                int(num_splits[first[0]]) + first_split,
                0,
            ]
        )
        for req, _, _ in pieces:
            seen[req] += 1
    return np.asarray(rows, np.int32).reshape(num_parts, 8), num_splits
