"""WeightSyncBracket: the manager's bracket around a trainer -> engine weight sync (``MemoryManager.weight_sync``).

Only the weights come back for the sync and leave again afterwards, unit by unit as they were; before_weight_sync
hooks run on entry and every after_weight_sync hook on exit, also when anything in between fails (the after hooks
put the engine back to serving), and the first error is the one raised."""
from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Iterator

import torch

from memmgr import moves
from memmgr.errors import MemmgrStateError
from memmgr.hooks import HookEvent, Hooks
from memmgr.states import GroupState

if TYPE_CHECKING:
    from memmgr.manager import MemoryManager, Placement

__all__ = ["WeightSyncBracket"]

logger = logging.getLogger("memmgr")


class WeightSyncBracket:
    """Begins and ends weight syncs of one manager; nested syncs each restore their own placement."""

    def __init__(self, manager: "MemoryManager", hooks: Hooks):
        self._manager = manager
        self._hooks = hooks
        self._open: list["Placement"] = []  # one placement per begin() not ended yet

    def begin(self) -> "OrderedDict[str, torch.Tensor]":
        """Fires before_weight_sync hooks and onloads only the weights group. If the onload fails (or an
        after_onload hook raises), the weights this call brought back leave the device again and the
        after_weight_sync hooks run before the error propagates (every before has its after)."""
        mgr = self._manager
        mgr.check_open()
        name = mgr.weights_group
        if mgr.entries(name)[0].state is GroupState.DISCARDED:
            raise MemmgrStateError(f"group {name!r} was discarded, so there are no weights to sync; offload weights "
                                   f"with the copy policy")
        try:
            self._hooks.fire(HookEvent.BEFORE_WEIGHT_SYNC, (name,))
        except BaseException as exc:
            # whatever the hooks that did run released (an engine's KV cache, say) is restored before the error
            # propagates
            self.after_failure(exc)
            raise
        before = mgr.placement(name)
        try:
            mgr.onload(name)
        except BaseException as exc:
            # No sync will happen and end() will not be called: what this call brought back leaves again (quietly:
            # no hooks, the error in flight is the one to report), and the after hooks still run.
            self._undo_onload(before, exc)
            self.after_failure(exc)
            raise
        self._open.append(before)
        return mgr.named_weights()

    def end(self) -> None:
        """Offloads the weights begin() brought back (unit by unit, as they were), then fires after_weight_sync."""
        if not self._open:
            raise MemmgrStateError("end_weight_sync() without a begin_weight_sync(); use `with mgr.weight_sync()`")
        before = self._open.pop()
        try:
            if not self._manager.closed:
                self._manager.restore_placement(before)
        except BaseException as exc:
            self.after_failure(exc)
            raise
        self._hooks.fire_all(HookEvent.AFTER_WEIGHT_SYNC, (self._manager.weights_group,))

    @contextlib.contextmanager
    def around(self) -> Iterator["OrderedDict[str, torch.Tensor]"]:
        """begin() ... end(), also when the body raises (the body's error is the one raised)."""
        weights = self.begin()
        try:
            yield weights
        except BaseException as exc:
            try:
                self.end()
            except Exception as end_exc:  # noqa: BLE001 - the body's error is the one to raise
                logger.error("ending a weight sync whose body failed failed too: %r", end_exc)
                exc.add_note(f"memmgr: ending the weight sync failed too: {end_exc!r}")
            raise
        self.end()

    @contextlib.contextmanager
    def hooks_only(self) -> Iterator[None]:
        """The hooks of a sync that reads the weights where they are; nothing moves."""
        self._manager.check_open()
        names = (self._manager.weights_group,)
        try:
            self._hooks.fire(HookEvent.BEFORE_WEIGHT_SYNC, names)
            yield
        except BaseException as exc:
            self.after_failure(exc)
            raise
        self._hooks.fire_all(HookEvent.AFTER_WEIGHT_SYNC, names)

    def after_failure(self, exc: BaseException) -> None:
        """Runs every after_weight_sync hook after a sync failed with ``exc``; an after hook's own failure is logged
        and noted on ``exc``, which stays the one to raise."""
        try:
            self._hooks.fire_all(HookEvent.AFTER_WEIGHT_SYNC, (self._manager.weights_group,))
        except Exception as hook_exc:  # noqa: BLE001 - the sync's own error is the one to raise
            logger.error("an after_weight_sync hook failed after the sync had failed: %r", hook_exc)
            exc.add_note(f"memmgr: an after_weight_sync hook failed too: {hook_exc!r}")

    def _undo_onload(self, before: "Placement", exc: BaseException) -> None:
        try:
            undo = [u for _g, u, on in before.rows if not on and u.state.holds_device_memory]
            if undo:
                moves.offload_units(undo).wait()
                self._manager.release_cached_memory()
        except BaseException as undo_exc:  # noqa: BLE001 - the onload's own error is the one to raise
            logger.error("undoing a failed weight-sync onload failed too: %r", undo_exc)
            exc.add_note(f"memmgr: undoing the weight-sync onload failed too: {undo_exc!r}")
