#!/usr/bin/env bash
# Run ON THE DEVICE MACHINE, from the repository root, with .whl and .device carried and a
# FlashMLA source tree in .device/flashmla_src (third-party, git-ignored; see
# benchmarks/flashmla_same_card.py): our decode and FlashMLA itself, each timed by its own
# benchmark on this card, alternated ours / FlashMLA / ours / FlashMLA so that a drift of the
# card's clock between passes shows as a difference between the two passes of one side.
#   ROUNDS (default 2), STEPS (default 30), CELLS (default: all ten); SUSTAIN_CELLS (e.g. "P6 P4"):
#   then each of those cells back to back for SUSTAIN_S seconds (default 6), ours then FlashMLA
#   (benchmarks/sustained.py's steady state: time, SM clock, board power, energy per layer).
# Back from the device: same_card_all.json (every result, by file name) and same_card_logs.tgz.
set -uo pipefail
OUT=${OUT:-/tmp/jax_flashmla_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source scripts/device_env.sh
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"
cells=${CELLS:+--cells $CELLS}
fcells=${CELLS:+${CELLS//,/ }}

echo "== build (FlashMLA's torch extension beside ours)"
start=$(date +%s)
MAX_JOBS=${MAX_JOBS:-8} python3 benchmarks/flashmla_same_card.py --build-only >"$OUT/flashmla_build.log" 2>&1 & fm_pid=$!
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  JAX_FLASHMLA_CUDA=ON python3 -m pip install -v --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1
  echo "ours: build rc=$?"
fi
wait $fm_pid; fm_rc=$?
echo "FlashMLA: build rc=$fm_rc in $(( $(date +%s) - start ))s"; grep -E "error|registers|spill|built" "$OUT/flashmla_build.log" | head -20
[ $fm_rc = 0 ] || { tail -40 "$OUT/flashmla_build.log"; exit 1; }

for r in $(seq 1 "${ROUNDS:-2}"); do
  echo "== round $r: ours"
  timeout 300 python3 benchmarks/decode_bench.py $cells --steps "${STEPS:-30}" --no-xla --json "$OUT/ours_$r.json" >"$OUT/ours_$r.log" 2>&1
  echo "rc=$?"; grep -E "^ *P[0-9]+ " "$OUT/ours_$r.log" | cut -c1-60
  echo "== round $r: FlashMLA"
  timeout 300 python3 benchmarks/flashmla_same_card.py $fcells --steps "${STEPS:-30}" --ours "$OUT/ours_$r.json" --out "$OUT/flashmla_$r.json" 2>&1 | tee "$OUT/flashmla_$r.log" | grep -vE "^(Emitting|Building|Loading|ninja)"
done

for c in ${SUSTAIN_CELLS:-}; do
  echo "== sustained $c (${SUSTAIN_S:-6} s each): ours, then FlashMLA"
  timeout 120 python3 benchmarks/sustained.py --cells "$c" --seconds "${SUSTAIN_S:-6}" --json "$OUT/sustained_ours_$c.json" 2>&1 | tail -2
  timeout 120 python3 benchmarks/flashmla_same_card.py "$c" --sustain "${SUSTAIN_S:-6}" --out "$OUT/sustained_flashmla_$c.json" 2>&1 | tail -1
done

echo "== summary (per-layer us; ratio = FlashMLA / ours on this card, > 1: ours faster)"
python3 - "$OUT" <<'EOF'
import json, sys, glob, os
out = sys.argv[1]
fm = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "flashmla_*.json")))]
ours = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "ours_*.json")))]
names = [r["name"] for r in fm[0]["rows"]] if fm else []
for n in names:
    f = [next(r for r in d["rows"] if r["name"] == n)["us"] for d in fm]
    o = [next(r for r in d["rows"] if r["name"] == n)["us"] for d in ours]
    a = fm[0]["rows"][names.index(n)]["anchor_us"]
    print(f"{n:>4} ours {' / '.join(f'{x:7.1f}' for x in o)}  FlashMLA here {' / '.join(f'{x:7.1f}' for x in f)}"
          f"  anchor {a:7.1f}  same-card x {min(f) / max(o):.3f}-{max(f) / min(o):.3f}")
# Is this FlashMLA build a baseline? On the cells that ran below the power cap, its time depends
# on the kernel and the memory system, not on the card's power binning: it must repeat the
# anchor's there (within 3%) before any same-card ratio means something (NOTES, s37).
if fm:
    devs = {}
    for row in fm[0]["rows"]:
        capped = row.get("power_cap") if row.get("clock_samples") else row["name"] in ("P4", "P5", "P6")
        if not capped and row.get("anchor_us"):
            devs[row["name"]] = min(d["rows"][names.index(row["name"])]["us"] for d in fm) / row["anchor_us"] - 1  # its best pass
    if devs:
        worst = max(abs(v) for v in devs.values())
        print("FlashMLA here vs anchor below the power cap: " + ", ".join(f"{n} {v:+.1%}" for n, v in devs.items())
              + f" -> {'a baseline' if worst <= 0.03 else 'NOT a baseline'} (max {worst:.1%}; bar 3%)")
# Every result of the call in one file: the device tool brings back at most 8.
every = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "*.json")))}
json.dump(every, open("/tmp/same_card_all.json", "w"), indent=1)
EOF
# The logs and the separate JSON files in one archive, beside the combined JSON.
(cd "$OUT" && tar czf /tmp/same_card_logs.tgz ./* && rm -rf ./* && mv /tmp/same_card_logs.tgz /tmp/same_card_all.json . && ls)
