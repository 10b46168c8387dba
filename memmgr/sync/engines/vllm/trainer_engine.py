"""``memmgr_gloo`` behind vLLM's trainer-side factory (``WeightTransferTrainerFactory``).

vLLM's trainer factory builds a ``TrainerWeightTransferEngine`` from the init info alone: ``trainer_init(init_info,
client=..., source=...)`` picks the backend from ``init_info.backend`` and calls the engine class's own
``trainer_init`` with the same keywords; the engine's constructor takes ``client``, ``source`` and ``is_sender``
(keywords only, no ``WeightTransferConfig``), as vLLM's base class does. Here the engine drives a
``VLLMWeightSync``: ``send_weights()`` syncs the ``source`` (a vLLM ``WeightSource``, whose ``metadata()`` gives the
specs checked before any weight moves). The registry (``registry.py``) names this module, so vLLM imports it in the
trainer only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from vllm.distributed.weight_transfer.base import TrainerInitInfo, TrainerWeightTransferEngine

from memmgr.errors import MemmgrInputError
from memmgr.sync.engines.vllm.registry import BACKEND
from memmgr.sync.engines.vllm.trainer import VLLMWeightSync
from memmgr.sync.transports.base import DEFAULT_BUCKET_BYTES, ParamSpec


@dataclass
class MemmgrGlooTrainerInitInfo(TrainerInitInfo):
    """Trainer init info of ``memmgr_gloo`` for ``WeightTransferTrainerFactory.trainer_init``."""
    backend: ClassVar[str] = BACKEND

    master_address: str = "127.0.0.1"
    master_port: int | None = None
    num_workers: int | None = None
    timeout_s: float = 120.0
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    atomic: bool = True


class MemmgrGlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[MemmgrGlooTrainerInitInfo]):
    """``memmgr_gloo`` behind vLLM's trainer factory: ``send_weights()`` syncs the ``source`` (a vLLM
    ``WeightSource``: its ``metadata()`` is checked against the engine first) through ``VLLMWeightSync``."""

    init_info_cls = MemmgrGlooTrainerInitInfo

    def __init__(self, *, client: Any, source: Any = None, is_sender: bool = True,
                 sync: VLLMWeightSync | None = None) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.sync = sync

    @classmethod
    def trainer_init(cls, init_info: MemmgrGlooTrainerInitInfo, *, client: Any, source: Any = None
                     ) -> "MemmgrGlooTrainerWeightTransferEngine":
        if source is None:
            raise MemmgrInputError("memmgr_gloo trainer engine: pass source= (a vLLM WeightSource of the weights)")
        sync = None
        if init_info.is_sender:
            sync = VLLMWeightSync(client, master_address=init_info.master_address,
                                  master_port=init_info.master_port, num_workers=init_info.num_workers,
                                  timeout_s=init_info.timeout_s, bucket_bytes=init_info.bucket_bytes,
                                  atomic=init_info.atomic).connect()
        return cls(client=client, source=source, is_sender=init_info.is_sender, sync=sync)

    def send_weights(self, weight_version: str | None = None) -> None:
        source = self.source
        specs = [ParamSpec(m.name, tuple(int(s) for s in m.shape), m.dtype) for m in source.metadata()]
        if not self.is_sender or self.sync is None:
            for _ in source:  # stay in the trainer-side collectives that materialize each tensor
                pass
            return
        self.sync.sync(((n, t.detach().to("cpu")) for n, t in source), specs=specs, weight_version=weight_version)

    def shutdown(self) -> None:
        if self.sync is not None:
            self.sync.close()



__all__ = ["MemmgrGlooTrainerInitInfo", "MemmgrGlooTrainerWeightTransferEngine"]
