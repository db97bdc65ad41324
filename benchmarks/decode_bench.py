"""MLA decode benchmark (contract section 8) on whatever backend JAX has.

Per-layer time: one jitted decode step = scheduler metadata once + 16 decode calls, each with its
own q and its own block table (16 random permutations of one page pool, as 16 layers would
have), timed end to end on the device (CUDA events recorded on XLA's stream before and after the
step; the host clock where there is no GPU), median over the steps, divided by 16. The same run
measures the ceilings (a device copy, a bf16 matmul), the metadata kernel alone (per call, 16
calls back to back behind a device copy, see ``metadata_seconds``), and the pure-XLA einsum
decode a JAX user would otherwise write.

    python benchmarks/decode_bench.py                 # P1-P10 on a GPU, small cells on CPU
    python benchmarks/decode_bench.py --cells P1,P8 --plot
    python benchmarks/decode_bench.py --cells b=16,s_q=2,h_q=64,s_k=2048,varlen,causal
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jax_flashmla as jf
from jax_flashmla import _devtime, _ffi
from cells import CELLS, CPU_CELLS, LAYERS, Cell, load_anchor, parse_cell
from clocks import ClockLog
from xla_baseline import xla_einsum_decode

RESULTS = Path(__file__).resolve().parent / "results"


class Timer:
    """Median time of a function's calls: on the device (CUDA events around the jitted program,
    ``jax_flashmla._devtime``) where the extension and a GPU are there, else by the host clock
    around a blocking call."""

    def __init__(self, device_events: bool, command_buffers: bool = True):
        self.device_events = device_events
        self.method = "device (CUDA events around the jitted step)" if device_events else "host clock around a blocking call"
        # Off, XLA launches every op on the stream instead of recording runs of them as CUDA
        # graphs. Measured level with the default on the H100 (P3, P8, P10 within 1-2%;
        # benchmarks/NOTES.md, twenty-fourth session): an option, not the benchmark's setting.
        self.command_buffers = command_buffers

    @property
    def compiler_options(self) -> dict | None:
        """XLA options for every program this timer compiles."""
        return None if self.command_buffers else {"xla_gpu_enable_command_buffer": ""}

    def compile(self, fn, args):
        """``fn`` jitted (bracketed by event marks when timing on the device) and compiled, and
        the text of its lowering (to see which path it took)."""
        lowered = jax.jit(_devtime.timed(fn) if self.device_events else fn).lower(*args)
        return lowered.compile(self.compiler_options), lowered.as_text()

    def measure(self, run, args, steps: int, warmup: int = 2, min_warmup_s: float = 0.0) -> float:
        """Median seconds of ``run`` (from ``compile``) over ``steps`` calls, after ``warmup``
        calls and at least ``min_warmup_s`` of them (an idle GPU starts at low clocks)."""
        start = time.perf_counter()
        done = 0
        while done < warmup or time.perf_counter() - start < min_warmup_s:
            jax.block_until_ready(run(*args))
            done += 1
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            jax.block_until_ready(run(*args))
            times.append(_devtime.elapsed_ms() / 1e3 if self.device_events else time.perf_counter() - start)
        return statistics.median(times)

    def median_seconds(self, fn, args, steps: int, **warmup) -> float:
        """``measure`` of ``fn`` compiled for ``args``."""
        return self.measure(self.compile(fn, args)[0], args, steps, **warmup)


def measure_ceilings(timer: Timer, on_gpu: bool, steps: int) -> dict:
    """Copy bandwidth (bytes read + written) and bf16 matmul rate, on this device, now. With
    device timing the copy is cudaMemcpyAsync; XLA's elementwise copy, which varied by 13% from
    run to run on the H100, is reported beside it."""
    key = jax.random.key(1)
    nbytes = (2 << 30) if on_gpu else (256 << 20)
    x = jax.random.bits(key, (nbytes // 4,), jnp.uint32)
    xla_copy_s = timer.median_seconds(lambda x: x ^ jnp.uint32(0x5A5A5A5A), (x,), steps, min_warmup_s=1.0)
    copy_s = timer.median_seconds(_devtime.device_copy, (x,), steps, min_warmup_s=1.0) if timer.device_events else xla_copy_s
    del x
    n = 8192 if on_gpu else 2048
    a = jax.random.normal(key, (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    mm_s = timer.median_seconds(jnp.dot, (a, b), steps, min_warmup_s=1.0)
    return {
        "copy_GBps": 2 * nbytes / copy_s / 1e9,
        "copy_method": "cudaMemcpyAsync device to device" if timer.device_events else "XLA elementwise (x ^ c)",
        "xla_copy_GBps": 2 * nbytes / xla_copy_s / 1e9,
        "copy_bytes": nbytes,
        "matmul_TFLOPs": 2 * n**3 / mm_s / 1e12,
        "matmul_n": n,
    }


def make_inputs(cell: Cell, dtype, seed: int = 0):
    """Cache pages, 16 layers' queries and block tables, lengths; pool size as in the anchor."""
    lengths = cell.lengths()
    pages_per_seq = cell.pages_per_request(lengths)
    num_pages = cell.b * pages_per_seq
    key = jax.random.key(seed)
    k1, k2, k3 = jax.random.split(key, 3)
    k_cache = jnp.clip(jax.random.normal(k1, (num_pages, 64, cell.h_kv, 576), jnp.float32) / 10, -1, 1).astype(dtype)
    qs = jnp.clip(jax.random.normal(k2, (LAYERS, cell.b, cell.s_q, cell.h_q, 576), jnp.float32) / 10, -1, 1).astype(dtype)
    tables = jnp.stack([jax.random.permutation(k, num_pages).reshape(cell.b, pages_per_seq) for k in jax.random.split(k3, LAYERS)])
    return qs, k_cache, tables.astype(jnp.int32), jnp.asarray(lengths)


def flashmla_step(cell: Cell):
    rows = cell.s_q * cell.h_q // cell.h_kv

    def step(qs, k_cache, tables, lengths):
        meta, splits = jf.get_mla_metadata(lengths, rows, cell.h_kv)
        return [
            jf.flash_mla_with_kvcache(qs[i], k_cache, tables[i], lengths, 512, meta, splits, causal=cell.causal)[0]
            for i in range(LAYERS)
        ]

    return step


def metadata_step(cell: Cell):
    """LAYERS scheduler calls in one program, each on its own lengths (so that none is shared)."""
    rows = cell.s_q * cell.h_q // cell.h_kv
    return lambda lengths_list: [jf.get_mla_metadata(L, rows, cell.h_kv) for L in lengths_list]


def metadata_seconds(timer: Timer, cell: Cell, lengths: jax.Array, steps: int) -> float:
    """Device time of one scheduler call. A one-kernel program timed alone measures the host's
    dispatch of it (the GPU waits for each launch), so LAYERS calls run back to back behind a
    1 GiB device copy, during which the host has enqueued them all; the events bracket only the
    calls. Host clock, LAYERS calls per program, where there is no device timing."""
    lengths_list = [lengths + i for i in range(LAYERS)]  # varied so that no two calls are the same
    fn = metadata_step(cell)
    if not timer.device_events:
        return timer.median_seconds(fn, (lengths_list,), steps) / LAYERS
    busy = jnp.zeros((1 << 30) // 4, jnp.uint32)

    def program(busy, lengths_list):
        copied = _devtime.device_copy(busy)
        _, stop = _devtime.bracket(fn, (lengths_list,), copied)
        return copied, stop

    run = jax.jit(program).lower(busy, lengths_list).compile(timer.compiler_options)
    return timer.measure(run, (busy, lengths_list), steps) / LAYERS


def xla_step(cell: Cell):
    def step(qs, k_cache, tables, lengths):
        return [
            xla_einsum_decode(qs[i], k_cache, tables[i], lengths, softmax_scale=576**-0.5, causal=cell.causal)
            for i in range(LAYERS)
        ]

    return step


def _out_of_memory(err: Exception) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def run_cell(timer: Timer, cell: Cell, steps: int, with_xla: bool, ceilings: dict, anchor: dict | None) -> dict:
    inputs = make_inputs(cell, jnp.bfloat16)
    lengths = np.asarray(inputs[3])
    mean_len = float(lengths.mean())
    flops, nbytes = cell.flops_bytes(mean_len)
    compiled, text = timer.compile(flashmla_step(cell), inputs)
    path = "kernel" if _ffi.DECODE_TARGET in text else "pure JAX"
    # Wall-clock window of the timed steps (warm-up included), to match against a clock log
    # (benchmarks/clocks.py): SM clocks under power limits move between and within runs.
    timed_from = time.time()
    seconds = timer.measure(compiled, inputs, steps) / LAYERS
    timed_to = time.time()
    meta_us = metadata_seconds(timer, cell, inputs[3], steps) * 1e6
    row = {
        "name": cell.name, "b": cell.b, "s_q": cell.s_q, "h_q": cell.h_q, "h_kv": cell.h_kv, "s_k": cell.s_k,
        "varlen": cell.varlen, "causal": cell.causal, "mean_len": mean_len, "path": path,
        "us": seconds * 1e6, "GBps": nbytes / seconds / 1e9, "TFLOPs": flops / seconds / 1e12,
        "metadata_us": meta_us, "timed_from": timed_from, "timed_to": timed_to,
    }
    row["pct_copy"] = 100 * row["GBps"] / ceilings["copy_GBps"]
    row["pct_matmul"] = 100 * row["TFLOPs"] / ceilings["matmul_TFLOPs"]
    ref = (anchor or {}).get("rows", {}).get(cell.name)
    row["anchor_us"] = ref["us"] if ref else None
    row["speedup_vs_anchor"] = ref["us"] / row["us"] if ref else None
    row["xla_us"] = None
    if with_xla:
        try:
            row["xla_us"] = timer.median_seconds(xla_step(cell), inputs, max(3, steps // 3)) / LAYERS * 1e6
        except Exception as err:  # noqa: BLE001 - an OOM is a result here, anything else is not
            if not _out_of_memory(err):
                raise
            row["xla_us"] = "OOM"
    row["speedup_vs_xla"] = row["xla_us"] / row["us"] if isinstance(row["xla_us"], float) else None
    return row


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)


def print_table(rows: list[dict], ceilings: dict) -> None:
    print(
        f"\nceilings measured in this run: copy {ceilings['copy_GBps']:.0f} GB/s (read+write, {ceilings['copy_method']}; "
        f"XLA's copy {ceilings['xla_copy_GBps']:.0f}), bf16 matmul {ceilings['matmul_TFLOPs']:.1f} TFLOP/s (n={ceilings['matmul_n']})"
    )
    head = f"{'cell':<5} {'shape':<38} {'path':<8} {'us/layer':>9} {'GB/s':>7} {'TFLOP/s':>8} {'%copy':>6} {'%mm':>5} {'meta us':>8} {'anchor us':>9} {'x anchor':>8} {'XLA us':>9} {'x XLA':>6} {'SM MHz':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        cell = Cell(r["name"], r["b"], r["s_q"], r["h_q"], r["s_k"], r["varlen"], r["causal"], r["h_kv"])
        print(
            f"{r['name']:<5} {cell.label():<38} {r['path']:<8} {r['us']:>9.1f} {r['GBps']:>7.0f} {r['TFLOPs']:>8.1f} "
            f"{r['pct_copy']:>6.1f} {r['pct_matmul']:>5.1f} {r['metadata_us']:>8.1f} {_fmt(r['anchor_us'], '9.1f'):>9} "
            f"{_fmt(r['speedup_vs_anchor'], '8.2f'):>8} {_fmt(r['xla_us'], '9.1f'):>9} {_fmt(r['speedup_vs_xla'], '6.2f'):>6} "
            f"{_clock(r):>10}"
        )
    print("x anchor / x XLA: how many times faster than FlashMLA's H100 time / than the XLA einsum path (>1 = faster)")
    if any(r.get("clock_samples") for r in rows):
        print("SM MHz: median (minimum) of nvidia-smi's SM clock during the cell's steps; * = the power cap was active")


def _clock(row: dict) -> str:
    if not row.get("clock_samples"):
        return "-"
    cap = "*" if row["power_cap"] else ""
    return f"{row['sm_mhz_median']:.0f} ({row['sm_mhz_min']:.0f}){cap}"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4))
    ax.bar(x - 0.2, [r["us"] for r in rows], 0.4, label="jax_flashmla")
    anchors = [r["anchor_us"] or 0 for r in rows]
    if any(anchors):
        ax.bar(x + 0.2, anchors, 0.4, label="FlashMLA (H100 anchor)")
    ax.set_xticks(x, names)
    ax.set_ylabel("us per layer")
    ax.set_yscale("log")
    ax.set_title(f"MLA decode per-layer time on {rows[0].get('device', '')}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", help="comma-separated cell names (P1..P10, C1, C2) or one b=..,s_q=..,h_q=..,s_k=.. spec")
    parser.add_argument("--steps", type=int, help="timed steps per cell (default 30 on GPU, 5 on CPU)")
    parser.add_argument("--no-xla", action="store_true", help="skip the XLA einsum baseline")
    parser.add_argument("--host-timing", action="store_true", help="time by the host clock even where device events work")
    parser.add_argument("--anchor", help="path of the FlashMLA anchor JSON (default: ../shared/anchors)")
    parser.add_argument("--json", default=None, help="where to write the results (default benchmarks/results/last_run-<platform>.json)")
    parser.add_argument("--plot", action="store_true", help="also write a PNG of per-cell time against the anchor")
    parser.add_argument("--no-clocks", action="store_true", help="do not log SM clocks with nvidia-smi meanwhile")
    parser.add_argument(
        "--no-command-buffers",
        action="store_true",
        help="compile the programs with XLA's command buffers (CUDA graphs) off: each call is launched on the stream",
    )
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    steps = args.steps or (30 if on_gpu else 5)
    if args.cells and "=" in args.cells:
        cells = [parse_cell(args.cells)]
    elif args.cells:
        cells = [parse_cell(c.strip()) for c in args.cells.split(",")]
    else:
        cells = list((CELLS if on_gpu else CPU_CELLS).values())
    anchor = load_anchor(args.anchor)

    build = "CUDA extension" if jf.build_info()["cuda_extension"] else "pure JAX only"
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, build: {build}")
    timer = Timer(device_events=_devtime.available() and not args.host_timing, command_buffers=not args.no_command_buffers)
    print(f"timing: {timer.method}; XLA command buffers {'on (default)' if timer.command_buffers else 'off'}")
    # SM clocks fall under the power cap in the compute-bound cells, by a different amount in
    # each run: every row says what the clock was during its steps (benchmarks/clocks.py).
    clock_log = ClockLog.start() if on_gpu and not args.no_clocks else None
    try:
        ceilings = measure_ceilings(timer, on_gpu, steps)
        rows = []
        for cell in cells:
            print(f"running {cell.name}: {cell.label()} ...", flush=True)
            row = run_cell(timer, cell, steps, not args.no_xla, ceilings, anchor)
            row["device"] = device.device_kind
            rows.append(row)
        if clock_log is not None:
            for row in rows:
                row.update(clock_log.window(row["timed_from"], row["timed_to"]) or {"clock_samples": 0})
    finally:
        if clock_log is not None:
            clock_log.close()
    print_table(rows, ceilings)

    out = Path(args.json) if args.json else RESULTS / f"last_run-{device.platform}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.device_kind,
        "platform": device.platform,
        "jax": jax.__version__,
        "build": jf.build_info(),
        "protocol": " ".join(__doc__.strip().splitlines()[2:9]),
        "layers": LAYERS,
        "steps": steps,
        "timing": timer.method,
        "command_buffers": timer.command_buffers,
        "ceilings": ceilings,
        "anchor": anchor["path"] if anchor else None,
        "rows": rows,
    }
    out.write_text(json.dumps(record, indent=1, default=str))
    print(f"results: {out}")
    if args.plot:
        plot(rows, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
