"""Checks that tensors can be managed: the arguments a group is built from, and whether coalescing or adopting them
is safe.

``tensors_argument`` and ``name_tensors`` turn a group's ``tensors`` argument into (name, tensor) pairs;
``validate_tensors`` refuses tensors that cannot be coalesced into a flat bucket without losing data or detaching
references (quantized, wrapper subclasses, sparse, meta, non-contiguous, repeated, already managed, freed, or sharing a
storage that something outside the group still holds). ``check_bucket_items``, ``check_adoptable`` and
``check_buffers_adoptable`` check the arguments of one bucket's coalescing and of adopting flat buffers. The reference
counts (``storage_use_count``, ``hidden_bases``) are also what ``FlatTensors.outside_references`` counts with.
Nothing here changes a tensor.
"""
from __future__ import annotations

import sys
from typing import Mapping, Sequence, Union

import torch

from memmgr import storages
from memmgr.errors import MemmgrInputError

TensorsArg = Union[Sequence[torch.Tensor], Mapping[str, torch.Tensor]]


def storage_use_count(tensor: torch.Tensor) -> int:
    """References to ``tensor``'s storage, as PyTorch counts them (``PROBE_REFS`` of them are this measurement's)."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


# References the measurement itself adds (the temporary storage wrapper), calibrated on this torch build.
PROBE_REFS = storage_use_count(torch.empty(1)) - 1


def describe_tensor(name: str, tensor: torch.Tensor) -> str:
    """How error messages name a tensor: its name, shape, dtype and device."""
    return f"tensor {name!r} (shape {tuple(tensor.shape)}, {tensor.dtype}, {tensor.device})"


def tensors_argument(tensors: object, group: str) -> TensorsArg:
    """``tensors`` as a list or a dict of tensors: any other iterable (a generator, ``module.parameters()``) is read
    once into a list here, so that checking it does not use it up. MemmgrInputError for anything else."""
    if isinstance(tensors, torch.Tensor):
        raise MemmgrInputError(f"group {group!r}: expected a list or dict of tensors, got a single tensor; "
                               f"wrap it in a list")
    if isinstance(tensors, (list, tuple, Mapping)):
        return tensors  # type: ignore[return-value]
    if isinstance(tensors, (str, bytes)) or not hasattr(tensors, "__iter__"):
        raise MemmgrInputError(f"group {group!r}: expected a list or dict of tensors, got "
                               f"{type(tensors).__name__}; pass e.g. list(module.parameters())")
    return list(tensors)  # type: ignore[call-overload]


def name_tensors(tensors: TensorsArg, group: str) -> list[tuple[str, torch.Tensor]]:
    tensors = tensors_argument(tensors, group)
    if isinstance(tensors, Mapping):
        items = list(tensors.items())
    else:
        items = [(f"{group}[{i}]", t) for i, t in enumerate(tensors)]
    for name, tensor in items:
        if not isinstance(name, str):
            raise MemmgrInputError(f"group {group!r}: tensor names must be str, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise MemmgrInputError(f"group {group!r}: item {name!r} is a {type(tensor).__name__}, not a "
                                   f"torch.Tensor; pass tensors only")
    return items


def hidden_bases(tensors: list[torch.Tensor], known: set[int]) -> dict[int, torch.Tensor]:
    """The view bases of ``tensors`` that are not in ``known`` (ids): each holds the storage too, though nothing
    but its view reaches it (a checkpoint loader's state rebuilt as views of a flattened tensor)."""
    bases: dict[int, torch.Tensor] = {}
    for tensor in tensors:
        base = tensor._base
        if base is not None and id(base) not in known:
            bases[id(base)] = base
    return bases


def _base_refs_baseline() -> int:
    """Python references to a view base that nobody else holds, counted as ``_held_bases`` counts them (its dict
    entry and getrefcount's argument), calibrated on this interpreter."""
    def views() -> tuple[torch.Tensor, torch.Tensor]:
        base = torch.empty(2)
        return base[:1], base[1:]
    first, _second = views()
    probe = {0: first._base}
    return sys.getrefcount(probe[0])


def _held_bases(bases: dict[int, torch.Tensor]) -> int:
    """How many of ``bases`` (view bases nothing in the group holds) a Python object outside the group still
    references, e.g. the caller's ``base`` whose slices are being coalesced: rebinding the slices would then free
    memory the caller still reads."""
    return sum(1 for key in bases if sys.getrefcount(bases[key]) > _BASE_REFS)


_BASE_REFS = _base_refs_baseline()


def _is_wrapper_subclass(tensor: torch.Tensor) -> bool:
    """A tensor subclass that dispatches through Python (DTensor, float8 and other wrapper tensors): its data is
    not the storage memmgr would view."""
    return torch._C._dispatch_keys(tensor).has(torch._C.DispatchKey.Python)


def _byte_range(tensor: torch.Tensor) -> tuple[int, int]:
    start = tensor.storage_offset() * tensor.element_size()
    return start, start + tensor.numel() * tensor.element_size()


def validate_tensors(items: list[tuple[str, torch.Tensor]], group: str) -> None:
    """Raises MemmgrInputError if any tensor cannot be coalesced safely; changes nothing.

    Tensors that view one storage are accepted when they do not overlap and nothing else holds that storage (a
    checkpoint's optimizer state loaded by ``torch.load``, the tensors of a closed manager's bucket): coalescing
    then keeps every one of them, and frees the old storage."""
    storages_seen: dict[int, list[tuple[str, torch.Tensor]]] = {}
    seen: dict[int, str] = {}
    for name, tensor in items:
        if tensor.is_quantized:
            raise MemmgrInputError(f"group {group!r}: {describe_tensor(name, tensor)} is quantized "
                                   f"({tensor.qscheme()}); a flat bucket holds plain tensors only. Keep quantized "
                                   f"tensors out of the group or dequantize them (t.dequantize())")
        if _is_wrapper_subclass(tensor):
            raise MemmgrInputError(f"group {group!r}: {describe_tensor(name, tensor)} is a {type(tensor).__name__}, a "
                                   f"tensor subclass whose storage memmgr cannot view into a flat bucket; pass "
                                   f"plain tensors or parameters (e.g. its local tensor)")
        if tensor.layout != torch.strided:
            raise MemmgrInputError(f"group {group!r}: {describe_tensor(name, tensor)} is {tensor.layout}; only dense "
                                   f"(strided) tensors can live in a flat bucket. Convert it with .to_dense()")
        if tensor.device.type == "meta":
            raise MemmgrInputError(f"group {group!r}: {describe_tensor(name, tensor)} is on the meta device and has no "
                                   f"memory to manage; materialize it first")
        if not tensor.is_contiguous():
            raise MemmgrInputError(f"group {group!r}: {describe_tensor(name, tensor)} is not contiguous (stride "
                                   f"{tensor.stride()}) and cannot be viewed into a flat bucket. Make it "
                                   f"contiguous first (t.data = t.data.contiguous())")
        if id(tensor) in seen:
            raise MemmgrInputError(f"group {group!r}: {describe_tensor(name, tensor)} appears twice (also as "
                                   f"{seen[id(tensor)]!r}); pass each tensor once")
        seen[id(tensor)] = name
        owner = storages.owner_of(tensor)
        if owner is not None:
            raise MemmgrInputError(f"group {group!r}: {describe_tensor(name, tensor)} is already managed by bucket "
                                   f"{owner.name!r} (of this manager or another one); a tensor can belong to one "
                                   f"group only. Close the other manager first (mgr.close())")
        nbytes = tensor.untyped_storage().nbytes()
        if tensor.numel() > 0 and nbytes < _byte_range(tensor)[1]:
            raise MemmgrInputError(f"group {group!r}: {describe_tensor(name, tensor)} has no memory behind it "
                                   f"(its storage holds {nbytes} bytes; freed in place by an offload or another "
                                   f"tool); restore it before managing it")
        if nbytes > 0:
            storages_seen.setdefault(storages.storage_key(tensor), []).append((name, tensor))
    for shared in storages_seen.values():
        names = [n for n, _ in shared]
        bases = hidden_bases([t for _, t in shared], {id(t) for _, t in shared})
        extra = storage_use_count(shared[0][1]) - len(shared) - len(bases) - PROBE_REFS + _held_bases(bases)
        if len(shared) > 1:
            ranges = sorted((_byte_range(t), n) for n, t in shared)
            overlapping = [(a[1], b[1]) for a, b in zip(ranges, ranges[1:]) if b[0][0] < a[0][1]]
            if overlapping:
                raise MemmgrInputError(f"group {group!r}: tensors {names} share one storage and {overlapping[0]} "
                                       f"overlap (views of each other); coalescing would separate them. Pass their "
                                       f"base tensor once, or clone them")
            if extra > 0:
                raise MemmgrInputError(
                    f"group {group!r}: tensors {names} share one storage (views of each other), which is also held "
                    f"by {extra} other reference(s) outside the group; coalescing would silently detach them. Pass "
                    f"their base tensor once, drop the other references, or clone them")
        elif extra > 0:
            name, tensor = shared[0]
            raise MemmgrInputError(
                f"group {group!r}: the storage of {describe_tensor(name, tensor)} is also held by {extra} other "
                f"reference(s) outside the group (a view, its base tensor, or a tensor autograd saved for an "
                f"unfinished backward). Coalescing would silently detach them. Finish the backward pass, drop the "
                f"other references, or pass the base tensor instead")


def check_bucket_items(items: object, name: str) -> None:
    """Raises MemmgrInputError unless ``items`` are (name, tensor) pairs, at least one, all of one device and dtype:
    what one bucket (``FlatTensors.coalesce``) holds."""
    if not isinstance(items, (list, tuple)) or not all(
            isinstance(i, tuple) and len(i) == 2 and isinstance(i[1], torch.Tensor) for i in items):
        raise MemmgrInputError(f"bucket {name!r}: items must be a list of (name, tensor) pairs")
    if not items:
        raise MemmgrInputError(f"bucket {name!r}: no tensors to coalesce")
    device, dtype = items[0][1].device, items[0][1].dtype
    for tname, tensor in items:
        if tensor.device != device:
            raise MemmgrInputError(f"bucket {name!r}: {describe_tensor(tname, tensor)} is on {tensor.device} but the "
                                   f"bucket is on {device}; one bucket holds tensors of one device "
                                   f"(BucketizedFlatTensors groups them for you)")
        if tensor.dtype != dtype:
            raise MemmgrInputError(f"bucket {name!r}: {describe_tensor(tname, tensor)} is {tensor.dtype} but the "
                                   f"bucket is {dtype}; use BucketizedFlatTensors for mixed dtypes")


def check_adoptable(buffer: object, name: str) -> None:
    """Raises MemmgrInputError unless ``buffer`` is a dense, 1-D, contiguous tensor that spans its whole storage: a
    buffer ``FlatTensors.adopt`` can free and restore in place without touching memory outside it."""
    if not isinstance(buffer, torch.Tensor):
        raise MemmgrInputError(f"bucket {name!r}: adopt() takes a tensor, got {type(buffer).__name__}")
    if buffer.layout != torch.strided or buffer.device.type == "meta":
        raise MemmgrInputError(f"bucket {name!r}: {describe_tensor(name, buffer)} is {buffer.layout} on "
                               f"{buffer.device}; only dense buffers with memory can be adopted")
    if buffer.dim() != 1 or not buffer.is_contiguous():
        raise MemmgrInputError(f"bucket {name!r}: {describe_tensor(name, buffer)} is not a 1-D contiguous buffer; "
                               f"only flat buffers can be adopted")
    nbytes = buffer.numel() * buffer.element_size()
    if buffer.storage_offset() != 0 or buffer.untyped_storage().nbytes() != nbytes:
        raise MemmgrInputError(
            f"bucket {name!r}: {describe_tensor(name, buffer)} covers {nbytes} of its storage's "
            f"{buffer.untyped_storage().nbytes()} bytes (offset {buffer.storage_offset()}); freeing the storage "
            f"would free memory outside it. Adopt the tensor that owns the whole storage")


def check_buffers_adoptable(items: list[tuple[str, torch.Tensor]], group: str) -> None:
    """Raises MemmgrInputError, before anything is adopted, if a buffer of group ``group`` is not dense, is managed
    already, or is the same storage as another of ``items`` (``BucketizedFlatTensors.from_buffers``)."""
    keys: dict[int, str] = {}
    for bname, buffer in items:
        if buffer.layout != torch.strided or buffer.device.type == "meta":
            raise MemmgrInputError(f"group {group!r}: {describe_tensor(bname, buffer)} is {buffer.layout} on "
                                   f"{buffer.device}; only dense buffers with memory can be adopted")
        owner = storages.owner_of(buffer)
        if owner is not None:
            raise MemmgrInputError(f"group {group!r}: buffer {bname!r} is already managed by bucket {owner.name!r} "
                                   f"(of this manager or another one); a storage can be freed and restored by "
                                   f"one bucket only. Pass it once, or close the other manager first")
        key = storages.storage_key(buffer)
        if key in keys:
            raise MemmgrInputError(f"group {group!r}: buffers {keys[key]!r} and {bname!r} are the same storage "
                                   f"(a buffer and a view of it); adopt it once")
        keys[key] = bname
