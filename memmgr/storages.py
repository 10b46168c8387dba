"""Which storages memmgr manages, and what copying or pickling one of their tensors does while it is offloaded.

Every bucket registers the storage it frees and restores in place (``register``); a storage belongs to one live
bucket at a time, so two groups or two managers cannot both free the same memory (the second ``register`` raises).
``owner_of(tensor)`` finds the bucket behind any view of a registered storage.

An offloaded tensor keeps its shape over a storage of zero bytes, and most kernels do not check bounds: a
``clone()`` of it reads freed memory. Deep copies and pickles are what a user's code does without knowing where a
tensor is (``copy.deepcopy(model)``, ``torch.save(state_dict)``), so ``install_tensor_guard`` makes those two
safe for every tensor with no memory behind it:

- a tensor of an offloaded bucket is read from the bucket's host copy (``owner.host_copy(tensor)``): a deep copy
  gets the contents on the tensor's own device, a pickle (``torch.save``) a CPU tensor with the same contents;
  a discarded bucket's tensors read as zeros, which is what its onload restores;
- any other tensor whose storage holds fewer bytes than its shape needs raises ``MemmgrStateError`` instead of
  crashing the process.

Tensors with memory behind them take PyTorch's own path unchanged; the check costs one storage lookup.
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Protocol

import torch

from memmgr.errors import MemmgrInputError, MemmgrStateError


class StorageOwner(Protocol):
    """What the registry needs of a bucket."""

    name: str

    def host_copy(self, tensor: torch.Tensor) -> torch.Tensor: ...


_owners: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
_lock = threading.Lock()


def storage_key(tensor: torch.Tensor) -> int:
    """An identity of the storage behind ``tensor`` that every view of it shares and that a resize keeps."""
    return tensor.untyped_storage()._cdata


def register(tensor: torch.Tensor, owner: StorageOwner) -> int:
    """Records ``owner`` as the one bucket that moves ``tensor``'s storage; MemmgrInputError if a live bucket
    already does. Returns the storage key."""
    key = storage_key(tensor)
    with _lock:
        other = _owners.get(key)
        if other is not None and other is not owner:
            raise MemmgrInputError(
                f"bucket {owner.name!r}: its storage is already managed by bucket {other.name!r} (the same buffer, "
                f"or a view of it, adopted or coalesced twice, by this manager or another one). A storage can be "
                f"freed and restored by one bucket only: pass it once, or close the other manager first")
        _owners[key] = owner
    install_tensor_guard()
    return key


def unregister(key: int, owner: StorageOwner) -> None:
    with _lock:
        if _owners.get(key) is owner:
            del _owners[key]


def owner_of(tensor: torch.Tensor) -> StorageOwner | None:
    """The live bucket whose storage ``tensor`` views, or None."""
    try:
        key = storage_key(tensor)
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested or other storage-less tensors
        return None
    return _owners.get(key)


def _needs_bytes(tensor: torch.Tensor) -> int:
    if tensor.numel() == 0:
        return 0
    extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))
    return (tensor.storage_offset() + extent) * tensor.element_size()


def substitute(tensor: torch.Tensor) -> torch.Tensor | None:
    """None if ``tensor`` has the memory its shape needs (the normal case); else its contents read from the host
    copy of the bucket that offloaded it, as a CPU tensor of the same shape and dtype. MemmgrStateError if there is
    no such copy."""
    if type(tensor) is not torch.Tensor and not isinstance(tensor, torch.nn.Parameter):
        return None  # subclasses (fake, functional, DTensor) manage their own storage
    if tensor.layout is not torch.strided or tensor.device.type == "meta":
        return None
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    if storage.nbytes() >= _needs_bytes(tensor):
        return None
    owner = _owners.get(storage._cdata)
    if owner is None:
        raise MemmgrStateError(
            f"tensor (shape {tuple(tensor.shape)}, {tensor.dtype}, {tensor.device}) has no memory behind it (its "
            f"storage holds {storage.nbytes()} of the {_needs_bytes(tensor)} bytes it needs: freed in place by an "
            f"offload); copying or pickling it would read freed memory. Onload its group first")
    return owner.host_copy(tensor)


_installed = False
_originals: dict[str, Callable[..., Any]] = {}


def install_tensor_guard() -> None:
    """Routes ``copy.deepcopy`` and pickling (``torch.save``) of tensors without memory behind them through
    ``substitute`` (see the module docstring). Idempotent."""
    global _installed
    if _installed:
        return
    with _lock:
        if _installed:
            return
        tensor_deepcopy = torch.Tensor.__deepcopy__
        tensor_reduce_ex = torch.Tensor.__reduce_ex__
        param_deepcopy = torch.nn.Parameter.__deepcopy__

        def __deepcopy__(self: torch.Tensor, memo: dict) -> torch.Tensor:
            if id(self) in memo:
                return memo[id(self)]
            sub = substitute(self)
            if sub is None:
                return tensor_deepcopy(self, memo)
            result = sub.to(self.device, copy=True)
            if self.requires_grad and self.is_leaf:
                result.requires_grad_(True)
            memo[id(self)] = result
            return result

        def __reduce_ex__(self: torch.Tensor, proto: int) -> Any:
            sub = substitute(self)
            if sub is None:
                return tensor_reduce_ex(self, proto)
            if self.requires_grad and self.is_leaf:
                sub.requires_grad_(True)
            return tensor_reduce_ex(sub, proto)

        def parameter_deepcopy(self: torch.nn.Parameter, memo: dict) -> torch.nn.Parameter:
            if id(self) in memo:
                return memo[id(self)]
            sub = substitute(self)
            if sub is None:
                return param_deepcopy(self, memo)
            result = type(self)(sub.to(self.device, copy=True), self.requires_grad)
            memo[id(self)] = result
            return result

        _originals.update(tensor_deepcopy=tensor_deepcopy, tensor_reduce_ex=tensor_reduce_ex,
                          param_deepcopy=param_deepcopy)
        torch.Tensor.__deepcopy__ = __deepcopy__  # type: ignore[method-assign]
        torch.Tensor.__reduce_ex__ = __reduce_ex__  # type: ignore[method-assign]
        torch.nn.Parameter.__deepcopy__ = parameter_deepcopy  # type: ignore[method-assign]
        _installed = True
