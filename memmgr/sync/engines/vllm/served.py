"""What an engine worker's modules serve, copied to the host before a sync and put back if the sync fails.

A sync through ``memmgr_gloo`` is all-or-nothing by default (``atomic=True``). Once the manifest is accepted, before
vLLM's layerwise reload touches a layer, the worker copies what it serves into host buffers (``ServedState``):
every module's parameters and buffers, including the kernel tensors vLLM's reload copies processed weights into
(pinned on CUDA, allocated by the first sync and reused), and a reference to each module's other attributes (e.g.
the CPU backend's packed-GEMM handles that post-load processing replaces). Should the sync fail, ``restore()`` puts
every module back: the tensors' previous values copied in place, the replaced attributes restored, so the engine
serves exactly its previous weights. On success the copy is dropped (``clear()``). Its cost per sync: one
device->host copy of the model's weights and one host copy of them held (plus, on the CPU backend, the previous
packed weights kept alive until the sync ends). ``abandon_layerwise_reload`` ends the reload of a sync that stopped
part-way, whichever backend carried it.
"""
from __future__ import annotations

from typing import Any

import torch

_MODULE_INTERNALS = frozenset(torch.nn.Module().__dict__) | {"_parameters", "_buffers", "_modules",
                                                             "_non_persistent_buffers_set"}
_MISSING = object()
_NONE_TENSORS = "\0memmgr: names registered as None"


def abandon_layerwise_reload(model: torch.nn.Module, model_config: Any) -> bool:
    """Ends a vLLM layerwise reload that did not complete (a failed or abandoned sync, on any backend): drops what
    layers that were not fully loaded had buffered and finalizes the reload, so that every layer is back on its
    kernel tensors (layers the sync completed keep the new weights; ``ServedState.restore`` puts those back).
    Returns False, touching nothing, when no reload is open."""
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

    open_layers = [info for info in (get_layerwise_info(layer) for layer in model.modules()) if info.can_load()]
    if not open_layers:
        return False
    for info in open_layers:
        if info.load_numel > 0:
            info.loaded_weights = []
            info.load_numel = 0
    finalize_layerwise_reload(model, model_config)
    return True


class ServedState:
    """Host copies of what an engine's modules serve, to put back after a failed sync (see the module docstring).

    ``capture(model)`` copies every parameter and buffer into host buffers (one per tensor, reused by later captures
    while shape and dtype stay; pinned when the tensor is on a GPU) and records each module's other attributes by
    reference; ``restore()`` re-registers the captured tensor objects, copies their values back in place and puts
    back every attribute that was replaced, added or removed since; ``clear()`` drops the references (the buffers
    stay for the next sync)."""

    def __init__(self) -> None:
        self._host: dict[tuple[int, str], torch.Tensor] = {}
        self._modules: list[tuple[torch.nn.Module, dict[str, tuple[torch.Tensor, torch.Tensor, bool]],
                                  dict[str, Any], set[str]]] = []

    @property
    def host_bytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for b in self._host.values():
            if id(b) not in seen:
                seen.add(id(b))
                total += b.numel() * b.element_size()
        return total

    @torch.no_grad()
    def capture(self, model: torch.nn.Module) -> None:
        self._modules = []
        by_tensor: dict[int, torch.Tensor] = {}  # a tensor shared by several modules is copied once
        cuda = False
        for index, module in enumerate(model.modules()):
            tensors: dict[str, tuple[torch.Tensor, torch.Tensor, bool]] = {}
            for kind, table in ((True, module._parameters), (False, module._buffers)):
                for name, t in table.items():
                    if t is None:
                        continue
                    buf = by_tensor.get(id(t))
                    if buf is None:
                        key = (index, name)
                        buf = self._host.get(key)
                        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                            pin = t.is_cuda and torch.cuda.is_available()
                            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
                            self._host[key] = buf
                        buf.copy_(t.detach(), non_blocking=t.is_cuda)
                        cuda = cuda or t.is_cuda
                        by_tensor[id(t)] = buf
                    tensors[name] = (t, buf, kind)
            attrs = {k: v for k, v in module.__dict__.items() if k not in _MODULE_INTERNALS}
            # names registered as None (e.g. a linear layer's absent bias) come back as None
            attrs[_NONE_TENSORS] = ([n for n, t in module._parameters.items() if t is None],
                                    [n for n, t in module._buffers.items() if t is None])
            self._modules.append((module, tensors, attrs, set(module._non_persistent_buffers_set)))
        if cuda:
            torch.cuda.synchronize()

    @torch.no_grad()
    def restore(self) -> int:
        """Puts every captured module back; returns the number of tensors copied back."""
        copied: set[int] = set()
        cuda = False
        for module, tensors, attrs, non_persistent in self._modules:
            none_params, none_buffers = attrs[_NONE_TENSORS]
            for key in [k for k in module.__dict__ if k not in _MODULE_INTERNALS and k not in attrs]:
                del module.__dict__[key]  # added by this sync's processing
            for key, value in attrs.items():
                if key != _NONE_TENSORS and module.__dict__.get(key, _MISSING) is not value:
                    module.__dict__[key] = value
            for name in [n for n in list(module._parameters) if n not in tensors]:
                del module._parameters[name]
            for name in [n for n in list(module._buffers) if n not in tensors]:
                del module._buffers[name]
            for name in none_params:
                module._parameters[name] = None
            for name in none_buffers:
                module._buffers[name] = None
            for name, (t, buf, is_param) in tensors.items():
                table = module._parameters if is_param else module._buffers
                table[name] = t
                if not is_param:
                    if name in non_persistent:
                        module._non_persistent_buffers_set.add(name)
                    else:
                        module._non_persistent_buffers_set.discard(name)
                if id(t) in copied:
                    continue
                copied.add(id(t))
                if t.shape == buf.shape and t.dtype == buf.dtype:
                    t.data.copy_(buf, non_blocking=t.is_cuda)
                else:  # processing gave the tensor another shape or dtype: its previous data comes back whole
                    t.data = buf.to(t.device, copy=True)
                cuda = cuda or t.is_cuda
        if cuda:
            torch.cuda.synchronize()
        return len(copied)

    def clear(self) -> None:
        self._modules = []


__all__ = ["ServedState", "abandon_layerwise_reload"]
