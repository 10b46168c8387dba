"""Budgeted offload: free at least N bytes of GPU memory, cheapest state first, whole buckets at a time.

``mgr.free(N)`` picks buckets in offload-priority order (discardable gradients, then optimizer states, main weights,
weights; ``MemoryManager`` priorities), within a group from its last bucket backwards (so a model's first layers,
which a forward needs first, stay longest), and stops as soon as the chosen buckets hold at least N bytes of device
storage. Greedy in that order, the plan moves less than N plus one bucket.
It returns an ``OffloadPlan``: the list of (group, bucket, bytes, discard?) it moved, which ``plan.onload()`` restores
exactly (``mgr.onload()`` restores every bucket that is off, planned or not). ``mgr.plan_offload(N)`` computes the
same plan without moving anything (a dry run).

A group with some buckets off and others on is ``GroupState.PARTIAL`` (``"partial"`` in ``mgr.state``).

The planning itself (``plan_units``) is pure bookkeeping over ``Candidate`` rows, so it is tested without a GPU. This
module reaches the manager through its public methods only (``entries``, ``prepare_offload``, ``group_names``,
``offload_units``, ``onload_units``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

from memmgr import arguments
from memmgr.errors import MemmgrInputError, MemmgrStateError
from memmgr.groups import MovableUnit, check_unit_unreferenced
from memmgr.states import Policy
from memmgr.transfer import TransferHandle

if TYPE_CHECKING:  # pragma: no cover
    from memmgr.manager import MemoryManager

logger = logging.getLogger("memmgr")


class MemmgrBudgetError(MemmgrInputError):
    """A budget cannot be met: the managed state on the device holds fewer bytes than asked for."""

    def __init__(self, message: str, *, budget_bytes: int, available_bytes: int):
        super().__init__(message)
        self.budget_bytes = budget_bytes
        self.available_bytes = available_bytes


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
    manager: "MemoryManager | None" = field(default=None, repr=False)
    units: dict[str, MovableUnit] = field(default_factory=dict, repr=False)  # bucket name -> unit

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
        arguments.boolean("OffloadPlan.onload", "non_blocking", non_blocking)
        if self.dry_run:
            raise MemmgrStateError("this plan is a dry run (plan_offload); nothing was moved, so nothing to onload. "
                                   "Apply it with memmgr.budget.apply_plan, or call mgr.free(nbytes)")
        if self.manager is None:
            raise MemmgrStateError("this plan has no manager to onload through; build it with mgr.plan_offload")
        units = [self.units[i.bucket] for i in reversed(self.items)]
        names = tuple(self.groups[::-1])
        return self.manager.onload_units(units, groups=names, label=f"onload plan {','.join(names)}",
                                         non_blocking=non_blocking)

    def describe(self) -> str:
        lines = [f"offload plan: budget {self.budget_bytes} B, {len(self.items)} bucket(s), {self.planned_bytes} B "
                 f"({self.discarded_bytes} B discarded, {self.copied_bytes} B copied)"
                 + (f", SHORT by {self.shortfall_bytes} B" if self.shortfall_bytes else "")
                 + (" [dry run]" if self.dry_run else "")]
        lines += [f"  {i.group:>20s} {i.bucket:<30s} {i.nbytes:>14d} B {'discard' if i.discard else 'copy'}"
                  for i in self.items]
        return "\n".join(lines)


def _candidates(mgr: "MemoryManager", groups: Iterable[str] = ()) -> tuple[list[Candidate], dict[str, MovableUnit]]:
    cands: list[Candidate] = []
    units: dict[str, MovableUnit] = {}
    for entry in mgr.entries(*groups):
        for idx, unit in enumerate(entry.group.units):
            if not unit.state.holds_device_memory:
                continue
            if unit.name in units:
                raise MemmgrStateError(f"two units are both named {unit.name!r}; budgeted offload needs unique "
                                       f"bucket names")
            cands.append(Candidate(entry.name, unit.name, int(unit.device_bytes), unit.policy is Policy.DISCARD,
                                   entry.priority, entry.index, idx))
            units[unit.name] = unit
    return cands, units


def plan_offload(mgr: "MemoryManager", budget_bytes: int, groups: Iterable[str] = ()) -> OffloadPlan:
    """The plan ``mgr.free(budget_bytes)`` would carry out now, without moving anything (a dry run). Tensors a
    group's ``collect`` would add at the next offload are not in it yet."""
    budget_bytes = arguments.integer("plan_offload", "budget_bytes", budget_bytes, minimum=0)
    groups = arguments.names("plan_offload", "groups", groups)
    cands, units = _candidates(mgr, groups)
    chosen, available = plan_units(cands, budget_bytes)
    items = [PlanItem(c.group, c.unit, c.nbytes, c.discard) for c in chosen]
    return OffloadPlan(budget_bytes, items, available, dry_run=True, manager=mgr,
                       units={i.bucket: units[i.bucket] for i in items})


def offload_budget(mgr: "MemoryManager", budget_bytes: int, groups: Iterable[str] = (), *,
                   non_blocking: bool = False, strict: bool = True) -> OffloadPlan:
    """Frees at least ``budget_bytes`` of the manager's device memory, cheapest buckets first, and returns the plan
    it carried out. With ``strict`` (default) a budget larger than all the managed state on the device raises
    MemmgrBudgetError before anything moves; otherwise everything available is moved and ``shortfall_bytes`` says
    by how much the budget was missed."""
    groups = arguments.names("offload_budget", "groups", groups)
    arguments.integer("offload_budget", "budget_bytes", budget_bytes, minimum=0)
    arguments.boolean("offload_budget", "strict", strict)
    mgr.prepare_offload(*groups)
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
    arguments.instance("apply_plan", "plan", plan, OffloadPlan)
    arguments.boolean("apply_plan", "non_blocking", non_blocking)
    if not plan.dry_run:
        raise MemmgrStateError("this plan was carried out already; compute a new one")
    if plan.manager is None:
        raise MemmgrStateError("this plan has no manager to offload through; build it with mgr.plan_offload")
    units = [plan.units[i.bucket] for i in plan.items]
    for item, unit in zip(plan.items, units):
        if not unit.state.holds_device_memory:
            raise MemmgrStateError(f"bucket {item.bucket!r} of group {item.group!r} is no longer on the device; "
                                   f"the plan is stale, compute a new one")
        check_unit_unreferenced(item.group, unit)
    discard = {id(unit): item.discard for item, unit in zip(plan.items, units)}
    plan.handle = plan.manager.offload_units(units, groups=tuple(plan.groups),
                                             label=f"offload budget {plan.budget_bytes}",
                                             discard=lambda unit: discard[id(unit)], non_blocking=non_blocking)
    plan.dry_run = False
    logger.info("budgeted offload: %d bucket(s), %d bytes for a budget of %d", len(plan.items), plan.planned_bytes,
                plan.budget_bytes)
    return plan
