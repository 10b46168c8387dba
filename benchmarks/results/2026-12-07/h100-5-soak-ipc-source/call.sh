# The device call behind this folder (2026-12-07): MEMMGR_GIT_COMMIT=<this tree's commit> bash <this file>
# set-up, the 1000-cycle soak (issue 29), issue 32's WeightSource sync speed (its vLLM subset now carries openai's
# httpx2, httpcore2, truststore and jiter), then the two GPU test files whose tests were fixed after call 4.
set -u
export MEMMGR_CUDA_ARCHS=90
C=${MEMMGR_GIT_COMMIT:?set MEMMGR_GIT_COMMIT to the commit of this tree}
L=/tmp/call-logs; mkdir -p $L
python3 benchmarks/run.py soak ipc-sync-source --out "$OUT" --commit "$C" --deadline 330 > $L/run.log 2>&1
PYTHONPATH=/tmp/site:$PWD timeout 45 python3 -m pytest tests/test_copy_shape.py tests/test_vmm_gpu.py -q \
  -p no:cacheprovider -m gpu > $L/pytest-fixed.log 2>&1
echo "pytest rc $?" >> $L/pytest-fixed.log
tar czf "$OUT/call-logs.tgz" -C $L .
tail -n 3 $L/*.log
