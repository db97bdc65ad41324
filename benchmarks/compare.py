"""Side by side: per-layer us of several decode_bench.py results (runs or kernel variants).

    python benchmarks/compare.py results/a.json results/b.json ...

One row per cell, one column per result (named after its file), then the FlashMLA anchor, and
each result's ratio to the anchor (>1 = faster than FlashMLA) and to the first result, and the
median SM clock during each cell's steps where the results recorded it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(path: Path) -> tuple[str, dict]:
    record = json.loads(path.read_text())
    name = path.stem.removeprefix("ab_")
    return name, record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path)
    args = parser.parse_args(argv)
    runs = [load(p) for p in args.results]
    cells: list[str] = []
    for _, record in runs:
        for row in record["rows"]:
            if row["name"] not in cells:
                cells.append(row["name"])
    by_run = [{row["name"]: row for row in record["rows"]} for _, record in runs]

    for i, (name, record) in enumerate(runs, 1):
        c = record.get("ceilings", {})
        print(f"[{i}] {name}: {record.get('timing', 'host clock')}; copy {c.get('copy_GBps', 0):.0f} GB/s, "
              f"matmul {c.get('matmul_TFLOPs', 0):.0f} TFLOP/s")
    idx = range(1, len(runs) + 1)
    head = f"{'cell':<5}" + "".join(f" {f'us[{i}]':>8}" for i in idx) + f" {'FlashMLA':>9}"
    head += "".join(f" {f'xFM[{i}]':>8}" for i in idx) + "".join(f" {f'[1]/[{i}]':>8}" for i in list(idx)[1:])
    with_clocks = any(row.get("clock_samples") for _, record in runs for row in record["rows"])
    if with_clocks:
        head += "".join(f" {f'MHz[{i}]':>8}" for i in idx)
    print(head)
    print("-" * len(head))

    def num(value, spec="8.2f"):
        return f" {value:>{spec}}" if value else f" {'-':>{spec.split('.')[0]}}"

    for cell in cells:
        rows = [runs_rows.get(cell) for runs_rows in by_run]
        us = [r["us"] if r else None for r in rows]
        anchor = next((r["anchor_us"] for r in rows if r and r.get("anchor_us")), None)
        line = f"{cell:<5}" + "".join(num(u, "8.1f") for u in us) + num(anchor, "9.1f")
        line += "".join(num(anchor / u if anchor and u else None) for u in us)
        line += "".join(num(us[0] / u if us[0] and u else None) for u in us[1:])
        if with_clocks:
            line += "".join(num(r.get("sm_mhz_median") if r else None, "8.0f") for r in rows)
        print(line)
    print("us = per-layer microseconds; xFM = FlashMLA's time / ours (>1 = faster); [1]/[i] = speedup over [1]")
    if with_clocks:
        print("MHz = median SM clock during the cell's steps (nvidia-smi; below 1980 = lowered, e.g. by the power cap)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
