#!/usr/bin/env bash
# Sourced at the start of every device-machine command: carried wheels, then memmgr built with its extension.
set -o pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
MEMMGR_BUILD_EXT=1 python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; tail -30 "$OUT/build.log"; }
python3 -c "import memmgr; print(memmgr.backend_info().describe())"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
