"""The exporter checks the family's whole table against the model before anything moves: a model that lacks a tensor
the table requires raises MemmgrExportError naming the missing Hugging Face and megatron names and the family."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")

from memmgr.tools.megatron_models import FAMILIES, HF_VOCAB, RMS_EPS, ROPE_THETA, build_chunks, hf_config, randomize  # noqa: E402
from memmgr.tools.megatron_models import single_rank_megatron  # noqa: E402
from memmgr.sync.export import MegatronExporter, MemmgrExportError  # noqa: E402


@pytest.fixture(scope="module")
def megatron_env(tmp_path_factory):
    with single_rank_megatron(tmp_path_factory.mktemp("dist")):
        yield


def _qwen3_config_of_the_llama():
    """A qwen3 config with exactly the sizes of the llama test model (so only the table can tell them apart)."""
    from transformers import AutoConfig

    kwargs = dict(FAMILIES["llama"]["hf"])
    kwargs.pop("model_type")
    return AutoConfig.for_model("qwen3", vocab_size=HF_VOCAB, num_hidden_layers=2, rms_norm_eps=RMS_EPS,
                                rope_theta=ROPE_THETA, max_position_embeddings=64, **kwargs)


def test_llama_shaped_model_exported_as_qwen3_is_refused_naming_the_q_and_k_norms(megatron_env):
    chunks = build_chunks("llama")
    with pytest.raises(MemmgrExportError) as info:
        MegatronExporter(chunks, _qwen3_config_of_the_llama())
    text = str(info.value)
    assert "qwen3" in text
    assert "model.layers.0.self_attn.q_norm.weight" in text
    assert "decoder.layers.0.self_attention.q_layernorm.weight" in text
    assert "4 Hugging Face tensor(s)" in text  # q and k norms of both layers


def test_model_whose_layer_norm_is_an_identity_is_refused_naming_that_norm(megatron_env):
    chunks = build_chunks("llama")
    layer = chunks[0].decoder.layers[1]
    layer.input_layernorm = torch.nn.Identity()
    with pytest.raises(MemmgrExportError) as info:
        MegatronExporter(chunks, hf_config("llama"))
    text = str(info.value)
    assert "llama" in text and "model.layers.1.input_layernorm.weight" in text
    assert "decoder.layers.1.input_layernorm.weight" in text
    assert "model.layers.0.input_layernorm.weight" not in text  # layer 0 has its norm


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_complete_models_export_every_tensor_of_their_table(megatron_env, family):
    chunks = build_chunks(family)
    randomize(chunks)
    exporter = MegatronExporter(chunks, hf_config(family))
    names = {e.name for e in exporter.entries}
    assert "model.layers.1.input_layernorm.weight" in names
    assert ("model.layers.1.self_attn.q_norm.weight" in names) == (family == "qwen3")
    assert ("model.layers.1.self_attn.q_proj.bias" in names) == (family == "qwen2")
    assert ("lm_head.weight" in names) == (not FAMILIES[family]["tied"])
