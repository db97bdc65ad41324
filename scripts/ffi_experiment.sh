# Diagnosis: does a handler built against FFI 0.3 headers (jaxlib 0.10.2) run on the device's
# jaxlib, and does one built against the device's own headers? Prints a short verdict for each.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
for hdr in own ffi03; do
  echo "=== headers: $hdr"
  if [ $hdr = ffi03 ]; then export JAX_FLASHMLA_FFI_INCLUDE_DIR=$PWD/.device/ffi-0.3; else unset JAX_FLASHMLA_FFI_INCLUDE_DIR; fi
  JAX_FLASHMLA_CUDA=ON python3 -m pip install -q --no-build-isolation --no-deps --force-reinstall . > $OUT/build_$hdr.log 2>&1 || { echo build failed; tail $OUT/build_$hdr.log; }
  so=$(python3 -P -c "import importlib.util as u; print(u.find_spec('jax_flashmla._flashmla_cuda').origin)")
  ldd $so | grep -E "stdc|cuda"; nm -C --defined-only $so | grep -c "basic_ostream" | sed 's/^/ostream symbols defined in module: /'
  python3 -P scripts/smoke_metadata.py > $OUT/smoke_$hdr.log 2>&1; echo "smoke rc=$?"; grep -E "metadata via|Error|error|Fatal" $OUT/smoke_$hdr.log | head -5
done
c++ --version | head -1; cmake --version | head -1
