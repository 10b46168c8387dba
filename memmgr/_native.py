"""Loads the optional native extension; says which host-memory paths, copy paths and driver settle are in use."""
from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

import torch

from memmgr import driver_settle
from memmgr._toolkit import BUILD_COMMAND, find_cuda_toolkit

logger = logging.getLogger("memmgr")


native: ModuleType | None = None
_import_error: str | None = None
if importlib.util.find_spec("memmgr._pinned") is None:  # the pure-Python path is a supported configuration
    _import_error = "no memmgr._pinned in this installation: it is built only where a CUDA toolkit was found at " \
                    "install time"
else:
    try:
        native = importlib.import_module("memmgr._pinned")
    except ImportError as exc:
        _import_error = str(exc)


@dataclass(frozen=True)
class BackendInfo:
    """Which host-memory path and which copy paths memmgr uses on this machine, and why."""

    extension_built: bool
    extension_error: str | None
    cuda_available: bool
    pinning: str  # "native", "cudart-register" or "none (no CUDA)"
    copy_paths: tuple[str, ...] = ("engine",)  # the ways bytes can move here (memmgr.transfer)
    copy_path_requested: str = "auto"  # $MEMMGR_COPY_PATH, or "auto"
    copy_path_auto: dict[str, str] = field(default_factory=dict)  # what "auto" runs per direction
    copy_path_last: dict[str, str] = field(default_factory=dict)  # the path that ran last per direction
    driver_settle: dict[str, Any] = field(default_factory=dict)  # memmgr.driver_settle.status()
    copy_kernel_shape: dict[str, Any] = field(default_factory=dict)  # per device, memmgr.copy_shape.shape_status()
    same_address: str = "unavailable"  # whether same_address=True can be honoured here, or why not

    def describe(self) -> str:
        ext = "built" if self.extension_built else f"not built ({self.extension_error}; {build_hint()})"
        text = f"native extension {ext}; CUDA {'available' if self.cuda_available else 'unavailable'}; " \
               f"host buffers pinned via {self.pinning}; copy paths {', '.join(self.copy_paths)} " \
               f"(requested {self.copy_path_requested}"
        if self.copy_path_auto:
            text += "; auto: " + ", ".join(f"{d} {p}" for d, p in sorted(self.copy_path_auto.items()))
        text += ")"
        if self.copy_path_last:
            text += "; last ran: " + ", ".join(f"{d} {p}" for d, p in sorted(self.copy_path_last.items()))
        if self.copy_kernel_shape:
            text += "; copy kernel shape (blocks per SM:unroll): " + ", ".join(
                f"{d} {c['shape']} ({c['source']})" for d, c in sorted(self.copy_kernel_shape.items()))
        if self.driver_settle:
            text += "; " + describe_driver_settle(self.driver_settle)
        return text + f"; same-address memory {self.same_address}"


def describe_driver_settle(status: dict[str, Any]) -> str:
    """One phrase for ``memmgr.driver_settle.status()``."""
    if not status.get("enabled"):
        return "driver settle at offload off"
    if not status.get("available"):
        return "driver settle at offload unavailable (no libcuda)"
    text = f"driver settle at offload on ({status.get('started', 0)} run"
    if status.get("last_ms") is not None:
        text += f", last {status['last_ms']:.1f} ms"
    if status.get("last_error"):
        text += f", last error: {status['last_error']}"
    return text + ")"


def native_module() -> ModuleType | None:
    return native


def build_hint() -> str:
    """How to build the native extension (its pinning and the copy kernel) now: the command to run from a memmgr
    checkout, and whether this machine has the CUDA toolkit it needs."""
    toolkit = find_cuda_toolkit()
    where = f"the CUDA toolkit at {toolkit}" if toolkit else \
        "a CUDA toolkit (none found here: install one and put nvcc on PATH or set CUDA_HOME)"
    return f"to build it, run from a memmgr checkout with {where}: {BUILD_COMMAND}"


# memmgr.transfer owns the copy paths and registers how to report them here (it imports this module, so this module
# cannot import it back).
_copy_paths_status: Callable[[], dict[str, Any]] | None = None


def register_copy_paths_status(status: Callable[[], dict[str, Any]]) -> None:
    """Sets the function whose report of the copy paths ``backend_info`` includes (memmgr.transfer's)."""
    global _copy_paths_status
    _copy_paths_status = status


_same_address_support: Callable[[], tuple[bool, str]] | None = None


def register_same_address_support(support: Callable[[], tuple[bool, str]]) -> None:
    """Sets the check (supported, why) whose answer ``backend_info`` reports (memmgr.same_address's)."""
    global _same_address_support
    _same_address_support = support


def backend_info() -> BackendInfo:
    cuda = torch.cuda.is_available()
    if not cuda:
        pinning = "none (no CUDA: host stores are ordinary memory)"
    elif native is not None:
        pinning = "native (parallel first touch + cudaHostRegister)"
    else:
        pinning = "cudart-register (torch.cuda.cudart().cudaHostRegister on an exact-size tensor)"
    paths = _copy_paths_status() if _copy_paths_status is not None else \
        {"available": ["engine"], "requested": "auto", "auto": {}, "last": {}}
    return BackendInfo(native is not None, _import_error, cuda, pinning, tuple(paths["available"]),
                       str(paths["requested"]), dict(paths["auto"]), dict(paths["last"]),
                       driver_settle.status() if cuda else {}, dict(paths.get("kernel_shape") or {}),
                       _same_address_status())


def _same_address_status() -> str:
    """"available" where the current device can hold same-address memory, else why not (the support check
    ``memmgr.same_address`` registers; it imports this module, so this module cannot import it back)."""
    if _same_address_support is None:
        return "unavailable (memmgr.same_address is not loaded)"
    supported, why = _same_address_support()
    return "available" if supported else f"unavailable ({why})"
