#!/usr/bin/env bash
# Device run M (one H100): the 1.3B Megatron speed over 12 cycles (megatron's built-ins beside it) and the default
# `memmgr bench`, both with the peak now the best of 10 copies each way (was 3: run L3's bench caught a slow h2d
# peak of 50.3 GB/s, which flattered every onload ratio).
source benchmarks/device_setup.sh
R=$OUT/m; mkdir -p $R; pack() { tar czf $OUT/suite_m.tgz -C $OUT m; }
timeout 170 python3 benchmarks/gpu_megatron.py --out $R/megatron --speed-only --cycles 12 > $R/megatron.log 2>&1; tail -19 $R/megatron.log; pack
(cd /tmp && timeout 380 python3 -m memmgr bench --out $R/bench > $R/bench.log 2>&1); grep -E "^\||^memmgr offload|^megatron-core GPT|^pinned|^untimed|^not run" $R/bench.log; pack
