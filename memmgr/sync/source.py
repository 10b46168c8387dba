"""Any weight source through memmgr's transports: ``send_weight_source(source, transport)``.

A weight source is vLLM's ``WeightSource`` shape (``vllm.distributed.weight_transfer.base``), duck-typed so that
nothing here imports vLLM: ``metadata()`` (name, dtype and shape of every tensor, before any moves), the
``(name, tensor)`` stream (iteration, or ``iter_groups()``: one ``(names, tensors)`` batch per decoder layer) and,
optionally, ``held_names()`` (None: every tensor; a part of them: this rank sends that part, and its stream yields
None for the others; an empty collection: this rank only takes part in the source's collectives). memmgr's
Megatron export as a source is ``memmgr.sync.engines.vllm.ExportWeightSource``.

One sync: ``transport.start`` with the specs of what this rank sends (the transport checks them against what the
engine holds, so a mismatch moves nothing), then the stream, whole groups gathered up to ``bucket_bytes`` before
they are packed and sent (one send per bucket of one dtype, not per layer: each send costs the engine a round
trip), then ``transport.finish``. A transport with buffers of its own packs straight into them
(``CudaIpcTransport.send_pairs``); any other gets ``WeightBucket`` s. If the source or the transport fails part-way,
the transport is told to ``abort`` (an engine with sync sessions goes back to its previous weights) and the error
is raised; where the transport failed, the source is first run to its end, so that the other ranks of a collective
source (the export's) are not left waiting. A rank that holds nothing iterates the source to its end (its part of
the source's collectives) and sends nothing.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from memmgr import arguments
from memmgr.errors import MemmgrInputError
from memmgr.sync.transports.base import (DEFAULT_BUCKET_BYTES, Transport, WeightBucket, aligned, as_specs,
                                         group_pairs)

logger = logging.getLogger("memmgr")


@dataclass(frozen=True)
class SentWeights:
    """What one ``send_weight_source`` call handed to the transport on this rank."""

    nbytes: int   # tensor bytes sent (0 on a rank that holds nothing)
    buckets: int  # sends: one per bucket of one dtype


def send_weight_source(source: Any, transport: Transport, *,
                       bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> SentWeights:
    """Streams ``source`` (vLLM's ``WeightSource`` shape, see the module docstring) through ``transport`` as one
    sync, in buckets of at most ``bucket_bytes`` (a larger tensor goes alone); returns what this rank sent. Every
    rank of a collective source calls it."""
    if not callable(getattr(source, "metadata", None)):
        raise MemmgrInputError(f"send_weight_source: source {type(source).__name__} has no metadata(); pass a vLLM "
                               f"WeightSource (e.g. memmgr.sync.engines.vllm.ExportWeightSource)")
    if not isinstance(transport, Transport):
        raise MemmgrInputError(f"send_weight_source: transport must be a memmgr.sync.transports Transport, got "
                               f"{type(transport).__name__}")
    arguments.integer("send_weight_source", "bucket_bytes", bucket_bytes, minimum=1)
    held = _held(source)
    groups = _groups(source)
    if held is not None and not held:
        for _ in groups:  # this rank's part of the source's collectives; it materializes nothing
            pass
        return SentWeights(0, 0)
    specs = [s for s in as_specs(source.metadata()) if held is None or s.name in held]
    sender = _BucketSender(transport, bucket_bytes)
    try:
        transport.start(specs)
        for names, tensors in groups:
            # a source split across ranks yields None for the names of a group that this rank does not hold
            sender.add([(n, t) for n, t in zip(names, tensors) if t is not None])
        sender.flush()
        transport.finish()
    except BaseException as exc:
        transport.abort(f"{type(exc).__name__} while sending the weight source")
        groups.run_to_end_after(exc)  # the other ranks of a collective source are still in it
        raise
    logger.debug("weight source: %d B in %d bucket(s) through %s", sender.nbytes, sender.sends, transport.name)
    return SentWeights(sender.nbytes, sender.sends)


class SourceStream:
    """A weight stream (a source's groups, an export's buckets) that remembers whether it failed itself, so that
    after a failure elsewhere (the transport, the engine) it can be run to its end: on a trainer of several ranks the
    others are still in the stream's collectives, and would wait in them until their timeout."""

    def __init__(self, stream: Iterable[Any]):
        self._it = iter(stream)
        self.failed = False

    def __iter__(self) -> "SourceStream":
        return self

    def __next__(self) -> Any:
        try:
            return next(self._it)
        except StopIteration:
            raise
        except BaseException:
            self.failed = True
            raise

    def run_to_end_after(self, error: BaseException) -> None:
        """After ``error`` stopped the sync on this rank: runs the stream to its end, ignoring what it yields, unless
        the stream failed itself or ``error`` is an interrupt (KeyboardInterrupt, SystemExit). A failure of the
        stream meanwhile is logged; the sync's error is the one the caller raises."""
        if self.failed or not isinstance(error, Exception):
            return
        try:
            for _ in self:
                pass
        except Exception as exc:
            logger.warning("weight sync: the weight stream failed while being run to its end after the sync failed "
                           "(%s): %s", type(error).__name__, exc)


def _held(source: Any) -> frozenset[str] | None:
    held_names = getattr(source, "held_names", None)
    held = held_names() if callable(held_names) else None
    return None if held is None else frozenset(held)


def _groups(source: Any) -> SourceStream:
    """The source's stream as ``(names, tensors)`` batches: its ``iter_groups()`` where it has one, else one batch
    per tensor of its iteration."""
    iter_groups = getattr(source, "iter_groups", None)
    if callable(iter_groups):
        return SourceStream(iter_groups())
    if not isinstance(source, Iterable):
        raise MemmgrInputError(f"send_weight_source: source {type(source).__name__} is neither iterable nor has "
                               f"iter_groups(); pass a vLLM WeightSource")
    return SourceStream(([name], [tensor]) for name, tensor in source)


class _BucketSender:
    """Gathers whole groups up to a bucket, then packs and sends them per dtype. Holding a group keeps its tensors
    (views into the source's buffers) alive until they are sent."""

    def __init__(self, transport: Transport, bucket_bytes: int):
        self.transport = transport
        self.bucket_bytes = bucket_bytes
        self.batch: list[tuple[str, torch.Tensor]] = []
        self.batch_bytes = 0
        self.nbytes = 0
        self.sends = 0

    def add(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        size = sum(aligned(t.numel() * t.element_size()) for _, t in pairs)
        if self.batch and self.batch_bytes + size > self.bucket_bytes:
            self.flush()
        self.batch += pairs
        self.batch_bytes += size

    def flush(self) -> None:
        send_pairs = getattr(self.transport, "send_pairs", None)
        for pairs in group_pairs(self.batch, self.bucket_bytes):
            if callable(send_pairs):
                send_pairs(pairs)
            else:
                self.transport.send_bucket(WeightBucket.pack(pairs))
            self.nbytes += sum(t.numel() * t.element_size() for _, t in pairs)
            self.sends += 1
        self.batch, self.batch_bytes = [], 0


__all__ = ["SentWeights", "SourceStream", "send_weight_source"]
