"""benchmarks/gpu_soak.py's verdict: with ``--same-address`` a soak passes only while every parameter and every
optimizer tensor stays at its address (judged from the results dict; the soak itself runs on the GPU)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_soak  # noqa: E402

CYCLES = 20


def _results(**moved) -> dict:
    records = [{"cycle": c, "nvml_process": 1 << 30, "reserved": 1 << 20, "rss": 1 << 30,
                "device_bytes_while_offloaded": {"weights": 0}} for c in (10, CYCLES)]
    results = {"same_address": True, "via": "phase", "mode": "gpu-megatron", "args": {"cycles": CYCLES},
               "parameters_moved_after_phase": [], "optimizer_state_moved_after_phase": [], **moved}
    results["checks"] = gpu_soak.checks(records, [1.0] * CYCLES, CYCLES, results)
    return results


def test_a_soak_whose_addresses_all_stay_passes():
    results = _results()
    assert results["checks"]["addresses_kept"] and results["checks"]["pass"]
    assert "every optimizer tensor (fp32 main parameters, moments) at its address after each phase from the first " \
           "on: PASS" in gpu_soak.summary(results)


def test_an_optimizer_tensor_that_moved_fails_the_soak_and_names_the_cycles():
    results = _results(optimizer_state_moved_after_phase=[3, 4])
    assert results["checks"]["addresses_kept"] is False and not results["checks"]["pass"]
    assert "from the first on: FAIL (cycles [3, 4])" in gpu_soak.summary(results)


def test_a_parameter_that_moved_fails_the_soak():
    results = _results(parameters_moved_after_phase=[7])
    assert results["checks"]["addresses_kept"] is False and not results["checks"]["pass"]
