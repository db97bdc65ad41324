"""Benchmark cells (contract section 8) and the FlashMLA anchor measured on an H100."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np

# The anchor file lives in the shared folder beside the project; a copy can be given instead.
ANCHOR_CANDIDATES = (
    Path(__file__).resolve().parents[1].parent / "shared" / "anchors" / "flashmla-h100.json",
    Path(__file__).resolve().parents[1] / ".device" / "anchors" / "flashmla-h100.json",
)

# The anchor's page pool: tokens per page, and the multiple of tokens every request's pages round to.
PAGE_TOKENS = 64
POOL_ROUND_TOKENS = 256


@dataclasses.dataclass(frozen=True)
class Cell:
    name: str
    b: int
    s_q: int
    h_q: int
    s_k: int
    varlen: bool = False
    causal: bool = False
    h_kv: int = 1

    def lengths(self) -> np.ndarray:
        """Fixed s_k, or per request in order ``max(int(normalvariate(s_k, s_k/2)), s_q)``, seed 0."""
        if not self.varlen:
            return np.full(self.b, self.s_k, np.int32)
        g = random.Random(0)
        return np.array([max(int(g.normalvariate(self.s_k, self.s_k / 2)), self.s_q) for _ in range(self.b)], np.int32)

    def pages_per_request(self, lengths: np.ndarray) -> int:
        """Block-table width of the anchor's page pool: every request gets the longest length,
        rounded up to 256 tokens, in pages; the pool holds ``b`` times that many pages."""
        return -(-max(int(lengths.max()), 1) // POOL_ROUND_TOKENS) * POOL_ROUND_TOKENS // PAGE_TOKENS

    def flops_bytes(self, mean_len: float) -> tuple[float, float]:
        """The contract's formulas (causal masking not subtracted)."""
        rows = self.b * self.s_q * self.h_q
        flops = 2 * rows * mean_len * (576 + 512)
        nbytes = 2 * self.b * (self.s_q * self.h_q * 576 + mean_len * 576 + self.s_q * self.h_q * 512)
        return flops, nbytes

    def label(self) -> str:
        flags = "".join([" varlen" if self.varlen else "", " causal" if self.causal else ""])
        return f"b={self.b} s_q={self.s_q} h_q={self.h_q} s_k={self.s_k}{flags}"


# Layers of one timed decode step (the protocol: metadata once + one decode call per layer).
LAYERS = 16


# P1-P10, as in the anchor file (kept here so the benchmark runs without it).
CELLS = {
    c.name: c
    for c in [
        Cell("P1", 128, 1, 16, 4096),
        Cell("P2", 128, 1, 32, 8192, varlen=True),
        Cell("P3", 128, 1, 64, 8192, varlen=True),
        Cell("P4", 128, 1, 128, 4096),
        Cell("P5", 128, 1, 128, 16384, varlen=True),
        Cell("P6", 128, 2, 128, 8192, varlen=True, causal=True),
        Cell("P7", 64, 2, 16, 8192, varlen=True, causal=True),
        Cell("P8", 1, 1, 128, 65536),
        Cell("P9", 8, 1, 16, 32768),
        Cell("P10", 32, 4, 32, 4096, varlen=True, causal=True),
    ]
}
# Small enough for a CPU: the default where no GPU is present.
CPU_CELLS = {
    "C1": Cell("C1", 4, 1, 16, 1024, varlen=True),
    "C2": Cell("C2", 2, 2, 32, 2048, varlen=True, causal=True),
}


def parse_cell(text: str) -> Cell:
    """A named cell (P1, C1) or ``b=..,s_q=..,h_q=..,s_k=..[,varlen][,causal][,h_kv=..]``."""
    if text in CELLS:
        return CELLS[text]
    if text in CPU_CELLS:
        return CPU_CELLS[text]
    fields: dict = {"name": text}
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key in ("varlen", "causal"):
            fields[key] = value.strip().lower() not in ("0", "false", "no") if value else True
        elif key in ("b", "s_q", "h_q", "s_k", "h_kv"):
            fields[key] = int(value)
        else:
            raise ValueError(f"unknown cell field {key!r} in {text!r}")
    return Cell(**fields)


def load_anchor(path: str | None = None) -> dict | None:
    """The FlashMLA H100 anchor (rows by cell name, plus its ceilings), or None if absent."""
    candidates = [Path(path)] if path else list(ANCHOR_CANDIDATES)
    for candidate in candidates:
        if candidate.is_file():
            data = json.loads(candidate.read_text())
            return {"rows": {r["name"]: r for r in data["rows"]}, "ceilings": data.get("ceilings_same_run", {}), "path": str(candidate)}
    return None
