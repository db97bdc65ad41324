#!/usr/bin/env bash
# Run ON THE DEVICE MACHINE (an H100), from the repository root: Nsight Compute sections of the
# attention kernel on a few benchmark cells, for the notes in benchmarks/NOTES.md.
#
#   PROF_CELLS="P4 P2" bash scripts/profile_kernel.sh     (carry .whl and .device)
#
# Builds this tree into /tmp/prof_ext (skipped when PROF_SKIP_BUILD=1), then profiles the first
# mla_decode_kernel launch of one jitted metadata + decode call per cell (layer 0's inputs of the
# benchmark, caches flushed, clocks as they are). Full reports go to $OUT/prof_CELL.txt; the
# lines that say where the time goes are printed.
set -uo pipefail
OUT=${OUT:-/tmp/jax_flashmla_out}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/cutlass .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/cutlass
[ -d .device/ffi-0.3 ] && export JAX_FLASHMLA_FFI_INCLUDE_DIR=$PWD/.device/ffi-0.3
if [ "${PROF_SKIP_BUILD:-0}" != 1 ]; then
  JAX_FLASHMLA_CUDA=ON python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/prof_ext . \
    >"$OUT/prof_build.log" 2>&1 || { tail -20 "$OUT/prof_build.log"; exit 1; }
fi
for cell in ${PROF_CELLS:-P4 P2}; do
  PYTHONPATH=/tmp/prof_ext ncu --clock-control none --kernel-name regex:mla_decode_kernel --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
    --section ComputeWorkloadAnalysis --section LaunchStats --section Occupancy \
    --metrics sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,lts__t_sector_hit_rate.pct,dram__bytes_read.sum,smsp__cycles_active.avg \
    python3 benchmarks/kernel_times.py --child "$cell" --reps 1 >"$OUT/prof_$cell.txt" 2>&1
  echo "== $cell (rc=$?)"
  grep -E "Duration|DRAM Throughput|Memory Throughput|L2 Hit Rate|gmma_cycles|sector_hit|dram__bytes|Compute \(SM\)|Stall|Warp Cycles Per Issued|Issued Ipc|Registers|Theoretical Occ" "$OUT/prof_$cell.txt" | head -30
done
