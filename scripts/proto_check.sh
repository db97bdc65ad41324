#!/usr/bin/env bash
# Run ON THE DEVICE MACHINE (an H100), from the repository root, carrying .whl: the three-role
# prototype (benchmarks/probes/three_role_proto.cu; benchmarks/NOTES.md, attempt 65) in its
# variants, built side by side, each checked against float64 (bounds excepted) and timed on P4-
# and P6-sized work, both ring geometries (single tiles, V pairs). ~3 minutes; ~1.5 with the
# binaries prebuilt here (PROTO_PREBUILD=1 below) and .device carried.
#   PROTO_VARIANTS: ';'-separated nvcc flag sets. "base" means no flags. The default (thirty-second
#   session): the double-S order (two S accumulators, QK^T(b + 1)'s first tiles before softmax(b))
#   and today's prototype, each with its timeline; then their floors without refills, the double-S
#   order with 2 early tiles, and the tensor work alone (no refills, no softmax) of each order.
#   The most telling variants come first: a call cut short still returns them.
set -uo pipefail
source scripts/device_env.sh
include=${CUTLASS_INCLUDE:?carry .whl: the nvidia-cutlass wheel}
IFS=';' read -r -a variants <<<"${PROTO_VARIANTS:--DPROTO_DOUBLE_S -DPROTO_S_REGS=168 -DPROTO_PROD_REGS=24 -DPROTO_TIMELINE;-DPROTO_TIMELINE;-DPROTO_DOUBLE_S -DPROTO_S_REGS=168 -DPROTO_PROD_REGS=24 -DPROTO_TIMELINE -DPROTO_NO_REFILL;-DPROTO_DOUBLE_S -DPROTO_S_REGS=168 -DPROTO_PROD_REGS=24 -DPROTO_TIMELINE -DPROTO_EARLY_TILES=2;-DPROTO_TIMELINE -DPROTO_NO_REFILL;-DPROTO_DOUBLE_S -DPROTO_S_REGS=168 -DPROTO_PROD_REGS=24 -DPROTO_NO_REFILL -DPROTO_SKIP_SOFTMAX;-DPROTO_NO_REFILL -DPROTO_SKIP_SOFTMAX}"
# PROTO_PREBUILD=1 (here, on the development machine): only build, into .device/proto (carried to
# the device with .device; the binaries need only the driver there), so that the device call
# spends its time running them. Without it, prebuilt binaries whose flags match are used, and the
# rest are built on the spot.
bin=.device/proto
mkdir -p "$bin"
# A prebuilt binary is used only if it was built from these sources (the probe and every project
# header it includes) with these flags; otherwise it is rebuilt, never run stale.
sources=$(cat benchmarks/probes/three_role_proto.cu benchmarks/probes/tma_probe.cuh cpp/config.h cpp/decode/*.cuh | sha1sum | cut -c1-16)
for i in "${!variants[@]}"; do
  flags=${variants[$i]}
  [ "$flags" = base ] && flags=""
  stamp="$sources $flags"
  if [ -z "${PROTO_PREBUILD:-}" ] && [ -x "$bin/proto_$i" ] && [ "$(cat "$bin/proto_$i.flags" 2>/dev/null)" = "$stamp" ]; then
    continue
  fi
  rm -f "$bin/proto_$i" "$bin/proto_$i.flags"
  # shellcheck disable=SC2086  # flags are words
  (nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr $flags -Icpp -isystem "$include" \
    -o "$bin/proto_$i" benchmarks/probes/three_role_proto.cu >"/tmp/proto_build_$i.log" 2>&1 &&
    echo "$stamp" >"$bin/proto_$i.flags") &
  # two cores here: build two at a time
  [ -n "${PROTO_PREBUILD:-}" ] && (( i % 2 == 1 )) && wait
done
wait
if [ -n "${PROTO_PREBUILD:-}" ]; then ls -la "$bin"; exit 0; fi
for i in "${!variants[@]}"; do
  echo "== ${variants[$i]}" | tee "${OUT:-/tmp}/proto_$i.log"
  if [ ! -x "$bin/proto_$i" ]; then grep -m5 error "/tmp/proto_build_$i.log"; continue; fi
  # each variant's lines also go to $OUT (when the device tool sets it), so that a call that runs
  # past its limit still returns the variants that finished
  timeout 90 "$bin/proto_$i" | grep --line-buffered -v warning | tee -a "${OUT:-/tmp}/proto_$i.log"
  echo "rc=${PIPESTATUS[0]}" | tee -a "${OUT:-/tmp}/proto_$i.log"
done
