"""megatron-core model chunks -> this rank's parameters under their global names, with their shard coordinates.

The global name counts layers over all pipeline stages and virtual chunks (each ``TransformerLayer``'s own
``layer_number``, which megatron offsets per stage and chunk), and experts over all expert-parallel ranks (each
``MoELayer``'s ``local_expert_indices``). A parameter megatron marks ``tensor_model_parallel`` is one shard of
``num_shards`` along ``partition_dim``; expert parameters are sharded over the expert tensor-parallel group, the
others over the tensor-parallel group. Everything here reads public attributes only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.*)")
_SEQUENTIAL_EXPERT = re.compile(r"(mlp\.experts\.local_experts\.)(\d+)(\..*)")
_TE_GROUPED_EXPERT = re.compile(r"(mlp\.experts\.linear_fc[12]\.(?:weight|bias))(\d+)")
_LEGACY_GROUPED = re.compile(r"mlp\.experts\.weight[12]")


@dataclass(frozen=True)
class ParamInfo:
    """One parameter (shard) as every rank sees it in the gathered plan."""
    name: str                 # global megatron name
    shard: int                # tensor-parallel rank of this shard
    num_shards: int
    partition_dim: int | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    expert_offset: int = 0    # legacy GroupedMLP: global index of its first expert
    local_experts: int = 1    # legacy GroupedMLP: experts held by the parameter
    partition_stride: int = 1  # megatron's stride: 2 for a gated fc1 ([gate_r; up_r] per shard)


@dataclass
class LocalParams:
    """This rank's parameters: their ``ParamInfo`` and the tensors behind them (same order)."""
    infos: list[ParamInfo]
    tensors: list[torch.Tensor]
    local_names: list[str]      # name as the chunk's named_parameters() gives it, for messages
    tied: bool | None           # share_embeddings_and_output_weights of the chunks that know it
    config: dict[str, Any]      # the megatron TransformerConfig fields the checks compare (first chunk's)
    errors: list[str]

    def summary(self) -> "LocalParams":
        """The part every rank gathers (no tensors)."""
        return LocalParams(self.infos, [], self.local_names, self.tied, self.config, self.errors)


CONFIG_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                 "ffn_hidden_size", "num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """Strips megatron's DDP / FSDP / Float16Module wrappers (megatron.core.utils.unwrap_model)."""
    try:
        from megatron.core.utils import unwrap_model
    except Exception:  # pragma: no cover - megatron-core absent: plain modules only
        return chunk
    return unwrap_model(chunk)


def _parallel_coords() -> dict[str, int]:
    coords = {"tp_rank": 0, "tp_size": 1, "etp_rank": 0, "etp_size": 1}
    try:
        from megatron.core import parallel_state as ps
    except Exception:  # pragma: no cover
        return coords
    if not ps.model_parallel_is_initialized():
        return coords
    coords["tp_rank"] = ps.get_tensor_model_parallel_rank()
    coords["tp_size"] = ps.get_tensor_model_parallel_world_size()
    coords["etp_rank"] = ps.get_expert_tensor_parallel_rank()
    coords["etp_size"] = ps.get_expert_tensor_parallel_world_size()
    return coords


def _get(module: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part, None)
        if module is None:
            return None
    return module


def local_parameters(model_chunks: Sequence[torch.nn.Module]) -> LocalParams:
    """This rank's parameters of ``model_chunks`` under global names; problems are collected, not raised, so that
    every rank can learn about them in the plan's gather and raise together."""
    coords = _parallel_coords()
    out = LocalParams([], [], [], None, {}, [])
    for c, chunk in enumerate(model_chunks):
        model = unwrap(chunk)
        config = getattr(model, "config", None)
        if not out.config and config is not None:
            out.config = {f: getattr(config, f, None) for f in CONFIG_FIELDS}
        tied = getattr(model, "share_embeddings_and_output_weights", None)
        if isinstance(tied, bool):
            out.tied = tied if out.tied is None else (out.tied or tied)
        for local_name, param in model.named_parameters():
            where = f"chunk {c} parameter {local_name!r}"
            name, expert_offset, local_experts = local_name, 0, 1
            m = _LAYER.fullmatch(local_name)
            if m:
                layer = _get(model, f"decoder.layers.{m.group(1)}")
                layer_number = getattr(layer, "layer_number", None)
                if not isinstance(layer_number, int):
                    out.errors.append(f"{where}: decoder.layers.{m.group(1)} has no integer layer_number (not a "
                                      f"megatron-core TransformerLayer); cannot place it in the global layer order")
                    continue
                rest = m.group(2)
                moe = getattr(layer, "mlp", None)
                indices = list(getattr(moe, "local_expert_indices", None) or [])
                for pattern in (_SEQUENTIAL_EXPERT, _TE_GROUPED_EXPERT):
                    e = pattern.fullmatch(rest)
                    if e:
                        local = int(e.group(2))
                        if local >= len(indices):
                            out.errors.append(f"{where}: local expert {local} but the MoE layer lists "
                                              f"local_expert_indices {indices}")
                            break
                        rest = f"{e.group(1)}{indices[local]}{e.group(3) if e.lastindex == 3 else ''}"
                        break
                if _LEGACY_GROUPED.fullmatch(rest):
                    if not indices:
                        out.errors.append(f"{where}: grouped expert weights without local_expert_indices on the "
                                          f"MoE layer")
                        continue
                    expert_offset, local_experts = indices[0], len(indices)
                name = f"decoder.layers.{layer_number - 1}.{rest}"
            expert = ".mlp.experts." in name
            if getattr(param, "tensor_model_parallel", False):
                size = coords["etp_size"] if expert else coords["tp_size"]
                rank = coords["etp_rank"] if expert else coords["tp_rank"]
                dim = getattr(param, "partition_dim", None)
                if not isinstance(dim, int):
                    out.errors.append(f"{where}: tensor_model_parallel without an integer partition_dim")
                    continue
            else:
                size, rank, dim = 1, 0, None
            if size == 1:
                dim = None
            stride = getattr(param, "partition_stride", 1) if size > 1 else 1
            out.infos.append(ParamInfo(name, rank, size, dim, tuple(param.shape), param.dtype, expert_offset,
                                       local_experts, stride))
            out.tensors.append(param)
            out.local_names.append(f"chunk{c}.{local_name}")
    return out
