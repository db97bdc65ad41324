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
import sys
from pathlib import Path

import jax

from jax_flashmla import _devtime
from cells import LAYERS, parse_cell
from clocks import ClockLog, print_steady_state, steady_state
from decode_bench import Timer, flashmla_step, make_inputs


def run(cell_name: str, seconds: float, log: ClockLog) -> dict:
    cell = parse_cell(cell_name)
    timer = Timer(device_events=True)
    inputs = make_inputs(cell, jax.numpy.bfloat16)
    compiled, _ = timer.compile(flashmla_step(cell), inputs)
    jax.block_until_ready(compiled(*inputs))

    def layer_us() -> float:
        jax.block_until_ready(compiled(*inputs))
        return _devtime.elapsed_ms() * 1e3 / LAYERS

    return steady_state(cell.name, seconds, layer_us, log)


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
    print_steady_state(rows)
    if args.json:
        args.json.write_text(json.dumps({"device": jax.devices()[0].device_kind, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
