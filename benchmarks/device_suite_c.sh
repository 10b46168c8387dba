#!/usr/bin/env bash
# Device run C (2 x H200): the colocated RL cycle (megatron-core trainer, plain-torch fallback if it fails) and the
# Megatron memory report on GPU 0.
source benchmarks/device_setup.sh
R=$OUT/c; mkdir -p $R; pack() { tar czf $OUT/suite_c.tgz -C $OUT c; }
N=$(python3 -c "import torch; print(torch.cuda.device_count())")
timeout 230 python3 benchmarks/rl_cycle.py --gpus $N --iters 3 --out $R/rl_megatron --trainer megatron --deadline 220 > $R/rl_megatron.log 2>&1
rc=$?; tail -25 $R/rl_megatron.log; pack
if [ $rc -ne 0 ]; then
  timeout 160 python3 benchmarks/rl_cycle.py --gpus $N --iters 3 --out $R/rl_plain --trainer plain --deadline 150 > $R/rl_plain.log 2>&1; tail -15 $R/rl_plain.log; pack
fi
CUDA_VISIBLE_DEVICES=0 timeout 100 python3 benchmarks/gpu_report.py --out $R/report --megatron --quick-doctor > $R/report.log 2>&1; tail -12 $R/report.log; pack
