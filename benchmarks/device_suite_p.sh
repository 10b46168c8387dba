#!/usr/bin/env bash
# Device run P (one H100): megatron-core 0.14.0 (carried in .whl-old) through the final for_megatron:
# bitwise equivalence and selective (`gpu_megatron.py --equivalence-only`).
source benchmarks/device_setup.sh
R=$OUT/p; mkdir -p $R; pack() { tar czf $OUT/suite_p.tgz -C $OUT p; }
python3 -m pip install -q --no-index --no-deps --target /tmp/site14 .whl-old/*.whl
PYTHONPATH=/tmp/site14:$PWD timeout 200 python3 benchmarks/gpu_megatron.py --out $R/mc14 --equivalence-only > $R/mc14.log 2>&1; tail -8 $R/mc14.log; PYTHONPATH=/tmp/site14 python3 -c "import megatron.core as m; print('megatron-core', m.__version__)" | tee $R/version.txt; pack
