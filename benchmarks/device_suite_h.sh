#!/usr/bin/env bash
# Device run H (one H100): which step of a non-blocking offload waits for the GPU (sync probe), and profiler traces of
# memmgr's onload against raw loops over the same host buffers (alloc probe --trace-only).
source benchmarks/device_setup.sh
R=$OUT/h; mkdir -p $R; pack() { tar czf $OUT/suite_h.tgz -C $OUT h; }
timeout 60 python3 benchmarks/gpu_sync_probe.py --out $R/sync > $R/sync.log 2>&1; cat $R/sync.log; pack
timeout 120 python3 benchmarks/gpu_alloc_probe.py --out $R/probe --trace-only > $R/probe.log 2>&1; tail -8 $R/probe.log; pack
