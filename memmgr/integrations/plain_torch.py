"""Plain PyTorch modules and torch.optim optimizers (reference, reward and critic models of an RL job)."""
from __future__ import annotations

import logging
import weakref
from typing import Any

import torch

from memmgr import arguments
from memmgr.errors import MemmgrInputError
from memmgr.flat_tensors import DEFAULT_BUCKET_SIZE_MB
from memmgr.groups import DroppedTensors
from memmgr.host_memory import HostMemoryPool
from memmgr.states import BucketState
from memmgr.transfer import TransferHandle
from memmgr.manager import MemoryManager
from memmgr.same_address import require_same_address

logger = logging.getLogger("memmgr")


class DroppedGradients(DroppedTensors):
    """The ``.grad`` tensors of a set of parameters, offloaded by dropping them (``.grad = None``).

    Gradients need not survive a phase change; PyTorch recreates them at the next backward, which gives the same
    result as accumulating into zeros. This is what ``optimizer.zero_grad(set_to_none=True)`` does too.
    """

    def __init__(self, name: str, params: list[torch.nn.Parameter], names: list[str]):
        super().__init__(name)
        self._params = params
        self._names = names
        self._hooks: list[Any] = []

    def _watch_for_recreation(self) -> None:
        """While the gradients are dropped, a gradient accumulated by a backward ends the drop at once, also when
        the caller sets it to None again before anyone looks at the state. The hooks exist only between a drop and
        the next onload, so training steps with the group on the device pay nothing for them."""
        if self._hooks:
            return
        ref = weakref.ref(self)

        def on_accumulate(_param: torch.Tensor) -> None:
            group = ref()
            if group is not None:
                group.recreated()

        self._hooks = [p.register_post_accumulate_grad_hook(on_accumulate) for p in self._params if p.requires_grad]

    def _stop_watching(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def onload(self, non_blocking: bool = False, *, zero_after: torch.cuda.Event | None = None) -> TransferHandle:
        self._stop_watching()
        return super().onload(non_blocking, zero_after=zero_after)

    def revert_onload(self, state: BucketState) -> None:
        super().revert_onload(state)
        if state is BucketState.DISCARDED:
            self._watch_for_recreation()

    def unmanage(self) -> None:
        self._stop_watching()

    def held_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [(f"{n}.grad", p.grad) for n, p in zip(self._names, self._params) if p.grad is not None]

    def drop(self) -> None:
        for p in self._params:
            p.grad = None
        self._watch_for_recreation()


def optimizer_state_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    """Every tensor in ``optimizer.state`` that lives on its parameter's device (Adam's CPU ``step`` counters are
    left alone), named ``<param name>.<state key>``."""
    found: dict[str, torch.Tensor] = {}
    for param, state in optimizer.state.items():
        pname = names.get(id(param), f"param{len(found)}")
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.device == param.device and value.numel() > 0:
                found[f"{pname}.{key}"] = value
    return found


def for_module(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
               include_buffers: bool = True, bucket_size_mb: float = DEFAULT_BUCKET_SIZE_MB,
               empty_cache: bool = True, pin_ahead: bool = True, pool: HostMemoryPool | None = None,
               guard_offloaded: bool | None = None, same_address: bool = False) -> MemoryManager:
    """A MemoryManager for a plain PyTorch module (on CUDA or the CPU) and, optionally, its torch.optim optimizer.

    Groups: ``weights`` (parameters and, with ``include_buffers``, floating-point and integer buffers), ``grads``
    (``.grad``, dropped on offload) and, with an optimizer, ``optimizer_states`` (every tensor in
    ``optimizer.state``; state the optimizer creates lazily at its first step is picked up at the next offload,
    and state an ``optimizer.load_state_dict`` replaced is let go). ``pool``: the host memory pool for the offloaded
    copies (default: memmgr's shared pool). ``state_dict()``/``load_state_dict()`` of the module or the optimizer
    bring their group back to the device first (``MemoryManager.onload_for_state_dicts``), so checkpoints save and
    load whatever the placement. ``guard_offloaded`` and ``same_address``: the manager's (``MemoryManager``).
    """
    if not isinstance(module, torch.nn.Module):
        raise MemmgrInputError(f"for_module takes a torch.nn.Module, got {type(module).__name__}")
    for flag, value in (("include_buffers", include_buffers), ("empty_cache", empty_cache), ("pin_ahead", pin_ahead),
                        ("same_address", same_address)):
        arguments.boolean("for_module", flag, value)
    if same_address:
        require_same_address("for_module")  # before anything changes
    arguments.number("for_module", "bucket_size_mb", bucket_size_mb, positive=True, maximum=2.0**40)
    arguments.instance("for_module", "pool", pool, HostMemoryPool, optional=True)
    named_params = [(n, p) for n, p in module.named_parameters()]
    if not named_params:
        raise MemmgrInputError(f"module {type(module).__name__} has no parameters; there is nothing to manage")
    param_ids = {id(p): n for n, p in named_params}
    if optimizer is not None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise MemmgrInputError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}; for "
                                   f"megatron-core optimizers use memmgr.for_megatron")
        foreign = [tuple(p.shape) for g in optimizer.param_groups for p in g["params"] if id(p) not in param_ids]
        if foreign:
            raise MemmgrInputError(f"the optimizer holds {len(foreign)} parameter(s) that are not the module's "
                                   f"(shapes {foreign[:3]}); pass the optimizer built over this module's parameters")
    weights: dict[str, torch.Tensor] = dict(named_params)
    if include_buffers:
        for n, b in module.named_buffers():
            if b is not None and b.numel() > 0:
                weights[n] = b
    mgr = MemoryManager(bucket_size_mb=bucket_size_mb, empty_cache=empty_cache, pool=pool,
                        named_weights=lambda: list(weights.items()), guard_offloaded=guard_offloaded,
                        same_address=same_address)
    mgr.add_group("weights", weights, pin_ahead=pin_ahead)
    mgr.add_group("grads", DroppedGradients("grads", [p for _, p in named_params], [n for n, _ in named_params]))
    if optimizer is not None:
        mgr.add_group("optimizer_states", optimizer_state_tensors(optimizer, param_ids), pin_ahead=pin_ahead,
                      collect=lambda: optimizer_state_tensors(optimizer, param_ids))
    mgr.onload_for_state_dicts(module, ["weights"])
    if optimizer is not None:
        mgr.onload_for_state_dicts(optimizer, ["optimizer_states"])
    return mgr
