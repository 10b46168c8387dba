"""sync_weights: one call runs the before/after-sync hooks once each, in order (also when the sync fails), streams
the exported weights into the engine from device memory or from the pinned host copy without onloading them."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")

from memmgr.tools.megatron_models import build_chunks, hf_config, randomize, single_rank_megatron  # noqa: E402
from memmgr.errors import MemmgrInputError, MemmgrSyncError  # noqa: E402
from memmgr.host_memory import HostMemoryPool  # noqa: E402
from memmgr.sync.export import MegatronExporter  # noqa: E402
from memmgr.sync.session import sync_weights  # noqa: E402
from memmgr.sync.transports import InProcessTransport  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from memmgr.integrations.megatron import for_megatron

    with single_rank_megatron(tmp_path_factory.mktemp("dist")):
        torch.manual_seed(0)
        chunks = build_chunks("qwen3")
        randomize(chunks, seed=3)
        ddp = DistributedDataParallel(chunks[0].config, DistributedDataParallelConfig(
            use_distributed_optimizer=True), chunks[0])
        pool = HostMemoryPool()
        mgr = for_megatron(ddp, None, pool=pool, bucket_size_mb=0.05)
        exporter = MegatronExporter([ddp], hf_config("qwen3"), weights=mgr.group("weights"), bucket_bytes=32 * 1024)
        reference = {n: t.clone() for b in exporter.buckets() for n, t in b.named_tensors()}
        yield mgr, exporter, reference
        mgr.close()
        pool.trim()


class Engine:
    def __init__(self, fail_after: int | None = None):
        self.received: dict[str, torch.Tensor] = {}
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, pairs):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("engine broke")
        for name, tensor in pairs:
            self.received[name] = tensor.clone()


def record_hooks(mgr, events):
    return [mgr.register_hook(e, lambda event, groups: events.append(event))
            for e in ("before_weight_sync", "after_weight_sync", "before_onload", "after_onload")]


def test_one_call_streams_every_exported_tensor_between_the_hooks(trainer):
    mgr, exporter, reference = trainer
    events: list[str] = []
    handles = record_hooks(mgr, events)
    engine = Engine()
    try:
        result = sync_weights(mgr, exporter, engine)
    finally:
        for h in handles:
            h.remove()
    assert events == ["before_weight_sync", "after_weight_sync"]
    assert result.source == "device" and result.buckets > 1
    assert result.nbytes == sum(t.numel() * t.element_size() for t in reference.values())
    assert list(engine.received) == list(reference)
    assert all(torch.equal(engine.received[n], reference[n]) for n in reference)


def test_offloaded_weights_sync_from_the_host_copy_and_stay_offloaded(trainer):
    mgr, exporter, reference = trainer
    mgr.offload()
    try:
        events: list[str] = []
        handles = record_hooks(mgr, events)
        engine = Engine()
        result = sync_weights(mgr, exporter, engine)
        for h in handles:
            h.remove()
        assert result.source == "host copy"
        assert mgr.group("weights").device_bytes == 0, "the sync must not bring the weights back"
        assert events == ["before_weight_sync", "after_weight_sync"]  # no onload happened
        assert all(torch.equal(engine.received[n], reference[n]) for n in reference)
    finally:
        mgr.onload()


def test_a_failing_engine_still_runs_the_after_hook_once_and_raises(trainer):
    mgr, exporter, _ = trainer
    events: list[str] = []
    handles = record_hooks(mgr, events)
    try:
        with pytest.raises(MemmgrSyncError, match="engine broke|load_weights"):
            sync_weights(mgr, exporter, Engine(fail_after=1))
    finally:
        for h in handles:
            h.remove()
    assert events == ["before_weight_sync", "after_weight_sync"]


def test_bad_arguments_name_what_to_pass(trainer):
    mgr, exporter, _ = trainer
    with pytest.raises(MemmgrInputError, match="manager must be a MemoryManager"):
        sync_weights(object(), exporter, Engine())
    with pytest.raises(MemmgrInputError, match="exporter has no 'buckets'"):
        sync_weights(mgr, object(), Engine())
    with pytest.raises(MemmgrInputError, match="engine must be a Transport"):
        sync_weights(mgr, exporter, 42)


class ReservingTransport(InProcessTransport):
    """An in-process transport with memory of its own, as the IPC ring has: ``reserve`` hands out slots, and a
    bucket packed into one is sent from there (counted as in place); the engine copies it out at once."""

    def __init__(self, engine, slots: int = 2, slot_bytes: int = 64 * 1024):
        super().__init__(engine)
        self.slot_bytes = slot_bytes
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8) for _ in range(slots)]
        self.reserved: dict[int, int] = {}  # slot -> data_ptr handed out
        self.in_place = self.copied = 0

    def reserve(self, dtype, numel):
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        free = [i for i in range(len(self.slots)) if i not in self.reserved]
        if nbytes > self.slot_bytes or not free:
            return None
        view = self.slots[free[0]][:nbytes].view(dtype)
        self.reserved[free[0]] = view.data_ptr()
        return view

    def send_bucket(self, bucket):
        mine = [s for s, ptr in self.reserved.items() if ptr == bucket.flat.data_ptr()]
        if mine:
            del self.reserved[mine[0]]
            self.in_place += 1
        else:
            self.copied += 1
        super().send_bucket(bucket)

    def release_reservations(self):
        self.reserved.clear()


def test_export_is_packed_straight_into_the_transports_own_memory_where_it_has_some(trainer):
    mgr, exporter, reference = trainer
    engine = Engine()
    transport = ReservingTransport(engine)
    result = sync_weights(mgr, exporter, transport)
    assert transport.in_place == result.buckets > 1 and transport.copied == 0  # every bucket sent where it was packed
    assert set(engine.received) == set(reference)
    assert all(torch.equal(engine.received[n], t) for n, t in reference.items())
    # a bucket too large for a slot falls back to the exporter's own memory, and still arrives
    small = ReservingTransport(Engine(), slot_bytes=4096)
    sync_weights(mgr, exporter, small)
    assert small.copied > 0 and small.in_place > 0
    assert all(torch.equal(small.load_weights.received[n], t) for n, t in reference.items())
    staged = ReservingTransport(Engine())
    sync_weights(mgr, exporter, staged, pack_in_place=False)  # the exporter's own buckets, copied by the transport
    assert staged.in_place == 0 and staged.copied > 1
    assert all(torch.equal(staged.load_weights.received[n], t) for n, t in reference.items())


def test_exporter_refuses_memory_that_cannot_hold_a_bucket(trainer):
    _mgr, exporter, _reference = trainer
    with pytest.raises(MemmgrInputError, match="allocate.*returned"):
        next(iter(exporter.buckets(allocate=lambda dtype, numel: torch.empty(1, dtype=dtype))))
