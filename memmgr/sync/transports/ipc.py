"""The same-GPU transport: trainer and engine are two processes on one GPU, and buckets travel through CUDA IPC.

NCCL cannot have two ranks on one GPU, so colocated trainers hand weights over through CUDA IPC. Handles per tensor
are slow (one IPC open per tensor per sync), so this transport owns a small ring of flat byte buffers on the GPU,
exports each buffer once (``torch.multiprocessing.reductions.reduce_tensor``) and reuses it for every bucket of
every sync:

1. the producer waits until the consumer has signalled that it finished copying the slot's previous bucket out
   (the ``announce`` call for that slot returned), then copies the next bucket into the slot (or, through
   ``reserve``, the export packs it there);
2. once those copies have finished, it announces the bucket: its layout, the slot, and the slot's IPC export keyed by
   the GPU's UUID (the two processes may number GPUs differently under different ``CUDA_VISIBLE_DEVICES``). A
   bucket copied from host memory is waited for before ``send_bucket``/``send_pairs`` returns (the caller may write
   its source right away); for one copied from this GPU, as for one packed in place, the announcing thread waits on
   an event and the caller goes on (the copies are on its stream, so whatever it does with the sources next runs
   after them): it already queues the next bucket's work while the copies run;
3. the consumer (``CudaIpcReceiver``) maps the slot once per export, hands out views into it, copies them into the
   engine's weights and synchronizes its stream before it answers, so the slot is free when ``announce`` returns.

With two or more slots the producer fills one slot while the consumer copies out of another. A buffer reused before
the consumer finished reading it would corrupt weights; the ring only reuses a slot whose announce returned.

A sync is also a session on the engine: ``start`` announces ``{"control": "begin"}``, ``finish`` (once every bucket
was copied out) ``{"control": "commit"}``, and ``abort`` (the trainer gave up: an export, transport or engine error,
a timeout) ``{"control": "abort"}``. An engine that serves with ``CudaIpcReceiver.handle(description,
load_weights)`` and an atomic ``ModuleWeightLoader`` keeps a host copy of each tensor before the sync first
overwrites it and puts all of them back on abort, on its own loading error, or when a new sync begins while one is
still open; so a failed or interrupted sync leaves it on its previous weights, all of them. ``receive`` answers a
control message with an empty bucket, so an engine loop that only calls ``receive`` and ``load_weights`` keeps
working (without sessions: a failed sync then leaves it with the buckets before the failure).
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Mapping, Sequence

import torch

from memmgr import arguments
from memmgr.errors import MemmgrInputError, MemmgrSyncError, MemmgrSyncTimeoutError
from memmgr.sync.comm import device_uuid
from memmgr.sync.loaders import begin_sync, commit_sync, rollback_sync
from memmgr.sync.transports.base import ALIGN_BYTES, DEFAULT_BUCKET_BYTES, Transport, WeightBucket, aligned

logger = logging.getLogger("memmgr")

_LARGE_BLOCK = 2 << 20

Announce = Callable[[dict[str, Any]], Any]
_DEVICE_ARG = 6  # index of the device in torch's rebuild_cuda_tensor arguments


class CudaIpcTransport(Transport):
    """Producer side: a ring of ``num_buffers`` GPU buffers of ``buffer_bytes`` each, exported once.

    A bucket larger than ``buffer_bytes`` (one tensor larger than the export's bucket size, e.g. a large
    vocabulary's embedding) goes through one more slot, sized to the largest such bucket and reused like the others:
    the extra GPU memory is then the ring plus the largest tensor.

    ``announce(description)`` is the control channel to the consumer; it must return only once the consumer has
    copied the bucket out (vLLM's ``update_weights`` RPC does; ``CudaIpcReceiver.done`` marks that point on the
    consumer). It runs on a helper thread, in order, so the next bucket is packed while the engine copies.
    ``timeout_s`` bounds the wait for a slot. ``held`` (name -> (shape, dtype) of the engine's weights, e.g. from
    its ``ModuleWeightLoader.expected()``) is checked at ``start``, before any weight moves.
    """

    name = "cuda_ipc"

    def __init__(self, announce: Announce, *, device: torch.device | str | int | None = None,
                 buffer_bytes: int = DEFAULT_BUCKET_BYTES, num_buffers: int = 2, timeout_s: float = 120.0,
                 held: Mapping[str, tuple[Sequence[int], torch.dtype]] | None = None):
        if not callable(announce):
            raise MemmgrInputError("CudaIpcTransport needs an announce callable: the control channel that hands a "
                                   "bucket's description to the engine and returns once the engine copied it out")
        if not torch.cuda.is_available():
            raise MemmgrInputError("CudaIpcTransport needs CUDA; on the CPU use the gloo or in-process transport")
        arguments.integer("CudaIpcTransport", "num_buffers", num_buffers, minimum=1)
        arguments.integer("CudaIpcTransport", "buffer_bytes", buffer_bytes, minimum=1)
        arguments.number("CudaIpcTransport", "timeout_s", timeout_s, positive=True)
        if held is not None and not isinstance(held, Mapping):
            raise MemmgrInputError(f"CudaIpcTransport: held must map the engine's weight names to (shape, dtype), got "
                                   f"{type(held).__name__}")
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device())
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if device.type != "cuda":
            raise MemmgrInputError(f"CudaIpcTransport: device {device} is not a GPU")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.uuid = device_uuid(device)
        self.announce = announce
        self.buffer_bytes = int(buffer_bytes)
        self.num_buffers = int(num_buffers)
        self.timeout_s = float(timeout_s)
        self.held = held  # what the engine holds, if the caller knows: checked at start(), before any weight moves
        self._ring: list[torch.Tensor] = []
        self._exports: list[tuple] = []
        self._oversize: torch.Tensor | None = None
        self._oversize_export: tuple = ()
        self._reserved: set[int] = set()  # slots handed out by reserve() whose bucket is not sent yet
        self._pending: list[Future | None] = [None] * (self.num_buffers + 1)  # the last: the oversize slot
        self._next = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memmgr-ipc-announce")
        self._broken: str | None = None
        self._open = False  # a session announced to the engine and not yet committed or aborted
        # set by the announcing thread when a bucket's announce fails: the buckets queued behind it are not announced
        # (the engine has rolled back, and loading them would leave it on a mix); start() clears it
        self._bucket_failed: str | None = None
        self.buckets = 0
        self.nbytes = 0

    # -- the engine's sync session ---------------------------------------------------------------------------------
    def _control(self, op: str, **extra: Any) -> dict[str, Any]:
        return {"control": op, "slot": -1, "nbytes": 0, "dtype": "uint8", "numel": 0, "entries": [], "ipc": {},
                **extra}

    def start(self, specs: Sequence[Any]) -> None:
        """Checks the sync against ``held`` (nothing moves on a mismatch), then opens the engine's sync session."""
        super().start(specs)
        self._check_usable()
        if self._open:  # the previous sync was neither finished nor aborted
            self.abort("a new sync started before the previous one finished")
        self._bucket_failed = None
        try:
            self._pool.submit(self.announce, self._control("begin", tensors=len(specs))).result(
                timeout=self.timeout_s)
        except TimeoutError as exc:
            self._broken = "the engine did not answer the start of a sync"
            raise MemmgrSyncTimeoutError(f"CUDA IPC weight sync: the engine did not answer the start of the sync "
                                         f"within {self.timeout_s:.0f} s; nothing was sent") from exc
        except Exception as exc:
            raise MemmgrSyncError(f"CUDA IPC weight sync: the engine refused the start of the sync "
                                  f"({type(exc).__name__}: {str(exc)[:500]}); nothing was sent") from exc
        self._open = True

    def abort(self, reason: str = "the sync failed") -> None:
        """Tells the engine to roll the sync back (queued after the buckets already announced; waits at most
        ``timeout_s`` for the engine's answer, never raises)."""
        if not self._open:
            return
        self._open = False
        try:
            future = self._pool.submit(self.announce, self._control("abort", reason=reason[:300]))
            future.result(timeout=self.timeout_s)
        except Exception as exc:
            logger.warning("CUDA IPC weight sync: could not tell the engine to roll back (%s: %s); it refuses to "
                           "serve until it rolls back at its next sync", type(exc).__name__, exc)

    @property
    def ring_bytes(self) -> int:
        """GPU memory the ring and the oversize slot hold (the transport's extra GPU memory)."""
        return sum(buf.numel() for buf in self._ring) + (self._oversize.numel() if self._oversize is not None else 0)

    def _ensure_ring(self) -> None:
        if self._ring:
            return
        from torch.multiprocessing.reductions import reduce_tensor

        for _ in range(self.num_buffers):
            buf = torch.empty(self.buffer_bytes, dtype=torch.uint8, device=self.device)
            self._ring.append(buf)
            self._exports.append(tuple(reduce_tensor(buf)[1]))

    def _wait_slot(self, slot: int) -> None:
        future = self._pending[slot]
        if future is None:
            return
        try:
            future.result(timeout=self.timeout_s)
        except TimeoutError as exc:
            self._broken = f"slot {slot} was never released"
            raise MemmgrSyncTimeoutError(f"CUDA IPC weight sync: the engine did not finish copying ring slot {slot} "
                                         f"within {self.timeout_s:.0f} s; it is gone or stuck. The slot cannot be "
                                         f"reused safely: build a new transport after the engine is back") from exc
        except Exception as exc:
            self._broken = f"the engine failed on slot {slot}"
            raise MemmgrSyncError(f"CUDA IPC weight sync: the engine failed to load the bucket in ring slot {slot} "
                                  f"({type(exc).__name__}: {str(exc)[:500]})") from exc
        finally:
            if future.done():
                self._pending[slot] = None

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise MemmgrSyncError(f"CUDA IPC weight sync: the transport is unusable after an earlier failure "
                                  f"({self._broken}); build a new one")

    def _acquire(self, nbytes: int, what: str) -> int:
        self._check_usable()
        self._ensure_ring()
        if nbytes > self.buffer_bytes:
            if self.num_buffers in self._reserved:
                raise MemmgrSyncError(f"CUDA IPC weight sync: {what} needs the oversize slot, which is reserved for a "
                                      f"bucket not sent yet; send that bucket first")
            return self._acquire_oversize(nbytes, what)
        slot = self._next_unreserved_slot()
        if slot is None:
            raise MemmgrSyncError(f"CUDA IPC weight sync: {what} finds every ring slot reserved for buckets not sent "
                                  f"yet; send them first (or build the transport with more num_buffers)")
        self._wait_slot(slot)
        return slot

    def _next_unreserved_slot(self) -> int | None:
        for _ in range(self.num_buffers):
            slot = self._next
            self._next = (slot + 1) % self.num_buffers
            if slot not in self._reserved:
                return slot
        return None

    def reserve(self, dtype: torch.dtype, numel: int) -> torch.Tensor | None:
        """The next free slot's memory as ``numel`` elements of ``dtype`` (waiting, like a send, until the engine
        has copied the slot's previous bucket out): pack a bucket there and ``send_bucket`` announces it without a
        copy. None when every slot is reserved already (the caller allocates; ``send_bucket`` then copies)."""
        nbytes = int(numel) * torch.empty(0, dtype=dtype).element_size()
        what = f"reserved bucket ({dtype}, {nbytes} B)"
        self._check_usable()
        self._ensure_ring()
        if nbytes > self.buffer_bytes:
            if self.num_buffers in self._reserved:
                return None
            slot = self._acquire_oversize(nbytes, what)
        else:
            slot = self._next_unreserved_slot()
            if slot is None:
                return None
            self._wait_slot(slot)
        self._reserved.add(slot)
        return self._slot_buffer(slot)[:nbytes].view(dtype)

    def release_reservations(self) -> None:
        self._reserved.clear()

    def _reserved_slot_holding(self, bucket: WeightBucket) -> int | None:
        flat = bucket.flat
        if not flat.is_cuda or flat.device != self.device:
            return None
        for slot in self._reserved:
            buf = self._slot_buffer(slot)
            if flat.data_ptr() == buf.data_ptr() and bucket.nbytes <= buf.numel():
                return slot
        return None

    def _acquire_oversize(self, nbytes: int, what: str) -> int:
        slot = self.num_buffers
        self._wait_slot(slot)
        if self._oversize is None or self._oversize.numel() < nbytes:
            from torch.multiprocessing.reductions import reduce_tensor

            logger.info("CUDA IPC weight sync: %s has %d B, more than the ring's %d B buffers; it goes through an "
                        "oversize slot of that size", what, nbytes, self.buffer_bytes)
            self._oversize = None  # the engine drops its mapping of the old export when it sees the new one
            # PyTorch's allocator rounds large blocks up to 2 MiB: the slot takes all of its block
            self._oversize = torch.empty(-(-nbytes // _LARGE_BLOCK) * _LARGE_BLOCK, dtype=torch.uint8,
                                         device=self.device)
            self._oversize_export = tuple(reduce_tensor(self._oversize)[1])
        return slot

    def _slot_buffer(self, slot: int) -> torch.Tensor:
        return self._oversize if slot == self.num_buffers else self._ring[slot]

    def _slot_export(self, slot: int) -> tuple:
        return self._oversize_export if slot == self.num_buffers else self._exports[slot]

    def _copy_in(self, slot: int, sources: Sequence[torch.Tensor], copy: Callable[[], WeightBucket]) -> None:
        """Runs ``copy`` (the copies of ``sources`` into ``slot``, queued on the current stream) and announces what it
        returns. For sources on this GPU the announcing thread waits for the copies, and the caller does not: later
        work on the stream, the freeing or offloading of a source included, runs after them (a source made on
        another stream is marked as used on this one). Any other source (host memory the caller may write once this
        returns) is waited for here."""
        on_device = all(t.is_cuda and t.device == self.device for t in sources)
        with torch.cuda.device(self.device):
            bucket = copy()
            if not on_device:
                self._publish(slot, bucket, wait_here=True)
                return
            stream = torch.cuda.current_stream(self.device)
            for tensor in sources:
                tensor.record_stream(stream)
            self._publish(slot, bucket, wait_here=False)

    def _publish(self, slot: int, bucket: WeightBucket, *, wait_here: bool) -> None:
        # the consumer reads the slot from another process: the copies into it must be complete before it is
        # announced. With wait_here the caller's thread waits (its source may be reused once send_bucket returns);
        # otherwise the announcing thread waits on an event, and the caller packs the next slot meanwhile.
        stream = torch.cuda.current_stream(self.device)
        description = bucket.meta()
        description.update({"slot": slot, "nbytes": bucket.nbytes, "ipc": {self.uuid: self._slot_export(slot)}})
        if wait_here:
            stream.synchronize()
            self._pending[slot] = self._pool.submit(self._announce_bucket, None, description)
        else:
            packed = torch.cuda.Event()
            packed.record(stream)
            self._pending[slot] = self._pool.submit(self._announce_bucket, packed, description)
        self.buckets += 1
        self.nbytes += bucket.payload_bytes

    def _announce_bucket(self, packed: torch.cuda.Event | None, description: dict[str, Any]) -> Any:
        """Runs on the announcing thread, in send order: waits for the slot's packing (``packed``), then announces,
        unless an earlier bucket of this sync failed to load; then the bucket is not sent at all: the engine rolled
        the sync back on that failure and would load this one outside it."""
        if self._bucket_failed is not None:
            raise MemmgrSyncError(f"CUDA IPC weight sync: bucket in ring slot {description.get('slot')} not sent: an "
                                  f"earlier bucket of this sync failed ({self._bucket_failed})")
        if packed is not None:
            packed.synchronize()
        try:
            return self.announce(description)
        except BaseException as exc:
            self._bucket_failed = f"slot {description.get('slot')}: {type(exc).__name__}: {str(exc)[:200]}"
            raise

    def send_bucket(self, bucket: WeightBucket) -> None:
        """Copies ``bucket`` (on this GPU or in host memory) into the next free slot and announces it; returns
        before the engine copied it out (``finish`` waits for that). A bucket packed into memory ``reserve`` handed
        out is announced from there, without a copy."""
        slot = self._reserved_slot_holding(bucket)
        if slot is not None:
            # packed in place: its sources are the trainer's weights or the exporter's stream-ordered temporaries,
            # so this thread need not wait for the packing to finish
            self._reserved.discard(slot)
            self._publish(slot, bucket, wait_here=False)
            return
        slot = self._acquire(bucket.nbytes, f"bucket {self.buckets} ({bucket.dtype})")
        dst = self._slot_buffer(slot)[:bucket.nbytes]
        src = bucket.flat.view(torch.uint8)

        def copy() -> WeightBucket:
            dst.copy_(src, non_blocking=src.device.type == "cpu" and src.is_pinned())
            return WeightBucket.from_meta(bucket.meta(), dst.view(bucket.dtype))
        self._copy_in(slot, [bucket.flat], copy)

    def send_pairs(self, pairs: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Packs ``pairs`` (one dtype) straight into the next free slot and announces them: one copy less than
        building a bucket first."""
        if not pairs:
            return
        dtype = pairs[0][1].dtype
        item = torch.empty(0, dtype=dtype).element_size()
        packed = sum(aligned(t.numel() * item, ALIGN_BYTES) for _, t in pairs)  # WeightBucket.pack's layout
        slot = self._acquire(packed, f"bucket {self.buckets} ({dtype})")
        buf = self._slot_buffer(slot)
        self._copy_in(slot, [t for _, t in pairs],
                      lambda: WeightBucket.pack(pairs, out=buf.view(dtype)[:buf.numel() // item]))

    def finish(self) -> None:
        """Returns once the engine has copied out every announced bucket."""
        try:
            for slot in range(self.num_buffers + 1):
                self._wait_slot(slot)
        except BaseException as exc:
            self.abort(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self._reserved.clear()
        if self._open:
            self._open = False
            try:
                self._pool.submit(self.announce, self._control("commit")).result(timeout=self.timeout_s)
            except Exception as exc:
                self._broken = "the engine failed to commit a sync"
                raise MemmgrSyncError(f"CUDA IPC weight sync: the engine failed to commit the sync "
                                      f"({type(exc).__name__}: {str(exc)[:500]})") from exc

    def close(self) -> None:
        """Waits (bounded) for outstanding buckets, rolls back a sync left open, then frees the ring."""
        self.abort("the transport was closed during a sync")
        try:
            deadline = time.monotonic() + min(self.timeout_s, 30.0)
            for f in self._pending:
                if f is not None:
                    f.result(timeout=max(0.0, deadline - time.monotonic()))
        except Exception as exc:
            logger.warning("CUDA IPC weight sync: closing with a bucket still outstanding (%s)", exc)
        self._pool.shutdown(wait=False)
        self._pending = [None] * (self.num_buffers + 1)
        self._ring.clear()
        self._exports.clear()
        self._oversize, self._oversize_export = None, ()
        self._reserved.clear()
        self._broken = self._broken or "closed"
        torch.cuda.ipc_collect()


class CudaIpcReceiver:
    """Consumer side: maps each ring slot once (per export) and returns buckets as views into it.

    ``receive(description)`` -> ``WeightBucket`` whose views alias the producer's slot: copy them into the engine's
    weights, then call ``done()`` (synchronizes this process's stream, so the copies have finished reading) before
    answering the producer. ``device`` is this process's GPU; the description must carry an export for its UUID.
    """

    def __init__(self, device: torch.device | str | int | None = None):
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device())
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.uuid = device_uuid(device)
        # slot -> (export key, mapped buffer): one mapping per export, released when the export changes or on
        # close, so torch's cross-process reference count of each producer buffer stays paired
        self._mapped: dict[int, tuple[tuple, torch.Tensor]] = {}
        # after handle() rolled a sync back, buckets of that sync still in flight are refused until the next begin
        self._rolled_back: str | None = None

    def receive(self, description: dict[str, Any]) -> WeightBucket:
        if description.get("control"):  # a session message (see handle): no weights in it
            return WeightBucket(torch.empty(0, dtype=torch.uint8, device=self.device), ())
        exports = description.get("ipc") or {}
        args = exports.get(self.uuid)
        if args is None:
            raise MemmgrSyncError(f"CUDA IPC weight sync: the bucket was exported from GPU(s) {sorted(exports)} but "
                                  f"this engine runs on {self.device} (UUID {self.uuid}); CUDA IPC needs the producer "
                                  f"and the consumer on the same physical GPU. Use the NCCL transport across GPUs")
        slot = int(description.get("slot", 0))
        key = tuple(args)
        entry = self._mapped.get(slot)
        if entry is None or entry[0] != key:
            from torch.multiprocessing.reductions import rebuild_cuda_tensor

            local = list(args)
            local[_DEVICE_ARG] = self.device.index  # the same GPU may have another index in this process
            self._mapped[slot] = (key, rebuild_cuda_tensor(*local))
        buf = self._mapped[slot][1]
        dtype, numel, _ = WeightBucket.layout_from_meta(description)
        nbytes = int(description.get("nbytes", numel * torch.empty(0, dtype=dtype).element_size()))
        return WeightBucket.from_meta(description, buf[:nbytes].view(dtype))

    def handle(self, description: dict[str, Any], load_weights: Callable[[Any], Any]) -> None:
        """The engine's whole step for one announced message; answer the producer once it returns.

        A bucket is received, loaded (``load_weights(views)``) and its slot released (``done``); a session message
        opens (``begin``), commits (``commit``) or rolls back (``abort``) the sync on ``load_weights`` where it keeps
        sessions (``ModuleWeightLoader``). A bucket that fails to load rolls the session back before the error is
        raised, so the engine is on its previous weights when the producer hears of it."""
        control = description.get("control")
        if control == "begin":
            self._rolled_back = None
            begin_sync(load_weights)
            return
        if control == "commit":
            commit_sync(load_weights)
            return
        if control == "abort":
            self._rolled_back = str(description.get("reason") or "the trainer abandoned the sync")
            rollback_sync(load_weights, self._rolled_back)
            return
        if control:
            raise MemmgrSyncError(f"CUDA IPC weight sync: unknown session message {control!r}; trainer and engine "
                                  f"must run the same memmgr version")
        if self._rolled_back is not None:
            raise MemmgrSyncError(f"CUDA IPC weight sync: a bucket of a sync this engine rolled back "
                                  f"({self._rolled_back}) arrived; it is not loaded (the engine stays on its previous "
                                  f"weights) until the next sync begins")
        try:
            bucket = self.receive(description)
            load_weights(bucket.views())
            self.done()  # the copies out of the slot have finished: the producer may refill it
        except BaseException as exc:
            self._rolled_back = f"{type(exc).__name__} while loading a bucket"
            try:
                self.done()
            finally:
                rollback_sync(load_weights, self._rolled_back)
            raise

    def done(self) -> None:
        """Marks the end of the copy-out: waits until this process's GPU work reading the slot has finished."""
        torch.cuda.current_stream(self.device).synchronize()

    def close(self) -> None:
        self._mapped.clear()


__all__ = ["CudaIpcTransport", "CudaIpcReceiver"]
