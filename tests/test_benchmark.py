"""The benchmark runs (on CPU here: the pure-JAX path and host timing) and writes what the
README's performance section is built from. No timing is asserted: performance lives in
benchmarks/, this only keeps the script from rotting."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jax_flashmla import _devtime

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the GPU run is scripts/gpu_check.sh's bench phase")
@pytest.mark.parametrize("extra", [[], ["--no-command-buffers", "--no-xla"]], ids=["default", "no-command-buffers"])
def test_decode_bench_runs_on_cpu(tmp_path, extra):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "decode_bench.py"), "--cells", "C1", "--steps", "1", "--json", str(out)]
        + extra,
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["timing"].startswith("host clock")
    assert record["command_buffers"] == ("--no-command-buffers" not in extra)
    assert record["ceilings"]["copy_GBps"] > 0 and record["ceilings"]["matmul_TFLOPs"] > 0
    (row,) = record["rows"]
    assert row["name"] == "C1" and row["path"] == "pure JAX" and row["us"] > 0
    assert (row["xla_us"] is None) == ("--no-xla" in extra) and row["metadata_us"] > 0
    assert "us/layer" in proc.stdout


def test_device_timer_says_why_it_cannot_run():
    if _devtime.available():
        pytest.skip("a GPU is here: tests/test_gpu.py exercises the timer")
    with pytest.raises(RuntimeError, match="CUDA extension"):
        _devtime.mark(0)


def _bench_module(name):
    """A module of benchmarks/ (not a package), imported by name."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


@pytest.mark.parametrize("reasons, cap", [("0x0000000000000004", True), ("0x0000000000000000", False)])
def test_clock_log_window(reasons, cap):
    """The per-cell clock summary reads nvidia-smi's CSV lines (local time) inside a window only."""
    import datetime

    clocks = _bench_module("clocks")
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


def _ncu_csv(records):
    """ncu --csv text: a header, then one quoted line per (ID, kernel, metric, unit, value)."""
    columns = ("ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream",
               "Section Name", "Metric Name", "Metric Unit", "Metric Value")
    lines = ["==PROF== Connected to process 1", ",".join(f'"{c}"' for c in columns)]
    for launch, kernel, metric, unit, value in records:
        row = (launch, 1, "python3", "h", f"{kernel}(jax_flashmla::DecodeParams)", 1, 7,
               "Command line profiler metrics", metric, unit, value)
        lines.append(",".join(f'"{v}"' for v in row))
    return "\n".join(lines)


def test_kernel_times_traffic_per_layer():
    """--traffic keeps the last step only and divides each kernel's sums by its layers; units
    are converted (time to us, bytes to MB)."""
    kt = _bench_module("kernel_times")
    records = []
    launch = 0
    for step, scale in ((0, 100.0), (1, 1.0)):  # the first step's numbers must not count
        records += [(launch, "mla_metadata_kernel", "gpu__time_duration.sum", "nsecond", 8000 * scale)]
        launch += 1
        for layer in range(2):
            records += [
                (launch, "mla_decode_kernel", "gpu__time_duration.sum", "usecond", 400.0 * scale + layer),
                (launch, "mla_decode_kernel", "dram__bytes_read.sum", "Gbyte", 1.2 * scale),
                (launch, "mla_decode_kernel", "dram__bytes_write.sum", "Mbyte", "1,500" if scale == 1.0 else 9),
                (launch + 1, "mla_combine_kernel", "gpu__time_duration.sum", "usecond", 12.0 * scale),
                (launch + 1, "mla_combine_kernel", "dram__bytes_read.sum", "Kbyte", 512.0),
                (launch + 1, "mla_combine_kernel", "dram__bytes_write.sum", "byte", 2_000_000),
            ]
            launch += 2
    got = kt.last_step_per_layer(kt.parse_traffic_csv(_ncu_csv(records)))
    assert got["layers"] == 2
    dec, comb, meta = (got["per_layer"][k] for k in ("mla_decode_kernel", "mla_combine_kernel", "mla_metadata_kernel"))
    assert dec["gpu__time_duration.sum"] == pytest.approx(400.5)
    assert dec["dram__bytes_read.sum"] == pytest.approx(1200.0)
    assert dec["dram__bytes_write.sum"] == pytest.approx(1500.0)
    assert comb["dram__bytes_read.sum"] == pytest.approx(0.512) and comb["dram__bytes_write.sum"] == pytest.approx(2.0)
    assert meta["gpu__time_duration.sum"] == pytest.approx(8.0)


def test_kernel_times_parses_durations():
    kt = _bench_module("kernel_times")
    text = _ncu_csv([(0, "mla_decode_kernel", "gpu__time_duration.sum", "msecond", 1.25),
                     (1, "mla_combine_kernel", "gpu__time_duration.sum", "nsecond", "9,500"),
                     (2, "other_kernel", "gpu__time_duration.sum", "usecond", 3.0)])
    got = kt.parse_ncu_csv(text)
    assert got["mla_decode_kernel"] == [pytest.approx(1250.0)]
    assert got["mla_combine_kernel"] == [pytest.approx(9.5)]
    assert got["mla_metadata_kernel"] == []


def test_flashmla_same_card_says_what_is_missing(tmp_path):
    # FlashMLA's sources are third-party and never in this repository: without a tree the script
    # must stop with a message (exit 2) before it needs torch or a GPU.
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "flashmla_same_card.py"), "--src", str(tmp_path / "none")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no FlashMLA source tree" in proc.stderr


def test_flashmla_same_card_refuses_a_tree_that_is_not_the_listed_one(tmp_path):
    # A tree reassembled in a new checkout must be the one measured before: every file of
    # flashmla_sources.json is checked by sha256 before anything is built, and the first file that
    # differs (here: a stand-in binding, every other file missing) is named, with exit 2.
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "flash_api.cpp").write_text("// not FlashMLA's binding\n")
    script = str(REPO / "benchmarks" / "flashmla_same_card.py")
    proc = subprocess.run([sys.executable, script, "--src", str(tmp_path), "--prebuild"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "csrc/flash_api.cpp: differs from deepseek-ai/FlashMLA@287061e" in proc.stderr
    assert "csrc/kernels/splitkv_mla.cu: missing" in proc.stderr
    listed = subprocess.run([sys.executable, script, "--list-sources"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "csrc/kernels/splitkv_mla.cu" in listed.stdout


def test_sass_loops_reads_a_block_loop():
    # A made-up listing in nvdisasm's format: one outer loop around a block loop of two wgmma (one
    # with A in shared memory, one with A in registers). The block loop is the shortest range that
    # holds the wgmma; the operand bytes are A (smem only) + B of each.
    sys.path.insert(0, str(REPO / "benchmarks"))
    import sass_loops

    listing = "\n".join([
        ".text._Z6kernelv:",
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        ".L_x_1:",
        "        /*0010*/                   IMAD R2, R3, R4, R5 ;",
        ".L_x_2:",
        "        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;",
        "        /*0030*/                   HGMMA.64x256x16.F32.BF16 R24, R8, gdesc[UR8], R24 ;",
        "        /*0040*/                   FMUL R6, R6, R7 ;",
        "        /*0050*/               @P0 BRA `(.L_x_2) ;",
        "        /*0060*/               @P1 BRA `(.L_x_1) ;",
        "        /*0070*/                   EXIT ;",
    ])
    insts, labels = sass_loops.function(listing, "kernel")
    assert sass_loops.loops(insts, labels) == [(2, 5)]
    r = sass_loops.report(insts, 2, 5)
    assert r["hgmma"] == {"64x64x16 A=smem": 1, "64x256x16 A=regs": 1}
    assert r["smem_operand_bytes"] == (64 * 16 + 64 * 16) * 2 + 256 * 16 * 2
    assert r["families"]["softmax ALU"] == 1 and r["instructions"] == 4
