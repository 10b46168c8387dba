"""A debug guard that turns a read of an offloaded tensor into ``MemmgrStateError`` instead of a crash.

An offload frees a bucket's device storage in place (``untyped_storage().resize_(0)``): every managed tensor keeps
its shape over a storage of zero bytes, and most kernels do not check bounds, so ``model(x)``, ``optimizer.step()``
or ``print(p)`` while the group is offloaded read freed memory and usually kill the process (a segfault on the CPU
path, an illegal memory access on a GPU). ``install(manager)`` makes such a read raise ``MemmgrStateError`` naming
the tensor (its name in the group), the group and the fix (onload the group first).

How it works. ``install`` registers ``after_offload``, ``after_onload`` and ``after_weight_sync`` hooks on the
manager (its public hook API). After each, the guard lists the buckets of the manager's groups that are off the
device (a unit's ``state`` does not hold device memory) by the key of the storage they free
(``memmgr.storages.storage_key``). While that list is not empty, a ``TorchDispatchMode`` sits at the bottom of the
calling thread's dispatch-mode stack: it sees every aten op below autograd (a module's forward, autograd's
backward, the optimizers' single-tensor and ``_foreach_`` ops) and raises before the op runs when one of its tensor
arguments, or a tensor in a list argument, views an offloaded bucket's storage and that storage holds fewer bytes
than the tensor needs. memmgr's own copies pass: they touch a bucket's storage only while it holds its bytes (before
the offload frees it, after the onload re-allocates it). Ops that make no use of the data pass too (``detach``,
``alias``, ``empty_like`` and other ``*_like``/``new_*`` factories, ``set_``, ``resize_``, size and stride
queries). ``Tensor.__repr__`` (``print(p)``: PyTorch formats tensors with the dispatch modes switched off) and
``Tensor.numpy`` are checked by a wrapper while the guard is installed. Once every bucket is back, the mode leaves the
stack and ops take PyTorch's path unchanged.

Other dispatch modes. The guard's mode is put below the modes already on the stack (they are popped and pushed back
over it, as ``torch.utils._python_dispatch._disable_current_modes`` does) and taken out from wherever it is, so a
user's ``with SomeMode():`` entered before or after an offload still leaves by popping itself. A user mode above the
guard sees an op first; what it passes down reaches the guard.

Limits: the mode stack is per thread. The guard is pushed on the thread whose offload fired the hook (autograd's
worker threads inherit it); ops on other threads are not checked, and a thread that onloads while another offloaded
leaves the mode on the other thread's stack, where it only looks at a flag until that thread's next move. Groups
moved directly (``mgr.group(name).offload()``), not through the manager, fire no hook and are seen at the manager's
next move. Raw pointers (``data_ptr()``, custom extensions reading memory themselves) are not checked.

Cost: while any guarded bucket is offloaded, each aten op on the guarded thread runs through Python (a few
microseconds per op; see the README); with every bucket on the device, nothing. It is a debug mode: turn it on to
find the read that crashes, not in production runs.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _pop_mode, _push_mode

from memmgr.errors import MemmgrError, MemmgrInputError, MemmgrStateError

logger = logging.getLogger("memmgr")

ENV_VAR = "MEMMGR_GUARD_OFFLOADED"

# The manager events after which the placement of its buckets may have changed.
_EVENTS = ("after_offload", "after_onload", "after_weight_sync")

_NO_DATA_OP_NAMES = (
    "detach.default", "alias.default", "lift_fresh.default",
    "empty_like.default", "zeros_like.default", "ones_like.default", "full_like.default", "rand_like.default",
    "randn_like.default", "new_empty.default", "new_empty_strided.default", "new_zeros.default", "new_ones.default",
    "new_full.default", "set_.source_Storage", "set_.source_Storage_storage_offset", "set_.source_Tensor",
    "set_.default", "resize_.default", "is_pinned.default", "is_same_size.default",
    "_has_compatible_shallow_copy_type.default", "sym_size.int", "sym_stride.int", "sym_numel.default",
    "sym_storage_offset.default", "size.int", "stride.int", "dim.default",
)


def _resolve_ops(names: tuple[str, ...]) -> frozenset:
    """The aten overloads named ``op.overload``; names this PyTorch lacks are left out."""
    found = []
    for name in names:
        op, _, overload = name.partition(".")
        try:
            found.append(getattr(getattr(torch.ops.aten, op), overload))
        except (AttributeError, RuntimeError):
            continue
    return frozenset(found)


# Ops that neither read nor write the data of their tensor arguments: they pass even on an offloaded tensor.
_NO_DATA_OPS = _resolve_ops(_NO_DATA_OP_NAMES)

_lock = threading.RLock()
# storage key of an offloaded bucket -> (weak reference to its guard, group name, weak reference to the unit)
_offloaded: dict[int, tuple["weakref.ref[_Guard]", str, "weakref.ref[Any]"]] = {}
_guards: "weakref.WeakValueDictionary[int, _Guard]" = weakref.WeakValueDictionary()  # id(manager) -> its guard
_originals: dict[str, Callable[..., Any]] = {}


def requested(option: bool | None) -> bool:
    """Whether a manager built with ``guard_offloaded=option`` is guarded: the option if it is a bool, else (None)
    whether the environment variable ``MEMMGR_GUARD_OFFLOADED`` is ``1``. MemmgrInputError for any other value,
    of the option or of the variable."""
    if option is not None:
        if not isinstance(option, bool):
            raise MemmgrInputError(f"guard_offloaded must be True, False or None (None: the environment variable "
                                   f"{ENV_VAR}), got {option!r} ({type(option).__name__}); pass a bool or None")
        return option
    value = os.environ.get(ENV_VAR, "").strip()
    if value in ("", "0"):
        return False
    if value == "1":
        return True
    raise MemmgrInputError(f"environment variable {ENV_VAR}={value!r}: set it to 1 (guard reads of offloaded "
                           f"tensors) or 0 / unset it (no guard)")


class GuardHandle:
    """What ``install`` returns: ``remove()`` takes the guard off its manager (idempotent); ``installed`` says
    whether it is still on."""

    def __init__(self, guard: "_Guard"):
        self._guard = guard

    @property
    def installed(self) -> bool:
        return not self._guard.removed

    def remove(self) -> None:
        self._guard.remove()

    def __repr__(self) -> str:
        return f"GuardHandle({self._guard.describe()}, {'installed' if self.installed else 'removed'})"


class _Guard:
    """The guard of one manager: its hooks, and the offloaded buckets it last saw."""

    def __init__(self, manager: Any):
        self._manager = weakref.ref(manager)
        self._manager_id = id(manager)
        self._hooks: list[Any] = []
        self.removed = False
        self.handle = GuardHandle(self)

    def describe(self) -> str:
        return f"manager at {self._manager_id:#x}"

    def hook(self, event: str, group_names: tuple) -> None:
        """The manager's hook: refreshes which buckets are off the device."""
        self.refresh()

    def offloaded_units(self) -> dict[int, tuple[str, Any]]:
        """storage key -> (group name, unit) of every bucket of the manager's groups that is off the device."""
        manager = self._manager()
        if manager is None or self.removed:
            return {}
        found: dict[int, tuple[str, Any]] = {}
        try:
            names = list(manager.state)
            for name in names:
                for unit in manager.group(name).units:
                    key = getattr(unit, "storage_key", None)
                    if isinstance(key, int) and not unit.state.holds_device_memory:
                        found[key] = (name, unit)
        except MemmgrError:  # a closed manager: its groups are unmanaged and on the device
            return {}
        return found

    def refresh(self) -> None:
        with _lock:
            for key in [k for k, (g, _, _) in _offloaded.items() if g() is self or g() is None]:
                del _offloaded[key]
            ref = weakref.ref(self)
            for key, (name, unit) in self.offloaded_units().items():
                _offloaded[key] = (ref, name, weakref.ref(unit))
            _place_mode(bool(_offloaded))

    def remove(self) -> None:
        if self.removed:
            return
        self.removed = True
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        with _lock:
            if _guards.get(self._manager_id) is self:
                del _guards[self._manager_id]
        self.refresh()
        if not _guards:
            _unpatch_tensor_methods()
        logger.debug("offloaded-read guard removed from %s", self.describe())

    def group_of(self, name: str) -> Any:
        manager = self._manager()
        return manager.group(name) if manager is not None else None


def install(manager: Any) -> GuardHandle:
    """Guards ``manager``'s groups: while one of its buckets is offloaded, an op that reads or writes one of its
    tensors raises MemmgrStateError naming the tensor and the group instead of crashing (see the module docstring).
    Uses the manager's public hooks only; takes effect at the manager's next offload (and at once if a group is
    already off the device). Installing twice on one manager returns the first handle. ``handle.remove()`` undoes
    it."""
    missing = [f"{attr}()" for attr in ("register_hook", "group") if not callable(getattr(manager, attr, None))]
    missing += ["state"] if not hasattr(type(manager), "state") else []
    if missing:
        raise MemmgrInputError(f"memmgr.guard.install: manager must be a memmgr.MemoryManager (with register_hook(), "
                               f"group() and state), got {type(manager).__name__} without {missing[0]}; pass the "
                               f"manager that memmgr.for_module / for_megatron returned")
    with _lock:
        existing = _guards.get(id(manager))
        if existing is not None and not existing.removed and existing._manager() is manager:
            return existing.handle
        guard = _Guard(manager)
        _guards[id(manager)] = guard
    # A manager dropped without close(): its buckets give the tensors their contents back as they go; forget them.
    weakref.finalize(manager, _forget_dead_guards).atexit = False
    for event in _EVENTS:
        guard._hooks.append(manager.register_hook(event, guard.hook))
    _patch_tensor_methods()
    guard.refresh()
    logger.debug("offloaded-read guard installed on %s", guard.describe())
    return guard.handle


def _forget_dead_guards() -> None:
    with _lock:
        for key in [k for k, (g, _, _) in _offloaded.items() if g() is None or g().removed or g()._manager() is None]:
            del _offloaded[key]
        _place_mode(bool(_offloaded))


def active() -> bool:
    """Whether the guard's dispatch mode is on this thread's dispatch-mode stack."""
    return any(m is _MODE for m in _stack())


# ---------------------------------------------------------------- the check
def _needs_bytes(tensor: torch.Tensor) -> int:
    extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))
    return (tensor.storage_offset() + extent) * tensor.element_size()


def _check_tensor(tensor: torch.Tensor, what: str) -> None:
    """Raises MemmgrStateError if ``tensor`` views a guarded bucket that is off the device and its storage lacks
    the bytes the tensor needs."""
    try:
        storage = tensor.untyped_storage()
        key = storage._cdata
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):  # sparse, nested, functional, ...
        return
    entry = _offloaded.get(key)
    if entry is None or tensor.numel() == 0 or storage.nbytes() >= _needs_bytes(tensor):
        return
    guard_ref, group, unit_ref = entry
    guard, unit = guard_ref(), unit_ref()
    if guard is None or unit is None or unit.state.holds_device_memory:
        return
    raise MemmgrStateError(
        f"{_name_of(tensor, key, guard, group)} of group {group!r} is used by {what} while the group is "
        f"{unit.state.value} (offloaded: its memory was freed in place, and reading it would crash the process). "
        f"Onload the group first: mgr.onload({group!r}), or keep it on the device through the phase "
        f"(mgr.phase(name, keep=[{group!r}]))")


def _name_of(tensor: torch.Tensor, key: int, guard: _Guard, group: str) -> str:
    """'tensor NAME (shape, dtype)', NAME being the group member ``tensor`` is (or views)."""
    described = f"(shape {tuple(tensor.shape)}, {tensor.dtype})"
    try:
        members = guard.group_of(group).named_tensors
    except Exception:  # noqa: BLE001 - only the message suffers
        members = []
    start = tensor.storage_offset() * tensor.element_size()
    for name, member in members:
        try:
            if member.untyped_storage()._cdata != key:
                continue
        except (RuntimeError, NotImplementedError, TypeError, AttributeError):
            continue
        if member is tensor:
            return f"tensor {name!r} {described}"
        lo = member.storage_offset() * member.element_size()
        if lo <= start < lo + max(1, member.numel()) * member.element_size():
            return f"tensor {name!r} (a view of it, {described[1:-1]})"
    return f"a tensor {described} of one of its buckets"


def _check_arguments(func: Any, args: tuple, kwargs: dict) -> None:
    what = f"aten.{func.__name__}" if hasattr(func, "__name__") else str(func)
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            _check_tensor(value, what)
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, torch.Tensor):
                    _check_tensor(item, what)


class _OffloadedReadGuardMode(TorchDispatchMode):
    """Checks every op's tensor arguments against the offloaded buckets (see the module docstring)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if kwargs is None:
            kwargs = {}
        if _offloaded and func not in _NO_DATA_OPS:
            _check_arguments(func, args, kwargs)
        return func(*args, **kwargs)


_MODE = _OffloadedReadGuardMode()


def _stack() -> list[Any]:
    return [torch._C._get_dispatch_stack_at(i) for i in range(torch._C._len_torch_dispatch_stack())]


def _place_mode(wanted: bool) -> None:
    """Puts the guard's mode at the bottom of this thread's dispatch-mode stack (``wanted``) or takes it out from
    wherever it is; the modes above it are popped and pushed back in their order."""
    present = any(m is _MODE for m in _stack())
    if present == wanted:
        return
    popped = [_pop_mode() for _ in range(torch._C._len_torch_dispatch_stack())]  # top first
    try:
        if wanted:
            _push_mode(_MODE)
    finally:
        for mode in reversed(popped):
            if mode is not _MODE:
                _push_mode(mode)
    logger.debug("offloaded-read guard %s", "active" if wanted else "inactive")


# ---------------------------------------------------------------- what runs with the modes switched off
def _patch_tensor_methods() -> None:
    """Wraps ``Tensor.__repr__`` and ``Tensor.numpy``, which read a tensor's memory without going through the
    dispatch modes, with the guard's check. Idempotent."""
    with _lock:
        if _originals:
            return
        for attr in ("__repr__", "numpy"):
            original = getattr(torch.Tensor, attr)

            def checked(self: torch.Tensor, *args: Any, _original: Callable[..., Any] = original,
                        _what: str = f"Tensor.{attr}", **kwargs: Any) -> Any:
                if _offloaded:
                    _check_tensor(self, _what)
                return _original(self, *args, **kwargs)

            checked.__name__ = attr
            checked.__doc__ = original.__doc__
            checked._memmgr_guard = True  # type: ignore[attr-defined]
            _originals[attr] = original
            setattr(torch.Tensor, attr, checked)


def _unpatch_tensor_methods() -> None:
    with _lock:
        for attr, original in list(_originals.items()):
            if getattr(getattr(torch.Tensor, attr), "_memmgr_guard", False):
                setattr(torch.Tensor, attr, original)
            del _originals[attr]
