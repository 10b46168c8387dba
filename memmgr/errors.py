"""The errors memmgr raises: one base class, one subclass per kind of failure.

Every message names the tensor, group or state concerned and says what to do about it.
"""
from __future__ import annotations


class MemmgrError(Exception):
    """Base class of every error raised by memmgr."""


class MemmgrInputError(MemmgrError, ValueError):
    """An argument cannot be managed (wrong type, layout, device, aliasing, unknown name)."""


class MemmgrStateError(MemmgrError, RuntimeError):
    """An operation does not fit the current state (closed manager, transfer in flight, discarded contents)."""


class MemmgrOutOfMemoryError(MemmgrError, RuntimeError):
    """The GPU lacks room to onload a group; the host copy is intact and nothing was half-restored."""

    def __init__(self, message: str, *, group: str, bytes_needed: int, bytes_free: int | None):
        super().__init__(message)
        self.group = group
        self.bytes_needed = bytes_needed
        self.bytes_free = bytes_free


class MemmgrHostMemoryError(MemmgrError, RuntimeError):
    """Host memory for the offloaded copy could not be allocated or pinned."""


class MemmgrCorruptionError(MemmgrError, RuntimeError):
    """A checksum taken at offload does not match the contents restored at onload."""


class MemmgrIntegrationError(MemmgrError, TypeError):
    """A framework object (model, optimizer) is of a kind an integration does not know how to manage."""


class MemmgrSyncError(MemmgrError, RuntimeError):
    """A weight sync failed on this rank or on the other side of the group; the message says where and why."""


class MemmgrSyncMismatchError(MemmgrSyncError, ValueError):
    """The weights a trainer is about to send do not fit what the engine holds (a name it lacks or is missing, a
    shape or dtype that differs). Raised before any weight moves; the engine keeps its previous weights."""


class MemmgrSyncTimeoutError(MemmgrSyncError, TimeoutError):
    """A peer of the weight sync did not answer in time; the message names the rank and the step it was in."""
