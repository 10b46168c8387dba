"""The export plan: every rank's parameters gathered, mapped through the family's table, checked against the
Hugging Face config (sizes, and that the model has every tensor the table requires: ``missing_tensors``), ordered
and packed into buckets. Every rank computes the same plan from the same gathered
metadata, so a problem found anywhere raises the same MemmgrExportError on every rank before any weight moves.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from memmgr.sync.export.discovery import LocalParams, ParamInfo
from memmgr.sync.export.errors import MemmgrExportError
from memmgr.sync.export.families import FAMILIES, Family, Row, config_dims, eval_dim, family_for
from memmgr.sync.export.layouts import Geometry, LayoutError, output_shapes
from memmgr.sync.transports.base import ParamSpec, aligned, itemsize, padded_numel


@dataclass(frozen=True)
class ExportEntry(ParamSpec):
    """One Hugging Face tensor of a bucket: its place in the bucket's flat tensor of its dtype (elements)."""
    offset: int = 0


@dataclass
class Unit:
    """One megatron parameter (all its shards) and the Hugging Face tensors it becomes."""
    key: tuple[str, int]                 # (global megatron name, expert offset)
    kind: str
    geometry: Geometry
    shard_shape: tuple[int, ...]
    dtype: torch.dtype
    providers: list[int]                 # rank that sends shard r
    hf_names: list[str]
    hf_shapes: list[tuple[int, ...]]
    order: tuple = ()
    entries: list[ExportEntry] = field(default_factory=list)   # filled by packing

    @property
    def shard_nbytes(self) -> int:
        n = itemsize(self.dtype)
        for s in self.shard_shape:
            n *= s
        return n

    @property
    def hf_nbytes(self) -> int:
        total = 0
        for shape in self.hf_shapes:
            n = itemsize(self.dtype)
            for s in shape:
                n *= s
            total += aligned(n)
        return total


# provider rank -> ([(unit position in the bucket, shard index, byte offset in the provider's message)], total bytes)
Messages = dict[int, tuple[list[tuple[int, int, int]], int]]


@dataclass
class BucketPlan:
    """One output bucket: its units, the length of each dtype's flat tensor, and its exchange rounds: consecutive
    units whose shards together take at most the largest parameter's bytes, one message per provider each."""
    index: int
    units: list[Unit]
    numels: dict[torch.dtype, int]
    rounds: list[Messages]

    @property
    def nbytes(self) -> int:
        return sum(n * itemsize(d) for d, n in self.numels.items())


@dataclass
class ExportPlan:
    family: Family
    units: list[Unit]
    buckets: list[BucketPlan]
    bucket_bytes: int

    @property
    def entries(self) -> list[ExportEntry]:
        return [e for u in self.units for e in u.entries]

    @property
    def largest_unit_bytes(self) -> int:
        """Hugging Face bytes of the largest parameter (all the tensors it becomes)."""
        return max((u.hf_nbytes for u in self.units), default=0)

    @property
    def largest_message_bytes(self) -> int:
        """Bytes of the largest exchange round: the most one rank receives (or sends) at a time."""
        return max((total for b in self.buckets for r in b.rounds for _items, total in r.values()), default=0)


def _fail(problems: list[str], what: str) -> None:
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise MemmgrExportError(f"cannot export {what}: " + "; ".join(problems[:8]) + more)


def check_config(family: Family, megatron_config: dict[str, Any], dims: dict[str, int]) -> list[str]:
    """Disagreements between the megatron TransformerConfig fields and the Hugging Face config, one line each."""
    problems = []
    for attr, dim in family.config_checks:
        value = megatron_config.get(attr)
        if attr == "num_query_groups" and value is None:
            value = megatron_config.get("num_attention_heads")
        if value is None or dim not in dims:
            continue
        if value != dims[dim]:
            problems.append(f"megatron config {attr}={value} but the Hugging Face config gives {dim}={dims[dim]}")
    return problems


def build_plan(gathered: list[LocalParams], hf_config: Any, bucket_bytes: int) -> ExportPlan:
    """The plan from every rank's LocalParams (index = rank in the export's group); raises MemmgrExportError on any
    problem."""
    family = family_for(hf_config)
    if family is None:
        known = sorted({t for f in FAMILIES for t in f.model_types})
        raise MemmgrExportError(f"Hugging Face model_type {getattr(hf_config, 'model_type', None)!r} has no export "
                                f"table; supported: {known}. Add a Family table in memmgr/sync/export/families.py")
    problems = [f"rank {r}: {e}" for r, lp in enumerate(gathered) for e in lp.errors]
    _fail(problems, "the model")
    dims = config_dims(hf_config, family)
    config = next((lp.config for lp in gathered if lp.config), {})
    _fail(check_config(family, config, dims), f"into {family.name}")

    # Shards of each parameter, the lowest rank holding a shard sends it.
    shards: dict[tuple[str, int], dict[int, tuple[int, ParamInfo]]] = {}
    for rank, lp in enumerate(gathered):
        for info in lp.infos:
            shards.setdefault((info.name, info.expert_offset), {}).setdefault(info.shard, (rank, info))
    hf_tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    model_tied = any(lp.tied for lp in gathered if lp.tied is not None)
    if hf_tied != model_tied and any(lp.tied is not None for lp in gathered):
        problems.append(f"the model's share_embeddings_and_output_weights={model_tied} but the Hugging Face config "
                        f"has tie_word_embeddings={hf_tied}; build both the same way")
    rows = [(i, re.compile(row.pattern), row) for i, row in enumerate(family.rows)]
    first_layer_row = min((i for i, _, row in rows if "{layer}" in row.hf[0]), default=0)
    # within a layer, each expert's tensors come together (checkpoint order), after the rows before the experts
    first_expert_row = min((i for i, _, row in rows if "{expert}" in row.hf[0]), default=len(rows))
    units: list[Unit] = []
    for (name, expert_offset), by_shard in shards.items():
        if hf_tied and name == "output_layer.weight":
            continue  # the output layer is the embedding; the engine ties it
        rank0, info = by_shard[min(by_shard)]
        holders = ", ".join(f"rank {r}" for r, _ in by_shard.values())
        missing = [s for s in range(info.num_shards) if s not in by_shard]
        if missing:
            problems.append(f"parameter {name!r}: tensor-parallel shards {missing} of {info.num_shards} are held by "
                            f"no rank (found on {holders})")
            continue
        for s, (r, other) in by_shard.items():
            if (other.shape, other.dtype, other.partition_dim, other.num_shards) != (
                    info.shape, info.dtype, info.partition_dim, info.num_shards):
                problems.append(f"parameter {name!r}: shard {s} on rank {r} is {other.shape} {other.dtype} "
                                f"(partition_dim {other.partition_dim}) but shard {min(by_shard)} on rank {rank0} is "
                                f"{info.shape} {info.dtype} (partition_dim {info.partition_dim})")
        match = next(((i, m, row) for i, rx, row in rows for m in [rx.fullmatch(name)] if m), None)
        if match is None:
            problems.append(f"parameter {name!r} (shape {info.shape}, on {holders}) matches no row of the "
                            f"{family.name} table: an unknown parameter")
            continue
        i, m, row = match
        groups = m.groupdict()
        if info.partition_stride != 1 and row.kind != "gate_up":
            problems.append(f"parameter {name!r}: partition_stride {info.partition_stride} on a {row.kind} layout; "
                            f"only a gated linear_fc1 ([gate; up] per shard) is re-joined with a stride")
            continue
        geo = Geometry(info.num_shards, info.partition_dim, heads=dims.get("heads", 0),
                       groups=dims.get("kv_heads", 0), head_dim=dims.get("head_dim", 0), vocab=dims.get("vocab", 0),
                       local_experts=info.local_experts)
        try:
            shapes = output_shapes(row.kind, info.shape, geo)
        except LayoutError as e:
            problems.append(f"parameter {name!r} ({row.kind}, shard shape {info.shape} x {info.num_shards}): {e}")
            continue
        if row.kind.startswith("grouped_"):
            hf_names = [t.format(layer=groups.get("layer"), expert=info.expert_offset + e)
                        for e in range(info.local_experts) for t in row.hf]
            expected_specs = [spec for _ in range(info.local_experts) for spec in row.shapes]
        else:
            hf_names = [t.format(**groups) for t in row.hf]
            expected_specs = list(row.shapes)
        for hf_name, shape, spec in zip(hf_names, shapes, expected_specs):
            expected = tuple(eval_dim(s, dims) for s in spec)
            if None not in expected and tuple(shape) != expected:
                problems.append(f"parameter {name!r} gives {hf_name} of shape {tuple(shape)}, but the Hugging Face "
                                f"config expects {expected} ({' x '.join(spec)})")
        layer = int(groups["layer"]) if groups.get("layer") is not None else None
        section = 1 if layer is not None else (0 if i < first_layer_row else 2)
        expert = int(groups["expert"]) if groups.get("expert") is not None else info.expert_offset
        block = first_expert_row if "{expert}" in row.hf[0] else i
        units.append(Unit((name, expert_offset), row.kind, geo, info.shape, info.dtype,
                          [by_shard[s][0] for s in range(info.num_shards)], hf_names, [tuple(s) for s in shapes],
                          order=(section, layer if layer is not None else 0, block, expert, i, name)))
    seen: dict[str, str] = {}
    for u in units:
        for n in u.hf_names:
            if n in seen:
                problems.append(f"{n} would come from both {seen[n]!r} and {u.key[0]!r}")
            seen[n] = u.key[0]
    if "layers" in dims:
        layers = {u.order[1] for u in units if u.order[0] == 1}
        if layers != set(range(dims["layers"])):
            problems.append(f"the model's layers {sorted(layers)[:4]}...{sorted(layers)[-2:] if layers else ''} "
                            f"({len(layers)} found over all ranks) do not match num_hidden_layers={dims['layers']}")
    if not problems:
        problems += missing_tensors(family, dims, hf_config, units, hf_tied)
    _fail(problems, f"into {family.name}")
    units.sort(key=lambda u: u.order)
    return ExportPlan(family, units, _pack(units, bucket_bytes), bucket_bytes)


def _pack(units: list[Unit], bucket_bytes: int) -> list[BucketPlan]:
    """Whole units, in order, into buckets of at most ``bucket_bytes`` (a larger unit gets a bucket of its own)."""
    groups: list[list[Unit]] = []
    size = 0
    for u in units:
        if groups and groups[-1] and size + u.hf_nbytes <= bucket_bytes:
            groups[-1].append(u)
            size += u.hf_nbytes
        else:
            groups.append([u])
            size = u.hf_nbytes
    cap = max((aligned(u.shard_nbytes) * len(u.providers) for u in units), default=0)
    buckets = []
    for index, members in enumerate(groups):
        numels: dict[torch.dtype, int] = {}
        rounds: list[Messages] = []
        round_bytes = cap + 1
        for pos, u in enumerate(members):
            u.entries = []
            for hf_name, shape in zip(u.hf_names, u.hf_shapes):
                offset = numels.get(u.dtype, 0)
                entry = ExportEntry(hf_name, shape, u.dtype, offset)
                u.entries.append(entry)
                numels[u.dtype] = offset + padded_numel(entry.numel, u.dtype)  # WeightBucket.pack's layout
            unit_bytes = aligned(u.shard_nbytes) * len(u.providers)
            if round_bytes + unit_bytes > cap:
                rounds.append({})
                round_bytes = 0
            round_bytes += unit_bytes
            messages = rounds[-1]
            for s, provider in enumerate(u.providers):
                items, total = messages.get(provider, ([], 0))
                items.append((pos, s, total))
                messages[provider] = (items, total + aligned(u.shard_nbytes))
        buckets.append(BucketPlan(index, members, numels, rounds))
    return buckets


def _is_moe(template: str) -> bool:
    return "{expert}" in template or "shared_expert" in template or template.endswith(("mlp.gate.weight",
                                                                                        "block_sparse_moe.gate.weight"))


def _is_dense_mlp(template: str) -> bool:
    return not _is_moe(template) and any(f"mlp.{p}_proj." in template for p in ("gate", "up", "down"))


def _megatron_name(pattern: str, layer: int | None, expert: int | None) -> str:
    name = pattern.replace(r"(?P<layer>\d+)", str(layer)).replace(r"(?P<expert>\d+)", str(expert))
    return name.replace("\\.", ".")


def missing_tensors(family: Family, dims: dict[str, int], hf_config: Any, units: list[Unit],
                    hf_tied: bool) -> list[str]:
    """What the family's table requires and no parameter of the model gives, one problem line per missing
    Hugging Face tensor (with the megatron parameter(s) that would give it). Required: every row's Hugging Face names
    for every layer and outside the layers, except the output head of a tied model, the attention biases unless the
    family or config has them (qwen2, ``attention_bias``), the shared expert unless the config sizes one, the dense
    MLP in a MoE layer and the experts in a dense one (a layer is MoE where the model has a router or experts
    there, or where the family has no dense MLP)."""
    produced = {n for u in units for n in u.hf_names}
    layers = dims.get("layers", 0)
    experts = dims.get("experts", 0)
    bias = family.name in ("qwen2", "qwen2_moe") or getattr(hf_config, "attention_bias", False) is True
    shared = dims.get("shared_ffn", 0) > 0
    templates: dict[str, list[Row]] = {}
    for row in family.rows:
        for t in row.hf:
            templates.setdefault(t, []).append(row)
    has_dense = any(_is_dense_mlp(t) for t in templates)
    moe_layers: set[int] = set()
    for u in units:
        if u.order[0] == 1 and any(_is_moe(n) or ".experts." in n for n in u.hf_names):
            moe_layers.add(u.order[1])
    missing: list[tuple[str, list[str]]] = []

    def need(template: str, rows: list[Row], layer: int | None, expert: int | None) -> None:
        name = template.format(layer=layer, expert=expert)
        if name not in produced:
            missing.append((name, sorted({_megatron_name(r.pattern, layer, expert) for r in rows})))

    for template, rows in templates.items():
        if template.endswith(".bias") and not bias:
            continue
        if template.startswith("lm_head") and hf_tied:
            continue
        if "shared_expert" in template and not shared:
            continue
        if "{layer}" not in template:
            need(template, rows, None, None)
            continue
        for layer in range(layers):
            moe = layer in moe_layers or not has_dense
            if _is_moe(template) and not moe or _is_dense_mlp(template) and moe:
                continue
            if "{expert}" in template:
                for e in range(experts):
                    need(template, rows, layer, e)
            else:
                need(template, rows, layer, None)
    if not missing:
        return []
    shown = "; ".join(f"{hf} (from megatron {' or '.join(meg)})" for hf, meg in missing[:6])
    more = f" and {len(missing) - 6} more" if len(missing) > 6 else ""
    return [f"the {family.name} table requires {len(missing)} Hugging Face tensor(s) the model does not have: "
            f"{shown}{more}. An engine would keep stale values for them: build the model with these parameters "
            f"(e.g. its norms, qk_layernorm for qwen3) or export it as the family it is"]
