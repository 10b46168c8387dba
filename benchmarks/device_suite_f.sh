#!/usr/bin/env bash
# Device run F (one H100): where onload/offload lose time (alloc probe), the stream-ordering section with host buffers
# pinned ahead, the bench's --sweep, and the 1.3B Megatron speed with 8 cycles at the current code.
source benchmarks/device_setup.sh
R=$OUT/f; mkdir -p $R; pack() { tar czf $OUT/suite_f.tgz -C $OUT f; }
timeout 150 python3 benchmarks/gpu_alloc_probe.py --out $R/probe > $R/probe.log 2>&1; head -60 $R/probe.log; pack
timeout 60 python3 benchmarks/gpu_reliability.py --out $R/rel --only stream_ordering > $R/reliability.log 2>&1; grep -A3 "== summary" $R/reliability.log; pack
timeout 120 python3 benchmarks/gpu_megatron.py --out $R/mspeed --speed-only --skip-builtin --cycles 8 > $R/mspeed.log 2>&1; tail -14 $R/mspeed.log; pack
(cd /tmp && timeout 240 python3 -m memmgr bench --methods memmgr --sweep --out $R/sweep > $R/sweep.log 2>&1); tail -12 $R/sweep.log; pack
