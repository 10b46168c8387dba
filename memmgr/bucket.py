"""One flat bucket (``FlatTensors``): a buffer that holds tensors of a group and moves between GPU and host memory.

A group of tensors is coalesced once into flat buckets (one device and dtype each); every tensor's ``.data`` is
rebound to a view of its bucket (same device and dtype, so the tensor object, ``requires_grad``, its autograd grad
accumulator and registered hooks survive). From then on a bucket moves as one copy:

- offload: copy the bucket into its exact-size pinned host buffer on a dedicated stream ordered after the current
  stream, then free the device storage in place (``untyped_storage().resize_(0)``): every view stays a valid tensor
  object with zero bytes behind it, and nothing that refers to it has to be rebuilt.
- onload: re-allocate the storage in place (``resize_``) and copy the host buffer back; every view sees its contents
  again, bit for bit.

Same-address mode (``same_address=True``, a CUDA bucket): the flat buffer's storage moves once, at construction, into
an address range of memmgr's own (``memmgr.same_address.SameAddressStorage``). The same ``resize_(0)`` then gives the
physical memory back to the driver, once the copy out has completed, and the same ``resize_`` at onload maps new
memory at the same address: every member's ``data_ptr()`` is the same after an onload, so CUDA graphs captured on the
members replay. Everything else about a move is as above.

Using a managed tensor while its bucket is offloaded is undefined: its storage has zero bytes and a null data
pointer, and most PyTorch kernels do not check storage bounds, so a read crashes the process (a segmentation fault
on the CPU, an illegal-address error that poisons the CUDA context on a GPU) rather than raising. Onload first;
``require_on_device()`` raises a clear MemmgrStateError where code is unsure. Deep copies and pickles are safe:
they read the host copy (``memmgr.storages``). Pointers captured before an offload (CUDA
graphs, raw data_ptr) are stale after onload, since the storage gets a new allocation, except in same-address mode.

Opt-in verification (``verify=True``, or ``group.verify = True`` after construction): offload takes a checksum of each
bucket's bytes where they live (on the GPU for a CUDA bucket, ordered on the current stream before the copy) and
onload recomputes it on the restored bytes (``memmgr.checksum``); a mismatch raises ``MemmgrCorruptionError`` naming
the bucket and both checksums, and leaves the group off the device with its host copies kept.

Every move checks that each member still views its bucket as it did when it joined (``check_intact``): a member
resized or given other memory since is refused by name instead of being truncated or left behind unmanaged, and the
move leaves everything as it was. The bucket's own storage is checked before any copy; the pass over its members runs
while the copies do (an offload frees nothing until every member passed; an onload frees what it restored again).
Each bucket registers its storage (``memmgr.storages``), so no storage is managed twice.

A group's moves go through ``memmgr.moves``: its offload issues every bucket's copy, its onload is one
``OnloadTransaction`` (undone as a whole on out-of-memory or a checksum mismatch).
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch

from memmgr import arguments, moves, storages
from memmgr.checksum import bucket_checksum
from memmgr.bucket_members import BucketMembers
from memmgr.dropped import release_dropped_bucket
from memmgr.errors import MemmgrInputError, MemmgrStateError
from memmgr.groups import unique_storage_bytes
from memmgr.host_memory import HostBuffer, HostMemoryPool, default_pool
from memmgr.same_address import SameAddressStorage
from memmgr.states import BucketState, Policy, policy_from
from memmgr.tensor_checks import PROBE_REFS, check_adoptable, check_bucket_items, describe_tensor, storage_use_count
from memmgr.transfer import TransferHandle, copy_stream, issue_copy

logger = logging.getLogger("memmgr")


@dataclass
class _BegunOffload:
    """An offload ``begin_offload`` issued and ``offload`` has not finished yet: its policy, its copy's event (None:
    nothing in flight) and whether ``check_intact`` has passed since it began (the offload then skips its own check).
    The mark lives and ends with the begun move, so a check never vouches for a later one."""

    discard: bool
    event: torch.cuda.Event | None
    checked: bool = False

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class FlatTensors:
    """One flat bucket: a 1-D tensor of one device and dtype that holds (or is) a group of tensors."""

    _released = False  # set by unmanage(): the bucket holds nothing any more and refuses to move

    def __init__(self, flat: torch.Tensor, members: list[tuple[str, torch.Tensor, int]], *, name: str,
                 policy: Policy | str = Policy.COPY, pool: HostMemoryPool | None = None, verify: bool = False,
                 same_address: bool = False):
        # Moved into memmgr's own address range first, so that every pointer read below is the lasting one.
        self._same_address = SameAddressStorage(flat, f"bucket {name!r}") \
            if same_address and flat.is_cuda and flat.untyped_storage().nbytes() > 0 else None
        self.flat = flat
        self.members = BucketMembers(name, members)  # (name, tensor, element offset) entries
        self.name = name
        self.policy = policy_from(policy, name)
        self.nbytes = flat.numel() * flat.element_size()
        self._pool = pool or default_pool()
        # The host store, the events of the transfer in flight and the state live in cells shared with the finalizer
        # that runs if the bucket is dropped without unmanage() (a manager nobody closed): no reference to the bucket.
        self._host_cell: list[HostBuffer | None] = [None]
        self._inflight_events: list[list] = [[]]
        self._state_cell: list[BucketState] = [BucketState.ON_DEVICE]
        self._drop_finalizer = weakref.finalize(self, release_dropped_bucket, self._pool, self._host_cell, name,
                                                self._inflight_events, flat, self._state_cell, self._same_address)
        self._drop_finalizer.atexit = False  # at exit the process's memory goes anyway; CUDA may be gone already
        self._begun: _BegunOffload | None = None
        self._storage_key = storages.register(flat, self)
        self._state = BucketState.ON_DEVICE
        self._pending: TransferHandle | None = None
        self._pending_state: BucketState | None = None
        self.verify = verify  # checksum at offload, check at onload (see the module docstring)
        self._offload_checksum: torch.Tensor | None = None
        self._restored_checksum: torch.Tensor | None = None
        if flat.is_cuda:
            # Created now, off the critical path: the process's first stream creation waits for the whole GPU,
            # which would turn the first non-blocking offload into a blocking one.
            copy_stream(flat.device, "d2h")
            copy_stream(flat.device, "h2d")

    # ---- construction ----
    @classmethod
    def coalesce(cls, items: list[tuple[str, torch.Tensor]], *, name: str, policy: Policy | str = Policy.COPY,
                 pool: HostMemoryPool | None = None, align_bytes: int = 64, verify: bool = False,
                 same_address: bool = False) -> "FlatTensors":
        """Copies same-device, same-dtype tensors into one new flat buffer and rebinds each to a view of it
        (``same_address``: a buffer whose address survives offloads, see the module docstring)."""
        arguments.string("FlatTensors.coalesce", "name", name)
        align_bytes = arguments.integer(f"bucket {name!r}", "align_bytes", align_bytes, minimum=1, maximum=1 << 30)
        check_bucket_items(items, name)
        device, dtype = items[0][1].device, items[0][1].dtype
        align = max(1, align_bytes // torch.empty(0, dtype=dtype).element_size())
        offsets, total = [], 0
        for _, tensor in items:
            offsets.append(total)
            total += -(-tensor.numel() // align) * align
        flat = torch.empty(total, dtype=dtype, device=device)
        members = []
        # Storages that only the members' view bases will still hold once the members are rebound (validate_tensors
        # accepted them): a rebound view keeps its base, so their memory is given back here.
        abandoned = {storages.storage_key(t): t.untyped_storage() for _, t in items if t._base is not None}
        with torch.no_grad():
            for (tname, tensor), offset in zip(items, offsets):
                view = flat[offset:offset + tensor.numel()].view(tensor.shape)
                view.copy_(tensor)
                tensor.data = view
                members.append((tname, tensor, offset))
        for key, storage in abandoned.items():
            holders = {id(b) for _, t in items for b in [t._base]
                       if b is not None and storages.storage_key(b) == key}
            # every reference left is this loop's wrapper or a member's view base
            if torch._C._storage_Use_Count(key) - 1 <= len(holders):
                storage.resize_(0)
        return cls(flat, members, name=name, policy=policy, pool=pool, verify=verify, same_address=same_address)

    @classmethod
    def adopt(cls, buffer: torch.Tensor, *, name: str, policy: Policy | str = Policy.COPY,
              pool: HostMemoryPool | None = None, verify: bool = False, same_address: bool = False) -> "FlatTensors":
        """Uses a flat buffer the caller owns (e.g. megatron-core's param_data) as a bucket, without a copy.

        The buffer must span its whole storage: freeing that storage in place frees exactly this buffer, and every
        view of it (the caller's parameters, bucket slices, optimizer shards) stays valid through a round trip. With
        ``same_address`` the storage's memory moves once, now, into memmgr's own address range: every view's
        ``data_ptr()`` changes here, once, and never again.
        """
        arguments.string("FlatTensors.adopt", "name", name)
        check_adoptable(buffer, name)
        return cls(buffer, [(name, buffer, 0)], name=name, policy=policy, pool=pool, verify=verify,
                   same_address=same_address)

    # ---- state ----
    @property
    def _host(self) -> HostBuffer | None:
        return self._host_cell[0]

    @_host.setter
    def _host(self, value: HostBuffer | None) -> None:
        self._host_cell[0] = value

    @property
    def _state(self) -> BucketState:
        return self._state_cell[0]

    @_state.setter
    def _state(self, value: BucketState) -> None:
        self._state_cell[0] = value

    @property
    def state(self) -> BucketState:
        if self._pending is not None:
            self._pending.done()
        return self._state

    @property
    def device(self) -> torch.device:
        return self.flat.device

    @property
    def dtype(self) -> torch.dtype:
        return self.flat.dtype

    @property
    def device_bytes(self) -> int:
        """Bytes of device storage this bucket holds now (0 once offloaded or discarded), plus the memory of members
        given other memory since they joined (``.data = ...``, ``set_``), which no move can free."""
        own = self.flat.untyped_storage().nbytes()
        detached = [t for _, t, _ in self.members if storages.storage_key(t) != self._storage_key]
        return own + (unique_storage_bytes(detached) if detached else 0)

    # ---- integrity: every member still views the bucket as it did when it joined ----
    def check_intact(self, moving: str = "offload") -> None:
        """Raises MemmgrStateError, changing nothing, if moving the bucket now (``moving``: "offload" or "onload")
        would lose or hide data: its storage was resized or freed outside memmgr, a member was resized, or (for an
        offload) a member was given other memory, which the move would leave on the device unmanaged."""
        self._check_storage(moving)
        self._check_members(moving)

    def _check_storage(self, moving: str) -> None:
        """The bucket's own storage is the one it registered, at a size the move expects (cheap: before any copy)."""
        storage = self.flat.untyped_storage()
        if storage._cdata != self._storage_key:
            raise MemmgrStateError(
                f"bucket {self.name!r}: its buffer {describe_tensor(self.name, self.flat)} was given other memory "
                f"(`.data = ...` or `set_()`) after memmgr took it over; the bucket no longer owns what it would "
                f"move. Close this manager and build a new one. Nothing was moved")
        allowed = (self.nbytes,) if moving == "offload" else (0, self.nbytes)
        if storage.nbytes() not in allowed:
            raise MemmgrStateError(
                f"bucket {self.name!r}: its storage holds {storage.nbytes()} bytes where the bucket "
                f"({self._state.value}, {self.nbytes} B) expects {' or '.join(map(str, allowed))}: it was resized or "
                f"freed outside memmgr (`resize_` on one of its tensors, the same buffer managed by another group or "
                f"manager, or another offload tool). Moving it now would lose data. Undo that change, or close this "
                f"manager (mgr.close()) and build a new one. Nothing was moved")

    def _check_members(self, moving: str) -> None:
        """Every member still views the bucket as it did when it joined (``BucketMembers.check``); an offload's pass
        marks the offload begun, if any (``_BegunOffload.checked``)."""
        self.members.check(moving, self.flat.data_ptr() if moving == "offload" else 0)
        if moving == "offload" and self._begun is not None:
            self._begun.checked = True

    @property
    def storage_key(self) -> int:
        """The identity of the storage this bucket frees and restores (memmgr.storages.storage_key)."""
        return self._storage_key

    def add_alias(self, name: str, tensor: torch.Tensor) -> None:
        """Adds ``tensor``, a view of this bucket's storage (e.g. optimizer state a checkpoint loader rebuilt over
        the same memory), as a member without copying: it moves with the bucket and is not an outside reference."""
        if storages.storage_key(tensor) != self._storage_key:
            raise MemmgrInputError(f"bucket {self.name!r}: {describe_tensor(name, tensor)} is not a view of this "
                                   f"bucket")
        self.members.append(name, tensor, tensor.storage_offset() * tensor.element_size() // self.flat.element_size())

    def host_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """The contents of ``tensor`` (a view of this bucket) while the bucket is off the device, read from the host
        copy into a new CPU tensor (zeros for a discarded bucket, which is what its onload restores). Used by deep
        copies and pickles of offloaded tensors (memmgr.storages)."""
        self.wait()
        if self._state is BucketState.DISCARDED:
            return torch.zeros(tuple(tensor.shape), dtype=tensor.dtype)
        if self._state is not BucketState.ON_HOST or self._host is None:
            raise MemmgrStateError(f"bucket {self.name!r} is {self._state.value} and has no host copy to read "
                                   f"{describe_tensor('tensor', tensor)} from; onload it first")
        host = self._host.tensor.view(tensor.dtype)
        return torch.as_strided(host, tuple(tensor.shape), tensor.stride(), tensor.storage_offset()).clone()

    @property
    def host_bytes(self) -> int:
        return self._host.nbytes if self._host is not None else 0

    @property
    def host_buffer(self) -> HostBuffer | None:
        return self._host

    def pending(self) -> TransferHandle | None:
        return self._pending

    def _start(self, handle: TransferHandle, in_flight: BucketState, final: BucketState) -> TransferHandle:
        self._state = in_flight
        self._pending = handle
        self._pending_state = final
        self._inflight_events[0] = list(handle.events)
        return handle

    @property
    def same_address(self) -> bool:
        """Whether the bucket's memory keeps its address across moves (see the module docstring)."""
        return self._same_address is not None

    def _free_storage(self, after: torch.cuda.Stream | None = None) -> None:
        """Frees the device storage in place. In same-address mode the physical memory goes back to the driver once
        the work queued on ``after`` (default: the current stream) so far has completed, and the address stays."""
        if self._same_address is not None:
            self._same_address.release_after(after or torch.cuda.current_stream(self.flat.device))
        self.flat.untyped_storage().resize_(0)

    def _wait_released(self) -> None:
        """Waits until the driver has a same-address bucket's memory back. A failed release leaves that memory mapped
        (its contents are on the host already); it is logged, and the bucket is offloaded all the same."""
        try:
            self._same_address.wait_released()  # type: ignore[union-attr]
        except MemmgrStateError as exc:
            logger.warning("%s", exc)

    def _complete(self) -> None:
        if self._same_address is not None and self._pending_state is BucketState.ON_HOST:
            self._wait_released()  # free only once the driver has the memory back
        if self._pending_state is not None:
            self._state = self._pending_state
        self._pending = None
        self._pending_state = None
        self._inflight_events[0] = []

    def wait(self) -> None:
        if self._pending is not None:
            self._pending.wait()

    def ensure_host_buffer(self) -> HostBuffer:
        """Allocates (and pins) the exact-size host store now, off the critical path of the first offload. If the
        bucket is dropped without ``unmanage`` (a manager nobody closed), the store goes back to its pool, after an
        offloaded bucket's contents went back to its tensors."""
        if self._host is None:
            self._host = self._pool.acquire(self.nbytes)
        return self._host

    # ---- moves ----
    def check_open(self, where: str = "") -> None:
        """Raises MemmgrStateError once this bucket was released (its manager closed, or a re-collect dropped it):
        whatever kept it (an exporter, a budget plan) must be built again from the manager that manages the tensors
        now."""
        if self._released:
            raise MemmgrStateError(f"{where + ': ' if where else ''}bucket {self.name!r} was released when its "
                                   f"manager was closed (mgr.close()) or its tensors left the group; it no longer "
                                   f"holds them. Build this object again from the open manager (e.g. "
                                   f"MegatronExporter(..., weights=new_mgr.group('weights')))")

    def begin_offload(self, discard: bool | None = None) -> bool:
        """Issues the copy of an offload without freeing anything (the bucket stays on the device, and its contents
        with it): ``offload`` with the same ``discard`` then only frees, and the check that must pass before the free
        (``check_intact``) can run while the copy does. ``abandon_offload`` drops a begun offload. False (nothing
        begun) unless the bucket is on the device."""
        self.check_open("offload")
        arguments.boolean(f"bucket {self.name!r} begin_offload", "discard", discard, optional=True)
        if self.state is not BucketState.ON_DEVICE:
            return False
        self._check_storage("offload")  # a copy out of storage freed or shrunk elsewhere would read past its end
        self.abandon_offload()
        discard = self.policy is Policy.DISCARD if discard is None else discard
        self._begun = _BegunOffload(discard, self._issue_offload_copy(discard))
        return True

    def abandon_offload(self) -> None:
        """Drops an offload ``begin_offload`` issued (the bucket was never freed); waits for its copy, so that the
        host store is not written once it may serve again."""
        begun, self._begun = self._begun, None
        if begun is not None:
            begun.wait()

    def _issue_offload_copy(self, discard: bool) -> torch.cuda.Event | None:
        """Takes the opt-in checksum and issues the device->host copy (a GPU bucket's, on the d2h copy stream; a CPU
        bucket's, now); returns the copy's event (None: nothing in flight)."""
        self._offload_checksum = None
        self._restored_checksum = None
        if self.verify and not discard and self.nbytes > 0:
            # Taken where the bytes live, ordered on the current stream after the writes and before the copy.
            with torch.no_grad():
                self._offload_checksum = bucket_checksum(self.flat)
        if discard or self.nbytes == 0:
            return None
        host = self.ensure_host_buffer().tensor
        src = self.flat.view(torch.uint8)
        if not self.flat.is_cuda:
            host.copy_(src)
            return None
        stream = copy_stream(self.flat.device, "d2h")
        stream.wait_stream(torch.cuda.current_stream(self.flat.device))
        with torch.cuda.stream(stream):
            issue_copy(host, src, stream)
            event = torch.cuda.Event()
            event.record(stream)
        return event

    def offload(self, non_blocking: bool = False, discard: bool | None = None) -> TransferHandle:
        """Moves the contents to the host store (or drops them) and frees the device storage in place."""
        arguments.boolean(f"bucket {self.name!r} offload", "non_blocking", non_blocking)
        arguments.boolean(f"bucket {self.name!r} offload", "discard", discard, optional=True)
        state = self.state
        if state in (BucketState.ON_HOST, BucketState.DISCARDED, BucketState.OFFLOADING):
            logger.debug("bucket %s is already %s; offload is a no-op", self.name, state.value)
            return self._pending or TransferHandle.completed()
        if state is BucketState.ONLOADING:
            self.wait()
        discard = self.policy is Policy.DISCARD if discard is None else discard
        if self._begun is not None and self._begun.discard != discard:  # begun for the other policy: copy again
            self.abandon_offload()
        if self._begun is None or not self._begun.checked:  # not checked by the move this offload belongs to
            self.check_intact("offload")
        begun, self._begun = self._begun, None
        event = begun.event if begun is not None else self._issue_offload_copy(discard)
        if event is None:
            # state first: an interrupt between the two lines must never leave "on device" with no memory behind it
            self._state = BucketState.DISCARDED if discard else BucketState.ON_HOST
            self._free_storage()
            if self._same_address is None:
                return TransferHandle.completed()
            if not non_blocking:
                self._wait_released()
                return TransferHandle.completed()
            # the memory goes back once the current stream's work so far is done: the handle says so then
            released = torch.cuda.Event()
            released.record(torch.cuda.current_stream(self.flat.device))
            return TransferHandle([released], [self._wait_released])
        # The allocator may hand this block out again only after the copy stream is done with it.
        self.flat.record_stream(copy_stream(self.flat.device, "d2h"))
        handle = self._start(TransferHandle([event], [self._complete]), BucketState.OFFLOADING, BucketState.ON_HOST)
        self._free_storage(after=copy_stream(self.flat.device, "d2h"))
        if not non_blocking:
            handle.wait()
        return handle

    def allocate(self) -> bool:
        """Re-allocates the device storage in place (raises torch.OutOfMemoryError); True if it was freed. Refuses a
        storage resized or replaced outside memmgr; the members are checked by ``onload``, while its copy runs."""
        self.check_open("onload")
        self._check_storage("onload")
        storage = self.flat.untyped_storage()
        if storage.nbytes() == self.nbytes:
            return False
        if self._same_address is not None:
            self._same_address.map_storage(storage, self.nbytes)
        else:
            storage.resize_(self.nbytes)
        return True

    def onload(self, non_blocking: bool = False, *, zero_after: torch.cuda.Event | None = None) -> TransferHandle:
        """Re-allocates the device storage in place and restores the contents (or zeroes a discarded bucket).

        The copy (or the zeroing) is ordered before any later work on the current stream, so compute may follow
        immediately. A discarded bucket on a GPU is zeroed behind the current stream's work so far, or, given
        ``zero_after`` (an event recorded on the current stream no later than this call, with no work that uses
        memory after it), on the GPU's fill stream behind that event alone: after it, the current stream may already
        wait for copies of the same onload, and the zeroing need not. The members are checked once the copy is
        issued (``check_intact``); a refusal frees the storage again, leaving the bucket as it was.
        """
        arguments.boolean(f"bucket {self.name!r} onload", "non_blocking", non_blocking)
        state = self.state
        if state in (BucketState.ON_DEVICE, BucketState.ONLOADING):
            logger.debug("bucket %s is already %s; onload is a no-op", self.name, state.value)
            return self._pending or TransferHandle.completed()
        offload_events = self._pending.events if self._pending is not None else []
        if self._pending is not None and not self.flat.is_cuda:
            self.wait()
        self.allocate()  # a no-op after the transaction's, but for the storage check (O(1))
        if state is BucketState.DISCARDED or self.nbytes == 0:
            if offload_events:
                self.wait()
            self._zero(zero_after)
            self._pending = None
            self._state = BucketState.ON_DEVICE
            self._check_members_restored(revert_to=state.settled())
            return TransferHandle.completed()
        host = self._host.tensor  # type: ignore[union-attr]
        dst = self.flat.view(torch.uint8)
        if self.flat.is_cuda:
            previous = self._pending
            current = torch.cuda.current_stream(self.flat.device)
            stream = copy_stream(self.flat.device, "h2d")
            stream.wait_stream(current)
            for event in offload_events:  # the host store is complete only once the offload copy is
                stream.wait_event(event)
            with torch.cuda.stream(stream):
                issue_copy(dst, host, stream)
                event = torch.cuda.Event()
                event.record(stream)
            current.wait_event(event)
            self.flat.record_stream(stream)
            if self.verify and self._offload_checksum is not None:
                with torch.no_grad():
                    self._restored_checksum = bucket_checksum(self.flat)  # ordered after the copy
            callbacks = [previous.settle] if previous is not None else []
            handle = self._start(TransferHandle([event], callbacks + [self._complete]), BucketState.ONLOADING,
                                 BucketState.ON_DEVICE)
            self._check_members_restored(revert_to=state.settled())
            if not non_blocking:
                handle.wait()
                self._check_restored(revert_to=BucketState.ON_HOST)
            return handle
        dst.copy_(host)
        if self.verify and self._offload_checksum is not None:
            with torch.no_grad():
                self._restored_checksum = bucket_checksum(self.flat)
        self._state = BucketState.ON_DEVICE
        self._check_members_restored(revert_to=state.settled())
        if not non_blocking:
            self._check_restored(revert_to=BucketState.ON_HOST)
        return TransferHandle.completed()

    def _zero(self, after: torch.cuda.Event | None) -> None:
        if after is None or not self.flat.is_cuda:
            with torch.no_grad():
                self.flat.zero_()
            return
        current = torch.cuda.current_stream(self.flat.device)
        stream = copy_stream(self.flat.device, "fill")
        stream.wait_event(after)
        with torch.cuda.stream(stream), torch.no_grad():
            self.flat.zero_()
            done = torch.cuda.Event()
            done.record(stream)
        current.wait_event(done)
        # The allocator may hand this block out again only after the fill stream is done with it.
        self.flat.record_stream(stream)

    # ---- verification ----
    def checksum_mismatch(self) -> tuple[int, int] | None:
        """(offload checksum, restored checksum) if the last onload restored different bytes than the last offload
        saw, else None (also when there is nothing to compare). Waits for the restore's copy."""
        expected, restored = self._offload_checksum, self._restored_checksum
        if expected is None or restored is None:
            return None
        self.wait()
        want, got = int(expected.item()), int(restored.item())
        return None if want == got else (want, got)

    def clear_checksums(self) -> None:
        self._offload_checksum = None
        self._restored_checksum = None

    def revert_onload(self, state: BucketState) -> None:
        """Frees the device storage again after an onload whose contents must not be used; the host store (and
        the offload checksum) are kept, so the bucket is exactly as it was before that onload."""
        self.wait()
        self._free_storage()
        self._pending = None
        self._pending_state = None
        self._restored_checksum = None
        self._state = state

    def _check_members_restored(self, revert_to: BucketState) -> None:
        """The members' check of an onload, made while its copy runs (a pass over every member takes a while with
        many tensors); a refusal frees the restored storage again."""
        try:
            self._check_members("onload")
        except MemmgrStateError:
            self.revert_onload(revert_to)
            raise

    def _check_restored(self, revert_to: BucketState) -> None:
        mismatch = self.checksum_mismatch()
        if mismatch is None:
            self.clear_checksums()
            return
        self.revert_onload(revert_to)
        raise moves.corruption_error(f"bucket {self.name!r}", [(self, mismatch)])

    def outside_references(self) -> int:
        """References to this bucket's storage beyond the bucket and its members (0 for an adopted buffer, whose
        views are the owner's business): a tensor autograd saved for backward, or a view someone kept."""
        if self.members and self.members[0][1] is self.flat:
            return 0
        if self.flat.untyped_storage().nbytes() == 0:
            return 0
        hidden = self.members.hidden_base_count(self.flat)
        return max(0, storage_use_count(self.flat) - PROBE_REFS - 1 - len(self.members) - hidden)

    def release_host_buffer(self) -> None:
        """Returns the host store to the pool (only while the contents are on the device)."""
        if self.state is not BucketState.ON_DEVICE:
            raise MemmgrStateError(f"bucket {self.name!r} is {self._state.value}: its host buffer holds the only "
                                   f"copy; onload before releasing it")
        if self._host is not None:
            self._pool.release(self._host)
            self._host = None

    def unmanage(self) -> None:
        """Stops managing this bucket (only while on the device): the host store returns to the pool and the
        storage is no longer registered, so its tensors, still views of it, can be managed again (a new manager
        coalesces them afresh). The bucket is empty afterwards."""
        self.release_host_buffer()
        self._released = True
        self._drop_finalizer.detach()  # nothing left to put back, and the finalizer would keep the old flat alive
        storages.unregister(self._storage_key, self)
        self.members.clear()
        if self._same_address is not None:
            # the members' storage keeps its range while it holds memory; a later resize of it goes to PyTorch
            self._same_address.disown(self.flat)
            self._same_address = None
        self.flat = self.flat.new_empty(0)
        self.nbytes = 0
        self._storage_key = storages.storage_key(self.flat)

    def __repr__(self) -> str:
        return (f"FlatTensors({self.name!r}, {len(self.members)} tensors, {self.nbytes} B, {self.dtype}, "
                f"{self.device}, {self.state.value})")
