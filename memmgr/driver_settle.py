"""Takes the driver's deferred work after another process's release off the offload's critical path.

After another process on the same GPU gives memory back to the driver (an inference engine going to sleep), the
first call in this process that allocates or frees device memory through the driver some 0.1 s or more later waits
25-45 ms (146 GB released on an H200), whatever its own size; the calls after it do not wait. An offload ends by
giving its memory back (``torch.cuda.empty_cache``, one ``cudaFree`` per segment), so it paid that wait after its
copies. ``begin(device)``, called once an offload's copies are issued, makes a small physical allocation and
releases it at once (``cuMemCreate``/``cuMemRelease`` of one allocation granule, never mapped) on a side thread: that
call pays the wait while the copies run, and it waits for no device work, so the copies and other work on the device
run on undisturbed. The same through ``cudaMalloc``/``cudaFree`` would wait for the device and held up the other work.
Measured in ``benchmarks/release_probe.py`` (part ``tickle``; ``benchmarks/results/2026-11-29/H200_SESSION5.md``).

The driver is reached through ``libcuda`` with ctypes (the call releases the GIL). Where there is no CUDA driver,
or ``MEMMGR_DRIVER_SETTLE=0``, ``begin`` does nothing; a failed settle is logged once and never raised: the offload
then pays the wait itself, as without this module. ``status()`` says what ran.
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from typing import Callable

import torch

from memmgr import arguments
from memmgr.errors import MemmgrError, MemmgrInputError

logger = logging.getLogger("memmgr")

SETTLE_ENV = "MEMMGR_DRIVER_SETTLE"


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _AllocationProp(ctypes.Structure):  # CUmemAllocationProp
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", _Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", _AllocFlags)]


_ALLOCATION_TYPE_PINNED = 1
_LOCATION_TYPE_DEVICE = 1
_GRANULARITY_MINIMUM = 0


class DriverCallError(MemmgrError, RuntimeError):
    """A CUDA driver call of the settle failed (logged by the settle's thread, never raised to callers of
    ``begin``)."""


def _load_driver() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


def physical_allocation_roundtrip(lib: ctypes.CDLL, device_index: int) -> None:
    """Creates and releases one granule of physical memory on the device (no mapping, no device work)."""
    prop = _AllocationProp(type=_ALLOCATION_TYPE_PINNED, requestedHandleTypes=0,
                           location=_Location(type=_LOCATION_TYPE_DEVICE, id=device_index))
    granularity = ctypes.c_size_t()
    rc = lib.cuMemGetAllocationGranularity(ctypes.byref(granularity), ctypes.byref(prop), _GRANULARITY_MINIMUM)
    if rc != 0:
        raise DriverCallError(f"cuMemGetAllocationGranularity returned CUDA driver error {rc}")
    handle = ctypes.c_uint64()
    rc = lib.cuMemCreate(ctypes.byref(handle), granularity, ctypes.byref(prop), ctypes.c_uint64(0))
    if rc != 0:
        raise DriverCallError(f"cuMemCreate of {granularity.value} bytes returned CUDA driver error {rc}")
    rc = lib.cuMemRelease(handle)
    if rc != 0:
        raise DriverCallError(f"cuMemRelease returned CUDA driver error {rc}")


class DriverSettle:
    """Runs settles on side threads, at most one per device at a time. ``roundtrip(device_index)`` is the driver
    call (by default ``physical_allocation_roundtrip`` through libcuda); ``enabled`` None reads
    ``$MEMMGR_DRIVER_SETTLE`` at each ``begin`` (default on)."""

    def __init__(self, roundtrip: Callable[[int], None] | None = None, enabled: bool | None = None):
        self._roundtrip = roundtrip
        self._enabled = enabled
        self._lock = threading.Lock()
        self._running: dict[int, threading.Thread] = {}
        self._warned = False
        self.started = 0
        self.last_seconds: float | None = None
        self.last_error: str | None = None

    def enabled(self) -> bool:
        if self._enabled is not None:
            return self._enabled
        return os.environ.get(SETTLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")

    def _driver_roundtrip(self) -> Callable[[int], None] | None:
        if self._roundtrip is None:
            lib = _load_driver()
            if lib is None:
                return None
            self._roundtrip = lambda index: physical_allocation_roundtrip(lib, index)
        return self._roundtrip

    def begin(self, device_index: int) -> threading.Thread | None:
        """Starts a settle for this device on a side thread unless one is running or settles are off; returns the
        thread (None if none was started)."""
        if not self.enabled():
            return None
        roundtrip = self._driver_roundtrip()
        if roundtrip is None:
            return None
        with self._lock:
            running = self._running.get(device_index)
            if running is not None and running.is_alive():
                return None
            thread = threading.Thread(target=self._run, args=(roundtrip, device_index), daemon=True,
                                      name=f"memmgr-driver-settle-{device_index}")
            self._running[device_index] = thread
            self.started += 1
        thread.start()
        return thread

    def _run(self, roundtrip: Callable[[int], None], device_index: int) -> None:
        t0 = time.perf_counter()
        try:
            if torch.cuda.is_available():
                torch.cuda.set_device(device_index)  # the driver calls need this device's context current here
            roundtrip(device_index)
        except Exception as exc:  # a settle is an optimisation: the offload's own release still does the work
            self.last_error = f"{type(exc).__name__}: {exc}"
            if not self._warned:
                self._warned = True
                logger.warning("memmgr: the driver settle on cuda:%d failed (%s); offloads release their memory "
                               "as usual. Set %s=0 to stop trying.", device_index, self.last_error, SETTLE_ENV)
            return
        self.last_seconds = time.perf_counter() - t0
        logger.debug("driver settle on cuda:%d took %.1f ms", device_index, self.last_seconds * 1e3)

    def wait(self, timeout: float | None = None) -> None:
        """Waits for the settles running now (tests and shutdown)."""
        with self._lock:
            threads = list(self._running.values())
        for thread in threads:
            thread.join(timeout)

    def status(self) -> dict[str, object]:
        return {"enabled": self.enabled(), "available": self._driver_roundtrip() is not None if self.enabled()
                else None, "started": self.started, "last_ms": None if self.last_seconds is None
                else self.last_seconds * 1e3, "last_error": self.last_error}


_settle = DriverSettle()


def begin(device: torch.device | int | None = None) -> threading.Thread | None:
    """Starts the process-wide settle for ``device`` (a CUDA device or its index; default: the current one) if CUDA
    is up here."""
    arguments.instance("driver_settle.begin", "device", device, (torch.device, int), optional=True)
    if isinstance(device, torch.device) and device.type != "cuda":
        raise MemmgrInputError(f"driver_settle.begin: device must be a CUDA device, got {device}; pass the GPU whose "
                               f"offload is starting (e.g. torch.device('cuda', 0)) or its index")
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    if device is None:
        index = torch.cuda.current_device()
    elif isinstance(device, int):
        index = device
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
    return _settle.begin(index)


def status() -> dict[str, object]:
    """Whether settles are on and available, how many started, the last one's time and error."""
    return _settle.status()
