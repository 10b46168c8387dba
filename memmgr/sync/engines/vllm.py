"""memmgr as the weight source of a vLLM engine, through vLLM's weight-transfer protocol.

vLLM's protocol (``vllm.distributed.weight_transfer``): the trainer calls ``init_weight_transfer_engine`` once, then
per sync ``start_weight_update`` -> ``update_weights`` (one or more chunks) -> ``finish_weight_update`` (which
commits a ``weight_version``). Each engine worker runs a ``WeightTransferEngine`` picked by name from
``WeightTransferEngineFactory``. vLLM ships NCCL and CUDA-IPC backends; this module adds ``memmgr_gloo`` (buckets
over a gloo group: CPU engines) to vLLM's registries and drives it from the trainer:

- ``VLLMWeightSync`` (trainer side): connects to the engine, checks the names, shapes and dtypes it is about to send
  against what the engine holds before any weight moves, streams flat per-dtype ``WeightBucket`` s (one
  ``update_weights`` chunk per bucket, its data broadcast while the engine receives), and commits the new
  ``weight_version`` only after every engine worker finished;
- ``MemmgrGlooWeightTransferEngine`` (engine worker side): receives the buckets and loads them through vLLM's
  layerwise reload (the path vLLM's own NCCL backend takes, which re-runs the CPU kernels' weight packing);
- ``MemmgrWorkerExtension``: the worker extension that registers the backend inside vLLM's worker processes and
  answers ``memmgr_weight_metadata`` (what the engine holds) over ``collective_rpc``.

Start the engine with ``vllm.LLM(model, **vllm_engine_kwargs())`` (adds the backend and the worker extension), then
``VLLMWeightSync(llm).connect()`` and ``sync(weights, weight_version=...)``.

What the engine holds is the checkpoint it was started from: the names, shapes (and, for floating-point tensors,
the engine's dtype) of its safetensors files. A sync must send exactly those tensors (HF names for an HF
checkpoint); anything else is refused before the engine's layers are touched.

A sync is all-or-nothing (``atomic=True``, the default). Once the manifest is accepted, before vLLM's layerwise
reload touches a layer, each worker copies what it serves into host buffers (``_ServedState``: every module's
parameters and buffers, the kernel tensors vLLM's reload copies processed weights into, pinned on CUDA, allocated by
the first sync and reused; and a reference to each module's other attributes, e.g. the CPU backend's packed-GEMM
handles that post-load processing replaces). Should the sync fail mid-way (a transport error or timeout, a loader
that refuses a bucket, a weight stream that breaks its specs, a trainer that abandons it), the worker ends the
reload and puts every module back: the tensors' previous values copied in place, the replaced attributes restored,
so the engine serves exactly its previous weights; the version is not committed, and the trainer's next sync
reconnects. On success the copy is simply dropped. Its cost per sync: one device->host copy of the model's weights
and one host copy of them held (plus, on the CPU backend, the previous packed weights kept alive until the sync
ends). With ``atomic=False`` nothing is copied; a failed sync leaves completed layers on the new weights and the rest
on the old, and the worker reports itself not consistent (``VLLMWeightSync.consistent()`` is False,
``check_consistent()`` raises ``MemmgrStateError``) until a sync commits.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import torch
from vllm.distributed.weight_transfer import WeightTransferEngineFactory, WeightTransferTrainerFactory
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from memmgr import arguments
from memmgr.errors import MemmgrInputError, MemmgrStateError, MemmgrSyncError, MemmgrSyncMismatchError
from memmgr.sync.transports.base import (
    DEFAULT_BUCKET_BYTES,
    ParamSpec,
    WeightBucket,
    as_specs,
    bucketize,
    check_specs,
    dtype_from_name,
    dtype_name,
    is_multi_dtype_bucket,
    specs_of,
    split_per_dtype,
)
from memmgr.sync.transports.gloo import GlooReceiver, GlooTransport, connect

logger = logging.getLogger("memmgr")

BACKEND = "memmgr_gloo"
WORKER_EXTENSION = "memmgr.sync.engines.vllm.MemmgrWorkerExtension"

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


# ---------------------------------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------------------------------
def register_vllm_backends() -> None:
    """Adds ``memmgr_gloo`` to vLLM's worker-side and trainer-side weight-transfer registries (idempotent).

    Runs on import of this module, so naming ``WORKER_EXTENSION`` as the engine's ``worker_extension_cls``
    registers the backend inside vLLM's worker processes before they build their transfer engine.
    """
    for factory, cls_name in ((WeightTransferEngineFactory, "MemmgrGlooWeightTransferEngine"),
                              (WeightTransferTrainerFactory, "MemmgrGlooTrainerWeightTransferEngine")):
        try:
            factory.register_engine(BACKEND, __name__, cls_name)
        except ValueError:  # already registered (this module imported twice, or by a vLLM plugin)
            pass


def vllm_engine_kwargs(**extra: Any) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM(...)`` / ``EngineArgs`` that enable memmgr's weight sync: the
    ``memmgr_gloo`` transfer backend and the worker extension (``extra`` is merged in)."""
    from vllm.config import WeightTransferConfig

    if extra.get("worker_extension_cls") not in (None, WORKER_EXTENSION):
        raise MemmgrInputError(f"vllm_engine_kwargs: worker_extension_cls={extra['worker_extension_cls']!r} would "
                               f"replace memmgr's {WORKER_EXTENSION!r}; subclass MemmgrWorkerExtension instead")
    kwargs = {"weight_transfer_config": WeightTransferConfig(backend=BACKEND), "worker_extension_cls": WORKER_EXTENSION}
    kwargs.update(extra)
    return kwargs


# ---------------------------------------------------------------------------------------------------------------------
# what the engine holds
# ---------------------------------------------------------------------------------------------------------------------
def _safetensors_header(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def _checkpoint_files(model_config: Any) -> list[str]:
    root = str(model_config.model)
    if not os.path.isdir(root):
        try:
            from huggingface_hub import snapshot_download

            root = snapshot_download(root, revision=getattr(model_config, "revision", None), local_files_only=True,
                                     allow_patterns=["*.safetensors", "*.safetensors.index.json"])
        except Exception as exc:
            raise MemmgrSyncError(f"memmgr weight sync: the engine's model {model_config.model!r} is neither a folder "
                                  f"nor in the local Hugging Face cache ({exc}); start the engine from a local "
                                  f"folder so its weight names and shapes can be checked") from exc
    index = os.path.join(root, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(root, n) for n in names]
    files = sorted(os.path.join(root, n) for n in os.listdir(root) if n.endswith(".safetensors"))
    if not files:
        raise MemmgrSyncError(f"memmgr weight sync: the engine's model folder {root!r} has no .safetensors file; "
                              f"memmgr reads the engine's weight names and shapes from safetensors headers")
    return files


def engine_weight_metadata(model_config: Any) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every weight the engine was loaded with: its checkpoint's safetensors headers
    (no tensor is read), floating-point tensors in the engine's dtype (``model_config.dtype``)."""
    engine_dtype = model_config.dtype
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for path in _checkpoint_files(model_config):
        for name, info in _safetensors_header(path).items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise MemmgrSyncError(f"memmgr weight sync: checkpoint tensor {name!r} in {path} has safetensors "
                                      f"dtype {info['dtype']!r}, which memmgr does not know")
            if dtype.is_floating_point and isinstance(engine_dtype, torch.dtype):
                dtype = engine_dtype
            out[name] = (tuple(int(s) for s in info["shape"]), dtype)
    return out


def _to_wire(meta: Mapping[str, tuple[Sequence[int], torch.dtype]]) -> dict[str, list]:
    return {n: [list(shape), dtype_name(dtype)] for n, (shape, dtype) in meta.items()}


def _from_wire(meta: Mapping[str, Sequence]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {n: (tuple(int(s) for s in shape), dtype_from_name(d)) for n, (shape, d) in meta.items()}


class MemmgrWorkerExtension:
    """vLLM worker extension (``worker_extension_cls=WORKER_EXTENSION``): registers the ``memmgr_gloo`` backend in
    the worker process (by importing this module) and answers ``collective_rpc("memmgr_weight_metadata")``."""

    def memmgr_weight_metadata(self) -> dict[str, list]:
        """Name -> [shape, dtype name] of every weight this worker's engine holds (see engine_weight_metadata)."""
        return _to_wire(engine_weight_metadata(self.vllm_config.model_config))  # type: ignore[attr-defined]

    def memmgr_weight_state(self) -> dict[str, Any]:
        """Whether this worker serves the weights of one committed sync (``inconsistent``: None, or why not), and
        the host bytes its atomicity copy holds."""
        engine = getattr(self, "weight_transfer_engine", None)
        if not isinstance(engine, MemmgrGlooWeightTransferEngine):
            return {"inconsistent": None, "host_bytes": 0, "syncing": False}
        return {"inconsistent": engine.inconsistent, "host_bytes": engine._served.host_bytes,
                "syncing": engine._reloading}


# ---------------------------------------------------------------------------------------------------------------------
# engine worker side
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class MemmgrGlooInitInfo(WeightTransferInitInfo):
    """Worker-side init info of ``memmgr_gloo``: where the trainer hosts the group's store, the group's size
    (trainer + every engine worker), the rank of the first worker and the timeout of every step."""
    master_address: str
    master_port: int
    world_size: int
    rank_offset: int = 1
    timeout_s: float = 120.0
    atomic: bool = True


_MODULE_INTERNALS = frozenset(torch.nn.Module().__dict__) | {"_parameters", "_buffers", "_modules",
                                                             "_non_persistent_buffers_set"}
_MISSING = object()
_NONE_TENSORS = "\0memmgr: names registered as None"


class _ServedState:
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


@dataclass
class MemmgrGlooUpdateInfo(WeightTransferUpdateInfo):
    """One ``update_weights`` chunk of ``memmgr_gloo``.

    ``manifest`` ([[name, shape, dtype], ...] of the whole sync) comes first: the worker checks it against what it
    holds and only then starts vLLM's layerwise reload. ``buckets`` are ``WeightBucket.meta()`` layouts whose data
    follows over gloo, in order. ``abort`` ends the reload and puts the engine back on its previous weights (the
    trainer gave up mid-sync).
    """
    manifest: list | None = None
    buckets: list = field(default_factory=list)
    abort: bool = False


class MemmgrGlooWeightTransferEngine(WeightTransferEngine[MemmgrGlooInitInfo, MemmgrGlooUpdateInfo]):
    """vLLM worker side of ``memmgr_gloo``: receives flat per-dtype buckets over gloo and loads them through vLLM's
    layerwise reload, which re-runs each layer's post-load processing (the CPU backend packs weights for its GEMM
    kernels, so writing into parameters in place would not reach the kernels)."""

    init_info_cls = MemmgrGlooInitInfo
    update_info_cls = MemmgrGlooUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config: Any, vllm_config: Any, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self._receiver: GlooReceiver | None = None
        self._reloading = False
        self._expected: set[str] = set()
        self._loaded: set[str] = set()
        self.atomic = True
        self._served = _ServedState()
        self.inconsistent: str | None = None  # why the served weights are a mix (a failed non-atomic sync)

    def init_transfer_engine(self, init_info: MemmgrGlooInitInfo) -> None:
        if self._receiver is not None:  # a trainer reconnects: its previous group is gone
            self._receiver.close()
            self._receiver = None
        pc = self.parallel_config
        rank = init_info.rank_offset + getattr(pc, "data_parallel_index", 0) * pc.world_size + pc.rank
        self.atomic = bool(getattr(init_info, "atomic", True))
        if not self.atomic:
            self._served = _ServedState()  # a trainer without atomicity: the host copy is freed
        group = connect(init_info.master_address, init_info.master_port, init_info.world_size, rank,
                        timeout_s=init_info.timeout_s)
        # a fresh buffer per bucket: vLLM's layerwise reload keeps views of a layer's tensors until the layer is
        # complete, which may be a later bucket
        self._receiver = GlooReceiver(group, reuse_buffer=False)
        logger.info("memmgr_gloo: worker joined the weight-sync group as rank %d of %d", rank, init_info.world_size)

    def start_weight_update(self) -> None:
        # the layerwise reload starts once the manifest has been checked (first update_weights chunk)
        self._reloading = False
        self._loaded = set()

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # the base class synchronizes the accelerator afterwards, which fails on a CPU-only worker
        self.receive_weights(self.parse_update_info(update_info))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _check_manifest(self, manifest: list) -> None:
        sent = [ParamSpec(str(n), tuple(int(s) for s in shape), dtype_from_name(str(d))) for n, shape, d in manifest]
        check_specs(sent, engine_weight_metadata(self.model_config), where="the vLLM engine worker")
        self._expected = {s.name for s in sent}

    def receive_weights(self, update_info: MemmgrGlooUpdateInfo) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        if update_info.abort:
            self._restore()
            return
        if update_info.manifest is not None:
            if self._reloading:  # a previous sync was never finished nor aborted: put it back first
                self._restore()
            self._check_manifest(update_info.manifest)
            if self.atomic:
                self._served.capture(self.model)
            initialize_layerwise_reload(self.model)
            self._reloading = True
        if not update_info.buckets:
            return
        if self._receiver is None:
            raise MemmgrSyncError("memmgr_gloo: update_weights before init_weight_transfer_engine; the trainer must "
                                  "connect first (VLLMWeightSync.connect)")
        if not self._reloading:
            raise MemmgrSyncError("memmgr_gloo: weights arrived before the manifest; the trainer must send the "
                                  "manifest as the first update_weights chunk of a sync (VLLMWeightSync.sync does)")
        try:
            for meta in update_info.buckets:
                bucket = self._receiver.receive(meta)
                self.model.load_weights(bucket.views())
                self._loaded.update(e.name for e in bucket.entries)
        except BaseException:
            self._restore()
            raise

    def _restore(self) -> None:
        """After a failed or abandoned sync: drops what layers that were not fully loaded had buffered and
        finalizes the reload, so every layer is back on its kernel tensors; then, with ``atomic``, puts back what
        every module served before the sync (``_ServedState.restore``: all previous weights, also of the layers
        this sync completed). Without, completed layers keep the new weights and the worker is marked not
        consistent until a sync commits."""
        if not self._reloading:
            return
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload
        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

        for layer in self.model.modules():
            info = get_layerwise_info(layer)
            if info.can_load() and info.load_numel > 0:
                info.loaded_weights = []
                info.load_numel = 0
        try:
            finalize_layerwise_reload(self.model, self.model_config)
        finally:
            self._reloading = False
            if self.atomic:
                restored = self._served.restore()
                self._served.clear()
                logger.warning("memmgr_gloo: weight sync abandoned; %d tensors and every module's processed state "
                               "put back: the engine serves its previous weights", restored)
            else:
                self._refresh_tied_layers()
                self.inconsistent = "a sync failed part-way with atomic=False"
                logger.warning("memmgr_gloo: weight sync abandoned with atomic=False; layers completed by it serve "
                               "the new weights, the others the previous ones; the engine is not consistent until "
                               "a sync commits")

    def _refresh_tied_layers(self) -> None:
        """Re-runs the post-load processing of layers that share a weight with another layer (a tied output head).

        vLLM's layerwise reload processes only layers that received weights; a tied head receives none (the
        checkpoint has the embedding only), so on the CPU its GEMM kept the weights it packed from the previous
        embedding. Only unquantized methods are re-run: their processing reads the weight and can be repeated."""
        owners: dict[int, list[torch.nn.Module]] = {}
        for module in self.model.modules():
            for param in module.parameters(recurse=False):
                owners.setdefault(id(param), []).append(module)
        done: set[int] = set()
        for modules in owners.values():
            if len(modules) < 2:
                continue
            for module in modules:
                method = getattr(module, "quant_method", None)
                if id(module) in done or method is None or not type(method).__name__.startswith("Unquantized"):
                    continue
                method.process_weights_after_loading(module)
                done.add(id(module))

    def finish_weight_update(self) -> None:
        if not self._reloading:
            return
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        missing = self._expected - self._loaded
        if missing:
            self._restore()
            raise MemmgrSyncError(f"memmgr_gloo: finish_weight_update with {len(missing)} announced weight(s) never "
                                  f"received (e.g. {sorted(missing)[:3]}); layers not fully loaded keep their previous "
                                  f"weights")
        try:
            finalize_layerwise_reload(self.model, self.model_config)
            self._refresh_tied_layers()
        except BaseException:
            self._reloading = True  # the half-processed model goes back to its captured state
            self._restore()
            raise
        self._reloading = False
        self._served.clear()
        self.inconsistent = None

    def shutdown(self) -> None:
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None


# ---------------------------------------------------------------------------------------------------------------------
# trainer side
# ---------------------------------------------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for the group's store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class VLLMSyncReport:
    """What one sync did: buckets and weight bytes moved, wall time from entering ``sync`` to the engine having
    committed, and the weight version committed."""
    weight_version: str
    buckets: int
    nbytes: int
    seconds: float

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


Weights = Any  # Mapping[str, Tensor] | Sequence[(name, Tensor)] | Sequence[WeightBucket] | Iterable of either


def _plan(weights: Weights, specs: Sequence[Any] | None, bucket_bytes: int
          ) -> tuple[list[ParamSpec], Iterator[WeightBucket]]:
    """The specs to check and the bucket stream to send, from whatever form the weights come in."""
    if specs is not None:
        specs = as_specs(specs)
    if isinstance(weights, Mapping):
        return (specs if specs is not None else specs_of(weights),
                bucketize(weights.items(), bucket_bytes, device="cpu"))
    if isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)):
        if weights and all(isinstance(w, WeightBucket) or is_multi_dtype_bucket(w) for w in weights):
            buckets = [b for w in weights for b in (split_per_dtype(w) if is_multi_dtype_bucket(w) else [w])]
            return (specs if specs is not None else [s for b in buckets for s in b.specs()], iter(buckets))
        return (specs if specs is not None else specs_of(weights),
                bucketize(iter(weights), bucket_bytes, device="cpu"))
    if specs is None:
        raise MemmgrInputError("VLLMWeightSync.sync: the weights are a one-pass iterator, so their names, shapes and "
                               "dtypes cannot be checked before they move; pass specs= (the export's entries, or a "
                               "ParamSpec per tensor) or a list/dict of tensors or buckets")
    it = iter(weights)
    first = next(it, None)
    if first is None:
        return specs, iter(())

    def chain() -> Iterator[Any]:
        yield first
        yield from it

    if isinstance(first, WeightBucket) or is_multi_dtype_bucket(first):
        def flat() -> Iterator[WeightBucket]:
            for w in chain():
                yield from (split_per_dtype(w) if is_multi_dtype_bucket(w) else [w])

        return specs, flat()
    return specs, bucketize(chain(), bucket_bytes, device="cpu")


class OfflineLLMClient:
    """vLLM's weight-sync client protocol (``VLLMWeightSyncClient``: plain dicts in) over an offline ``vllm.LLM``,
    whose methods take request dicts (``{"init_info": ...}``, ``{"update_info": ...}``), plus ``collective_rpc``."""

    def __init__(self, llm: Any):
        self.llm = llm

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version)

    def shutdown_weight_transfer_engine(self) -> None:
        self.llm.shutdown_weight_transfer_engine()

    def collective_rpc(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return self.llm.collective_rpc(method, *args, **kwargs)

    def get_weight_version(self) -> str:
        return self.llm.get_weight_version()


def _as_client(client: Any) -> Any:
    try:
        from vllm.entrypoints.rl.offline import RLOfflineMixin
    except ImportError:  # pragma: no cover - other vLLM layouts
        return client
    return OfflineLLMClient(client) if isinstance(client, RLOfflineMixin) else client


class VLLMWeightSync:
    """Trainer side of memmgr's vLLM weight sync (the ``memmgr_gloo`` backend).

    ``client`` is the engine's control plane: a ``vllm.LLM`` (offline, wrapped in ``OfflineLLMClient``), or
    anything with the four methods of vLLM's ``VLLMWeightSyncClient`` protocol (plain dicts) plus ``collective_rpc``
    (to ask the engine what it holds). ``num_workers`` is the number of engine worker processes (tensor x pipeline
    x data parallel; default: as many as answer ``collective_rpc``).
    Every step is bounded by ``timeout_s``; a peer that does not answer raises ``MemmgrSyncTimeoutError``.
    ``atomic`` (default True) has every worker keep a host copy of what it serves for the length of a sync and put
    it back if the sync fails, so the engine never serves a mix of old and new weights; False saves that copy and
    time, and a failed sync then leaves the engine not consistent (``consistent()``) until a sync commits.
    Bad arguments raise ``MemmgrInputError`` naming them.
    """

    def __init__(self, client: Any, *, master_address: str = "127.0.0.1", master_port: int | None = None,
                 num_workers: int | None = None, timeout_s: float = 120.0,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, atomic: bool = True):
        where = "VLLMWeightSync"
        arguments.string(where, "master_address", master_address)
        arguments.integer(where, "master_port", master_port, minimum=1, maximum=65535, optional=True)
        arguments.integer(where, "num_workers", num_workers, minimum=1, maximum=1 << 20, optional=True)
        arguments.number(where, "timeout_s", timeout_s, positive=True)
        arguments.integer(where, "bucket_bytes", bucket_bytes, minimum=1)
        arguments.boolean(where, "atomic", atomic)
        client = _as_client(client)
        for meth in ("init_weight_transfer_engine", "start_weight_update", "update_weights", "finish_weight_update",
                     "collective_rpc"):
            if not callable(getattr(client, meth, None)):
                raise MemmgrInputError(f"VLLMWeightSync: client {type(client).__name__} has no {meth}(); pass a "
                                       f"vllm.LLM started with vllm_engine_kwargs(), or a client with vLLM's "
                                       f"weight-transfer methods and collective_rpc")
        self.client = client
        self.master_address = master_address
        self.master_port = master_port
        self._fixed_port = master_port is not None
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.bucket_bytes = int(bucket_bytes)
        self.atomic = atomic
        self.transport: GlooTransport | None = None
        self.syncs = 0
        self.last_report: VLLMSyncReport | None = None

    # -- control plane ------------------------------------------------------------------------------------------------
    def _rpc(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except MemmgrSyncError:
            raise
        except Exception as exc:
            raise MemmgrSyncError(f"vLLM weight sync: the engine failed in {what} ({type(exc).__name__}: "
                                  f"{str(exc)[:800]})") from exc

    def engine_metadata(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of what the engine holds (asked from every worker; they must agree)."""
        answers = self._rpc("collective_rpc('memmgr_weight_metadata')", self.client.collective_rpc,
                            "memmgr_weight_metadata")
        if not answers:
            raise MemmgrSyncError("vLLM weight sync: no engine worker answered memmgr_weight_metadata")
        first = answers[0]
        for rank, other in enumerate(answers[1:], start=1):
            if other != first:
                raise MemmgrSyncError(f"vLLM weight sync: engine workers 0 and {rank} hold different checkpoints; "
                                      f"every worker must serve the same model")
        if self.num_workers is None:
            self.num_workers = len(answers)
        return _from_wire(first)

    def weight_state(self) -> list[dict[str, Any]]:
        """Each worker's ``{"inconsistent": None or why, "host_bytes": its atomicity copy, "syncing": bool}``."""
        return list(self._rpc("collective_rpc('memmgr_weight_state')", self.client.collective_rpc,
                              "memmgr_weight_state"))

    def consistent(self) -> bool:
        """Whether every worker serves the weights of one committed sync (or of its checkpoint). Always True with
        ``atomic``; False after a failed sync with ``atomic=False``, until a sync commits."""
        return all(state.get("inconsistent") is None for state in self.weight_state())

    def check_consistent(self) -> None:
        """Raises ``MemmgrStateError`` if some worker serves a mix of old and new weights (see ``consistent``)."""
        bad = [f"worker {i}: {st['inconsistent']}" for i, st in enumerate(self.weight_state())
               if st.get("inconsistent") is not None]
        if bad:
            raise MemmgrStateError(f"vLLM weight sync: the engine serves a mix of old and new weights ({'; '.join(bad)}"
                                   f"); sync again before generating (or build VLLMWeightSync with atomic=True)")

    def connect(self) -> "VLLMWeightSync":
        """Joins the engine's workers in a gloo group of their own (the engine's ``init_weight_transfer_engine``
        runs on a helper thread while this process hosts the group's store as rank 0)."""
        if self.transport is not None:
            return self
        if self.num_workers is None:
            self.engine_metadata()
        assert self.num_workers is not None
        # a fixed port is the caller's; otherwise a fresh one per connection (a previous group's store may linger)
        port = self.master_port if self._fixed_port else free_port(self.master_address)
        world = 1 + int(self.num_workers)
        init = {"master_address": self.master_address, "master_port": port, "world_size": world, "rank_offset": 1,
                "timeout_s": self.timeout_s, "atomic": self.atomic}
        joined: dict[str, Any] = {}

        def join() -> None:
            try:
                joined["group"] = connect(self.master_address, port, world, 0, timeout_s=self.timeout_s)
            except BaseException as exc:  # handed to the caller below
                joined["error"] = exc

        # the engine's workers block in init_weight_transfer_engine until every rank joined, so this side hosts the
        # store on a thread of its own and watches the RPC: an engine that fails to init raises at once
        joiner = threading.Thread(target=join, name="memmgr-gloo-join", daemon=True)
        joiner.start()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="memmgr-vllm-init") as pool:
            future = pool.submit(self.client.init_weight_transfer_engine, init)
            while joiner.is_alive():
                if future.done() and future.exception() is not None:
                    exc = future.exception()
                    raise MemmgrSyncError(f"vLLM weight sync: the engine failed in init_weight_transfer_engine "
                                          f"({type(exc).__name__}: {str(exc)[:800]}); start it with "
                                          f"vllm_engine_kwargs() so it has the {BACKEND} backend") from exc
                joiner.join(0.01)
            if "error" in joined:
                raise joined["error"]
            self._rpc("init_weight_transfer_engine", future.result, self.timeout_s)
        group = joined["group"]
        self.master_port = port
        self.transport = GlooTransport(group, announce=self._announce, timeout_s=self.timeout_s)
        return self

    def _announce(self, description: dict[str, Any]) -> None:
        self.client.update_weights({"buckets": [description]})

    # -- one sync ------------------------------------------------------------------------------------------------------
    def sync(self, weights: Weights, *, specs: Sequence[Any] | None = None,
             weight_version: str | None = None) -> VLLMSyncReport:
        """Sends ``weights`` to the engine and commits ``weight_version`` (default: the count of syncs so far).

        ``weights``: a dict or list of ``(hf_name, tensor)``, a list of ``WeightBucket`` s (or of the Megatron
        export's buckets, one flat tensor per dtype), or a one-pass iterator of any of these together with ``specs``
        (``ParamSpec`` s, or the export's ``entries``: anything with name, shape and dtype). Names, shapes and dtypes
        are checked against the engine before any weight moves (``MemmgrSyncMismatchError``; the engine keeps its
        previous weights). The version is committed only after every engine worker finished loading.
        """
        t0 = time.perf_counter()
        if self.transport is None:
            self.connect()
        transport = self.transport
        assert transport is not None
        sent_specs, buckets = _plan(weights, specs, self.bucket_bytes)
        check_specs(sent_specs, self.engine_metadata(), where="the vLLM engine")
        version = str(weight_version) if weight_version is not None else str(self.syncs + 1)
        manifest = [[s.name, list(s.shape), dtype_name(s.dtype)] for s in sent_specs]
        announced = {s.name: s for s in sent_specs}

        self._rpc("start_weight_update", self.client.start_weight_update)
        try:
            self.client.update_weights({"manifest": manifest})
        except Exception as exc:
            raise MemmgrSyncMismatchError(f"vLLM weight sync: the engine refused the sync's manifest before any "
                                          f"weight moved ({str(exc)[:800]}); it keeps its previous weights") from exc
        transport.start(sent_specs)
        nbuckets = nbytes = 0
        seen: set[str] = set()
        try:
            for bucket in buckets:
                for e in bucket.entries:
                    if announced.get(e.name) != e.spec() or e.name in seen:
                        raise MemmgrSyncMismatchError(
                            f"vLLM weight sync: the weight stream yielded {e.name!r} (shape {list(e.shape)}, "
                            f"{dtype_name(e.dtype)}) which its specs do not announce, or twice; the stream and its "
                            f"specs must agree. The sync was abandoned")
                    seen.add(e.name)
                if bucket.flat.device.type != "cpu":  # gloo moves host memory
                    bucket = WeightBucket(bucket.flat.cpu(), bucket.entries)
                transport.send_bucket(bucket)
                nbuckets += 1
                nbytes += bucket.payload_bytes
            transport.finish()
            if seen != set(announced):
                missing = sorted(set(announced) - seen)
                raise MemmgrSyncMismatchError(f"vLLM weight sync: the weight stream ended without {len(missing)} "
                                              f"announced weight(s) (e.g. {missing[:3]}); the sync was abandoned")
        except BaseException as exc:
            self._abandon(exc)
            raise
        self._rpc("finish_weight_update", self.client.finish_weight_update, version)
        self.syncs += 1
        self.last_report = VLLMSyncReport(version, nbuckets, nbytes, time.perf_counter() - t0)
        logger.info("vLLM weight sync %s: %d buckets, %.1f MB in %.3f s", version, nbuckets, nbytes / 1e6,
                    self.last_report.seconds)
        return self.last_report

    def _abandon(self, exc: BaseException) -> None:
        """After a failure mid-sync: asks the engine to restore layers not fully loaded and end its update session,
        without committing a version. Best effort when the transport itself broke (the worker restores on its own
        error then)."""
        try:
            self.client.update_weights({"abort": True})
            self.client.finish_weight_update()
        except Exception as inner:
            logger.warning("vLLM weight sync: could not close the engine's update session after %s: %s",
                           type(exc).__name__, inner)
        if not isinstance(exc, MemmgrSyncMismatchError):
            # the stream disagreeing with its specs is caught between buckets, with the group idle; after anything
            # else a broadcast may be half done, so the group is dropped and the next sync reconnects
            self.close()

    def close(self) -> None:
        """Releases the gloo group on this side and asks the engine to release its side."""
        transport, self.transport = self.transport, None
        if transport is None:
            return
        transport.close()
        shutdown = getattr(self.client, "shutdown_weight_transfer_engine", None)
        if callable(shutdown):
            try:
                shutdown()
            except Exception as exc:
                logger.warning("vLLM weight sync: shutdown_weight_transfer_engine failed: %s", exc)


# ---------------------------------------------------------------------------------------------------------------------
# the same through vLLM's trainer-side factory
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class MemmgrGlooTrainerInitInfo(TrainerInitInfo):
    """Trainer init info of ``memmgr_gloo`` for ``WeightTransferTrainerFactory.trainer_init``."""
    backend: ClassVar[str] = BACKEND

    master_address: str = "127.0.0.1"
    master_port: int | None = None
    num_workers: int | None = None
    timeout_s: float = 120.0
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    atomic: bool = True


class MemmgrGlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[MemmgrGlooTrainerInitInfo]):
    """``memmgr_gloo`` behind vLLM's trainer factory: ``send_weights()`` syncs the ``source`` (a vLLM
    ``WeightSource``: its ``metadata()`` is checked against the engine first) through ``VLLMWeightSync``."""

    init_info_cls = MemmgrGlooTrainerInitInfo

    def __init__(self, *, client: Any, source: Any = None, is_sender: bool = True,
                 sync: VLLMWeightSync | None = None) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.sync = sync

    @classmethod
    def trainer_init(cls, init_info: MemmgrGlooTrainerInitInfo, *, client: Any, source: Any = None
                     ) -> "MemmgrGlooTrainerWeightTransferEngine":
        if source is None:
            raise MemmgrInputError("memmgr_gloo trainer engine: pass source= (a vLLM WeightSource of the weights)")
        sync = None
        if init_info.is_sender:
            sync = VLLMWeightSync(client, master_address=init_info.master_address,
                                  master_port=init_info.master_port, num_workers=init_info.num_workers,
                                  timeout_s=init_info.timeout_s, bucket_bytes=init_info.bucket_bytes,
                                  atomic=init_info.atomic).connect()
        return cls(client=client, source=source, is_sender=init_info.is_sender, sync=sync)

    def send_weights(self, weight_version: str | None = None) -> None:
        source = self.source
        specs = [ParamSpec(m.name, tuple(int(s) for s in m.shape), m.dtype) for m in source.metadata()]
        if not self.is_sender or self.sync is None:
            for _ in source:  # stay in the trainer-side collectives that materialize each tensor
                pass
            return
        self.sync.sync(((n, t.detach().to("cpu")) for n, t in source), specs=specs, weight_version=weight_version)

    def shutdown(self) -> None:
        if self.sync is not None:
            self.sync.close()


register_vllm_backends()

__all__ = ["BACKEND", "WORKER_EXTENSION", "register_vllm_backends", "vllm_engine_kwargs", "engine_weight_metadata",
           "MemmgrWorkerExtension", "MemmgrGlooInitInfo", "MemmgrGlooUpdateInfo", "MemmgrGlooWeightTransferEngine",
           "VLLMWeightSync", "VLLMSyncReport", "MemmgrGlooTrainerInitInfo", "MemmgrGlooTrainerWeightTransferEngine",
           "free_port", "OfflineLLMClient"]
