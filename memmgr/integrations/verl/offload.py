"""verl's trainer offload/onload done by a memmgr manager: ``VerlOffload`` (see ``memmgr.integrations.verl``)."""
from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from memmgr.errors import MemmgrInputError, MemmgrIntegrationError
from memmgr.integrations.verl import INSTALL_HINT, MemmgrVerlMissingError
from memmgr.manager import MemoryManager

logger = logging.getLogger("memmgr")

MODEL_GROUPS = ("weights",)
GRAD_GROUPS = ("grads", "grad_buffers")


class VerlOffload:
    """verl's trainer offload/onload done by a memmgr ``MemoryManager`` (``memmgr.for_module`` /
    ``memmgr.for_megatron``), in place of verl's per-tensor helpers.

    The model is the ``weights`` group (offloading it also drops the gradients: ``grads``, megatron's
    ``grad_buffers``), the optimizer every other group (megatron's fp32 ``main_weights``, ``optimizer_states`` and
    ``scratch``). ``to(device, model=, optimizer=, grad=)`` has the contract of verl's ``BaseEngine.to``;
    ``offload_model`` / ``load_model`` / ``offload_optimizer`` / ``load_optimizer`` the roles of
    ``offload_megatron_model_to_cpu`` / ``load_megatron_model_to_gpu`` / ``offload_megatron_optimizer`` /
    ``load_megatron_optimizer`` (and the FSDP ones). Moving a group already where it is asked to be does nothing.
    ``install(engine)`` replaces one engine's ``to``; ``install_helpers()`` replaces verl's helpers themselves, so
    that every call of them verl makes (``to``, ``save_checkpoint``, ``load_checkpoint``, ``get_per_tensor_param``
    with ``param_offload`` / ``optimizer_offload`` on) moves this manager's groups: the model's helpers its weights
    and gradients (``load_grad`` as above; ``load_frozen_params`` and ``empty_cache`` are not needed: every managed
    weight moves, and the manager empties the allocator's cache as it was built to), the optimizer's the rest.
    """

    def __init__(self, manager: MemoryManager) -> None:
        if not isinstance(manager, MemoryManager):
            raise MemmgrInputError(f"VerlOffload takes a memmgr.MemoryManager (memmgr.for_module or "
                                   f"memmgr.for_megatron), got {type(manager).__name__}")
        self.manager = manager
        names = manager.group_names
        self.model_groups = tuple(n for n in MODEL_GROUPS if n in names)
        self.grad_groups = tuple(n for n in GRAD_GROUPS if n in names)
        self.optimizer_groups = tuple(n for n in names if n not in MODEL_GROUPS + GRAD_GROUPS)

    def _move(self, groups: Iterable[str], offload: bool) -> None:
        groups = tuple(groups)
        if groups:
            (self.manager.offload if offload else self.manager.onload)(*groups)  # a group already there stays

    def offload_model(self, *_models: Any, **_kwargs: Any) -> None:
        """The weights to pinned host memory, the gradients dropped (``offload_megatron_model_to_cpu``)."""
        self._move(self.model_groups + self.grad_groups, offload=True)

    def load_model(self, *_models: Any, load_grad: bool = True, **_kwargs: Any) -> None:
        """The weights back, bit for bit, and with ``load_grad`` zeroed gradient buffers
        (``load_megatron_model_to_gpu``)."""
        self._move(self.model_groups + (self.grad_groups if load_grad else ()), offload=False)

    def offload_optimizer(self, *_optimizers: Any, **_kwargs: Any) -> None:
        """fp32 main weights and optimizer moments to pinned host memory (``offload_megatron_optimizer``)."""
        self._move(self.optimizer_groups, offload=True)

    def load_optimizer(self, *_optimizers: Any, **_kwargs: Any) -> None:
        """fp32 main weights and optimizer moments back, bit for bit (``load_megatron_optimizer``)."""
        self._move(self.optimizer_groups, offload=False)

    def to(self, device: str | torch.device, model: bool = True, optimizer: bool = True, grad: bool = True) -> None:
        """verl's ``engine.to``: ``"cpu"`` offloads the model (with its gradients) and/or the optimizer, any other
        device (verl's ``get_device_name()``: "cuda", "npu") brings them back to where they were (also the CPU, for
        a trainer that runs there), the gradients only with ``grad``."""
        if grad and not model:
            raise MemmgrInputError("VerlOffload.to: grad=True needs model=True (verl moves gradient buffers with the "
                                   "model)")
        offload = str(device).split(":")[0] == "cpu"
        if model:
            self.offload_model() if offload else self.load_model(load_grad=grad)
        if optimizer:
            self.offload_optimizer() if offload else self.load_optimizer()

    def per_tensor_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The trainer's weights as ``(name, tensor)`` for ``send_weights``: only the weights come back, for as long
        as the stream is read, and leave again when it ends (also when it is closed early)."""
        with self.manager.weight_sync() as weights:
            yield from weights.items()

    def install(self, engine: Any) -> Any:
        """Makes ``engine.to`` (a verl trainer engine's) move its state through this manager; returns ``engine``."""
        if not callable(getattr(engine, "to", None)):
            raise MemmgrIntegrationError(f"VerlOffload.install: {type(engine).__name__} has no to(device, model=, "
                                         f"optimizer=, grad=) method; pass a verl trainer engine")
        engine.to = self.to
        return engine

    def install_helpers(self) -> HelperHandle:
        """Puts memmgr in place of verl's per-tensor offload helpers (``HELPERS``) wherever verl looks them up, for
        as long as the returned handle is not removed (``handle.remove()``, or ``with offload.install_helpers():``).

        verl's trainer engines bind the helpers with ``from verl.utils.megatron_utils import ...`` /
        ``from verl.utils.fsdp_utils import ...``, so the name is replaced in the defining module and in every
        imported module that holds verl's function under it; modules imported later bind the stand-in from the
        defining module. A helper family whose verl module does not import (megatron-core or peft missing) is left
        out. Several ``VerlOffload`` may be installed at once (actor, critic, reference model): each call goes to the
        one whose manager manages the model or optimizer verl passes, and raises ``MemmgrIntegrationError`` when
        none does. verl's functions come back when the last handle is removed."""
        self.manager.check_open()
        if not any(o is self for o in _HELPER_OWNERS):
            if not _HELPER_OWNERS:
                _patch_helpers()
            _HELPER_OWNERS.append(self)
            logger.info("verl offload: memmgr stands in for verl's helpers %s", ", ".join(sorted(_ORIGINALS)))
        return HelperHandle(self)

    def manages_model(self, models: Any) -> str | None:
        """None if every parameter of ``models`` (a module or verl's list of model chunks) is one this manager
        moves, else why not."""
        chunks = list(models) if isinstance(models, (list, tuple)) else [models]
        if not chunks or not all(isinstance(c, torch.nn.Module) for c in chunks):
            return f"it is a {type(models).__name__}, not a torch module or a list of them"
        params = [(f"chunk{i}.{n}" if len(chunks) > 1 else n, p) for i, c in enumerate(chunks)
                  for n, p in c.named_parameters()]
        return self._unmanaged("parameter", params)

    def manages_optimizer(self, optimizer: Any) -> str | None:
        """None if every parameter of ``optimizer`` (a torch.optim optimizer or a megatron one: its ``optimizer``,
        a ChainedOptimizer's ``chained_optimizers``) is one this manager moves (a weight or an fp32 main weight),
        else why not."""
        inner, todo = [], [optimizer]
        while todo:
            opt = todo.pop()
            if isinstance(opt, torch.optim.Optimizer):
                inner.append(opt)
            elif isinstance(getattr(opt, "chained_optimizers", None), (list, tuple)):
                todo.extend(opt.chained_optimizers)
            elif hasattr(opt, "optimizer"):
                if opt.optimizer is not None:  # a megatron rank may hold no parameters
                    todo.append(opt.optimizer)
            else:
                return f"it is a {type(opt).__name__}, neither a torch.optim optimizer nor a megatron one"
        params = [(f"param_groups[{g}][{i}]", p) for opt in inner for g, group in enumerate(opt.param_groups)
                  for i, p in enumerate(group["params"])]
        return self._unmanaged("optimizer parameter", params)

    def _unmanaged(self, what: str, named: list[tuple[str, torch.Tensor]]) -> str | None:
        if not named:
            return f"it has no {what}s, so this manager moves nothing of it"
        managed = {id(t) for t in self.manager.named_weights().values()}
        for name in self.manager.group_names:
            managed.update(id(t) for _, t in self.manager.group(name).named_tensors)
        foreign = [(n, tuple(t.shape)) for n, t in named if id(t) not in managed]
        if foreign:
            return (f"{len(foreign)} of its {len(named)} {what}s are not this manager's (first: {foreign[0][0]} "
                    f"{foreign[0][1]})")
        return None


# ---- memmgr in place of verl's helpers ----

# verl's helper -> (the verl module that defines it, what it moves)
HELPERS: dict[str, tuple[str, str]] = {
    "offload_megatron_model_to_cpu": ("verl.utils.megatron_utils", "model"),
    "load_megatron_model_to_gpu": ("verl.utils.megatron_utils", "model"),
    "offload_megatron_optimizer": ("verl.utils.megatron_utils", "optimizer"),
    "load_megatron_optimizer": ("verl.utils.megatron_utils", "optimizer"),
    "offload_fsdp_model_to_cpu": ("verl.utils.fsdp_utils", "model"),
    "load_fsdp_model_to_gpu": ("verl.utils.fsdp_utils", "model"),
    "offload_fsdp_optimizer": ("verl.utils.fsdp_utils", "optimizer"),
    "load_fsdp_optimizer": ("verl.utils.fsdp_utils", "optimizer"),
}
_HELPER_OWNERS: list[VerlOffload] = []  # installed, in installation order
_ORIGINALS: dict[str, Callable[..., Any]] = {}  # verl's functions, while the stand-ins are in place


def _owner(helper: str, target: Any) -> VerlOffload:
    """The installed ``VerlOffload`` whose manager moves ``target`` (the model or optimizer verl passed)."""
    kind = HELPERS[helper][1]
    reasons = []
    for offload in _HELPER_OWNERS:
        if offload.manager.closed:
            reasons.append("a closed manager")
            continue
        reason = offload.manages_model(target) if kind == "model" else offload.manages_optimizer(target)
        if reason is None:
            return offload
        reasons.append(reason)
    arg = {"model": "models" if "megatron" in helper else "model",
           "optimizer": "optimizers" if "megatron" in helper else "optimizer"}[kind]
    article = "an" if kind == "optimizer" else "a"
    raise MemmgrIntegrationError(
        f"verl's {helper}({arg}=...) was called with {article} {kind} that no installed memmgr manager moves "
        f"({'; '.join(reasons) or 'no VerlOffload is installed'}). Build the manager over the engine's own {kind} "
        f"(memmgr.for_megatron(engine.module, engine.optimizer) or memmgr.for_module(engine.module, "
        f"engine.optimizer)) and call install_helpers() on its VerlOffload, or remove() the helpers' handle so "
        f"that verl moves it itself")


def _offload_megatron_model_to_cpu(models: Any) -> None:
    _owner("offload_megatron_model_to_cpu", models).offload_model()


def _load_megatron_model_to_gpu(models: Any, load_grad: bool = True, load_frozen_params: bool = True) -> None:
    _owner("load_megatron_model_to_gpu", models).load_model(load_grad=load_grad)


def _offload_megatron_optimizer(optimizers: Any) -> None:
    _owner("offload_megatron_optimizer", optimizers).offload_optimizer()


def _load_megatron_optimizer(optimizers: Any) -> None:
    _owner("load_megatron_optimizer", optimizers).load_optimizer()


def _offload_fsdp_model_to_cpu(model: Any, empty_cache: bool = True) -> None:
    _owner("offload_fsdp_model_to_cpu", model).offload_model()


def _load_fsdp_model_to_gpu(model: Any) -> None:
    _owner("load_fsdp_model_to_gpu", model).load_model(load_grad=True)


def _offload_fsdp_optimizer(optimizer: Any) -> None:
    _owner("offload_fsdp_optimizer", optimizer).offload_optimizer()


def _load_fsdp_optimizer(optimizer: Any, device_id: Any = None) -> None:
    _owner("load_fsdp_optimizer", optimizer).load_optimizer()


STAND_INS: dict[str, Callable[..., Any]] = {name: globals()[f"_{name}"] for name in HELPERS}
for _name, _fn in STAND_INS.items():
    _fn.__doc__ = f"memmgr in place of verl's ``{_name}`` (``VerlOffload.install_helpers``)."
    _fn.memmgr_stands_in_for = _name  # type: ignore[attr-defined]


def _rebind(old: dict[str, Any], new: dict[str, Any]) -> int:
    """Replaces, in every imported module, each helper name bound to ``old[name]`` by ``new[name]``."""
    count = 0
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, fn in old.items():
            if namespace.get(name) is fn:
                namespace[name] = new[name]
                count += 1
    return count


def _patch_helpers() -> None:
    originals: dict[str, Callable[..., Any]] = {}
    failures = []
    for module_name in sorted({m for m, _ in HELPERS.values()}):
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            failures.append(f"{module_name} ({type(exc).__name__}: {exc})")
            logger.info("verl offload: %s does not import (%s); its helpers stay verl's", module_name, exc)
            continue
        for name, (owner_module, _) in HELPERS.items():
            if owner_module == module_name:
                originals[name] = getattr(module, name)
    if not originals:
        raise MemmgrVerlMissingError(f"VerlOffload.install_helpers: none of verl's offload helper modules imports: "
                                     f"{'; '.join(failures)}; {INSTALL_HINT}")
    stand_ins = {name: STAND_INS[name] for name in originals}
    bound = _rebind(originals, stand_ins)
    _ORIGINALS.update(originals)
    logger.debug("verl offload: replaced %d bindings of verl's offload helpers", bound)


def _unpatch_helpers() -> None:
    bound = _rebind({name: STAND_INS[name] for name in _ORIGINALS}, dict(_ORIGINALS))
    _ORIGINALS.clear()
    logger.debug("verl offload: restored %d bindings of verl's offload helpers", bound)


class HelperHandle:
    """What ``VerlOffload.install_helpers`` returns: ``remove()`` (or leaving its ``with`` block) takes this
    ``VerlOffload`` out of verl's helpers; with the last one out, verl's own functions are back wherever the
    stand-ins were bound. Removing twice does nothing."""

    def __init__(self, offload: VerlOffload) -> None:
        self.offload = offload

    @property
    def installed(self) -> bool:
        return any(o is self.offload for o in _HELPER_OWNERS)

    def remove(self) -> None:
        if not self.installed:
            return
        _HELPER_OWNERS[:] = [o for o in _HELPER_OWNERS if o is not self.offload]
        if not _HELPER_OWNERS:
            _unpatch_helpers()
            logger.info("verl offload: verl's own offload helpers are back")

    def __enter__(self) -> HelperHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
