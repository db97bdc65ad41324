"""The block loops of a kernel, read from its SASS: what each loop body issues once per pass.

Static evidence for the notes, for two kernels compiled here (no GPU): which wgmma (HGMMA) shapes a
loop issues, whether each one's A operand comes from registers or shared memory, the shared-memory
operand bytes those reads add up to, and the loop's instruction mix (softmax ALU, integer and
uniform-datapath work, barriers). Loops are the backward branches of the disassembly; the listed
ones are, for each wgmma, the shortest loop that holds it. The counts are static: code under a
branch inside the loop (a mask that only the last blocks take) counts as if every pass ran it.

Usage (sm_90a cubins; nvdisasm from the ``nvidia-cuda-nvdisasm`` wheel when it is not on PATH):

    nvcc -cubin -O3 -std=c++17 -DNDEBUG -gencode arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \\
        -Icpp -I<cutlass include> -o /tmp/ours.cubin cpp/decode/decode_launch.cu
    python3 benchmarks/sass_loops.py /tmp/ours.cubin mla_decode_kernelIN7cutlass10bfloat16 [--nvdisasm PATH]
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys

# Bytes of one element of a wgmma operand: bf16/fp16 inputs.
OPERAND_BYTES = 2
INST = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
LABEL = re.compile(r"^(\.L_x_\d+):")
HGMMA = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)\S*\s+(\S+),\s*(\S+)")
# Opcode families printed in the mix, in this order; the rest are summed as "other".
FAMILIES = {
    "tensor": ("HGMMA", "WARPGROUP"),
    "softmax ALU": ("FMUL", "FFMA", "FADD", "FMNMX", "MUFU", "FSEL", "F2FP", "FSETP"),
    "integer": ("IMAD", "IADD3", "LOP3", "ISETP", "SHF", "LEA", "VIADD", "SEL", "IABS", "PRMT"),
    "uniform": ("UIADD3", "UMOV", "ULOP3", "USHF", "UISETP", "ULDC", "UIMAD", "R2UR", "S2UR"),
    "shared memory": ("LDS", "STS", "STSM", "LDSM"),
    "sync": ("SYNCS", "BAR", "SHFL", "WARPSYNC", "ELECT", "NANOSLEEP"),
    "TMA": ("UTMALDG", "UTMASTG", "UBLKPF"),
}


def disassemble(cubin: str, nvdisasm: str) -> str:
    return subprocess.run([nvdisasm, "-c", cubin], check=True, capture_output=True, text=True).stdout


def function(sass: str, name_part: str) -> tuple[list[str], dict[str, int]]:
    """The instructions (text, predicate kept) and label positions of the first function whose
    mangled name contains ``name_part``."""
    insts: list[str] = []
    labels: dict[str, int] = {}
    inside = found = False
    for line in sass.splitlines():
        if line.startswith(".text."):
            inside = name_part in line and not found
            found = found or inside
            continue
        if not inside:
            continue
        if m := LABEL.match(line):
            labels[m.group(1)] = len(insts)
        elif m := INST.match(line):
            insts.append(m.group(2))
    if not found:
        raise SystemExit(f"no function whose name contains {name_part!r}")
    return insts, labels


def opcode(inst: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", inst).split()[0]


def loops(insts: list[str], labels: dict[str, int]) -> list[tuple[int, int]]:
    """[start, end] of the block loops: for each wgmma, the shortest backward-branch range that
    holds it (longer ranges that merely overlap it are the outer piece and request loops)."""
    ranges = []
    for i, inst in enumerate(insts):
        if opcode(inst).split(".")[0] == "BRA" and (m := re.search(r"(\.L_x_\d+)", inst)):
            start = labels.get(m.group(1))
            if start is not None and start <= i:
                ranges.append((start, i))
    innermost = set()
    for i, inst in enumerate(insts):
        if opcode(inst).startswith("HGMMA"):
            holding = [r for r in ranges if r[0] <= i <= r[1]]
            if holding:
                innermost.add(min(holding, key=lambda r: r[1] - r[0]))
    return sorted(innermost)


def report(insts: list[str], start: int, end: int) -> dict:
    body = insts[start:end + 1]
    ops = collections.Counter(opcode(t).split(".")[0] for t in body)
    shapes: collections.Counter = collections.Counter()
    smem_bytes = 0
    for t in body:
        if m := HGMMA.search(t):
            mm, nn, kk = (int(g) for g in m.groups()[:3])
            a_in_regs = m.group(5).startswith("R")  # "R..": A from registers; "gdesc[..]": shared memory
            shapes[f"{mm}x{nn}x{kk} A={'regs' if a_in_regs else 'smem'}"] += 1
            smem_bytes += (0 if a_in_regs else mm * kk * OPERAND_BYTES) + nn * kk * OPERAND_BYTES
    families = {name: sum(ops[o] for o in members) for name, members in FAMILIES.items()}
    families["other"] = len(body) - sum(families.values())
    return {"range": [start, end], "instructions": len(body), "hgmma": dict(shapes),
            "smem_operand_bytes": smem_bytes, "families": families, "opcodes": dict(ops.most_common())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cubin")
    parser.add_argument("function", help="a part of the kernel's mangled name")
    parser.add_argument("--nvdisasm", default=shutil.which("nvdisasm") or "/tmp/nvd/nvidia/cu13/bin/nvdisasm")
    parser.add_argument("--top", type=int, default=25, help="opcodes listed per loop")
    parser.add_argument("--max-len", type=int, default=1500,
                        help="skip loops longer than this (outer loops around a wgmma issued once per piece)")
    args = parser.parse_args(argv)
    insts, labels = function(disassemble(args.cubin, args.nvdisasm), args.function)
    print(f"{args.function}: {len(insts)} instructions, "
          f"{sum(opcode(t).startswith('HGMMA') for t in insts)} HGMMA in all")
    for start, end in loops(insts, labels):
        if end - start + 1 > args.max_len:
            continue
        r = report(insts, start, end)
        print(f"loop [{start}, {end}]: {r['instructions']} instructions a pass; shared-memory operand reads "
              f"{r['smem_operand_bytes'] / 1024:.0f} KiB a pass")
        print("  wgmma: " + ", ".join(f"{n} x {s}" for s, n in r["hgmma"].items()))
        print("  mix:   " + ", ".join(f"{k} {v}" for k, v in r["families"].items()))
        print("  ops:   " + " ".join(f"{k}:{v}" for k, v in list(r["opcodes"].items())[:args.top]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
