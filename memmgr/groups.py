"""What the manager moves: units (a bucket, or a group that moves as a whole) and the groups made of them.

A **unit** is the smallest thing that moves: a ``FlatTensors`` bucket, or a ``DroppedTensors`` group, which drops
references instead of copying. A **group** is a named set of units (``BucketizedFlatTensors``: its buckets;
``DroppedTensors``: itself). The move transaction (``memmgr.moves``) and the manager know units and groups only
through these two protocols.
"""
from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable

import torch

from memmgr.errors import MemmgrStateError
from memmgr.states import BucketState, GroupState, Policy
from memmgr.transfer import TransferHandle

# Lower moves first on offload (frees memory soonest, copies least) and last on onload.
DEFAULT_PRIORITY = {
    "grads": 0, "grad_buffers": 0,
    "optimizer_states": 10,
    "main_weights": 20,
    "weights": 30,
}


@runtime_checkable
class MovableUnit(Protocol):
    """One unit of movement. ``begin_offload``/``abandon_offload`` let an offload issue every unit's copy before it
    checks them (``check_intact``) and frees any (a unit with nothing to copy ahead returns False: ``ContentlessUnit``);
    ``allocate``/``onload``/``revert_onload`` let a transaction bring several units back and undo all of them if one
    fails; ``checksum_mismatch`` reports what opt-in verification found."""

    name: str
    policy: Policy

    @property
    def state(self) -> BucketState: ...

    @property
    def nbytes(self) -> int: ...

    @property
    def device_bytes(self) -> int: ...

    @property
    def device(self) -> torch.device | None: ...

    def begin_offload(self, discard: bool | None = None) -> bool: ...

    def abandon_offload(self) -> None: ...

    def offload(self, non_blocking: bool = False, discard: bool | None = None) -> TransferHandle: ...

    def allocate(self) -> bool: ...

    def onload(self, non_blocking: bool = False, *, zero_after: torch.cuda.Event | None = None) -> TransferHandle:
        """``zero_after``: where a unit that comes back re-zeroed may be zeroed from, instead of behind the work the
        current stream holds now (a transaction passes the start of its onload, so that the zeroing runs while the
        copies do)."""
        ...

    def revert_onload(self, state: BucketState) -> None: ...

    def checksum_mismatch(self) -> tuple[int, int] | None: ...

    def clear_checksums(self) -> None: ...

    def outside_references(self) -> int: ...

    def check_intact(self, moving: str = "offload") -> None: ...


_UNIT_MEMBERS = tuple(MovableUnit.__annotations__) + tuple(
    name for name in vars(MovableUnit) if not name.startswith("_"))


def is_movable_unit(value: object) -> bool:
    """``isinstance(value, MovableUnit)`` without reading the unit's properties (a runtime protocol check reads every
    one on Python 3.11, and a bucket's ``device_bytes`` walks all its members): each member is looked up on the type
    or in the instance's own attributes."""
    cls, own = type(value), getattr(value, "__dict__", {})
    return all(hasattr(cls, member) or member in own for member in _UNIT_MEMBERS)


@runtime_checkable
class StateGroup(Protocol):
    """A named group of units, as the manager holds it."""

    name: str
    policy: Policy

    @property
    def units(self) -> list[MovableUnit]: ...

    @property
    def nbytes(self) -> int: ...

    @property
    def device_bytes(self) -> int: ...

    @property
    def host_bytes(self) -> int: ...

    @property
    def named_tensors(self) -> list[tuple[str, torch.Tensor]]: ...

    def offload(self, non_blocking: bool = False, discard: bool | None = None) -> TransferHandle: ...

    def onload(self, non_blocking: bool = False) -> TransferHandle: ...

    def release_host_buffers(self) -> None: ...

    def unmanage(self) -> None: ...


def group_state(group: StateGroup) -> GroupState:
    """Where the group's units are (PARTIAL when some are on the device and others off)."""
    return GroupState.of(unit.state for unit in group.units)


def check_unit_unreferenced(group: str, unit: MovableUnit) -> None:
    """Raises MemmgrStateError, before anything moves, if memory of ``unit`` (of group ``group``) is still referenced
    from outside the group (tensors autograd saved for an unfinished backward, a view someone kept): freeing it
    would corrupt them."""
    extra = unit.outside_references()
    if extra:
        raise MemmgrStateError(
            f"group {group!r}: bucket {unit.name!r} is still referenced {extra} time(s) from outside the group, "
            f"typically by tensors autograd saved for the backward pass of an unfinished step (or a view you kept). "
            f"Finish backward (or drop the graph / the view) before offloading. Nothing was moved")


def check_no_outside_references(group: StateGroup) -> None:
    """``check_unit_unreferenced`` for every unit of ``group``."""
    for unit in group.units:
        check_unit_unreferenced(group.name, unit)


def default_priority(name: str, policy: Policy) -> int:
    if name in DEFAULT_PRIORITY:
        return DEFAULT_PRIORITY[name]
    return 0 if policy is Policy.DISCARD else 15


def unique_storage_bytes(tensors: Iterable[torch.Tensor], exclude: set[int] = frozenset()) -> int:
    """Bytes of the distinct storages behind ``tensors`` (each counted once), leaving out storages whose address is
    in ``exclude`` (memory another group already accounts for)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if storage.nbytes() == 0 or ptr in seen or ptr in exclude:
            continue
        seen.add(ptr)
        total += storage.nbytes()
    return total


class ContentlessUnit:
    """The unit steps of a unit that has no contents to copy, checksum or check: a group that drops references
    (``DroppedTensors``) or releases communicators (``memmgr.comms.NcclCommunicators``). Subclasses provide
    ``offload``, ``onload``, ``revert_onload`` and ``state``."""

    def begin_offload(self, discard: bool | None = None) -> bool:
        return False  # no copy to issue ahead: offload does it all

    def abandon_offload(self) -> None:
        return None

    def allocate(self) -> bool:
        return False

    def checksum_mismatch(self) -> tuple[int, int] | None:
        return None

    def clear_checksums(self) -> None:
        return None

    def outside_references(self) -> int:
        return 0

    def check_intact(self, moving: str = "offload") -> None:
        return None

    def release_host_buffers(self) -> None:
        return None

    def unmanage(self) -> None:
        return None

    @property
    def host_bytes(self) -> int:
        return 0


class DroppedTensors(ContentlessUnit):
    """A discard group, and its own single unit, whose offload drops references (``.grad`` attributes, cache
    entries) instead of copying; the framework re-creates the tensors when it next needs them, as it would after
    ``zero_grad(set_to_none=True)``.

    Subclasses say which tensors the group holds (``held_tensors``), how to drop them (``drop``) and, optionally,
    which storages belong to another group (``excluded_storages``: e.g. gradients that view a flat gradient buffer
    free nothing)."""

    policy = Policy.DISCARD

    def __init__(self, name: str):
        self.name = name
        self._dropped = False

    # ---- what a subclass provides ----
    def held_tensors(self) -> list[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def drop(self) -> None:
        raise NotImplementedError

    def excluded_storages(self) -> set[int]:
        return set()

    # ---- the unit ----
    @property
    def units(self) -> list["DroppedTensors"]:
        return [self]

    def offload(self, non_blocking: bool = False, discard: bool | None = None) -> TransferHandle:
        self.drop()
        self._dropped = True
        return TransferHandle.completed()

    def onload(self, non_blocking: bool = False, *, zero_after: torch.cuda.Event | None = None) -> TransferHandle:
        self._dropped = False
        return TransferHandle.completed()

    def revert_onload(self, state: BucketState) -> None:
        self._dropped = state is BucketState.DISCARDED

    def recreated(self) -> None:
        """Ends the drop: the framework re-created the tensors (a backward ran with the group left off). A subclass
        that can see the re-creation calls it then; ``state`` calls it when it finds device memory held."""
        self._dropped = False

    @property
    def state(self) -> BucketState:
        """DISCARDED from the offload that dropped the tensors until the framework re-creates them (a backward with
        the group left off) or an onload; ON_DEVICE otherwise, so that the next offload drops re-created ones."""
        if self._dropped and self.device_bytes > 0:
            self.recreated()
        return BucketState.DISCARDED if self._dropped else BucketState.ON_DEVICE

    @property
    def device(self) -> torch.device | None:
        devices = {t.device for _, t in self.held_tensors()}
        return devices.pop() if len(devices) == 1 else None

    @property
    def nbytes(self) -> int:
        return self.device_bytes

    @property
    def device_bytes(self) -> int:
        return unique_storage_bytes((t for _, t in self.held_tensors()), self.excluded_storages())

    @property
    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return self.held_tensors()
