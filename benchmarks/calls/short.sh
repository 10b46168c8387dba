#!/bin/bash
# A short device call for what device time is left: sync_weights and the WeightSource path of the 1.3B through
# CUDA IPC (the ring's copies no longer block the sender), the IPC transport's GPU tests, then the auto probe's size
# A/B (fixed 64 MiB against the default) on a 4 GB synthetic state and the 10,000 x 64 KiB state.
set -u
T0=$(date +%s)
export MEMMGR_CUDA_ARCHS=90
C=${1:?commit}
TOTAL=${2:-280}
echo "card: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
MEMMGR_STEPS=vllm_wheels,vllm_subset,ipc_source_1.3b \
  python3 benchmarks/run.py ipc-sync-source --out $OUT --commit $C --deadline 140
export PYTHONPATH=$PWD:/tmp/site
timeout 60 python3 -m pytest tests/test_transports_ipc.py -q -p no:cacheprovider -m gpu -x \
  > $OUT/probe-ipc-tests.log 2>&1; echo "ipc tests rc $?"; tail -3 $OUT/probe-ipc-tests.log
share=2
for mb in 64 default; do  # the fixed 64 MiB probe of before e58bc11 against the default (1/32 of a copy)
  left=$(( TOTAL - ($(date +%s) - T0) ))
  (( left > 40 )) || break
  env $([ $mb = default ] || echo MEMMGR_COPY_PROBE_MB=$mb) timeout $(( left / share - 5 )) python3 -m memmgr bench \
    --no-megatron --methods memmgr --size-gb 4 --out $OUT/probe$mb > $OUT/probe$mb.log 2>&1; echo "probe $mb rc $?"
  grep -E "10000x64KiB|^\| memmgr" $OUT/probe$mb.log | tail -8
  share=1
done
cd $OUT && tar czf probe-ab.tgz probe* 2>/dev/null && rm -rf probe64 probedefault probe64.log probedefault.log; ls $OUT
