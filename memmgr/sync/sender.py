"""The trainer side of the name -> tensor front end: ``WeightSender``, over the bucket-stream transports.

A sync of a name -> tensor map, on a group of one trainer rank and engine processes (``WeightReceiver``):

1. the sender broadcasts the sync's plan (``SyncPlan``: every bucket's layout, and the sender's GPU), or, when it
   cannot send (its weights were discarded, a wrong argument), an abort message naming the error;
2. the status all-reduce: each receiver checks the plan against what its engine holds (names, shapes, dtypes,
   ``transports.base.check_specs``; a sender on its own GPU), and if one does not fit every rank raises, before any
   weight moves;
3. one broadcast per bucket (``GlooTransport`` / ``NcclTransport``: packed with ``WeightBucket.pack``, received by
   the matching receiver), each handed to the engine's ``load_weights`` on arrival;
4. the status all-reduce again: a ``load_weights`` that raised on any receiver raises on every rank.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from memmgr.errors import MemmgrInputError, MemmgrStateError, MemmgrSyncError
from memmgr.sync.comm import STATUS_OK, as_sync_group, check_distinct_gpus, device_uuid
from memmgr.sync.transports.base import (
    ParamSpec,
    WeightBucket,
    dtype_from_name,
    group_pairs,
    itemsize,
)
from memmgr.sync.transports.gloo import GlooTransport
from memmgr.sync.transports.nccl import NcclTransport

logger = logging.getLogger("memmgr")

PLAN_FORMAT = 2  # raised whenever the plan's JSON changes: trainer and engine must run the same memmgr


@dataclass(frozen=True)
class SyncPlan:
    """One sync as the receivers see it before any weight moves: each bucket's layout (``WeightBucket.meta()``, in
    sending order), the sender's GPU, and the names in the order of the sender's mapping; ``tensors`` lists every
    weight in that order."""
    buckets: tuple[dict, ...]
    device_uuid: str = ""
    order: tuple[str, ...] = ()

    @classmethod
    def of(cls, groups: list[list[tuple[str, torch.Tensor]]], device_uuid: str = "",
           order: Sequence[str] = ()) -> "SyncPlan":
        """The plan of sending ``groups`` (``group_pairs``' lists, one bucket each) from the GPU ``device_uuid``;
        ``order``: the names in the order of the sender's mapping."""
        return cls(tuple(WeightBucket.meta_of(*WeightBucket.layout_of(g)) for g in groups), device_uuid,
                   tuple(order))

    @property
    def max_bucket_nbytes(self) -> int:
        return max((int(m["numel"]) * itemsize(dtype_from_name(m["dtype"])) for m in self.buckets), default=0)

    @property
    def tensors(self) -> tuple[ParamSpec, ...]:
        specs = [e.spec() for meta in self.buckets for e in WeightBucket.layout_from_meta(meta)[2]]
        rank = {name: i for i, name in enumerate(self.order)}
        return tuple(sorted(specs, key=lambda s: rank.get(s.name, len(rank))))

    def to_json(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "buckets": list(self.buckets), "device_uuid": self.device_uuid,
                "order": list(self.order)}

    @classmethod
    def from_json(cls, obj: Any) -> "SyncPlan":
        if not isinstance(obj, dict) or obj.get("format") != PLAN_FORMAT or not isinstance(obj.get("buckets"), list):
            got = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
            raise MemmgrSyncError(f"weight sync: the sender's plan is of format {got}, this receiver reads format "
                                  f"{PLAN_FORMAT}; install the same memmgr version on trainer and engine")
        plan = cls(tuple(obj["buckets"]), str(obj.get("device_uuid", "")), tuple(str(n) for n in obj.get("order", ())))
        plan.tensors  # noqa: B018 - validates every bucket's layout
        return plan


@dataclass
class SyncStats:
    """What one sync did, on one side."""
    metadata_sent: bool = False       # the plan (every bucket's layout) went out / came in; True for every sync
    collectives: int = 0              # collectives this side took part in
    buckets: int = 0
    nbytes: int = 0                   # weight bytes moved (without alignment padding)
    wire_bytes: int = 0               # bucket bytes broadcast (with padding)
    seconds: float = 0.0              # plan to final status, inclusive
    bucket_seconds: float = 0.0       # first bucket broadcast to last one complete
    extra: dict = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        """Weight bytes per second over the whole sync, in GB/s (1e9)."""
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class WeightSender:
    """Broadcasts a trainer rank's weights to the engine processes (``WeightReceiver``) of its sync group.

    ``group``: a ``SyncGroup`` (``init_sync_group``) or a torch.distributed group (None: the default group);
    ``src_rank``: this process's rank in it. ``send(source)`` takes a MemoryManager (the weights come back to the
    GPU for the sync only, through ``mgr.weight_sync()``, and leave again afterwards, also on errors) or a plain
    name -> tensor mapping, and returns once every receiver loaded everything. ``store`` (a c10d Store shared by the
    group) and ``tag`` make the sender and its receivers compare device UUIDs before the first collective;
    ``device_uuid`` overrides this GPU's UUID.
    """

    def __init__(self, group: Any = None, src_rank: int = 0, *, bucket_size_mb: float = 256, store: Any = None,
                 device_uuid: str | None = None, tag: str = "weights"):
        self.group = as_sync_group(group, store)
        if not (0 <= src_rank < self.group.world_size):
            raise MemmgrInputError(f"weight sync: src_rank {src_rank} is outside the group of "
                                   f"{self.group.world_size} ranks; src_rank is the sender's rank inside the sync "
                                   f"group")
        if self.group.rank != src_rank:
            raise MemmgrInputError(f"WeightSender: this process is rank {self.group.rank} of the sync group but "
                                   f"src_rank is {src_rank}; build the sender on the source rank and a "
                                   f"WeightReceiver on every other rank")
        if bucket_size_mb <= 0:
            raise MemmgrInputError(f"WeightSender: bucket_size_mb must be positive, got {bucket_size_mb}")
        cls = NcclTransport if "nccl" in self.group.backend_name else GlooTransport
        # the plan carries every bucket's layout, so none goes in-band
        self.transport = cls(self.group, src_rank=src_rank, layout_in_band=False)
        self.src_rank = src_rank
        self.bucket_bytes = int(bucket_size_mb * 2**20)
        self._uuid_override = device_uuid
        self._tag = tag
        self._checked_gpus = False
        self.last_stats: SyncStats | None = None

    def send(self, source: Any) -> SyncStats:
        """Sends one version of the weights; returns this side's SyncStats. Blocks until every receiver loaded it."""
        if callable(getattr(source, "weight_sync", None)) and not isinstance(source, Mapping):
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

    def _abort(self, exc: BaseException) -> None:
        """Tells the receivers this sync will not happen, so they raise instead of waiting for weights."""
        try:
            self._check_gpus(None)
            self.transport.send_control({"format": PLAN_FORMAT, "abort": f"{type(exc).__name__}: {exc}"})
        except Exception as err:  # the original error matters more
            logger.warning("weight sync: could not tell the receivers that the sync was aborted: %s", err)

    def _uuid(self, device: torch.device | None) -> str:
        return self._uuid_override if self._uuid_override is not None else device_uuid(device)

    def _check_gpus(self, device: torch.device | None) -> None:
        if self._checked_gpus or self.group.store is None:
            return
        self._checked_gpus = True
        check_distinct_gpus(self.group.store, self.src_rank,
                            [r for r in range(self.group.world_size) if r != self.src_rank], self._uuid(device),
                            key=self._tag)

    def _validate(self, items: list[tuple[str, Any]]) -> torch.device:
        if not items:
            raise MemmgrInputError("WeightSender: there are no weights to send (empty mapping)")
        device = items[0][1].device if isinstance(items[0][1], torch.Tensor) else None
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
        if device != self.transport.device:
            raise MemmgrInputError(f"WeightSender: the sync group uses {self.group.backend_name} but the weights are "
                                   f"on {device}; {self.group.backend_name} sends from {self.transport.device} "
                                   f"(onload them to the GPU for NCCL, or use a gloo group for CPU tensors)")
        return device

    def _send(self, weights: Mapping[str, torch.Tensor]) -> SyncStats:
        items = list(weights.items())
        try:
            device = self._validate(items)
            groups = list(group_pairs(items, self.bucket_bytes))
            self._check_gpus(device)
        except BaseException as exc:
            if not isinstance(exc, MemmgrSyncError):
                self._abort(exc)
            raise
        comm = self.transport.comm
        stats = SyncStats()
        count0 = comm.count
        t0 = time.perf_counter()
        plan = SyncPlan.of(groups, self._uuid(device), [n for n, _ in items])
        self.transport.send_control(plan.to_json(), "the sync plan")
        stats.metadata_sent = True
        self.transport.exchange_status(STATUS_OK)  # the receivers say whether the plan fits their engine
        tb = time.perf_counter()
        buffer = torch.empty(plan.max_bucket_nbytes, dtype=torch.uint8, device=device)
        try:
            for group in groups:
                dtype = group[0][1].dtype
                bucket = WeightBucket.pack(group, out=buffer[:buffer.numel() // itemsize(dtype) * itemsize(dtype)]
                                           .view(dtype))
                self.transport.send_bucket(bucket)  # returns once the broadcast completed: the buffer is free
                stats.wire_bytes += bucket.nbytes
                stats.nbytes += bucket.payload_bytes
                stats.buckets += 1
        finally:
            # views of the weights must not outlive the sync (a traceback keeps this frame alive, and the manager
            # refuses to offload weights that something still references)
            items.clear()
            groups.clear()
            bucket = group = None
        self.transport.exchange_status(STATUS_OK)  # the receivers say whether load_weights took everything
        now = time.perf_counter()
        stats.bucket_seconds = now - tb
        stats.seconds = now - t0
        stats.collectives = comm.count - count0
        self.last_stats = stats
        logger.info("weight sync sent %.1f MB in %d buckets in %.3f s (%.2f GB/s)", stats.nbytes / 1e6,
                    stats.buckets, stats.seconds, stats.gbps)
        return stats

