#!/bin/bash
# One device call: the default `memmgr bench` (every method, both conditions, 2 cycles; memmgr runs at
# least 5) at the final code, on whichever card comes (issues 30, 31, 33).
set -u
export MEMMGR_CUDA_ARCHS=90
C=${1:?commit}
echo "card: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
MEMMGR_BENCH_ARGS="--cycles 2" python3 benchmarks/run.py bench --out $OUT --commit $C --deadline 560
