#!/usr/bin/env bash
# Run ON THE DEVICE MACHINE (an H100), from the repository root: Nsight Compute sections of the
# attention kernel on a few benchmark cells, for the notes in benchmarks/NOTES.md.
#
#   PROF_CELLS="P4 P2" bash scripts/profile_kernel.sh     (carry .whl and .device)
#
# With PROF_VARIANTS="v0 v1", profiles those trees of .variants/ (scripts/prepare_device.sh) instead,
# each built side by side into /tmp/prof_NAME.
#
# Builds this tree into /tmp/prof_ext (skipped when PROF_SKIP_BUILD=1), then profiles the first
# mla_decode_kernel launch of one jitted metadata + decode call per cell (layer 0's inputs of the
# benchmark, caches flushed, clocks as they are). Full reports go to $OUT/prof_CELL.txt; the
# lines that say where the time goes are printed.
set -uo pipefail
OUT=${OUT:-/tmp/jax_flashmla_out}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
source scripts/device_env.sh
STALLS=regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio
build() {  # build DIR TARGET
  (cd "$1" && JAX_FLASHMLA_CUDA=ON python3 -m pip install -q --no-build-isolation --no-deps --target "$2" . \
    >"$OUT/prof_build_$(basename "$2").log" 2>&1) || { tail -20 "$OUT/prof_build_$(basename "$2").log"; return 1; }
}
profile() {  # profile EXT_DIR CELL LABEL
  PYTHONPATH=$1 ncu --clock-control none --kernel-name regex:mla_decode_kernel --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
    --section ComputeWorkloadAnalysis --section LaunchStats --section Occupancy \
    --metrics lts__t_sector_hit_rate.pct,dram__bytes_read.sum,smsp__cycles_active.avg,$STALLS \
    python3 benchmarks/kernel_times.py --child "$2" --reps 1 >"$OUT/prof_$3_$2.txt" 2>&1
  echo "== $3 $2 (rc=$?)"
  grep -E "Duration|DRAM Throughput|L2 Hit Rate|dram__bytes|Compute \(SM\)|Warp Cycles Per Issued|Issued Ipc" "$OUT/prof_$3_$2.txt" | head -12
  # stall reasons worth more than 0.2 cycles per issued instruction
  grep -E "issue_stalled" "$OUT/prof_$3_$2.txt" | awk '$NF+0 > 0.2 {sub("smsp__average_warps_issue_stalled_", ""); print "   ", $1, $NF}'
}
if [ -n "${PROF_VARIANTS:-}" ]; then
  for v in $PROF_VARIANTS; do build ".variants/$v" "/tmp/prof_$v" & done
  wait
  for cell in ${PROF_CELLS:-P4 P2}; do for v in $PROF_VARIANTS; do profile "/tmp/prof_$v" "$cell" "$v"; done; done
  exit 0
fi
if [ "${PROF_SKIP_BUILD:-0}" != 1 ]; then
  build . /tmp/prof_ext || exit 1
fi
for cell in ${PROF_CELLS:-P4 P2}; do profile /tmp/prof_ext "$cell" tree; done
