"""Weight sync: trainer weights handed to inference engines, as one stream of flat per-dtype buckets.

- ``session``: ``sync_weights``, one sync as one call with the manager's before/after-sync hooks (``SyncResult``).
- ``source``: ``send_weight_source``, any vLLM ``WeightSource`` (memmgr's export as one: ``ExportWeightSource``)
  through a memmgr transport, layer groups gathered into buckets.
- ``export``: megatron-core chunks to Hugging Face names and layouts, re-joined across TP/PP/EP, streamed in flat
  per-dtype buckets from device memory or the pinned host copy (``MegatronExporter``).
- ``transports``: the data planes that move the buckets (in-process, gloo, NCCL, same-GPU CUDA IPC) behind
  ``Transport``; ``transports.base`` owns the bucket (``WeightBucket``), its packer and the spec check.
- ``comm``: the sync's process groups (``init_sync_group``) and its collectives, including the status all-reduce.
- ``sender`` / ``receiver``: ``WeightSender`` / ``WeightReceiver``, name -> tensor maps over the gloo or NCCL
  transport, with every rank told when one failed.
- ``loaders``: ``ModuleWeightLoader``, ``load_weights`` for engines that are plain torch modules.
- ``engines``: engine adapters (``engines.vllm.VLLMWeightSync``: vLLM's weight-transfer protocol).

The names below are imported on first use, so that ``import memmgr.sync`` (and the transports under it) loads
neither the manager nor the export.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "sync_weights": "memmgr.sync.session",
    "SyncResult": "memmgr.sync.session",
    "send_weight_source": "memmgr.sync.source",
    "SentWeights": "memmgr.sync.source",
    "MegatronExporter": "memmgr.sync.export.exporter",
    "ModuleWeightLoader": "memmgr.sync.loaders",
    "Transport": "memmgr.sync.transports.base",
    "WeightBucket": "memmgr.sync.transports.base",
    "InProcessTransport": "memmgr.sync.transports.inproc",
    "GlooTransport": "memmgr.sync.transports.gloo",
    "GlooReceiver": "memmgr.sync.transports.gloo",
    "NcclTransport": "memmgr.sync.transports.nccl",
    "NcclReceiver": "memmgr.sync.transports.nccl",
    "CudaIpcTransport": "memmgr.sync.transports.ipc",
    "CudaIpcReceiver": "memmgr.sync.transports.ipc",
    "WeightSender": "memmgr.sync.sender",
    "WeightReceiver": "memmgr.sync.receiver",
    "SyncStats": "memmgr.sync.sender",
    "SyncGroup": "memmgr.sync.comm",
    "init_sync_group": "memmgr.sync.comm",
    "device_uuid": "memmgr.sync.comm",
}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'memmgr.sync' has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
