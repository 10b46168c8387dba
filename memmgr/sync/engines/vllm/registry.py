"""The names that enable memmgr's ``memmgr_gloo`` backend in vLLM, and its entries in vLLM's two registries.

vLLM picks a weight-transfer engine by name from ``WeightTransferEngineFactory`` (in its worker processes) and
``WeightTransferTrainerFactory`` (in the trainer). Both registries import an engine lazily, from a module path and a
class name, and they are separate so that the worker and the trainer do not import each other's code. This module
registers ``memmgr_gloo`` in both by those strings (``worker.py`` for the worker, ``trainer_engine.py`` for the
trainer) and imports neither side itself. ``register_sleep_backend`` (memmgr's ``vllm.general_plugins`` entry
point) adds the ``memmgr`` sleep-mode backend (``sleep.py``) to vLLM's ``SleepModeBackendFactory`` the same way.

Importing this module registers the backend. ``worker.py`` imports it, so naming ``WORKER_EXTENSION`` as the
engine's ``worker_extension_cls`` registers the backend inside vLLM's worker processes before they build their
transfer engine.
"""
from __future__ import annotations

from typing import Any

from vllm.distributed.weight_transfer import WeightTransferEngineFactory, WeightTransferTrainerFactory

from memmgr.errors import MemmgrInputError

BACKEND = "memmgr_gloo"
BACKENDS = (BACKEND, "ipc", "nccl")  # the backends VLLMWeightSync drives: memmgr's, and vLLM's own two for GPUs
WORKER_EXTENSION = "memmgr.sync.engines.vllm.worker.MemmgrWorkerExtension"
_WORKER_ENGINE = ("memmgr.sync.engines.vllm.worker", "MemmgrGlooWeightTransferEngine")
_TRAINER_ENGINE = ("memmgr.sync.engines.vllm.trainer_engine", "MemmgrGlooTrainerWeightTransferEngine")
SLEEP_BACKEND = "memmgr"  # vLLM's model_config.sleep_mode_backend for memmgr's sleep backend (issue 33)
_SLEEP_BACKEND = ("memmgr.sync.engines.vllm.sleep", "MemmgrSleepBackend")


def register_vllm_backends() -> None:
    """Adds ``memmgr_gloo`` to vLLM's worker-side and trainer-side weight-transfer registries (idempotent), each by
    module path and class name, so a registry imports only its own side, when it builds the engine."""
    for factory, (module_path, cls_name) in ((WeightTransferEngineFactory, _WORKER_ENGINE),
                                             (WeightTransferTrainerFactory, _TRAINER_ENGINE)):
        try:
            factory.register_engine(BACKEND, module_path, cls_name)
        except ValueError:  # already registered (this module imported twice, or by a vLLM plugin)
            pass


def register_sleep_backend() -> None:
    """memmgr's ``vllm.general_plugins`` entry point (pyproject.toml), which vLLM calls in each of its processes,
    possibly more than once: adds the ``"memmgr"`` sleep-mode backend (``sleep.MemmgrSleepBackend``) to vLLM's
    ``SleepModeBackendFactory`` by module path and class name, once. Importing this module also registers
    ``memmgr_gloo`` (see the module docstring)."""
    from vllm.device_allocator.sleep_mode_backend import SleepModeBackendFactory

    try:
        SleepModeBackendFactory.register_backend(SLEEP_BACKEND, *_SLEEP_BACKEND)
    except ValueError:  # registered already (the plugin ran before in this process)
        pass


def vllm_engine_kwargs(*, backend: str = BACKEND, **extra: Any) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM(...)`` / ``EngineArgs`` that enable memmgr's weight sync: the transfer
    ``backend`` (``"memmgr_gloo"``, the default, for CPU engines; vLLM's ``"ipc"`` or ``"nccl"`` on GPUs) and the
    worker extension, which answers what the engine holds and keeps the atomicity copy (``extra`` is merged in)."""
    from vllm.config import WeightTransferConfig

    if backend not in BACKENDS:
        raise MemmgrInputError(f"vllm_engine_kwargs: backend={backend!r} is not one memmgr drives; pick one of "
                               f"{BACKENDS}")
    if extra.get("worker_extension_cls") not in (None, WORKER_EXTENSION):
        raise MemmgrInputError(f"vllm_engine_kwargs: worker_extension_cls={extra['worker_extension_cls']!r} would "
                               f"replace memmgr's {WORKER_EXTENSION!r}; subclass MemmgrWorkerExtension instead")
    kwargs = {"weight_transfer_config": WeightTransferConfig(backend=backend), "worker_extension_cls": WORKER_EXTENSION}
    kwargs.update(extra)
    return kwargs


register_vllm_backends()

__all__ = ["BACKEND", "BACKENDS", "SLEEP_BACKEND", "WORKER_EXTENSION", "register_sleep_backend",
           "register_vllm_backends", "vllm_engine_kwargs"]
