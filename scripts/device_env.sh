# Sourced ON THE DEVICE MACHINE from the repository root (every scripts/*.sh that builds there):
# the carried nvidia-cutlass wheel on PYTHONPATH (its CUTLASS/CuTe headers, for every build;
# CUTLASS_INCLUDE names them for nvcc) and the carried XLA FFI headers for ours. Installed once
# per machine: a second script beside the first must not rewrite the headers that the first one
# is compiling against.
if ls .whl/*.whl >/dev/null 2>&1; then
  [ -d /tmp/site/cutlass_library ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site CUTLASS_INCLUDE=/tmp/site/cutlass_library/source/include
fi
[ -d .device/ffi-0.3 ] && export JAX_FLASHMLA_FFI_INCLUDE_DIR=$PWD/.device/ffi-0.3
