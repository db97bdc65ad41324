#!/usr/bin/env bash
# Run HERE (the development machine) before a device run: gathers what the device machine lacks
# into ignored folders that the device tool carries (.whl and .device):
#   .whl/     the nvidia-cutlass wheel (headers), installed there with --no-deps
#   .device/ffi-0.3/  the XLA FFI headers of jaxlib 0.10.2, the oldest supported runtime, so the
#             device build uses the same FFI API as a pip build (the device has jaxlib 0.11.2)
#   .device/anchors/  the FlashMLA anchor, for the benchmark's ratio column
#   .variants/NAME/   with VARIANTS="NAME=REV ...": the source tree of each git revision, for
#             scripts/ab_bench.sh (kernel A/B runs in one device call; carry .variants too)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .device/anchors
if ! ls .whl/nvidia_cutlass-4.2.0.0-*.whl >/dev/null 2>&1; then
  python3 -m pip download -q --no-deps --only-binary=:all: -d .whl nvidia-cutlass==4.2.0.0
fi
if [ ! -f .device/ffi-0.3/xla/ffi/api/c_api.h ]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_27_x86_64 -d "$tmp" jaxlib==0.10.2
  mkdir -p .device/ffi-0.3
  (cd .device/ffi-0.3 && unzip -q -o "$tmp"/jaxlib-0.10.2-*.whl 'jaxlib/include/xla/ffi/api/*' && mv jaxlib/include/xla . && rm -rf jaxlib)
  rm -rf "$tmp"
fi
grep -E "define XLA_FFI_API_(MAJOR|MINOR)" .device/ffi-0.3/xla/ffi/api/c_api.h
if [ -f ../shared/anchors/flashmla-h100.json ]; then cp ../shared/anchors/flashmla-h100.json .device/anchors/; fi
rm -rf .variants
for spec in ${VARIANTS:-}; do
  name=${spec%%=*}; rev=${spec#*=}
  mkdir -p ".variants/$name"
  git archive "$rev" | tar -x -C ".variants/$name"
  echo "variant $name = $(git rev-parse --short "$rev") $(git log -1 --format=%s "$rev" | cut -c1-80)" | tee ".variants/$name/VARIANT"
done
du -sh .whl .device .variants 2>/dev/null
