"""The engine-worker side of ``memmgr_gloo``: what runs inside vLLM's worker processes.

vLLM's weight-transfer protocol (``vllm.distributed.weight_transfer``): per sync the trainer calls
``start_weight_update`` -> ``update_weights`` (one or more chunks) -> ``finish_weight_update`` (which commits a
``weight_version``), and each engine worker runs the ``WeightTransferEngine`` its registry builds by name.

- ``MemmgrGlooWeightTransferEngine`` joins the trainer's gloo group (``MemmgrGlooInitInfo``), checks the sync's
  manifest (the first ``MemmgrGlooUpdateInfo`` chunk) against what the engine holds, receives flat per-dtype buckets
  and loads them through vLLM's layerwise reload (the path vLLM's own NCCL backend takes, which re-runs the CPU
  kernels' weight packing);
- ``MemmgrWorkerExtension`` is the worker extension (``WORKER_EXTENSION``): importing this module registers the
  backend in the worker process, and it answers ``memmgr_weight_metadata`` and ``memmgr_weight_state`` over
  ``collective_rpc``.

A sync is all-or-nothing with ``atomic=True`` (the default): the worker captures what it serves before the reload
starts (``served.ServedState``), and should the sync fail mid-way (a transport error or timeout, a loader that
refuses a bucket, a weight stream that breaks its specs, a trainer that abandons it) it ends the reload and puts
every module back, so the engine serves exactly its previous weights and the version is not committed. With
``atomic=False`` nothing is copied; a failed sync leaves completed layers on the new weights and the rest on the
old, and the worker reports itself not consistent (``inconsistent``) until a sync commits.

This module imports nothing of the trainer side (``trainer.py``, ``trainer_engine.py``, ``client.py``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from memmgr.errors import MemmgrSyncError
from memmgr.sync.engines.vllm.metadata import encode_metadata, engine_weight_metadata
from memmgr.sync.engines.vllm.registry import register_vllm_backends
from memmgr.sync.engines.vllm.served import ServedState, abandon_layerwise_reload
from memmgr.sync.transports.base import ParamSpec, check_specs, dtype_from_name
from memmgr.sync.transports.gloo import GlooReceiver, connect

logger = logging.getLogger("memmgr")


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
        self._served = ServedState()
        self.inconsistent: str | None = None  # why the served weights are a mix (a failed non-atomic sync)

    @property
    def syncing(self) -> bool:
        """A sync's layerwise reload is open on this worker (begun, neither finished nor put back)."""
        return self._reloading

    @property
    def held_host_bytes(self) -> int:
        """Host bytes of the copy kept to put the served weights back after a failed sync."""
        return self._served.host_bytes

    def init_transfer_engine(self, init_info: MemmgrGlooInitInfo) -> None:
        if self._receiver is not None:  # a trainer reconnects: its previous group is gone
            self._receiver.close()
            self._receiver = None
        pc = self.parallel_config
        rank = init_info.rank_offset + getattr(pc, "data_parallel_index", 0) * pc.world_size + pc.rank
        self.atomic = bool(getattr(init_info, "atomic", True))
        if not self.atomic:
            self._served = ServedState()  # a trainer without atomicity: the host copy is freed
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
        every module served before the sync (``ServedState.restore``: all previous weights, also of the layers
        this sync completed). Without, completed layers keep the new weights and the worker is marked not
        consistent until a sync commits."""
        if not self._reloading:
            return
        try:
            abandon_layerwise_reload(self.model, self.model_config)
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


def _bracket_target(worker: Any) -> tuple[Any, ServedState]:
    """The worker's weight-transfer engine and the ``ServedState`` the extension keeps on the worker."""
    engine = getattr(worker, "weight_transfer_engine", None)
    if engine is None:
        raise MemmgrSyncError("memmgr weight sync: this vLLM worker has no weight-transfer engine; start it with "
                              "vllm_engine_kwargs(backend=...)")
    served = getattr(worker, "memmgr_served", None)
    if served is None:
        served = ServedState()
        worker.memmgr_served = served
    return engine, served


class MemmgrWorkerExtension:
    """vLLM worker extension (``worker_extension_cls=WORKER_EXTENSION``): registers the ``memmgr_gloo`` backend in
    the worker process (by importing this module) and answers over ``collective_rpc``: ``memmgr_weight_metadata``
    and ``memmgr_weight_state``, and the atomicity bracket of a sync carried by another backend (vLLM's ``ipc`` or
    ``nccl``, which keep no copy themselves): ``memmgr_begin_weight_update`` (copy what the worker serves aside),
    ``memmgr_abandon_weight_update`` (end the reload and put it back) and ``memmgr_end_weight_update`` (drop the
    copy). ``memmgr_gloo`` brackets its syncs itself (``MemmgrGlooWeightTransferEngine``)."""

    def memmgr_begin_weight_update(self) -> int:
        """Copies what this worker's model serves to host buffers (``ServedState.capture``), before a sync on a
        backend that keeps no copy; returns the bytes held."""
        engine, served = _bracket_target(self)
        served.capture(engine.model)
        return served.host_bytes

    def memmgr_abandon_weight_update(self) -> int:
        """After a sync that failed part-way on any backend: ends vLLM's layerwise reload if one is open, puts back
        what ``memmgr_begin_weight_update`` copied (every module's tensors and processed state), and closes the
        worker's update session so the next sync can start; returns the tensors put back (0 without a copy)."""
        engine, served = _bracket_target(self)
        try:
            abandon_layerwise_reload(engine.model, engine.model_config)
        finally:
            restored = served.restore()
            served.clear()
            if getattr(self, "_weight_update_active", False):
                self._weight_update_active = False
                engine.reset_weight_update_target()
        logger.warning("memmgr weight sync: sync abandoned; %d tensors put back: the worker serves its previous "
                       "weights", restored)
        return restored

    def memmgr_end_weight_update(self) -> None:
        """After a sync that committed: drops the references of the copy (its host buffers stay for the next)."""
        _engine, served = _bracket_target(self)
        served.clear()

    def memmgr_weight_metadata(self) -> dict[str, list]:
        """Name -> [shape, dtype name] of every weight this worker's engine holds (see engine_weight_metadata)."""
        return encode_metadata(engine_weight_metadata(self.vllm_config.model_config))  # type: ignore[attr-defined]

    def memmgr_weight_state(self) -> dict[str, Any]:
        """Whether this worker serves the weights of one committed sync (``inconsistent``: None, or why not), and
        the host bytes its atomicity copy holds."""
        engine = getattr(self, "weight_transfer_engine", None)
        if not isinstance(engine, MemmgrGlooWeightTransferEngine):
            return {"inconsistent": None, "host_bytes": 0, "syncing": False}
        return {"inconsistent": engine.inconsistent, "host_bytes": engine.held_host_bytes, "syncing": engine.syncing}


register_vllm_backends()

__all__ = ["MemmgrGlooInitInfo", "MemmgrGlooUpdateInfo", "MemmgrGlooWeightTransferEngine", "MemmgrWorkerExtension"]
