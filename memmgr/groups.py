"""What the manager needs from a state group, and the order in which groups should move.

A group is anything with this small surface; ``BucketizedFlatTensors`` is the main one. Integrations may add
others (e.g. gradients that are dropped by setting ``.grad = None`` rather than held in a buffer).
"""
from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable

import torch

from memmgr.flat_tensors import BucketState, Policy
from memmgr.transfer import TransferHandle

# Lower moves first on offload (frees memory soonest, copies least) and last on onload.
DEFAULT_PRIORITY = {
    "grads": 0, "grad_buffers": 0,
    "optimizer_states": 10,
    "main_weights": 20,
    "weights": 30,
}


@runtime_checkable
class StateGroup(Protocol):
    name: str
    policy: Policy

    def offload(self, non_blocking: bool = False, discard: bool | None = None) -> TransferHandle: ...

    def onload(self, non_blocking: bool = False) -> TransferHandle: ...

    @property
    def state(self) -> BucketState: ...

    @property
    def nbytes(self) -> int: ...

    @property
    def device_bytes(self) -> int: ...

    @property
    def host_bytes(self) -> int: ...

    @property
    def named_tensors(self) -> list[tuple[str, torch.Tensor]]: ...


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


class DroppedTensors:
    """A discard group whose offload drops references (``.grad`` attributes, cache entries) instead of copying;
    the framework re-creates the tensors when it next needs them, as it would after ``zero_grad(set_to_none=True)``.

    Subclasses say which tensors the group holds (``_tensors``), how to drop them (``_drop``) and, optionally, which
    storages belong to another group (``_exclude``: e.g. gradients that view a flat gradient buffer free nothing)."""

    policy = Policy.DISCARD

    def __init__(self, name: str):
        self.name = name
        self._dropped = False

    def _tensors(self) -> list[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def _drop(self) -> None:
        raise NotImplementedError

    def _exclude(self) -> set[int]:
        return set()

    def offload(self, non_blocking: bool = False, discard: bool | None = None) -> TransferHandle:
        self._drop()
        self._dropped = True
        return TransferHandle.completed()

    def onload(self, non_blocking: bool = False) -> TransferHandle:
        self._dropped = False
        return TransferHandle.completed()

    @property
    def state(self) -> BucketState:
        return BucketState.DISCARDED if self._dropped else BucketState.ON_DEVICE

    @property
    def nbytes(self) -> int:
        return self.device_bytes

    @property
    def device_bytes(self) -> int:
        return unique_storage_bytes((t for _, t in self._tensors()), self._exclude())

    @property
    def host_bytes(self) -> int:
        return 0

    @property
    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return self._tensors()
