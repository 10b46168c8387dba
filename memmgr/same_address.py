"""Same-address device memory (issue 33): buffers whose physical memory goes back to the driver at offload and is
created again at onload at the same virtual addresses, so every tensor over them keeps its ``data_ptr()`` and CUDA
graphs captured on them replay after an onload.

``SameAddressBuffer`` is one reserved address range of memmgr's extension (``memmgr._pinned.VmmRange``: the
driver's cuMemAddressReserve / cuMemCreate / cuMemMap / cuMemSetAccess / cuMemUnmap / cuMemRelease) seen as a uint8
CUDA tensor (``VmmRange.tensor()``: ``torch::from_blob`` over the range, whose deleter holds the range, so the
addresses stay reserved while any view of the tensor lives). ``release()`` unmaps and releases the physical memory
(the range stays reserved, the tensor and its views stay valid objects with nothing behind them); ``restore()`` maps
new physical memory there. ``offload_buffers`` copies buffers into host memory and releases each one's memory as
soon as its own copy has completed; ``onload_buffers`` maps them again and copies back in.

Why a range of memmgr's own rather than torch's pluggable allocator with a MemPool (vLLM's ``CuMemAllocator``):
tensors allocated from a pool are blocks of torch's caching allocator, and taking physical memory away under them
means unmapping memory the allocator believes it owns (the expandable-segments conflict, ``empty_cache`` and
pool-lifetime bugs pytorch#145168 and #146431 that vLLM works around). A bucket of memmgr is already one flat buffer
that every managed tensor views (``memmgr.bucket``), so one range per bucket, created by memmgr and only viewed by
torch, keeps every view valid: views share the one storage, whose data pointer never changes; only the pages behind
it come and go.

Using a buffer (or any view of it) while it is released is an illegal-address error on the device, which poisons
the CUDA context; offload and onload order their copies so that nothing memmgr issues touches a released range.
``SameAddressStorage`` does the same for the storage of a tensor memmgr already made (a bucket's flat buffer, or a
buffer megatron-core owns that a bucket adopts): its memory moves into a range once, and the storage's own
``resize_(0)``/``resize_(nbytes)`` then release and map memory at the same address, so the buckets' moves stay as
they are (``memmgr.bucket``). ``same_address_support`` says whether this machine can hold such memory;
``require_same_address`` refuses a ``same_address=True`` option where it cannot (MemmgrInputError naming the option
and the fix).
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence, TypeVar

import torch

from memmgr._native import build_hint, native_module, register_same_address_support
from memmgr.errors import MemmgrInputError, MemmgrOutOfMemoryError, MemmgrStateError
from memmgr.transfer import issue_copy

logger = logging.getLogger("memmgr")
T = TypeVar("T")


def _device_index(device: torch.device | int | None) -> int:
    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    return device.index if device.index is not None else torch.cuda.current_device()


def same_address_support(device: torch.device | int | None = None) -> tuple[bool, str]:
    """(supported, why): whether ``device`` (default: the current CUDA device) can hold same-address buffers, i.e.
    CUDA is available, memmgr's extension is built and the driver and device support virtual memory management."""
    if not torch.cuda.is_available():
        return False, "CUDA is not available here (same-address memory is GPU memory)"
    if isinstance(device, torch.device) and device.type != "cuda":
        return False, f"{device} is not a CUDA device"
    native = native_module()
    if native is None or not hasattr(native, "vmm_supported"):
        return False, f"memmgr's native extension (which maps the memory) is not built or predates it; {build_hint()}"
    supported, why = native.vmm_supported(_device_index(device))
    return bool(supported), str(why)


register_same_address_support(same_address_support)


def map_with_cache_released(device: torch.device, map_memory: Callable[[], T]) -> T:
    """Runs ``map_memory`` (which creates physical memory with the driver); where the device lacks room while PyTorch's
    caching allocator holds unused blocks, gives those back (``empty_cache``) and runs it once more. Same-address
    memory comes from the driver, not from that cache: blocks cached by the coalescing before an adoption, or by the
    other phase's activations before an onload, would otherwise stand in its way."""
    try:
        return map_memory()
    except torch.OutOfMemoryError:
        if torch.cuda.memory_reserved(device) <= torch.cuda.memory_allocated(device):
            raise
        logger.debug("same-address memory on %s: out of memory with PyTorch's cache holding %d unused bytes; "
                     "emptying it and mapping again", device,
                     torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
        torch.cuda.empty_cache()
        return map_memory()


def require_same_address(where: str, device: torch.device | int | None = None) -> None:
    """Raises MemmgrInputError naming ``same_address=True`` and the fix unless ``same_address_support`` holds."""
    supported, why = same_address_support(device)
    if not supported:
        raise MemmgrInputError(f"{where}: same_address=True cannot be honoured here: {why}. Pass same_address=False "
                               f"(the default: offload frees the memory and onload allocates new memory), or run on a "
                               f"CUDA GPU whose driver supports virtual memory management, with memmgr's extension "
                               f"built")


class _RangeHolder:
    """What a holder of a ``memmgr._pinned.VmmRange`` (``self._range``) reports about it."""

    _range: object

    @property
    def address(self) -> int:
        return int(self._range.address)

    @property
    def mapped(self) -> bool:
        """Whether physical memory is behind the address now (a release still waiting for its copy counts)."""
        return bool(self._range.mapped)

    @property
    def reserved_bytes(self) -> int:
        """The size of the range: the bytes asked for, rounded up to the device's allocation granularity."""
        return int(self._range.reserved_bytes)


class SameAddressBuffer(_RangeHolder):
    """``nbytes`` of device memory at an address reserved for the buffer's lifetime; ``tensor`` (uint8) views it.

    Created mapped. ``release()`` gives the physical memory back to the driver, ``restore()`` maps new memory at the
    same address (contents undefined until copied in); both are no-ops when already in that state. The reservation is
    freed once the buffer and every view of ``tensor`` are gone.
    """

    def __init__(self, nbytes: int, device: torch.device | int | None = None):
        require_same_address("SameAddressBuffer", device)
        index = _device_index(device)
        self._range = native_module().VmmRange(int(nbytes), index)
        self.device = torch.device("cuda", index)
        self._restore_range()
        self.tensor: torch.Tensor = self._range.tensor()

    @property
    def nbytes(self) -> int:
        return int(self._range.nbytes)

    def release(self, after: torch.cuda.Event | None = None) -> None:
        """Unmaps and releases the physical memory, keeping the address; first waits for ``after`` (the event of the
        last work using the buffer, e.g. its copy out). The caller guarantees no other work still uses it."""
        if after is not None:
            after.synchronize()
        self._range.unmap()

    def restore(self) -> None:
        """Maps new physical memory at the buffer's address; MemmgrOutOfMemoryError when the device lacks room."""
        self._restore_range()

    def _restore_range(self) -> None:
        try:
            map_with_cache_released(self.device, self._range.map)
        except torch.OutOfMemoryError as exc:
            free = torch.cuda.mem_get_info(self.device)[0] if torch.cuda.is_available() else None
            raise MemmgrOutOfMemoryError(f"same-address buffer of {self.reserved_bytes} bytes at {self.address:#x} "
                                         f"on {self.device}: no room to map its memory again ({exc})",
                                         group="same-address buffer", bytes_needed=self.reserved_bytes,
                                         bytes_free=free) from exc

    def __repr__(self) -> str:
        return f"SameAddressBuffer({self.nbytes} B at {self.address:#x} on {self.device}, " \
               f"{'mapped' if self.mapped else 'released'})"


def _check_pairs(where: str, pairs: Sequence[tuple[SameAddressBuffer, torch.Tensor]]) -> None:
    for buffer, host in pairs:
        if not isinstance(buffer, SameAddressBuffer):
            raise MemmgrInputError(f"{where}: expected (SameAddressBuffer, host tensor) pairs, got "
                                   f"{type(buffer).__name__}")
        if host.dtype != torch.uint8 or host.dim() != 1 or host.numel() != buffer.nbytes or host.is_cuda:
            raise MemmgrInputError(f"{where}: the host tensor for {buffer!r} must be a 1-D uint8 CPU tensor of "
                                   f"{buffer.nbytes} bytes, got {host.dtype} {tuple(host.shape)} on {host.device}")


def offload_buffers(pairs: Sequence[tuple[SameAddressBuffer, torch.Tensor]], stream: torch.cuda.Stream) -> None:
    """Copies every buffer into its host tensor on ``stream`` (ordered after the current stream), then releases each
    buffer's physical memory as soon as its own copy has completed. Buffers released already are skipped."""
    _check_pairs("offload_buffers", pairs)
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    issued: list[tuple[SameAddressBuffer, torch.cuda.Event]] = []
    with torch.cuda.stream(stream):
        for buffer, host in pairs:
            if not buffer.mapped:
                continue
            issue_copy(host, buffer.tensor, stream)
            event = torch.cuda.Event()
            event.record(stream)
            issued.append((buffer, event))
    for buffer, event in issued:
        buffer.release(after=event)


def onload_buffers(pairs: Sequence[tuple[SameAddressBuffer, torch.Tensor]], stream: torch.cuda.Stream) -> None:
    """Maps every released buffer again and copies its host tensor back in on ``stream``; the current stream waits
    for the copies. On out-of-memory the buffers mapped by this call are released again before the error is raised.
    Buffers mapped already are left as they are (their contents are not overwritten)."""
    _check_pairs("onload_buffers", pairs)
    mapped: list[SameAddressBuffer] = []
    try:
        for buffer, _ in pairs:
            if not buffer.mapped:
                buffer.restore()
                mapped.append(buffer)
    except MemmgrOutOfMemoryError:
        for buffer in mapped:
            buffer.release()
        raise
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    restored = {id(b) for b in mapped}
    with torch.cuda.stream(stream):
        for buffer, host in pairs:
            if id(buffer) in restored:
                issue_copy(buffer.tensor, host, stream)
    torch.cuda.current_stream(stream.device).wait_stream(stream)


class SameAddressStorage(_RangeHolder):
    """The memory of one CUDA tensor's storage, moved into an address range of memmgr's own (``adopt``): from then on
    ``storage.resize_(0)`` gives the physical memory back to the driver and ``storage.resize_(nbytes)`` maps new
    memory at the same address, so every tensor viewing the storage keeps its ``data_ptr()`` through any number of
    offloads and onloads (a bucket in same-address mode, ``memmgr.bucket``).

    A release waits for the work queued on the stream given to ``release_after`` before it (the copy out) on a
    native thread: the caller does not block, and memory goes back bucket by bucket as each one's copy completes.
    ``wait_released`` blocks until it has. Without ``release_after`` a release waits for the whole device, as
    ``cudaFree`` does. The storage's own resize calls are the moves; this object only names the stream and waits.
    """

    def __init__(self, tensor: torch.Tensor, where: str):
        require_same_address(where, tensor.device)
        stream = torch.cuda.current_stream(tensor.device)  # after the writes that made the contents
        self._range = map_with_cache_released(
            tensor.device, lambda: native_module().vmm_adopt_storage(tensor, stream.cuda_stream))
        self.device = tensor.device
        self.where = where

    @property
    def pending_releases(self) -> int:
        return int(self._range.pending_releases)

    def release_after(self, stream: torch.cuda.Stream) -> None:
        """The next release of the storage's memory waits for the work queued on ``stream`` until that release."""
        self._range.release_after(stream.cuda_stream)

    def map_storage(self, storage: torch.UntypedStorage, nbytes: int) -> None:
        """Maps memory for the adopted ``storage`` again, ``nbytes`` at its address (``storage.resize_``), emptying
        PyTorch's cache first where the driver has no room while that cache holds unused blocks; raises
        torch.OutOfMemoryError where there is none all the same."""
        map_with_cache_released(self.device, lambda: storage.resize_(nbytes))

    def disown(self, tensor: torch.Tensor) -> None:
        """Gives ``tensor``'s storage (the adopted one) PyTorch's CUDA allocator back, for a bucket that stops managing
        it: its memory stays where it is until the storage frees it, and a later resize allocates from PyTorch."""
        native_module().vmm_disown_storage(tensor)

    def wait_released(self) -> None:
        """Blocks until the releases asked for have happened; MemmgrStateError if one failed (its memory is then
        still mapped, and the storage's next resize maps nothing new)."""
        error = self._range.wait_released()
        if error:
            raise MemmgrStateError(f"{self.where}: giving its same-address memory back to the driver failed ({error}); "
                                   f"the memory is still in use on {self.device}. Its contents are intact")

    def __repr__(self) -> str:
        return f"SameAddressStorage({self.where}, {self.reserved_bytes} B at {self.address:#x}, " \
               f"{'mapped' if self.mapped else 'released'})"
