"""Megatron -> Hugging Face export, single process: the host-copy source of an offloaded weights group, the
TransformerEngine spec's fused-norm names and the legacy GroupedMLP's stacked experts give the same tensors as the
local spec from device memory; buckets stay within their bound; bad inputs raise before anything is exported."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")

from memmgr.tools.megatron_models import build_chunks, hf_config, randomize, single_rank_megatron  # noqa: E402
from memmgr.errors import MemmgrInputError, MemmgrStateError  # noqa: E402
from memmgr.host_memory import HostMemoryPool  # noqa: E402
from memmgr.sync.export import MegatronExporter, MemmgrExportError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")


@pytest.fixture(scope="module")
def megatron_env(tmp_path_factory):
    with single_rank_megatron(tmp_path_factory.mktemp("dist")):
        yield


def export(chunks, family, **kwargs) -> dict[str, torch.Tensor]:
    exporter = MegatronExporter(chunks, hf_config(family), **kwargs)
    return {name: t.clone() for bucket in exporter.buckets() for name, t in bucket.named_tensors()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], ordered: bool = True) -> None:
    assert list(a) == list(b) if ordered else sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def model(family: str, seed: int = 1):
    torch.manual_seed(0)
    chunks = build_chunks(family)
    randomize(chunks, seed=seed)
    return chunks


@pytest.mark.parametrize("use_distributed_optimizer", [True, False])
def test_offloaded_weights_export_from_the_host_copy_bit_for_bit(megatron_env, use_distributed_optimizer):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from memmgr.integrations.megatron import for_megatron

    chunks = model("qwen3_moe")
    reference = export(chunks, "qwen3_moe")
    ddp = DistributedDataParallel(chunks[0].config, DistributedDataParallelConfig(
        use_distributed_optimizer=use_distributed_optimizer), chunks[0])
    pool = HostMemoryPool()
    mgr = for_megatron(ddp, None, pool=pool, bucket_size_mb=0.05)
    try:
        weights = mgr.group("weights")
        on_device = export([ddp], "qwen3_moe", weights=weights, bucket_bytes=32 * 1024)
        mgr.offload("weights")
        assert weights.device_bytes == 0
        with pytest.raises(MemmgrStateError, match="nothing was sent.*host copy"):
            export([ddp], "qwen3_moe")
        from_host = export([ddp], "qwen3_moe", weights=weights, bucket_bytes=32 * 1024)
        assert weights.device_bytes == 0, "the export must not onload the weights"
        same(reference, on_device)
        same(reference, from_host)
    finally:
        mgr.close()
        pool.trim()


def test_weights_group_of_another_model_is_refused(megatron_env):
    from memmgr.flat_tensors import BucketizedFlatTensors

    chunks = model("llama")
    other = BucketizedFlatTensors({"x": torch.zeros(4)}, name="weights")
    with pytest.raises(MemmgrExportError, match="not in the weights group"):
        MegatronExporter(chunks, hf_config("llama"), weights=other)


def _move_param(owner: torch.nn.Module, name: str, new_owner: torch.nn.Module, new_name: str) -> None:
    param = getattr(owner, name)
    del owner._parameters[name]  # test-only surgery: the same tensor, registered under the TE spec's name
    new_owner.register_parameter(new_name, param)


def test_transformer_engine_spec_names_export_like_the_local_spec(megatron_env):
    """TE fuses input/pre-MLP norms into linear_qkv/linear_fc1 (``layer_norm_weight``) and names grouped experts
    ``experts.linear_fc1.weight<i>``; the same tensors under those names must export identically."""
    chunks = model("qwen3_moe")
    reference = export(chunks, "qwen3_moe")
    for layer in chunks[0].decoder.layers:
        _move_param(layer.input_layernorm, "weight", layer.self_attention.linear_qkv, "layer_norm_weight")
        experts = layer.mlp.experts
        fc1, fc2 = torch.nn.Module(), torch.nn.Module()
        for i, expert in enumerate(experts.local_experts):
            _move_param(expert.linear_fc1, "weight", fc1, f"weight{i}")
            _move_param(expert.linear_fc2, "weight", fc2, f"weight{i}")
        del experts.local_experts
        experts.linear_fc1, experts.linear_fc2 = fc1, fc2
    names = [n for n, _ in chunks[0].named_parameters()]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in names
    assert "decoder.layers.0.mlp.experts.linear_fc1.weight3" in names
    same(reference, export(chunks, "qwen3_moe"))


def test_dense_te_fused_pre_mlp_norm_exports_like_the_local_spec(megatron_env):
    chunks = model("llama")
    reference = export(chunks, "llama")
    for layer in chunks[0].decoder.layers:
        _move_param(layer.pre_mlp_layernorm, "weight", layer.mlp.linear_fc1, "layer_norm_weight")
    same(reference, export(chunks, "llama"))


def test_legacy_grouped_mlp_stacked_experts_export_like_sequential_experts(megatron_env):
    """GroupedMLP keeps all local experts in weight1 [hidden, experts*2*ffn] (read as [experts, hidden, 2*ffn]) and
    weight2 [experts*ffn, hidden]; built here from the sequential experts' weights the way its forward reads them."""
    chunks = model("qwen3_moe")
    reference = export(chunks, "qwen3_moe")
    for layer in chunks[0].decoder.layers:
        experts = layer.mlp.experts
        w1 = torch.stack([e.linear_fc1.weight.detach().t() for e in experts.local_experts])  # [E, hidden, 2F]
        w2 = torch.stack([e.linear_fc2.weight.detach().t() for e in experts.local_experts])  # [E, F, hidden]
        hidden = w1.shape[1]
        del experts.local_experts
        experts.weight1 = torch.nn.Parameter(w1.reshape(hidden, -1))
        experts.weight2 = torch.nn.Parameter(w2.reshape(-1, hidden))
    # one parameter holds all experts' gate/up (and another all down), so the order differs, not the tensors
    same(reference, export(chunks, "qwen3_moe"), ordered=False)


def test_buckets_hold_whole_parameters_within_the_bound_in_checkpoint_order(megatron_env):
    chunks = model("qwen2")
    cfg = hf_config("qwen2")
    bound = 20 * 1024
    exporter = MegatronExporter(chunks, cfg, bucket_bytes=bound)
    names = []
    largest = max(e.numel * 4 for e in exporter.entries)
    count = 0
    layouts = exporter.bucket_layouts
    for bucket in exporter.buckets():
        numels, entries = layouts[count]
        assert {d: t.numel() for d, t in bucket.flats.items()} == numels and bucket.entries == entries
        count += 1
        assert bucket.nbytes <= max(bound, largest * 3 + 256)  # a fused qkv larger than the bound goes alone
        if len(bucket.entries) > 3:
            assert bucket.nbytes <= bound
        assert all(t.dim() == 1 for t in bucket.flats.values())
        names += [e.name for e in bucket.entries]
    assert count == len(layouts) > 3
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "model.norm.weight"
    assert "lm_head.weight" not in names  # tied: the engine ties it to the embedding
    assert names.index("model.layers.0.mlp.down_proj.weight") < names.index("model.layers.1.input_layernorm.weight")
    assert len(names) == len(set(names)) == len(exporter.entries)
    assert exporter.entries[0].shape == (cfg.vocab_size, cfg.hidden_size)  # padding rows dropped


def test_hf_config_that_disagrees_with_the_model_names_the_field(megatron_env):
    chunks = model("llama")
    cfg = hf_config("llama")
    cfg.num_key_value_heads = 4
    with pytest.raises(MemmgrExportError, match=r"num_query_groups=2 .* kv_heads=4"):
        MegatronExporter(chunks, cfg)
    cfg = hf_config("llama")
    cfg.intermediate_size = 128
    with pytest.raises(MemmgrExportError, match=r"ffn_hidden_size=96"):
        MegatronExporter(chunks, cfg)
    cfg = hf_config("llama")
    cfg.vocab_size = 200
    with pytest.raises(MemmgrExportError, match=r"embedding\.word_embeddings\.weight.*fewer than the Hugging Face "
                                                r"vocab_size 200"):
        MegatronExporter(chunks, cfg)
    cfg = hf_config("llama")
    cfg.tie_word_embeddings = True
    with pytest.raises(MemmgrExportError, match="share_embeddings_and_output_weights=False"):
        MegatronExporter(chunks, cfg)
    assert issubclass(MemmgrExportError, MemmgrInputError)


def test_unknown_parameter_and_unknown_family_raise_before_anything_is_exported(megatron_env):
    chunks = model("llama")
    chunks[0].decoder.layers[0].mlp.register_parameter("extra_scale", torch.nn.Parameter(torch.ones(3)))
    with pytest.raises(MemmgrExportError, match=r"decoder\.layers\.0\.mlp\.extra_scale.*unknown parameter"):
        MegatronExporter(chunks, hf_config("llama"))
    with pytest.raises(MemmgrExportError, match=r"q_layernorm\.weight.*no row of the qwen2 table"):
        # a Qwen3 model served as Qwen2: its q/k norms have no Qwen2 name
        MegatronExporter(model("qwen3"), _as_type(hf_config("qwen3"), "qwen2"))
    with pytest.raises(MemmgrExportError, match=r"receivers=\[1\]"):
        MegatronExporter(model("llama"), hf_config("llama"), receivers=[1])  # a world of one rank
    cfg = hf_config("llama")
    cfg.model_type = "gpt2"
    with pytest.raises(MemmgrExportError, match="'gpt2' has no export table"):
        MegatronExporter(model("llama"), cfg)


def _as_type(cfg, model_type: str):
    cfg.model_type = model_type
    return cfg


def test_mixed_dtypes_give_one_flat_per_dtype_in_a_bucket(megatron_env):
    chunks = model("llama")
    reference = export(chunks, "llama")
    for name, p in chunks[0].named_parameters():
        if "norm" not in name:
            p.data = p.data.to(torch.bfloat16)
    buckets = list(MegatronExporter(chunks, hf_config("llama"), bucket_bytes=1 << 20).buckets())
    assert len(buckets) == 1 and set(buckets[0].flats) == {torch.float32, torch.bfloat16}
    got = dict(buckets[0].named_tensors())
    assert list(got) == list(reference)
    for name, ref in reference.items():
        expected = ref if "norm" in name else ref.to(torch.bfloat16)
        assert got[name].dtype == expected.dtype and torch.equal(got[name], expected), name
