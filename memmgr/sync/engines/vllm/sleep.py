"""memmgr as a vLLM sleep-mode backend (issue 33): ``MemmgrSleepBackend``, vLLM's ``SleepModeBackend`` named
``"memmgr"`` (registered by ``registry.register_sleep_backend``, memmgr's ``vllm.general_plugins`` entry point).

An engine started with ``enable_sleep_mode=True`` on CUDA allocates its weights and KV cache through vLLM's
``CuMemAllocator``: each allocation is physical memory mapped at an address reserved for it, tagged ``weights``,
``kv_cache`` (or ``runtime``, ``cudagraph``, ``default``). This backend suspends and resumes those allocations at
the same addresses, as vLLM's own ``cumem`` backend does, but moves the bytes with memmgr's copies: every copy out
is issued at once on memmgr's device-to-host stream (``memmgr.transfer.issue_copy``: copy engines or the copy
kernel) into exact-size pinned host buffers kept in a ``HostMemoryPool`` across cycles, and each allocation's
memory goes back to the driver as soon as its own copy has completed; resume maps every allocation first, then
copies back on the host-to-device stream. Addresses never change, so CUDA graphs captured on the weights and KV
cache replay after a resume. The mapping itself stays vLLM's (``CuMemPhysicalMemory`` calls the allocator's
``unmap_and_release`` / ``create_and_map`` on its handles and keeps its ``is_asleep`` flags), since the allocator's
free callback releases those handles later; memmgr's own ranges (``memmgr.same_address``) back memmgr's buckets.

States, as vLLM's interface names them: ``RUNNING`` (everything mapped), ``SUSPENDED`` (after ``suspend`` or a
``discard``, until a ``resume`` maps everything again), ``RESUMING`` (during a resume). ``suspend(level)``: level 1
keeps the contents of ``weights``, ``runtime`` and ``cudagraph`` on the host and discards the rest (the KV cache);
level 2 keeps ``runtime`` and ``cudagraph`` only. Allocations released already keep what they hold (a second suspend
changes nothing of them). ``resume(tags)``: maps and restores the allocations of ``tags`` and every allocation whose
tag is not deferrable (only ``weights`` and ``kv_cache`` can wait), or all with ``tags=None``; the contents of
discarded allocations are undefined after it. ``discard(tags)``: releases the allocations of ``tags`` without
keeping their contents (dropping the host copies of those suspended already).

The layer below the state machine is ``PhysicalMemory`` (allocations at fixed addresses, copies, release, map);
``CuMemPhysicalMemory`` is vLLM's allocator on CUDA, ``SameAddressPhysicalMemory`` memmgr's own same-address memory
(for tensors that vLLM's allocator did not make: the GPU test drives the backend over it around a transformers
model), and the CPU tests drive the same backend over a stand-in.
vLLM 0.32 has the model config's ``sleep_mode_backend`` but no engine argument for it, so ``use_memmgr_sleep_backend``
selects it in the workers of a running ``vllm.LLM`` (vLLM's CPU platform has no sleep mode at all).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch
from vllm.device_allocator.sleep_mode_backend import SleepModeBackend

from memmgr.errors import MemmgrInputError, MemmgrOutOfMemoryError, MemmgrStateError
from memmgr.host_memory import HostBuffer, HostMemoryPool
from memmgr.same_address import SameAddressStorage
from memmgr.sync.engines.vllm.registry import SLEEP_BACKEND, register_sleep_backend
from memmgr.transfer import copy_stream, issue_copy

logger = logging.getLogger("memmgr")

DEFERRABLE_TAGS = ("weights", "kv_cache")  # vllm.device_allocator.DEFERRABLE_TAGS: only these may stay asleep
KEPT_AT_EVERY_LEVEL = ("runtime", "cudagraph")  # what vLLM's cumem backend keeps at both levels


@dataclass(frozen=True)
class Allocation:
    """One device allocation at a fixed address: its address, size in bytes and vLLM tag."""

    address: int
    nbytes: int
    tag: str


class PhysicalMemory(Protocol):
    """What the backend needs of the memory under it. Copies are asynchronous: ``copy_out`` returns a token that
    ``wait`` blocks on; ``synchronize`` waits for every copy in and all work on the device."""

    def allocations(self) -> list[Allocation]: ...

    def copy_out(self, allocation: Allocation, host: torch.Tensor) -> Any: ...

    def wait(self, token: Any) -> None: ...

    def release(self, allocation: Allocation) -> None: ...

    def map(self, allocation: Allocation) -> None: ...

    def copy_in(self, allocation: Allocation, host: torch.Tensor) -> None: ...

    def synchronize(self) -> None: ...


def _copy_out(src: torch.Tensor, host: torch.Tensor) -> torch.cuda.Event:
    """Issues the copy of device bytes ``src`` into ``host`` on memmgr's device->host stream, after the work queued on
    the current stream; returns the event that marks it done."""
    stream = copy_stream(src.device, "d2h")
    stream.wait_stream(torch.cuda.current_stream(src.device))
    with torch.cuda.stream(stream):
        issue_copy(host, src, stream)
        event = torch.cuda.Event()
        event.record(stream)
    return event


def _copy_in(dst: torch.Tensor, host: torch.Tensor) -> None:
    """Issues the copy of ``host`` into device bytes ``dst`` on memmgr's host->device stream."""
    stream = copy_stream(dst.device, "h2d")
    stream.wait_stream(torch.cuda.current_stream(dst.device))
    with torch.cuda.stream(stream):
        issue_copy(dst, host, stream)


class _CudaBytes:
    """``nbytes`` of device memory at ``address`` as ``__cuda_array_interface__``, for ``torch.as_tensor``."""

    def __init__(self, address: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (address, False),
                                         "version": 3, "strides": None}


class CuMemPhysicalMemory:
    """vLLM's ``CuMemAllocator`` (its allocations, handles and ``is_asleep`` flags) under memmgr's copies."""

    def __init__(self) -> None:
        from vllm.device_allocator.cumem import CuMemAllocator, create_and_map, unmap_and_release

        self._allocator = CuMemAllocator.get_instance()
        self._create_and_map = create_and_map
        self._unmap_and_release = unmap_and_release

    def allocations(self) -> list[Allocation]:
        return [Allocation(int(ptr), int(data.handle[1]), str(data.tag))
                for ptr, data in self._allocator.pointer_to_data.items()]

    def _device_bytes(self, allocation: Allocation) -> torch.Tensor:
        device = self._allocator.pointer_to_data[allocation.address].handle[0]
        return torch.as_tensor(_CudaBytes(allocation.address, allocation.nbytes), device=f"cuda:{device}")

    def copy_out(self, allocation: Allocation, host: torch.Tensor) -> torch.cuda.Event:
        return _copy_out(self._device_bytes(allocation), host)

    def wait(self, token: torch.cuda.Event) -> None:
        token.synchronize()

    def release(self, allocation: Allocation) -> None:
        data = self._allocator.pointer_to_data[allocation.address]
        self._unmap_and_release(data.handle)
        data.is_asleep = True

    def map(self, allocation: Allocation) -> None:
        data = self._allocator.pointer_to_data[allocation.address]
        try:
            self._create_and_map(data.handle)
        except RuntimeError as exc:  # vLLM's extension reports the driver's error, out of memory included
            free = torch.cuda.mem_get_info(data.handle[0])[0]
            raise MemmgrOutOfMemoryError(f"sleep backend resume: cannot map {allocation.nbytes} bytes of "
                                         f"{allocation.tag!r} at {allocation.address:#x} again ({exc})",
                                         group=allocation.tag, bytes_needed=allocation.nbytes,
                                         bytes_free=free) from exc
        data.is_asleep = False

    def copy_in(self, allocation: Allocation, host: torch.Tensor) -> None:
        _copy_in(self._device_bytes(allocation), host)

    def synchronize(self) -> None:
        torch.cuda.synchronize()


class SameAddressPhysicalMemory:
    """memmgr's own same-address memory (``memmgr.same_address.SameAddressStorage``) under the backend, for memory
    that does not come from vLLM's ``CuMemAllocator``: ``add(tensor, tag)`` moves the tensor's storage (a model's
    weights, a KV cache) into an address range of memmgr's once; every view of it keeps working and keeps its
    address through each suspend and resume. Release is the storage's ``resize_(0)`` after the copy out, map its
    ``resize_(nbytes)`` at the same address."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[SameAddressStorage, torch.UntypedStorage, Allocation]] = {}

    def add(self, tensor: torch.Tensor, tag: str) -> Allocation:
        """Moves ``tensor``'s storage into same-address memory (once per storage) and returns its allocation."""
        storage = tensor.untyped_storage()
        for _, untyped, allocation in self._entries.values():
            if untyped.data_ptr() == storage.data_ptr():
                return allocation
        memory = SameAddressStorage(tensor, f"sleep memory {tag!r}")
        allocation = Allocation(memory.address, storage.nbytes(), tag)
        self._entries[allocation.address] = (memory, storage, allocation)
        return allocation

    def allocations(self) -> list[Allocation]:
        return [allocation for _, _, allocation in self._entries.values()]

    def _device_bytes(self, allocation: Allocation) -> torch.Tensor:
        _, storage, _ = self._entries[allocation.address]
        return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)

    def copy_out(self, allocation: Allocation, host: torch.Tensor) -> torch.cuda.Event:
        return _copy_out(self._device_bytes(allocation), host)

    def wait(self, token: torch.cuda.Event) -> None:
        token.synchronize()

    def release(self, allocation: Allocation) -> None:
        memory, storage, _ = self._entries[allocation.address]
        memory.release_after(copy_stream(storage.device, "d2h"))
        storage.resize_(0)
        memory.wait_released()

    def map(self, allocation: Allocation) -> None:
        _, storage, _ = self._entries[allocation.address]
        try:
            storage.resize_(allocation.nbytes)
        except torch.OutOfMemoryError as exc:
            raise MemmgrOutOfMemoryError(f"sleep backend resume: cannot map {allocation.nbytes} bytes of "
                                         f"{allocation.tag!r} at {allocation.address:#x} again ({exc})",
                                         group=allocation.tag, bytes_needed=allocation.nbytes,
                                         bytes_free=torch.cuda.mem_get_info(storage.device)[0]) from exc

    def copy_in(self, allocation: Allocation, host: torch.Tensor) -> None:
        _copy_in(self._device_bytes(allocation), host)

    def synchronize(self) -> None:
        torch.cuda.synchronize()


@dataclass
class _Released:
    allocation: Allocation
    host: HostBuffer | None  # the kept contents; None: discarded


def _tags_argument(where: str, tags: Any, *, optional: bool) -> tuple[str, ...] | None:
    if tags is None and optional:
        return None
    if isinstance(tags, str) or not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) for t in tags):
        want = "a list of tag names such as ['weights'] or ['kv_cache']" + (", or None" if optional else "")
        raise MemmgrInputError(f"{where}: tags must be {want}, got {tags!r}")
    return tuple(tags)


class MemmgrSleepBackend(SleepModeBackend):
    """vLLM's sleep-mode backend ``"memmgr"``: suspends and resumes an engine's allocations at the same addresses
    with memmgr's copies (see the module docstring). ``memory``: the layer under it (default: vLLM's
    ``CuMemAllocator``, looked up at the first suspend); ``pool``: where the host copies live between cycles."""

    def __init__(self, memory: PhysicalMemory | None = None, pool: HostMemoryPool | None = None) -> None:
        super().__init__()
        self._memory = memory
        self.pool = pool if pool is not None else HostMemoryPool()
        self._released: dict[int, _Released] = {}

    @property
    def memory(self) -> PhysicalMemory:
        if self._memory is None:
            self._memory = CuMemPhysicalMemory()
        return self._memory

    @classmethod
    def is_supported(cls) -> bool:
        """CUDA (not ROCm) with vLLM's cumem allocator built, which allocates the engine's memory at fixed
        addresses."""
        if not torch.cuda.is_available() or torch.version.hip is not None:
            return False
        try:
            from vllm.device_allocator.cumem import cumem_available
        except ImportError:
            return False
        return bool(cumem_available)

    @classmethod
    def preserves_communicators(cls) -> bool:
        return True  # only the allocator's memory is released; communicators are left alone

    def suspend(self, level: int = 1) -> None:
        if isinstance(level, bool) or level not in (1, 2):
            raise MemmgrInputError(f"MemmgrSleepBackend.suspend: level must be 1 (keep the weights on the host) or "
                                   f"2 (discard them), got {level!r}")
        kept = KEPT_AT_EVERY_LEVEL + (("weights",) if level == 1 else ())
        allocations = self.memory.allocations()
        conflicts = sorted({r.allocation.tag for r in self._released.values()
                            if (r.allocation.tag in kept) != (r.host is not None)})
        if conflicts:
            logger.warning("memmgr sleep backend: allocations tagged %s are released already and keep what they "
                           "hold; a level-%d suspend does not change that", conflicts, level)
        mapped = [a for a in allocations if a.address not in self._released]
        to_keep = [a for a in mapped if a.tag in kept]
        to_drop = [a for a in mapped if a.tag not in kept]
        if not mapped:
            self._state = "SUSPENDED"
            return
        self.memory.synchronize()  # nothing may still use memory about to be released
        hosts: list[HostBuffer] = []
        try:
            for a in to_keep:
                hosts.append(self.pool.acquire(a.nbytes))
            tokens = [self.memory.copy_out(a, h.tensor) for a, h in zip(to_keep, hosts)]
        except BaseException:  # nothing released yet: the state stays as it was
            for h in hosts:
                self.pool.release(h)
            raise
        self._state = "SUSPENDED"
        pending = list(zip(to_keep, hosts, tokens))
        try:
            for a in to_drop:
                self.memory.release(a)
                self._released[a.address] = _Released(a, None)
            while pending:
                a, h, token = pending[0]
                self.memory.wait(token)
                self.memory.release(a)
                self._released[a.address] = _Released(a, h)
                pending.pop(0)
        except BaseException:  # what is released stays recorded; the rest stays mapped, its host buffer goes back
            for _, h, _ in pending:
                self.pool.release(h)
            raise
        logger.info("memmgr sleep backend: level-%d suspend kept %.3f GiB on the host and discarded %.3f GiB",
                    level, sum(a.nbytes for a in to_keep) / 2**30, sum(a.nbytes for a in to_drop) / 2**30)

    def resume(self, tags: list[str] | None = None) -> None:
        wanted = _tags_argument("MemmgrSleepBackend.resume", tags, optional=True)
        live = {a.address for a in self.memory.allocations()}
        for address in [addr for addr in self._released if addr not in live]:  # freed by vLLM while asleep
            self._give_back(self._released.pop(address))
        chosen = [r for r in self._released.values()
                  if wanted is None or r.allocation.tag in wanted or r.allocation.tag not in DEFERRABLE_TAGS]
        if not chosen:
            self._state = "SUSPENDED" if self._released else "RUNNING"
            return
        previous = self._state
        self._state = "RESUMING"
        mapped: list[_Released] = []
        try:
            for r in chosen:
                self.memory.map(r.allocation)
                mapped.append(r)
        except BaseException:
            for r in mapped:
                self.memory.release(r.allocation)
            self._state = previous
            raise
        for r in chosen:
            if r.host is not None:
                self.memory.copy_in(r.allocation, r.host.tensor)
        self.memory.synchronize()
        for r in chosen:
            del self._released[r.allocation.address]
            self._give_back(r)
        self._state = "SUSPENDED" if self._released else "RUNNING"

    def discard(self, tags: tuple[str, ...]) -> None:
        wanted = _tags_argument("MemmgrSleepBackend.discard", tags, optional=False)
        to_drop = [a for a in self.memory.allocations() if a.tag in wanted and a.address not in self._released]
        for r in self._released.values():
            if r.allocation.tag in wanted and r.host is not None:
                self._give_back(r)
                r.host = None
        if to_drop:
            self.memory.synchronize()
        for a in to_drop:
            self.memory.release(a)
            self._released[a.address] = _Released(a, None)
        if self._released:
            self._state = "SUSPENDED"

    def _give_back(self, released: _Released) -> None:
        if released.host is not None:
            self.pool.release(released.host)

    def status(self) -> dict[str, dict[str, int]]:
        """Bytes per tag: ``mapped``, ``kept`` (released, contents on the host) and ``discarded``."""
        out: dict[str, dict[str, int]] = {}
        for a in self.memory.allocations():
            r = self._released.get(a.address)
            kind = "mapped" if r is None else ("kept" if r.host is not None else "discarded")
            counts = out.setdefault(a.tag, {"mapped": 0, "kept": 0, "discarded": 0})
            counts[kind] += a.nbytes
        return out


def _select_in_worker(worker: Any) -> str:
    """Runs in each vLLM worker (``collective_rpc``): makes ``"memmgr"`` its sleep-mode backend."""
    register_sleep_backend()
    current = getattr(worker, "_sleep_mode_backend", None)
    if current is not None and not isinstance(current, MemmgrSleepBackend):
        raise MemmgrStateError(f"this vLLM worker has slept with the {type(current).__name__} backend already; "
                               f"select memmgr's sleep backend before the engine's first sleep")
    worker.vllm_config.model_config.sleep_mode_backend = SLEEP_BACKEND
    return SLEEP_BACKEND


def use_memmgr_sleep_backend(llm: Any) -> Sequence[str]:
    """Selects memmgr's sleep backend in every worker of ``llm`` (a ``vllm.LLM`` started with
    ``enable_sleep_mode=True``), before its first ``llm.sleep()``. Returns what each worker selected."""
    engine = getattr(llm, "llm_engine", None)
    model_config = getattr(getattr(engine, "vllm_config", None), "model_config", None)
    if model_config is None or not callable(getattr(llm, "collective_rpc", None)):
        raise MemmgrInputError(f"use_memmgr_sleep_backend takes a vllm.LLM, got {type(llm).__name__}")
    if not getattr(model_config, "enable_sleep_mode", False):
        raise MemmgrInputError("use_memmgr_sleep_backend: this engine was started without sleep mode; start it with "
                               "vllm.LLM(..., enable_sleep_mode=True) (CUDA only: vLLM's CPU platform has no sleep "
                               "mode)")
    model_config.sleep_mode_backend = SLEEP_BACKEND
    return llm.collective_rpc(_select_in_worker)
