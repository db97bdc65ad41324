#!/usr/bin/env bash
# Run ON THE DEVICE MACHINE at the end of a device call: the device tool brings back at most 8
# files from $OUT, so everything but the results (*.json, *.png) goes into one $OUT/logs.tgz, and
# the loose copies (and any folder) are removed. A logs.tgz of an earlier pack in the same call
# goes inside the new one. Usage: bash scripts/pack_out.sh [$OUT]
set -uo pipefail
out=${1:-${OUT:-/tmp/jax_flashmla_out}}
[ -d "$out" ] || exit 0
cd "$out" || exit 1
mapfile -t pack < <(find . -mindepth 1 -maxdepth 1 ! -name '*.json' ! -name '*.png' -printf '%P\n' | sort)
[ ${#pack[@]} -gt 0 ] || exit 0
tmp=$(mktemp /tmp/logs.XXXXXX.tgz)
tar czf "$tmp" "${pack[@]}" && rm -rf "${pack[@]}" && mv "$tmp" logs.tgz
echo "packed ${#pack[@]} logs into $out/logs.tgz; back: $(ls | tr '\n' ' ')"
