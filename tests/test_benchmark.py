"""The benchmark runs (on CPU here: the pure-JAX path and host timing) and writes what the
README's performance section is built from. No timing is asserted: performance lives in
benchmarks/, this only keeps the script from rotting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jax_flashmla import _devtime

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the GPU run is scripts/gpu_check.sh's bench phase")
def test_decode_bench_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "decode_bench.py"), "--cells", "C1", "--steps", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["timing"].startswith("host clock")
    assert record["ceilings"]["copy_GBps"] > 0 and record["ceilings"]["matmul_TFLOPs"] > 0
    (row,) = record["rows"]
    assert row["name"] == "C1" and row["path"] == "pure JAX" and row["us"] > 0
    assert row["xla_us"] is not None and row["metadata_us"] > 0
    assert "us/layer" in proc.stdout


def test_device_timer_says_why_it_cannot_run():
    if _devtime.available():
        pytest.skip("a GPU is here: tests/test_gpu.py exercises the timer")
    with pytest.raises(RuntimeError, match="CUDA extension"):
        _devtime.mark(0)


def _clocks():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import clocks
    finally:
        sys.path.pop(0)
    return clocks


@pytest.mark.parametrize("reasons, cap", [("0x0000000000000004", True), ("0x0000000000000000", False)])
def test_clock_log_window(reasons, cap):
    """The per-cell clock summary reads nvidia-smi's CSV lines (local time) inside a window only."""
    import datetime

    clocks = _clocks()
    t0 = 1_800_000_000.0
    stamp = lambda t: datetime.datetime.fromtimestamp(t).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]  # noqa: E731
    text = "\n".join(
        [f"{stamp(t0 - 1.0)}, 1980, 2619, 100.0, 40, 0x0000000000000001"]
        + [f"{stamp(t0 + 0.05 * i)}, {mhz}, 2619, 650.5, 55, {reasons}" for i, mhz in enumerate([1980, 1755, 1650])]
        + [f"{stamp(t0 + 5.0)}, 345, 2619, 70.0, 40, 0x0000000000000001", "not a sample line"]
    )
    got = clocks.summarize(clocks.parse(text), t0 - 0.01, t0 + 1.0)
    assert got["clock_samples"] == 3 and got["sm_mhz_median"] == 1755 and got["sm_mhz_min"] == 1650
    assert got["power_cap"] is cap and got["thermal"] is False
    assert clocks.summarize(clocks.parse(text), t0 + 2.0, t0 + 3.0) is None
