"""SM clock, power and clock-event reasons during each cell's timed steps.

The compute-bound cells (P4-P6) draw enough power that the driver lowers the SM clock below its
1980 MHz maximum within a cell's 0.2-0.5 s of steps (clock-event reason "SW power cap"), by a
varying amount from run to run. ``decode_bench.py`` records, per cell, what ``nvidia-smi`` reported
while its steps ran (``ClockLog``); offline, from a result JSON and a log taken meanwhile:

    python benchmarks/clocks.py results.json clocks.csv

``clocks.csv``: ``nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,
clocks_event_reasons.active --format=csv,noheader,nounits -lms 50``. nvidia-smi refreshes the clock
about every 100 ms and reports power averaged over about a second, so a 50 ms cell has one or two
samples and the power column lags; the clock-event reasons are what to read.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUERY = "timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,{reasons}"
POWER_CAP = 0x4  # nvidia-smi's clock-event bit "SW Power Cap"
THERMAL = 0x20 | 0x40 | 0x80  # SW / HW thermal slowdown, HW power brake


def parse(text: str) -> list[tuple[float, float, float, float, int]]:
    """(epoch seconds, SM MHz, power W, temperature C, reasons bitmask) per sample line."""
    samples = []
    for line in text.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) < 6:
            continue
        try:
            # nvidia-smi prints local time, as datetime.timestamp() assumes.
            epoch = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append((epoch, float(parts[1]), float(parts[3]), float(parts[4]), int(parts[5], 16)))
        except ValueError:
            continue
    return samples


def summarize(samples, start: float, end: float) -> dict | None:
    """What the samples between two epoch times say: the fields ``decode_bench.py`` stores per cell."""
    window = [s for s in samples if start <= s[0] <= end]
    if not window:
        return None
    reasons = 0
    for s in window:
        reasons |= s[4]
    return {
        "clock_samples": len(window),
        "sm_mhz_median": statistics.median(s[1] for s in window),
        "sm_mhz_min": min(s[1] for s in window),
        "power_cap": bool(reasons & POWER_CAP),
        "thermal": bool(reasons & THERMAL),
        "clock_reasons": f"{reasons:#x}",
    }


def steady_state(name: str, seconds: float, layer_us, log: "ClockLog") -> dict:
    """One cell's step back to back for ``seconds``, after two idle seconds (so that every cell
    starts from the same cool, full-clock state). ``layer_us()`` runs one step and returns its
    device-timed per-layer us. Over the second half, when nvidia-smi's one-second power average
    covers only this cell: median per-layer time, SM clock, board power and energy per layer."""
    time.sleep(2.0)
    start = time.time()
    steps = []  # (end time, per-layer us)
    while time.time() - start < seconds:
        us = layer_us()
        steps.append((time.time(), us))
    end = time.time()
    half = start + (end - start) / 2
    samples = [s for s in log.samples() if half <= s[0] <= end]
    row = {
        "name": name, "seconds": seconds, "steps": len(steps),
        "first_steps_us": statistics.median(us for _, us in steps[:30]),
        "steady_us": statistics.median(us for t, us in steps if t >= half),
    }
    if samples:
        row["sm_mhz"] = statistics.median(s[1] for s in samples)
        row["power_w"] = statistics.median(s[2] for s in samples)
        row["energy_mj_per_layer"] = row["power_w"] * row["steady_us"] * 1e-3
    return row


def print_steady_state(rows: list[dict], title: str = "") -> None:
    print(f"{'cell':<5} {'steps':>6} {'first 30 us':>11} {'steady us':>10} {'SM MHz':>7} {'W':>6} {'mJ/layer':>9}{title}")
    for r in rows:
        print(f"{r['name']:<5} {r['steps']:6d} {r['first_steps_us']:11.1f} {r['steady_us']:10.1f} "
              f"{r.get('sm_mhz', 0):7.0f} {r.get('power_w', 0):6.1f} {r.get('energy_mj_per_layer', 0):9.3f}")


class ClockLog:
    """``nvidia-smi`` sampling every 50 ms in the background, for as long as the object is open.

    ``ClockLog.start()`` returns None where there is no ``nvidia-smi`` (CPU machines)."""

    def __init__(self, proc: subprocess.Popen, path: Path):
        self._proc, self._path = proc, path

    @classmethod
    def start(cls) -> "ClockLog | None":
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return None
        reasons = "clocks_event_reasons.active"  # older drivers know only the throttle name
        if subprocess.run([smi, f"--query-gpu={reasons}", "--format=csv"], capture_output=True).returncode != 0:
            reasons = "clocks_throttle_reasons.active"
        fd, name = tempfile.mkstemp(prefix="clocks_", suffix=".csv")
        path = Path(name)
        with os.fdopen(fd, "w") as sink:  # nvidia-smi keeps its own copy of the descriptor
            proc = subprocess.Popen(
                [smi, f"--query-gpu={QUERY.format(reasons=reasons)}", "--format=csv,noheader,nounits", "-lms", "50"],
                stdout=sink, stderr=subprocess.DEVNULL,
            )
        return cls(proc, path)

    def samples(self) -> list[tuple[float, float, float, float, int]]:
        """Everything logged so far (``parse``)."""
        return parse(self._path.read_text())

    def window(self, start: float, end: float) -> dict | None:
        """``summarize`` of what was logged so far between ``start`` and ``end``."""
        return summarize(self.samples(), start, end)

    def close(self) -> None:
        self._proc.terminate()
        self._proc.wait()
        self._path.unlink(missing_ok=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("log", type=Path)
    args = parser.parse_args(argv)
    rows = json.loads(args.results.read_text())["rows"]
    samples = parse(args.log.read_text())
    print(f"{'cell':<5} {'us':>8} {'n':>3} {'SM MHz':>7} {'min':>5} reasons")
    for row in rows:
        got = summarize(samples, row["timed_from"], row["timed_to"]) if "timed_from" in row else None
        if got is None:
            print(f"{row['name']:<5} {row['us']:8.1f}   0 (no samples in the window)")
            continue
        print(f"{row['name']:<5} {row['us']:8.1f} {got['clock_samples']:3d} {got['sm_mhz_median']:7.0f} "
              f"{got['sm_mhz_min']:5.0f} {got['clock_reasons']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
