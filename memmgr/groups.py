"""What the manager needs from a state group, and the order in which groups should move.

A group is anything with this small surface; ``BucketizedFlatTensors`` is the main one. Integrations may add
others (e.g. gradients that are dropped by setting ``.grad = None`` rather than held in a buffer).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

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
