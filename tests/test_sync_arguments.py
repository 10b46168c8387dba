"""Bad arguments to the sync's constructors raise MemmgrInputError naming the argument, at the call."""
from __future__ import annotations


import pytest

from memmgr.errors import MemmgrInputError, MemmgrStateError


class _Client:
    """Just enough of vLLM's client protocol for VLLMWeightSync's constructor (nothing is called)."""

    def init_weight_transfer_engine(self, info): ...
    def start_weight_update(self): ...
    def update_weights(self, info): ...
    def finish_weight_update(self, version=None): ...
    def collective_rpc(self, method, *a, **k): return []


@pytest.mark.parametrize("name, value", [
    ("timeout_s", -1), ("timeout_s", 0), ("timeout_s", "60"), ("timeout_s", float("nan")),
    ("bucket_bytes", 0), ("bucket_bytes", -5), ("bucket_bytes", 1.5), ("bucket_bytes", True),
    ("num_workers", 0), ("num_workers", -1), ("num_workers", "2"),
    ("master_port", 0), ("master_port", 70000), ("atomic", 1),
])
def test_vllm_weight_sync_refuses_a_bad_argument_naming_it(name, value):
    pytest.importorskip("vllm")
    from memmgr.sync.engines.vllm import VLLMWeightSync

    with pytest.raises(MemmgrInputError, match=f"VLLMWeightSync: {name} must be"):
        VLLMWeightSync(_Client(), **{name: value})


def test_vllm_weight_sync_takes_good_arguments():
    pytest.importorskip("vllm")
    from memmgr.sync.engines.vllm import VLLMWeightSync

    sync = VLLMWeightSync(_Client(), timeout_s=5, bucket_bytes=1 << 20, num_workers=2, atomic=False)
    assert (sync.timeout_s, sync.bucket_bytes, sync.num_workers, sync.atomic) == (5.0, 1 << 20, 2, False)


@pytest.fixture(scope="module")
def megatron_env(tmp_path_factory):
    pytest.importorskip("megatron.core")
    pytest.importorskip("transformers")
    from memmgr.tools.megatron_models import single_rank_megatron

    with single_rank_megatron(tmp_path_factory.mktemp("dist")):
        yield


@pytest.mark.parametrize("kwargs, named", [
    (dict(receivers="0"), "receivers"), (dict(receivers=(-1,)), "receivers"), (dict(receivers=(1,)), "receivers"),
    (dict(receivers=()), "receivers"), (dict(receivers=(0.5,)), "receivers"), (dict(receivers=None), "receivers"),
    (dict(device="nope"), "device"), (dict(device=3.5), "device"), (dict(device="meta"), "device"),
    (dict(bucket_bytes=0), "bucket_bytes"), (dict(bucket_bytes=True), "bucket_bytes"),
    (dict(group="tp"), "group"), (dict(group=0), "group"),
])
def test_megatron_exporter_refuses_a_bad_argument_naming_it(megatron_env, kwargs, named):
    from memmgr.tools.megatron_models import build_chunks, hf_config
    from memmgr.sync.export import MegatronExporter

    with pytest.raises(MemmgrInputError, match=named):
        MegatronExporter(build_chunks("llama"), hf_config("llama"), **kwargs)


def test_an_exporter_kept_across_close_refuses_instead_of_reading_freed_memory(megatron_env):
    import memmgr
    from memmgr.tools.megatron_models import build_chunks, hf_config
    from memmgr.sync.export import MegatronExporter

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    model = build_chunks("llama")[0]
    chunks = [DistributedDataParallel(model.config, DistributedDataParallelConfig(use_distributed_optimizer=True),
                                      model)]
    mgr = memmgr.for_megatron(chunks, None)
    exporter = MegatronExporter(chunks, hf_config("llama"), weights=mgr.group("weights"))
    assert next(iter(exporter.buckets())) is not None
    mgr.close()
    again = memmgr.for_megatron(chunks, None)  # the same model under a new manager, offloaded
    again.offload()
    with pytest.raises(MemmgrStateError, match="closed"):
        next(iter(exporter.buckets()))
    fresh = MegatronExporter(chunks, hf_config("llama"), weights=again.group("weights"))
    assert next(iter(fresh.buckets())) is not None  # built from the open manager, it reads the host copy
    again.close()
