"""One weight sync as one call: the hooks around it, the weights streamed from where they are, the engine finished.

``sync_weights(manager, exporter, engine)`` runs the choreography that avoids out-of-memory at an engine's wake-up:

1. the manager's ``before_weight_sync`` hooks (e.g. the engine wakes its weights only, not its KV cache);
2. the trainer's weights, exported to the engine's names and layouts (``memmgr.sync.export``), streamed bucket by
   bucket into the engine: from device memory, or from memmgr's pinned host copy while the weights group is
   offloaded (nothing is onloaded, so the trainer's weights stay off the GPU);
3. the engine finishes (a vLLM engine commits its ``weight_version`` only once every worker loaded everything);
   If the sync stops part-way (the export, the transport or the engine fails), the transport is told to
   ``abort``: an engine with sync sessions (``ModuleWeightLoader``, the IPC engine, vLLM through
   ``VLLMWeightSync``) goes back to its previous weights, all of them; where the transport failed, the export is
   first run to its end (into buffers of its own), so that the trainer's other ranks are not left in its collectives;
4. the ``after_weight_sync`` hooks (e.g. the engine's KV cache wakes), also when the sync failed, so that whatever
   the before-hooks released comes back.

Extra GPU memory is what the export stages (two buckets plus the largest tensor) and what the transport holds (its
bucket ring); with ``measure=True``, ``SyncResult.peak_extra_gpu_bytes`` reports what PyTorch's allocator saw above
the start. Measuring synchronizes the device before and after the sync and resets the allocator's peak statistics
(the caller's too), so it is off unless asked for. The sync itself needs no device synchronize: the exporter orders
its reads after the work queued before it (stream waits), and each transport waits for its own copies before it
hands a bucket over (the IPC transport synchronizes its copy before announcing a slot; the collective ones wait
for their work).
"""
from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from memmgr import arguments
from memmgr.errors import MemmgrInputError
from memmgr.manager import MemoryManager
from memmgr.sync.source import SourceStream
from memmgr.sync.transports.base import Transport, as_specs, split_per_dtype
from memmgr.sync.transports.inproc import InProcessTransport

logger = logging.getLogger("memmgr")

LoadWeights = Callable[[Iterable[tuple[str, torch.Tensor]]], Any]


@dataclass
class SyncResult:
    """What one ``sync_weights`` call did on this rank."""

    nbytes: int                      # weight bytes handed to the engine (0 on ranks that only take part)
    buckets: int
    seconds: float                   # from the before-hooks to the call's return (measured: to the device being done)
    source: str                      # "device" or "host copy"
    peak_extra_gpu_bytes: int | None  # PyTorch allocator's peak above the start (None unless measured on CUDA)
    engine_report: Any = None        # what the engine adapter returned (e.g. VLLMSyncReport)
    measured: bool = False           # measure=True on CUDA: seconds include the device's work, the peak is known

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def sync_weights(manager: MemoryManager, exporter: Any, engine: Transport | LoadWeights | Any, *,
                 weight_version: str | None = None, pack_in_place: bool = True, measure: bool = False) -> SyncResult:
    """Syncs the trainer's weights into ``engine`` as one call (see the module docstring). Every rank of the export
    calls it (the export is collective); the receiver ranks feed the engine.

    ``exporter``: a ``memmgr.sync.export.MegatronExporter`` built with ``weights=manager.group("weights")`` (or
    anything with ``buckets()``, ``entries`` and ``is_receiver``). ``engine``: a ``Transport``, an engine adapter
    with ``sync(weights, specs=..., weight_version=...)`` (``memmgr.sync.engines.vllm.VLLMWeightSync``), or a
    ``load_weights`` callable in this process. ``pack_in_place``: where the transport has memory of its own (the
    IPC ring), the export packs each bucket straight into it (no copy between export and send, no export buffers
    beside it); False has the exporter allocate its buckets and the transport copy them. ``measure``: on CUDA,
    synchronize the device around the sync and reset the allocator's peak statistics (the caller's too) to report
    ``seconds`` up to the device being done and ``peak_extra_gpu_bytes``; without it the peak is None, ``seconds`` is
    the host's time to the call's return, and neither the device nor the statistics are touched."""
    arguments.boolean("sync_weights", "pack_in_place", pack_in_place)
    arguments.boolean("sync_weights", "measure", measure)
    if not isinstance(manager, MemoryManager):
        raise MemmgrInputError(f"sync_weights: manager must be a MemoryManager, got {type(manager).__name__}")
    for attr in ("buckets", "entries", "is_receiver"):
        if not hasattr(exporter, attr):
            raise MemmgrInputError(f"sync_weights: exporter has no {attr!r}; pass a "
                                   f"memmgr.sync.export.MegatronExporter")
    adapter = _adapter(engine, pack_in_place)
    weights = manager.group(manager.weights_group)
    source = "device" if weights.device_bytes >= weights.nbytes else "host copy"
    device = _measured_device(measure)
    start_bytes = 0
    if device is not None:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    with manager.weight_sync_hooks():
        nbytes, nbuckets, report = adapter(exporter, weight_version)
        if device is not None:
            torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) - start_bytes if device is not None else None
    result = SyncResult(nbytes, nbuckets, seconds, source, peak, report, measured=device is not None)
    logger.info("weight sync: %d B in %d bucket(s) from the %s in %.3f s (%.1f GB/s)%s", nbytes, nbuckets, source,
                seconds, result.gbps, f", peak extra GPU {peak} B" if peak is not None else "")
    return result


def _measured_device(measure: bool) -> torch.device | None:
    """The CUDA device ``sync_weights`` measures on: the current one with ``measure`` where CUDA is up, else None
    (nothing measured, nothing synchronized)."""
    if not measure or not torch.cuda.is_available():
        return None
    return torch.device("cuda", torch.cuda.current_device())


def _adapter(engine: Any, pack_in_place: bool) -> Callable[[Any, str | None], tuple[int, int, Any]]:
    if isinstance(engine, Transport):
        return lambda exporter, version: _through_transport(exporter, engine, pack_in_place)
    if hasattr(engine, "sync") and callable(engine.sync):
        return lambda exporter, version: _through_engine_adapter(exporter, engine, version)
    if callable(engine):
        transport = InProcessTransport(engine)
        return lambda exporter, version: _through_transport(exporter, transport, pack_in_place)
    raise MemmgrInputError(f"sync_weights: engine must be a Transport, an engine adapter with sync(), or a "
                           f"load_weights callable; got {type(engine).__name__}")


def _through_transport(exporter: Any, transport: Transport, pack_in_place: bool) -> tuple[int, int, Any]:
    nbytes = nbuckets = 0
    started = False
    failed = False  # the transport failed: the export runs on into buffers of its own (see below)

    def allocate(dtype: torch.dtype, numel: int) -> torch.Tensor | None:
        return None if failed else transport.reserve(dtype, numel)

    # an exporter that takes an allocator packs each bucket straight into the transport's memory where it has some
    # (the IPC ring): no copy between the export and the send, and no export buffers beside the ring
    in_place = pack_in_place and exporter.is_receiver and \
        "allocate" in inspect.signature(exporter.buckets).parameters
    stream = SourceStream(exporter.buckets(allocate=allocate) if in_place else exporter.buckets())
    try:
        for bucket in stream:  # every rank iterates: the export is collective
            if not started:
                transport.start(as_specs(exporter.entries))
                started = True
            for part in split_per_dtype(bucket):
                transport.send_bucket(part)
                nbytes += part.payload_bytes
            nbuckets += 1
    except BaseException as exc:
        failed = True
        transport.release_reservations()
        transport.abort(f"{type(exc).__name__} during the export or send")
        stream.run_to_end_after(exc)  # the other ranks of the export are still in its collectives
        raise
    if exporter.is_receiver:
        try:
            if not started:
                transport.start(as_specs(exporter.entries))
            transport.finish()
        except BaseException as exc:
            transport.abort(f"{type(exc).__name__} while finishing")
            raise
    return nbytes, nbuckets, None


def _through_engine_adapter(exporter: Any, engine: Any, version: str | None) -> tuple[int, int, Any]:
    if not exporter.is_receiver:
        for _ in exporter.buckets():  # take part in the collective export; the receivers feed the engine
            pass
        return 0, 0, None
    report = engine.sync(exporter.buckets(), specs=exporter.entries, weight_version=version)
    nbytes = int(getattr(report, "nbytes", 0) or 0)
    nbuckets = int(getattr(report, "buckets", 0) or 0)
    return nbytes, nbuckets, report
