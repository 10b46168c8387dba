#!/bin/bash
# One device call, on whichever card comes: the WeightSource path and sync_weights through CUDA IPC (issues
# 31, 32), the same-address GPU tests (33), the IPC transport's GPU tests, the probe-size A/B (30).
set -u
T0=$(date +%s)
export MEMMGR_CUDA_ARCHS=90 MEMMGR_SAME_ADDRESS_CYCLES=100
C=${1:?commit}
TOTAL=${2:-560}  # seconds this call may take (the device time left)
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "card: $card"
MEMMGR_STEPS=vllm_wheels,vllm_subset,ipc_source_1.3b,${WITH_4B:+ipc_source_4b,}pytest_same_address \
  python3 benchmarks/run.py ipc-sync-source same-address --out $OUT --commit $C --deadline $(( TOTAL - 180 ))
PYTHONPATH=$PWD:/tmp/site timeout 120 python3 -m pytest tests/test_transports_ipc.py -q -p no:cacheprovider -m gpu \
  > $OUT/probe-ipc-tests.log 2>&1; echo "ipc tests rc $?"; tail -3 $OUT/probe-ipc-tests.log
left=$(( TOTAL - ($(date +%s) - T0) ))
echo "left for the probe A/B: $left s"
if (( left > 60 )); then
  export PYTHONPATH=$PWD:/tmp/site
  share=2
  for mb in 64 default; do  # the fixed 64 MiB probe of before e58bc11 against the default (1/32 of a copy)
    env $([ $mb = default ] || echo MEMMGR_COPY_PROBE_MB=$mb) timeout $(( left / share - 10 )) python3 -m memmgr bench --no-megatron --methods memmgr \
      --size-gb 8 --out $OUT/probe$mb > $OUT/probe$mb.log 2>&1; echo "probe $mb rc $?"
    tail -25 $OUT/probe$mb.log
    left=$(( TOTAL - ($(date +%s) - T0) )); share=1
  done
fi
cd $OUT && tar czf probe-ab.tgz probe* 2>/dev/null && rm -rf probe64 probedefault probe64.log probedefault.log; ls $OUT
