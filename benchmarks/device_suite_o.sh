#!/usr/bin/env bash
# Device run O (2 x H200): Megatron bitwise equivalence at data-parallel size 2 with the final gpu_megatron.py and
# for_megatron (bookkeeping off the critical path), megatron-core 0.19.2.
source benchmarks/device_setup.sh
R=$OUT/o; mkdir -p $R; pack() { tar czf $OUT/suite_o.tgz -C $OUT o; }
timeout 200 python3 -m torch.distributed.run --nproc_per_node 2 benchmarks/gpu_megatron.py --out $R/dp2 --equivalence-only > $R/dp2.log 2>&1; grep -A8 "^\[rank" $R/dp2.log; pack
