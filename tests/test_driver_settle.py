"""The driver settle an offload starts on a side thread (memmgr.driver_settle): when it runs, that it never raises,
never runs twice at once for one device, and that the manager starts it exactly when its offload will release."""
import logging
import threading
import types

import pytest
import torch

from conftest import requires_cuda
import memmgr
from memmgr import driver_settle
from memmgr._native import describe_driver_settle
from memmgr.driver_settle import DriverSettle


def test_begin_runs_the_roundtrip_on_a_side_thread_and_records_it():
    seen = []
    settle = DriverSettle(roundtrip=lambda index: seen.append((index, threading.current_thread().name)),
                          enabled=True)
    thread = settle.begin(3)
    assert thread is not None
    settle.wait(5)
    assert seen == [(3, "memmgr-driver-settle-3")]
    status = settle.status()
    assert status["started"] == 1 and status["last_ms"] is not None and status["last_error"] is None


def test_a_second_begin_while_one_runs_starts_nothing():
    gate = threading.Event()
    calls = []

    def slow(index):
        calls.append(index)
        gate.wait(5)

    settle = DriverSettle(roundtrip=slow, enabled=True)
    first = settle.begin(0)
    assert first is not None
    assert settle.begin(0) is None  # the first is still running
    other = settle.begin(1)  # another device has its own
    assert other is not None
    gate.set()
    settle.wait(5)
    assert sorted(calls) == [0, 1]
    assert settle.begin(0) is not None  # once finished, the next offload starts a new one
    settle.wait(5)
    assert settle.status()["started"] == 3


def test_a_failing_roundtrip_is_logged_once_and_never_raised(caplog):
    def broken(index):
        raise RuntimeError("cuMemCreate returned CUDA driver error 2")

    settle = DriverSettle(roundtrip=broken, enabled=True)
    with caplog.at_level(logging.WARNING, logger="memmgr"):
        for _ in range(3):
            settle.begin(0)
            settle.wait(5)
    warnings = [r for r in caplog.records if "driver settle" in r.getMessage()]
    assert len(warnings) == 1 and "MEMMGR_DRIVER_SETTLE=0" in warnings[0].getMessage()
    assert "error 2" in settle.status()["last_error"]
    assert settle.status()["last_ms"] is None


def test_the_environment_switch_turns_it_off(monkeypatch):
    calls = []
    settle = DriverSettle(roundtrip=calls.append)
    monkeypatch.setenv("MEMMGR_DRIVER_SETTLE", "0")
    assert settle.begin(0) is None
    assert settle.status()["enabled"] is False
    monkeypatch.setenv("MEMMGR_DRIVER_SETTLE", "1")
    settle.begin(0)
    settle.wait(5)
    assert calls == [0]


def test_the_status_phrase_says_what_ran():
    assert describe_driver_settle({"enabled": False}) == "driver settle at offload off"
    assert "unavailable" in describe_driver_settle({"enabled": True, "available": False})
    text = describe_driver_settle({"enabled": True, "available": True, "started": 4, "last_ms": 31.25,
                                   "last_error": None})
    assert text == "driver settle at offload on (4 run, last 31.2 ms)"


@pytest.mark.parametrize("empty_cache", [True, False])
def test_an_offload_starts_a_settle_on_its_gpu_only_when_it_releases_memory(monkeypatch, empty_cache, device):
    started = []
    monkeypatch.setattr(driver_settle, "begin", lambda device=None: started.append(device))
    model = torch.nn.Linear(8, 8).to(device)
    mgr = memmgr.MemoryManager(empty_cache=empty_cache)
    mgr.add_group("weights", list(model.parameters()), policy="copy")
    mgr.offload()
    mgr.onload()
    mgr.offload()
    expected = [model.weight.device] * 2 if empty_cache and device.type == "cuda" else []  # nothing to release on a CPU
    assert started == expected
    mgr.close()


def test_an_offload_starts_its_settle_only_once_its_copies_are_issued(monkeypatch):
    """The settle's side thread and the search for the units' GPUs come after the copies are issued, so neither
    delays the first copy; the release at the end still comes after the settle began."""
    from memmgr import manager as manager_module
    from memmgr.states import GroupState

    events = []
    monkeypatch.setattr(manager_module, "_cuda_devices", lambda units: [torch.device("cuda", 0)])
    monkeypatch.setattr(driver_settle, "begin",
                        lambda device=None: events.append(("settle", mgr.group("weights").state)))
    mgr = memmgr.MemoryManager()
    monkeypatch.setattr(mgr, "release_cached_memory", lambda: events.append(("release", None)))
    mgr.add_group("weights", {"w": torch.ones(256), "b": torch.zeros(16)}, policy="copy")
    events.clear()  # coalescing released the former storages
    mgr.offload()
    assert events[0][0] == "settle" and events[0][1] is not GroupState.ON_DEVICE
    assert [name for name, _ in events] == ["settle", "release"]
    mgr.onload()
    mgr.close()


def test_the_manager_names_each_gpu_its_units_live_on_once():
    from memmgr.manager import _cuda_devices

    devices = [torch.device("cuda", 1), torch.device("cuda", 0), torch.device("cuda", 1), None, torch.device("cpu")]
    units = [types.SimpleNamespace(device=device) for device in devices]
    assert _cuda_devices(units) == [torch.device("cuda", 0), torch.device("cuda", 1)]


@pytest.mark.gpu
@requires_cuda
def test_the_physical_roundtrip_leaves_gpu_memory_as_it_was():
    lib = driver_settle._load_driver()
    assert lib is not None
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    for _ in range(5):
        driver_settle.physical_allocation_roundtrip(lib, torch.cuda.current_device())
    assert torch.cuda.mem_get_info()[0] == free_before


@pytest.mark.gpu
@requires_cuda
def test_a_settle_on_the_gpu_runs_without_error():
    torch.empty(1, device="cuda")
    settle = DriverSettle(enabled=True)
    assert settle.begin(torch.cuda.current_device()) is not None
    settle.wait(30)
    status = settle.status()
    assert status["available"] is True and status["last_error"] is None and status["last_ms"] is not None


@pytest.mark.parametrize("device, match", [("cuda:0", "device"), (torch.device("cpu"), "CUDA device")])
def test_begin_refuses_a_device_that_is_not_a_cuda_device_or_index(device, match):
    with pytest.raises(memmgr.MemmgrInputError, match=match):
        driver_settle.begin(device)
