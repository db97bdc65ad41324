#!/usr/bin/env bash
# Run ON THE DEVICE MACHINE (an H100), from the repository root: kernel A/B in one call.
#
# Here first:   VARIANTS="base=main new=perf/x" bash scripts/prepare_device.sh
# Device call:  bash scripts/ab_bench.sh        (carry .whl, .device and .variants)
#
# AB_UNCHECKED="NAME ...": variants timed even when they fail the harness (upper-bound
# experiments that skip work on purpose). AB_BENCH_ARGS: more decode_bench.py arguments for
# every variant (e.g. --no-command-buffers).
# A call may not run past 10 minutes; about 1.5 min per variant on P1-P10 plus 1.5 min of builds.
# With more than 4 variants, split: AB_VARIANTS="v0 v1 v2" first, then, on the still-warm
# machine, AB_SKIP_BUILD=1 AB_VARIANTS="v3 v4" (the builds stay in /tmp/ab). Each call first
# clears $OUT/ab_*.json, so rename a call's JSON before the next one, with a prefix in $OUT
# itself (for f in $OUT/ab_*.json; do mv "$f" "$OUT/r1_${f##*/}"; done): scripts/pack_out.sh
# packs folders under $OUT into logs.tgz and removes them.
#
# Builds every .variants/NAME side by side, runs each one's standalone decode harness (float64
# CPU reference, poisoned inputs: a variant that fails it is not timed), then times each with
# THIS tree's benchmarks/decode_bench.py on $AB_CELLS (same protocol, same tool for all), and
# prints benchmarks/compare.py's table last. JSON per variant goes to $OUT, the logs into
# $OUT/logs.tgz (scripts/pack_out.sh: the device tool brings back 8 files).
set -uo pipefail
OUT=${OUT:-/tmp/jax_flashmla_out}
mkdir -p "$OUT"
# A warm machine keeps $OUT between calls: drop the JSON of earlier variants so that a copy of
# $OUT/ab_*.json holds this call's only.
rm -f "$OUT"/ab_*.json
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
AB_CELLS=${AB_CELLS:-P1,P2,P3,P4,P5,P6,P7,P8,P9,P10}
AB_STEPS=${AB_STEPS:-10}
ROOT=$PWD

source scripts/device_env.sh
: "${CUTLASS_INCLUDE:?carry .whl: the nvidia-cutlass wheel}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"
# Power limit, clocks and clock-event counters before the runs (each cell's own SM clock is in its
# JSON row: decode_bench.py logs it).
nvidia-smi -q -d POWER,CLOCK,PERFORMANCE,TEMPERATURE >"$OUT/gpu_state.txt" 2>&1

all_names=()
for dir in .variants/*/; do all_names+=("$(basename "$dir")"); done
[ ${#all_names[@]} -gt 0 ] || { echo "no .variants: run VARIANTS=... scripts/prepare_device.sh here first"; exit 1; }
read -r -a names <<<"${AB_VARIANTS:-${all_names[*]}}"

if [ "${AB_SKIP_BUILD:-0}" != 1 ]; then
echo "== build ${all_names[*]} (in parallel)"
start=$(date +%s)
for name in "${all_names[@]}"; do
  (
    cd ".variants/$name" || exit 1
    JAX_FLASHMLA_CUDA=ON python3 -m pip install --no-build-isolation --no-deps --target "/tmp/ab/$name" . \
      >"$OUT/build_$name.log" 2>&1
    echo "build $name rc=$?"
    bash "$ROOT/scripts/build_decode_harness.sh" "/tmp/ab/harness_$name" >"$OUT/harness_build_$name.log" 2>&1
    echo "harness build $name rc=$?"
  ) &
done
wait
echo "builds done in $(( $(date +%s) - start ))s"
fi

jsons=()
for name in "${names[@]}"; do
  echo "== $name: $(cat ".variants/$name/VARIANT" 2>/dev/null)"
  if ! timeout 180 "/tmp/ab/harness_$name" >"$OUT/harness_$name.log" 2>&1; then
    if [[ " ${AB_UNCHECKED:-} " == *" $name "* ]]; then
      echo "$name: decode harness failed; timed anyway (AB_UNCHECKED: a bound experiment, wrong output)"
    else
      echo "$name: decode harness FAILED, not timed:"; tail -5 "$OUT/harness_$name.log"; continue
    fi
  fi
  tail -1 "$OUT/harness_$name.log"
  PYTHONPATH="/tmp/ab/$name" timeout 420 python3 benchmarks/decode_bench.py --no-xla --cells "$AB_CELLS" \
    ${AB_BENCH_ARGS:-} --steps "$AB_STEPS" --anchor .device/anchors/flashmla-h100.json --json "$OUT/ab_$name.json" >"$OUT/bench_$name.log" 2>&1
  rc=$?
  echo "bench $name rc=$rc"; [ $rc = 0 ] && jsons+=("$OUT/ab_$name.json") || tail -5 "$OUT/bench_$name.log"
done

echo "== summary"
rc=1
if [ ${#jsons[@]} -gt 0 ]; then python3 benchmarks/compare.py "${jsons[@]}"; rc=$?; else echo "no variant was timed"; fi
# The device tool returns 8 files: the JSON, and the logs in one archive.
bash "$ROOT/scripts/pack_out.sh" "$OUT"
exit $rc
