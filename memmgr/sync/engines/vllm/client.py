"""The engine's control plane as the trainer sees it: vLLM's weight-sync client protocol (``VLLMWeightSyncClient``:
``init_weight_transfer_engine``, ``start_weight_update``, ``update_weights``, ``finish_weight_update``, plain dicts
in), plus ``collective_rpc``. A client with these methods is used as it is; ``OfflineLLMClient`` adapts an offline
``vllm.LLM``, whose methods take request dicts, and ``as_client`` wraps one where it is given."""
from __future__ import annotations

import logging
from typing import Any, Callable

from memmgr.errors import MemmgrSyncError

logger = logging.getLogger("memmgr")


def call_engine(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, a call into the engine (``what`` names it); any failure but a ``MemmgrSyncError`` comes back as a
    ``MemmgrSyncError`` that says where the engine failed."""
    try:
        return fn(*args)
    except MemmgrSyncError:
        raise
    except Exception as exc:
        raise MemmgrSyncError(f"vLLM weight sync: the engine failed in {what} ({type(exc).__name__}: "
                              f"{str(exc)[:800]})") from exc


def shutdown_transfer_engine(client: Any) -> None:
    """Asks the engine to shut its weight-transfer engine down, where its client can; a failure is logged."""
    shutdown = getattr(client, "shutdown_weight_transfer_engine", None)
    if callable(shutdown):
        try:
            shutdown()
        except Exception as exc:
            logger.warning("vLLM weight sync: shutdown_weight_transfer_engine failed: %s", exc)


class OfflineLLMClient:
    """vLLM's weight-sync client protocol (``VLLMWeightSyncClient``: plain dicts in) over an offline ``vllm.LLM``,
    whose methods take request dicts (``{"init_info": ...}``, ``{"update_info": ...}``), plus ``collective_rpc``."""

    def __init__(self, llm: Any):
        self.llm = llm

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version)

    def shutdown_weight_transfer_engine(self) -> None:
        self.llm.shutdown_weight_transfer_engine()

    def collective_rpc(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return self.llm.collective_rpc(method, *args, **kwargs)

    def get_weight_version(self) -> str:
        return self.llm.get_weight_version()


def as_client(client: Any) -> Any:
    """``client`` itself, or an ``OfflineLLMClient`` over it where it is an offline ``vllm.LLM``."""
    try:
        from vllm.entrypoints.rl.offline import RLOfflineMixin
    except ImportError:  # pragma: no cover - other vLLM layouts
        return client
    return OfflineLLMClient(client) if isinstance(client, RLOfflineMixin) else client


__all__ = ["OfflineLLMClient", "as_client"]
