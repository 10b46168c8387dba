"""vLLM's own CUDA IPC weight transfer between the trainer and lab.IpcEngineProcess's transformers model, with no
vLLM worker: the trainer runs vLLM's ``IPCTrainerWeightTransferEngine`` (built by ``WeightTransferTrainerFactory``
from ``IPCTrainerInitInfo``) over a ``WeightSource``; its control-plane client (``EngineClient``, vLLM's
``VLLMWeightSyncClient`` protocol) forwards each call to the engine process, which answers it with vLLM's
``IPCWeightTransferEngine`` (``Receiver``) whose target model is the transformers model behind
memmgr.sync.ModuleWeightLoader (vLLM's engine calls ``model.load_weights(pairs)``).

What a vLLM worker adds and this leaves out: ``start_weight_update``/``finish_weight_update`` run vLLM's layerwise
reload of a vLLM model (``vllm.model_executor.model_loader.reload``), which a transformers model does not have;
here they are acknowledged and counted, and the weights are loaded by ``update_weights`` (vLLM's
``WeightTransferEngine.update_weights``: parse, ``receive_weights``, synchronize) as in a worker. Needs vLLM's
weight-transfer modules (the installed vLLM, or .vllm-py/ from benchmarks/make_vllm_subset.py) in both processes.
"""
from __future__ import annotations

import types
from typing import Any

import torch


class Receiver:
    """The engine process's side: vLLM's ``IPCWeightTransferEngine`` loading into ``model``."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        from vllm.config.weight_transfer import WeightTransferConfig
        from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine

        from memmgr.sync import ModuleWeightLoader

        self.loader = ModuleWeightLoader(model)
        target = types.SimpleNamespace(load_weights=self.loader)
        # the engine reads parallel_config/model_config only in the layerwise reload this leaves out
        vllm_config = types.SimpleNamespace(parallel_config=None, model_config=None)
        self.engine = IPCWeightTransferEngine(WeightTransferConfig(backend="ipc"), vllm_config, device, target)
        self.calls = {"init": 0, "start": 0, "update": 0, "finish": 0}

    def handle(self, method: str, payload: Any) -> None:
        self.calls[method] += 1
        if method == "init":
            self.engine.init_transfer_engine(self.engine.parse_init_info(payload))
        elif method == "update":
            with torch.no_grad():
                self.engine.update_weights(payload)

    def close(self) -> None:
        self.engine.shutdown()


class EngineClient:
    """vLLM's ``VLLMWeightSyncClient`` over an ``lab.IpcEngineProcess``: every call is one round trip."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def _call(self, method: str, payload: Any = None) -> None:
        self.engine.announce(("vllm", method, payload))

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._call("init", init_info)

    def start_weight_update(self) -> None:
        self._call("start")

    def update_weights(self, update_info: Any) -> None:
        self._call("update", update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._call("finish")


def trainer_engine(engine: Any, source: Any, *, packed: bool, buffer_bytes: int) -> Any:
    """vLLM's trainer-side IPC engine over ``source``, connected to ``engine`` (the factory's ``trainer_init``)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
    from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

    info = IPCTrainerInitInfo(rank=0, packed=packed, packed_buffer_size_bytes=buffer_bytes)
    return WeightTransferTrainerFactory.trainer_init(info, client=EngineClient(engine), source=source)
