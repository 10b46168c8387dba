"""MemoryManager: named state groups that leave and re-enter the GPU around the phases of an RL loop."""
from __future__ import annotations

import contextlib
import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from memmgr import arguments, checkpoint_hooks, driver_settle, guard, moves
from memmgr.budget import OffloadPlan, offload_budget, plan_offload
from memmgr.errors import MemmgrInputError, MemmgrStateError
from memmgr.flat_tensors import DEFAULT_BUCKET_SIZE_MB, BucketizedFlatTensors
from memmgr.hooks import HookEvent, HookFn, HookHandle, Hooks
from memmgr.groups import (MovableUnit, StateGroup, check_no_outside_references, default_priority, group_state,
                           is_movable_unit)
from memmgr.host_memory import HostMemoryPool, default_pool
from memmgr.same_address import require_same_address
from memmgr.states import GroupState, Policy, policy_from
from memmgr.tensor_checks import TensorsArg, tensors_argument
from memmgr.transfer import TransferHandle
from memmgr.weight_sync_bracket import WeightSyncBracket

__all__ = ["GroupEntry", "GroupStatus", "HookEvent", "HookHandle", "MemoryManager", "MoveScope", "Placement"]

logger = logging.getLogger("memmgr")


@dataclass(frozen=True)
class GroupStatus:
    name: str
    state: str
    policy: str
    nbytes: int
    device_bytes: int
    host_bytes: int


@dataclass
class GroupEntry:
    """A registered group with its offload priority (lower leaves first, comes back last) and registration index."""

    name: str  # the name the manager knows it by (a ready group may carry another name of its own)
    group: StateGroup
    priority: int
    collect: Callable[[], TensorsArg] | None
    index: int

    @property
    def state(self) -> GroupState:
        return group_state(self.group)


# A pickled managed module (torch.save(model)) names its inert state-dict hook by this path too.
_InertStateDictHook = checkpoint_hooks.InertStateDictHook

# The groups of every open manager: one group must not be moved by two managers.
_groups_in_use: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _is_in_use(group: StateGroup) -> bool:
    try:
        return group in _groups_in_use
    except TypeError:  # a group type that cannot be weakly referenced is not tracked
        return False


def _cuda_devices(units: Iterable[MovableUnit]) -> list[torch.device]:
    """The GPUs these units live on, each once, in index order."""
    devices = {unit.device for unit in units if unit.device is not None and unit.device.type == "cuda"}
    return sorted(devices, key=lambda device: device.index or 0)


def _mark_in_use(group: StateGroup, in_use: bool) -> None:
    try:
        if in_use:
            _groups_in_use.add(group)
        else:
            _groups_in_use.discard(group)
    except TypeError:
        pass


@dataclass(frozen=True)
class Placement:
    """Where each unit of some groups was: (group name, unit, on the device?) rows (``MemoryManager.placement``)."""

    rows: list[tuple[str, MovableUnit, bool]]


class MoveScope:
    """The moves a caller issues inside ``MemoryManager.offloading``/``onloading``: ``add`` each handle."""

    def __init__(self) -> None:
        self._handles: list[TransferHandle] = []

    def add(self, handle: TransferHandle | None) -> None:
        if handle is not None:
            self._handles.append(handle)

    @property
    def handle(self) -> TransferHandle:
        return TransferHandle.combine(self._handles)


class MemoryManager:
    """Holds named state groups and moves them off and onto the GPU.

    ``offload(*names)`` / ``onload(*names)`` (no names: every group), ``free(nbytes)`` for at least that many bytes
    (cheapest whole buckets first; ``memmgr.budget``), ``phase(name, keep=...)`` for a block of code during which
    the other groups are off the GPU, ``weight_sync()`` around each trainer->engine weight sync, and
    ``register_hook(event, fn)`` to run code around each of these (``memmgr.hooks``). ``state`` and ``group_names``
    are properties.
    """

    def __init__(self, *, bucket_size_mb: float = DEFAULT_BUCKET_SIZE_MB, empty_cache: bool = True,
                 pool: HostMemoryPool | None = None, weights_group: str = "weights",
                 named_weights: Callable[[], Iterable[tuple[str, torch.Tensor]]] | None = None,
                 guard_offloaded: bool | None = None, same_address: bool = False):
        """``guard_offloaded``: a debug mode (``memmgr.guard``) in which using a managed tensor while its group is
        offloaded raises MemmgrStateError naming the tensor and group instead of crashing the process; None:
        ``MEMMGR_GUARD_OFFLOADED=1`` turns it on. Each PyTorch op costs a few µs more while a group is offloaded.
        ``same_address=True``: every CUDA bucket of the groups built here keeps its address across offload and onload
        (its memory is memmgr's own, released and mapped again at the same address: ``memmgr.bucket``), so CUDA
        graphs captured on managed tensors replay after an onload; MemmgrInputError where the machine cannot do
        that (``memmgr.same_address.require_same_address``)."""
        where = "MemoryManager"
        self.same_address = arguments.boolean(where, "same_address", same_address)
        if self.same_address:
            require_same_address(where)
        self.bucket_size_mb = arguments.number(where, "bucket_size_mb", bucket_size_mb, positive=True,
                                               maximum=2.0**40)
        self.empty_cache = arguments.boolean(where, "empty_cache", empty_cache)
        self.pool = arguments.instance(where, "pool", pool, HostMemoryPool, optional=True) or default_pool()
        self.weights_group = arguments.string(where, "weights_group", weights_group)
        self._named_weights = arguments.function(where, "named_weights", named_weights, optional=True)
        self._groups: "OrderedDict[str, GroupEntry]" = OrderedDict()
        self._hooks = Hooks()
        self._closed = False
        self._phases: list[str] = []
        self._ledger = None
        self._checkpoint_hooks: list[Any] = []  # removable handles of onload_for_state_dicts
        self._weight_syncs = WeightSyncBracket(self, self._hooks)
        self.left_behind: dict[str, int] = {}  # state an integration saw but does not move, by description -> bytes
        self._guard = guard.install(self) if guard.requested(guard_offloaded) else None

    # ---- building ----
    def add_group(self, name: str, tensors: TensorsArg | StateGroup, policy: Policy | str = Policy.COPY, *,
                  priority: int | None = None, collect: Callable[[], TensorsArg] | None = None,
                  adopt: bool = False, pin_ahead: bool = True, verify: bool = False) -> StateGroup:
        """Adds a named group: a list/dict of tensors to coalesce, flat buffers to adopt (``adopt=True``), or a
        ready StateGroup. ``collect`` returns the group's current tensors; tensors it returns that the group does
        not hold yet (optimizer state created lazily at the first step) are added at the next offload.
        ``verify`` checksums each bucket at offload and checks it at onload (MemmgrCorruptionError on mismatch).
        Coalescing frees the tensors' former storages into PyTorch's cache; with ``empty_cache`` that memory goes back
        to the driver here, so that the first offload does not pay for releasing it."""
        self.check_open()
        arguments.string("add_group", "name", name)
        where = f"add_group({name!r})"
        for flag, value in (("adopt", adopt), ("pin_ahead", pin_ahead), ("verify", verify)):
            arguments.boolean(where, flag, value)
        if name in self._groups:
            raise MemmgrInputError(f"group {name!r} exists already; known groups: {list(self._groups)}")
        policy = policy_from(policy, name)
        arguments.integer(where, "priority", priority, minimum=-2**31, maximum=2**31, optional=True)
        arguments.function(where, "collect", collect, optional=True)
        is_group = isinstance(tensors, StateGroup) and not isinstance(tensors, (list, tuple, dict))
        if not is_group:
            tensors = tensors_argument(tensors, name)
        if is_group:
            group = tensors
            check_released = getattr(group, "check_open", None)
            if callable(check_released):
                check_released(where)
            if _is_in_use(group):
                raise MemmgrInputError(f"{where}: this group is already in an open MemoryManager; a group belongs to "
                                       f"one manager at a time. Close that manager first, or pass the group's tensors "
                                       f"(a new group over them) instead")
        elif adopt:
            self._check_not_managed(name, tensors)
            group = BucketizedFlatTensors.from_buffers(tensors, name=name, policy=policy, pool=self.pool,
                                                       pin_ahead=pin_ahead, verify=verify,
                                                       same_address=self.same_address)
        else:
            self._check_not_managed(name, tensors)
            group = BucketizedFlatTensors(tensors, self.bucket_size_mb, name=name, policy=policy, pool=self.pool,
                                          pin_ahead=pin_ahead, verify=verify, same_address=self.same_address)
            if _cuda_devices(group.units):
                # coalescing left the tensors' former storages in PyTorch's cache: released here, not at the first
                # offload
                self.release_cached_memory()
        prio = default_priority(name, group.policy) if priority is None else priority
        self._groups[name] = GroupEntry(name, group, prio, collect, len(self._groups))
        _mark_in_use(group, True)
        return group

    def _check_not_managed(self, name: str, tensors: TensorsArg) -> None:
        managed = {id(t): g for g, e in self._groups.items() for _, t in e.group.named_tensors}
        values = tensors.values() if isinstance(tensors, dict) else tensors
        for t in values:
            if id(t) in managed:
                raise MemmgrInputError(f"group {name!r}: tensor (shape {tuple(t.shape)}, {t.dtype}) is already in "
                                       f"group {managed[id(t)]!r}; a tensor can belong to one group only")

    def group(self, name: str) -> StateGroup:
        return self._resolve([name])[0].group

    def name_of(self, group: StateGroup) -> str:
        """The name this manager knows ``group`` by (MemmgrInputError if it holds no such group)."""
        for name, entry in self._groups.items():
            if entry.group is group:
                return name
        raise MemmgrInputError(f"{getattr(group, 'name', group)!r} is not a group of this manager; its groups: "
                               f"{list(self._groups)}")

    @property
    def group_names(self) -> list[str]:
        return list(self._groups)

    # ---- moving ----
    def offload(self, *groups: str, non_blocking: bool = False, budget_bytes: None = None) -> TransferHandle:
        """Moves the named groups (all if none) off the GPU, whole: discardable ones first, weights last. Returns the
        handle of the copies (complete unless ``non_blocking``). To free only some bytes, call ``free(nbytes)``;
        ``budget_bytes`` is refused with a MemmgrInputError that says so."""
        arguments.boolean("offload", "non_blocking", non_blocking)
        if budget_bytes is not None:
            raise MemmgrInputError(f"offload: budget_bytes={budget_bytes!r} is not an argument of offload, which moves "
                                   f"whole groups; call mgr.free(nbytes, *groups) to free at least nbytes, cheapest "
                                   f"buckets first (it returns the OffloadPlan it carried out)")
        arguments.names("offload", "groups", groups)
        entries = self.prepare_offload(*groups)
        units = [unit for entry in entries for unit in entry.group.units]
        return self.offload_units(units, groups=tuple(e.name for e in entries), non_blocking=non_blocking)

    def onload(self, *groups: str, non_blocking: bool = False) -> TransferHandle:
        """Brings the named groups (all if none) back: weights first, discardable ones (re-zeroed) last. If the GPU
        runs out of memory, everything this call restored is freed again (host copies intact).

        Onload's copies are ordered before later work on the current stream, so compute may follow at once."""
        arguments.boolean("onload", "non_blocking", non_blocking)
        entries = self.entries(*groups, order="onload")
        units = [unit for entry in entries for unit in entry.group.units]
        return self.onload_units(units, groups=tuple(e.name for e in entries), non_blocking=non_blocking)

    def free(self, nbytes: int, *groups: str, non_blocking: bool = False, strict: bool = True) -> OffloadPlan:
        """Frees at least ``nbytes`` of GPU memory from the named groups (all if none), cheapest whole buckets first,
        and returns the ``memmgr.budget.OffloadPlan`` it carried out (``plan.onload()`` restores exactly it). With
        ``strict``, a budget larger than all the managed state on the device raises MemmgrBudgetError before
        anything moves; otherwise everything available moves and ``plan.shortfall_bytes`` says by how much the
        budget was missed."""
        arguments.boolean("free", "non_blocking", non_blocking)
        arguments.integer("free", "nbytes", nbytes, minimum=0)
        arguments.names("free", "groups", groups)
        return offload_budget(self, nbytes, groups, non_blocking=non_blocking, strict=strict)

    def plan_offload(self, budget_bytes: int, *groups: str) -> OffloadPlan:
        """The OffloadPlan ``free(budget_bytes)`` would carry out, without moving anything (a dry run)."""
        arguments.integer("plan_offload", "budget_bytes", budget_bytes, minimum=0)
        return plan_offload(self, budget_bytes, groups)

    # ---- moving units: the public API that budgets, swaps and ordered onloads build on ----
    def entries(self, *groups: str, order: str | None = None) -> list[GroupEntry]:
        """The named groups (all if none) as GroupEntry rows; ``order="offload"`` sorts them by offload priority,
        ``"onload"`` in reverse (weights first). Unknown names raise MemmgrInputError."""
        self.check_open()
        entries = self._resolve(groups)
        if order == "offload":
            return sorted(entries, key=lambda e: (e.priority, e.index))
        if order == "onload":
            return sorted(entries, key=lambda e: (-e.priority, e.index))
        if order is not None:
            raise MemmgrInputError(f"order must be 'offload', 'onload' or None, got {order!r}")
        return entries

    def prepare_offload(self, *groups: str) -> list[GroupEntry]:
        """What every offload does before anything moves: picks up tensors each group's ``collect`` reports that it
        does not hold yet, and raises MemmgrStateError if memory of a group on the device is still referenced from
        outside it. Returns the groups in offload order."""
        entries = self.entries(*groups, order="offload")
        for entry in entries:
            self._recollect(entry)
        for entry in entries:
            if entry.state.holds_device_memory:
                check_no_outside_references(entry.group)
        return entries

    @contextlib.contextmanager
    def offloading(self, groups: tuple[str, ...], label: str, *, non_blocking: bool = False) -> Iterator[MoveScope]:
        """Brackets an offload whose units the caller issues itself (``scope.add(handle)`` for each): before_offload
        hooks on entry; on a normal exit, with ``empty_cache``, a driver settle on a side thread for each GPU the
        groups' buckets live on (``memmgr.driver_settle``) and PyTorch's cache (and cuBLAS's workspaces) released
        once the copies complete; then the copies are waited for unless ``non_blocking``, after_offload hooks run and
        the ledger records ``label``."""
        self.check_open()
        self._hooks.fire(HookEvent.BEFORE_OFFLOAD, groups)
        scope = MoveScope()
        yield scope
        if self.empty_cache:
            # The release at the end may owe the driver a wait for another process's release; a side thread pays it
            # while the copies run (memmgr.driver_settle). It starts once they are issued, so that neither it nor
            # finding the devices delays the first copy.
            for device in _cuda_devices(unit for entry in self._resolve(groups) for unit in entry.group.units):
                driver_settle.begin(device)
        handle = scope.handle
        handle.add_done_callback(self.release_cached_memory)
        self.on_copies_in_flight(groups)
        if not non_blocking:
            handle.wait()
        self._hooks.fire(HookEvent.AFTER_OFFLOAD, groups)
        self._record(label)

    @contextlib.contextmanager
    def onloading(self, groups: tuple[str, ...], label: str, *, non_blocking: bool = False) -> Iterator[MoveScope]:
        """Brackets an onload whose units the caller issues itself: before_onload hooks on entry; on a normal exit,
        the copies are waited for unless ``non_blocking``, after_onload hooks run and the ledger records ``label``."""
        self.check_open()
        self._hooks.fire(HookEvent.BEFORE_ONLOAD, groups)
        scope = MoveScope()
        yield scope
        if not non_blocking:
            scope.handle.wait()
        self._hooks.fire(HookEvent.AFTER_ONLOAD, groups)
        self._record(label)

    def offload_units(self, units: Sequence[MovableUnit], *, groups: tuple[str, ...], label: str | None = None,
                      discard: Callable[[MovableUnit], bool | None] | None = None,
                      non_blocking: bool = False) -> TransferHandle:
        """Offloads these units of the named groups as one move (``memmgr.moves.offload_units``), with the hooks,
        cache release and ledger record of ``offloading``."""
        units = arguments.sequence_of("offload_units", "units", units, is_movable_unit, "a bucket (a MovableUnit)")
        with self.offloading(groups, label or f"offload {','.join(groups)}", non_blocking=non_blocking) as scope:
            scope.add(moves.offload_units(units, discard=discard))
        return scope.handle

    def onload_units(self, units: Sequence[MovableUnit], *, groups: tuple[str, ...], label: str | None = None,
                     non_blocking: bool = False) -> TransferHandle:
        """Restores these units of the named groups as one transaction (``memmgr.moves.onload_units``: undone as a
        whole on out-of-memory or a checksum mismatch), with the hooks and ledger record of ``onloading``."""
        units = arguments.sequence_of("onload_units", "units", units, is_movable_unit, "a bucket (a MovableUnit)")
        with self.onloading(groups, label or f"onload {','.join(groups)}", non_blocking=non_blocking) as scope:
            scope.add(moves.onload_units(units, what=f"onload of {', '.join(map(repr, groups))}",
                                         group=",".join(groups), non_blocking=True))
        return scope.handle

    def on_copies_in_flight(self, groups: tuple[str, ...]) -> None:
        """Called by every offload once its copies are issued and before they are waited for: host-side bookkeeping
        a subclass runs here costs no time on the offload's critical path."""

    def release_cached_memory(self) -> None:
        """Gives PyTorch's cached blocks and cuBLAS's workspaces back to the driver (with ``empty_cache``)."""
        if self.empty_cache and torch.cuda.is_available() and torch.cuda.is_initialized():
            # cuBLAS workspaces (tens of MiB per stream) are re-created at the next matmul; between phases they are
            # memory the engine could use, so they go back too.
            clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear_workspaces is not None:
                clear_workspaces()
            torch.cuda.empty_cache()

    def _recollect(self, entry: GroupEntry) -> None:
        """Re-collects a group from its ``collect`` while it is wholly on the device
        (``BucketizedFlatTensors.recollect``); new tensors already in another group of this manager are refused."""
        group = entry.group
        if entry.collect is None or not isinstance(group, BucketizedFlatTensors):
            return
        if entry.state is not GroupState.ON_DEVICE:
            return
        group.recollect(entry.collect(), check_new=lambda new: self._check_not_managed(group.name, new))

    # ---- phases and weight sync ----
    def collect(self, *groups: str) -> None:
        """Picks up state the named groups (all if none) do not hold yet, as every offload does first: tensors a
        group's ``collect`` reports that it does not hold (optimizer state created at the first ``step()`` or by a
        ``load_state_dict``) join it, and buckets nobody uses any more leave it. Only groups wholly on the device
        re-collect."""
        for entry in self.entries(*groups):
            self._recollect(entry)

    def placement(self, *groups: str) -> "Placement":
        """Where every unit of the named groups (all if none) is now, after picking up new state (``collect``):
        ``restore_placement`` brings each unit back to it. State created since the last offload is part of it, so
        an offload that would collect it is undone too. Units are compared one by one, so a budgeted (partial)
        offload is restored as it was."""
        self.collect(*groups)
        return self._placement_as_is(*groups)

    def _placement_as_is(self, *groups: str) -> "Placement":
        return Placement([(e.name, unit, unit.state.holds_device_memory)
                          for e in self.entries(*groups) for unit in e.group.units])

    def restore_placement(self, placement: "Placement") -> None:
        """Offloads the units of ``placement`` that were off the device and are on it now, then onloads those that
        were on it and are off now. Groups re-collect first (``collect``): units no longer in their group (state a
        ``load_state_dict`` replaced) are left alone, and units that joined a group since are placed as the
        group's units all were (a group wholly offloaded before is wholly offloaded again); in a group that was
        partly offloaded they stay where they are."""
        arguments.instance("restore_placement", "placement", placement, Placement)
        self.collect(*dict.fromkeys(g for g, _u, _on in placement.rows))
        current = {id(u) for e in self._groups.values() for u in e.group.units}
        rows = [(g, u, on) for g, u, on in placement.rows if id(u) in current]
        rows += self._joined_since(placement)
        back_off = [(g, u) for g, u, on in rows if not on and u.state.holds_device_memory]
        back_on = [(g, u) for g, u, on in rows if on and not u.state.holds_device_memory]
        if back_off:
            names = tuple(dict.fromkeys(g for g, _ in back_off))
            self.prepare_offload(*names)
            self.offload_units([u for _, u in back_off], groups=names)
        if back_on:
            names = tuple(dict.fromkeys(g for g, _ in back_on))
            self.onload_units([u for _, u in back_on], groups=names)

    def _joined_since(self, placement: "Placement") -> list[tuple[str, MovableUnit, bool]]:
        """Rows for the units that joined a group after ``placement`` was taken, in groups whose units it found
        all on or all off the device."""
        sides: dict[str, set[bool]] = {}
        for g, _u, on in placement.rows:
            sides.setdefault(g, set()).add(on)
        placed = {id(u) for _g, u, _on in placement.rows}
        return [(g, u, next(iter(on))) for g, on in sides.items() if len(on) == 1
                for u in self._groups[g].group.units if id(u) not in placed]

    @contextlib.contextmanager
    def phase(self, name: str, keep: Iterable[str] = ()) -> Iterator["MemoryManager"]:
        """Offloads every group not in ``keep`` on entry and restores the previous placement of every unit on exit
        (also when the block raises): a group a budget left partly offloaded is partly offloaded again. Phases
        nest."""
        self.check_open()
        if not isinstance(name, str):
            raise MemmgrInputError(f"phase: the phase name must be a str, got {name!r}")
        if isinstance(keep, str):
            keep = (keep,)
        try:
            keep = tuple(keep)
        except TypeError:
            raise MemmgrInputError(f"phase {name!r}: keep must be group names (a list of str), got "
                                   f"{type(keep).__name__}") from None
        self._resolve(keep)
        to_offload = [n for n, e in self._groups.items() if n not in keep and self._on_device(e)]
        # the groups to offload re-collect once, here, so that the placement to restore holds what the offload
        # moves (kept groups re-collect at the exit, in restore_placement)
        entries = self.prepare_offload(*to_offload) if to_offload else []
        before = self._placement_as_is()
        self._phases.append(name)
        try:
            if entries:
                self.offload_units([u for e in entries for u in e.group.units], groups=tuple(e.name for e in entries))
            self._record(f"enter {name}")
            yield self
        finally:
            self._phases.pop()
            if not self._closed:
                self.restore_placement(before)
                self._record(f"exit {name}")

    @property
    def current_phase(self) -> str | None:
        return self._phases[-1] if self._phases else None

    def named_weights(self) -> "OrderedDict[str, torch.Tensor]":
        """The weights to sync, name -> tensor, in a stable order."""
        if self._named_weights is not None:
            return OrderedDict(self._named_weights())
        return OrderedDict(self.group(self.weights_group).named_tensors)

    def begin_weight_sync(self) -> "OrderedDict[str, torch.Tensor]":
        """Fires before_weight_sync hooks and onloads only the weights group; pair with end_weight_sync(). If the
        onload fails (or an after_onload hook raises), the weights this call brought back leave the device again
        and the after_weight_sync hooks run before the error propagates (every before has its after)."""
        return self._weight_syncs.begin()

    def end_weight_sync(self) -> None:
        """Offloads the weights begin_weight_sync brought back (unit by unit, as they were), then fires
        after_weight_sync."""
        self._weight_syncs.end()

    @contextlib.contextmanager
    def weight_sync_hooks(self) -> Iterator["MemoryManager"]:
        """Around a weight sync that reads the weights where they are (``memmgr.sync.session.sync_weights``):
        before_weight_sync hooks on entry, after_weight_sync hooks on exit. The after hooks run, every one of them,
        also when a before hook or the body raises (they put the engine back to serving), and the first error is the
        one raised: an after hook's failure is then logged and noted on it. Nothing moves."""
        with self._weight_syncs.hooks_only():
            yield self

    def weight_sync(self) -> contextlib.AbstractContextManager["OrderedDict[str, torch.Tensor]"]:
        """Around one weight sync: only the weights come back (grads, main weights and optimizer states stay off),
        the body gets name -> tensor, and the weights leave again afterwards (also when the body raises)."""
        return self._weight_syncs.around()

    # ---- checkpoints ----
    def onload_for_state_dicts(self, owner: torch.nn.Module | torch.optim.Optimizer, groups: Sequence[str]) -> None:
        """Makes ``owner.state_dict()`` and ``owner.load_state_dict()`` (a module, every submodule's too, or a
        torch.optim optimizer) bring ``groups`` back to the device first, where they stay until the next offload:
        checkpoint saving and loading then read and write real memory whatever the placement (a loader writing
        into an offloaded tensor would write into freed memory). The hooks hold the manager weakly and are removed
        by ``close()``."""
        self.check_open()
        if isinstance(groups, str):
            groups = (groups,)
        if not isinstance(groups, (list, tuple)):
            raise MemmgrInputError(f"onload_for_state_dicts: groups must be a list of group names, got "
                                   f"{type(groups).__name__}")
        groups = tuple(groups)
        self._resolve(groups)
        self._checkpoint_hooks.extend(checkpoint_hooks.register_onload_hooks(self, owner, groups))

    def onload_if_offloaded(self, groups: Sequence[str]) -> None:
        """Onloads those of ``groups`` that have a unit off the device (nothing once the manager is closed)."""
        if self._closed:
            return
        off = [n for n in groups if any(not u.state.holds_device_memory for u in self._resolve([n])[0].group.units)]
        if off:
            self.onload(*off)

    # ---- hooks ----
    def register_hook(self, event: HookEvent | str, fn: HookFn) -> HookHandle:
        """Calls ``fn(event, group_names)`` at ``event``; hooks run in registration order (``memmgr.hooks``)."""
        return self._hooks.register(event, fn)

    # ---- reports ----
    def attach_ledger(self, ledger: Any) -> None:
        """Records a snapshot in ``ledger`` (memmgr.ledger.Ledger) after every offload, onload and phase change;
        None detaches it."""
        if ledger is not None and not callable(getattr(ledger, "snapshot", None)):
            raise MemmgrInputError(f"attach_ledger: ledger must be a memmgr.ledger.Ledger (with a snapshot method) or "
                                   f"None, got {type(ledger).__name__}")
        self._ledger = ledger

    def _record(self, label: str) -> None:
        if self._ledger is not None:
            self._ledger.snapshot(label, phase=self.current_phase, managers=[self])

    @property
    def state(self) -> "OrderedDict[str, GroupStatus]":
        """Where each group is and how many bytes it holds on the GPU and on the host: group name -> GroupStatus,
        a new mapping each time it is read."""
        return OrderedDict(
            (n, GroupStatus(n, e.state.value, e.group.policy.value, e.group.nbytes, e.group.device_bytes,
                            e.group.host_bytes)) for n, e in self._groups.items())

    # ---- lifecycle ----
    def close(self) -> None:
        """Onloads every group, returns the host buffers to the pool and stops managing: the model and optimizer
        are left as ordinary tensors on the device, and a new manager can take them over. Later calls raise."""
        if self._closed:
            return
        self.onload()
        for handle in self._checkpoint_hooks:
            handle.remove()
        self._checkpoint_hooks.clear()
        for entry in self._groups.values():
            entry.group.unmanage()
            _mark_in_use(entry.group, False)
        if self._guard is not None:
            self._guard.remove()
        self._closed = True

    def __enter__(self) -> "MemoryManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- helpers ----
    @property
    def closed(self) -> bool:
        return self._closed

    def check_open(self) -> None:
        """Raises MemmgrStateError once the manager is closed."""
        if self._closed:
            raise MemmgrStateError("this MemoryManager is closed; build a new one (memmgr.for_module / for_megatron)")

    def _resolve(self, names: Iterable[str]) -> list[GroupEntry]:
        names = list(arguments.names("group lookup", "group name", names))
        if not names:
            return list(self._groups.values())
        unknown = [n for n in names if n not in self._groups]
        if unknown:
            raise MemmgrInputError(f"unknown group(s) {unknown}; known groups: {list(self._groups)}")
        return [self._groups[n] for n in dict.fromkeys(names)]

    @staticmethod
    def _on_device(entry: GroupEntry) -> bool:
        # a partly offloaded group (budgeted offload) still holds device memory: phases offload the rest
        return entry.state.holds_device_memory

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={e.state.value}" for n, e in self._groups.items())
        return f"MemoryManager({parts}{', closed' if self._closed else ''})"

