#!/usr/bin/env bash
# Device run K (one H100), prepared for the next session: is memmgr's onload gap the host memory? The A/B of
# registered (mmap + cudaHostRegister) against cudaHostAlloc'd host buffers on the same buckets, then the default
# `memmgr bench` for the numbers at the code of that session.
source benchmarks/device_setup.sh
R=$OUT/k; mkdir -p $R; pack() { tar czf $OUT/suite_k.tgz -C $OUT k; }
timeout 150 python3 benchmarks/gpu_alloc_probe.py --out $R/probe --host-ab > $R/probe.log 2>&1; tail -3 $R/probe.log; pack
(cd /tmp && timeout 420 python3 -m memmgr bench --out $R/bench > $R/bench.log 2>&1); grep -E "^\||^memmgr offload|^#" $R/bench.log; pack
