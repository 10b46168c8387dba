"""The engine side of the name -> tensor front end: ``WeightReceiver``, over the bucket-stream transports' receivers
(the protocol is described in ``memmgr.sync.sender``)."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable, Mapping, Union

import torch

from memmgr.errors import MemmgrError, MemmgrInputError, MemmgrSyncError
from memmgr.sync.comm import (
    SAME_GPU_HINT,
    STATUS_LOAD_FAILED,
    STATUS_MISMATCH,
    STATUS_OK,
    as_sync_group,
    check_distinct_gpus,
    device_uuid,
)
from memmgr.sync.sender import SyncPlan, SyncStats
from memmgr.sync.transports.base import ParamSpec, WeightBucket, check_specs
from memmgr.sync.transports.gloo import GlooReceiver
from memmgr.sync.transports.nccl import NcclReceiver

logger = logging.getLogger("memmgr")

LoadWeights = Callable[[Iterable[tuple[str, torch.Tensor]]], Any]
NameMap = Union[Callable[[str], Union[str, None]], Mapping[str, str], None]


def describe_name_map(name_map: NameMap) -> str:
    if name_map is None:
        return "identity (no name_map)"
    if isinstance(name_map, Mapping):
        return f"a dict of {len(name_map)} entries"
    return getattr(name_map, "__qualname__", None) or getattr(name_map, "__name__", None) or repr(name_map)


def map_name(name_map: NameMap, name: str) -> str | None:
    if name_map is None:
        return name
    if isinstance(name_map, Mapping):
        return name_map.get(name, name)
    return name_map(name)


class WeightReceiver:
    """Receives weights from the sender of its sync group and hands them to ``load_weights``.

    ``load_weights(iterable of (engine_name, tensor))`` is called once per bucket with views into a receive buffer
    that the next bucket overwrites: copy the data, keep no reference. ``name_map`` maps a trainer name to the
    engine's name (a callable or a dict; a callable returning None skips that tensor). ``expected`` (engine name ->
    (shape, dtype), or a callable returning that) lets the receiver refuse a sync that does not fit before any
    weight moves (``MemmgrSyncMismatchError`` on every rank); a ``ModuleWeightLoader`` supplies it by itself.
    ``device`` is the engine's device (its GPU is compared with the sender's); ``store``, ``device_uuid`` and
    ``tag`` as for ``WeightSender``.
    """

    def __init__(self, group: Any = None, src_rank: int = 0, load_weights: LoadWeights | None = None, *,
                 name_map: NameMap = None, device: torch.device | str | None = None,
                 expected: Mapping[str, tuple] | Callable[[], Mapping[str, tuple]] | None = None, store: Any = None,
                 device_uuid: str | None = None, tag: str = "weights"):
        if load_weights is None or not callable(load_weights):
            raise MemmgrInputError("WeightReceiver needs a load_weights callable (e.g. the vLLM model's "
                                   "load_weights, or memmgr.sync.ModuleWeightLoader(module))")
        self.group = as_sync_group(group, store)
        if not (0 <= src_rank < self.group.world_size):
            raise MemmgrInputError(f"weight sync: src_rank {src_rank} is outside the group of "
                                   f"{self.group.world_size} ranks; src_rank is the sender's rank inside the sync "
                                   f"group")
        if self.group.rank == src_rank:
            raise MemmgrInputError(f"WeightReceiver: this process is the source rank {src_rank} of the sync group; "
                                   f"build a WeightSender here instead")
        cls = NcclReceiver if "nccl" in self.group.backend_name else GlooReceiver
        self.receiver = cls(self.group, src_rank=src_rank)
        self.src_rank = src_rank
        self.load_weights = load_weights
        self.name_map = name_map
        self.device = torch.device(device) if device is not None else self.receiver.device
        if expected is None and hasattr(load_weights, "expected"):
            expected = load_weights.expected  # type: ignore[union-attr]
        self._expected = expected
        self._uuid_override = device_uuid
        self._tag = tag
        self._checked_gpus = False
        self.layout: SyncPlan | None = None   # the last sync's plan (``layout.tensors``: what was sent, in order)
        self.last_stats: SyncStats | None = None

    def _uuid(self) -> str:
        return self._uuid_override if self._uuid_override is not None else device_uuid(self.device)

    def _check_plan(self, plan: SyncPlan) -> str:
        """'' if the plan fits this engine, else a message naming the tensors that do not."""
        mine = self._uuid()
        if mine and plan.device_uuid and mine == plan.device_uuid:
            return (f"the sender (rank {self.src_rank}) and this receiver (rank {self.group.rank}) are on the same "
                    f"GPU (UUID {mine}). {SAME_GPU_HINT}")
        if self._expected is None:
            return ""
        expected = self._expected() if callable(self._expected) else self._expected
        sent, sent_as = [], {}
        for spec in plan.tensors:
            target = map_name(self.name_map, spec.name)
            if target is not None:
                sent.append(ParamSpec(target, spec.shape, spec.dtype))
                sent_as[target] = spec.name
        try:
            check_specs(sent, expected, where=f"the engine of rank {self.group.rank}", require_all=False,
                        sent_as=sent_as, fix=f"Fix name_map (now: {describe_name_map(self.name_map)}), or make "
                                             f"trainer and engine build the same architecture and dtype")
        except MemmgrSyncError as exc:
            return str(exc)
        return ""

    def receive(self) -> SyncStats:
        """Takes part in one sync; returns this side's SyncStats once every bucket is loaded."""
        if not self._checked_gpus and self.group.store is not None:
            self._checked_gpus = True
            check_distinct_gpus(self.group.store, self.group.rank, [self.src_rank], self._uuid(), key=self._tag)
        receiver, comm = self.receiver, self.receiver.comm
        stats = SyncStats()
        count0 = comm.count
        t0 = time.perf_counter()
        message = receiver.receive_control()
        if isinstance(message, dict) and "abort" in message:
            raise MemmgrSyncError(f"weight sync aborted by the sender (rank {self.src_rank}) before any weight was "
                                  f"sent: {message['abort']}")
        stats.metadata_sent = True
        try:
            plan = SyncPlan.from_json(message)
            problem = self._check_plan(plan)
        except MemmgrSyncError as exc:
            plan, problem = None, str(exc)
        receiver.exchange_status(STATUS_MISMATCH if problem else STATUS_OK, problem)
        assert plan is not None
        self.layout = plan
        error: BaseException | None = None
        context: list[tuple[str, str]] = []
        tb = time.perf_counter()
        for k, meta in enumerate(plan.buckets):
            bucket: WeightBucket | None = receiver.receive(meta)
            if error is None:
                pairs = []
                for name, view in bucket.views():
                    target = map_name(self.name_map, name)
                    if target is not None:
                        pairs.append((target, name, view))
                try:
                    self.load_weights([(t, v) for t, _, v in pairs])
                except Exception as exc:  # keep receiving so the sender does not hang; report at the end
                    error = exc
                    logger.error("weight sync: load_weights failed on bucket %d: %s", k, exc)
                    context = [(t, s) for t, s, _ in pairs]
                pairs.clear()
            stats.wire_bytes += bucket.nbytes
            stats.nbytes += bucket.payload_bytes
            bucket = None
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        stats.bucket_seconds = time.perf_counter() - tb
        try:
            receiver.exchange_status(STATUS_LOAD_FAILED if error is not None else STATUS_OK,
                                     self._explain(error, context) if error is not None else "")
        except MemmgrError as exc:
            if error is not None:
                raise exc from error
            raise
        stats.buckets = len(plan.buckets)
        stats.seconds = time.perf_counter() - t0
        stats.collectives = comm.count - count0
        self.last_stats = stats
        return stats

    def _explain(self, error: BaseException, context: list[tuple[str, str]]) -> str:
        text = f"{type(error).__name__}: {error}"
        named = [(t, s) for t, s in context if t in str(error)]
        if named:
            text += " [" + "; ".join(f"engine name {t!r} came from trainer tensor {s!r}" for t, s in named[:3])
            text += f"; name_map: {describe_name_map(self.name_map)}]"
        return text
