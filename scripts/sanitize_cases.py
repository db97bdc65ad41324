"""A few small cases of every CUDA kernel, for compute-sanitizer (memcheck, racecheck).

Each kernel result is also checked against the pure-JAX path, so a run that the sanitizer finds
clean is also known to be right.
"""

import sys

import jax.numpy as jnp
import numpy as np

import jax_flashmla as jf

CASES = [[0], [1, 64, 65, 0, 200], list(range(0, 5000, 77)), [100_000], [3] * 300]


def main() -> int:
    bad = 0
    for lengths in CASES:
        for rows, h_kv, num_sm in [(1, 1, 132), (128, 1, 132), (16, 8, 7)]:
            L = jnp.asarray(lengths, jnp.int32)
            got = jf.get_mla_metadata(L, rows, h_kv, num_sm=num_sm, implementation="cuda")
            want = jf.get_mla_metadata(L, rows, h_kv, num_sm=num_sm, implementation="xla")
            same = all(np.array_equal(np.asarray(g), np.asarray(w)) for g, w in zip(got, want))
            bad += not same
            print(f"metadata b={len(lengths)} rows={rows} h_kv={h_kv} num_sm={num_sm}: {'ok' if same else 'MISMATCH'}")
    print(f"{bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
