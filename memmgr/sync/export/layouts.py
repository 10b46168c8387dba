"""Layout kinds: how one megatron parameter, held as tensor-parallel shards, becomes Hugging Face tensors.

Every kind answers two questions. ``output_shapes``: the full Hugging Face shapes, from the shape of one shard, the
number of shards and the partition dimension (validated before anything moves). ``place``: copies one shard's
contribution into views of the (pre-allocated) outputs, so re-joining the shards never materializes a concatenation:
a fused layout is split per shard, and each part lands at its shard's offset along the joined dimension.

- ``copy``: the tensor as it is; shards joined along the partition dimension.
- ``vocab``: an embedding or output layer; shards joined along rows, then the rows beyond the Hugging Face
  vocabulary (megatron's padding) dropped.
- ``qkv``: megatron's fused ``linear_qkv`` (weight or bias), per query group ``[q heads of the group..., k, v]``,
  split evenly along rows over the shards: each shard holds whole groups, or, when there are more shards than
  query groups (megatron then all-gathers the projection in the forward), a contiguous part of one group; either
  way its rows go to q, k and v by their place in the fused layout.
- ``gate_up``: a gated ``linear_fc1``, ``[gate; up]`` per shard; split per shard, joined per part along rows.
- ``grouped_fc1`` / ``grouped_fc2``: the legacy GroupedMLP's ``weight1`` (``[hidden, experts * 2 * ffn]`` read as
  ``[experts, hidden, 2 * ffn]``) and ``weight2`` (``[experts * ffn, hidden]`` read as ``[experts, ffn, hidden]``),
  transposed per expert into ``gate``/``up`` and ``down``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Geometry:
    """What a layout needs besides the shard: how many shards, which dimension megatron split (None: replicated),
    the attention geometry (query heads and query groups of the whole model, head dim) and, for the legacy
    grouped experts, how many experts one parameter holds."""
    num_shards: int
    partition_dim: int | None
    heads: int = 0
    groups: int = 0
    head_dim: int = 0
    vocab: int = 0
    local_experts: int = 1


class LayoutError(ValueError):
    """A shard that does not fit its layout kind; the plan turns it into a MemmgrExportError naming the parameter."""


def _full(shape: tuple[int, ...], geo: Geometry) -> list[int]:
    full = list(shape)
    if geo.partition_dim is not None:
        full[geo.partition_dim] *= geo.num_shards
    return full


def output_shapes(kind: str, shard_shape: tuple[int, ...], geo: Geometry) -> list[tuple[int, ...]]:
    """The Hugging Face shapes the parameter becomes (one per output, in the order of the table's names)."""
    full = _full(shard_shape, geo)
    if kind == "copy":
        return [tuple(full)]
    if kind == "vocab":
        if geo.partition_dim not in (None, 0):
            raise LayoutError(f"a vocabulary parameter split along dimension {geo.partition_dim}; expected rows (0)")
        if full[0] < geo.vocab:
            raise LayoutError(f"{full[0]} rows, fewer than the Hugging Face vocab_size {geo.vocab}")
        return [(geo.vocab, *full[1:])]
    if kind == "qkv":
        if geo.partition_dim not in (None, 0):
            raise LayoutError(f"linear_qkv split along dimension {geo.partition_dim}; expected rows (0)")
        if geo.groups <= 0 or geo.heads % geo.groups:
            raise LayoutError(f"{geo.heads} query heads do not divide into {geo.groups} query groups")
        per_group = geo.heads // geo.groups + 2
        if full[0] != geo.groups * per_group * geo.head_dim:
            raise LayoutError(f"{full[0]} rows; {geo.groups} groups x ({geo.heads // geo.groups} query + 2) heads "
                              f"x head_dim {geo.head_dim} = {geo.groups * per_group * geo.head_dim} expected")
        rest = tuple(full[1:])
        return [(geo.heads * geo.head_dim, *rest), (geo.groups * geo.head_dim, *rest),
                (geo.groups * geo.head_dim, *rest)]
    if kind == "gate_up":
        if geo.partition_dim not in (None, 0):
            raise LayoutError(f"linear_fc1 split along dimension {geo.partition_dim}; expected rows (0)")
        if shard_shape[0] % 2:
            raise LayoutError(f"{shard_shape[0]} rows per shard cannot hold equal gate and up halves")
        return [(full[0] // 2, *full[1:])] * 2
    if kind == "grouped_fc1":
        hidden, cols = shard_shape
        per = cols // geo.local_experts
        if geo.partition_dim not in (None, 1) or cols % geo.local_experts or per % 2:
            raise LayoutError(f"weight1 shard {tuple(shard_shape)} does not hold {geo.local_experts} experts of "
                              f"[hidden, 2 * ffn] split along columns")
        return [(per // 2 * geo.num_shards, hidden)] * (2 * geo.local_experts)
    if kind == "grouped_fc2":
        rows, hidden = shard_shape
        if geo.partition_dim not in (None, 0) or rows % geo.local_experts:
            raise LayoutError(f"weight2 shard {tuple(shard_shape)} does not hold {geo.local_experts} experts of "
                              f"[ffn, hidden] split along rows")
        return [(hidden, rows // geo.local_experts * geo.num_shards)] * geo.local_experts
    raise LayoutError(f"unknown layout kind {kind!r}")


def stages_on_device(kind: str) -> bool:
    """True where ``place`` reads strided parts of a shard: a shard held in host memory is then copied to the
    device whole first (one contiguous transfer), instead of in many small pieces."""
    return kind in ("qkv", "grouped_fc1", "grouped_fc2")


def place(kind: str, shard: torch.Tensor, rank: int, geo: Geometry, outputs: list[torch.Tensor]) -> None:
    """Copies shard ``rank`` (of ``geo.num_shards``) into its place in ``outputs`` (full Hugging Face tensors)."""
    d = geo.partition_dim
    if kind == "copy":
        out = outputs[0]
        if d is not None:
            n = shard.shape[d]
            out = out.narrow(d, rank * n, n)
        out.copy_(shard, non_blocking=True)
    elif kind == "vocab":
        out = outputs[0]
        n = shard.shape[0]
        start = rank * n if d is not None else 0
        rows = max(0, min(n, out.shape[0] - start))
        if rows:
            out.narrow(0, start, rows).copy_(shard.narrow(0, 0, rows), non_blocking=True)
    elif kind == "qkv":
        _place_qkv(shard, rank, geo, outputs)
    elif kind == "gate_up":
        half = shard.shape[0] // 2
        for part, out in enumerate(outputs):
            out.narrow(0, rank * half, half).copy_(shard.narrow(0, part * half, half), non_blocking=True)
    elif kind == "grouped_fc1":
        hidden = shard.shape[0]
        w = shard.reshape(-1).view(geo.local_experts, hidden, -1)
        half = w.shape[2] // 2
        for e in range(geo.local_experts):
            for part in range(2):
                outputs[2 * e + part].narrow(0, rank * half, half).copy_(
                    w[e, :, part * half:(part + 1) * half].t(), non_blocking=True)
    elif kind == "grouped_fc2":
        hidden = shard.shape[1]
        w = shard.reshape(-1).view(geo.local_experts, -1, hidden)
        n = w.shape[1]
        for e in range(geo.local_experts):
            outputs[e].narrow(1, rank * n, n).copy_(w[e].t(), non_blocking=True)
    else:
        raise LayoutError(f"unknown layout kind {kind!r}")


def _place_qkv(shard: torch.Tensor, rank: int, geo: Geometry, outputs: list[torch.Tensor]) -> None:
    q_per_group = geo.heads // geo.groups
    hd = geo.head_dim
    group_rows = (q_per_group + 2) * hd
    n = shard.shape[0]
    start = rank * n
    rest = tuple(shard.shape[1:])
    if n % group_rows == 0:
        # whole groups: three strided copies
        local_groups = n // group_rows
        g0 = start // group_rows
        s = shard.view(local_groups, q_per_group + 2, hd, *rest)
        q = outputs[0].view(geo.groups, q_per_group, hd, *rest)
        k = outputs[1].view(geo.groups, hd, *rest)
        v = outputs[2].view(geo.groups, hd, *rest)
        q.narrow(0, g0, local_groups).copy_(s[:, :q_per_group], non_blocking=True)
        k.narrow(0, g0, local_groups).copy_(s[:, q_per_group], non_blocking=True)
        v.narrow(0, g0, local_groups).copy_(s[:, q_per_group + 1], non_blocking=True)
        return
    # part of a group (more shards than groups): contiguous row ranges, each inside the q, k or v rows of a group
    regions = ((0, q_per_group * hd, 0), (q_per_group * hd, (q_per_group + 1) * hd, 1),
               ((q_per_group + 1) * hd, group_rows, 2))
    for g in range(start // group_rows, (start + n - 1) // group_rows + 1):
        for lo, hi, part in regions:
            a, b = max(start, g * group_rows + lo), min(start + n, g * group_rows + hi)
            if a < b:
                part_rows = hi - lo
                dst = g * part_rows + (a - g * group_rows - lo)
                outputs[part].narrow(0, dst, b - a).copy_(shard.narrow(0, a - start, b - a), non_blocking=True)
