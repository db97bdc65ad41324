#!/usr/bin/env bash
# The channel-split pair of benchmarks/probes/loop_chain.cu (NOTES, thirty-fourth session) in its
# build variants, each run in the pair-only mode: the pair with its partial-score exchange and the
# bound without it, with and without the softmax. ~5 s of device time.
#   Here (development machine): PAIR_PREBUILD=1 bash scripts/pair_check.sh  -> builds into
#     .device/pair (needs the CUTLASS headers: pip install --no-deps --target /tmp/cutlass .whl/*.whl,
#     or PAIR_CUTLASS_INCLUDE); ~1 minute a variant on two cores.
#   Device (carrying .device): bash scripts/pair_check.sh  -> runs every prebuilt binary; output in
#     $OUT/pair_<i>.log when $OUT is set.
#   PAIR_VARIANTS: ';'-separated nvcc flag sets; "base" means no flags.
#   PAIR_SUSTAIN: seconds of pair-3S (with exchange and softmax) back to back after the cases, with
#     nvidia-smi beside it ($OUT/smi_<i>.csv): its clock and time a block under the power cap.
set -uo pipefail
IFS=';' read -r -a variants <<<"${PAIR_VARIANTS:-base;-DPAIR_WARP_ARRIVE;-DPAIR_ST_ASYNC;-DPAIR_ST_ASYNC -DPAIR_WARP_ARRIVE}"
bin=.device/pair
if [ -n "${PAIR_PREBUILD:-}" ]; then
  include=${PAIR_CUTLASS_INCLUDE:-/tmp/cutlass/cutlass_library/source/include}
  mkdir -p "$bin"
  for i in "${!variants[@]}"; do
    flags=${variants[$i]}
    [ "$flags" = base ] && flags=""
    # shellcheck disable=SC2086  # flags are words
    nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -DPAIR_ONLY $flags -Icpp -isystem "$include" \
      -o "$bin/pair_$i" benchmarks/probes/loop_chain.cu || exit 1
    echo "${variants[$i]}" >"$bin/pair_$i.flags"
  done
  exit 0
fi
for i in "${!variants[@]}"; do
  [ -x "$bin/pair_$i" ] || { echo "missing $bin/pair_$i: build it here first (PAIR_PREBUILD=1)"; continue; }
  echo "== variant $i: $(cat "$bin/pair_$i.flags")"
  smi=""
  if [ "${PAIR_SUSTAIN:-0}" != 0 ]; then
    nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv -lms 250 >"${OUT:-/tmp}/smi_$i.csv" &
    smi=$!
  fi
  timeout 120 "$bin/pair_$i" 4000 "${PAIR_SUSTAIN:-0}" pair 2>&1 | tee "${OUT:-/tmp}/pair_$i.log"
  [ -n "$smi" ] && kill "$smi"
done
