"""Bidirectional swap: move one state off the GPU while another comes back, on both directions of the link at once,
never holding more GPU memory than the outgoing state frees plus a stated margin.

``swap(out=manager_a, into=manager_b, margin_bytes=M)``:

1. every on-device bucket of A is offloaded, non-blocking, up front (the d2h copy stream runs them in order; each
   bucket's memory can be reused once its copy has completed). Issuing them all first matters: a later offload
   would be ordered after the compute stream, which by then waits on B's copies, and the two directions would run
   one after the other.
2. B's off buckets are then allocated and copied back (h2d copy stream) one by one. Before allocating each, the
   host checks (event queries, and a host wait on A's oldest outstanding copy when needed) that
   ``allocated_B + bucket <= completed_freed_A + M``. So A's d2h copies and B's h2d copies overlap, bucket by
   bucket, and B's allocations reuse the blocks A's finished copies gave back.

The result records the high-water mark of ``allocated_B - completed_freed_A`` in that host bookkeeping (<= M by
construction) and, on a GPU with ``track_torch_peak=True``, the peaks the caching allocator saw during the swap
(allocated, active - which also counts blocks whose copy is still reading them - and reserved), relative to the
start. Tracking resets the allocator's peak statistics, the caller's as well, so it is off unless asked for.

Every copy of the swap, out and in, runs under one copy policy (``memmgr.transfer.CopyPolicy``), read once.

``SwapLedger`` and ``run_swap`` hold the scheduling logic over any units with ``done()``/``wait()`` handles, so it is
tested without a GPU.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from memmgr.budget import MemmgrBudgetError
from memmgr import arguments
from memmgr.errors import MemmgrInputError
from memmgr.groups import MovableUnit, StateGroup, check_no_outside_references
from memmgr.manager import MemoryManager, MoveScope
from memmgr.moves import OnloadTransaction
from memmgr.transfer import TransferHandle, copy_policy_scope, resolve_copy_policy

logger = logging.getLogger("memmgr")


# ---------------------------------------------------------------- bookkeeping (pure)
@dataclass
class SwapLedger:
    """Host bookkeeping of a swap: bytes B allocated, bytes of A whose offload completed, and the high-water mark of
    their difference, which ``allocate`` keeps at or below ``margin_bytes``."""

    margin_bytes: int
    allocated_in: int = 0
    freed_out_completed: int = 0
    high_water: int = 0
    steps: list[tuple[str, int, int]] = field(default_factory=list)  # (event, allocated_in, freed_out_completed)

    def headroom_needed(self, nbytes: int) -> int:
        """Bytes of A's offload that must still complete before ``nbytes`` of B may be allocated."""
        return max(0, self.allocated_in + nbytes - self.freed_out_completed - self.margin_bytes)

    def complete_free(self, nbytes: int) -> None:
        self.freed_out_completed += nbytes
        self.steps.append(("freed", self.allocated_in, self.freed_out_completed))

    def allocate(self, nbytes: int, *, force: bool = False) -> None:
        if not force and self.headroom_needed(nbytes) > 0:
            raise MemmgrInputError(f"allocating {nbytes} bytes now would exceed the swap bound by "
                                   f"{self.headroom_needed(nbytes)} bytes")
        self.allocated_in += nbytes
        self.high_water = max(self.high_water, self.allocated_in - self.freed_out_completed)
        self.steps.append(("allocated", self.allocated_in, self.freed_out_completed))


@dataclass
class SwapUnit:
    """One thing to move: its bytes and a function that starts the move and returns a handle."""

    name: str
    nbytes: int
    start: Callable[[], Any]


@dataclass
class SwapSchedule:
    ledger: SwapLedger
    out_handles: list[Any]
    in_handles: list[Any]
    host_waits: int
    order: list[str]  # "out:<name>" / "wait:<name>" / "in:<name>" in the order they happened


def run_swap(out_units: Sequence[SwapUnit], in_units: Sequence[SwapUnit], margin_bytes: int, *,
             strict: bool = True) -> SwapSchedule:
    """Starts every out unit, then each in unit as soon as the ledger allows (waiting on the oldest outstanding out
    handle when it does not). With ``strict=False`` in units that cannot fit even after every out unit completed
    are started anyway (the high-water mark then says by how much the bound was exceeded)."""
    ledger = SwapLedger(int(margin_bytes))
    order: list[str] = []
    out_handles: list[Any] = []
    pending: list[tuple[SwapUnit, Any]] = []
    for unit in out_units:
        h = unit.start()
        out_handles.append(h)
        pending.append((unit, h))
        order.append(f"out:{unit.name}")

    def poll() -> None:
        still = []
        for unit, h in pending:
            if h.done():
                ledger.complete_free(unit.nbytes)
            else:
                still.append((unit, h))
        pending[:] = still

    host_waits = 0
    in_handles: list[Any] = []
    for unit in in_units:
        poll()
        while ledger.headroom_needed(unit.nbytes) > 0 and pending:
            first, h = pending.pop(0)
            h.wait()
            host_waits += 1
            order.append(f"wait:{first.name}")
            ledger.complete_free(first.nbytes)
            poll()
        if ledger.headroom_needed(unit.nbytes) > 0 and strict:
            raise MemmgrBudgetError(
                f"swap: {unit.name!r} ({unit.nbytes} B) does not fit even after every outgoing bucket completed "
                f"(allocated {ledger.allocated_in} B, freed {ledger.freed_out_completed} B, margin "
                f"{ledger.margin_bytes} B)", budget_bytes=unit.nbytes, available_bytes=0)
        ledger.allocate(unit.nbytes, force=True)
        in_handles.append(unit.start())
        order.append(f"in:{unit.name}")
    poll()
    return SwapSchedule(ledger, out_handles, in_handles, host_waits, order)


# ---------------------------------------------------------------- managers and groups
@dataclass
class SwapResult:
    out_bytes: int
    in_bytes: int
    seconds: float                 # host time to issue everything (and, if blocking, to finish it)
    margin_bytes: int
    high_water_bytes: int          # max(allocated B - completed freed A), host bookkeeping
    host_waits: int
    torch_peak_allocated_delta: int | None = None
    torch_peak_active_delta: int | None = None
    torch_peak_reserved_delta: int | None = None
    handle: TransferHandle | None = None
    order: list[str] = field(default_factory=list)

    @property
    def within_bound(self) -> bool:
        return self.high_water_bytes <= self.margin_bytes

    @property
    def gbps(self) -> float:
        return (self.out_bytes + self.in_bytes) / self.seconds / 1e9 if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict[str, Any]:
        return {"out_bytes": self.out_bytes, "in_bytes": self.in_bytes, "seconds": self.seconds,
                "gbps": self.gbps, "margin_bytes": self.margin_bytes, "high_water_bytes": self.high_water_bytes,
                "within_bound": self.within_bound, "host_waits": self.host_waits,
                "torch_peak_allocated_delta": self.torch_peak_allocated_delta,
                "torch_peak_active_delta": self.torch_peak_active_delta,
                "torch_peak_reserved_delta": self.torch_peak_reserved_delta}


def _groups_of(target: Any, groups: Sequence[str] | None, order: str) -> list[StateGroup]:
    """The groups of ``target`` (a MemoryManager, a group, or a list of groups) in move order."""
    if isinstance(target, MemoryManager):
        return [e.group for e in target.entries(*(groups or ()), order=order)]
    if isinstance(target, (list, tuple)):
        return list(target)
    return [target]


def _device_of(units: list[MovableUnit]) -> torch.device | None:
    return next((u.device for u in units if u.device is not None), None)


def _out_unit(u: MovableUnit) -> SwapUnit:
    """A unit to offload; its bytes are what it holds on the device now."""
    return SwapUnit(u.name, int(u.device_bytes), lambda: u.offload(non_blocking=True))


def swap(out: Any, into: Any, margin_bytes: int = 0, *, out_groups: Sequence[str] | None = None,
         into_groups: Sequence[str] | None = None, non_blocking: bool = False, strict: bool = True,
         track_torch_peak: bool = False) -> SwapResult:
    """Offloads ``out`` (a MemoryManager, a group, or a list of groups) while onloading ``into``, overlapping the
    two directions bucket by bucket, never letting B's allocated bytes exceed A's completed-freed bytes plus
    ``margin_bytes`` (see the module docstring). ``track_torch_peak`` resets the CUDA allocator's peak statistics
    (``torch.cuda.reset_peak_memory_stats``, which the caller's own peak readings see too) to report the peaks during
    the swap in ``SwapResult.torch_peak_*``; without it those fields are None and the statistics are left alone.
    With ``strict`` (default) a B larger than A plus the margin raises MemmgrBudgetError before anything moves. On
    running out of GPU memory, B's buckets allocated by this call are freed again (host copies intact; A stays
    offloaded) and MemmgrOutOfMemoryError is raised."""
    margin_bytes = arguments.integer("swap", "margin_bytes", margin_bytes, minimum=0)
    for flag, value in (("non_blocking", non_blocking), ("strict", strict), ("track_torch_peak", track_torch_peak)):
        arguments.boolean("swap", flag, value)
    for side, target, names in (("out", out, out_groups), ("into", into, into_groups)):
        targets = target if isinstance(target, (list, tuple)) else [target]
        if not targets or not all(isinstance(t, (MemoryManager, StateGroup)) for t in targets):
            raise MemmgrInputError(f"swap: {side} must be a MemoryManager, a group or a list of groups, got "
                                   f"{type(target).__name__}")
        if names is not None:
            if isinstance(names, str) or not isinstance(target, MemoryManager):
                raise MemmgrInputError(f"swap: {side}_groups must be a list of group names of the {side} manager "
                                       f"(and {side} a MemoryManager), got {names!r}")
            arguments.names("swap", f"{side}_groups", names)
    out_mgr = out if isinstance(out, MemoryManager) else None
    in_mgr = into if isinstance(into, MemoryManager) else None
    out_groups_l = _groups_of(out, out_groups, "offload")
    in_groups_l = _groups_of(into, into_groups, "onload")
    both = [out_mgr.name_of(g) if out_mgr is not None else getattr(g, "name", repr(g))
            for g in out_groups_l if any(g is h for h in in_groups_l)]
    if both:
        raise MemmgrInputError(f"swap: group(s) {both} would be both outgoing and incoming"
                               f"{' (out and into are the same manager)' if out is into else ''}; a swap moves "
                               f"one set of groups out and another in: pass different managers or disjoint "
                               f"out_groups/into_groups")
    if out_mgr is not None:  # what a plain offload does first: new optimizer state, references autograd still holds
        out_mgr.prepare_offload(*(out_groups or ()))
    else:
        for g in out_groups_l:
            check_no_outside_references(g)
    out_raw = [u for g in out_groups_l for u in g.units if u.state.holds_device_memory]
    in_raw = [u for g in in_groups_l for u in g.units if not u.state.holds_device_memory]
    out_units = [_out_unit(u) for u in out_raw]
    in_bytes = sum(int(u.nbytes) for u in in_raw)
    out_bytes = sum(u.nbytes for u in out_units)
    if strict and in_bytes > out_bytes + margin_bytes:
        raise MemmgrBudgetError(
            f"swap: the incoming state needs {in_bytes} B on the device but the outgoing state frees only "
            f"{out_bytes} B and the margin is {margin_bytes} B; nothing was moved. Raise margin_bytes by "
            f"{in_bytes - out_bytes - margin_bytes} B or pass strict=False", budget_bytes=in_bytes,
            available_bytes=out_bytes + margin_bytes)

    out_names = tuple(out_mgr.name_of(g) if out_mgr is not None else g.name for g in out_groups_l)
    in_names = tuple(in_mgr.name_of(g) if in_mgr is not None else g.name for g in in_groups_l)
    copy_policy = resolve_copy_policy(where="swap")  # both directions' copies run under it
    txn = OnloadTransaction(f"swap into {', '.join(map(repr, in_names))}", group=",".join(in_names),
                            bytes_needed=in_bytes, copy_policy=copy_policy)
    in_units = [SwapUnit(u.name, int(u.nbytes), (lambda u=u: txn.issue(u) or TransferHandle.completed()))
                for u in in_raw]
    device = _device_of(out_raw + in_raw)
    cuda = device is not None and device.type == "cuda"
    stats0: dict[str, int] = {}
    if cuda and track_torch_peak:
        torch.cuda.reset_peak_memory_stats(device)
        s = torch.cuda.memory_stats(device)
        stats0 = {k: int(s.get(f"{k}.all.current", 0)) for k in ("allocated_bytes", "active_bytes", "reserved_bytes")}
    with contextlib.ExitStack() as stack:
        out_scope = (stack.enter_context(out_mgr.offloading(out_names, f"swap out {','.join(out_names)}",
                                                            non_blocking=non_blocking))
                     if out_mgr is not None else MoveScope())
        in_scope = (stack.enter_context(in_mgr.onloading(in_names, f"swap in {','.join(in_names)}",
                                                         non_blocking=non_blocking))
                    if in_mgr is not None else MoveScope())
        t0 = time.perf_counter()
        with copy_policy_scope(copy_policy):
            schedule = run_swap(out_units, in_units, margin_bytes, strict=strict)
        for h in schedule.out_handles:
            out_scope.add(h)
        for h in schedule.in_handles:
            in_scope.add(h)
        handle = TransferHandle.combine(list(schedule.out_handles) + list(schedule.in_handles))
        if not non_blocking:
            handle.wait()
            txn.verify()
        seconds = time.perf_counter() - t0
    result = SwapResult(out_bytes, in_bytes, seconds, margin_bytes, schedule.ledger.high_water, schedule.host_waits,
                        handle=handle, order=schedule.order)
    if cuda and track_torch_peak:
        s = torch.cuda.memory_stats(device)
        result.torch_peak_allocated_delta = int(s.get("allocated_bytes.all.peak", 0)) - stats0["allocated_bytes"]
        result.torch_peak_active_delta = int(s.get("active_bytes.all.peak", 0)) - stats0["active_bytes"]
        result.torch_peak_reserved_delta = int(s.get("reserved_bytes.all.peak", 0)) - stats0["reserved_bytes"]
    logger.info("swap: %d B out, %d B in in %.3f s (%.1f GB/s), high-water %d B (margin %d B), %d host waits",
                out_bytes, in_bytes, seconds, result.gbps, result.high_water_bytes, margin_bytes, schedule.host_waits)
    return result
