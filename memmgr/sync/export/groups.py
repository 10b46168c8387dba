"""The export's tensors one group at a time: one group per decoder layer, plus the tensors before the layers (the
embedding) and the tensors after them (final norm, output head).

``layer_groups(plan)`` is that partition of the export's Hugging Face names, in export order, from the plan's own
layer numbers (no name parsing). ``grouped_tensors(buckets, groups)`` regroups the bucket stream into any such
partition: each group is yielded as soon as its last tensor arrived, as views into the export's buckets (no copy;
a group that spans two buckets keeps the earlier one alive until it is yielded). Engine-neutral: an engine's
adapter (e.g. vLLM's ``WeightSource.iter_groups``) passes its own partition.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import torch

from memmgr.sync.export.errors import MemmgrExportError
from memmgr.sync.export.plan import ExportPlan


def layer_groups(plan: ExportPlan) -> list[list[str]]:
    """The export's Hugging Face names, one list per decoder layer, after the names before the layers and before
    the names after them, in export order (the order of ``plan.entries``)."""
    groups: list[list[str]] = []
    last: tuple[int, int] | None = None
    for unit in plan.units:  # sorted by (section, layer, ...): 0 before the layers, 1 a layer, 2 after them
        key = (unit.order[0], unit.order[1])
        if key != last:
            groups.append([])
            last = key
        groups[-1].extend(e.name for e in unit.entries)
    return groups


def grouped_tensors(buckets: Iterable[Any], groups: Sequence[Sequence[str]]
                    ) -> Iterator[tuple[list[str], list[torch.Tensor]]]:
    """Yields ``(names, tensors)`` for each of ``groups`` in order, once all its tensors arrived from ``buckets``
    (objects with ``named_tensors()``, like ``ExportBucket``); the tensors are views into the buckets.

    Raises MemmgrExportError naming the tensor if the stream yields a name outside ``groups`` or twice, and naming
    the first missing one if it ends before every group is complete."""
    where: dict[str, int] = {}
    for index, group in enumerate(groups):
        for name in group:
            if name in where:
                raise MemmgrExportError(f"grouped_tensors: {name!r} is in groups {where[name]} and {index}; each "
                                        f"name belongs to one group")
            where[name] = index
    arrived: dict[str, torch.Tensor] = {}
    missing = [len(g) for g in groups]
    nxt = 0
    for bucket in buckets:
        for name, tensor in bucket.named_tensors():
            index = where.get(name)
            if index is None or name in arrived or index < nxt:
                raise MemmgrExportError(f"grouped_tensors: the export yielded {name!r}, which "
                                        f"{'no group names' if index is None else 'arrived before'}; the groups "
                                        f"must partition the export's entries (exporter.entries)")
            arrived[name] = tensor
            missing[index] -= 1
        while nxt < len(groups) and missing[nxt] == 0:
            names = list(groups[nxt])
            yield names, [arrived.pop(n) for n in names]
            nxt += 1
    if nxt < len(groups):
        absent = next(n for n in groups[nxt] if n not in arrived)
        raise MemmgrExportError(f"grouped_tensors: the export ended before group {nxt} was complete (e.g. {absent!r} "
                                f"never arrived); the groups must partition the export's entries (exporter.entries)")


__all__ = ["layer_groups", "grouped_tensors"]
