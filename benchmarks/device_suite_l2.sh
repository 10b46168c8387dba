#!/usr/bin/env bash
# Device run L2 (one H100): the default `memmgr bench` (0.5 s untimed phase gap after each move).
source benchmarks/device_setup.sh
R=$OUT/l2; mkdir -p $R; pack() { tar czf $OUT/suite_l2.tgz -C $OUT l2; }
(cd /tmp && timeout 480 python3 -m memmgr bench --out $R/bench > $R/bench.log 2>&1); grep -E "^\||^memmgr offload|^megatron-core GPT|^#|^untimed|^not run" $R/bench.log; pack
