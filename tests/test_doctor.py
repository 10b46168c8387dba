"""memmgr doctor on this machine (CPU or GPU), with NVML failing, and its measurement helpers."""
import sys
import types

import pytest
import torch
from click.testing import CliRunner

from memmgr import nvml
from memmgr.tools import doctor, measure
from memmgr.tools.cli import main
from conftest import requires_cuda


@pytest.fixture(autouse=True)
def fresh_nvml():
    nvml.reset()
    yield
    nvml.reset()


def test_cli_doctor_quick():
    res = CliRunner().invoke(main, ["doctor", "--quick"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "memmgr" in out and "torch" in out and "ulimit -l" in out and "host memory" in out
    assert "native extension" in out and "packages:" in out and "verdict:" in out
    if not torch.cuda.is_available():
        assert "no GPU" in out


def test_doctor_reports_nvml_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    nvml.reset()
    res = CliRunner().invoke(main, ["doctor", "--quick"])
    assert res.exit_code == 0, res.output
    assert "NVML unavailable: pynvml is not installed" in res.output


def test_doctor_nvml_error(monkeypatch):
    class NVMLError(Exception):
        pass

    fake = types.ModuleType("pynvml")
    fake.NVMLError = NVMLError

    def init():
        raise NVMLError("Driver Not Loaded")

    fake.nvmlInit = init
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    nvml.reset()
    res = CliRunner().invoke(main, ["doctor", "--quick"])
    assert res.exit_code == 0, res.output
    assert "NVML unavailable: NVMLError: Driver Not Loaded" in res.output


def test_doctor_pcie_verdict(monkeypatch):
    fake = types.ModuleType("pynvml")
    fake.nvmlInit = lambda: None
    fake.nvmlShutdown = lambda: None
    fake.nvmlDeviceGetCount = lambda: 1
    fake.nvmlDeviceGetHandleByIndex = lambda i: i
    fake.nvmlSystemGetDriverVersion = lambda: "550.1"
    fake.nvmlDeviceGetName = lambda h: "Fake GPU"
    fake.nvmlDeviceGetMemoryInfo = lambda h, version=None: types.SimpleNamespace(total=1 << 34, used=1 << 30,
                                                                                 free=15 << 30, reserved=0)
    fake.nvmlDeviceGetMaxPcieLinkGeneration = lambda h: 3
    fake.nvmlDeviceGetMaxPcieLinkWidth = lambda h: 8
    fake.nvmlDeviceGetCurrPcieLinkGeneration = lambda h: 3
    fake.nvmlDeviceGetCurrPcieLinkWidth = lambda h: 8
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    nvml.reset()
    found = doctor.run_doctor(quick=True)
    assert any("gen3 x8 (below gen4 x16)" in v for v in found["verdicts"])
    assert found["gpus"][0]["name"] == "Fake GPU"


def test_helpers():
    versions = doctor.package_versions()
    assert versions["torch"] is not None
    soft, hard = doctor.memlock_limit()
    assert soft is None or soft >= 0
    mem = doctor.host_memory()
    assert mem["total"] and mem["total"] > 0
    assert measure.pcie_theoretical_gbps(5, 16) == pytest.approx(63.0, rel=0.01)
    assert measure.pcie_theoretical_gbps(None, 16) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_measurements_need_cuda():
    with pytest.raises(RuntimeError, match="CUDA"):
        measure.measure_pinned_peak(1 << 20)
    speed = measure.measure_pinning_speed(1 << 20)
    assert speed["native"] is None and "no CUDA" in speed["errors"]["all"]
    assert measure.check_pinning()["pinned"] is False


@requires_cuda
def test_measurements_on_gpu():
    peak = measure.measure_pinned_peak(64 << 20, iters=1)
    assert peak["d2h"] > 0 and peak["h2d"] > 0 and peak["both"] > 0
    speed = measure.measure_pinning_speed(64 << 20)
    assert speed["torch_pin_memory"] is not None
