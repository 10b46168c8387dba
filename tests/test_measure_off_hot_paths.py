"""Measurement only when asked: ``sync_weights`` neither synchronizes the device nor resets the allocator's peak
statistics without ``measure=True``; ``swap`` leaves the peak statistics alone unless ``track_torch_peak=True``;
``NcclCommunicators`` queries NVML and polls only with ``measure=True`` (a release still synchronizes); and a move
reads its copy policy from the environment once, for every bucket it copies.

No GPU is needed: CUDA is reported available where the code decides on it, and the CUDA calls that measure are
replaced by recorders, so a call that should not happen is seen."""
from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from memmgr import moves, transfer
from memmgr.comms import NATIVE, NcclCommunicators
from memmgr.errors import MemmgrInputError
from memmgr.host_memory import HostMemoryPool
from memmgr.manager import MemoryManager
from memmgr.states import BucketState
from memmgr.swap import swap
from memmgr.sync.session import sync_weights
from memmgr.transfer import CopyPolicy, TransferHandle


class CudaCalls:
    """Stands in for the CUDA calls that measure, recording each; CUDA reports itself available."""

    NAMES = ("synchronize", "reset_peak_memory_stats", "memory_allocated", "max_memory_allocated", "memory_stats")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        for name in self.NAMES:
            monkeypatch.setattr(torch.cuda, name, self._recorder(name))

    def _recorder(self, name):
        def record(*args, **kwargs):
            self.calls.append(name)
            return {"allocated_bytes.all.peak": 7} if name == "memory_stats" else 0
        return record


# ---- sync_weights

class EngineAdapter:
    """An engine with ``sync(weights, specs=..., weight_version=...)``: takes every bucket, reports the bytes."""

    def __init__(self):
        self.buckets = 0

    def sync(self, buckets, *, specs, weight_version):
        nbytes = 0
        for bucket in buckets:
            self.buckets += 1
            nbytes += bucket.numel() * bucket.element_size()
        return SimpleNamespace(nbytes=nbytes, buckets=self.buckets)


class Exporter:
    entries: list = []
    is_receiver = True

    def __init__(self, weights):
        self.weights = weights

    def buckets(self):
        yield from self.weights.values()


@pytest.fixture
def trainer():
    weights = {f"w{i}": torch.full((256,), float(i)) for i in range(3)}
    mgr = MemoryManager(pool=HostMemoryPool())
    mgr.add_group("weights", weights)
    yield mgr, Exporter(weights)
    mgr.close()


def test_sync_weights_without_measure_neither_synchronizes_nor_resets_peak_stats(trainer, monkeypatch):
    mgr, exporter = trainer
    cuda = CudaCalls(monkeypatch)
    result = sync_weights(mgr, exporter, EngineAdapter())
    assert cuda.calls == []
    assert result.nbytes == 3 * 256 * 4 and result.buckets == 3
    assert result.peak_extra_gpu_bytes is None and not result.measured


def test_sync_weights_with_measure_synchronizes_around_the_sync_and_reports_the_peak(trainer, monkeypatch):
    mgr, exporter = trainer
    cuda = CudaCalls(monkeypatch)
    result = sync_weights(mgr, exporter, EngineAdapter(), measure=True)
    assert cuda.calls == ["synchronize", "reset_peak_memory_stats", "memory_allocated", "synchronize",
                          "max_memory_allocated"]
    assert result.peak_extra_gpu_bytes == 0 and result.measured


def test_sync_weights_refuses_a_measure_that_is_not_a_bool(trainer):
    mgr, exporter = trainer
    with pytest.raises(MemmgrInputError, match="measure"):
        sync_weights(mgr, exporter, EngineAdapter(), measure="yes")


# ---- swap

def _two_managers():
    pool = HostMemoryPool()
    a, b = MemoryManager(pool=pool), MemoryManager(pool=pool)
    a.add_group("state", {"x": torch.arange(512, dtype=torch.float32)})
    b.add_group("state", {"y": torch.arange(512, dtype=torch.float32) * 2})
    b.offload()
    return a, b


def test_swap_leaves_the_peak_stats_alone_by_default_and_resets_them_only_when_tracking(monkeypatch):
    # The swap's device decides whether it measures; it is reported as a GPU so that the decision is exercised.
    monkeypatch.setattr(importlib.import_module("memmgr.swap"), "_device_of", lambda units: torch.device("cuda", 0))
    a, b = _two_managers()
    try:
        cuda = CudaCalls(monkeypatch)
        plain = swap(out=a, into=b)
        assert "reset_peak_memory_stats" not in cuda.calls and "memory_stats" not in cuda.calls
        assert plain.torch_peak_allocated_delta is None and plain.torch_peak_reserved_delta is None
        assert torch.equal(b.group("state").named_tensors[0][1], torch.arange(512, dtype=torch.float32) * 2)
        tracked = swap(out=b, into=a, track_torch_peak=True)
        assert cuda.calls.count("reset_peak_memory_stats") == 1
        assert tracked.torch_peak_allocated_delta == 7
    finally:
        a.close()
        b.close()


# ---- NcclCommunicators

class FakeSuspendBackend:
    def __init__(self):
        self.calls: list[str] = []

    def suspend(self):
        self.calls.append("suspend")

    def resume(self):
        self.calls.append("resume")


@pytest.fixture
def gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        yield dist.new_group([0])
    finally:
        dist.destroy_process_group()


def _comms_cycle(monkeypatch, group, measure: bool):
    """One release and restore of a natively suspended communicator on "cuda:0", with the device synchronize, the
    usage query and the poll's sleep recorded."""
    calls: list[str] = []
    usage = iter(range(10_000, 0, -100))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append("synchronize"))
    monkeypatch.setattr("memmgr.comms.process_gpu_bytes",
                        lambda device: (calls.append("usage") or next(usage), "nvml"))
    monkeypatch.setattr("memmgr.comms.time.sleep", lambda s: calls.append("sleep"))
    backend = FakeSuspendBackend()
    comms = NcclCommunicators(device="cuda:0", measure=measure) if measure is not None else \
        NcclCommunicators(device="cuda:0")
    assert comms.register("tp", group, backend=backend) == NATIVE
    comms.offload()
    released = list(calls)
    calls.clear()
    comms.onload()
    assert backend.calls == ["suspend", "resume"]
    return comms, released, list(calls)


def test_communicators_by_default_run_no_usage_query_and_no_poll_but_synchronize_before_a_release(monkeypatch,
                                                                                                   gloo_group):
    comms, released, restored = _comms_cycle(monkeypatch, gloo_group, measure=None)
    assert comms.measure is False
    assert released == ["synchronize"]  # the communicator must be idle before it is suspended
    assert restored == []
    (row,) = comms.report()
    assert row["bytes_freed"] is None and row["bytes_restored"] is None and comms.nbytes == 0


def test_communicators_with_measure_query_the_usage_around_release_and_restore(monkeypatch, gloo_group):
    comms, released, restored = _comms_cycle(monkeypatch, gloo_group, measure=True)
    assert released.count("usage") >= 2 and "sleep" in released
    assert restored.count("usage") >= 2
    (row,) = comms.report()
    assert row["bytes_freed"] is not None and row["bytes_freed"] > 0


# ---- the copy policy

class CopyingUnit:
    """A unit that copies its bytes with ``issue_copy`` as a GPU bucket does (here host to host), recording the
    policy in force at each copy; ``on_copy`` runs after each copy."""

    def __init__(self, name: str, log: list, on_copy=None):
        self.name = name
        self.data = torch.arange(64, dtype=torch.uint8)
        self.host = torch.zeros(64, dtype=torch.uint8)
        self._state = BucketState.ON_DEVICE
        self.log = log
        self.on_copy = on_copy
        self.device = None

    @property
    def state(self):
        return self._state

    @property
    def nbytes(self):
        return 64

    @property
    def device_bytes(self):
        return 64 if self._state is BucketState.ON_DEVICE else 0

    def _copy(self, dst, src):
        transfer.issue_copy(dst, src, None)
        self.log.append((self.name, transfer.active_copy_policy()))
        if self.on_copy is not None:
            self.on_copy()

    def begin_offload(self, discard=None):
        self._copy(self.host, self.data)
        return True

    def check_intact(self, what):
        pass

    def abandon_offload(self):
        pass

    def offload(self, non_blocking=False, discard=None):
        self._state = BucketState.ON_HOST
        return TransferHandle.completed()

    def allocate(self):
        return True

    def onload(self, non_blocking=False, *, zero_after=None):
        self._copy(self.data, self.host)
        self._state = BucketState.ON_DEVICE
        return TransferHandle.completed()

    def revert_onload(self, state):
        self._state = state

    def checksum_mismatch(self):
        return None

    def clear_checksums(self):
        pass


@pytest.fixture
def env_reads(monkeypatch):
    """Counts the reads of $MEMMGR_COPY_PATH (``resolve_copy_path`` without a path)."""
    reads = []
    original = transfer.resolve_copy_path

    def counting(path=None):
        if path is None:
            reads.append(path)
        return original(path)

    monkeypatch.setattr(transfer, "resolve_copy_path", counting)
    return reads


def test_a_move_reads_the_copy_policy_once_and_every_bucket_copies_under_it(monkeypatch, env_reads):
    monkeypatch.setenv("MEMMGR_COPY_PATH", "engine")
    log: list = []
    # after the first copy the variable turns invalid: a move that read it per copy would fail on the next bucket
    units = [CopyingUnit("u0", log, on_copy=lambda: monkeypatch.setenv("MEMMGR_COPY_PATH", "nonsense"))] + \
        [CopyingUnit(f"u{i}", log) for i in range(1, 4)]
    moves.offload_units(units).wait()
    assert len(env_reads) == 1
    assert [policy for _, policy in log] == [CopyPolicy("engine")] * 4
    assert all(torch.equal(u.host, u.data) for u in units)

    monkeypatch.setenv("MEMMGR_COPY_PATH", "kernel")
    log.clear()
    units[0].on_copy = lambda: monkeypatch.setenv("MEMMGR_COPY_PATH", "nonsense")
    moves.onload_units(units, what="test onload")
    assert len(env_reads) == 2  # one more move, one more read
    assert [policy for _, policy in log] == [CopyPolicy("kernel")] * 4
    # the next move reads the variable again, and refuses it before anything moves
    with pytest.raises(MemmgrInputError, match=r"'nonsense'.*MEMMGR_COPY_PATH.*auto, engine, kernel;"):
        moves.offload_units(units)
    assert all(u.state is BucketState.ON_DEVICE for u in units)


def test_an_explicit_policy_is_used_without_reading_the_environment(monkeypatch, env_reads):
    monkeypatch.setenv("MEMMGR_COPY_PATH", "nonsense")
    log: list = []
    units = [CopyingUnit(f"u{i}", log) for i in range(3)]
    moves.offload_units(units, copy_policy=CopyPolicy("kernel", kernel_blocks=4))
    txn = moves.OnloadTransaction("test onload", copy_policy=CopyPolicy("engine"))
    txn.issue_all(units)
    assert env_reads == []
    assert [policy for _, policy in log] == [CopyPolicy("kernel", 4)] * 3 + [CopyPolicy("engine")] * 3


def test_split_and_unknown_copy_paths_are_refused_naming_the_allowed_ones(monkeypatch):
    monkeypatch.setenv("MEMMGR_COPY_PATH", "split")
    with pytest.raises(MemmgrInputError, match=r"'split'.*MEMMGR_COPY_PATH.*auto, engine, kernel;"):
        CopyPolicy.from_env()
    with pytest.raises(MemmgrInputError, match=r"auto, engine, kernel"):
        CopyPolicy("split")
    with pytest.raises(MemmgrInputError, match=r"auto, engine, kernel"):
        CopyPolicy(None)  # type: ignore[arg-type]
    with pytest.raises(MemmgrInputError, match="kernel_blocks must be a whole number"):
        CopyPolicy("engine", kernel_blocks=-1)
    monkeypatch.setenv("MEMMGR_COPY_PATH", " Kernel ")
    monkeypatch.setenv("MEMMGR_COPY_KERNEL_BLOCKS", "66")
    assert CopyPolicy.from_env() == CopyPolicy("kernel", 66)
    with pytest.raises(AttributeError):
        CopyPolicy.from_env().path = "engine"  # type: ignore[misc]


def test_a_copy_outside_any_move_reads_the_environment_for_itself(monkeypatch, env_reads):
    monkeypatch.setenv("MEMMGR_COPY_PATH", "engine")
    src, dst = torch.arange(32, dtype=torch.uint8), torch.zeros(32, dtype=torch.uint8)
    assert transfer.issue_copy(dst, src, None) == "engine" and torch.equal(dst, src)
    assert len(env_reads) == 1
    monkeypatch.setenv("MEMMGR_COPY_PATH", "split")
    with pytest.raises(MemmgrInputError, match="auto, engine, kernel;"):
        transfer.issue_copy(dst, src, None)


def test_a_ledger_turns_on_the_byte_measurement_of_the_communicators_it_reports(tmp_path):
    import memmgr
    from memmgr.comms import NcclCommunicators
    from memmgr.ledger import Ledger

    mgr = memmgr.for_module(torch.nn.Linear(4, 4))
    comms = NcclCommunicators("nccl", device="cpu")
    mgr.add_group("nccl", comms)
    assert comms.measure is False  # measured only when asked
    Ledger(str(tmp_path / "ledger.jsonl")).attach(mgr, "trainer")
    assert comms.measure is True
    mgr.close()
