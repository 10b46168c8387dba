"""memmgr as the weight source of a vLLM engine, through vLLM's weight-transfer protocol.

vLLM's protocol (``vllm.distributed.weight_transfer``): the trainer calls ``init_weight_transfer_engine`` once, then
per sync ``start_weight_update`` -> ``update_weights`` (one or more chunks) -> ``finish_weight_update`` (which
commits a ``weight_version``). Each engine worker runs a ``WeightTransferEngine`` picked by name from
``WeightTransferEngineFactory``. vLLM ships NCCL and CUDA-IPC backends; this package adds ``memmgr_gloo`` (buckets
over a gloo group: CPU engines) to vLLM's registries and drives it from the trainer.

Start the engine with ``vllm.LLM(model, **vllm_engine_kwargs())`` (adds the backend and the worker extension), then
``VLLMWeightSync(llm).connect()`` and ``sync(weights, weight_version=...)``. What the engine holds is the checkpoint
it was started from; a sync must send exactly its tensors, and is all-or-nothing by default (``atomic=True``).

One module per part, split along the process boundary as vLLM splits its own registries:

- ``registry``: the backend's name, the worker extension's path, the registration and ``vllm_engine_kwargs``;
- ``metadata``: what the engine holds (safetensors headers) and its encoding over ``collective_rpc``;
- ``worker`` and ``served`` (vLLM's worker processes): ``MemmgrGlooWeightTransferEngine``, its init and update
  info, ``MemmgrWorkerExtension``, and the host copy that puts the served weights back after a failed sync;
- ``trainer``, ``plan`` and ``client`` (the trainer): ``VLLMWeightSync``, ``VLLMSyncReport``, the bucket stream a
  sync sends, ``OfflineLLMClient``;
- ``trainer_engine`` (the trainer, through vLLM's trainer factory): ``MemmgrGlooTrainerWeightTransferEngine``.

The worker side imports nothing of the trainer side and the other way round. This package imports only
``registry`` (which registers the backend) and loads every other name on first access, so a worker process that
imports ``worker`` (``WORKER_EXTENSION``) does not import the trainer side.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from memmgr.sync.engines.vllm.registry import BACKEND, WORKER_EXTENSION, register_vllm_backends, vllm_engine_kwargs

if TYPE_CHECKING:
    from memmgr.sync.engines.vllm.client import OfflineLLMClient
    from memmgr.sync.engines.vllm.metadata import engine_weight_metadata
    from memmgr.sync.engines.vllm.trainer import VLLMSyncReport, VLLMWeightSync, free_port
    from memmgr.sync.engines.vllm.trainer_engine import (
        MemmgrGlooTrainerInitInfo,
        MemmgrGlooTrainerWeightTransferEngine,
    )
    from memmgr.sync.engines.vllm.worker import (
        MemmgrGlooInitInfo,
        MemmgrGlooUpdateInfo,
        MemmgrGlooWeightTransferEngine,
        MemmgrWorkerExtension,
    )

_LAZY = {
    "engine_weight_metadata": "metadata",
    "MemmgrWorkerExtension": "worker", "MemmgrGlooInitInfo": "worker", "MemmgrGlooUpdateInfo": "worker",
    "MemmgrGlooWeightTransferEngine": "worker",
    "VLLMWeightSync": "trainer", "VLLMSyncReport": "trainer", "free_port": "trainer",
    "OfflineLLMClient": "client",
    "MemmgrGlooTrainerInitInfo": "trainer_engine", "MemmgrGlooTrainerWeightTransferEngine": "trainer_engine",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["BACKEND", "WORKER_EXTENSION", "register_vllm_backends", "vllm_engine_kwargs", "engine_weight_metadata",
           "MemmgrWorkerExtension", "MemmgrGlooInitInfo", "MemmgrGlooUpdateInfo", "MemmgrGlooWeightTransferEngine",
           "VLLMWeightSync", "VLLMSyncReport", "MemmgrGlooTrainerInitInfo", "MemmgrGlooTrainerWeightTransferEngine",
           "free_port", "OfflineLLMClient"]
