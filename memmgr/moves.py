"""The move transaction: units leave or re-enter the device as one step, undone as a whole if it fails.

- ``offload_units`` issues every unit's copy, checks every unit while the copies run (a unit whose tensors changed
  under it refuses the whole move, nothing freed), then frees them; if interrupted part-way through the frees
  (KeyboardInterrupt, a signal), it finishes the rest, so that a set of units is never left split.
- ``OnloadTransaction`` brings units back one at a time (each allocation overlaps the copy of the unit before it;
  re-zeroed units are zeroed while the copies run).
  If the GPU runs out of memory, or anything else interrupts it, every unit it brought back is freed again and left
  as it was, host copies intact; ``verify()`` compares opt-in checksums after the copies and undoes the whole
  transaction on a mismatch. ``onload_units`` is the common case: one transaction over a list of units.

Every onload in memmgr (a group's, the manager's, a budget plan's, a swap's incoming side, an ordered onload) goes
through ``OnloadTransaction``, so there is one place where a failed restore is undone.

Each move resolves its copy policy (``memmgr.transfer.CopyPolicy``: which copy path, the kernel's grid size) once,
when it starts, and every bucket copy it issues runs under it (``memmgr.transfer.copy_policy_scope``).
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Sequence

import torch

from memmgr.errors import MemmgrCorruptionError, MemmgrOutOfMemoryError
from memmgr.groups import MovableUnit
from memmgr.states import BucketState
from memmgr.transfer import CopyPolicy, TransferHandle, copy_policy_scope, resolve_copy_policy

logger = logging.getLogger("memmgr")

DiscardFn = Callable[[MovableUnit], "bool | None"]


def offload_units(units: Sequence[MovableUnit], *, discard: DiscardFn | None = None,
                  copy_policy: CopyPolicy | None = None) -> TransferHandle:
    """Issues the offload of every unit without blocking and returns one handle for all of them. ``discard(unit)``
    overrides a unit's policy (None keeps it). Every copy runs under ``copy_policy`` (default: the enclosing move's,
    else the environment's, read once here)."""
    with copy_policy_scope(copy_policy):
        return _offload_units(units, discard)


def _offload_units(units: Sequence[MovableUnit], discard: DiscardFn | None) -> TransferHandle:
    def discard_of(unit: MovableUnit) -> bool | None:
        return discard(unit) if discard is not None else None

    on_device = [unit for unit in units if unit.state is BucketState.ON_DEVICE]
    begun: list[MovableUnit] = []
    try:
        # the copies first, nothing freed yet: checking every member of every unit takes a while with many tensors,
        # and it runs while the copies do
        for unit in on_device:
            if unit.begin_offload(discard=discard_of(unit)):
                begun.append(unit)
        for unit in on_device:  # before anything is freed: a unit whose tensors changed under it refuses the move
            unit.check_intact("offload")
    except BaseException:
        for unit in begun:
            unit.abandon_offload()
        raise
    handles: list[TransferHandle] = []
    try:
        for unit in units:
            handles.append(unit.offload(non_blocking=True, discard=discard_of(unit)))
    except BaseException:
        for unit in units:
            if unit.state is BucketState.ON_DEVICE:
                unit.offload(non_blocking=True, discard=discard_of(unit))
        raise
    return TransferHandle.combine(handles)


def _free_bytes(device: torch.device | None) -> int | None:
    if device is None or device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0]


class OnloadTransaction:
    """Onloads units one by one; ``rollback()`` (run automatically when an onload fails) returns each unit it
    brought back to the state it had before. ``what`` names the transaction in errors (a group, a plan, a swap).
    ``copy_policy``: how every copy of the transaction runs (default: the enclosing move's, else the environment's,
    read once here)."""

    def __init__(self, what: str, *, group: str | None = None, bytes_needed: int | None = None,
                 copy_policy: CopyPolicy | None = None):
        self.copy_policy = resolve_copy_policy(copy_policy, where=f"{what}: copy_policy")
        self.what = what
        self.group = group if group is not None else what
        self.bytes_needed = bytes_needed
        self._issued: list[tuple[MovableUnit, BucketState]] = []
        self._handles: list[TransferHandle] = []
        self._starts: dict[torch.device, torch.cuda.Event] = {}

    @property
    def units(self) -> list[MovableUnit]:
        return [unit for unit, _ in self._issued]

    @property
    def handle(self) -> TransferHandle:
        """The copies issued so far."""
        return TransferHandle.combine(self._handles)

    def issue(self, unit: MovableUnit) -> TransferHandle | None:
        """Allocates the unit's device memory and starts its restore; None if it holds device memory already. On
        running out of GPU memory, rolls back and raises MemmgrOutOfMemoryError; on any other error, rolls back and
        lets it through."""
        if unit.state.holds_device_memory:
            return None
        previous = unit.state.settled()
        try:
            zero_after = self._start_on(unit.device)
            unit.allocate()
            self._issued.append((unit, previous))
            with copy_policy_scope(self.copy_policy):
                handle = unit.onload(non_blocking=True, zero_after=zero_after)
        except torch.OutOfMemoryError as exc:
            self.rollback()
            raise self._out_of_memory(unit, exc) from exc
        except BaseException:
            self.rollback()
            raise
        self._handles.append(handle)
        return handle

    def _start_on(self, device: torch.device | None) -> torch.cuda.Event | None:
        """An event on the device's current stream at this transaction's first unit there: re-zeroed units are zeroed
        behind it, not behind the copies of this transaction that the current stream waits for later."""
        if device is None or device.type != "cuda":
            return None
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        start = self._starts.get(device)
        if start is None:
            start = torch.cuda.Event()
            start.record(torch.cuda.current_stream(device))
            self._starts[device] = start
        return start

    def issue_all(self, units: Iterable[MovableUnit]) -> None:
        for unit in units:
            self.issue(unit)

    def rollback(self) -> None:
        """Frees every unit this transaction brought back, leaving each as it was before (host copies kept)."""
        issued, self._issued = self._issued, []
        self._handles.clear()
        for unit, previous in reversed(issued):
            unit.revert_onload(previous)

    def verify(self) -> None:
        """Compares the opt-in checksums of every restored unit (waiting for their copies, only where verification
        is on); on a mismatch, rolls the whole transaction back and raises MemmgrCorruptionError."""
        bad = [(unit, mismatch) for unit, _ in self._issued for mismatch in [unit.checksum_mismatch()]
               if mismatch is not None]
        if not bad:
            for unit, _ in self._issued:
                unit.clear_checksums()
            return
        states = {unit.name: previous for unit, previous in self._issued}
        self.rollback()
        raise corruption_error(self.what, bad, states)

    def _out_of_memory(self, unit: MovableUnit, exc: BaseException) -> MemmgrOutOfMemoryError:
        device = unit.device
        needed = self.bytes_needed if self.bytes_needed is not None else unit.nbytes
        free = _free_bytes(device)
        return MemmgrOutOfMemoryError(
            f"{self.what}: onload needs {needed} bytes on {device} but only "
            f"{free if free is not None else 'unknown'} bytes are free (failed at {unit.name!r}, {unit.nbytes} B); "
            f"nothing was restored and the host copies are intact. Free GPU memory (offload another group, "
            f"torch.cuda.empty_cache()) and retry", group=self.group, bytes_needed=needed, bytes_free=free)


def onload_units(units: Sequence[MovableUnit], *, what: str, group: str | None = None,
                 non_blocking: bool = False) -> TransferHandle:
    """Restores ``units`` in the order given as one transaction (see OnloadTransaction), checks opt-in checksums,
    and waits for the copies unless ``non_blocking``."""
    todo = [u for u in units if not u.state.holds_device_memory]
    txn = OnloadTransaction(what, group=group, bytes_needed=sum(u.nbytes for u in todo))
    txn.issue_all(todo)
    handle = txn.handle
    txn.verify()
    if not non_blocking:
        handle.wait()
    return handle


def corruption_error(what: str, bad: list[tuple[MovableUnit, tuple[int, int]]],
                     states: dict[str, BucketState] | None = None) -> MemmgrCorruptionError:
    """The error for restored contents that differ from what was offloaded (checksums as unsigned 64-bit)."""
    mask = (1 << 64) - 1
    details = "; ".join(f"bucket {u.name!r} ({u.nbytes} B, {u.device}): checksum at offload {want & mask:#018x}, "
                        f"after onload {got & mask:#018x}" for u, (want, got) in bad)
    logger.error("%s: restored contents differ from what was offloaded: %s", what, details)
    state = (states or {}).get(bad[0][0].name, bad[0][0].state)
    error = MemmgrCorruptionError(
        f"{what}: the contents restored by onload differ from what was offloaded ({details}). The restored device "
        f"copy was freed again and the host store kept as it is (state {state.value}): retry onload if the transfer "
        f"was at fault, or inspect bucket.host_buffer")
    error.mismatches = {u.name: (want & mask, got & mask) for u, (want, got) in bad}  # type: ignore[attr-defined]
    return error
