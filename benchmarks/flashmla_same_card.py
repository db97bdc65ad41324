"""FlashMLA itself, timed by the anchor's protocol on the GPU this benchmark runs on.

The bar of issue 5 is ``flashmla-h100.json``: FlashMLA measured on *an* H100. The compute-bound
cells run under the 700 W power cap, where one card's time differs from another's by a few percent
(benchmarks/NOTES.md, seventeenth and thirty-sixth sessions), so a ratio against a number from
another card can say more about the cards than about the kernels. This script times FlashMLA on
the card that ``decode_bench.py`` runs on, so that both ratios can be read: against the anchor
file, and against FlashMLA on the same card in the same call.

FlashMLA is third-party code and is never part of this repository. The script builds its torch
extension just in time (``torch.utils.cpp_extension.load``) from a source tree given by ``--src``
(default ``.device/flashmla_src``, git-ignored: ``csrc/flash_api.cpp`` and ``csrc/kernels/*.cu``),
against the CUTLASS headers of ``--cutlass`` (default: the ``nvidia-cutlass`` wheel's). Give it
CUTLASS 3.8 headers: with 4.2's, nvcc 13.0 spills 438 bytes in FlashMLA's decode kernel and that
build runs 8-76% slower than the anchor (benchmarks/NOTES.md, thirty-seventh session).
``--prebuild`` compiles the CUDA files to ``<src>/prebuilt/*.o`` with nvcc alone (no torch), so
that the GPU machine compiles only the binding. Where the tree is missing the script says so and
exits 2.

The tree is checked against ``benchmarks/flashmla_sources.json`` (each file's repository, path and
commit in the public code index, its length and sha256) before anything is built or timed: a file
that differs makes the script exit 2 naming it, so that a tree reassembled in a new checkout is
the one measured before (``--unverified-src`` builds another tree anyway, and the JSON says so).
``--list-sources`` prints where each file comes from.

Protocol (the anchor file's ``protocol``): per cell, one decode step = scheduler metadata once + 16
back-to-back decode calls, each on its own q and its own block table (16 random permutations of
one page pool); CUDA events around the step; median of ``--steps`` steps after 2 warm-up steps (as
``decode_bench.py`` does), divided by 16. d = 576, dv = 512, h_kv = 1, page 64, bf16; q and the
cache are ``clamp(randn / 10, -1, 1)``; lengths from ``cells.Cell.lengths`` (the anchor's rule);
pool of ``b * ceil(max_len / 256) * 256 / 64`` pages. Before any time is reported, FlashMLA's
first request is checked against a float32 reference (cosine difference), against a broken build.

Run on the device machine: ``python3 benchmarks/flashmla_same_card.py --out flashmla.json``
(needs torch with CUDA, nvcc and ninja), or ``scripts/flashmla_same_card.sh`` for both benchmarks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cells import CELLS, LAYERS, PAGE_TOKENS, Cell, load_anchor  # noqa: E402
from clocks import ClockLog, print_steady_state, steady_state  # noqa: E402

HEAD_DIM = 576
HEAD_DIM_V = 512
REPO = Path(__file__).resolve().parents[1]
# The contract's cosine-difference bound (design section 7) for FlashMLA's first request against a
# float32 reference: the outputs are averages of thousands of small values (~1e-3), where an
# absolute bound would pass garbage.
CHECK_COS_DIFF = 5e-6


SOURCES = Path(__file__).resolve().parent / "flashmla_sources.json"


def check_sources(src: Path) -> list[str]:
    """What differs between the tree at ``src`` and ``flashmla_sources.json``: one line per missing
    or different file (empty when every listed file is there with its sha256)."""
    problems = []
    for f in json.loads(SOURCES.read_text())["files"]:
        path = src / f["file"]
        if not path.is_file():
            problems.append(f"{f['file']}: missing ({f['repo']}@{f['commit'][:7]}:{f['path']}, {f['chars']} chars)")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != f["sha256"]:
            problems.append(f"{f['file']}: differs from {f['repo']}@{f['commit'][:7]}:{f['path']} "
                            f"({len(path.read_bytes().decode(errors='replace'))} chars here, {f['chars']} listed)")
    return problems


def list_sources() -> None:
    doc = json.loads(SOURCES.read_text())
    for f in doc["files"]:
        print(f"{f['file']:<34} {f['repo']:<22} {f['commit']} {f['path']:<32} {f['chars']:>6} {f['sha256'][:16]}")
    print(*doc["notes"], sep="\n")


def default_cutlass() -> Path | None:
    try:
        import cutlass_library  # noqa: F401 - the nvidia-cutlass wheel ships the C++ headers
    except ImportError:
        return None
    path = Path(sys.modules["cutlass_library"].__file__).parent / "source" / "include"
    return path if path.is_dir() else None


# FlashMLA's own setup.py flags (its April-2025 build), bf16 only.
NVCC_FLAGS = [
    "-O3", "-std=c++17", "-DNDEBUG", "-D_USE_MATH_DEFINES", "-Wno-deprecated-declarations", "-DFLASH_MLA_DISABLE_FP16",
    "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
    "--ptxas-options=-v,--register-usage-level=10",
]
CXX_FLAGS = ["-O3", "-std=c++17", "-DNDEBUG", "-Wno-deprecated-declarations", "-DFLASH_MLA_DISABLE_FP16"]
SM90A = ["-gencode", "arch=compute_90a,code=sm_90a"]


def prebuild(src: Path, cutlass: Path) -> int:
    """The CUDA files compiled to position-independent objects in ``src/prebuilt`` (no torch needed:
    nvcc only), so that the device machine compiles only the torch binding."""
    csrc = src / "csrc"
    out = src / "prebuilt"
    out.mkdir(exist_ok=True)
    # Which headers built the objects: the decode kernel's registers depend on them (with CUTLASS
    # 4.2, nvcc 13.0 spills 438 bytes in it; with 3.8, none: benchmarks/NOTES.md, s37).
    (out / "BUILT_WITH.txt").write_text(f"CUTLASS include: {cutlass}\nnvcc flags: {' '.join(NVCC_FLAGS + SM90A)}\n")
    for cu in sorted((csrc / "kernels").glob("*.cu")):
        cmd = ["nvcc", *NVCC_FLAGS, *SM90A, "-Xcompiler", "-fPIC", f"-I{cutlass}", f"-I{csrc}", f"-I{csrc / 'kernels'}",
               "-c", str(cu), "-o", str(out / (cu.stem + ".o"))]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        ptxas = [l for l in proc.stderr.splitlines() if "registers" in l or "spill" in l]
        print(f"{cu.name}: rc={proc.returncode} in {time.perf_counter() - start:.0f} s", *ptxas, sep="\n  ", flush=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
    return 0


def build(src: Path, cutlass: Path, build_dir: Path, verbose: bool):
    """FlashMLA's torch extension for sm_90a: the binding compiled here, linked with the objects
    of ``prebuild`` where they exist, else with its CUDA files compiled here too."""
    from torch.utils.cpp_extension import CUDA_HOME, load

    csrc = src / "csrc"
    objects = sorted((src / "prebuilt").glob("*.o"))
    cuda_sources = [] if objects else sorted((csrc / "kernels").glob("*.cu"))
    build_dir.mkdir(parents=True, exist_ok=True)
    # torch adds the -gencode flags from this list; wgmma and setmaxnreg need the "a" target.
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0a"
    # CUDA 13 keeps libcu++ (cuda/std/...), which CUTLASS includes, under include/cccl; nvcc adds
    # it by itself, the host compiler of the binding does not.
    cccl = [str(Path(CUDA_HOME) / "include" / "cccl")] if CUDA_HOME and (Path(CUDA_HOME) / "include" / "cccl").is_dir() else []
    start = time.perf_counter()
    ext = load(
        name="flash_mla_baseline", sources=[str(s) for s in [csrc / "flash_api.cpp", *cuda_sources]],
        extra_cflags=CXX_FLAGS, extra_cuda_cflags=NVCC_FLAGS, extra_ldflags=[str(o) for o in objects],
        extra_include_paths=[str(cutlass), str(csrc), str(csrc / "kernels"), *cccl],
        build_directory=str(build_dir), with_cuda=True, verbose=verbose,
    )
    print(f"built FlashMLA's extension in {time.perf_counter() - start:.0f} s "
          f"({'prebuilt CUDA objects: ' + ', '.join(o.name for o in objects) if objects else 'CUDA files compiled here'})", flush=True)
    return ext


def make_inputs(cell: Cell, torch, dev):
    lengths = cell.lengths()
    pages_per_seq = cell.pages_per_request(lengths)
    num_pages = cell.b * pages_per_seq
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape):
        return (torch.randn(*shape, generator=gen, device=dev) / 10).clamp_(-1, 1).to(torch.bfloat16)

    k_cache = randn(num_pages, PAGE_TOKENS, cell.h_kv, HEAD_DIM)
    qs = [randn(cell.b, cell.s_q, cell.h_q, HEAD_DIM) for _ in range(LAYERS)]
    tables = [
        torch.randperm(num_pages, generator=gen, device=dev).view(cell.b, pages_per_seq).to(torch.int32)
        for _ in range(LAYERS)
    ]
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=dev)
    return qs, k_cache, tables, seqlens, float(lengths.mean())


def reference_first_request(cell: Cell, q, k_cache, table, seqlens, torch):
    """Attention of request 0 in float32 (its causal mask: query token t sees L - s_q + t + 1 keys)."""
    length = int(seqlens[0])
    pages = table[0, : math.ceil(length / PAGE_TOKENS)].long()
    kv = k_cache[pages].reshape(-1, cell.h_kv, HEAD_DIM)[:length, 0].float()  # [L, 576], h_kv = 1
    qf = q[0].float()  # [s_q, h_q, 576]
    scores = torch.einsum("thd,ld->thl", qf, kv) * HEAD_DIM**-0.5
    if cell.causal:
        visible = torch.arange(length, device=kv.device)[None, :] < (length - cell.s_q + 1 + torch.arange(cell.s_q, device=kv.device))[:, None]
        scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    return torch.einsum("thl,lv->thv", scores.softmax(-1), kv[:, :HEAD_DIM_V])


def make_step(ext, cell: Cell, qs, k_cache, tables, seqlens):
    """One decode step of the protocol: the metadata once, then the 16 layers' calls."""
    rows = cell.s_q * cell.h_q // cell.h_kv
    scale = HEAD_DIM**-0.5

    def step():
        meta, splits = ext.get_mla_metadata(seqlens, rows, cell.h_kv)
        return [
            ext.fwd_kvcache_mla(qs[i], k_cache, HEAD_DIM_V, seqlens, tables[i], scale, cell.causal, meta, splits)[0]
            for i in range(LAYERS)
        ]

    return step


def timed_step(step, torch) -> float:
    """Seconds of one step between two CUDA events."""
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    step()
    e1.record()
    e1.synchronize()
    return e0.elapsed_time(e1) / 1e3


def run_cell(ext, cell: Cell, steps: int, torch, dev) -> dict:
    qs, k_cache, tables, seqlens, mean_len = make_inputs(cell, torch, dev)
    step = make_step(ext, cell, qs, k_cache, tables, seqlens)
    out = step()[0]
    ref = reference_first_request(cell, qs[0], k_cache, tables[0], seqlens, torch)
    x, y = out[0].float().flatten(), ref.flatten()
    err = (1 - 2 * torch.dot(x, y) / (torch.dot(x, x) + torch.dot(y, y))).item()
    if not err <= CHECK_COS_DIFF:
        raise SystemExit(f"{cell.name}: FlashMLA's first output is {err:.3g} in cosine difference from the float32 reference (> {CHECK_COS_DIFF})")

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    timed_from = time.time()
    times = [timed_step(step, torch) for _ in range(steps)]
    timed_to = time.time()
    seconds = statistics.median(times) / LAYERS
    flops, nbytes = cell.flops_bytes(mean_len)
    del qs, k_cache, tables
    torch.cuda.empty_cache()
    return {
        "name": cell.name, "mean_len": mean_len, "us": seconds * 1e6, "GBps": nbytes / seconds / 1e9,
        "TFLOPs": flops / seconds / 1e12, "check_cos_diff": err, "timed_from": timed_from, "timed_to": timed_to,
    }


def sustain(ext, cell: Cell, seconds: float, log: ClockLog, torch, dev) -> dict:
    """``benchmarks/sustained.py``'s measurement (``clocks.steady_state``) for FlashMLA."""
    qs, k_cache, tables, seqlens, _ = make_inputs(cell, torch, dev)
    step = make_step(ext, cell, qs, k_cache, tables, seqlens)
    step()
    torch.cuda.synchronize()
    row = steady_state(cell.name, seconds, lambda: timed_step(step, torch) * 1e6 / LAYERS, log)
    del qs, k_cache, tables
    torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cells", nargs="*", help="cell names (default: P1-P10)")
    parser.add_argument("--src", type=Path, default=REPO / ".device" / "flashmla_src", help="FlashMLA source tree")
    parser.add_argument("--cutlass", type=Path, default=None, help="CUTLASS include directory")
    parser.add_argument("--build-dir", type=Path, default=REPO / ".device" / "flashmla_build")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--ours", type=Path, default=None, help="a decode_bench.py JSON of the same card, for the same-card ratio")
    parser.add_argument("--out", type=Path, default=None, help="JSON to write")
    parser.add_argument("--sustain", type=float, default=0.0, help="instead: each cell back to back for this many seconds (sustained.py's measurement)")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--prebuild", action="store_true", help="only compile the CUDA files to objects (nvcc, no torch)")
    parser.add_argument("--unverified-src", action="store_true", help="build a tree that differs from flashmla_sources.json")
    parser.add_argument("--list-sources", action="store_true", help="print where each file of the tree comes from, and exit")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.list_sources:
        list_sources()
        return 0
    unknown = [c for c in args.cells if c not in CELLS]
    if unknown:
        parser.error(f"unknown cells {unknown}: choose among {', '.join(CELLS)}")

    if not (args.src / "csrc" / "flash_api.cpp").is_file():
        print(f"no FlashMLA source tree at {args.src} (csrc/flash_api.cpp): nothing to measure", file=sys.stderr)
        return 2
    problems = check_sources(args.src)
    if problems:
        print(f"the FlashMLA tree at {args.src} is not the listed one ({SOURCES.name}):", *problems, sep="\n  ", file=sys.stderr)
        if not args.unverified_src:
            print("reassemble it (--list-sources), or pass --unverified-src to build it anyway", file=sys.stderr)
            return 2
    cutlass = args.cutlass or default_cutlass()
    if cutlass is None:
        print("no CUTLASS headers: pass --cutlass or install the nvidia-cutlass wheel", file=sys.stderr)
        return 2
    if args.prebuild:
        return prebuild(args.src, cutlass)
    import torch

    ext = build(args.src, cutlass, args.build_dir, args.verbose)
    if args.build_only:
        return 0
    dev = torch.device("cuda")
    anchor = load_anchor() or {}
    ours = {}
    if args.ours:
        ours = {r["name"]: r for r in json.loads(args.ours.read_text())["rows"]}
    clock_log = ClockLog.start()
    rows = []
    if args.sustain:
        if clock_log is None:
            print("--sustain needs nvidia-smi", file=sys.stderr)
            return 1
        try:
            rows = [sustain(ext, CELLS[name], args.sustain, clock_log, torch, dev) for name in args.cells or ["P6"]]
        finally:
            clock_log.close()
        print_steady_state(rows, "  (FlashMLA)")
        if args.out:
            args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "sustained": True, "src_verified": not problems,
                                           "src_differences": problems, "rows": rows}, indent=1))
        return 0
    try:
        for name in args.cells or list(CELLS):
            row = run_cell(ext, CELLS[name], args.steps, torch, dev)
            if clock_log is not None:
                time.sleep(0.2)  # nvidia-smi's last samples of the window
                row.update(clock_log.window(row["timed_from"], row["timed_to"]) or {"clock_samples": 0})
            ref = anchor.get("rows", {}).get(name)
            row["anchor_us"] = ref["us"] if ref else None
            row["here_over_anchor"] = row["us"] / ref["us"] if ref else None
            mine = ours.get(name)
            row["ours_us"] = mine["us"] if mine else None
            row["speedup_same_card"] = row["us"] / mine["us"] if mine else None
            rows.append(row)
            mhz = f"{row['sm_mhz_median']:.0f}{'*' if row.get('power_cap') else ''}" if row.get("clock_samples") else "-"
            print(
                f"{name:>4} FlashMLA here {row['us']:8.1f} us  anchor {row['anchor_us'] or float('nan'):8.1f}  "
                f"here/anchor {row['here_over_anchor'] or float('nan'):5.3f}  ours {row['ours_us'] or float('nan'):8.1f}  "
                f"ours x FlashMLA same card {row['speedup_same_card'] or float('nan'):5.3f}  SM MHz {mhz:>6}  "
                f"check cos diff {row['check_cos_diff']:.1e}",
                flush=True,
            )
    finally:
        if clock_log is not None:
            clock_log.close()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "what": "FlashMLA (third-party, built from --src) timed by the anchor's protocol on this card",
            "src_sources": (args.src / "SOURCES.txt").read_text() if (args.src / "SOURCES.txt").is_file() else None,
            "src_verified": not problems, "src_differences": problems,
            "prebuilt_with": (args.src / "prebuilt" / "BUILT_WITH.txt").read_text() if (args.src / "prebuilt" / "BUILT_WITH.txt").is_file() else None,
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": args.steps,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows,
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
