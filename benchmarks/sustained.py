"""One cell's decode step run back to back for several seconds: the steady state under the power cap.

    python benchmarks/sustained.py --cells P6,P4 --seconds 6

``decode_bench.py`` times 30 steps (the protocol), about half a second on P5/P6, during which the
GPU's power controller is still lowering the SM clock. This runs the same jitted step (metadata +
16 layers) for ``--seconds`` and reports, over the second half (when ``nvidia-smi``'s one-second
power average covers only this cell): per-layer time (median of the device-timed steps), the median
SM clock and board power, and the energy per layer (power x time). A kernel change that saves
energy shows here as a higher clock at the same power, even where a 30-step window cannot tell.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax

from jax_flashmla import _devtime
from cells import parse_cell
from clocks import ClockLog
from decode_bench import LAYERS, Timer, flashmla_step, make_inputs


def run(cell_name: str, seconds: float, log: ClockLog) -> dict:
    cell = parse_cell(cell_name)
    timer = Timer(device_events=True)
    inputs = make_inputs(cell, jax.numpy.bfloat16)
    compiled, _ = timer.compile(flashmla_step(cell), inputs)
    jax.block_until_ready(compiled(*inputs))
    time.sleep(2.0)  # idle first, so every cell starts from the same (cool, full-clock) state
    start = time.time()
    steps = []  # (end time, per-layer us)
    while time.time() - start < seconds:
        jax.block_until_ready(compiled(*inputs))
        steps.append((time.time(), _devtime.elapsed_ms() * 1e3 / LAYERS))
    end = time.time()
    half = start + (end - start) / 2
    late = [us for t, us in steps if t >= half]
    samples = [s for s in log.samples() if half <= s[0] <= end]
    row = {
        "name": cell.name, "seconds": seconds, "steps": len(steps),
        "first_steps_us": statistics.median(us for _, us in steps[:30]),
        "steady_us": statistics.median(late),
    }
    if samples:
        row["sm_mhz"] = statistics.median(s[1] for s in samples)
        row["power_w"] = statistics.median(s[2] for s in samples)
        row["energy_mj_per_layer"] = row["power_w"] * row["steady_us"] * 1e-3
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default="P6")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not _devtime.available():
        print("sustained.py needs the CUDA extension and a GPU")
        return 1
    log = ClockLog.start()
    if log is None:
        print("sustained.py needs nvidia-smi")
        return 1
    try:
        rows = [run(name.strip(), args.seconds, log) for name in args.cells.split(",")]
    finally:
        log.close()
    print(f"{'cell':<5} {'steps':>6} {'first 30 us':>11} {'steady us':>10} {'SM MHz':>7} {'W':>6} {'mJ/layer':>9}")
    for r in rows:
        print(f"{r['name']:<5} {r['steps']:6d} {r['first_steps_us']:11.1f} {r['steady_us']:10.1f} "
              f"{r.get('sm_mhz', 0):7.0f} {r.get('power_w', 0):6.1f} {r.get('energy_mj_per_layer', 0):9.3f}")
    if args.json:
        args.json.write_text(json.dumps({"device": jax.devices()[0].device_kind, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
