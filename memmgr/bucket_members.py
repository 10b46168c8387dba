"""The tensors of one bucket (``memmgr.bucket.FlatTensors``) and how each viewed the bucket when it joined.

``BucketMembers`` is a list of ``(name, tensor, element offset)`` entries with the layout each member joined with
(shape, dtype, storage offset). ``check(moving, base)`` is a move's precondition: every member still views the
bucket so. A member resized, or given other memory (``.data = ...``, ``set_()``) since it joined, is refused by name
(MemmgrStateError) instead of being truncated or left behind on the device unmanaged.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from memmgr.errors import MemmgrStateError
from memmgr.tensor_checks import describe_tensor, hidden_bases

Member = tuple[str, torch.Tensor, int]  # (name, tensor, element offset in the bucket)


class BucketMembers:
    """The members of bucket ``bucket_name`` in the order they joined; iterates, indexes and counts like a list."""

    def __init__(self, bucket_name: str, members: list[Member]):
        self.bucket_name = bucket_name
        self._entries = list(members)
        self._layout = [(t.shape, t.dtype, t.storage_offset()) for _, t, _ in self._entries]
        self._index()

    def __iter__(self) -> Iterator[Member]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> Member:
        return self._entries[index]

    def tensors(self) -> list[torch.Tensor]:
        return [t for _, t, _ in self._entries]

    def append(self, name: str, tensor: torch.Tensor, offset: int) -> None:
        """Adds a member that views the bucket at element ``offset`` now."""
        self._entries.append((name, tensor, offset))
        self._layout.append((tensor.shape, tensor.dtype, tensor.storage_offset()))
        self._index()

    def clear(self) -> None:
        self._entries = []
        self._layout = []
        self._index()

    def _index(self) -> None:
        self._nbytes = [math.prod(shape) * dtype.itemsize for shape, dtype, _ in self._layout]
        self._byte_offsets = [offset * dtype.itemsize for _, dtype, offset in self._layout]
        self._pointers: tuple[int, list[int]] = (-1, [])
        self._hidden_base_count: int | None = None

    def _pointers_from(self, base: int) -> list[int]:
        """Where each member's data starts while the bucket's storage starts at ``base`` (kept for the last base)."""
        if self._pointers[0] != base:
            self._pointers = (base, [base + off for off in self._byte_offsets])
        return self._pointers[1]

    def check(self, moving: str, base: int) -> None:
        """Raises MemmgrStateError, naming the member, unless every member still views the bucket as it did when it
        joined: the same shape and dtype and, for an offload (``moving == "offload"``; ``base``: the bucket's data
        pointer), the same place in the bucket's memory. One pass over the members."""
        tensors = self.tensors()
        # The common case in two list comparisons (this runs on every move, over every member; a tensor's nbytes and
        # data_ptr are cheap to read, its shape is not); the loop below only names the member that changed. A member
        # that still spans the same bytes at the same place moves losslessly, whatever shape it is viewed with now.
        if [x.nbytes for x in tensors] == self._nbytes:
            if moving != "offload":
                return
            if [x.data_ptr() for x in tensors] == self._pointers_from(base) or \
                    all(x.data_ptr() == base + off or not x.numel() for x, off in zip(tensors, self._byte_offsets)):
                return
        # One data pointer per member: on the device it is the bucket's address plus the member's offset exactly
        # when the member still views the bucket there (a rebound member has memory of its own elsewhere).
        for (mname, tensor, _), (shape, dtype, offset) in zip(self._entries, self._layout):
            if tensor.shape != shape or tensor.dtype != dtype:
                raise MemmgrStateError(
                    f"bucket {self.bucket_name!r}: tensor {mname!r} is now {tuple(tensor.shape)} {tensor.dtype} but "
                    f"joined the bucket as {tuple(shape)} {dtype} (`resize_`, `set_` or `.data = ...` since); its "
                    f"bucket holds only the old extent, so moving it would truncate it or read past it. Write new "
                    f"values in place (`with torch.no_grad(): t.copy_(new)`), or close this manager (mgr.close()) and "
                    f"build a new one, which manages the tensor as it is now. Nothing was moved")
            if moving == "offload" and tensor.data_ptr() != base + offset * tensor.element_size() and tensor.numel():
                raise MemmgrStateError(
                    f"bucket {self.bucket_name!r}: {describe_tensor(mname, tensor)} no longer views the bucket's "
                    f"memory: it was given other memory (`.data = ...`, `set_()`) since it joined. Offloading would "
                    f"leave that memory on the device, unmanaged. Write new values in place instead (`with "
                    f"torch.no_grad(): t.copy_(new)`), or close this manager (mgr.close()) and build a new one, which "
                    f"manages the tensor as it is now. Nothing was moved")

    def hidden_base_count(self, flat: torch.Tensor) -> int:
        """How many view bases the members hold that are neither members nor ``flat`` (the bucket's buffer): counted
        once per member list, since a tensor's view base does not change (a member given other memory since is
        refused by ``check`` before anything moves)."""
        if self._hidden_base_count is None:
            tensors = self.tensors()
            self._hidden_base_count = len(hidden_bases(tensors, {id(t) for t in tensors} | {id(flat)}))
        return self._hidden_base_count
