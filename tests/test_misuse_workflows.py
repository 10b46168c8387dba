"""What a demanding user does around the designed paths: repeated calls, phases around syncs and budgets, failing
hooks, checkpoints, resumes, closing and managing again. Each test names the behaviour it holds memmgr to."""
from __future__ import annotations

import torch
import pytest

import memmgr
from memmgr import HostMemoryPool, MemmgrError, MemoryManager

from conftest import same_bits


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def step(model, opt, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt.zero_grad()
    model(torch.randn(4, 8, generator=g)).square().sum().backward()
    opt.step()


def states(mgr):
    return {n: s.state for n, s in mgr.state().items()}


# ---- the public API keeps working when called again ----
def test_memmgr_swap_is_the_function_on_every_call():
    a = memmgr.for_module(mlp(), pin_ahead=False)
    b = memmgr.for_module(mlp(1), pin_ahead=False)
    b.offload()
    for _ in range(3):
        memmgr.swap(out=a, into=b)
        a, b = b, a
    from memmgr.swap import SwapLedger, swap  # importing from the submodule again must not shadow the function

    assert callable(memmgr.swap) and memmgr.swap is swap and SwapLedger is not None
    assert states(a)["weights"] == "on_device" and states(b)["weights"] == "on_host"


def test_generator_of_tensors_makes_a_full_group():
    mgr = MemoryManager(pool=HostMemoryPool(pin=False))
    tensors = [torch.randn(4) for _ in range(3)]
    group = mgr.add_group("w", (t for t in tensors))
    assert len(group.tensors) == 3 and group.nbytes >= 3 * 16
    module = mlp()
    assert len(mgr.add_group("m", module.parameters()).tensors) == 4


# ---- phases and weight syncs restore what was there, unit by unit ----
def test_weight_sync_nested_in_a_phase_leaves_weights_off_until_the_phase_ends():
    model = mlp()
    mgr = memmgr.for_module(model, pin_ahead=False)
    with mgr.phase("generate"):
        assert states(mgr)["weights"] == "on_host"
        with mgr.weight_sync() as weights:
            assert states(mgr)["weights"] == "on_device" and len(weights) == 4
        assert states(mgr)["weights"] == "on_host"
        with mgr.weight_sync():  # and again: the second sync leaves them off too
            pass
        assert mgr.state()["weights"].device_bytes == 0
    assert states(mgr)["weights"] == "on_device"


def test_nested_weight_syncs_each_restore_their_own_placement():
    mgr = memmgr.for_module(mlp(), pin_ahead=False)
    mgr.offload()
    with mgr.weight_sync():
        with mgr.weight_sync():
            pass
        assert states(mgr)["weights"] == "on_device"  # the inner sync found them on the device
    assert states(mgr)["weights"] == "on_host"
    with pytest.raises(memmgr.MemmgrStateError, match="without a begin_weight_sync"):
        mgr.end_weight_sync()


def test_leaving_a_phase_restores_a_budgeted_offload_bucket_by_bucket():
    model = mlp()
    mgr = memmgr.for_module(model, bucket_size_mb=200 / 2**20, pin_ahead=False)  # several buckets
    assert len(mgr.group("weights").buckets) > 1
    plan = mgr.free(100)
    off = {b.name for b in mgr.group("weights").buckets if b.device_bytes == 0}
    assert states(mgr)["weights"] == "partial" and off == {i[1] for i in plan}
    with mgr.phase("generate"):
        assert mgr.state()["weights"].device_bytes == 0
    assert states(mgr)["weights"] == "partial"
    assert {b.name for b in mgr.group("weights").buckets if b.device_bytes == 0} == off
    with mgr.phase("train", keep=["weights"]):  # a kept partial group stays as it is
        assert {b.name for b in mgr.group("weights").buckets if b.device_bytes == 0} == off
    plan.onload()
    assert states(mgr)["weights"] == "on_device"


def test_failed_onload_in_weight_sync_leaves_the_weights_off_and_runs_the_after_hooks():
    model = mlp()
    expected = [p.detach().clone() for p in model.parameters()]
    mgr = memmgr.for_module(model, pin_ahead=False)
    mgr.offload()
    events = []
    mgr.register_hook("after_weight_sync", lambda e, g: events.append(e))

    def failing(_event, _groups):
        raise RuntimeError("engine refused the weights")

    handle = mgr.register_hook("after_onload", failing)
    with pytest.raises(RuntimeError, match="engine refused"):
        with mgr.weight_sync():
            pytest.fail("the body must not run")
    assert states(mgr)["weights"] == "on_host" and mgr.state()["weights"].device_bytes == 0
    assert events == ["after_weight_sync"]
    handle.remove()
    mgr.onload()
    assert all(same_bits(p, e) for p, e in zip(model.parameters(), expected))
