#!/usr/bin/env bash
# Run ON THE DEVICE MACHINE (an H100), from the repository root, after scripts/prepare_device.sh
# ran here and with .whl and .device carried:
#   build the sm_90a extension -> GPU tests -> compute-sanitizer -> benchmark -> short summary.
# Full logs go to $OUT (the device tool brings them back).
#
# PHASES selects what runs (default: all), e.g. PHASES="tests grid" (the build always runs):
#   tests      tests/test_gpu.py (marked gpu); TESTS_BG=1 runs it beside the later phases
#   nn         tests/test_gpu_nn.py (the Flax layer and decoder on the kernel), then the demo
#              (python -m jax_flashmla.demo, the README's main job) on its GPU defaults
#   suite      the whole CPU suite, which runs the kernels on this GPU (the default path there),
#              with the build tests insisting on the extension
#   grid       tests/test_gpu_grid.py: the contract's full grid, 4608 cases
#   harness    the standalone decode harness alone (float64 CPU reference, poisoned inputs): a
#              one-minute correctness check between kernel edits
#   sanitizer  compute-sanitizer (every tool) on the standalone scheduler and decode harnesses
#   bench      benchmarks/decode_bench.py with $BENCH_ARGS (under $BENCH_TIMEOUT s, default 420: 30
#              steps per cell and the XLA baseline), then benchmarks/kernel_times.py (each
#              kernel's device time under ncu) on the cells $KT_CELLS (default P1,P8)
set -uo pipefail
OUT=${OUT:-/tmp/jax_flashmla_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
BENCH_ARGS=${BENCH_ARGS:---cells P1,P8 --steps 10}
DEMO_ARGS=${DEMO_ARGS:-}
PHASES=${PHASES:-tests nn suite grid sanitizer bench}
declare -A status
want() { [[ " $PHASES " == *" $1 "* ]]; }

source scripts/device_env.sh
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"

if [ "${SKIP_BUILD:-0}" != 1 ]; then  # SKIP_BUILD=1: a second call on the same warm machine
  echo "== build"
  start=$(date +%s)
  JAX_FLASHMLA_CUDA=ON python3 -m pip install -v --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1
  status[build]=$?
  echo "build rc=${status[build]} in $(( $(date +%s) - start ))s"; grep -E "jax_flashmla:|error" "$OUT/build.log" | head -20
fi
python3 -P -c "import jax, jax_flashmla as jf; print(jf.build_info()); d = jax.devices()[0]; print(d, getattr(d, 'core_count', None), getattr(d, 'compute_capability', None))" 2>&1 | tee "$OUT/info.txt"

gpu_tests() {
  JAX_FLASHMLA_EXPECT_EXTENSION=1 timeout 400 python3 -P -m pytest -p no:cacheprovider -q -m "gpu" tests/test_gpu.py \
    -o addopts="" -rs >"$OUT/pytest_gpu.log" 2>&1
}
# TESTS_BG=1: the GPU tests run beside the grid and the sanitizer (all host-bound), each
# process's JAX pool capped so that they fit on the GPU together.
if [ "${TESTS_BG:-0}" = 1 ]; then export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.15}; fi
tests_pid=""
if want tests; then
  echo "== GPU tests"
  if [ "${TESTS_BG:-0}" = 1 ]; then
    gpu_tests & tests_pid=$!
  else
    gpu_tests; status[gpu_tests]=$?; tail -15 "$OUT/pytest_gpu.log"
  fi
fi

if want nn; then
  echo "== Flax layer and decoder on the kernel"
  JAX_FLASHMLA_EXPECT_EXTENSION=1 timeout 300 python3 -P -m pytest -p no:cacheprovider -q -s -m "gpu" tests/test_gpu_nn.py \
    -o addopts="" -rs 2>&1 | tee "$OUT/pytest_gpu_nn.log" | tail -8
  status[gpu_nn_tests]=${PIPESTATUS[0]}
  echo "== demo (python -m jax_flashmla.demo $DEMO_ARGS)"
  (cd "$OUT" && timeout 300 python3 -m jax_flashmla.demo $DEMO_ARGS --json "$OUT/demo.json") 2>&1 | tee "$OUT/demo.log" | tail -14
  status[demo]=${PIPESTATUS[0]}
fi

if want suite; then
  # Three shards side by side (the cases are host-bound: compiles and the float64 references).
  # One process needed over 400 s beside the GPU tests (s27); the shards took 307 s.
  echo "== CPU suite on the GPU (the kernels are the default path here), 3 shards"
  suite_pids=()
  # The two slow files alone; the third shard takes every other CPU test file.
  rest=$(ls tests/test_*.py | grep -vE "tests/test_(gpu.*|decode|nn|transforms)\.py" | tr '\n' ' ')
  shards=("tests/test_decode.py" "tests/test_nn.py tests/test_transforms.py" "$rest")
  for i in 0 1 2; do
    JAX_FLASHMLA_EXPECT_EXTENSION=1 timeout ${SUITE_TIMEOUT:-540} python3 -P -m pytest -p no:cacheprovider -q \
      ${shards[$i]} -o addopts="" >"$OUT/pytest_suite_$i.log" 2>&1 &
    suite_pids+=($!)
  done
  status[suite_on_gpu]=0
  for i in 0 1 2; do
    wait "${suite_pids[$i]}" || status[suite_on_gpu]=1
    echo "shard $i (${shards[$i]}): $(tail -1 "$OUT/pytest_suite_$i.log")"
  done
fi

if want grid; then
  # GRID_JOBS=n: n shards of the grid run side by side (the cases are host-bound: data drawing,
  # the PyTorch reference and compiles), each with its own log.
  jobs=${GRID_JOBS:-1}
  echo "== full grid ($jobs process(es))"
  grid_pids=()
  for ((i = 0; i < jobs; i++)); do
    shard=""; [ "$jobs" -gt 1 ] && shard="$i/$jobs"
    JAX_FLASHMLA_GRID_SHARD=$shard timeout ${GRID_TIMEOUT:-550} python3 -P -m pytest -p no:cacheprovider -q -x -m "gpu" \
      tests/test_gpu_grid.py -o addopts="" --durations=3 >"$OUT/pytest_grid_$i.log" 2>&1 &
    grid_pids+=($!)
  done
  # Each shard's own exit status (not a bare wait: the GPU tests may be running in the background).
  status[grid]=0
  for ((i = 0; i < jobs; i++)); do
    wait "${grid_pids[$i]}" || status[grid]=1
    tail -4 "$OUT/pytest_grid_$i.log"
  done
fi

build_decode_harness() {
  bash scripts/build_decode_harness.sh /tmp/decode_harness >"$OUT/decode_harness_build.log" 2>&1
  status[decode_harness_build]=$?
  # A timeout: a deadlocked kernel must cost two minutes, not the call.
  timeout 120 /tmp/decode_harness | tee "$OUT/decode_harness.log" | tail -1
  status[decode_harness]=${PIPESTATUS[0]}
}

if want harness && ! want sanitizer; then
  echo "== decode harness"
  build_decode_harness
fi

if want sanitizer; then
  echo "== compute-sanitizer"
  # The kernels alone, from standalone harnesses (no JAX in the process): every tool.
  nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a -lineinfo -Icpp -o /tmp/metadata_harness \
    cpp/tests/metadata_harness.cu cpp/scheduler/mla_metadata.cu >"$OUT/harness_build.log" 2>&1
  status[harness_build]=$?
  build_decode_harness
  for tool in memcheck racecheck synccheck initcheck; do
    timeout 120 compute-sanitizer --tool $tool --error-exitcode 9 /tmp/metadata_harness >"$OUT/sanitizer_metadata_$tool.log" 2>&1
    status[san_metadata_$tool]=$?
    # racecheck tracks every shared-memory access: the first case only.
    args=""; [ $tool = racecheck ] && args=quick
    timeout 300 compute-sanitizer --tool $tool --error-exitcode 9 /tmp/decode_harness $args >"$OUT/sanitizer_decode_$tool.log" 2>&1
    status[san_decode_$tool]=$?
    # The first reports of a failing tool, here: the logs may not all come back.
    [ "${status[san_decode_$tool]}" != 0 ] && grep -vE "^\s*$" "$OUT/sanitizer_decode_$tool.log" | head -${SAN_HEAD:-40}
    echo "$tool: metadata $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_metadata_$tool.log" | tail -1);" \
         "decode $(grep -cE ': ok' "$OUT/sanitizer_decode_$tool.log") cases ok, $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_decode_$tool.log" | tail -1)"
  done
fi

if want bench; then
  echo "== benchmark"
  # Under JAX's default allocator, as a user runs it: without preallocation the XLA baseline's
  # 16-layer step runs out of memory on P2 and P3 as well.
  timeout "${BENCH_TIMEOUT:-420}" env -u XLA_PYTHON_CLIENT_PREALLOCATE -u XLA_PYTHON_CLIENT_MEM_FRACTION python3 benchmarks/decode_bench.py $BENCH_ARGS --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -20
  status[bench]=${PIPESTATUS[0]}
  echo "== kernel device times (ncu)"
  timeout 300 python3 benchmarks/kernel_times.py --cells "${KT_CELLS:-P1,P8}" --json "$OUT/kernel_times.json" 2>&1 \
    | tee "$OUT/kernel_times.log" | tail -12
  status[kernel_times]=${PIPESTATUS[0]}
fi

if [ -n "$tests_pid" ]; then
  wait "$tests_pid"; status[gpu_tests]=$?
  echo "== GPU tests (beside the rest)"; tail -15 "$OUT/pytest_gpu.log"
fi

echo "== summary"
# Every shard's own line (a shard that failed early must not hide behind another's pass).
for f in "$OUT"/pytest_gpu.log "$OUT"/pytest_gpu_nn.log "$OUT"/pytest_suite_*.log "$OUT"/pytest_grid_*.log; do
  [ -f "$f" ] && printf '%-15s %s\n' "$(basename "$f" .log)" "$(grep -E "passed|failed|error" "$f" | tail -1)"
done
for k in "${!status[@]}"; do printf '%-24s rc=%s\n' "$k" "${status[$k]}"; done | sort
# The device tool returns 8 files: the JSON and PNG results, and the logs in one archive
# (PACK_OUT=0 keeps them loose, for a later phase in the same call that reads them).
if [ "${PACK_OUT:-1}" = 1 ]; then bash scripts/pack_out.sh "$OUT"; fi
