"""``load_weights`` callables for engines that are plain torch modules."""
from __future__ import annotations

import difflib
from typing import Iterable

import torch

from memmgr import arguments
from memmgr.errors import MemmgrInputError, MemmgrStateError


class ModuleWeightLoader:
    """``load_weights`` for a plain torch module: copies each (name, tensor) into the parameter or buffer of that
    name, bit for bit. A name the module lacks, or a shape or dtype that differs, raises MemmgrInputError naming the
    tensor and both shapes and dtypes; nothing is cast."""

    def __init__(self, module: torch.nn.Module, *, include_buffers: bool = True):
        if not isinstance(module, torch.nn.Module):
            raise MemmgrInputError(f"ModuleWeightLoader takes a torch.nn.Module, got {type(module).__name__}")
        arguments.boolean("ModuleWeightLoader", "include_buffers", include_buffers)
        self.module = module
        self._targets: dict[str, torch.Tensor] = dict(module.named_parameters())
        if include_buffers:
            for n, b in module.named_buffers():
                if b is not None:
                    self._targets.setdefault(n, b)
        self.loaded: set[str] = set()

    def expected(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Engine name -> (shape, dtype) of every tensor this loader can fill."""
        return {n: (tuple(t.shape), t.dtype) for n, t in self._targets.items()}

    def missing(self) -> list[str]:
        """Engine tensors no sync has filled yet."""
        return [n for n in self._targets if n not in self.loaded]

    def __call__(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        pairs = arguments.named_tensors("load_weights", "weights", weights, list_pairs=False)
        with torch.no_grad():
            for name, tensor in pairs:
                target = self._targets.get(name)
                if target is None:
                    close = difflib.get_close_matches(name, list(self._targets), n=3)
                    raise MemmgrInputError(
                        f"load_weights: {type(self.module).__name__} has no parameter or buffer {name!r} (received "
                        f"shape {tuple(tensor.shape)}, {tensor.dtype}){'; closest: ' + str(close) if close else ''}. "
                        f"Fix the name_map so trainer names map onto the engine's names")
                if tuple(target.shape) != tuple(tensor.shape) or target.dtype != tensor.dtype:
                    raise MemmgrInputError(
                        f"load_weights: tensor {name!r} arrived as shape {tuple(tensor.shape)}, {tensor.dtype} but the "
                        f"engine's {name!r} is shape {tuple(target.shape)}, {target.dtype}; nothing is cast or "
                        f"reshaped. Build the engine with the trainer's architecture and dtype, or fix the name_map")
                if target.numel() and target.untyped_storage().nbytes() == 0:
                    raise MemmgrStateError(f"load_weights: engine tensor {name!r} (shape {tuple(target.shape)}) has "
                                           f"no storage: it is offloaded. Onload the engine's weights before the sync")
                target.copy_(tensor)
                self.loaded.add(name)


def module_load_weights(module: torch.nn.Module, *, include_buffers: bool = True) -> ModuleWeightLoader:
    """A ready ``load_weights`` for a plain torch module (see ModuleWeightLoader)."""
    return ModuleWeightLoader(module, include_buffers=include_buffers)
