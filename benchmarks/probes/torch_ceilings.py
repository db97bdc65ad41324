"""The two ceilings measured the anchor's way (PyTorch, cuBLAS), beside JAX's, on this GPU now.

The FlashMLA anchor (`flashmla-h100.json`) records the ceilings of its own run: copy 3025 GB/s and
a bf16 8192^3 matmul at 806 TFLOP/s. Our benchmark measures the matmul with `jnp.dot` under XLA
and gets 717-756 on the H100s lent to us. This probe asks whether that gap is the method (XLA's
GEMM against cuBLAS), the card, or how long the GPU had been busy (the 700 W power cap lowers
the clock within a fraction of a second). Answer on 2026-12-06 (benchmarks/NOTES.md, twenty-third
session): the duty cycle; cuBLAS reads 800 in a burst on our card and 643-698 sustained.

Torch: inputs from a normal distribution (the bits toggle as in real data), one second of
warm-up, then the median of `--steps` launches timed with CUDA events; the copy likewise; and
the matmul as a burst, 10 launches after two idle seconds, before the cap can act. JAX: the
same matmul, host-timed (a cross-check only). Each runs in its own process (JAX would otherwise
hold most of the GPU memory), in the order torch, JAX, JAX, torch so that a clock drift shows;
`--only torch` runs torch twice.

Run on the device machine: `python3 benchmarks/probes/torch_ceilings.py` (needs torch and jax).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MATMUL_N = 8192
COPY_BYTES = 2 << 30


def run_torch(steps: int) -> dict:
    import torch

    dev = torch.device("cuda")
    a = torch.randn(MATMUL_N, MATMUL_N, device=dev, dtype=torch.bfloat16)
    b = torch.randn(MATMUL_N, MATMUL_N, device=dev, dtype=torch.bfloat16)
    src = torch.randint(0, 2**31 - 1, (COPY_BYTES // 4,), device=dev, dtype=torch.int32)
    dst = torch.empty_like(src)

    def timed(fn) -> float:
        end = time.perf_counter() + 1.0
        while time.perf_counter() < end:
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(steps):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3)
        return statistics.median(times)

    def burst(fn, launches: int = 10) -> float:
        # After two idle seconds: the first launches run before the power cap lowers the clock.
        torch.cuda.synchronize()
        time.sleep(2.0)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(launches + 1)]
        events[0].record()
        for e in events[1:]:
            fn()
            e.record()
        events[-1].synchronize()
        return statistics.median([a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])])

    mm_s = timed(lambda: torch.mm(a, b))
    copy_s = timed(lambda: dst.copy_(src))
    mm_burst_s = burst(lambda: torch.mm(a, b))
    return {
        "who": f"torch {torch.__version__} (cuBLAS)",
        "matmul_TFLOPs": 2 * MATMUL_N**3 / mm_s / 1e12,
        "matmul_burst_TFLOPs": 2 * MATMUL_N**3 / mm_burst_s / 1e12,
        "copy_GBps": 2 * COPY_BYTES / copy_s / 1e9,
    }


def run_jax(steps: int) -> dict:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(1), (MATMUL_N, MATMUL_N), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (MATMUL_N, MATMUL_N), jnp.bfloat16)
    mm = jax.jit(jnp.dot)
    mm(a, b).block_until_ready()
    end = time.perf_counter() + 1.0
    while time.perf_counter() < end:
        out = mm(a, b)
    out.block_until_ready()
    # Host-timed, one launch per sync: a cross-check only. It read 555-623 TFLOP/s where the
    # benchmark's device-timed `jnp.dot` read 735-756 on the same card (NOTES, twenty-third
    # session), so dispatch and sync are not negligible here; decode_bench.py's figure is the
    # ceiling of record.
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return {"who": f"jax {jax.__version__} (XLA, host-timed)", "matmul_TFLOPs": 2 * MATMUL_N**3 / statistics.median(times) / 1e12}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--only", choices=["torch", "jax"], help="measure one library (twice) instead of both")
    ap.add_argument("--child", choices=["torch", "jax"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        res = run_torch(args.steps) if args.child == "torch" else run_jax(args.steps)
        print(json.dumps(res))
        return 0
    results = []
    order = (args.only, args.only) if args.only else ("torch", "jax", "jax", "torch")
    for who in order:
        proc = subprocess.run([sys.executable, __file__, "--child", who, "--steps", str(args.steps)],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            print(f"{who}: failed\n{proc.stderr[-2000:]}")
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(res)
        extra = ""
        if "copy_GBps" in res:
            extra = f" (10 launches after 2 s idle: {res['matmul_burst_TFLOPs']:.1f}), copy {res['copy_GBps']:.0f} GB/s"
        print(f"{res['who']}: bf16 matmul {MATMUL_N}^3 {res['matmul_TFLOPs']:.1f} TFLOP/s{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
