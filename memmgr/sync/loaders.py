"""``load_weights`` callables for engines that are plain torch modules, and the engine-side undo log that makes a
sync all-or-nothing.

A sync is a session: ``begin()``, one ``load_weights`` call per bucket, then ``commit()`` (every bucket loaded) or
``rollback()`` (the sync failed or was interrupted). With ``atomic=True`` (the default) the loader copies each
engine tensor into a host buffer just before the session first overwrites it (``UndoLog``: one buffer per tensor,
kept and reused by later syncs, pinned for CUDA tensors), and ``rollback`` copies every overwritten tensor back, so
a failed sync ends with the engine on its previous weights, all of them. A call that fails part-way (an unknown
name, a wrong shape, an offloaded target) is refused before it copies anything, and inside a session the loader
rolls the whole session back itself. The extra memory is one host copy of every tensor a sync overwrites (at most
the whole model), allocated by the first sync and reused. The extra time: for GPU tensors, the device->host copies
of what a sync wrote are queued when it commits and run on a side stream while the engine serves, so a later sync
only waits for them if it starts before they finish (the first sync copies as it goes, like CPU tensors always do).

With ``atomic=False`` nothing is copied aside: a failed session leaves the engine with a mix of old and new weights,
so the loader marks it not consistent (``consistent`` is False, ``check_consistent()`` and the module's forward
raise ``MemmgrStateError``) until the next session commits. While a session is open the module does not serve
either (its weights are half old, half new). Calls outside a session (no ``begin()``) load as they come, each call
refused whole if any of its tensors does not fit.
"""
from __future__ import annotations

import difflib
import logging
from typing import Any, Iterable

import torch

from memmgr import arguments
from memmgr.errors import MemmgrInputError, MemmgrStateError

logger = logging.getLogger("memmgr")


class UndoLog:
    """Host copies of the engine tensors a sync overwrites, and their restoration.

    ``save(key, tensor)`` makes sure the host buffer of ``key`` holds ``tensor``'s value before the session first
    overwrites it; ``restore()`` copies every saved tensor back, in place; ``clear()`` ends the session (the buffers
    are kept for the next one); ``host_bytes`` is the memory the buffers hold (allocated at the first save of a key,
    reused while shape and dtype stay, pinned for GPU tensors).

    GPU tensors are copied aside ahead of time: ``snapshot()`` (called when a sync commits) queues a device->host
    copy of every tensor the session wrote, on a side stream, so that the copies run while the engine serves, off the
    next sync's critical path; that sync's ``save`` then finds the value in the buffer already and only orders the
    overwrite after the copy (one stream wait per session). A key whose snapshot is missing or stale (the first sync,
    a load outside a session) is copied at ``save`` time, on the current stream, as CPU tensors always are.
    """

    def __init__(self) -> None:
        self._buffers: dict[Any, torch.Tensor] = {}
        self._saved: dict[Any, torch.Tensor] = {}  # key -> the engine tensor saved in this session
        self._snapshot: dict[Any, torch.Tensor] = {}  # key -> the tensor whose value its buffer holds (or will)
        self._snapshot_done: dict[torch.device, torch.cuda.Event] = {}  # per GPU: the snapshot copies have finished
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._waited: set[torch.device] = set()  # GPUs whose current stream already waits for the snapshot

    @property
    def host_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    @property
    def saved(self) -> int:
        """How many tensors the open session has saved."""
        return len(self._saved)

    def __contains__(self, key: Any) -> bool:
        return key in self._saved

    def save(self, key: Any, tensor: torch.Tensor) -> None:
        if key in self._saved:
            return
        if self._snapshot.get(key) is tensor:
            # the buffer holds this tensor's value (or will, once the snapshot's copies finish): the overwrite that
            # follows on the current stream waits for them
            self._wait_for_snapshot(tensor.device)
        else:
            buf = self._buffer(key, tensor)
            if tensor.is_cuda:
                self._wait_for_snapshot(tensor.device)  # a snapshot copy into this buffer may still be queued
            with torch.no_grad():
                # queued on the current stream, where the loader then overwrites the tensor: the stream runs this
                # read first, so the host need not wait for each tensor's copy (the buffer is pinned on CUDA)
                buf.copy_(tensor.detach(), non_blocking=tensor.is_cuda)
        self._saved[key] = tensor

    def restore(self) -> int:
        """Copies every tensor saved in this session back; returns how many. Ends the session. The buffers then
        hold the engine's values, so they stay the snapshot of the tensors restored."""
        n = 0
        with torch.no_grad():
            for key, tensor in self._saved.items():
                tensor.copy_(self._buffers[key], non_blocking=tensor.is_cuda)
                self._snapshot[key] = tensor
                n += 1
            if any(t.is_cuda for t in self._saved.values()):
                torch.cuda.synchronize()
        self._saved.clear()
        self._waited.clear()
        return n

    def snapshot(self) -> None:
        """Ends a committed session: every tensor it wrote has a new value, so its buffer is stale; for a GPU tensor
        a copy of the new value is queued on a side stream, after the work queued so far, and the next session's
        ``save`` uses it. Buffers of tensors the session did not write stay current."""
        written, self._saved = self._saved, {}
        by_device: dict[torch.device, list[tuple[Any, torch.Tensor]]] = {}
        for key, tensor in written.items():
            self._snapshot.pop(key, None)
            if tensor.is_cuda:
                by_device.setdefault(tensor.device, []).append((key, tensor))
        for device, pairs in by_device.items():
            stream = self._streams.get(device) or self._streams.setdefault(device, torch.cuda.Stream(device))
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream), torch.no_grad():
                for key, tensor in pairs:
                    self._buffer(key, tensor).copy_(tensor.detach(), non_blocking=True)
                    self._snapshot[key] = tensor
                done = torch.cuda.Event()
                done.record(stream)
            self._snapshot_done[device] = done
        self._waited.clear()

    def forget_snapshot(self, key: Any) -> None:
        """``key``'s tensor was written outside a session: its buffer no longer holds its value."""
        self._snapshot.pop(key, None)

    def clear(self) -> None:
        self._saved.clear()
        self._waited.clear()

    def release(self) -> None:
        """Frees the host buffers (a later session allocates them again)."""
        for done in self._snapshot_done.values():
            done.synchronize()
        self._saved.clear()
        self._snapshot.clear()
        self._snapshot_done.clear()
        self._waited.clear()
        self._buffers.clear()

    def _buffer(self, key: Any, tensor: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
            if buf is not None and tensor.is_cuda:
                self._wait_for_snapshot(tensor.device, host=True)  # a snapshot copy may still write the old one
            pin = tensor.is_cuda and torch.cuda.is_available()
            buf = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
            self._buffers[key] = buf
        return buf

    def _wait_for_snapshot(self, device: torch.device, host: bool = False) -> None:
        done = self._snapshot_done.get(device)
        if done is None:
            return
        if host:
            done.synchronize()
        elif device not in self._waited:  # once per session: later work on the stream is ordered after it too
            torch.cuda.current_stream(device).wait_event(done)
            self._waited.add(device)


class ModuleWeightLoader:
    """``load_weights`` for a plain torch module: copies each (name, tensor) into the parameter or buffer of that
    name, bit for bit. A name the module lacks, or a shape or dtype that differs, raises MemmgrInputError naming the
    tensor and both shapes and dtypes, before any tensor of that call is copied; nothing is cast.

    Sessions (``begin``/``commit``/``rollback``, see the module docstring) make a multi-bucket sync all-or-nothing:
    ``atomic=True`` keeps a host copy of each tensor before the session first overwrites it and puts them all back
    on failure; ``atomic=False`` keeps none and marks the module not consistent (it refuses to run forward) after a
    failed session, until a session commits.
    """

    def __init__(self, module: torch.nn.Module, *, include_buffers: bool = True, atomic: bool = True):
        if not isinstance(module, torch.nn.Module):
            raise MemmgrInputError(f"ModuleWeightLoader takes a torch.nn.Module, got {type(module).__name__}")
        arguments.boolean("ModuleWeightLoader", "include_buffers", include_buffers)
        arguments.boolean("ModuleWeightLoader", "atomic", atomic)
        self.module = module
        self.atomic = atomic
        self._targets: dict[str, torch.Tensor] = dict(module.named_parameters())
        if include_buffers:
            for n, b in module.named_buffers():
                if b is not None:
                    self._targets.setdefault(n, b)
        self.loaded: set[str] = set()
        self.undo = UndoLog()
        self._session = False
        self._failed: str | None = None  # why the module is not consistent (a failed non-atomic session)
        module.register_forward_pre_hook(self._guard)

    # -- what the engine holds -----------------------------------------------------------------------------------------
    def expected(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Engine name -> (shape, dtype) of every tensor this loader can fill."""
        return {n: (tuple(t.shape), t.dtype) for n, t in self._targets.items()}

    def missing(self) -> list[str]:
        """Engine tensors no sync has filled yet."""
        return [n for n in self._targets if n not in self.loaded]

    # -- sessions ------------------------------------------------------------------------------------------------------
    @property
    def in_session(self) -> bool:
        return self._session

    @property
    def consistent(self) -> bool:
        """False while a session is open and after a failed session of a non-atomic loader (until one commits)."""
        return not self._session and self._failed is None

    def check_consistent(self, where: str = "the engine") -> None:
        """Raises MemmgrStateError unless the module's weights all come from one committed sync (or its start)."""
        if self._session:
            raise MemmgrStateError(f"{where}: a weight sync into {type(self.module).__name__} is in progress (begun, "
                                   f"not committed); its weights are part old, part new. Finish the sync first")
        if self._failed is not None:
            raise MemmgrStateError(f"{where}: {type(self.module).__name__} holds a mix of old and new weights after "
                                   f"a failed sync ({self._failed}) and atomic=False kept no copy to restore; sync "
                                   f"again (a committed sync makes it consistent) or use atomic=True")

    def _guard(self, module: torch.nn.Module, args: Any) -> None:
        if not self.consistent:
            self.check_consistent(f"{type(module).__name__}.forward")

    def begin(self) -> None:
        """Opens a sync session. A session still open (its sync was interrupted without rollback) is rolled back
        first."""
        if self._session:
            logger.warning("ModuleWeightLoader: a new sync begins while the previous one is still open; rolling the "
                           "previous one back")
            self.rollback("a new sync began before it finished")
        self.undo.clear()
        self._touched_in_session = False
        self._session = True

    def commit(self) -> None:
        """Ends the session: the loaded weights are the engine's weights, the module is consistent again. With
        ``atomic``, the host copies of what it wrote are refreshed in the background (``UndoLog.snapshot``)."""
        if self.atomic:
            self.undo.snapshot()
        else:
            self.undo.clear()
        self._session = False
        self._failed = None

    def rollback(self, reason: str = "the sync failed") -> int:
        """Ends the session after a failure: with ``atomic`` every tensor the session overwrote gets its previous
        value back (returns how many); without, the module is marked not consistent. No-op outside a session."""
        if not self._session:
            return 0
        self._session = False
        if not self.atomic:
            if not self._touched_in_session:
                return 0
            self._failed = reason
            logger.warning("ModuleWeightLoader: sync failed (%s) with atomic=False; %s holds a mix of old and new "
                           "weights and refuses to serve until a sync commits", reason, type(self.module).__name__)
            return 0
        n = self.undo.restore()
        logger.warning("ModuleWeightLoader: sync failed (%s); restored %d overwritten tensor(s) of %s to their "
                       "previous values", reason, n, type(self.module).__name__)
        return n

    # -- loading -------------------------------------------------------------------------------------------------------
    _touched_in_session = False

    def _check(self, pairs: list[tuple[str, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
        out = []
        for name, tensor in pairs:
            target = self._targets.get(name)
            if target is None:
                close = difflib.get_close_matches(name, list(self._targets), n=3)
                raise MemmgrInputError(
                    f"load_weights: {type(self.module).__name__} has no parameter or buffer {name!r} (received "
                    f"shape {tuple(tensor.shape)}, {tensor.dtype}){'; closest: ' + str(close) if close else ''}. "
                    f"Fix the name_map so trainer names map onto the engine's names")
            if tuple(target.shape) != tuple(tensor.shape) or target.dtype != tensor.dtype:
                raise MemmgrInputError(
                    f"load_weights: tensor {name!r} arrived as shape {tuple(tensor.shape)}, {tensor.dtype} but the "
                    f"engine's {name!r} is shape {tuple(target.shape)}, {target.dtype}; nothing is cast or "
                    f"reshaped. Build the engine with the trainer's architecture and dtype, or fix the name_map")
            if target.numel() and target.untyped_storage().nbytes() == 0:
                raise MemmgrStateError(f"load_weights: engine tensor {name!r} (shape {tuple(target.shape)}) has "
                                       f"no storage: it is offloaded. Onload the engine's weights before the sync")
            out.append((target, tensor, name))
        return out

    def __call__(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        try:
            pairs = list(arguments.named_tensors("load_weights", "weights", weights, list_pairs=False))
            checked = self._check(pairs)
        except Exception as exc:
            if self._session:
                self.rollback(f"{type(exc).__name__} in load_weights")
            raise
        try:
            with torch.no_grad():
                for target, tensor, name in checked:
                    if self._session:
                        self._touched_in_session = True
                        if self.atomic:
                            self.undo.save(name, target)
                    else:
                        self.undo.forget_snapshot(name)
                    target.copy_(tensor)
                    self.loaded.add(name)
        except Exception as exc:
            if self._session:
                self.rollback(f"{type(exc).__name__} while copying")
            raise


def module_load_weights(module: torch.nn.Module, *, include_buffers: bool = True,
                        atomic: bool = True) -> ModuleWeightLoader:
    """A ready ``load_weights`` for a plain torch module (see ModuleWeightLoader)."""
    return ModuleWeightLoader(module, include_buffers=include_buffers, atomic=atomic)


def begin_sync(load_weights: Any) -> None:
    """Opens a sync session on ``load_weights`` where it has sessions (``ModuleWeightLoader`` does)."""
    begin = getattr(load_weights, "begin", None)
    if callable(begin):
        begin()


def commit_sync(load_weights: Any) -> None:
    commit = getattr(load_weights, "commit", None)
    if callable(commit):
        commit()


def rollback_sync(load_weights: Any, reason: str = "the sync failed") -> None:
    rollback = getattr(load_weights, "rollback", None)
    if callable(rollback):
        rollback(reason)
