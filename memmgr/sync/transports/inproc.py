"""The in-process transport: the engine lives in the trainer's process (a hybrid engine), so a bucket is handed to
its ``load_weights`` directly, as ``(name, view)`` pairs into the bucket. Nothing is copied on the way.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from memmgr.errors import MemmgrInputError, MemmgrSyncError
from memmgr.sync.loaders import begin_sync, commit_sync, rollback_sync
from memmgr.sync.transports.base import ParamSpec, Transport, WeightBucket

logger = logging.getLogger("memmgr")

LoadWeights = Callable[[Iterable[tuple[str, torch.Tensor]]], Any]


class InProcessTransport(Transport):
    """Calls ``load_weights(list of (name, view))`` once per bucket.

    The views alias the bucket: ``load_weights`` must copy what it keeps (vLLM's ``model.load_weights`` and
    ``memmgr.sync.ModuleWeightLoader`` do). An exception from ``load_weights`` becomes a ``MemmgrSyncError`` naming
    the bucket's tensors; the original exception is its cause. ``held`` (name -> (shape, dtype); by default
    ``load_weights.expected()`` where it has one, as ``ModuleWeightLoader`` does) is checked at ``start``, before
    any weight moves.

    Where ``load_weights`` keeps sync sessions (``ModuleWeightLoader``: ``begin``/``commit``/``rollback``), ``start``
    opens one, ``finish`` commits it, and a failing bucket or ``abort`` rolls it back: with an atomic loader (the
    default) every tensor the sync overwrote gets its previous value back, so a failed sync leaves the engine on its
    previous weights, all of them.
    """

    name = "inproc"

    def __init__(self, load_weights: LoadWeights, *,
                 held: Mapping[str, tuple[Sequence[int], torch.dtype]] | None = None):
        if not callable(load_weights):
            raise MemmgrInputError(f"InProcessTransport takes a load_weights callable (e.g. a vLLM model's "
                                   f"load_weights or memmgr.sync.ModuleWeightLoader(module)), got "
                                   f"{type(load_weights).__name__}")
        self.load_weights = load_weights
        expected = getattr(load_weights, "expected", None)
        self.held = held if held is not None else (expected() if callable(expected) else None)
        self.buckets = 0
        self.nbytes = 0
        self._closed = False

    def start(self, specs: Sequence[ParamSpec]) -> None:
        super().start(specs)
        self.buckets = 0
        self.nbytes = 0
        begin_sync(self.load_weights)

    def finish(self) -> None:
        commit_sync(self.load_weights)

    def abort(self, reason: str = "the sync failed") -> None:
        try:
            rollback_sync(self.load_weights, reason)
        except Exception as exc:  # abort never raises: the caller is already handling a failure
            logger.warning("in-process weight sync: rolling the engine back failed: %s", exc)

    def send_bucket(self, bucket: WeightBucket) -> None:
        if self._closed:
            raise MemmgrSyncError("InProcessTransport.send_bucket: the transport is closed; build a new one")
        pairs = bucket.views()
        try:
            with torch.no_grad():
                self.load_weights(pairs)
        except Exception as exc:
            self.abort(f"load_weights raised {type(exc).__name__} on bucket {self.buckets}")
            names = [n for n, _ in pairs]
            named = [n for n in names if n in str(exc)]
            shown = named or names[:5]
            more = " ..." if len(names) > 5 and not named else ""
            raise MemmgrSyncError(
                f"in-process weight sync: load_weights raised {type(exc).__name__}: {exc} while loading bucket "
                f"{self.buckets} ({bucket.dtype}, tensors {shown}{more}); "
                f"{_after_failure(self.load_weights)}. Fix the cause and sync again") from exc
        self.buckets += 1
        self.nbytes += bucket.payload_bytes

    def close(self) -> None:
        self._closed = True


def _after_failure(load_weights: Any) -> str:
    if not callable(getattr(load_weights, "rollback", None)):
        return "the engine holds the buckets before this one (its load_weights keeps no sync session to undo them)"
    if getattr(load_weights, "atomic", False):
        return "every tensor the sync overwrote was put back: the engine holds its previous weights"
    return "the engine (atomic=False) holds a mix of old and new weights and refuses to serve until a sync commits"


__all__ = ["InProcessTransport"]
