#!/usr/bin/env bash
# Device run I (one H100): GPU tests, every reliability section, and the default `memmgr bench` (synthetic state and
# the real megatron-core 1.3B GPT with megatron's built-in helpers beside memmgr). Results re-packed after each step.
source benchmarks/device_setup.sh
R=$OUT/i; mkdir -p $R; pack() { tar czf $OUT/suite_i.tgz -C $OUT i; }
timeout 90 python3 -m pytest tests -q -p no:cacheprovider --ignore=tests/test_megatron_cpu.py > $R/pytest_gpu.log 2>&1; tail -2 $R/pytest_gpu.log; pack
timeout 75 python3 benchmarks/gpu_reliability.py --out $R/rel > $R/reliability.log 2>&1; grep -A7 "== summary" $R/reliability.log; pack
(cd /tmp && timeout 400 python3 -m memmgr bench --out $R/bench > $R/bench.log 2>&1); grep -E "^\||^memmgr offload|^megatron-core GPT|^#" $R/bench.log; pack
