"""A small, safe wrapper over NVML (``pynvml``, from the nvidia-ml-py package).

Every function returns ``None`` (or an empty result) when NVML cannot answer: pynvml not installed, no driver,
a container without the management library, or any ``NVMLError``. Nothing here raises into training code;
``unavailable_reason()`` / ``status()`` say why NVML is unavailable.

Indices: NVML numbers GPUs in PCI bus order over the whole machine, while torch numbers the GPUs that
``CUDA_VISIBLE_DEVICES`` leaves visible (ordered by ``CUDA_DEVICE_ORDER``). ``nvml_index(torch_index)`` maps one to
the other by UUID when torch can say the UUID, and by parsing ``CUDA_VISIBLE_DEVICES`` otherwise.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

logger = logging.getLogger("memmgr")

_lock = threading.Lock()
_nvml: ModuleType | None = None
_tried = False
_reason: str | None = None
_uuid_cache: dict[int, int | None] = {}


@dataclass(frozen=True)
class DeviceMemory:
    """NVML's view of one GPU's memory, in bytes. ``reserved`` (driver-reserved) is None on old drivers."""

    total: int
    used: int
    free: int
    reserved: int | None = None


@dataclass(frozen=True)
class ProcessMemory:
    """GPU memory NVML attributes to this process, in bytes, and how it was found.

    ``source``: "pid" (this process's pid is in NVML's list), "only-process" (the pid is not visible, as in a
    container with its own pid namespace, but NVML lists exactly one compute process on the GPU, taken to be this
    one), or "not-visible" (``nbytes`` is None: several or no processes listed and none with this pid).
    """

    nbytes: int | None
    source: str
    processes: int


@dataclass(frozen=True)
class PcieLink:
    """PCIe link generation and width: now (GPUs downshift the link when idle) and the most the link allows."""

    current_gen: int | None
    current_width: int | None
    max_gen: int | None
    max_width: int | None
    gpu_max_gen: int | None = None  # what the GPU itself supports (the link max is the lower of GPU and slot)

    def describe(self) -> str:
        def fmt(gen: int | None, width: int | None) -> str:
            return f"gen{gen if gen is not None else '?'} x{width if width is not None else '?'}"

        text = f"max {fmt(self.max_gen, self.max_width)}, now {fmt(self.current_gen, self.current_width)}"
        if self.gpu_max_gen is not None and self.max_gen is not None and self.gpu_max_gen > self.max_gen:
            text += f" (the GPU supports gen{self.gpu_max_gen}; the slot or riser limits it)"
        return text


def _set_reason(reason: str) -> None:
    global _reason
    _reason = reason


def _module() -> ModuleType | None:
    """pynvml, initialized once; None (with the reason kept) when NVML cannot be used."""
    global _nvml, _tried
    if _tried:
        return _nvml
    with _lock:
        if _tried:
            return _nvml
        try:
            import pynvml  # type: ignore[import-not-found]
        except Exception as exc:  # ImportError, or a broken install
            _set_reason(f"pynvml is not installed ({exc}); pip install nvidia-ml-py")
            _tried = True
            return None
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, _NoPermission, ...
            _set_reason(f"{type(exc).__name__}: {exc}")
            _tried = True
            return None
        _nvml = pynvml
        _tried = True
        return _nvml


def reset() -> None:
    """Forgets the initialization (shuts NVML down if it was up), so the next call initializes again."""
    global _nvml, _tried, _reason
    with _lock:
        if _nvml is not None:
            try:
                _nvml.nvmlShutdown()
            except Exception:
                pass
        _nvml = None
        _tried = False
        _reason = None
        _uuid_cache.clear()


def available() -> bool:
    return _module() is not None


def unavailable_reason() -> str | None:
    """Why NVML is unavailable, or None when it works."""
    return None if _module() is not None else _reason


def status() -> str:
    """One line: "NVML: driver <v>, <n> GPU(s)" or "NVML unavailable: <reason>"."""
    nvml = _module()
    if nvml is None:
        return f"NVML unavailable: {_reason}"
    return f"NVML: driver {driver_version() or '?'}, {device_count() or 0} GPU(s)"


def _call(fn_name: str, *args: Any, default: Any = None, **kwargs: Any) -> Any:
    nvml = _module()
    if nvml is None:
        return default
    try:
        return getattr(nvml, fn_name)(*args, **kwargs)
    except Exception as exc:  # NVMLError (NotSupported, GpuIsLost, ...) or a function this pynvml lacks
        logger.debug("NVML %s failed: %s: %s", fn_name, type(exc).__name__, exc)
        return default


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _handle(index: int) -> Any:
    return _call("nvmlDeviceGetHandleByIndex", index)


def device_count() -> int | None:
    return _call("nvmlDeviceGetCount")


def driver_version() -> str | None:
    return _text(_call("nvmlSystemGetDriverVersion"))


def cuda_driver_version() -> str | None:
    """The CUDA version the driver supports, e.g. "13.0"."""
    v = _call("nvmlSystemGetCudaDriverVersion")
    if not isinstance(v, int):
        return None
    return f"{v // 1000}.{(v % 1000) // 10}"


def device_name(index: int) -> str | None:
    h = _handle(index)
    return None if h is None else _text(_call("nvmlDeviceGetName", h))


def device_uuid(index: int) -> str | None:
    h = _handle(index)
    return None if h is None else _text(_call("nvmlDeviceGetUUID", h))


def device_memory(index: int) -> DeviceMemory | None:
    """Total / used / free bytes of NVML device ``index`` (NVML numbering: see ``nvml_index``)."""
    h = _handle(index)
    if h is None:
        return None
    nvml = _module()
    version = getattr(nvml, "nvmlMemory_v2", None)
    info = _call("nvmlDeviceGetMemoryInfo", h, version=version) if version else None
    if info is not None:
        return DeviceMemory(int(info.total), int(info.used), int(info.free), int(getattr(info, "reserved", 0)))
    info = _call("nvmlDeviceGetMemoryInfo", h)
    if info is None:
        return None
    return DeviceMemory(int(info.total), int(info.used), int(info.free), None)


def process_memory(index: int, pid: int | None = None) -> ProcessMemory | None:
    """GPU memory that NVML attributes to process ``pid`` (this process by default) on NVML device ``index``."""
    h = _handle(index)
    if h is None:
        return None
    procs = _call("nvmlDeviceGetComputeRunningProcesses", h)
    if procs is None:
        return None
    pid = os.getpid() if pid is None else pid

    def used(p: Any) -> int | None:
        value = getattr(p, "usedGpuMemory", None)
        return int(value) if value is not None else None  # None: NVML_VALUE_NOT_AVAILABLE (e.g. under MIG/WSL)

    mine = [p for p in procs if getattr(p, "pid", None) == pid]
    if mine:
        sizes = [used(p) for p in mine]
        return ProcessMemory(None if None in sizes else sum(sizes), "pid", len(procs))  # type: ignore[arg-type]
    if len(procs) == 1:
        return ProcessMemory(used(procs[0]), "only-process", 1)
    return ProcessMemory(None, "not-visible", len(procs))


def pcie_link(index: int) -> PcieLink | None:
    h = _handle(index)
    if h is None:
        return None
    link = PcieLink(
        current_gen=_call("nvmlDeviceGetCurrPcieLinkGeneration", h),
        current_width=_call("nvmlDeviceGetCurrPcieLinkWidth", h),
        max_gen=_call("nvmlDeviceGetMaxPcieLinkGeneration", h),
        max_width=_call("nvmlDeviceGetMaxPcieLinkWidth", h),
        gpu_max_gen=_call("nvmlDeviceGetGpuMaxPcieLinkGeneration", h),
    )
    if all(v is None for v in (link.current_gen, link.current_width, link.max_gen, link.max_width)):
        return None
    return link


def _normalize_uuid(text: str) -> str:
    text = text.strip().lower()
    for prefix in ("gpu-", "mig-"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text


def _index_by_uuid(uuid: str) -> int | None:
    want = _normalize_uuid(uuid)
    for i in range(device_count() or 0):
        u = device_uuid(i)
        if u is not None and want and _normalize_uuid(u).startswith(want):
            return i
    return None


def _torch_uuid(torch_index: int) -> str | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        uuid = getattr(torch.cuda.get_device_properties(torch_index), "uuid", None)
        return str(uuid) if uuid is not None else None
    except Exception as exc:
        logger.debug("torch could not give the UUID of cuda:%d: %s", torch_index, exc)
        return None


def nvml_index(torch_index: int) -> int | None:
    """The NVML index of torch's ``cuda:<torch_index>``, respecting ``CUDA_VISIBLE_DEVICES``; None if unknown."""
    if torch_index in _uuid_cache:
        return _uuid_cache[torch_index]
    if _module() is None:
        return None
    result: int | None = None
    uuid = _torch_uuid(torch_index)
    if uuid:
        result = _index_by_uuid(uuid)
    if result is None:
        result = _index_from_visible_devices(torch_index)
    _uuid_cache[torch_index] = result
    return result


def _index_from_visible_devices(torch_index: int) -> int | None:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    count = device_count() or 0
    if visible is None or visible.strip() == "":
        return torch_index if torch_index < count else None
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    # CUDA stops at the first invalid entry
    if torch_index >= len(entries):
        return None
    entry = entries[torch_index]
    if entry.lstrip("-").isdigit():
        idx = int(entry)
        return idx if 0 <= idx < count else None
    return _index_by_uuid(entry)


def describe_device(index: int) -> dict[str, Any]:
    """Everything this module knows about NVML device ``index``, as plain data (missing values are None)."""
    mem = device_memory(index)
    link = pcie_link(index)
    return {
        "nvml_index": index,
        "name": device_name(index),
        "uuid": device_uuid(index),
        "total": mem.total if mem else None,
        "used": mem.used if mem else None,
        "free": mem.free if mem else None,
        "pcie": None if link is None else {
            "current_gen": link.current_gen, "current_width": link.current_width,
            "max_gen": link.max_gen, "max_width": link.max_width, "gpu_max_gen": link.gpu_max_gen},
    }


def card(torch_index: int) -> dict[str, Any]:
    """Which GPU a figure came from: name, memory, PCIe link (now and at most), driver and UUID of torch device
    ``torch_index``; what NVML cannot say is None (the name and memory then come from torch)."""
    import torch

    props = torch.cuda.get_device_properties(torch_index)
    index = nvml_index(torch_index)
    described = describe_device(index) if index is not None else {}
    return {"name": described.get("name") or props.name, "uuid": described.get("uuid"),
            "memory_bytes": described.get("total") or props.total_memory, "pcie": described.get("pcie"),
            "driver": driver_version(), "cuda_driver": cuda_driver_version()}


def describe_card(info: dict[str, Any]) -> str:
    """One line for a ``card()``: "NVIDIA H100 80GB HBM3, 79.6 GiB, PCIe Gen5 x16 (max Gen5 x16), driver 580.65"."""
    text = f"{info.get('name') or '?'}, {(info.get('memory_bytes') or 0) / 2**30:.1f} GiB"
    pcie = info.get("pcie")
    if pcie:
        text += (f", PCIe Gen{pcie.get('current_gen') or '?'} x{pcie.get('current_width') or '?'} (max "
                 f"Gen{pcie.get('max_gen') or '?'} x{pcie.get('max_width') or '?'})")
    return text + f", driver {info.get('driver') or '?'}"
