"""memmgr: free and restore GPU training state between the phases of colocated RL post-training.

Tiny surface: ``BucketizedFlatTensors`` (a group of tensors that moves between GPU and pinned host memory as a
whole), ``MemoryManager`` (named groups, ``offload``/``onload``, ``phase`` and ``weight_sync`` context managers),
and integrations that build a manager for a plain PyTorch module (``for_module``) or a megatron-core trainer
(``for_megatron``).
"""
import logging

from memmgr._native import BackendInfo, backend_info
from memmgr.errors import (MemmgrCorruptionError, MemmgrError, MemmgrHostMemoryError, MemmgrInputError,
                           MemmgrIntegrationError, MemmgrOutOfMemoryError, MemmgrStateError, MemmgrSyncError)
from memmgr.flat_tensors import BucketizedFlatTensors, FlatTensors
from memmgr.hooks import HookEvent, HookHandle
from memmgr.manager import GroupStatus, MemoryManager
from memmgr.states import BucketState, GroupState, Policy
from memmgr.integrations.plain_torch import for_module
from memmgr.host_memory import HostBuffer, HostMemoryPool, allocate_host_buffer, default_pool
from memmgr.transfer import TransferHandle
# Imported eagerly: importing the submodule memmgr.swap sets the package attribute `swap` to the module, so a lazy
# function lookup would work once and then find the module.
from memmgr.swap import swap

logging.getLogger("memmgr").addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "BackendInfo", "backend_info", "BucketizedFlatTensors", "BucketState", "GroupState", "FlatTensors", "Policy", "HostBuffer",
    "HostMemoryPool", "allocate_host_buffer", "default_pool", "TransferHandle", "MemmgrError", "MemmgrInputError",
    "MemmgrStateError", "MemmgrOutOfMemoryError", "MemmgrHostMemoryError", "MemmgrCorruptionError",
    "MemmgrIntegrationError", "MemmgrSyncError", "MemoryManager", "GroupStatus", "HookEvent", "HookHandle", "for_module",
    "swap",
]


def __getattr__(name: str):
    # Optional integrations and tools load on first use, so `import memmgr` stays light and needs no megatron-core.
    if name == "for_megatron":
        from memmgr.integrations.megatron import for_megatron

        return for_megatron
    if name in ("ledger", "sync", "budget", "ordered", "tools"):
        import importlib

        return importlib.import_module(f"memmgr.{name}")
    raise AttributeError(f"module 'memmgr' has no attribute {name!r}")
