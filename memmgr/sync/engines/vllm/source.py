"""memmgr's Megatron export as a vLLM ``WeightSource``: the trainer's weights handed to any of vLLM's trainer-side
weight-transfer engines (``ipc``, ``nccl``, memmgr's ``memmgr_gloo``, or any future one).

vLLM's ``WeightSource`` (``vllm.distributed.weight_transfer.base``) has four channels: ``metadata()`` (name, dtype,
full shape of every tensor, without moving any), iteration (``(name, tensor)`` pairs, a collective on every rank),
``held_names()`` (which tensors this rank materializes) and ``iter_groups()`` (the same stream, one decoder layer
per group). ``ExportWeightSource`` maps them onto a ``MegatronExporter``:

- ``metadata()``: the export's entries, the same whole-model list on every rank (TP, PP, VPP and EP ranks alike);
- iteration and ``iter_groups()``: the export's bucket stream, read from device memory or from memmgr's pinned host
  copy while the weights group is offloaded (the exporter's ``weights=``; nothing is onloaded), yielded as views into
  the buckets, a group as soon as its last tensor arrived (``memmgr.sync.export.grouped_tensors``);
- ``held_names()``: the export gathers every tensor to its receiver ranks (``receivers=``), so a receiver holds the
  whole model (None) and any other rank (another pipeline stage, an expert-parallel rank, a tensor-parallel peer)
  holds none; such a rank iterates only to take part in the export's collective, and yields nothing.

A backend that sends from trainer rank 0 (``nccl``, ``memmgr_gloo``) needs rank 0 among the receivers (the
exporter's default); ``ipc`` needs every trainer rank that shares a GPU with an engine worker among them.
"""
from __future__ import annotations

from collections.abc import Collection
from typing import Any, Iterator

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

from memmgr.errors import MemmgrInputError
from memmgr.sync.export.groups import grouped_tensors, layer_groups


class ExportWeightSource(WeightSource):
    """vLLM's ``WeightSource`` over memmgr's Megatron export (see the module docstring). Every rank of the export
    builds one over its ``MegatronExporter`` and hands it to its trainer-side engine; each pass of iteration (or of
    ``iter_groups()``) is one collective export, so every rank must iterate it, in the same order.

    ``exporter``: a ``memmgr.sync.export.MegatronExporter`` (or an object with its ``entries``, ``buckets()`` and
    ``is_receiver``)."""

    def __init__(self, exporter: Any) -> None:
        missing = [a for a in ("entries", "buckets", "is_receiver") if not hasattr(exporter, a)]
        if missing:
            raise MemmgrInputError(f"ExportWeightSource: exporter {type(exporter).__name__} has no {missing}; pass a "
                                   f"memmgr.sync.export.MegatronExporter")
        self.exporter = exporter
        self._metadata: list[ParamMeta] | None = None

    @property
    def is_receiver(self) -> bool:
        """Whether this rank materializes the export's tensors (one of the exporter's ``receivers``)."""
        return bool(self.exporter.is_receiver)

    def metadata(self) -> list[ParamMeta]:
        """Name, dtype and full (Hugging Face) shape of every tensor of the export, in export order: the same list
        on every rank, known before any weight moves."""
        if self._metadata is None:
            self._metadata = [ParamMeta(e.name, e.dtype, tuple(int(s) for s in e.shape))
                              for e in self.exporter.entries]
        return list(self._metadata)

    def held_names(self) -> Collection[str] | None:
        """None (every tensor) on a receiver rank, no tensor elsewhere."""
        return None if self.is_receiver else frozenset()

    def export_groups(self) -> list[list[str]]:
        """The export's own per-layer partition (``memmgr.sync.export.layer_groups``); for the export's families it
        equals vLLM's ``layerwise_groups`` over ``metadata()``, which ``iter_groups`` follows."""
        return layer_groups(self.exporter.plan)

    def _take_part(self) -> None:
        for _ in self.exporter.buckets():  # yields nothing off the receivers: this runs this rank's sends
            pass

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """One export: ``(name, view)`` per tensor on a receiver; nothing elsewhere (the rank only sends its
        shards)."""
        if not self.is_receiver:
            self._take_part()
            return
        for bucket in self.exporter.buckets():
            yield from bucket.named_tensors()

    def iter_groups(self) -> Iterator[tuple[list[str], list[torch.Tensor]]]:
        """One export, one ``(names, tensors)`` batch per group of ``groups()`` (one decoder layer each), yielded
        as soon as the group's last tensor arrived; views into the export's buckets. Nothing off the receivers."""
        if not self.is_receiver:
            self._take_part()
            return
        yield from grouped_tensors(self.exporter.buckets(), self.groups())


__all__ = ["ExportWeightSource"]
