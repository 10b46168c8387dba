#!/usr/bin/env bash
# Device run J (one H100): the default `memmgr bench`, the real megatron-core 1.3B GPT first (megatron's built-in
# helpers, per-tensor peers and memmgr), then the synthetic state with every peer.
source benchmarks/device_setup.sh
R=$OUT/j; mkdir -p $R; pack() { tar czf $OUT/suite_j.tgz -C $OUT j; }
cat /sys/kernel/mm/transparent_hugepage/enabled > $R/thp.txt 2>&1; grep -i huge /proc/meminfo >> $R/thp.txt
(cd /tmp && timeout 480 python3 -m memmgr bench --out $R/bench > $R/bench.log 2>&1); grep -E "^\||^memmgr offload|^megatron-core GPT|^#|^not run" $R/bench.log; pack
