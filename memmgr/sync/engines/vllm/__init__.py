"""memmgr as the weight source of a vLLM engine, through vLLM's weight-transfer protocol.

vLLM's protocol (``vllm.distributed.weight_transfer``): the trainer calls ``init_weight_transfer_engine`` once, then
per sync ``start_weight_update`` -> ``update_weights`` (one or more chunks) -> ``finish_weight_update`` (which
commits a ``weight_version``). Each engine worker runs a ``WeightTransferEngine`` picked by name from
``WeightTransferEngineFactory``. vLLM ships NCCL and CUDA-IPC backends; this package adds ``memmgr_gloo`` (buckets
over a gloo group: CPU engines) to vLLM's registries. Every sync goes through vLLM's trainer-side seam: the weights
become a vLLM ``WeightSource`` (``ExportWeightSource`` over memmgr's Megatron export), and the backend's trainer
engine, picked by name from vLLM's ``WeightTransferTrainerFactory``, sends it: ``ipc`` and ``nccl`` (vLLM's) or
``memmgr_gloo`` (memmgr's, an ordinary trainer engine consuming a ``WeightSource``).

Start the engine with ``vllm.LLM(model, **vllm_engine_kwargs(backend=...))`` (adds the backend and the worker
extension), then ``VLLMWeightSync(llm, backend=...)`` and ``sync(weights, weight_version=...)``. What the engine
holds is the checkpoint it was started from; a sync must send exactly its tensors, and is all-or-nothing by default
(``atomic=True``) on every backend.

One module per part, split along the process boundary as vLLM splits its own registries:

- ``registry``: the backend's name, the worker extension's path, the registration and ``vllm_engine_kwargs``; the
  ``vllm.general_plugins`` entry point ``register_sleep_backend``;
- ``metadata``: what the engine holds (safetensors headers) and its encoding over ``collective_rpc``;
- ``worker`` and ``served`` (vLLM's worker processes): ``MemmgrGlooWeightTransferEngine``, its init and update
  info, ``MemmgrWorkerExtension``, and the host copy that puts the served weights back after a failed sync;
- ``trainer``, ``plan`` and ``client`` (the trainer): ``VLLMWeightSync``, ``VLLMSyncReport``, the forms a sync's
  weights come in as a ``WeightSource``, ``OfflineLLMClient``;
- ``source`` (the trainer): ``ExportWeightSource``, vLLM's ``WeightSource`` over memmgr's Megatron export;
- ``trainer_engine`` (the trainer, through vLLM's trainer factory): ``MemmgrGlooTrainerWeightTransferEngine``;
- ``sleep`` (vLLM's worker processes): ``MemmgrSleepBackend``, vLLM's sleep-mode backend ``"memmgr"`` (issue 33),
  and ``use_memmgr_sleep_backend``, which selects it in a running engine.

The worker side imports nothing of the trainer side and the other way round. This package imports only
``registry`` (which registers the backend) and loads every other name on first access, so a worker process that
imports ``worker`` (``WORKER_EXTENSION``) does not import the trainer side.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from memmgr.sync.engines.vllm.registry import (
    BACKEND,
    BACKENDS,
    SLEEP_BACKEND,
    WORKER_EXTENSION,
    register_sleep_backend,
    register_vllm_backends,
    vllm_engine_kwargs,
)

if TYPE_CHECKING:
    from memmgr.sync.engines.vllm.client import OfflineLLMClient
    from memmgr.sync.engines.vllm.metadata import engine_weight_metadata
    from memmgr.sync.engines.vllm.plan import as_weight_source
    from memmgr.sync.engines.vllm.sleep import MemmgrSleepBackend, use_memmgr_sleep_backend
    from memmgr.sync.engines.vllm.source import ExportWeightSource
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
    "OfflineLLMClient": "client", "ExportWeightSource": "source", "as_weight_source": "plan",
    "MemmgrSleepBackend": "sleep", "use_memmgr_sleep_backend": "sleep",
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


__all__ = ["BACKEND", "BACKENDS", "SLEEP_BACKEND", "WORKER_EXTENSION", "register_sleep_backend",
           "register_vllm_backends", "vllm_engine_kwargs", "MemmgrSleepBackend", "use_memmgr_sleep_backend",
           "engine_weight_metadata", "MemmgrWorkerExtension", "MemmgrGlooInitInfo", "MemmgrGlooUpdateInfo",
           "MemmgrGlooWeightTransferEngine", "VLLMWeightSync", "VLLMSyncReport", "ExportWeightSource",
           "as_weight_source", "MemmgrGlooTrainerInitInfo", "MemmgrGlooTrainerWeightTransferEngine", "free_port",
           "OfflineLLMClient"]
