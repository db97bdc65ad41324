#!/usr/bin/env bash
# Run ON THE DEVICE MACHINE, from the root of a source tree: builds that tree's standalone decode
# harness (cpp/tests/decode_harness.cu: scheduler, attention and combine on poisoned inputs
# against a float64 CPU reference) into $1. CUTLASS comes from the importable cutlass_library
# (the nvidia-cutlass wheel on PYTHONPATH). Used by gpu_check.sh and ab_bench.sh.
set -euo pipefail
out=${1:?usage: build_decode_harness.sh OUTPUT_BINARY}
cutlass_include=$(python3 -c "import importlib.util as u; print(u.find_spec('cutlass_library').submodule_search_locations[0])")/source/include
nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -lineinfo -Icpp -I"$cutlass_include" \
  -o "$out" cpp/tests/decode_harness.cu cpp/decode/decode_launch.cu cpp/scheduler/mla_metadata.cu
