"""sync_weights: one call runs the before/after-sync hooks once each, in order (also when the sync fails), streams
the exported weights into the engine from device memory or from the pinned host copy without onloading them."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")

from export_models import build_chunks, hf_config, randomize, single_rank_megatron  # noqa: E402
from memmgr.errors import MemmgrInputError, MemmgrSyncError  # noqa: E402
from memmgr.host_memory import HostMemoryPool  # noqa: E402
from memmgr.sync.export import MegatronExporter  # noqa: E402
from memmgr.sync.session import sync_weights  # noqa: E402

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
