#!/usr/bin/env bash
# Run ON THE DEVICE MACHINE (an H100), from the repository root, after scripts/prepare_device.sh
# ran here and with .whl and .device carried:
#   build the sm_90a extension -> GPU tests -> compute-sanitizer -> benchmark -> short summary.
# Full logs go to $OUT (the device tool brings them back).
set -uo pipefail
OUT=${OUT:-/tmp/jax_flashmla_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
BENCH_ARGS=${BENCH_ARGS:---cells P1,P8 --steps 10}
declare -A status

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
[ -d .device/ffi-0.3 ] && export JAX_FLASHMLA_FFI_INCLUDE_DIR=$PWD/.device/ffi-0.3
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"

echo "== build"
start=$(date +%s)
JAX_FLASHMLA_CUDA=ON python3 -m pip install -v --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1
status[build]=$?
echo "build rc=${status[build]} in $(( $(date +%s) - start ))s"; grep -E "jax_flashmla:|error" "$OUT/build.log" | head -20
python3 -P -c "import jax, jax_flashmla as jf; print(jf.build_info()); d = jax.devices()[0]; print(d, getattr(d, 'core_count', None), getattr(d, 'compute_capability', None))" 2>&1 | tee "$OUT/info.txt"

echo "== GPU tests"
JAX_FLASHMLA_EXPECT_EXTENSION=1 timeout 300 python3 -P -m pytest -p no:cacheprovider -q -m "gpu" tests/test_gpu.py \
  -o addopts="" -rs 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
status[gpu_tests]=${PIPESTATUS[0]}
JAX_FLASHMLA_EXPECT_EXTENSION=1 timeout 120 python3 -P -m pytest -p no:cacheprovider -q tests/test_build.py -o addopts="" 2>&1 | tail -3
status[build_tests]=${PIPESTATUS[0]}

echo "== compute-sanitizer"
# The kernels alone, from a standalone harness (no JAX in the process): every tool.
nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a -lineinfo -Icpp -o /tmp/metadata_harness \
  cpp/tests/metadata_harness.cu cpp/scheduler/mla_metadata.cu >"$OUT/harness_build.log" 2>&1
status[harness_build]=$?
for tool in memcheck racecheck synccheck initcheck; do
  timeout 120 compute-sanitizer --tool $tool --error-exitcode 9 /tmp/metadata_harness >"$OUT/sanitizer_$tool.log" 2>&1
  status[sanitizer_$tool]=$?
  echo "$tool: $(grep -E 'all cases ok|FAILURES' "$OUT/sanitizer_$tool.log") / $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_$tool.log" | tail -1)"
done
# End to end through JAX and the FFI handler: memcheck on our kernels.
timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 --kernel-name kns=mla_metadata \
  python3 -P scripts/sanitize_cases.py >"$OUT/sanitizer_jax_memcheck.log" 2>&1
status[sanitizer_jax_memcheck]=$?
echo "memcheck through JAX: $(grep -E 'mismatches' "$OUT/sanitizer_jax_memcheck.log") / $(grep 'ERROR SUMMARY' "$OUT/sanitizer_jax_memcheck.log")"

echo "== benchmark"
timeout 200 python3 benchmarks/decode_bench.py $BENCH_ARGS --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -20
status[bench]=${PIPESTATUS[0]}

echo "== summary"
grep -E "passed|failed|error" "$OUT/pytest_gpu.log" | tail -1
for k in build gpu_tests build_tests harness_build sanitizer_memcheck sanitizer_racecheck sanitizer_synccheck sanitizer_initcheck sanitizer_jax_memcheck bench; do printf '%-20s rc=%s\n' "$k" "${status[$k]:-not run}"; done
