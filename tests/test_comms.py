"""memmgr.comms.NcclCommunicators on the CPU: gloo process groups in two processes stand in for NCCL ones.

The native path is driven through a backend object exposing ``suspend()``/``resume()`` (what recent PyTorch's
ProcessGroupNCCL offers), the fallback path destroys real gloo groups and re-creates them through the registered
factory; in both, collectives on the restored groups must give correct results.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from memmgr import MemoryManager
from memmgr.comms import NATIVE, RECREATE, NcclCommunicators
from memmgr.integrations.megatron import megatron_process_groups
from memmgr.errors import MemmgrInputError, MemmgrStateError
from memmgr.groups import MovableUnit, StateGroup
from memmgr.host_memory import HostMemoryPool
from memmgr.ledger import Ledger, gpu_categories
from memmgr.states import BucketState, GroupState


class FakeSuspendBackend:
    """Records the calls memmgr makes on a backend with native suspend/resume."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.suspended = False

    def suspend(self) -> None:
        assert not self.suspended, "suspend() called twice without resume()"
        self.calls.append("suspend")
        self.suspended = True

    def resume(self) -> None:
        assert self.suspended, "resume() called without suspend()"
        self.calls.append("resume")
        self.suspended = False

    def memory_stats(self) -> dict:
        return {"suspended": int(self.suspended), "total": 0 if self.suspended else 4096}


class UnsupportedSuspendBackend(FakeSuspendBackend):
    """What torch >= 2.12 gives a backend that cannot suspend: the methods exist and raise."""

    def suspend(self) -> None:
        raise RuntimeError("Backend nccl does not support suspend")


def _run(fn, tmp_path, world: int = 2) -> None:
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        torch.multiprocessing.spawn(fn, args=(world, str(tmp_path)), nprocs=world, join=True)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old


def _init(rank: int, world: int, workdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{workdir}/init", rank=rank, world_size=world)


def _summed(group) -> float:
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t, group=group)
    return float(t.item())


def _native_worker(rank: int, world: int, workdir: str) -> None:
    _init(rank, world, workdir)
    try:
        tp = dist.new_group([0, 1])
        dp = dist.new_group([0, 1])
        fakes = {"tp": FakeSuspendBackend(), "dp": FakeSuspendBackend()}
        comms = NcclCommunicators(device="cpu")
        assert comms.register("tp", tp, backend=fakes["tp"]) == NATIVE
        assert comms.register("dp", dp, backend=fakes["dp"]) == NATIVE
        mgr = MemoryManager(pool=HostMemoryPool())
        mgr.add_group("nccl", comms)
        for _cycle in range(2):
            mgr.offload()
            assert all(f.suspended for f in fakes.values())
            assert mgr.state["nccl"].state == GroupState.DISCARDED.value
            assert [r["state"] for r in comms.report()] == ["suspended", "suspended"]
            with pytest.raises(MemmgrStateError, match="onload"):
                comms.process_group("tp")
            mgr.onload()
            assert not any(f.suspended for f in fakes.values())
            assert comms.state is BucketState.ON_DEVICE
            # the same group objects stay valid: native suspend keeps every reference a framework holds
            assert comms.process_group("tp") is tp and comms.process_group("dp") is dp
            assert _summed(tp) == 3.0 and _summed(dp) == 3.0
        assert fakes["tp"].calls == ["suspend", "resume"] * 2
        rows = {r["name"]: r for r in comms.report()}
        assert rows["tp"]["method"] == "suspend" and rows["tp"]["releases"] == 2
        assert rows["tp"]["memory_stats"] == {"suspended": 0, "total": 4096}
        mgr.close()
    finally:
        dist.destroy_process_group()


def _recreate_worker(rank: int, world: int, workdir: str) -> None:
    _init(rank, world, workdir)
    try:
        holder = {"tp": dist.new_group([0, 1])}
        first = holder["tp"]
        rebinds = []

        def rebind(group) -> None:
            rebinds.append(group)
            holder["tp"] = group

        comms = NcclCommunicators(device="cpu")
        method = comms.register("tp", holder["tp"], create=lambda: dist.new_group([0, 1]), rebind=rebind)
        assert method == RECREATE
        # a backend whose suspend() exists but fails is re-created instead, from its first release on
        holder["pp"] = dist.new_group([0, 1])
        assert comms.register("pp", holder["pp"], backend=UnsupportedSuspendBackend(),
                              create=lambda: dist.new_group([0, 1]),
                              rebind=lambda g: holder.__setitem__("pp", g)) == NATIVE
        mgr = MemoryManager(pool=HostMemoryPool())
        mgr.add_group("nccl", comms)
        assert _summed(holder["tp"]) == 3.0
        for cycle in range(2):
            mgr.offload()
            assert [r["state"] for r in comms.report()] == ["destroyed", "destroyed"]
            assert comms.report()[1]["method"] == RECREATE
            assert mgr.state["nccl"].state == GroupState.DISCARDED.value
            mgr.onload()
            assert len(rebinds) == cycle + 1 and holder["tp"] is rebinds[-1]
            assert comms.process_group("tp") is holder["tp"] and holder["tp"] is not first
            assert _summed(holder["tp"]) == 3.0 and _summed(holder["pp"]) == 3.0
        # the destroyed group is gone from torch.distributed: what kept it holds a dead group (documented)
        with pytest.raises(ValueError, match="not registered"):
            dist.get_rank(group=first)
        mgr.close()
    finally:
        dist.destroy_process_group()


def test_communicators_conform_to_the_group_and_unit_protocols():
    comms = NcclCommunicators(device="cpu")
    assert isinstance(comms, StateGroup) and isinstance(comms, MovableUnit)
    assert comms.units == [comms] and comms.named_tensors == [] and comms.device_bytes == 0
    assert comms.state is BucketState.ON_DEVICE and comms.policy.value == "discard"


def test_native_suspend_and_resume_are_called_and_collectives_work_after(tmp_path):
    _run(_native_worker, tmp_path)


def test_fallback_destroys_and_recreates_through_the_factory(tmp_path):
    _run(_recreate_worker, tmp_path)


def test_register_refuses_a_group_it_cannot_release(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        comms = NcclCommunicators(device="cpu")
        with pytest.raises(MemmgrInputError, match="create="):
            comms.register("tp", group)
        with pytest.raises(MemmgrInputError, match="world"):
            comms.register("world", dist.group.WORLD, create=lambda: None)
        comms.register("tp", group, create=lambda: dist.new_group([0]))
        with pytest.raises(MemmgrInputError, match="registered already"):
            comms.register("tp", group, create=lambda: dist.new_group([0]))
        with pytest.raises(MemmgrInputError, match="no communicator"):
            comms.process_group("pp")
    finally:
        dist.destroy_process_group()


def test_megatron_groups_are_found_by_role(tmp_path):
    pytest.importorskip("megatron.core")
    from megatron.core import parallel_state as ps

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        ps.initialize_model_parallel(1, 1)
        assert megatron_process_groups() == {}  # world size 1: every group has one rank
        found = megatron_process_groups(with_single_rank=True)
        assert found["tensor"] is ps.get_tensor_model_parallel_group()
        assert len({id(g) for g in found.values()}) == len(found)
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def test_ledger_reports_nccl_memory_as_its_own_category():
    gpu = {"allocated": 3 << 30, "reserved": 4 << 30, "managed": 1 << 30, "process": 6 << 30, "nccl": 1 << 29}
    cats = gpu_categories(gpu)
    assert cats["nccl"] == 1 << 29 and cats["non_pytorch"] == (2 << 30) - (1 << 29)
    assert sum(cats.values()) == gpu["process"]
    assert "nccl" not in gpu_categories({k: v for k, v in gpu.items() if k != "nccl"})
    mgr = MemoryManager(pool=HostMemoryPool())
    mgr.add_group("nccl", NcclCommunicators(device="cpu"))
    ledger = Ledger()
    ledger.track(mgr)
    (group,) = ledger.snapshot("x")["groups"]
    assert group["name"] == "nccl" and group["category"] == "nccl"
    mgr.close()


def _nccl_worker(rank: int, world: int, workdir: str) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{workdir}/init", rank=rank, world_size=world)
    try:
        holder = {"tp": dist.new_group([0, 1])}
        t = torch.ones(1 << 22, device="cuda")
        dist.all_reduce(t, group=holder["tp"])  # sets the communicator up
        comms = NcclCommunicators(device=torch.device("cuda", rank), measure=True)
        comms.register("tp", holder["tp"], create=lambda: dist.new_group([0, 1]),
                       rebind=lambda g: holder.__setitem__("tp", g))
        mgr = MemoryManager(pool=HostMemoryPool())
        mgr.add_group("nccl", comms)
        mgr.offload()
        (row,) = comms.report()
        assert row["bytes_freed"] is not None and row["bytes_freed"] > 0, row
        assert mgr.state["nccl"].device_bytes == 0
        mgr.onload()
        assert mgr.state["nccl"].device_bytes > 0
        x = torch.full((1024,), float(rank + 1), device="cuda")
        dist.all_reduce(x, group=holder["tp"])
        assert bool(torch.all(x == 3.0))
        mgr.close()
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_nccl_communicator_memory_is_freed_and_collectives_work_after_restore(tmp_path):
    _run(_nccl_worker, tmp_path)
