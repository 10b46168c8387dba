#!/usr/bin/env bash
# Device run L3 (one H100), at the commit that takes for_megatron's bookkeeping off the offload's critical path
# (optimizer-state pick-up skips held tensors by id; left_behind refreshed while the copies are in flight): the whole
# Megatron suite (1.3B speed over 8 cycles, memory, equivalence, selective), then the default `memmgr bench`.
source benchmarks/device_setup.sh
R=$OUT/l3; mkdir -p $R; pack() { tar czf $OUT/suite_l3.tgz -C $OUT l3; }
timeout 200 python3 benchmarks/gpu_megatron.py --out $R/megatron --cycles 8 > $R/megatron.log 2>&1; tail -19 $R/megatron.log; pack
(cd /tmp && timeout 370 python3 -m memmgr bench --out $R/bench > $R/bench.log 2>&1); grep -E "^\||^memmgr offload|^megatron-core GPT|^untimed|^not run" $R/bench.log; pack
