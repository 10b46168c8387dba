"""State-dict hooks that bring managed groups back to the device before a module or optimizer saves or loads its
state (``MemoryManager.onload_for_state_dicts``): checkpoint saving and loading then read and write real memory
whatever the placement."""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch

from memmgr.errors import MemmgrInputError

if TYPE_CHECKING:  # pragma: no cover
    from memmgr.manager import MemoryManager


class InertStateDictHook:
    """What an ``OnloadForStateDict`` hook becomes in a pickled or deep-copied module or optimizer: the copy is
    not managed, so its state dicts need nothing brought back."""

    def __call__(self, *_args: Any) -> None:
        return None


class OnloadForStateDict:
    """A state-dict pre-hook that onloads ``groups`` of a manager (held weakly) before a managed module or
    optimizer saves or loads its state. A class rather than a closure so that a managed module can still be
    pickled (``torch.save(model)``): a copy gets an inert hook."""

    def __init__(self, manager: "MemoryManager", groups: tuple[str, ...]):
        self._manager = weakref.ref(manager)
        self.groups = groups
        self.owners: "weakref.WeakSet[Any]" = weakref.WeakSet()  # a deep copy of a module carries its hooks along

    def __call__(self, obj: Any, *_args: Any) -> None:
        mgr = self._manager()
        if mgr is not None and obj in self.owners:
            mgr.onload_if_offloaded(self.groups)

    def __reduce__(self) -> tuple:
        return InertStateDictHook, ()

    def __deepcopy__(self, memo: dict) -> Any:
        return InertStateDictHook()


def register_onload_hooks(manager: "MemoryManager", owner: torch.nn.Module | torch.optim.Optimizer,
                          groups: tuple[str, ...]) -> list[Any]:
    """Registers on ``owner`` (a module and every submodule, or a torch.optim optimizer) the pre-hooks of
    ``state_dict()`` and ``load_state_dict()`` that onload ``groups`` of ``manager`` (held weakly); returns their
    removable handles. MemmgrInputError for any other ``owner``."""
    bring_back = OnloadForStateDict(manager, groups)
    owners = bring_back.owners
    handles: list[Any] = []
    if isinstance(owner, torch.nn.Module):
        owners.update(owner.modules())
        handles.append(owner.register_load_state_dict_pre_hook(bring_back))
        for module in owner.modules():  # megatron builds sharded state dicts from submodules' state_dict()
            handles.append(module.register_state_dict_pre_hook(bring_back))
    elif isinstance(owner, torch.optim.Optimizer):
        owners.add(owner)
        handles.append(owner.register_load_state_dict_pre_hook(bring_back))
        handles.append(owner.register_state_dict_pre_hook(bring_back))
    else:
        raise MemmgrInputError(f"onload_for_state_dicts takes a torch.nn.Module or a torch.optim.Optimizer, got "
                               f"{type(owner).__name__}")
    return handles
