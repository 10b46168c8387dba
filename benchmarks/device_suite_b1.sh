#!/usr/bin/env bash
# Device run B1 (one H100): GPU tests, core + 1B manager evidence, megatron 1.3B speed A/B (one segment per group
# on onload or not), reliability.
source benchmarks/device_setup.sh
R=$OUT/b1; mkdir -p $R
python3 -m pytest tests -q -p no:cacheprovider --ignore=tests/test_megatron_cpu.py 2>&1 | tee $R/pytest_gpu.log | tail -3
timeout 150 python3 benchmarks/gpu_core.py --out $R > $R/gpu_core.log 2>&1; grep -E "ratio|pin_s|over|drop|bit_exact|error" $R/gpu_core.log
for v in 0 1; do MEMMGR_RESERVE_ONLOAD=$v timeout 120 python3 benchmarks/gpu_megatron.py --out $R/mspeed$v --speed-only --skip-builtin --cycles 6 > $R/mspeed$v.log 2>&1; grep -E "memmgr cycle|reserved over" $R/mspeed$v.log; done
timeout 170 python3 benchmarks/gpu_reliability.py --out $R/rel > $R/reliability.log 2>&1; tail -25 $R/reliability.log
tar czf $OUT/suite_b1.tgz -C $OUT b1
