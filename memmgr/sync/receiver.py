"""The engine side of the reference protocol: ``WeightReceiver``."""
from __future__ import annotations

import difflib
import logging
import time
from typing import Any, Callable, Mapping

import torch

from memmgr.errors import MemmgrError, MemmgrInputError, MemmgrSyncError
from memmgr.sync.comm import wait_work
from memmgr.sync.endpoint import Endpoint
from memmgr.sync.layout import SyncLayout, SyncStats
from memmgr.sync.names import NameMap, describe_name_map, map_name
from memmgr.sync.protocol import (
    HEADER_LEN,
    MAGIC,
    MESSAGE_BYTES,
    PROTOCOL_VERSION,
    SAME_GPU_HINT,
    STATUS_ABORT,
    STATUS_LOAD_FAILED,
    STATUS_MISMATCH,
    STATUS_OK,
    LoadWeights,
)

logger = logging.getLogger("memmgr")

class WeightReceiver:
    """Receives weights from the sender of its sync group and hands them to ``load_weights``.

    ``load_weights(iterable of (engine_name, tensor))`` is called once per bucket with views into a receive buffer
    that is reused two buckets later: copy the data, keep no reference. ``name_map`` maps a trainer name to the
    engine's name (a callable or a dict; a callable returning None skips that tensor). ``expected`` (engine name ->
    (shape, dtype), or a callable returning that) lets the receiver reject a mismatched layout before any weight
    moves; a ``ModuleWeightLoader`` supplies it by itself.
    """

    def __init__(self, group: Any = None, src_rank: int = 0, load_weights: LoadWeights | None = None, *,
                 name_map: NameMap = None, device: torch.device | str | None = None,
                 expected: Mapping[str, tuple] | Callable[[], Mapping[str, tuple]] | None = None, store: Any = None,
                 device_uuid: str | None = None, tag: str = "weights"):
        if load_weights is None or not callable(load_weights):
            raise MemmgrInputError("WeightReceiver needs a load_weights callable (e.g. the vLLM model's "
                                   "load_weights, or memmgr.sync.ModuleWeightLoader(module))")
        self._ep = Endpoint(group, src_rank, store=store, device_uuid_override=device_uuid, tag=tag)
        if self._ep.rank == src_rank:
            raise MemmgrInputError(f"WeightReceiver: this process is the source rank {src_rank} of the sync group; "
                                   f"build a WeightSender here instead")
        self.load_weights = load_weights
        self.name_map = name_map
        self.device = torch.device(device) if device is not None else self._ep.comm.device
        if expected is None and hasattr(load_weights, "expected"):
            expected = load_weights.expected  # type: ignore[union-attr]
        self._expected = expected
        self.layout: SyncLayout | None = None
        self.last_stats: SyncStats | None = None

    @property
    def src_rank(self) -> int:
        return self._ep.src_rank

    def _check_layout(self, layout: SyncLayout) -> str:
        """'' if the layout fits this engine, else a message naming the tensors that do not."""
        mine = self._ep.my_uuid(self.device)
        if mine and layout.device_uuid and mine == layout.device_uuid:
            return (f"the sender (rank {self.src_rank}) and this receiver (rank {self._ep.rank}) are on the same GPU "
                    f"(UUID {mine}). {SAME_GPU_HINT}")
        if self._expected is None:
            return ""
        expected = self._expected() if callable(self._expected) else self._expected
        problems = []
        seen = set()
        for spec in layout.tensors:
            target = map_name(self.name_map, spec.name)
            if target is None:
                continue
            seen.add(target)
            how = f"trainer tensor {spec.name!r} -> engine name {target!r} (name_map: {describe_name_map(self.name_map)})"
            if target not in expected:
                close = difflib.get_close_matches(target, list(expected), n=3)
                problems.append(f"{how}: the engine has no tensor of that name (shape {spec.shape}, {spec.dtype} "
                                f"sent){'; closest engine names: ' + str(close) if close else ''}")
                continue
            shape, dtype = expected[target]
            shape = tuple(int(s) for s in shape)
            if shape != spec.shape or dtype != spec.dtype:
                problems.append(f"{how}: sent shape {spec.shape}, {spec.dtype} but the engine holds shape {shape}, "
                                f"{dtype}")
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            return ("sync metadata does not fit the engine: " + "; ".join(problems[:5]) + more +
                    ". Fix name_map, or make trainer and engine build the same architecture and dtype")
        return ""

    def receive(self) -> SyncStats:
        """Takes part in one sync; returns this side's SyncStats once every bucket is loaded."""
        ep, comm = self._ep, self._ep.comm
        ep.handshake(self.device)
        self._load_error_context: list[tuple[str, str]] = []
        stats = SyncStats()
        count0 = comm.count
        t0 = time.perf_counter()
        header_t = torch.zeros(HEADER_LEN, dtype=torch.int64, device=comm.device)
        wait_work(comm.broadcast(header_t, self.src_rank))
        magic, proto, status, version, meta_len, nbuckets, total, msg_len = (int(v) for v in header_t.cpu())
        if magic != MAGIC:
            raise MemmgrSyncError(f"weight sync: rank {self.src_rank} sent a header that is not memmgr's (magic "
                                  f"{magic:#x}); another collective is running on this group. Give the weight sync "
                                  f"a process group of its own (init_sync_group)")
        if status == STATUS_ABORT:
            buf = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8, device=comm.device)
            wait_work(comm.broadcast(buf, self.src_rank))
            text = bytes(buf[:msg_len].cpu().numpy().tobytes()).decode(errors="replace")
            raise MemmgrSyncError(f"weight sync aborted by the sender (rank {self.src_rank}) before any weight was "
                                  f"sent: {text}")
        stats.version = version
        problem = ""
        code = STATUS_OK
        if meta_len:
            meta_t = torch.empty(meta_len, dtype=torch.uint8, device=comm.device)
            wait_work(comm.broadcast(meta_t, self.src_rank))
            stats.metadata_sent = True
            try:
                layout = SyncLayout.from_bytes(bytes(meta_t.cpu().numpy().tobytes()))
                if layout.version != version:
                    raise MemmgrSyncError(f"header says layout {version:#x} but the metadata is {layout.version:#x}")
                problem = self._check_layout(layout)
                if not problem:
                    self.layout = layout
                else:
                    self.layout = None
            except MemmgrSyncError as exc:
                problem, self.layout = str(exc), None
        elif proto != PROTOCOL_VERSION:
            problem = (f"the sender speaks sync protocol {proto}, this receiver {PROTOCOL_VERSION}; install the same "
                       f"memmgr version on both sides")
        elif self.layout is None or self.layout.version != version:
            have = f"{self.layout.version:#x}" if self.layout is not None else "none"
            problem = (f"sender and receiver disagree on the sync metadata: the sender sent layout version "
                       f"{version:#x} without metadata, believing this receiver has it, but the receiver's cached "
                       f"layout is {have} (an engine restarted or a receiver joined late). The sender will send the "
                       f"metadata again at the next sync; WeightSender.invalidate_metadata() forces it")
        if problem:
            code = STATUS_MISMATCH
        ep.report_status(code, problem, stats)
        layout = self.layout
        assert layout is not None
        if nbuckets != len(layout.buckets) or total != layout.nbytes:
            raise MemmgrSyncError(f"weight sync header announces {nbuckets} buckets / {total} bytes but layout "
                                  f"{version:#x} has {len(layout.buckets)} / {layout.nbytes}")

        nbuf = min(2, len(layout.buckets))
        bufs = [torch.empty(layout.max_bucket_nbytes, dtype=torch.uint8, device=self.device) for _ in range(nbuf)]
        works: list[Any] = [None] * nbuf
        error: BaseException | None = None
        tb = time.perf_counter()

        def post(k: int) -> None:
            b = layout.buckets[k]
            works[k % nbuf] = comm.broadcast(bufs[k % nbuf][:b.nbytes].view(b.dtype), self.src_rank)

        post(0)
        for k, bucket in enumerate(layout.buckets):
            slot = k % nbuf
            wait_work(works[slot])
            if k + 1 < len(layout.buckets) and nbuf > 1:
                post(k + 1)  # the other buffer is free: its load_weights ran already (stream-ordered on GPU)
            if error is None:
                flat = bufs[slot][:bucket.nbytes].view(bucket.dtype)
                pairs = []
                for i in bucket.members:
                    spec = layout.tensors[i]
                    target = map_name(self.name_map, spec.name)
                    if target is not None:
                        pairs.append((target, spec.name, flat[spec.offset:spec.offset + spec.numel].view(spec.shape)))
                try:
                    self.load_weights([(t, v) for t, _, v in pairs])
                except Exception as exc:  # keep receiving so the sender does not hang; report at the end
                    error = exc
                    logger.error("weight sync: load_weights failed on bucket %d: %s", k, exc)
                    self._load_error_context = [(t, s) for t, s, _ in pairs]
            stats.wire_bytes += bucket.nbytes
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        stats.bucket_seconds = time.perf_counter() - tb
        del bufs
        message = ""
        if error is not None:
            message = self._explain(error)
        try:
            ep.report_status(STATUS_LOAD_FAILED if error is not None else STATUS_OK, message, stats)
        except MemmgrError as exc:
            if error is not None:
                raise exc from error
            raise
        stats.buckets = len(layout.buckets)
        stats.nbytes = layout.nbytes
        stats.seconds = time.perf_counter() - t0
        stats.collectives = comm.count - count0
        self.last_stats = stats
        return stats

    def _explain(self, error: BaseException) -> str:
        text = f"{type(error).__name__}: {error}"
        context = getattr(self, "_load_error_context", [])
        named = [(t, s) for t, s in context if t in str(error)]
        if named:
            text += " [" + "; ".join(f"engine name {t!r} came from trainer tensor {s!r}" for t, s in named[:3])
            text += f"; name_map: {describe_name_map(self.name_map)}]"
        return text
