"""Budgeted offload: free at least N bytes of GPU memory, cheapest state first, whole buckets at a time.

``mgr.offload(budget_bytes=N)`` (or ``mgr.free(N)``) picks buckets in offload-priority order (discardable gradients,
then optimizer states, main weights, weights; ``MemoryManager`` priorities), within a group from its last bucket
backwards (so a model's first layers, which a forward needs first, stay longest), and stops as soon as the chosen
buckets hold at least N bytes of device storage. Greedy in that order, the plan moves less than N plus one bucket.
It returns an ``OffloadPlan``: the list of (group, bucket, bytes, discard?) it moved, which ``plan.onload()`` restores
exactly (``mgr.onload()`` restores every bucket that is off, planned or not). ``mgr.plan_offload(N)`` computes the
same plan without moving anything (a dry run).

A group with some buckets off and others on reports the state ``"partial"`` in ``mgr.state()``
(``PARTIAL`` here); ``group_state`` gives the same for any group.

The planning itself (``plan_units``) is pure bookkeeping over ``Candidate`` rows, so it is tested without a GPU.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import torch

from memmgr.errors import MemmgrInputError, MemmgrOutOfMemoryError, MemmgrStateError
from memmgr.flat_tensors import BucketizedFlatTensors, BucketState, FlatTensors, Policy
from memmgr.transfer import TransferHandle

if TYPE_CHECKING:  # pragma: no cover
    from memmgr.manager import MemoryManager

logger = logging.getLogger("memmgr")

PARTIAL = "partial"  # a group with some buckets on the device and some off (no BucketState for it yet)


class MemmgrBudgetError(MemmgrInputError):
    """A budget cannot be met: the managed state on the device holds fewer bytes than asked for."""

    def __init__(self, message: str, *, budget_bytes: int, available_bytes: int):
        super().__init__(message)
        self.budget_bytes = budget_bytes
        self.available_bytes = available_bytes


# ---------------------------------------------------------------- states of groups with buckets off
def group_state(group: Any) -> str:
    """The group's state as a string: a BucketState value, or ``"partial"`` when some buckets are on the device and
    others off (where ``group.state`` raises MemmgrStateError)."""
    try:
        return group.state.value
    except MemmgrStateError:
        return PARTIAL


def bucket_states(group: Any) -> dict[str, str]:
    """bucket name -> state value (a group without buckets reports itself as one entry)."""
    buckets = getattr(group, "buckets", None)
    if buckets is None:
        return {group.name: group_state(group)}
    return {b.name: b.state.value for b in buckets}


def holds_device_memory(group: Any) -> bool:
    """True if any of the group's memory is (or is becoming) resident on the device."""
    return group_state(group) in (BucketState.ON_DEVICE.value, BucketState.ONLOADING.value, PARTIAL)


# ---------------------------------------------------------------- the units a plan moves
def units_of(group: Any) -> list[Any]:
    """The movable units of a group: its buckets (BucketizedFlatTensors), or the group itself as one unit (e.g.
    DroppedGradients, which has no buckets)."""
    if isinstance(group, BucketizedFlatTensors):
        return list(group.buckets)
    return [group]


def unit_name(unit: Any) -> str:
    return unit.name


def unit_on_device(unit: Any) -> bool:
    if isinstance(unit, FlatTensors):
        return unit.state in (BucketState.ON_DEVICE, BucketState.ONLOADING)
    return holds_device_memory(unit)


@dataclass(frozen=True)
class Candidate:
    """One unit that could be offloaded: pure data, so planning is testable without tensors."""

    group: str
    unit: str
    nbytes: int          # device bytes it holds now (what offloading it frees)
    discard: bool
    priority: int       # the group's offload priority (lower moves first)
    group_index: int    # the group's registration index (ties)
    unit_index: int     # position of the unit inside its group


@dataclass(frozen=True)
class PlanItem:
    group: str
    bucket: str
    nbytes: int
    discard: bool

    def as_tuple(self) -> tuple[str, str, int, bool]:
        return (self.group, self.bucket, self.nbytes, self.discard)


def plan_units(candidates: Sequence[Candidate], budget_bytes: int) -> tuple[list[Candidate], int]:
    """Chooses candidates cheapest first until they hold at least ``budget_bytes``.

    Order: discardable units before copied ones within the same priority, lower priority first, earlier group
    first, and within a group the last unit first. Returns (chosen, bytes available in all candidates). The chosen
    units hold >= budget_bytes when enough are available, and less than budget_bytes plus the last chosen unit.
    """
    if budget_bytes < 0:
        raise MemmgrInputError(f"budget_bytes must be >= 0, got {budget_bytes}")
    ordered = sorted((c for c in candidates if c.nbytes > 0),
                     key=lambda c: (c.priority, not c.discard, c.group_index, -c.unit_index))
    available = sum(c.nbytes for c in ordered)
    chosen: list[Candidate] = []
    total = 0
    for c in ordered:
        if total >= budget_bytes:
            break
        chosen.append(c)
        total += c.nbytes
    return chosen, available


# ---------------------------------------------------------------- plans
@dataclass
class OffloadPlan:
    """What a budgeted offload moves (or, for a dry run, would move): iterate it for (group, bucket, bytes,
    discard?) tuples. ``planned_bytes`` >= ``budget_bytes`` unless ``shortfall_bytes`` says otherwise."""

    budget_bytes: int
    items: list[PlanItem]
    available_bytes: int
    dry_run: bool = True
    handle: TransferHandle | None = None
    _manager: Any = field(default=None, repr=False)
    _units: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def planned_bytes(self) -> int:
        return sum(i.nbytes for i in self.items)

    @property
    def copied_bytes(self) -> int:
        return sum(i.nbytes for i in self.items if not i.discard)

    @property
    def discarded_bytes(self) -> int:
        return sum(i.nbytes for i in self.items if i.discard)

    @property
    def shortfall_bytes(self) -> int:
        return max(0, self.budget_bytes - self.planned_bytes)

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(i.group for i in self.items))

    def __iter__(self) -> Iterator[tuple[str, str, int, bool]]:
        return iter(i.as_tuple() for i in self.items)

    def __len__(self) -> int:
        return len(self.items)

    def done(self) -> bool:
        return self.handle is None or self.handle.done()

    def wait(self) -> None:
        if self.handle is not None:
            self.handle.wait()

    def onload(self, non_blocking: bool = False) -> TransferHandle:
        """Brings back exactly the buckets this plan moved (in reverse: weights first), leaving other off buckets
        where they are. On running out of GPU memory, frees what this call allocated and raises
        MemmgrOutOfMemoryError with the host copies intact."""
        if self.dry_run:
            raise MemmgrStateError("this plan is a dry run (plan_offload); nothing was moved, so nothing to onload. "
                                   "Apply it with mgr.offload(budget_bytes=...) or memmgr.budget.apply_plan")
        mgr = self._manager
        names = tuple(self.groups[::-1])
        if mgr is not None:
            mgr._check_open()
            mgr._fire(_hook("BEFORE_ONLOAD"), names)
        units = [self._units[i.bucket] for i in reversed(self.items)]
        handle = onload_units(units, what=f"plan of {self.budget_bytes} bytes")
        if not non_blocking:
            handle.wait()
            for unit in units:  # opt-in verification (group.verify): compare with the offload checksums
                if isinstance(unit, FlatTensors) and unit._restored_checksum is not None:
                    unit._check_restored(revert_to=BucketState.ON_HOST)
        if mgr is not None:
            mgr._fire(_hook("AFTER_ONLOAD"), names)
            mgr._record(f"onload plan {','.join(names)}")
        return handle

    def describe(self) -> str:
        lines = [f"offload plan: budget {self.budget_bytes} B, {len(self.items)} bucket(s), {self.planned_bytes} B "
                 f"({self.discarded_bytes} B discarded, {self.copied_bytes} B copied)"
                 + (f", SHORT by {self.shortfall_bytes} B" if self.shortfall_bytes else "")
                 + (" [dry run]" if self.dry_run else "")]
        lines += [f"  {i.group:>20s} {i.bucket:<30s} {i.nbytes:>14d} B {'discard' if i.discard else 'copy'}"
                  for i in self.items]
        return "\n".join(lines)


def _hook(name: str) -> Any:
    from memmgr.manager import HookEvent

    return HookEvent[name]


def _candidates(mgr: "MemoryManager", groups: Iterable[str] = ()) -> tuple[list[Candidate], dict[str, Any]]:
    entries = mgr._resolve(groups)
    cands: list[Candidate] = []
    units: dict[str, Any] = {}
    for entry in entries:
        group = entry.group
        for idx, unit in enumerate(units_of(group)):
            if not unit_on_device(unit):
                continue
            name = unit_name(unit)
            if name in units:
                raise MemmgrStateError(f"two units are both named {name!r}; budgeted offload needs unique bucket "
                                       f"names")
            policy = getattr(unit, "policy", group.policy)
            nbytes = int(unit.device_bytes)
            cands.append(Candidate(group.name, name, nbytes, Policy(policy) is Policy.DISCARD, entry.priority,
                                   entry.index, idx))
            units[name] = unit
    return cands, units


def plan_offload(mgr: "MemoryManager", budget_bytes: int, groups: Iterable[str] = ()) -> OffloadPlan:
    """The plan ``offload(budget_bytes=...)`` would carry out now, without moving anything (a dry run). Tensors a
    group's ``collect`` would add at the next offload are not in it yet."""
    mgr._check_open()
    budget_bytes = int(budget_bytes)
    cands, units = _candidates(mgr, groups)
    chosen, available = plan_units(cands, budget_bytes)
    items = [PlanItem(c.group, c.unit, c.nbytes, c.discard) for c in chosen]
    return OffloadPlan(budget_bytes, items, available, dry_run=True, _manager=mgr,
                       _units={i.bucket: units[i.bucket] for i in items})


def offload_budget(mgr: "MemoryManager", budget_bytes: int, groups: Iterable[str] = (), *,
                   non_blocking: bool = False, strict: bool = True) -> OffloadPlan:
    """Frees at least ``budget_bytes`` of the manager's device memory, cheapest buckets first, and returns the plan
    it carried out. With ``strict`` (default) a budget larger than all the managed state on the device raises
    MemmgrBudgetError before anything moves; otherwise everything available is moved and ``shortfall_bytes`` says
    by how much the budget was missed."""
    mgr._check_open()
    groups = tuple(groups)
    for entry in mgr._resolve(groups):
        mgr._collect_new_tensors(entry)
    plan = plan_offload(mgr, budget_bytes, groups)
    if plan.shortfall_bytes and strict:
        raise MemmgrBudgetError(
            f"cannot free {plan.budget_bytes} bytes: the groups {list(groups) or mgr.group_names} hold only "
            f"{plan.available_bytes} bytes on the device; nothing was moved. Ask for less, or pass strict=False to "
            f"move everything available", budget_bytes=plan.budget_bytes, available_bytes=plan.available_bytes)
    return apply_plan(plan, non_blocking=non_blocking)


def apply_plan(plan: OffloadPlan, *, non_blocking: bool = False) -> OffloadPlan:
    """Carries out a plan from ``plan_offload`` (a dry run) and returns it, no longer a dry run. Every unit must still
    be on the device; nothing moves otherwise."""
    if not plan.dry_run:
        raise MemmgrStateError("this plan was carried out already; compute a new one")
    mgr = plan._manager
    units = [plan._units[i.bucket] for i in plan.items]
    for item, unit in zip(plan.items, units):
        if not unit_on_device(unit):
            raise MemmgrStateError(f"bucket {item.bucket!r} of group {item.group!r} is no longer on the device; "
                                   f"the plan is stale, compute a new one")
        extra = unit.outside_references() if isinstance(unit, FlatTensors) else 0
        if extra:
            raise MemmgrStateError(
                f"group {item.group!r}: bucket {item.bucket!r} is still referenced {extra} time(s) from outside the "
                f"group (tensors autograd saved for an unfinished backward, or a view you kept); finish backward "
                f"before offloading. Nothing was moved")
    names = tuple(plan.groups)
    if mgr is not None:
        mgr._fire(_hook("BEFORE_OFFLOAD"), names)
    handles: list[TransferHandle] = []
    for item, unit in zip(plan.items, units):
        if isinstance(unit, FlatTensors):
            handles.append(unit.offload(non_blocking=True, discard=item.discard))
        else:
            handles.append(unit.offload(non_blocking=True))
    handle = TransferHandle.combine(handles)
    if mgr is not None:
        handle.add_done_callback(mgr._release_cached_memory)
        mgr._while_copies_in_flight(names)
    plan.dry_run = False
    plan.handle = handle
    if not non_blocking:
        handle.wait()
    logger.info("budgeted offload: %d bucket(s), %d bytes for a budget of %d", len(plan.items), plan.planned_bytes,
                plan.budget_bytes)
    if mgr is not None:
        mgr._fire(_hook("AFTER_OFFLOAD"), names)
        mgr._record(f"offload budget {plan.budget_bytes}")
    return plan


def onload_units(units: Sequence[Any], what: str = "onload") -> TransferHandle:
    """Onloads units (buckets or whole groups) in the order given, allocating bucket by bucket; on running out of
    GPU memory, frees what this call allocated and raises MemmgrOutOfMemoryError (host copies intact)."""
    handles: list[TransferHandle] = []
    done: list[tuple[FlatTensors, BucketState]] = []
    todo = [u for u in units if not unit_on_device(u)]
    try:
        for unit in todo:
            if isinstance(unit, FlatTensors):
                previous = BucketState.ON_HOST if unit.state is BucketState.OFFLOADING else unit.state
                unit.allocate()
                done.append((unit, previous))
                handles.append(unit.onload(non_blocking=True))
            else:
                handles.append(unit.onload(non_blocking=True))
    except torch.OutOfMemoryError as exc:
        for unit, previous in done:
            unit.revert_onload(previous)
        needed = sum(getattr(u, "nbytes", 0) for u in todo)
        device = next((u.device for u in todo if isinstance(u, FlatTensors)), None)
        free = torch.cuda.mem_get_info(device)[0] if device is not None and device.type == "cuda" else None
        raise MemmgrOutOfMemoryError(
            f"{what}: onload needs {needed} bytes on {device} but only {free if free is not None else 'unknown'} "
            f"bytes are free; nothing was restored and the host copies are intact. Free GPU memory and retry",
            group=what, bytes_needed=needed, bytes_free=free) from exc
    return TransferHandle.combine(handles)
