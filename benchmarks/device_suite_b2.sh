#!/usr/bin/env bash
# Device run B2 (one H100): GPU tests, reliability, 1000-cycle Megatron soak, Megatron memory report, budget/swap/
# ordered onload, and the default `memmgr bench`. Results are re-packed after every step.
source benchmarks/device_setup.sh
R=$OUT/b2; mkdir -p $R; pack() { tar czf $OUT/suite_b2.tgz -C $OUT b2; }
timeout 60 python3 -m pytest tests -q -p no:cacheprovider --ignore=tests/test_megatron_cpu.py > $R/pytest_gpu.log 2>&1; tail -2 $R/pytest_gpu.log; pack
timeout 60 python3 benchmarks/gpu_reliability.py --out $R/rel > $R/reliability.log 2>&1; grep -A6 "== summary" $R/reliability.log; pack
(cd /tmp && timeout 200 python3 -m memmgr bench --out $R/bench > $R/bench.log 2>&1); grep "^|" $R/bench.log; pack
timeout 120 python3 benchmarks/gpu_soak.py --out $R/soak --cycles 1000 > $R/soak.log 2>&1; tail -12 $R/soak.log; pack
timeout 90 python3 benchmarks/gpu_report.py --out $R/report --megatron --quick-doctor > $R/report.log 2>&1; tail -8 $R/report.log; pack
timeout 150 python3 benchmarks/gpu_beyond.py --out $R/beyond > $R/beyond.log 2>&1; tail -20 $R/beyond.log; pack
