"""Megatron -> Hugging Face export at TP=1 against transformers: logits and greedy tokens of the exported weights
loaded into the family's transformers model, from device memory and from memmgr's host copy; the errors raised
before anything is exported."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")

from memmgr.tools.megatron_models import (HF_VOCAB, SEQ, build_chunks, greedy, hf_config, megatron_logits,  # noqa: E402
                           randomize, single_rank_megatron, save_hf_checkpoint)
from memmgr.sync.export import ExportBucket, MegatronExporter  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")

HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
              "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
              "mixtral": "MixtralForCausalLM"}


@pytest.fixture(scope="module")
def megatron_env(tmp_path_factory):
    with single_rank_megatron(tmp_path_factory.mktemp("dist")):
        yield


def collect(exporter: MegatronExporter) -> dict[str, torch.Tensor]:
    out = {}
    for bucket in exporter.buckets():
        assert isinstance(bucket, ExportBucket)
        for name, t in bucket.named_tensors():
            out[name] = t.clone()
    return out


def load_hf(family: str, tensors: dict[str, torch.Tensor], tmp_path):
    import transformers

    cfg = hf_config(family)
    save_hf_checkpoint(tmp_path, cfg, tensors)
    cls = getattr(transformers, HF_CLASSES[family])
    model, info = cls.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager",
                                      output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("family", list(HF_CLASSES))
def test_exported_weights_give_the_megatron_logits_in_transformers(megatron_env, family, tmp_path):
    torch.manual_seed(0)
    (model,) = build_chunks(family)
    randomize([model], seed=1)
    model.eval()
    exported = collect(MegatronExporter([model], hf_config(family), bucket_bytes=64 * 1024))
    hf = load_hf(family, exported, tmp_path)
    tokens = torch.randint(0, HF_VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(2))
    ref = megatron_logits(model, tokens)
    with torch.no_grad():
        got = hf(tokens).logits.float()
    assert (got - ref).abs().max().item() <= 1e-4
    mc_tokens = greedy(lambda t: megatron_logits(model, t), tokens, 16)
    with torch.no_grad():
        hf_tokens = greedy(lambda t: hf(t).logits, tokens, 16)
    assert torch.equal(mc_tokens, hf_tokens)
