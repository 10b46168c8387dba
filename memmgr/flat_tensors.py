"""Groups of tensors that move between GPU and host memory as a whole: ``BucketizedFlatTensors``.

A group coalesces its tensors once into flat buckets (``memmgr.bucket.FlatTensors``, one device and dtype each, at
most ``bucket_size_mb``) or adopts flat buffers its caller owns, and moves them through ``memmgr.moves``: its offload
issues every bucket's copy, its onload is one ``OnloadTransaction`` (undone as a whole on out-of-memory or a checksum
mismatch). ``recollect`` keeps a group in step with the tensors its owner holds now (optimizer state created lazily or
replaced by a ``load_state_dict``). What a bucket does on a move is described in ``memmgr.bucket``; what is checked
before tensors are coalesced, in ``memmgr.tensor_checks``.

This module also re-exports the names other modules import from it: ``FlatTensors``, ``TensorsArg``,
``tensors_argument``, ``validate_tensors``, ``Policy`` and ``bucket_checksum``.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, Sequence

import torch

from memmgr import arguments, moves, storages
from memmgr.bucket import FlatTensors
from memmgr.checksum import bucket_checksum
from memmgr.errors import MemmgrInputError, MemmgrStateError
from memmgr.host_memory import HostMemoryPool, default_pool
from memmgr.states import BucketState, GroupState, Policy, policy_from
from memmgr.tensor_checks import (TensorsArg, check_buffers_adoptable, describe_tensor, name_tensors, tensors_argument,
                                  validate_tensors)
from memmgr.transfer import TransferHandle

__all__ = ["BucketizedFlatTensors", "DEFAULT_BUCKET_SIZE_MB", "FlatTensors", "Policy", "TensorsArg", "bucket_checksum",
           "tensors_argument", "validate_tensors"]

logger = logging.getLogger("memmgr")

# An onload allocates each bucket (a cudaMalloc, once the offload gave PyTorch's cache back) while the bucket before it
# copies. Right after another process's release, each of those allocations slows the copy kernel beside it: a 16 GiB
# onload there ran at 0.89-0.90x of the pinned peak with 256 MiB buckets and at 0.91x with 1 GiB ones, against
# 0.91-0.92x for the kernel copying the same bytes into memory held throughout (onload_timeline.py, H200_SESSION7.md).
# Coalescing needs one bucket of extra device memory at a time.
DEFAULT_BUCKET_SIZE_MB = 1024


class BucketizedFlatTensors:
    """A group of tensors of any devices and dtypes, coalesced into flat buckets of at most ``bucket_size_mb``.

    Tensors are grouped by (device, dtype) in the order given; a tensor larger than the bucket size gets a bucket of
    its own. Coalescing needs at most one bucket of extra memory at a time.
    """

    def __init__(self, tensors: TensorsArg, bucket_size_mb: float = DEFAULT_BUCKET_SIZE_MB, *, name: str = "tensors",
                 policy: Policy | str = Policy.COPY, pool: HostMemoryPool | None = None, align_bytes: int = 64,
                 pin_ahead: bool = True, verify: bool = False, same_address: bool = False):
        arguments.string("BucketizedFlatTensors", "name", name)
        where = f"group {name!r}"
        self._verify = arguments.boolean(where, "verify", verify)
        # every CUDA bucket's memory keeps its address across moves (memmgr.bucket), those added later too
        self.same_address = arguments.boolean(where, "same_address", same_address)
        arguments.boolean(where, "pin_ahead", pin_ahead)
        bucket_size_mb = arguments.number(where, "bucket_size_mb", bucket_size_mb, positive=True, maximum=2.0**40)
        self.name = name
        self.policy = policy_from(policy, name)
        self.bucket_size_bytes = max(1, int(bucket_size_mb * 2**20))
        self._pool = arguments.instance(where, "pool", pool, HostMemoryPool, optional=True) or default_pool()
        self._align_bytes = arguments.integer(where, "align_bytes", align_bytes, minimum=1, maximum=1 << 30)
        self.buckets: list[FlatTensors] = []
        self.extend(tensors, pin_ahead=pin_ahead)

    _released = False  # set by unmanage(): the group holds nothing any more and refuses to move

    def check_open(self, where: str = "") -> None:
        """Raises MemmgrStateError once the group was released by ``unmanage()`` (its manager closed): whatever kept
        it (an exporter, a second reference) must be built again from the manager that manages the tensors now."""
        if self._released:
            raise MemmgrStateError(f"{where + ': ' if where else ''}group {self.name!r} was released when its "
                                   f"manager was closed (mgr.close()); it no longer holds its tensors. Use the new "
                                   f"manager's group instead (new_mgr.group({self.name!r})) and build what kept "
                                   f"this one (an exporter, say) again from it")

    @classmethod
    def from_buffers(cls, buffers: TensorsArg, *, name: str, policy: Policy | str = Policy.COPY,
                     pool: HostMemoryPool | None = None, pin_ahead: bool = True, verify: bool = False,
                     same_address: bool = False) -> "BucketizedFlatTensors":
        """Adopts flat buffers the caller owns, one bucket each, without copying (see FlatTensors.adopt; with
        ``same_address`` each buffer's memory moves once into memmgr's own address range)."""
        arguments.string("BucketizedFlatTensors.from_buffers", "name", name)
        arguments.boolean(f"group {name!r}", "pin_ahead", pin_ahead)
        group = cls([], name=name, policy=policy, pool=pool, verify=verify, same_address=same_address)
        items = name_tensors(buffers, name)
        check_buffers_adoptable(items, name)
        for bname, buffer in items:
            group.buckets.append(FlatTensors.adopt(buffer, name=bname, policy=group.policy, pool=group._pool,
                                                   verify=group.verify, same_address=group.same_address))
        if pin_ahead:
            group.ensure_host_buffers()
        return group

    def extend(self, tensors: TensorsArg, pin_ahead: bool = True) -> list[FlatTensors]:
        """Coalesces more tensors into new buckets (e.g. optimizer state created after the group was built)."""
        arguments.boolean(f"group {self.name!r} extend", "pin_ahead", pin_ahead)
        items = name_tensors(tensors, self.name)
        if not items:
            return []
        if self.buckets and self.state is not GroupState.ON_DEVICE:
            raise MemmgrStateError(f"group {self.name!r} is {self.state.value}; add tensors while it is on device")
        existing = {id(t): n for n, t in self.named_tensors}
        for tname, tensor in items:
            if id(tensor) in existing:
                raise MemmgrInputError(f"group {self.name!r}: {describe_tensor(tname, tensor)} is already in the group "
                                       f"as {existing[id(tensor)]!r}")
        validate_tensors(items, self.name)
        by_key: "OrderedDict[tuple[torch.device, torch.dtype], list[tuple[str, torch.Tensor]]]" = OrderedDict()
        for item in items:
            by_key.setdefault((item[1].device, item[1].dtype), []).append(item)
        new: list[FlatTensors] = []
        for (_device, _dtype), group_items in by_key.items():
            chunk: list[tuple[str, torch.Tensor]] = []
            chunk_bytes = 0
            for item in group_items:
                nbytes = -(-item[1].numel() * item[1].element_size() // self._align_bytes) * self._align_bytes
                if chunk and chunk_bytes + nbytes > self.bucket_size_bytes:
                    new.append(self._coalesce(chunk, len(self.buckets) + len(new)))
                    chunk, chunk_bytes = [], 0
                chunk.append(item)
                chunk_bytes += nbytes
            if chunk:
                new.append(self._coalesce(chunk, len(self.buckets) + len(new)))
        self.buckets.extend(new)
        if pin_ahead and self.policy is Policy.COPY:
            for bucket in new:
                bucket.ensure_host_buffer()
        return new

    def _coalesce(self, chunk: list[tuple[str, torch.Tensor]], index: int) -> FlatTensors:
        return FlatTensors.coalesce(chunk, name=f"{self.name}/{index}", policy=self.policy, pool=self._pool,
                                    align_bytes=self._align_bytes, verify=self.verify, same_address=self.same_address)

    @property
    def verify(self) -> bool:
        """Checksum each bucket at offload and check it at onload (MemmgrCorruptionError on a mismatch). May be set
        at any time; it applies from the next offload, to every bucket (also those added later)."""
        return getattr(self, "_verify", False)

    @verify.setter
    def verify(self, value: bool) -> None:
        self._verify = arguments.boolean(f"group {self.name!r}", "verify", value)
        for bucket in self.buckets:
            bucket.verify = self._verify

    def ensure_host_buffers(self) -> None:
        for bucket in self.buckets:
            if bucket.policy is Policy.COPY:
                bucket.ensure_host_buffer()

    # ---- moves ----
    @property
    def units(self) -> list[FlatTensors]:
        return list(self.buckets)

    def offload(self, non_blocking: bool = False, discard: bool | None = None) -> TransferHandle:
        self.check_open("offload")
        arguments.boolean(f"group {self.name!r} offload", "non_blocking", non_blocking)
        arguments.boolean(f"group {self.name!r} offload", "discard", discard, optional=True)
        handle = moves.offload_units(self.buckets, discard=lambda _bucket: discard)
        if not non_blocking:
            handle.wait()
        return handle

    def onload(self, non_blocking: bool = False) -> TransferHandle:
        """Restores every bucket; if the GPU runs out of memory, frees what this call allocated and raises
        MemmgrOutOfMemoryError with the host copies intact, so a retry after freeing memory succeeds."""
        self.check_open("onload")
        arguments.boolean(f"group {self.name!r} onload", "non_blocking", non_blocking)
        if not any(not b.state.holds_device_memory for b in self.buckets):
            logger.debug("group %s is already %s; onload is a no-op", self.name, self.state.value)
        return moves.onload_units(self.buckets, what=f"group {self.name!r}", group=self.name,
                                  non_blocking=non_blocking)

    def wait(self) -> None:
        for bucket in self.buckets:
            bucket.wait()

    # ---- introspection ----
    @property
    def state(self) -> GroupState:
        return GroupState.of(b.state for b in self.buckets)

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [m[1] for b in self.buckets for m in b.members]

    @property
    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [(m[0], m[1]) for b in self.buckets for m in b.members]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    @property
    def device_bytes(self) -> int:
        return sum(b.device_bytes for b in self.buckets)

    @property
    def host_bytes(self) -> int:
        return sum(b.host_bytes for b in self.buckets)

    @property
    def devices(self) -> list[torch.device]:
        return sorted({b.device for b in self.buckets}, key=str)

    @property
    def device(self) -> torch.device | None:
        devices = self.devices
        return devices[0] if len(devices) == 1 else None

    def require_on_device(self) -> None:
        """Raises MemmgrStateError unless every bucket is on the device (use before touching the tensors)."""
        self.check_open("require_on_device")
        state = self.state
        if state not in (GroupState.ON_DEVICE, GroupState.ONLOADING):
            raise MemmgrStateError(f"group {self.name!r} is {state.value}: its tensors have no device memory "
                                   f"behind them; call onload() before using them")

    def release_host_buffers(self) -> None:
        for bucket in self.buckets:
            bucket.release_host_buffer()

    def drop_buckets(self, buckets: Sequence[FlatTensors]) -> None:
        """Stops managing these buckets (on the device; e.g. optimizer state that a ``load_state_dict`` replaced):
        their host stores go back to the pool and they leave the group."""
        buckets = arguments.sequence_of(f"group {self.name!r} drop_buckets", "buckets", buckets, FlatTensors,
                                        "a bucket of this group (FlatTensors)")
        foreign = [b.name for b in buckets if all(b is not mine for mine in self.buckets)]
        if foreign:
            raise MemmgrInputError(f"group {self.name!r} drop_buckets: {foreign} are not buckets of this group; "
                                   f"pass buckets from its .buckets")
        drop = {id(b) for b in buckets}
        for bucket in buckets:
            bucket.unmanage()
        self.buckets = [b for b in self.buckets if id(b) not in drop]

    def recollect(self, current: TensorsArg,
                  check_new: Callable[[dict[str, torch.Tensor]], None] | None = None) -> None:
        """Brings the group in step with ``current``, the tensors its owner holds now (only while the group is wholly
        on the device): buckets none of whose tensors are in ``current`` any more (optimizer state a ``load_state_dict``
        replaced) leave the group; tensors that view one of the group's buckets (state rebuilt over the same memory)
        join that bucket without a copy; tensors that view a bucket of another group stay with it; the rest are
        coalesced into new buckets, after ``check_new`` (given the new tensors by name) raised nothing. Called on
        every offload (``MemoryManager.collect``), so it does not check the group's state itself: the manager calls
        it only for a group wholly on the device, and ``extend`` refuses new tensors otherwise."""
        current = tensors_argument(current, self.name)
        items = list(current.items()) if isinstance(current, dict) else [(None, t) for t in current]
        held = {id(t) for t in self.tensors}
        own = {b.storage_key: b for b in self.buckets}
        new: dict[str, torch.Tensor] = {}
        for i, (n, t) in enumerate(items):
            if id(t) in held or not isinstance(t, torch.Tensor):
                continue
            name = n if n is not None else f"{self.name}+{i}"
            owner = storages.owner_of(t)
            if owner is None:
                new[name] = t
            elif own.get(owner.storage_key) is owner:
                owner.add_alias(name, t)
        current_ids = {id(t) for _, t in items}
        stale = [b for b in self.buckets if b.members and not any(id(m[1]) in current_ids for m in b.members)]
        if stale:
            self.drop_buckets(stale)
            logger.info("group %s: %d bucket(s) no longer hold any of its tensors (replaced, e.g. by a "
                        "load_state_dict) and were released", self.name, len(stale))
        if new:
            if check_new is not None:
                check_new(new)
            self.extend(new)
            logger.debug("group %s picked up %d new tensors", self.name, len(new))

    def unmanage(self) -> None:
        """Stops managing the group's tensors (every bucket must be on the device): host stores go back to the pool,
        the buckets are dropped, and the tensors can be managed again by a new group or manager."""
        for bucket in self.buckets:
            if bucket.state is not BucketState.ON_DEVICE:
                raise MemmgrStateError(f"group {self.name!r}: bucket {bucket.name!r} is {bucket.state.value}; onload "
                                       f"the group before releasing it")
        for bucket in self.buckets:
            bucket.unmanage()
        self.buckets = []
        self._released = True

    def __len__(self) -> int:
        return len(self.buckets)

    def __repr__(self) -> str:
        devices = ",".join(str(d) for d in self.devices) or "-"
        return (f"BucketizedFlatTensors({self.name!r}, {len(self.tensors)} tensors in {len(self.buckets)} buckets, "
                f"{self.nbytes / 2**20:.1f} MiB on {devices}, {self.policy.value}, {self.state.value})")
