"""The trainer side of the reference protocol: ``WeightSender``."""
from __future__ import annotations

import logging
import time
from typing import Any, Mapping

import torch

from memmgr.errors import MemmgrError, MemmgrInputError, MemmgrStateError, MemmgrSyncError
from memmgr.manager import MemoryManager
from memmgr.sync.comm import wait_work
from memmgr.sync.endpoint import Endpoint
from memmgr.sync.layout import SyncLayout, SyncStats
from memmgr.sync.protocol import MAGIC, MESSAGE_BYTES, PROTOCOL_VERSION, STATUS_ABORT, STATUS_OK

logger = logging.getLogger("memmgr")

class WeightSender:
    """Broadcasts a trainer rank's weights to the engine processes of its sync group.

    ``send(source)`` takes a MemoryManager (the weights come back to the GPU for the sync only, through
    ``mgr.weight_sync()``, and leave again afterwards, also on errors) or a plain name -> tensor mapping.
    """

    def __init__(self, group: Any = None, src_rank: int = 0, *, bucket_size_mb: float = 256, store: Any = None,
                 device_uuid: str | None = None, tag: str = "weights"):
        self._ep = Endpoint(group, src_rank, store=store, device_uuid_override=device_uuid, tag=tag)
        if self._ep.rank != src_rank:
            raise MemmgrInputError(f"WeightSender: this process is rank {self._ep.rank} of the sync group but "
                                   f"src_rank is {src_rank}; build the sender on the source rank and a "
                                   f"WeightReceiver on every other rank")
        if bucket_size_mb <= 0:
            raise MemmgrInputError(f"WeightSender: bucket_size_mb must be positive, got {bucket_size_mb}")
        self.bucket_bytes = int(bucket_size_mb * 2**20)
        self.layout: SyncLayout | None = None
        self._signature: tuple | None = None
        self._sent_version: int | None = None
        self.last_stats: SyncStats | None = None

    def invalidate_metadata(self) -> None:
        """Sends the layout again at the next sync (e.g. after an engine restarted)."""
        self._sent_version = None

    def send(self, source: Any) -> SyncStats:
        """Sends one version of the weights; returns this side's SyncStats. Blocks until every receiver loaded it."""
        if isinstance(source, MemoryManager):
            entered = False
            try:
                with source.weight_sync() as weights:
                    entered = True
                    return self._send(weights)
            except BaseException as exc:
                if not entered:
                    self._abort(exc)
                raise
        if not isinstance(source, Mapping):
            exc = MemmgrInputError(f"WeightSender.send takes a MemoryManager or a mapping name -> tensor, got "
                                   f"{type(source).__name__}")
            self._abort(exc)
            raise exc
        return self._send(source)

    # ---- internals ----
    def _abort(self, exc: BaseException) -> None:
        """Tells the receivers this sync will not happen, so they raise instead of waiting for weights."""
        message = f"{type(exc).__name__}: {exc}"
        try:
            self._ep.handshake(None)
            comm = self._ep.comm
            data = message.encode()[:MESSAGE_BYTES]
            header = torch.tensor([MAGIC, PROTOCOL_VERSION, STATUS_ABORT, 0, 0, 0, 0, len(data)], dtype=torch.int64,
                                  device=comm.device)
            wait_work(comm.broadcast(header, self.src_rank))
            buf = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)
            buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            buf = buf.to(comm.device)
            wait_work(comm.broadcast(buf, self.src_rank))
        except Exception as err:  # the original error matters more
            logger.warning("weight sync: could not tell the receivers that the sync was aborted: %s", err)

    @property
    def src_rank(self) -> int:
        return self._ep.src_rank

    def _layout_for(self, items: list[tuple[str, torch.Tensor]]) -> SyncLayout:
        if not items:
            raise MemmgrInputError("WeightSender: there are no weights to send (empty mapping)")
        device = items[0][1].device
        comm = self._ep.comm
        for name, t in items:
            if not isinstance(t, torch.Tensor):
                raise MemmgrInputError(f"WeightSender: weight {name!r} is a {type(t).__name__}, not a tensor")
            if t.layout != torch.strided:
                raise MemmgrInputError(f"WeightSender: weight {name!r} is {t.layout}; only dense tensors sync")
            if t.device != device:
                raise MemmgrInputError(f"WeightSender: weight {name!r} is on {t.device} but {items[0][0]!r} is on "
                                       f"{device}; all weights of one sender must be on one device")
            if t.numel() > 0 and t.untyped_storage().nbytes() == 0:
                raise MemmgrStateError(f"WeightSender: weight {name!r} (shape {tuple(t.shape)}) has no storage: it "
                                       f"is offloaded. Pass the MemoryManager itself to send(), or onload first")
        if "nccl" in comm.backend and device.type != "cuda":
            raise MemmgrInputError(f"WeightSender: the sync group uses NCCL but the weights are on {device}; "
                                   f"onload them to the GPU (or use a gloo group for CPU tensors)")
        signature = tuple((n, tuple(t.shape), t.dtype) for n, t in items)
        if signature != self._signature or self.layout is None:
            self.layout = SyncLayout.build(signature, self.bucket_bytes, self._ep.my_uuid(device))
            self._signature = signature
            logger.debug("weight sync: layout %#x, %d tensors in %d buckets", self.layout.version,
                         len(self.layout.tensors), len(self.layout.buckets))
        return self.layout

    def _send(self, weights: Mapping[str, torch.Tensor]) -> SyncStats:
        items = list(weights.items())
        try:
            layout = self._layout_for(items)
            device = items[0][1].device
            self._ep.handshake(device)
        except BaseException as exc:
            if not isinstance(exc, MemmgrSyncError):
                self._abort(exc)
            raise
        comm = self._ep.comm
        stats = SyncStats(version=layout.version)
        count0 = comm.count
        t0 = time.perf_counter()
        meta = layout.to_bytes() if self._sent_version != layout.version else b""
        header = torch.tensor([MAGIC, PROTOCOL_VERSION, STATUS_OK, layout.version, len(meta), len(layout.buckets),
                               layout.nbytes, 0], dtype=torch.int64, device=device)
        wait_work(comm.broadcast(header, self.src_rank))
        if meta:
            mt = torch.frombuffer(bytearray(meta), dtype=torch.uint8).to(device)
            wait_work(comm.broadcast(mt, self.src_rank))
            stats.metadata_sent = True
        try:
            self._ep.report_status(STATUS_OK, "", stats)
        except MemmgrError:
            self._sent_version = None
            raise
        self._sent_version = layout.version

        tb = time.perf_counter()
        self._send_buckets(layout, [t for _, t in items], stats)
        del items
        self._ep.report_status(STATUS_OK, "", stats)  # receivers report whether load_weights took everything
        now = time.perf_counter()
        stats.bucket_seconds = now - tb
        stats.seconds = now - t0
        stats.nbytes = layout.nbytes
        stats.collectives = comm.count - count0
        self.last_stats = stats
        logger.info("weight sync sent %.1f MB in %d buckets in %.3f s (%.2f GB/s)%s", stats.nbytes / 1e6,
                    stats.buckets, stats.seconds, stats.gbps, " with metadata" if stats.metadata_sent else "")
        return stats


    def _send_buckets(self, layout: SyncLayout, tensors: list[torch.Tensor], stats: SyncStats) -> None:
        """One broadcast per bucket; packs bucket k+1 while bucket k is in flight (two send buffers)."""
        comm, device = self._ep.comm, tensors[0].device
        nbuf = min(2, len(layout.buckets))
        bufs = [torch.empty(layout.max_bucket_nbytes, dtype=torch.uint8, device=device) for _ in range(nbuf)]
        works: list[Any] = [None] * nbuf
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        try:
            with torch.no_grad():
                for k, bucket in enumerate(layout.buckets):
                    slot = k % nbuf
                    if works[slot] is not None:
                        wait_work(works[slot])  # the broadcast that last used this buffer is done (stream-ordered on GPU)
                    flat = bufs[slot][:bucket.nbytes].view(bucket.dtype)
                    dst.clear()
                    src.clear()
                    for i in bucket.members:
                        spec = layout.tensors[i]
                        if spec.numel:
                            dst.append(flat[spec.offset:spec.offset + spec.numel])
                            src.append(tensors[i].reshape(-1))
                    if dst:
                        torch._foreach_copy_(dst, src)
                    works[slot] = comm.broadcast(flat, self.src_rank)
                    stats.wire_bytes += bucket.nbytes
                for w in works:
                    if w is not None:
                        wait_work(w)
        finally:
            # views of the weights must not outlive the sync (a traceback keeps this frame alive, and the manager
            # refuses to offload weights that something still references)
            dst.clear()
            src.clear()
            tensors.clear()
        stats.buckets = len(layout.buckets)
