"""The states a bucket and a group of buckets can be in, and the policy that says how a unit leaves the device."""
from __future__ import annotations

import enum
from typing import Iterable

from memmgr.errors import MemmgrInputError


class BucketState(enum.Enum):
    """Where one movable unit's contents are."""

    ON_DEVICE = "on_device"
    OFFLOADING = "offloading"   # device->host copy in flight; storage already handed back to the allocator
    ON_HOST = "on_host"
    DISCARDED = "discarded"     # freed without a copy; onload re-allocates and zeroes
    ONLOADING = "onloading"     # host->device copy in flight; ordered before later work on the current stream

    @property
    def holds_device_memory(self) -> bool:
        return self in (BucketState.ON_DEVICE, BucketState.ONLOADING)

    def settled(self) -> "BucketState":
        """The state this one ends in once its transfer completes (what an undone onload returns to)."""
        return {BucketState.OFFLOADING: BucketState.ON_HOST,
                BucketState.ONLOADING: BucketState.ON_DEVICE}.get(self, self)


class GroupState(enum.Enum):
    """Where a group's units are: one BucketState for all of them, or PARTIAL when some are on the device and others
    off (the normal result of a budgeted offload)."""

    ON_DEVICE = "on_device"
    OFFLOADING = "offloading"
    ON_HOST = "on_host"
    DISCARDED = "discarded"
    ONLOADING = "onloading"
    PARTIAL = "partial"

    @classmethod
    def of(cls, states: Iterable[BucketState]) -> "GroupState":
        """The group state of units in ``states``: a transfer in flight wins, then a uniform state; host and discarded
        units together are ON_HOST; units on and off the device together are PARTIAL. No units: ON_DEVICE."""
        found = set(states)
        if not found:
            return cls.ON_DEVICE
        if len(found) == 1:
            return cls(found.pop().value)
        for in_flight in (BucketState.OFFLOADING, BucketState.ONLOADING):
            if in_flight in found:
                return cls(in_flight.value)
        if found <= {BucketState.ON_HOST, BucketState.DISCARDED}:
            return cls.ON_HOST
        return cls.PARTIAL

    @property
    def holds_device_memory(self) -> bool:
        """True if any of the group's memory is (or is becoming) resident on the device."""
        return self in (GroupState.ON_DEVICE, GroupState.ONLOADING, GroupState.PARTIAL)


class Policy(str, enum.Enum):
    """How a unit leaves the device: its contents are copied to host memory, or dropped (re-zeroed at onload)."""

    COPY = "copy"
    DISCARD = "discard"


def policy_from(policy: Policy | str, group: str) -> Policy:
    """``policy`` as a Policy; MemmgrInputError naming the group and the choices if it is none."""
    try:
        return Policy(policy)
    except (ValueError, TypeError):
        raise MemmgrInputError(f"group {group!r}: unknown policy {policy!r}; use one of "
                               f"{[p.value for p in Policy]}") from None
