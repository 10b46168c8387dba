# The device call behind this folder (H100, 2026-12-07): bash benchmarks/results/2026-12-07/h100-4-.../call.sh
# 1. set-up and the 1000-cycle soak alone (its NVML drift needs a quiet GPU);
# 2. the stateful test of the public API, 300 sequences per optimizer (three processes), beside the GPU pytest
#    without the files of the users-loops suite (they passed in call 3 at this code) and without test_stateful_api.py;
# 3. issue 32's WeightSource sync speed, then issue 31's IPC sync speed (a quiet GPU again).
set -u
export MEMMGR_CUDA_ARCHS=90
C=${MEMMGR_GIT_COMMIT:?set MEMMGR_GIT_COMMIT to the commit of this tree}
L=/tmp/call-logs; mkdir -p $L
python3 benchmarks/run.py soak --out "$OUT" --commit "$C" --deadline 170 > $L/run-soak.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
for o in adam adamw sgd; do
  timeout 235 python3 tests/stateful_api_machine.py --examples 300 --steps 30 --optimizer $o --device cuda \
    > $L/stateful-$o.log 2>&1 &
done
timeout 230 python3 -m pytest tests -q -p no:cacheprovider -m gpu --ignore tests/test_megatron_cpu.py \
  --ignore tests/test_stateful_api.py --ignore tests/test_examples.py --ignore tests/test_user_defects.py \
  --ignore tests/test_guard.py > $L/pytest-gpu.log 2>&1
echo "pytest rc $?" >> $L/pytest-gpu.log
wait
python3 benchmarks/run.py ipc-sync-source ipc-sync --skip-setup --out "$OUT" --commit "$C" --deadline 190 \
  > $L/run-ipc.log 2>&1
tar czf "$OUT/call-logs.tgz" -C $L .
tail -n 3 "$OUT"/*.txt; tail -n 2 $L/*.log
