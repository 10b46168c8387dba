"""Loads the optional native extension and says which host-memory path is in use."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType

import torch

logger = logging.getLogger("memmgr")

import importlib
import importlib.util

native: ModuleType | None = None
_import_error: str | None = None
if importlib.util.find_spec("memmgr._pinned") is None:  # the pure-Python path is a supported configuration
    _import_error = "no memmgr._pinned in this installation (built only where a CUDA toolkit was found)"
else:
    try:
        native = importlib.import_module("memmgr._pinned")
    except ImportError as exc:
        _import_error = str(exc)


@dataclass(frozen=True)
class BackendInfo:
    """Which host-memory path memmgr uses on this machine and why."""

    extension_built: bool
    extension_error: str | None
    cuda_available: bool
    pinning: str  # "native", "cudart-register" or "none (no CUDA)"

    def describe(self) -> str:
        ext = "built" if self.extension_built else f"not built ({self.extension_error})"
        return f"native extension {ext}; CUDA {'available' if self.cuda_available else 'unavailable'}; " \
               f"host buffers pinned via {self.pinning}"


def native_module() -> ModuleType | None:
    return native


def backend_info() -> BackendInfo:
    cuda = torch.cuda.is_available()
    if not cuda:
        pinning = "none (no CUDA: host stores are ordinary memory)"
    elif native is not None:
        pinning = "native (parallel first touch + cudaHostRegister)"
    else:
        pinning = "cudart-register (torch.cuda.cudart().cudaHostRegister on an exact-size tensor)"
    return BackendInfo(native is not None, _import_error, cuda, pinning)
