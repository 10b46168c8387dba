#!/usr/bin/env bash
# Device run L1 (one H100), after the probes that found the onload gap (fresh device memory right after
# empty_cache): GPU tests at the current code, then the whole Megatron suite (1.3B speed over 8 cycles with the
# bench's untimed phase gap, memory, bitwise equivalence, selective) with the refactored gpu_megatron.py.
source benchmarks/device_setup.sh
R=$OUT/l1; mkdir -p $R; pack() { tar czf $OUT/suite_l1.tgz -C $OUT l1; }
timeout 100 python3 -m pytest tests -q -p no:cacheprovider --ignore=tests/test_megatron_cpu.py > $R/pytest_gpu.log 2>&1; tail -2 $R/pytest_gpu.log; pack
timeout 300 python3 benchmarks/gpu_megatron.py --out $R/megatron --cycles 8 > $R/megatron.log 2>&1; tail -24 $R/megatron.log; pack
