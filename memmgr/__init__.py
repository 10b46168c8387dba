"""memmgr: free and restore GPU training state between the phases of colocated RL post-training.

Tiny surface: ``BucketizedFlatTensors`` (a group of tensors that moves between GPU and pinned host memory as a
whole), ``MemoryManager`` (named groups, ``offload``/``onload``, ``phase`` and ``weight_sync`` context managers),
and integrations that build a manager for a plain PyTorch module (``for_module``) or a megatron-core trainer
(``for_megatron``).

The public names are imported from their modules on first access (PEP 562), so ``import memmgr`` (and the
``memmgr`` command line's ``--help``) does not import torch until a name that needs it is used.
"""
from __future__ import annotations

import importlib
import logging
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports each name on first access
    # `X as X`: re-exported though not in __all__
    from memmgr import budget as budget, ledger as ledger, ordered as ordered, sync as sync, tools as tools
    from memmgr._native import BackendInfo, backend_info
    from memmgr.errors import (MemmgrCorruptionError, MemmgrError, MemmgrHostMemoryError, MemmgrInputError,
                               MemmgrIntegrationError, MemmgrOutOfMemoryError, MemmgrStateError, MemmgrSyncError)
    from memmgr.flat_tensors import BucketizedFlatTensors, FlatTensors
    from memmgr.hooks import HookEvent, HookHandle
    from memmgr.host_memory import HostBuffer, HostMemoryPool, allocate_host_buffer, default_pool
    from memmgr.integrations.megatron import for_megatron as for_megatron
    from memmgr.integrations.plain_torch import for_module
    from memmgr.manager import GroupStatus, MemoryManager
    from memmgr.states import BucketState, GroupState, Policy
    from memmgr.swap import swap
    from memmgr.transfer import TransferHandle

logging.getLogger("memmgr").addHandler(logging.NullHandler())

__version__ = "0.1.0"

# public name -> the module that defines it
_WHERE = {
    "BackendInfo": "memmgr._native",
    "backend_info": "memmgr._native",
    "MemmgrError": "memmgr.errors",
    "MemmgrInputError": "memmgr.errors",
    "MemmgrStateError": "memmgr.errors",
    "MemmgrOutOfMemoryError": "memmgr.errors",
    "MemmgrHostMemoryError": "memmgr.errors",
    "MemmgrCorruptionError": "memmgr.errors",
    "MemmgrIntegrationError": "memmgr.errors",
    "MemmgrSyncError": "memmgr.errors",
    "BucketizedFlatTensors": "memmgr.flat_tensors",
    "FlatTensors": "memmgr.flat_tensors",
    "HookEvent": "memmgr.hooks",
    "HookHandle": "memmgr.hooks",
    "HostBuffer": "memmgr.host_memory",
    "HostMemoryPool": "memmgr.host_memory",
    "allocate_host_buffer": "memmgr.host_memory",
    "default_pool": "memmgr.host_memory",
    "for_module": "memmgr.integrations.plain_torch",
    "GroupStatus": "memmgr.manager",
    "MemoryManager": "memmgr.manager",
    "BucketState": "memmgr.states",
    "GroupState": "memmgr.states",
    "Policy": "memmgr.states",
    "swap": "memmgr.swap",
    "TransferHandle": "memmgr.transfer",
}

# Reachable as attributes but not exported by `from memmgr import *`: the optional megatron integration (needs
# megatron-core) and the submodules that are part of the documented surface.
_OPTIONAL = {"for_megatron": "memmgr.integrations.megatron"}
_SUBMODULES = ("ledger", "sync", "budget", "ordered", "tools")

__all__ = [
    "BackendInfo", "backend_info", "BucketizedFlatTensors", "BucketState", "GroupState", "FlatTensors", "Policy",
    "HostBuffer", "HostMemoryPool", "allocate_host_buffer", "default_pool", "TransferHandle", "MemmgrError",
    "MemmgrInputError", "MemmgrStateError", "MemmgrOutOfMemoryError", "MemmgrHostMemoryError", "MemmgrCorruptionError",
    "MemmgrIntegrationError", "MemmgrSyncError", "MemoryManager", "GroupStatus", "HookEvent", "HookHandle",
    "for_module", "swap",
]


# Modules a name's report needs loaded first: backend_info reports what memmgr.transfer (the copy paths) and
# memmgr.same_address (its support check) register with memmgr._native, which cannot import them itself.
_LOADS_FIRST = {"backend_info": ("memmgr.transfer", "memmgr.same_address")}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"memmgr.{name}")
    where = _WHERE.get(name) or _OPTIONAL.get(name)
    if where is None:
        raise AttributeError(f"module 'memmgr' has no attribute {name!r}")
    for module in _LOADS_FIRST.get(name, ()):
        importlib.import_module(module)
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_OPTIONAL) | set(_SUBMODULES))


class _Package(types.ModuleType):
    """The package's module type. The import system binds each submodule on its package once it has loaded it, so
    loading ``memmgr.swap`` (by ``memmgr.swap`` itself or by any ``from memmgr.swap import ...``) would make the
    package attribute ``swap`` the module; it stays the function of that name, as ``__all__`` promises."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _WHERE and isinstance(value, types.ModuleType) and value.__name__ == _WHERE[name]:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
