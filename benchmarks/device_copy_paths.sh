#!/usr/bin/env bash
# Device run (one H200): build the extension with its copy kernels, the GPU tests of the copy paths and FlatTensors,
# then benchmarks/copy_path_probe.py (engine vs kernel vs split, alone and right after another process released
# GPU memory). Logs and JSON under $OUT/copy_paths.
source benchmarks/device_setup.sh
R=$OUT/copy_paths; mkdir -p $R
cp $OUT/build.log $R/build.log
nvidia-smi > $R/nvidia-smi.txt 2>&1
python3 -c "import torch, memmgr; print(torch.__version__, torch.version.cuda); print(memmgr.backend_info().describe())" > $R/versions.txt 2>&1
timeout ${TEST_TIMEOUT:-180} python3 -m pytest tests/test_copy_kernels.py tests/test_copy_paths.py tests/test_native.py tests/test_flat_tensors.py -q -rs > $R/tests.log 2>&1; echo "tests rc=$?"; tail -6 $R/tests.log
timeout ${PROBE_TIMEOUT:-240} python3 benchmarks/copy_path_probe.py --out $R/probe.json ${PROBE_ARGS:-} > $R/probe.log 2>&1; echo "probe rc=$?"; tail -32 $R/probe.log
if [ -n "${PROBE2_ARGS:-}" ]; then
  timeout ${PROBE2_TIMEOUT:-120} python3 benchmarks/copy_path_probe.py --out $R/probe2.json $PROBE2_ARGS > $R/probe2.log 2>&1; echo "probe2 rc=$?"; tail -14 $R/probe2.log
fi
