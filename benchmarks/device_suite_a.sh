#!/usr/bin/env bash
# Device run A (one H100): GPU tests, core + manager evidence, megatron-core 0.19.2 suite, 0.14.0 equivalence.
source benchmarks/device_setup.sh
R=$OUT/a; mkdir -p $R
python3 -m pytest tests -q -p no:cacheprovider -x --ignore=tests/test_megatron_cpu.py 2>&1 | tee $R/pytest_gpu.log | tail -4
timeout 150 python3 benchmarks/gpu_core.py --out $R > $R/gpu_core.log 2>&1; tail -45 $R/gpu_core.log
timeout 240 python3 benchmarks/gpu_megatron.py --out $R/megatron > $R/gpu_megatron_stdout.log 2>&1; tail -30 $R/gpu_megatron_stdout.log
if [ -d .whl-old ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site14 .whl-old/*.whl
  PYTHONPATH=/tmp/site14:$PWD timeout 120 python3 benchmarks/gpu_megatron.py --out $R/mc14 --equivalence-only > $R/mc14_stdout.log 2>&1; tail -15 $R/mc14_stdout.log
fi
tar czf $OUT/suite_a.tgz -C $OUT a
