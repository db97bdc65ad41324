"""Device time of each of our kernels per benchmark cell, measured by Nsight Compute.

    python benchmarks/kernel_times.py --cells P1,P8 [--reps 5] [--json PATH] [--traffic]

The decode benchmark times whole jitted steps; this splits one step into its kernels: the
scheduler (``mla_metadata_kernel``, its own time, which the step-level timing cannot isolate),
the split-KV attention (``mla_decode_kernel``) and the combine (``mla_combine_kernel``). Each
cell runs in a child process under ``ncu --clock-control none --metrics gpu__time_duration.sum``
(GPU clocks as they are, caches flushed before each kernel: a cold L2, as a decode step that
streams a cache much larger than L2 sees). ncu serialises kernels, so the combine's overlap with
the attention (programmatic dependent launch) is not in these numbers. Reported: the median over
``reps`` calls of one jitted metadata + one decode call on layer 0's inputs.

``--traffic``: the DRAM bytes each kernel reads and writes inside the benchmark's own 16-layer
step (``decode_bench.flashmla_step``), with ncu's ``--cache-control none``: L2 keeps what the
previous kernel left in it, as in a real step, so data one kernel leaves dirty in L2 and a later
one's stream evicts shows up as the later kernel's DRAM writes. Reported per layer (the mean over
the layers of the last of ``reps`` steps): time, DRAM MB read and written, per kernel.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

KERNELS = ("mla_metadata_kernel", "mla_decode_kernel", "mla_combine_kernel")
UNITS = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6, "s": 1e6}


def child(cell_name: str, reps: int, whole_step: bool) -> None:
    """Runs inside ncu: ``reps`` calls of metadata + one decode on layer 0's inputs or, with
    ``whole_step``, of the benchmark's whole 16-layer step."""
    import jax

    import jax_flashmla as jf
    from cells import parse_cell
    from decode_bench import flashmla_step, make_inputs
    import jax.numpy as jnp

    cell = parse_cell(cell_name)
    qs, k_cache, tables, lengths = make_inputs(cell, jnp.bfloat16)
    rows = cell.s_q * cell.h_q // cell.h_kv

    def one_layer(q, k_cache, table, lengths):
        meta, splits = jf.get_mla_metadata(lengths, rows, cell.h_kv)
        return jf.flash_mla_with_kvcache(q, k_cache, table, lengths, 512, meta, splits, causal=cell.causal)

    if whole_step:
        fn, args = flashmla_step(cell), (qs, k_cache, tables, lengths)
    else:
        fn, args = one_layer, (qs[0], k_cache, tables[0], lengths)
    compiled = jax.jit(fn).lower(*args).compile()
    for _ in range(reps):
        jax.block_until_ready(compiled(*args))


TRAFFIC_METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum")
BYTE_UNITS = {"byte": 1e-6, "Kbyte": 1e-3, "Mbyte": 1.0, "Gbyte": 1e3, "KB": 1e-3, "MB": 1.0, "GB": 1e3}


def run_ncu(cell_name: str, reps: int, ncu: str, metrics, traffic: bool) -> str:
    """The CSV of ``ncu`` over a child process of the cell (``child``). ``traffic``: the whole
    step, and L2 left as the previous kernel left it (``--cache-control none``)."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "ncu.csv"
        cmd = [ncu, "--clock-control", "none", *(["--cache-control", "none"] if traffic else []),
               "--metrics", ",".join(metrics), "--csv", "--kernel-name", "regex:mla_", "--log-file", str(log),
               sys.executable, str(Path(__file__).resolve()), "--child", cell_name, "--reps", str(reps),
               *(["--traffic"] if traffic else [])]
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent)
        if run.returncode != 0 or not log.exists():
            raise RuntimeError(f"ncu failed on {cell_name} (rc={run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
        return log.read_text()


def ncu_records(text: str, metrics):
    """(launch ID, kernel, metric, value) of our kernels from ``ncu --csv`` output, for the
    given metrics: times in microseconds, bytes in MB."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    for rec in csv.DictReader(io.StringIO("\n".join(lines))):
        metric = rec.get("Metric Name")
        kernel = next((k for k in KERNELS if k in rec["Kernel Name"]), None)
        if metric not in metrics or kernel is None:
            continue
        unit = rec["Metric Unit"]
        scale = UNITS[unit] if metric.startswith("gpu__time") else BYTE_UNITS[unit]
        yield int(rec["ID"]), kernel, metric, float(rec["Metric Value"].replace(",", "")) * scale


def parse_traffic_csv(text: str) -> list:
    """[(kernel, {metric: value})] in launch order; us for time, MB for bytes."""
    launches: dict = {}
    for launch, kernel, metric, value in ncu_records(text, TRAFFIC_METRICS):
        launches.setdefault(launch, (kernel, {}))[1][metric] = value
    return [launches[i] for i in sorted(launches)]


def measure_traffic(cell_name: str, reps: int, ncu: str) -> dict:
    return last_step_per_layer(parse_traffic_csv(run_ncu(cell_name, reps, ncu, TRAFFIC_METRICS, traffic=True)))


def last_step_per_layer(launches: list) -> dict:
    """The last step of ``launches`` (its metadata launch and everything after it): each
    kernel's metrics summed over the step and divided by its layers (the metadata kernel runs
    once a step, so its sums stay whole)."""
    last = max(i for i, (k, _) in enumerate(launches) if k == "mla_metadata_kernel")
    step = launches[last:]
    layers = sum(k == "mla_decode_kernel" for k, _ in step)
    out = {}
    for kernel in KERNELS:
        rows = [m for k, m in step if k == kernel]
        if rows:
            per = 1 if kernel == "mla_metadata_kernel" else max(layers, 1)
            out[kernel] = {m: sum(r.get(m, 0.0) for r in rows) / per for m in TRAFFIC_METRICS}
    return {"layers": layers, "per_layer": out}


def parse_ncu_csv(text: str) -> dict:
    """{kernel: [microseconds, ...]} from ``ncu --csv`` output."""
    times: dict = {k: [] for k in KERNELS}
    for _, kernel, _, value in ncu_records(text, ("gpu__time_duration.sum",)):
        times[kernel].append(value)
    return times


def measure(cell_name: str, reps: int, ncu: str) -> dict:
    times = parse_ncu_csv(run_ncu(cell_name, reps, ncu, ("gpu__time_duration.sum",), traffic=False))
    return {k: (statistics.median(v) if v else None) for k, v in times.items()} | {"launches": {k: len(v) for k, v in times.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default="P1,P2,P3,P4,P5,P6,P7,P8,P9,P10")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", help="where to write the results")
    p.add_argument("--traffic", action="store_true", help="DRAM MB per kernel inside the 16-layer step")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.reps, whole_step=args.traffic)
        return 0
    ncu = shutil.which("ncu")
    if ncu is None:
        print("ncu (Nsight Compute) is not on PATH", file=sys.stderr)
        return 2
    names = [c.strip() for c in args.cells.split(",") if c.strip()]
    results = {}
    if args.traffic:
        tool = "ncu --clock-control none --cache-control none, " + ", ".join(TRAFFIC_METRICS)
        print(f"{'cell':<6} {'kernel':<20} {'us':>8} {'DRAM MB read':>13} {'DRAM MB written':>16}  (per layer)")
        for name in names:
            r = measure_traffic(name, args.reps, ncu)
            results[name] = r
            for kernel, m in r["per_layer"].items():
                print(f"{name:<6} {kernel:<20} {m['gpu__time_duration.sum']:>8.1f} {m['dram__bytes_read.sum']:>13.1f} "
                      f"{m['dram__bytes_write.sum']:>16.1f}", flush=True)
    else:
        tool = "ncu --clock-control none, gpu__time_duration.sum"
        print(f"{'cell':<6} {'metadata us':>12} {'attention us':>13} {'combine us':>11} {'attn+combine':>13}")
        for name in names:
            r = measure(name, args.reps, ncu)
            results[name] = r
            total = (r["mla_decode_kernel"] or 0) + (r["mla_combine_kernel"] or 0)

            def f(v):
                return f"{v:.1f}" if v is not None else "-"

            print(f"{name:<6} {f(r['mla_metadata_kernel']):>12} {f(r['mla_decode_kernel']):>13} "
                  f"{f(r['mla_combine_kernel']):>11} {total:>13.1f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"tool": tool, "reps": args.reps, "cells": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
