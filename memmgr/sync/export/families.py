"""One table per model family: megatron-core parameter names -> Hugging Face checkpoint names and layout kinds.

A row matches the *global* megatron name of a parameter (layer index counted over all pipeline stages and virtual
chunks, expert index counted over all expert-parallel ranks) and gives the Hugging Face names it becomes, the
layout kind that splits it (see ``layouts``), and the shape each Hugging Face tensor must have according to the
Hugging Face config (products of the dimension names of ``config_dims``). The names are those of the Hugging Face
checkpoint files, which is what inference engines load (transformers 5 converts per-expert checkpoint tensors into
its fused expert parameters on load).

Both megatron layer specs are covered: the local spec (``input_layernorm``, ``pre_mlp_layernorm`` as modules of
their own) and the TransformerEngine spec (the norm fused into the following linear as ``layer_norm_weight``);
experts from ``SequentialMLP`` (``local_experts.N``), ``TEGroupedMLP`` (``linear_fc1.weightN``) and the legacy
``GroupedMLP`` (``weight1``/``weight2`` holding every local expert).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

L = r"decoder\.layers\.(?P<layer>\d+)\."
HL = "model.layers.{layer}."
E = r"(?P<expert>\d+)"
HE = "{expert}"


@dataclass(frozen=True)
class Row:
    """One mapping: a regular expression over the global megatron name, the Hugging Face name templates
    (``{layer}``, ``{expert}``), the layout kind, and the expected Hugging Face shape of each output."""
    pattern: str
    hf: tuple[str, ...]
    kind: str
    shapes: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Family:
    """A model family: the ``model_type`` values of the Hugging Face configs it serves and its table."""
    name: str
    model_types: tuple[str, ...]
    rows: tuple[Row, ...]
    # megatron TransformerConfig attribute -> dimension name it must equal (checked before anything moves)
    config_checks: tuple[tuple[str, str], ...]
    # dimension name -> Hugging Face config attribute, where this family names it unlike CONFIG_DIMS
    dims: tuple[tuple[str, str], ...] = ()


def _r(pattern: str, hf: tuple[str, ...] | str, kind: str, *shapes: tuple[str, ...]) -> Row:
    return Row(pattern, (hf,) if isinstance(hf, str) else tuple(hf), kind, tuple(shapes))


# ---- rows shared by the tables below (each family's table is one tuple of rows, in export order) ----
_EMBED = (
    _r(r"embedding\.word_embeddings\.weight", "model.embed_tokens.weight", "vocab", ("vocab", "hidden")),
)
_ATTN = (
    _r(L + r"input_layernorm\.weight", HL + "input_layernorm.weight", "copy", ("hidden",)),
    _r(L + r"self_attention\.linear_qkv\.layer_norm_weight", HL + "input_layernorm.weight", "copy", ("hidden",)),
    _r(L + r"self_attention\.linear_qkv\.weight",
       (HL + "self_attn.q_proj.weight", HL + "self_attn.k_proj.weight", HL + "self_attn.v_proj.weight"), "qkv",
       ("heads*head_dim", "hidden"), ("kv_heads*head_dim", "hidden"), ("kv_heads*head_dim", "hidden")),
    _r(L + r"self_attention\.linear_proj\.weight", HL + "self_attn.o_proj.weight", "copy",
       ("hidden", "heads*head_dim")),
)
_QKV_BIAS = (
    _r(L + r"self_attention\.linear_qkv\.bias",
       (HL + "self_attn.q_proj.bias", HL + "self_attn.k_proj.bias", HL + "self_attn.v_proj.bias"), "qkv",
       ("heads*head_dim",), ("kv_heads*head_dim",), ("kv_heads*head_dim",)),
)
_QK_NORM = (
    _r(L + r"self_attention\.q_layernorm\.weight", HL + "self_attn.q_norm.weight", "copy", ("head_dim",)),
    _r(L + r"self_attention\.k_layernorm\.weight", HL + "self_attn.k_norm.weight", "copy", ("head_dim",)),
)
_DENSE_MLP = (
    _r(L + r"pre_mlp_layernorm\.weight", HL + "post_attention_layernorm.weight", "copy", ("hidden",)),
    _r(L + r"mlp\.linear_fc1\.layer_norm_weight", HL + "post_attention_layernorm.weight", "copy", ("hidden",)),
    _r(L + r"mlp\.linear_fc1\.weight", (HL + "mlp.gate_proj.weight", HL + "mlp.up_proj.weight"), "gate_up",
       ("ffn", "hidden"), ("ffn", "hidden")),
    _r(L + r"mlp\.linear_fc2\.weight", HL + "mlp.down_proj.weight", "copy", ("hidden", "ffn")),
)
_EXPERT = HL + "mlp.experts." + HE + "."
_MOE = (
    _r(L + r"mlp\.router\.weight", HL + "mlp.gate.weight", "copy", ("experts", "hidden")),
    # SequentialMLP
    _r(L + r"mlp\.experts\.local_experts\." + E + r"\.linear_fc1\.weight",
       (_EXPERT + "gate_proj.weight", _EXPERT + "up_proj.weight"), "gate_up",
       ("moe_ffn", "hidden"), ("moe_ffn", "hidden")),
    _r(L + r"mlp\.experts\.local_experts\." + E + r"\.linear_fc2\.weight", _EXPERT + "down_proj.weight", "copy",
       ("hidden", "moe_ffn")),
    # TEGroupedMLP
    _r(L + r"mlp\.experts\.linear_fc1\.weight" + E, (_EXPERT + "gate_proj.weight", _EXPERT + "up_proj.weight"),
       "gate_up", ("moe_ffn", "hidden"), ("moe_ffn", "hidden")),
    _r(L + r"mlp\.experts\.linear_fc2\.weight" + E, _EXPERT + "down_proj.weight", "copy", ("hidden", "moe_ffn")),
    # legacy GroupedMLP: one parameter holds every local expert; {expert} runs over them
    _r(L + r"mlp\.experts\.weight1", (_EXPERT + "gate_proj.weight", _EXPERT + "up_proj.weight"), "grouped_fc1",
       ("moe_ffn", "hidden"), ("moe_ffn", "hidden")),
    _r(L + r"mlp\.experts\.weight2", _EXPERT + "down_proj.weight", "grouped_fc2", ("hidden", "moe_ffn")),
)
_SHARED = HL + "mlp.shared_expert."
_SHARED_EXPERT = (
    _r(L + r"mlp\.shared_experts\.linear_fc1\.weight", (_SHARED + "gate_proj.weight", _SHARED + "up_proj.weight"),
       "gate_up", ("shared_ffn", "hidden"), ("shared_ffn", "hidden")),
    _r(L + r"mlp\.shared_experts\.linear_fc2\.weight", _SHARED + "down_proj.weight", "copy",
       ("hidden", "shared_ffn")),
    _r(L + r"mlp\.shared_experts\.gate_weight", HL + "mlp.shared_expert_gate.weight", "copy", ("1", "hidden")),
)
_MIXTRAL_EXPERT = HL + "block_sparse_moe.experts." + HE + "."
_MIXTRAL_MOE = (
    _r(L + r"pre_mlp_layernorm\.weight", HL + "post_attention_layernorm.weight", "copy", ("hidden",)),
    _r(L + r"mlp\.router\.weight", HL + "block_sparse_moe.gate.weight", "copy", ("experts", "hidden")),
    _r(L + r"mlp\.experts\.local_experts\." + E + r"\.linear_fc1\.weight",
       (_MIXTRAL_EXPERT + "w1.weight", _MIXTRAL_EXPERT + "w3.weight"), "gate_up",
       ("moe_ffn", "hidden"), ("moe_ffn", "hidden")),
    _r(L + r"mlp\.experts\.local_experts\." + E + r"\.linear_fc2\.weight", _MIXTRAL_EXPERT + "w2.weight", "copy",
       ("hidden", "moe_ffn")),
    _r(L + r"mlp\.experts\.linear_fc1\.weight" + E, (_MIXTRAL_EXPERT + "w1.weight", _MIXTRAL_EXPERT + "w3.weight"),
       "gate_up", ("moe_ffn", "hidden"), ("moe_ffn", "hidden")),
    _r(L + r"mlp\.experts\.linear_fc2\.weight" + E, _MIXTRAL_EXPERT + "w2.weight", "copy", ("hidden", "moe_ffn")),
    _r(L + r"mlp\.experts\.weight1", (_MIXTRAL_EXPERT + "w1.weight", _MIXTRAL_EXPERT + "w3.weight"),
       "grouped_fc1", ("moe_ffn", "hidden"), ("moe_ffn", "hidden")),
    _r(L + r"mlp\.experts\.weight2", _MIXTRAL_EXPERT + "w2.weight", "grouped_fc2", ("hidden", "moe_ffn")),
)
_FINAL = (
    _r(r"decoder\.final_layernorm\.weight", "model.norm.weight", "copy", ("hidden",)),
    _r(r"output_layer\.weight", "lm_head.weight", "vocab", ("vocab", "hidden")),
)

_DENSE_CHECKS = (("num_layers", "layers"), ("hidden_size", "hidden"), ("num_attention_heads", "heads"),
                 ("num_query_groups", "kv_heads"), ("kv_channels", "head_dim"), ("ffn_hidden_size", "ffn"))
_MOE_CHECKS = _DENSE_CHECKS[:5] + (("num_moe_experts", "experts"), ("moe_ffn_hidden_size", "moe_ffn"))

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama", "mistral"), _EMBED + _ATTN + _QKV_BIAS + _DENSE_MLP + _FINAL, _DENSE_CHECKS),
    Family("qwen2", ("qwen2",), _EMBED + _ATTN + _QKV_BIAS + _DENSE_MLP + _FINAL, _DENSE_CHECKS),
    Family("qwen3", ("qwen3",), _EMBED + _ATTN + _QK_NORM + _DENSE_MLP + _FINAL, _DENSE_CHECKS),
    Family("qwen3_moe", ("qwen3_moe",), _EMBED + _ATTN + _QK_NORM + _DENSE_MLP + _MOE + _FINAL, _MOE_CHECKS),
    Family("qwen2_moe", ("qwen2_moe",), _EMBED + _ATTN + _QKV_BIAS + _DENSE_MLP + _MOE + _SHARED_EXPERT + _FINAL,
           _MOE_CHECKS + (("moe_shared_expert_intermediate_size", "shared_ffn"),)),
    # Mixtral's experts are as wide as its intermediate_size, and every layer is a MoE layer
    Family("mixtral", ("mixtral",), _EMBED + _ATTN + _MIXTRAL_MOE + _FINAL, _MOE_CHECKS,
           dims=(("moe_ffn", "intermediate_size"),)),
)

# Hugging Face config attribute(s) for each dimension name, first present wins; head_dim falls back to
# hidden / heads and kv_heads to heads, as transformers does.
CONFIG_DIMS: dict[str, tuple[str, ...]] = {
    "layers": ("num_hidden_layers",),
    "hidden": ("hidden_size",),
    "heads": ("num_attention_heads",),
    "kv_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "ffn": ("intermediate_size",),
    "moe_ffn": ("moe_intermediate_size",),
    "shared_ffn": ("shared_expert_intermediate_size",),
    "experts": ("num_experts", "num_local_experts"),
    "vocab": ("vocab_size",),
}


def family_for(hf_config: Any) -> Family | None:
    """The family whose table serves this Hugging Face config (by ``model_type``), or None."""
    model_type = getattr(hf_config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return None


def config_dims(hf_config: Any, family: Family | None = None) -> dict[str, int]:
    """The dimension names of the tables, read from a Hugging Face config (absent ones are left out)."""
    dims: dict[str, int] = {}
    sources = dict(CONFIG_DIMS)
    for dim, attr in (family.dims if family is not None else ()):
        sources[dim] = (attr,)
    for dim, attrs in sources.items():
        for attr in attrs:
            value = getattr(hf_config, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                dims[dim] = value
                break
    if "heads" in dims:
        dims.setdefault("kv_heads", dims["heads"])
        if "hidden" in dims:
            dims.setdefault("head_dim", dims["hidden"] // dims["heads"])
    return dims


def eval_dim(expr: str, dims: dict[str, int]) -> int | None:
    """Evaluates a product of dimension names and integers (``"heads*head_dim"``); None if a name is unknown."""
    value = 1
    for token in expr.split("*"):
        token = token.strip()
        if token.isdigit():
            value *= int(token)
        elif token in dims:
            value *= dims[token]
        else:
            return None
    return value
