#!/usr/bin/env bash
# Device run G (2 x H200): Megatron bitwise equivalence at data-parallel size 2 (megatron-core 0.19.2 and 0.14.0),
# then on GPU 0: profiler traces of memmgr's copies against a raw loop, and the stream-ordering section.
source benchmarks/device_setup.sh
R=$OUT/g; mkdir -p $R; pack() { tar czf $OUT/suite_g.tgz -C $OUT g; }
timeout 200 python3 -m torch.distributed.run --nproc_per_node 2 benchmarks/gpu_megatron.py --out $R/dp2 --equivalence-only > $R/dp2.log 2>&1; grep -A8 "^\[rank" $R/dp2.log; pack
if [ -d .whl-old ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site14 .whl-old/*.whl
  PYTHONPATH=/tmp/site14:$PWD timeout 150 python3 -m torch.distributed.run --nproc_per_node 2 benchmarks/gpu_megatron.py --out $R/dp2_mc14 --equivalence-only > $R/dp2_mc14.log 2>&1; grep -A8 "^\[rank" $R/dp2_mc14.log; pack
fi
CUDA_VISIBLE_DEVICES=0 timeout 60 python3 benchmarks/gpu_reliability.py --out $R/rel --only stream_ordering > $R/reliability.log 2>&1; grep -A3 "== summary" $R/reliability.log; pack
CUDA_VISIBLE_DEVICES=0 timeout 100 python3 benchmarks/gpu_alloc_probe.py --out $R/probe --trace-only > $R/probe.log 2>&1; tail -8 $R/probe.log; pack
