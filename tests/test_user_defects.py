"""The defects users met following the README, one test each, named for the behaviour they now get.

Cases that crashed the process (a segfault reading freed storage) run in a subprocess, so that a regression fails
the test instead of ending the test run."""
import io
import subprocess
import sys
import textwrap

import pytest
import torch

import memmgr
from memmgr.comms import NcclCommunicators
from memmgr.errors import MemmgrInputError, MemmgrStateError

from memmgr.tools.cpu_math import WARM_UP_SOURCE

from conftest import devices

pytestmark = pytest.mark.integration  # issue 31: tests by cost (tests/conftest.py)


def _run_python(script: str, device: str = "cpu") -> subprocess.CompletedProcess:
    code = WARM_UP_SOURCE + f"import torch\nDEVICE = {device!r}\n" + textwrap.dedent(script)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


_PHASE_AFTER_FIRST_STEP = """
import torch, memmgr
torch.manual_seed(0)
m = torch.nn.Linear(64, 64, device=DEVICE); opt = OPTIMIZER(m.parameters())
twin = torch.nn.Linear(64, 64, device=DEVICE); twin.load_state_dict(m.state_dict())
twin_opt = OPTIMIZER(twin.parameters())
mgr = memmgr.for_module(m, opt)
for i in range(4):
    x = torch.randn(2, 64, device=DEVICE, generator=None)
    for model, o in ((m, opt), (twin, twin_opt)):
        model(x).sum().backward(); o.step(); o.zero_grad()
    with mgr.phase("generate"):
        assert mgr.state["optimizer_states"].state == "on_host", mgr.state
    assert mgr.state["optimizer_states"].state == "on_device", mgr.state
for a, b in zip(opt.state.values(), twin_opt.state.values()):
    for k in a:
        assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k
assert all(torch.equal(p, q) for p, q in zip(m.parameters(), twin.parameters()))
print("LOOP-OK")
"""


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("optimizer", ["torch.optim.Adam", "torch.optim.AdamW",
                                       "lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)"])
def test_phase_brings_back_optimizer_state_created_at_the_first_step(device, optimizer):
    out = _run_python(f"OPTIMIZER = {optimizer}\n" + _PHASE_AFTER_FIRST_STEP, device)
    assert out.returncode == 0 and "LOOP-OK" in out.stdout, out.stderr[-3000:]


_PHASE_AFTER_LOAD_STATE_DICT = """
import copy, torch, memmgr
m = torch.nn.Linear(32, 32, device=DEVICE); opt = torch.optim.Adam(m.parameters())
mgr = memmgr.for_module(m, opt)
m(torch.ones(2, 32, device=DEVICE)).sum().backward(); opt.step(); opt.zero_grad()
saved = copy.deepcopy(opt.state_dict())
opt.load_state_dict(saved)  # new state tensors replace the managed ones
with mgr.phase("generate"):
    pass
assert mgr.state["optimizer_states"].state == "on_device", mgr.state
m(torch.ones(2, 32, device=DEVICE)).sum().backward(); opt.step()
print("LOAD-OK")
"""


@pytest.mark.parametrize("device", devices())
def test_phase_brings_back_optimizer_state_a_load_state_dict_replaced(device):
    out = _run_python(_PHASE_AFTER_LOAD_STATE_DICT, device)
    assert out.returncode == 0 and "LOAD-OK" in out.stdout, out.stderr[-3000:]


def test_weight_sync_inside_a_phase_leaves_new_state_where_the_phase_found_it():
    m = torch.nn.Linear(16, 16)
    opt = torch.optim.Adam(m.parameters())
    mgr = memmgr.for_module(m, opt)
    m(torch.ones(1, 16)).sum().backward()
    opt.step()
    with mgr.phase("generate"):
        with mgr.weight_sync() as weights:
            assert set(weights) == {"weight", "bias"}
        assert mgr.state["weights"].state == "on_host"
    assert all(s.state == "on_device" for n, s in mgr.state.items() if n != "grads")
    mgr.close()


def test_coalescing_slices_of_a_tensor_the_caller_holds_is_refused_and_frees_nothing():
    base = torch.randn(100)
    first, second = base[:50], base[50:]
    mgr = memmgr.MemoryManager()
    with pytest.raises(MemmgrInputError, match="outside the group"):
        mgr.add_group("slices", [first, second])
    assert base.untyped_storage().nbytes() == 400
    assert torch.isfinite(base.sum())


def test_coalescing_slices_whose_base_nobody_holds_is_accepted():
    def slices():
        base = torch.arange(100, dtype=torch.float32)
        return base[:50], base[50:]

    first, second = slices()
    mgr = memmgr.MemoryManager()
    mgr.add_group("slices", [first, second])
    mgr.offload()
    mgr.onload()
    assert torch.equal(torch.cat([first, second]), torch.arange(100, dtype=torch.float32))
    mgr.close()


def test_a_managed_module_and_optimizer_pickle_whole_in_any_placement():
    m = torch.nn.Sequential(torch.nn.Linear(8, 8))
    opt = torch.optim.Adam(m.parameters())
    mgr = memmgr.for_module(m, opt)
    m(torch.ones(2, 8)).sum().backward()
    opt.step()
    expected = m[0].weight.detach().clone()
    for placement in ("on_device", "on_host"):
        if placement == "on_host":
            mgr.offload()
        buf = io.BytesIO()
        torch.save(m, buf)
        torch.save(opt, io.BytesIO())
        buf.seek(0)
        copy = torch.load(buf, weights_only=False)
        assert torch.equal(copy[0].weight, expected)
        copy.state_dict()  # the copy's hooks are inert: not managed, nothing to bring back
    assert mgr.state["weights"].state == "on_host"
    mgr.close()


def test_a_quantized_tensor_is_refused_with_the_fix():
    q = torch.quantize_per_tensor(torch.randn(10), 0.1, 0, torch.qint8)
    with pytest.raises(MemmgrInputError, match="quantized.*dequantize"):
        memmgr.MemoryManager().add_group("q", [q])


def test_swap_of_a_manager_with_itself_names_its_groups():
    mgr = memmgr.for_module(torch.nn.Linear(4, 4))
    with pytest.raises(MemmgrInputError, match=r"\['grads', 'weights'\].*same manager"):
        memmgr.swap(out=mgr, into=mgr)
    mgr.close()


def test_a_ready_group_under_another_name_moves_with_hooks_and_ledger():
    mgr = memmgr.for_module(torch.nn.Linear(4, 4))
    mgr.add_group("comms", NcclCommunicators())
    seen = []
    mgr.register_hook("after_offload", lambda event, names: seen.append((event, names)))
    mgr.register_hook("after_onload", lambda event, names: seen.append((event, names)))
    mgr.offload()
    mgr.onload("comms")
    assert ("after_offload", ("grads", "comms", "weights")) in seen or any(
        e == "after_offload" and "comms" in n for e, n in seen)
    assert any(e == "after_onload" and n == ("comms",) for e, n in seen)
    assert mgr.name_of(mgr.group("comms")) == "comms"
    mgr.close()


def test_nccl_communicators_refuse_bad_arguments_by_name():
    with pytest.raises(MemmgrInputError, match="device"):
        NcclCommunicators(device="nope")
    with pytest.raises(MemmgrInputError, match="measure"):
        NcclCommunicators(measure="yes")
    comms = NcclCommunicators(device="cpu")
    with pytest.raises(MemmgrInputError, match="ProcessGroup"):
        comms.register("tp", object(), create=lambda: None)
    with pytest.raises(MemmgrInputError, match="create"):
        comms.register("tp", object(), create="not callable")
    with pytest.raises(MemmgrInputError, match="rebind"):
        comms.register("tp", object(), create=lambda: None, rebind=3)
    for call in (comms.release, comms.restore, comms.process_group):
        with pytest.raises(MemmgrInputError, match="no communicator 'dp'"):
            call("dp")


def test_a_group_of_a_closed_manager_refuses_to_move():
    m = torch.nn.Linear(4, 4)
    mgr = memmgr.for_module(m)
    weights = mgr.group("weights")
    mgr.close()
    for call in (weights.offload, weights.onload, weights.require_on_device):
        with pytest.raises(MemmgrStateError, match="closed"):
            call()
    with pytest.raises(MemmgrStateError, match="closed"):
        memmgr.MemoryManager().add_group("weights", weights)
    again = memmgr.for_module(m)  # the tensors themselves are free to be managed again
    again.offload()
    again.onload()
    again.close()


_GUARDED_READ = """
import os, torch, memmgr
from memmgr.errors import MemmgrStateError
m = torch.nn.Linear(8, 8, device=DEVICE)
mgr = memmgr.for_module(m, guard_offloaded=GUARD)
mgr.offload()
try:
    m(torch.ones(1, 8, device=DEVICE))
except MemmgrStateError as exc:
    assert "'weight'" in str(exc) and "'weights'" in str(exc), exc
    print("REFUSED")
mgr.onload()
print(float(m(torch.ones(1, 8, device=DEVICE)).sum()) == float(m(torch.ones(1, 8, device=DEVICE)).sum()))
mgr.close()
"""


@pytest.mark.parametrize("how", ["option", "environment"])
def test_the_managers_guard_option_turns_a_read_while_offloaded_into_an_error(how, monkeypatch):
    if how == "environment":
        monkeypatch.setenv("MEMMGR_GUARD_OFFLOADED", "1")
    out = _run_python(f"GUARD = {True if how == 'option' else None}\n" + _GUARDED_READ)
    assert out.returncode == 0 and "REFUSED" in out.stdout and "True" in out.stdout, out.stderr[-3000:]


def _sync_hooks(mgr, failing: str):
    calls = []

    def fail(event, names):
        calls.append(f"{event}:raised")
        raise RuntimeError(failing)

    if failing == "before_weight_sync":
        mgr.register_hook("before_weight_sync", fail)
    mgr.register_hook("after_weight_sync", lambda e, n: calls.append("after-1"))
    if failing == "after_weight_sync":
        mgr.register_hook("after_weight_sync", fail)
    mgr.register_hook("after_weight_sync", lambda e, n: calls.append("after-2"))
    return calls


@pytest.mark.parametrize("failing", ["before_weight_sync", "after_weight_sync"])
def test_every_after_sync_hook_runs_when_a_sync_hook_fails_and_the_weights_go_back(failing):
    mgr = memmgr.for_module(torch.nn.Linear(4, 4))
    calls = _sync_hooks(mgr, failing)
    mgr.offload()
    with pytest.raises(RuntimeError, match=failing):
        with mgr.weight_sync():
            pass
    assert "after-1" in calls and "after-2" in calls, calls
    assert mgr.state["weights"].state == "on_host"
    mgr.close()


def test_a_failing_sync_body_is_the_error_raised_even_when_an_after_hook_fails():
    mgr = memmgr.for_module(torch.nn.Linear(4, 4))
    calls = _sync_hooks(mgr, "after_weight_sync")
    with pytest.raises(ValueError, match="body") as info:
        with mgr.weight_sync():
            raise ValueError("body")
    assert "after-2" in calls and any("after_weight_sync" in n for n in info.value.__notes__)
    mgr.close()


def test_gradients_recreated_while_the_grads_group_is_off_count_as_on_the_device_and_leave_at_the_next_phase():
    m = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    mgr = memmgr.for_module(m, opt)
    mgr.offload()
    mgr.onload("weights")
    m(torch.ones(2, 8)).sum().backward()  # the grads group was dropped; backward re-creates it
    assert mgr.state["grads"].state == "on_device" and mgr.state["grads"].device_bytes > 0
    with mgr.phase("generate", keep=["weights"]):
        assert m.weight.grad is None and mgr.state["grads"].device_bytes == 0
    mgr.close()


def test_loading_optimizer_state_inside_a_phase_leaves_the_group_where_the_phase_found_it():
    m = torch.nn.Linear(6, 8)
    opt = torch.optim.Adam(m.parameters())
    mgr = memmgr.for_module(m, opt)
    m(torch.randn(2, 6)).sum().backward()
    opt.step()
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    expected = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    mgr.offload("optimizer_states")
    with mgr.phase("resume", keep=["optimizer_states"]):
        opt.load_state_dict(torch.load(io.BytesIO(saved.getvalue())))  # brings the group back, replaces its state
    assert mgr.state["optimizer_states"].state == "on_host"
    mgr.onload()
    assert all(torch.equal(opt.state_dict()["state"][0][k], v) for k, v in expected.items())
    m(torch.randn(2, 6)).sum().backward()
    opt.step()
    mgr.close()
