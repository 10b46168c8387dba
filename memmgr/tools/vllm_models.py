"""Tiny vLLM engines on the CPU, built in one place for the benchmarks and the tests (and to try memmgr's vLLM weight
sync without a GPU or the Hugging Face hub).

- ``save_tokenizer(folder, vocab)``: a locally trained WordLevel tokenizer (no hub access).
- ``tiny_causal_lm(...)``: a tiny random Llama or Qwen3 (head_dim 32, float32, tied or untied embeddings) with the
  weights of ``new_weights``; ``build_tiny_model(folder)`` saves one and a locally trained WordLevel tokenizer to
  ``folder`` (no hub access) and returns it.
- ``start_engine(folder)``: a ``vllm.LLM`` on the CPU over that folder, eager, small context and KV cache, with
  memmgr's weight-transfer backend and worker extension; ``stop_engine(llm)`` shuts it down.
- ``new_weights(model, seed)``: fresh random weights in HF names (a dict), scaled so that greedy decoding has clear
  winners (the same argmax on vLLM's and transformers' kernels); ``hf_model_with(model, weights)`` loads them.
- ``greedy_vllm`` / ``greedy_hf``: greedy token ids of each prompt on either side.

vllm, transformers and tokenizers are imported inside the functions; importing this module needs only torch.
"""
from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from memmgr.errors import MemmgrInputError

PROMPTS: list[list[int]] = [[1, 5, 6, 7, 8], [1, 9, 10, 11], [1, 20, 21, 22, 23, 24, 25]]
MAX_TOKENS = 8


def save_tokenizer(folder: str, vocab: int) -> None:
    """A WordLevel tokenizer of exactly ``vocab`` tokens (<unk> <s> </s> <pad> w0 w1 ...), trained locally and saved
    to ``folder`` as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    words = [f"w{i}" for i in range(vocab - len(specials))]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=specials, vocab_size=vocab))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(folder)


def build_tiny_model(folder: str, *, seed: int = 0, layers: int = 2, hidden: int = 128, vocab: int = 128,
                     family: str = "llama", tied: bool = False):
    """Saves ``tiny_causal_lm(...)`` and a locally trained tokenizer of ``vocab`` tokens to ``folder``; returns the
    transformers model."""
    save_tokenizer(folder, vocab)
    model = tiny_causal_lm(seed=seed, layers=layers, hidden=hidden, vocab=vocab, family=family, tied=tied)
    model.save_pretrained(folder)
    return model


def tiny_causal_lm(*, seed: int = 0, layers: int = 2, hidden: int = 128, vocab: int = 128, family: str = "llama",
                   tied: bool = False):
    """A random Llama- or Qwen3-shaped transformers model (head_dim 32, float32, eval mode; ``tied``: the output
    head shares the embedding) holding ``new_weights(model, seed=seed)``; nothing is downloaded."""
    import transformers

    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[family]
    cfg = config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                     num_attention_heads=hidden // 32, num_key_value_heads=max(1, hidden // 64), head_dim=32,
                     max_position_embeddings=256, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
                     pad_token_id=3)
    torch.manual_seed(seed)
    model = model_cls(cfg).float().eval()
    hf_model_with(model, new_weights(model, seed=seed))
    return model


def new_weights(model: torch.nn.Module, *, seed: int) -> dict[str, torch.Tensor]:
    """Random weights for what the model's checkpoint holds (HF names, same shapes and dtypes; a tied output head is
    left out, as save_pretrained leaves it out): norms near 1, matrices with std 0.08, the output head (or the
    embedding it is tied to) with std 1 so that greedy argmaxes win by a wide margin."""
    g = torch.Generator().manual_seed(1000 + seed)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    out = {}
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
        elif name == head:
            w = torch.randn(t.shape, generator=g)
        else:
            w = 0.08 * torch.randn(t.shape, generator=g)
        out[name] = w.to(t.dtype).contiguous()
    return out


def start_engine(folder: str, **overrides):
    """A ``vllm.LLM`` over ``folder`` on the CPU with memmgr's weight sync enabled (spawned engine processes find
    this memmgr through PYTHONPATH, which this sets to include the directory that holds the package: a checkout's
    root need not be installed)."""
    from vllm import LLM

    from memmgr.sync.engines.vllm import vllm_engine_kwargs

    home = str(Path(__file__).resolve().parents[2])  # memmgr/tools/vllm_models.py -> the package's parent
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if home not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([home] + paths)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    kwargs = {"model": folder, "enforce_eager": True, "max_model_len": 128, "dtype": "float32", "max_num_seqs": 4,
              "seed": 0}
    kwargs.update(overrides)
    return LLM(**vllm_engine_kwargs(**kwargs))


def stop_engine(llm) -> None:
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None:
        core.shutdown()
    del llm
    gc.collect()


def greedy_vllm(llm, prompts: Sequence[Sequence[int]] = PROMPTS, max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, detokenize=False, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@torch.no_grad()
def greedy_hf(model, prompts: Sequence[Sequence[int]] = PROMPTS, max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """Plain greedy decoding (argmax of the last position, no end-of-sequence handling: vLLM runs with
    ignore_eos), in eval mode on the model's device; the model's mode is left as it was."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    result = []
    for p in prompts:
        ids = torch.tensor([list(p)], device=device)
        for _ in range(max_tokens):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
        result.append(ids[0, len(p):].tolist())
    model.train(was_training)
    return result


def hf_model_with(model, weights: dict[str, torch.Tensor]):
    """``model`` with ``weights`` loaded: every checkpoint tensor, same shapes (a tied head follows its embedding)."""
    result = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise MemmgrInputError(f"the weights do not fit the model: missing {sorted(missing)}, unexpected "
                               f"{sorted(result.unexpected_keys)}")
    return model.eval()
