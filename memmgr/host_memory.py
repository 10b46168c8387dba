"""Exact-size host buffers and a pool that keeps them across offload/onload cycles.

A host buffer is the primary store of an offloaded bucket. It is allocated once, exactly as large as the bucket,
pinned when CUDA is present (so device<->host copies run at the link's speed and can be asynchronous), and reused
every cycle, so pinning is paid once and off the critical path (``HostMemoryPool.reserve`` can pin ahead of time,
in a background thread).
"""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable

import torch

from memmgr import arguments
from memmgr._native import native_module
from memmgr.errors import MemmgrHostMemoryError, MemmgrInputError

logger = logging.getLogger("memmgr")

DEFAULT_TOUCH_THREADS = max(1, min(16, os.cpu_count() or 1))


class HostBuffer:
    """One exact-size host allocation, viewed as a uint8 tensor; pinned when CUDA is available."""

    __slots__ = ("tensor", "nbytes", "pinned", "kind", "_registered_ptr", "__weakref__")

    def __init__(self, tensor: torch.Tensor, pinned: bool, kind: str, registered_ptr: int | None = None):
        self.tensor = tensor
        self.nbytes = tensor.numel()
        self.pinned = pinned
        self.kind = kind
        self._registered_ptr = registered_ptr

    def release(self) -> None:
        """Unpins (if this object pinned it) and drops the memory; the buffer must not be used afterwards."""
        if self._registered_ptr is not None:
            err = torch.cuda.cudart().cudaHostUnregister(self._registered_ptr)
            if int(err) != 0:
                logger.warning("cudaHostUnregister failed with error %s; the registration leaks", int(err))
            self._registered_ptr = None
        self.tensor = torch.empty(0, dtype=torch.uint8)

    def __del__(self) -> None:
        if getattr(self, "_registered_ptr", None) is not None:
            try:
                self.release()
            except Exception:  # interpreter shutdown: nothing sensible left to do
                pass

    def __repr__(self) -> str:
        return f"HostBuffer({self.nbytes} B, {self.kind})"


def allocate_host_buffer(nbytes: int, pin: bool | None = None, num_threads: int = DEFAULT_TOUCH_THREADS,
                         allow_pageable_fallback: bool = True) -> HostBuffer:
    """Allocates exactly ``nbytes`` of host memory, pinned when CUDA is available (or ``pin`` says so).

    Pinning failures (a small ``ulimit -l``, host memory short) fall back to pageable memory with a warning when
    ``allow_pageable_fallback`` is set, and raise ``MemmgrHostMemoryError`` otherwise.
    """
    where = "allocate_host_buffer"
    nbytes = arguments.integer(where, "nbytes", nbytes, minimum=0)
    arguments.boolean(where, "pin", pin, optional=True)
    num_threads = arguments.integer(where, "num_threads", num_threads, minimum=1, maximum=1024)
    arguments.boolean(where, "allow_pageable_fallback", allow_pageable_fallback)
    if pin is None:
        pin = torch.cuda.is_available()
    native = native_module()
    try:
        if native is not None:
            if pin or not torch.cuda.is_available():
                tensor = native.allocate(nbytes, num_threads, True, bool(pin))
                return HostBuffer(tensor, bool(pin), "native-pinned" if pin else "native-pageable")
        tensor = torch.empty(nbytes, dtype=torch.uint8)
        if not pin:
            return HostBuffer(tensor, False, "pageable")
        ptr = tensor.data_ptr()
        if nbytes > 0 and not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available to pin host memory")
        if nbytes > 0:
            err = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))
            if err != 0:
                raise RuntimeError(f"cudaHostRegister returned error {err}")
        return HostBuffer(tensor, True, "registered", registered_ptr=ptr if nbytes > 0 else None)
    except (RuntimeError, MemoryError) as exc:
        if not pin or not allow_pageable_fallback:
            raise MemmgrHostMemoryError(
                f"could not allocate {'pinned' if pin else 'pageable'} host memory of {nbytes} bytes: {exc}. "
                f"Free host memory, raise the locked-memory limit (ulimit -l), or offload fewer groups.") from exc
        logger.warning("pinning %d bytes of host memory failed (%s); falling back to pageable memory: offload "
                       "will be slower and synchronous. Raise `ulimit -l` or free host memory to fix this.",
                       nbytes, exc)
        try:
            return HostBuffer(torch.empty(nbytes, dtype=torch.uint8), False, "pageable-fallback")
        except (RuntimeError, MemoryError) as exc2:
            raise MemmgrHostMemoryError(
                f"could not allocate even pageable host memory of {nbytes} bytes: {exc2}. Free host memory "
                f"or offload fewer groups.") from exc2


class HostMemoryPool:
    """Keeps exact-size host buffers for reuse and can pin them ahead of time.

    Buffers are keyed by exact size: a bucket that is offloaded again gets a buffer of its own size back, never a
    rounded-up one. ``bytes_held`` counts every buffer the pool handed out or keeps.
    """

    def __init__(self, pin: bool | None = None, num_threads: int = DEFAULT_TOUCH_THREADS):
        self._pin = arguments.boolean("HostMemoryPool", "pin", pin, optional=True)
        self._num_threads = arguments.integer("HostMemoryPool", "num_threads", num_threads, minimum=1, maximum=1024)
        self._free: dict[int, list[HostBuffer]] = {}
        self._in_use: dict[int, HostBuffer] = {}
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    def acquire(self, nbytes: int) -> HostBuffer:
        nbytes = arguments.integer("HostMemoryPool.acquire", "nbytes", nbytes, minimum=0)
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                buf = free.pop()
                self._in_use[id(buf)] = buf
                return buf
        buf = allocate_host_buffer(nbytes, self._pin, self._num_threads)
        with self._lock:
            self._in_use[id(buf)] = buf
        return buf

    def release(self, buf: HostBuffer) -> None:
        """Returns a buffer to the pool for reuse (it stays allocated and pinned)."""
        arguments.instance("HostMemoryPool.release", "buf", buf, HostBuffer)
        with self._lock:
            if self._in_use.pop(id(buf), None) is None:
                return
            self._free.setdefault(buf.nbytes, []).append(buf)

    def reserve(self, sizes: Iterable[int], background: bool = False) -> Future | None:
        """Allocates and pins buffers of these exact sizes now (or in a background thread) for later acquire()."""
        arguments.boolean("HostMemoryPool.reserve", "background", background)
        try:
            sizes = list(sizes)
        except TypeError:
            raise MemmgrInputError(f"HostMemoryPool.reserve: sizes must be an iterable of byte counts, got "
                                             f"{type(sizes).__name__}") from None
        sizes = [arguments.integer("HostMemoryPool.reserve", "sizes[]", n, minimum=0) for n in sizes]

        def work() -> None:
            for nbytes in sizes:
                buf = allocate_host_buffer(nbytes, self._pin, self._num_threads)
                with self._lock:
                    self._free.setdefault(nbytes, []).append(buf)

        if not background:
            work()
            return None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memmgr-pin")
        return self._executor.submit(work)

    def trim(self) -> int:
        """Frees every buffer not in use; returns the bytes freed."""
        with self._lock:
            bufs = [b for lst in self._free.values() for b in lst]
            self._free.clear()
        for b in bufs:
            b.release()
        return sum(b.nbytes for b in bufs)

    def buffers(self) -> list[HostBuffer]:
        """Every buffer the pool handed out or keeps for reuse (a snapshot)."""
        with self._lock:
            return list(self._in_use.values()) + [b for lst in self._free.values() for b in lst]

    def buffers_free(self) -> list[HostBuffer]:
        """The buffers kept for reuse, not handed out now (a snapshot)."""
        with self._lock:
            return [b for lst in self._free.values() for b in lst]

    @property
    def bytes_free(self) -> int:
        """Bytes of the buffers kept for reuse."""
        return sum(b.nbytes for b in self.buffers_free())

    @property
    def bytes_held(self) -> int:
        return sum(b.nbytes for b in self.buffers())

    @property
    def pinned_bytes_held(self) -> int:
        return sum(b.nbytes for b in self.buffers() if b.pinned)

    def __repr__(self) -> str:
        return f"HostMemoryPool(bytes_held={self.bytes_held})"


_default_pool: HostMemoryPool | None = None


def default_pool() -> HostMemoryPool:
    """The process-wide pool that managers use unless given one of their own."""
    global _default_pool
    if _default_pool is None:
        _default_pool = HostMemoryPool()
    return _default_pool
