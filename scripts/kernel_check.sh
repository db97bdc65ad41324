#!/usr/bin/env bash
# Run ON THE DEVICE MACHINE, from the repository root, with .whl and .device carried: the quick
# loop between kernel edits, in one call (~3 min):
#   1. the standalone decode harness (float64 CPU reference, poisoned inputs), under a timeout so
#      that a deadlocked kernel costs 90 s, not the call; stops here if it fails;
#   2. the phase-clock probe (benchmarks/probes/phase_probe.cu), built alongside the harness;
#   3. with CELLS set (e.g. CELLS=P1,P4,P8,P10): the benchmark on those cells, without the XLA
#      baseline, through scripts/gpu_check.sh (which builds the Python extension).
# Every line also goes to $OUT/kernel_check.log as it comes (line-buffered), so a call that runs
# past its limit still returns what it printed.
set -uo pipefail
log=${OUT:-/tmp}/kernel_check.log
: > "$log"
source scripts/device_env.sh
cutlass_include=${CUTLASS_INCLUDE:?carry .whl: the nvidia-cutlass wheel}
nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -Icpp -isystem "$cutlass_include" \
  -o /tmp/phase_probe benchmarks/probes/phase_probe.cu cpp/scheduler/mla_metadata.cu >/tmp/phase_probe_build.log 2>&1 &
probe_build=$!
bash scripts/build_decode_harness.sh /tmp/decode_harness >/tmp/decode_harness_build.log 2>&1 || { tail -20 /tmp/decode_harness_build.log; exit 1; }
timeout 90 stdbuf -oL /tmp/decode_harness 2>&1 | tee -a "$log"  # one line per case
rc=${PIPESTATUS[0]}
echo "decode harness rc=$rc" | tee -a "$log"
[ "$rc" = 0 ] || exit 1
wait "$probe_build" || { tail -20 /tmp/phase_probe_build.log; exit 1; }
timeout 90 stdbuf -oL /tmp/phase_probe 2>&1 | tee -a "$log"
if [ -n "${CELLS:-}" ]; then
  PHASES=bench BENCH_ARGS="--cells $CELLS --steps 10 --no-xla --anchor $PWD/.device/anchors/flashmla-h100.json" \
    KT_CELLS=${KT_CELLS:-P4} bash scripts/gpu_check.sh 2>&1 | tee -a "$log" | grep -A16 "ceilings"
fi
