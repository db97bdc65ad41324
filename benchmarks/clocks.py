"""SM clock, power and clock-event reasons during each cell's timed steps.

    python benchmarks/clocks.py results.json clocks.csv

``results.json`` is a ``decode_bench.py`` result (each row carries the wall-clock window of its
timed steps); ``clocks.csv`` a log of
``nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active
--format=csv,noheader,nounits -lms 50`` taken meanwhile (``scripts/ab_bench.sh`` writes one per variant
with AB_CLOCKS=1). Per cell: samples, median and minimum SM MHz, median power in W, the highest
temperature, and the OR of the active clock-event reasons (0x4 power cap, 0x20/0x40 thermal
slowdown, 0x1 idle: nvidia-smi's bit values).

The per-block cycle counts in benchmarks/NOTES.md assume one clock for every cell; this says
whether a cell ran at a lower one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path


def read_log(path: Path) -> list[tuple[float, float, float, float, int]]:
    """(epoch seconds, SM MHz, power W, temperature C, reasons) per sample."""
    samples = []
    for line in path.read_text().splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) < 6:
            continue
        try:
            stamp = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f")
            # nvidia-smi prints local time; the benchmark's windows are epoch seconds.
            epoch = stamp.timestamp()
            samples.append((epoch, float(parts[1]), float(parts[3]), float(parts[4]), int(parts[5], 16)))
        except ValueError:
            continue
    return samples


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("log", type=Path)
    args = parser.parse_args(argv)
    rows = json.loads(args.results.read_text())["rows"]
    samples = read_log(args.log)
    print(f"{'cell':<5} {'us':>8} {'n':>4} {'SM MHz':>7} {'min':>5} {'W':>6} {'max C':>5} reasons")
    for row in rows:
        if "timed_from" not in row:
            continue
        window = [s for s in samples if row["timed_from"] <= s[0] <= row["timed_to"]]
        if not window:
            print(f"{row['name']:<5} {row['us']:8.1f}    0 (no samples in the window)")
            continue
        mhz = [s[1] for s in window]
        reasons = 0
        for s in window:
            reasons |= s[4]
        print(f"{row['name']:<5} {row['us']:8.1f} {len(window):4d} {statistics.median(mhz):7.0f} {min(mhz):5.0f} "
              f"{statistics.median(s[2] for s in window):6.1f} {max(s[3] for s in window):5.0f} {reasons:#x}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
