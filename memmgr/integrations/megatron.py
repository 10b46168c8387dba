"""megatron-core trainers: one integration that finds the training state by feature detection (megatron-core 0.12-0.19).

``for_megatron(model_chunks, optimizer)`` returns a MemoryManager with these groups:

- ``weights``: the DDP ``param_data`` buffers of ``buffers`` and ``expert_parallel_buffers`` of every chunk, adopted
  as they are (no copy; every ``param.data``, bucket slice and optimizer shard view stays valid). Without the
  distributed optimizer there is no param buffer, and the parameters are coalesced into flat buckets instead.
  Parameters outside the DDP buffers (frozen ones) are coalesced into the same group.
- ``grad_buffers``: the DDP ``grad_data`` buffers (and 0.19's ``extra_main_grads``), dropped on offload and
  re-allocated as zeros on onload.
- ``grads``: ``.grad`` / ``.decoupled_grad`` tensors the optimizer step leaves on main-weight shards and parameters
  (views into ``grad_data``, or fp32 copies of bf16 grads); dropped on offload, recreated by the next step.
- ``main_weights``: fp32 main-weight shards (``shard_fp32_from_float16_groups`` of the DistributedOptimizer,
  ``fp32_from_float16_groups`` of Float16OptimizerWithFloat16Params), coalesced. Empty for FP32Optimizer and for
  fp32 models under the distributed optimizer, whose main weights are the weights themselves.
- ``optimizer_states``: every tensor in each inner optimizer's ``.state`` on the model's device (Adam moments, and
  e.g. TransformerEngine FusedAdam's master weights), coalesced. Adam creates its moments at the first step; they are
  picked up at the next offload.
- ``scratch``: megatron's global memory buffer (``parallel_state``'s ``GlobalMemoryBuffer``), dropped on offload
  and re-allocated lazily by megatron at its next use.

GPU memory that is seen but not moved (registered module buffers, MoE token-dispatcher state of the last forward,
optimizer scalars such as ``found_inf``) is listed in ``mgr.left_behind`` (description -> bytes), refreshed at
every offload.

Onloading part of the state (what ChatLearn's ``offload_weights``/``free_grad_buffers``/``offload_optimizer_states``
flags do around checkpoint saving):

    mgr.offload()                    # everything off the GPU
    mgr.onload("weights")            # only the model weights: forward passes (under torch.no_grad()),
                                     # model.state_dict(), weight export; optimizer state stays on the host
    mgr.offload("weights")
    mgr.onload("weights", "main_weights", "optimizer_states")   # a full checkpoint (model + optimizer), no grads
    with mgr.weight_sync() as named:  # weights only, name -> tensor, offloaded again on exit
        ...
    mgr.onload()                     # everything, before the next training step

Do not run a backward pass while ``grad_buffers`` is off the GPU: the DDP hooks would write into freed memory.
Offload between training steps (after ``optimizer.step()``), never between backward and the step.

Checkpoints: ``state_dict``/``sharded_state_dict`` and ``load_state_dict`` of the model chunks (and their submodules)
and of the inner optimizers bring the groups they read or write back to the device first, so saving or loading a
checkpoint (torch or ``dist_checkpointing``) works whatever the placement; offload again afterwards. Optimizer state a
checkpoint load replaces is re-collected at the next offload (state rebuilt over a bucket's memory joins it, replaced
buckets are released). ``close()`` lets go of everything, and a new ``for_megatron`` can take the same model over.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Sequence

import torch
import torch.distributed as dist

from memmgr import arguments
from memmgr.errors import MemmgrIntegrationError, MemmgrStateError
from memmgr.flat_tensors import DEFAULT_BUCKET_SIZE_MB, BucketizedFlatTensors, Policy, validate_tensors
from memmgr.groups import DroppedTensors, unique_storage_bytes
from memmgr.host_memory import HostMemoryPool
from memmgr.manager import MemoryManager
from memmgr.same_address import require_same_address

logger = logging.getLogger("memmgr")

SUPPORTED_OPTIMIZERS = ("ChainedOptimizer", "DistributedOptimizer", "Float16OptimizerWithFloat16Params",
                        "FP32Optimizer")

_WRAP_HINT = ("wrap each model chunk in megatron-core DDP first: "
              "megatron.core.distributed.DistributedDataParallel(config, ddp_config, module) with a "
              "DistributedDataParallelConfig (use_distributed_optimizer=True for the distributed optimizer)")


# ---------------------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------------------
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _spans_storage(t: torch.Tensor) -> bool:
    return (t.dim() == 1 and t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == _nbytes(t))


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _flatten(groups: Any) -> list:
    return [p for group in (groups or []) for p in group]


def _class_names(obj: object) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


# ---------------------------------------------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------------------------------------------
def _as_chunks(model_chunks: Any) -> list[torch.nn.Module]:
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    if not chunks:
        raise MemmgrIntegrationError(f"for_megatron got no model chunks; {_WRAP_HINT}")
    for i, chunk in enumerate(chunks):
        if not isinstance(chunk, torch.nn.Module):
            raise MemmgrIntegrationError(f"model chunk {i} is a {type(chunk).__name__}, not a torch.nn.Module; "
                                         f"{_WRAP_HINT}")
        if "FullyShardedDataParallel" in " ".join(_class_names(chunk)):
            raise MemmgrIntegrationError(
                f"model chunk {i} is {type(chunk).__name__} (FSDP); for_megatron manages megatron-core "
                f"DistributedDataParallel only: set use_megatron_fsdp=False and {_WRAP_HINT}")
        if not (isinstance(getattr(chunk, "buffers", None), list) and hasattr(chunk, "ddp_config")
                and hasattr(chunk, "module")):
            raise MemmgrIntegrationError(
                f"model chunk {i} ({type(chunk).__name__}) is not wrapped in megatron-core DistributedDataParallel "
                f"(it has no list of param/grad buffers `.buffers`); {_WRAP_HINT}")
        if getattr(chunk.ddp_config, "nccl_ub", False):
            raise MemmgrIntegrationError(
                f"model chunk {i}: ddp_config.nccl_ub=True allocates the param/grad buffers from an NCCL memory "
                f"pool that freeing and re-allocating them in place would leave; set nccl_ub=False to use memmgr")
    return chunks


def _unwrap_module(module: torch.nn.Module) -> torch.nn.Module:
    """Strips Float16Module-style wrappers (``.module`` attribute of a wrapper class) so names match the model."""
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module) and (
            _class_names(module) & {"Float16Module", "LegacyFloat16Module", "DistributedDataParallel"}):
        module = module.module
    return module


def _chunk_buffers(chunk: torch.nn.Module) -> list[tuple[str, Any]]:
    found = [(f"buffers[{j}]", b) for j, b in enumerate(chunk.buffers)]
    found += [(f"expert_parallel_buffers[{j}]", b)
              for j, b in enumerate(getattr(chunk, "expert_parallel_buffers", None) or [])]
    return found


def _bucket_groups(chunk: torch.nn.Module) -> list[tuple[str, Any]]:
    found = [(f"bucket_groups[{j}]", g) for j, g in enumerate(getattr(chunk, "bucket_groups", None) or [])]
    found += [(f"expert_parallel_bucket_groups[{j}]", g)
              for j, g in enumerate(getattr(chunk, "expert_parallel_bucket_groups", None) or [])]
    return found


def _fp32_optimizer_class() -> type | None:
    try:
        from megatron.core.optimizer.optimizer import FP32Optimizer
    except Exception:  # pragma: no cover - megatron-core layout changed
        return None
    return FP32Optimizer


def _inner_optimizers(optimizer: Any, path: str = "optimizer") -> list[tuple[str, str, Any]]:
    """(path, kind, optimizer) for every non-stub megatron optimizer inside ``optimizer``."""
    if hasattr(optimizer, "chained_optimizers"):
        found = []
        for k, inner in enumerate(optimizer.chained_optimizers):
            found += _inner_optimizers(inner, f"{path}.chained_optimizers[{k}]")
        return found
    if getattr(optimizer, "is_stub_optimizer", False) or (
            hasattr(optimizer, "is_stub_optimizer") and getattr(optimizer, "optimizer", None) is None):
        return []
    if hasattr(optimizer, "shard_fp32_from_float16_groups") and hasattr(optimizer, "model_float16_groups"):
        kind = "distributed"
    elif hasattr(optimizer, "fp32_from_float16_groups") and hasattr(optimizer, "float16_groups"):
        kind = "float16"
    elif (_fp32_optimizer_class() is not None and isinstance(optimizer, _fp32_optimizer_class())) or \
            "FP32Optimizer" in _class_names(optimizer):
        kind = "fp32"
    else:
        hint = ("; for a plain torch.optim optimizer use memmgr.for_module"
                if isinstance(optimizer, torch.optim.Optimizer) else "")
        raise MemmgrIntegrationError(
            f"{path} is a {type(optimizer).__module__}.{type(optimizer).__qualname__}, which for_megatron does not "
            f"know; supported: {', '.join(SUPPORTED_OPTIMIZERS)} (what megatron.core.optimizer."
            f"get_megatron_optimizer builds){hint}")
    inner = getattr(optimizer, "optimizer", None)
    if inner is None or not hasattr(inner, "state") or not hasattr(inner, "param_groups"):
        raise MemmgrIntegrationError(f"{path} ({type(optimizer).__name__}) has no inner optimizer with .state and "
                                     f".param_groups; build it with megatron.core.optimizer.get_megatron_optimizer")
    return [(path, kind, optimizer)]


class _Discovery:
    """Everything for_megatron manages, found without changing anything."""

    def __init__(self, chunks: list[torch.nn.Module], optimizer: Any):
        self.chunks = chunks
        self.optimizers = _inner_optimizers(optimizer) if optimizer is not None else []
        multi = len(chunks) > 1
        self.named_params: list[tuple[str, torch.nn.Parameter]] = []
        for i, chunk in enumerate(chunks):
            prefix = f"chunk{i}." if multi else ""
            for name, p in _unwrap_module(chunk.module).named_parameters():
                self.named_params.append((prefix + name, p))
        self.param_names = {id(p): n for n, p in self.named_params}
        self.device = self.named_params[0][1].device if self.named_params else torch.device("cpu")

        # DDP buffers
        self.param_buffers: dict[str, torch.Tensor] = {}
        self.grad_buffers: dict[str, torch.Tensor] = {}
        self.ddp_buffers: list[Any] = []
        for i, chunk in enumerate(chunks):
            for bname, buf in _chunk_buffers(chunk):
                self.ddp_buffers.append(buf)
                where = f"chunk{i}.{bname}"
                grad = getattr(buf, "grad_data", None)
                param = getattr(buf, "param_data", None)
                if grad is not None:
                    self._check_buffer(f"{where}.grad_data", grad)
                    self.grad_buffers[f"{where}.grad_data"] = grad
                if param is not None:
                    if grad is not None and _storage_key(param) == _storage_key(grad):
                        raise MemmgrIntegrationError(
                            f"{where}: param_data shares its memory with grad_data (MXFP8 parameters with "
                            f"reuse_grad_buf_for_mxfp8_param_ag); for_megatron cannot offload the weights apart "
                            f"from the gradients there. Set reuse_grad_buf_for_mxfp8_param_ag=False")
                    self._check_buffer(f"{where}.param_data", param)
                    self.param_buffers[f"{where}.param_data"] = param
                for k, extra in enumerate(getattr(buf, "extra_main_grads", None) or []):
                    if isinstance(extra, torch.Tensor) and extra.numel() > 0 and _spans_storage(extra):
                        self.grad_buffers[f"{where}.extra_main_grads[{k}]"] = extra
        param_storages = {_storage_key(t) for t in self.param_buffers.values()}
        self.grad_storages = {_storage_key(t) for t in self.grad_buffers.values()}
        # Parameters the param buffers do not hold (all of them without the distributed optimizer).
        self.loose_params = {n: p for n, p in self.named_params if _storage_key(p) not in param_storages}

        # Optimizers
        self.main_weights: dict[str, torch.Tensor] = {}
        self.opt_param_names: dict[int, str] = dict(self.param_names)
        self.grad_holders: list[torch.Tensor] = []
        chunk_param_ids = set(self.param_names)
        chunk_buffer_ids = {id(b) for b in self.ddp_buffers}
        for path, kind, opt in self.optimizers:
            if kind == "distributed":
                model_params = _flatten(opt.model_float16_groups) + _flatten(getattr(opt, "model_fp32_groups", []))
                pairs = list(zip(_flatten(opt.shard_fp32_from_float16_groups), _flatten(opt.model_float16_groups)))
                pairs += list(zip(_flatten(getattr(opt, "shard_fp32_groups", [])),
                                  _flatten(getattr(opt, "model_fp32_groups", []))))
                foreign_buffers = [b for b in getattr(opt, "buffers", None) or [] if id(b) not in chunk_buffer_ids]
                if foreign_buffers:
                    raise MemmgrIntegrationError(
                        f"{path} (DistributedOptimizer) works on {len(foreign_buffers)} param/grad buffer(s) that "
                        f"are not in the model chunks given; pass the model chunks the optimizer was built from "
                        f"(get_megatron_optimizer(config, model_chunks))")
            elif kind == "float16":
                model_params = _flatten(opt.float16_groups) + _flatten(getattr(opt, "fp32_from_fp32_groups", []))
                pairs = list(zip(_flatten(opt.fp32_from_float16_groups), _flatten(opt.float16_groups)))
            else:
                model_params = [p for g in opt.optimizer.param_groups for p in g["params"]]
                pairs = []
            foreign = [p for p in model_params if p is not None and id(p) not in chunk_param_ids]
            if foreign:
                raise MemmgrIntegrationError(
                    f"{path} ({type(opt).__name__}) updates {len(foreign)} parameter(s) that are not in the model "
                    f"chunks given (shapes {[tuple(p.shape) for p in foreign[:3]]}); pass the model chunks the "
                    f"optimizer was built from (get_megatron_optimizer(config, model_chunks))")
            for main, model in pairs:
                if main is None or model is None:
                    continue
                name = self.param_names.get(id(model), f"{path}.param{len(self.opt_param_names)}")
                self.opt_param_names[id(main)] = name
                if main.untyped_storage().data_ptr() in param_storages or id(main) in chunk_param_ids:
                    continue  # an fp32 shard: a view of the weights, not a copy
                self.main_weights[f"{name}.main"] = main
            self.grad_holders += [p for g in opt.optimizer.param_groups for p in g["params"]]
        self.grad_holders += [p for _, p in self.named_params]

    def _check_buffer(self, where: str, buffer: torch.Tensor) -> None:
        if buffer.untyped_storage().nbytes() == 0 and buffer.numel() > 0:
            raise MemmgrStateError(f"{where} has no device memory (offloaded by another manager or by megatron's "
                                   f"offload helpers); restore it before building a manager")
        if not _spans_storage(buffer):
            raise MemmgrIntegrationError(
                f"{where} ({tuple(buffer.shape)}, {buffer.dtype}) is not a flat buffer that owns its whole storage, "
                f"so it cannot be freed in place; this megatron-core configuration is not supported")

    # ---- optimizer state (re-read at every offload: Adam creates it lazily) ----
    def optimizer_states(self, exclude: set[int] = frozenset(),
                         held: set[int] = frozenset()) -> dict[str, torch.Tensor]:
        """The device tensors in the inner optimizers' state, each once, leaving out the tensors whose id is in
        ``exclude``. Runs before every offload: tensors whose id is in ``held`` (what the group holds already) are
        taken as they are, before any of the costlier checks. Views of one storage are all reported (a loaded
        checkpoint's state is such views); coalescing accepts them if they do not overlap."""
        found: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for path, _kind, opt in self.optimizers:
            for param, state in opt.optimizer.state.items():
                if not isinstance(state, dict):
                    continue
                pname = None
                for key, value in state.items():
                    if id(value) in exclude:
                        continue
                    if pname is None:
                        pname = self.opt_param_names.get(id(param), f"{path}.param{len(found)}")
                    if id(value) in held:
                        found[f"{pname}.{key}#{id(value)}"] = value
                        continue
                    if not (isinstance(value, torch.Tensor) and value.device.type == self.device.type
                            and value.numel() > 0 and value.layout == torch.strided and value.is_contiguous()):
                        continue
                    if value.untyped_storage().nbytes() == 0 or id(value) in seen:
                        continue
                    seen.add(id(value))
                    name = f"{pname}.{key}"
                    while name in found:
                        name += "'"
                    found[name] = value
        return found

    # ---- what stays behind ----
    def left_behind(self, managed: set[int]) -> dict[str, int]:
        out: dict[str, int] = {}
        dev = self.device.type
        for i, chunk in enumerate(self.chunks):
            bufs = [b for _, b in chunk.named_buffers() if b is not None and b.device.type == dev
                    and id(b) not in managed]
            size = unique_storage_bytes(bufs)
            if size:
                out[f"chunk{i} registered module buffers ({len(bufs)} tensors)"] = size
            for mname, module in chunk.named_modules():
                dispatcher = getattr(module, "token_dispatcher", None)
                if dispatcher is None:
                    continue
                tensors = [v for v in vars(dispatcher).values() if isinstance(v, torch.Tensor)
                           and v.device.type == dev]
                size = unique_storage_bytes(tensors)
                if size:
                    out[f"chunk{i}.{mname}.token_dispatcher state of the last forward"] = size
        scalars = []
        for _path, _kind, opt in self.optimizers:
            for attr in ("found_inf", "_scale_one", "_dummy_overflow_buf", "_scale"):
                value = getattr(opt, attr, None)
                if isinstance(value, torch.Tensor) and value.device.type == dev:
                    scalars.append(value)
            scaler = getattr(opt, "grad_scaler", None)
            for value in vars(scaler).values() if scaler is not None else ():
                if isinstance(value, torch.Tensor) and value.device.type == dev:
                    scalars.append(value)
        size = unique_storage_bytes(scalars)
        if size:
            out[f"optimizer scalars (found_inf, loss scale; {len(scalars)} tensors)"] = size
        states_skipped = []
        for _path, _kind, opt in self.optimizers:
            for state in opt.optimizer.state.values():
                for value in (state.values() if isinstance(state, dict) else ()):
                    if isinstance(value, torch.Tensor) and value.device.type == dev and id(value) not in managed:
                        states_skipped.append(value)
        size = unique_storage_bytes(states_skipped)
        if size:
            out[f"optimizer state tensors not coalesced ({len(states_skipped)})"] = size
        return out


# ---------------------------------------------------------------------------------------------------------------
# groups that are not flat buffers
# ---------------------------------------------------------------------------------------------------------------
class _ShardGrads(DroppedTensors):
    """``.grad`` / ``.decoupled_grad`` left on main-weight shards and parameters after the optimizer step.

    With fp32 gradient reduction they are views into ``grad_data`` (no memory of their own, counted there); with
    bf16 gradients they are fp32 copies. The next step recreates them (``prepare_grads``), so dropping is exact."""

    def __init__(self, name: str, holders: list[torch.Tensor], names: dict[int, str],
                 grad_buffers: list[torch.Tensor]):
        super().__init__(name)
        self._holders = list({id(h): h for h in holders}.values())
        self._names = names
        self._grad_buffers = grad_buffers

    def held_tensors(self) -> list[tuple[str, torch.Tensor]]:
        found = []
        with warnings.catch_warnings():  # megatron sets .grad on non-leaf shard views; reading it warns
            warnings.simplefilter("ignore")
            for h in self._holders:
                for attr in ("grad", "decoupled_grad"):
                    g = getattr(h, attr, None)
                    if isinstance(g, torch.Tensor):
                        found.append((f"{self._names.get(id(h), 'param')}.{attr}", g))
        return found

    def excluded_storages(self) -> set[int]:
        # Looked up each time: an onload re-allocates the grad buffers, so their addresses change every cycle.
        return {_storage_key(t) for t in self._grad_buffers}

    def drop(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for h in self._holders:
                if h.grad is not None:
                    h.grad = None
                if getattr(h, "decoupled_grad", None) is not None:
                    h.decoupled_grad = None


class _GlobalMemoryBufferGroup(DroppedTensors):
    """megatron's ``GlobalMemoryBuffer`` (scratch tensors keyed by name and dtype, re-allocated on next use)."""

    def __init__(self, name: str, device_type: str):
        super().__init__(name)
        self._device_type = device_type

    @staticmethod
    def _buffer() -> dict | None:
        try:
            from megatron.core import parallel_state
        except Exception:  # pragma: no cover
            return None
        gmb = getattr(parallel_state, "_GLOBAL_MEMORY_BUFFER", None)
        buf = getattr(gmb, "buffer", None)
        return buf if isinstance(buf, dict) else None

    def held_tensors(self) -> list[tuple[str, torch.Tensor]]:
        buf = self._buffer() or {}
        return [(f"global_memory_buffer[{key}]", t) for key, t in list(buf.items())
                if isinstance(t, torch.Tensor) and t.device.type == self._device_type]

    def drop(self) -> None:
        buf = self._buffer()
        if buf is None:
            return
        for key in [k for k, t in buf.items() if isinstance(t, torch.Tensor) and t.device.type == self._device_type]:
            del buf[key]


# ---------------------------------------------------------------------------------------------------------------
# the manager
# ---------------------------------------------------------------------------------------------------------------
class MegatronMemoryManager(MemoryManager):
    """A MemoryManager that refuses to offload while megatron has gradient or parameter communication in flight."""

    def __init__(self, discovery: _Discovery, **kwargs: Any):
        super().__init__(**kwargs)
        self._discovery = discovery

    def prepare_offload(self, *groups: str) -> list:
        """Every offload (plain, budgeted, a phase's, a swap's outgoing side) checks here that no gradient
        reduction or parameter all-gather is in flight before anything moves."""
        names = set(groups) if groups else set(self.group_names)
        self._check_no_communication(names)
        return super().prepare_offload(*groups)

    def _check_no_communication(self, names: set[str]) -> None:
        for i, chunk in enumerate(self._discovery.chunks):
            for gname, bucket_group in _bucket_groups(chunk):
                if names & {"grad_buffers", "grads"} and getattr(bucket_group, "grad_reduce_handle", None) is not None:
                    raise MemmgrStateError(
                        f"group 'grad_buffers': a gradient reduction is in flight on chunk{i}.{gname} "
                        f"(grad_reduce_handle is set); nothing was moved. Call model.finish_grad_sync() and finish "
                        f"the optimizer step before offloading")
                if "weights" in names and getattr(bucket_group, "param_gather_handle", None) is not None:
                    raise MemmgrStateError(
                        f"group 'weights': a parameter all-gather is in flight on chunk{i}.{gname} "
                        f"(param_gather_handle is set); nothing was moved. Finish it (bucket_group."
                        f"finish_param_sync(), or run the forward that waits for it) before offloading")

    def on_copies_in_flight(self, names: tuple[str, ...]) -> None:
        self._refresh_left_behind()

    def _collect_optimizer_states(self, main_ids: set[int]) -> dict[str, torch.Tensor]:
        """The optimizer state now (Adam creates it lazily at the first step; a checkpoint load replaces it): the
        tensors the group already holds are taken without further checks."""
        held = {id(t) for t in self.group("optimizer_states").tensors}
        return self._discovery.optimizer_states(exclude=main_ids, held=held)

    def _refresh_left_behind(self, *_: Any) -> None:
        managed = {id(t) for name in self.group_names for _, t in self.group(name).named_tensors}
        self.left_behind.clear()
        self.left_behind.update(self._discovery.left_behind(managed))


def for_megatron(model_chunks: torch.nn.Module | Sequence[torch.nn.Module], optimizer: Any, *,
                 bucket_size_mb: float = DEFAULT_BUCKET_SIZE_MB, empty_cache: bool = True, pin_ahead: bool = True,
                 pool: HostMemoryPool | None = None, guard_offloaded: bool | None = None,
                 same_address: bool = False) -> MemoryManager:
    """A MemoryManager for megatron-core DDP model chunks and their megatron optimizer (see the module docstring).

    ``model_chunks``: one DistributedDataParallel chunk or the list of them (virtual pipeline); ``optimizer``: what
    ``get_megatron_optimizer`` returned (ChainedOptimizer, DistributedOptimizer, Float16OptimizerWithFloat16Params,
    FP32Optimizer), or None to manage the model alone. Build it while all state is on the GPU, between training
    steps. ``pool``: the host memory pool for the offloaded copies (default: memmgr's shared pool). Raises
    MemmgrIntegrationError (changing nothing) for inputs it cannot manage. ``guard_offloaded`` and
    ``same_address``: the manager's (``MemoryManager``).
    """
    for flag, value in (("empty_cache", empty_cache), ("pin_ahead", pin_ahead), ("same_address", same_address)):
        arguments.boolean("for_megatron", flag, value)
    if same_address:
        require_same_address("for_megatron")  # before anything changes
    arguments.number("for_megatron", "bucket_size_mb", bucket_size_mb, positive=True, maximum=2.0**40)
    arguments.instance("for_megatron", "pool", pool, HostMemoryPool, optional=True)
    chunks = _as_chunks(model_chunks)
    found = _Discovery(chunks, optimizer)

    # Validate everything that will be coalesced before anything changes.
    loose = dict(found.loose_params)
    if loose:
        validate_tensors(list(loose.items()), "weights")
    if found.main_weights:
        validate_tensors(list(found.main_weights.items()), "main_weights")
    main_ids = {id(t) for t in found.main_weights.values()} | {id(p) for _, p in found.named_params}
    states = found.optimizer_states(exclude=main_ids)
    if states:
        validate_tensors(list(states.items()), "optimizer_states")

    named_params = list(found.named_params)
    mgr = MegatronMemoryManager(found, bucket_size_mb=bucket_size_mb, empty_cache=empty_cache, pool=pool,
                                named_weights=lambda: list(named_params), guard_offloaded=guard_offloaded,
                                same_address=same_address)
    mgr.add_group("grad_buffers", found.grad_buffers, Policy.DISCARD, adopt=True, pin_ahead=pin_ahead)
    mgr.add_group("grads", _ShardGrads("grads", found.grad_holders, found.opt_param_names,
                                       list(found.grad_buffers.values())))
    weights = BucketizedFlatTensors.from_buffers(found.param_buffers, name="weights", pool=mgr.pool,
                                                 pin_ahead=pin_ahead, same_address=same_address)
    if loose:
        weights.bucket_size_bytes = int(bucket_size_mb * 2**20)
        weights.extend(loose, pin_ahead=pin_ahead)
    mgr.add_group("weights", weights)
    mgr.add_group("main_weights", found.main_weights, pin_ahead=pin_ahead)
    mgr.add_group("optimizer_states", states, pin_ahead=pin_ahead,
                  collect=lambda: mgr._collect_optimizer_states(main_ids))
    mgr.add_group("scratch", _GlobalMemoryBufferGroup("scratch", found.device.type))
    # Checkpointing (torch state_dict, megatron's sharded_state_dict and dist_checkpointing) reads and writes the
    # state through these; each brings what it touches back first.
    for chunk in chunks:
        mgr.onload_for_state_dicts(chunk, ["weights"])
    for _path, _kind, opt in found.optimizers:
        mgr.onload_for_state_dicts(opt.optimizer, ["weights", "main_weights", "optimizer_states"])
    mgr._refresh_left_behind()
    logger.info("for_megatron: %d chunk(s), %d inner optimizer(s); %s", len(chunks), len(found.optimizers),
                ", ".join(f"{n}={s.nbytes / 2**20:.1f} MiB" for n, s in mgr.state.items()))
    return mgr


# ---------------------------------------------------------------------------------------------------------------
# process groups (for memmgr.comms.NcclCommunicators)
# ---------------------------------------------------------------------------------------------------------------
# megatron-core's parallel_state getters, by the name the group gets here
MEGATRON_GETTERS = {
    "tensor": "get_tensor_model_parallel_group",
    "pipeline": "get_pipeline_model_parallel_group",
    "data": "get_data_parallel_group",
    "data_context": ("get_data_parallel_group", {"with_context_parallel": True}),
    "context": "get_context_parallel_group",
    "model": "get_model_parallel_group",
    "tensor_context": "get_tensor_and_context_parallel_group",
    "embedding": "get_embedding_group",
    "position_embedding": "get_position_embedding_group",
    "expert": "get_expert_model_parallel_group",
    "expert_tensor": "get_expert_tensor_parallel_group",
    "expert_data": "get_expert_data_parallel_group",
    "expert_tensor_model_pipeline": "get_expert_tensor_model_pipeline_parallel_group",
    "expert_tensor_and_model": "get_expert_tensor_and_model_parallel_group",
}


def megatron_process_groups(*, with_single_rank: bool = False) -> dict[str, Any]:
    """The process groups megatron-core's ``parallel_state`` holds for this rank, by role ("tensor", "pipeline",
    "data", "expert", ...), each group once (the first role that names it), leaving out groups of one rank (no
    communicator to speak of) unless ``with_single_rank``, groups on another backend than the default group's
    (megatron's gloo side groups), and groups whose getter is missing or not initialized. The world group is never
    among them."""
    from megatron.core import parallel_state as ps

    found: dict[str, Any] = {}
    seen: set[int] = set()
    for role, spec in MEGATRON_GETTERS.items():
        getter_name, kwargs = (spec, {}) if isinstance(spec, str) else spec
        getter = getattr(ps, getter_name, None)
        if getter is None:
            continue
        try:
            group = getter(check_initialized=False, **kwargs)
        except TypeError:
            try:
                group = getter(**kwargs)
            except Exception:
                continue
        except Exception:
            continue
        if group is None or isinstance(group, (list, tuple)) or id(group) in seen:
            continue
        if dist.is_initialized() and group is dist.group.WORLD:
            continue
        try:
            size = dist.get_world_size(group)
        except Exception:
            continue
        if size < 2 and not with_single_rank:
            continue
        try:
            if str(dist.get_backend(group)) != str(dist.get_backend()):
                continue  # megatron's gloo side groups: not the job's communicators
        except Exception:
            continue
        seen.add(id(group))
        found[role] = group
    return found
