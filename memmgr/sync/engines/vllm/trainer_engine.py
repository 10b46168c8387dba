"""The trainer side of ``memmgr_gloo``: an ordinary vLLM trainer-side weight-transfer engine that consumes a
``WeightSource``, like vLLM's own ``ipc`` and ``nccl`` engines.

vLLM's trainer factory (``WeightTransferTrainerFactory``) builds it from the init info alone:
``trainer_init(MemmgrGlooTrainerInitInfo(rank=...), client=..., source=...)`` on every trainer rank. Trainer rank 0
(the sender) hosts a gloo group of its own with the engine's workers (the engine's ``init_weight_transfer_engine``
runs on a helper thread while this process hosts the group's store). Each ``send_weights()``:

1. reads ``source.metadata()`` on every rank and, on the sender, announces it to the workers as the sync's manifest
   (``update_weights({"manifest": ...})``): each worker checks it against the checkpoint it holds and only then
   starts vLLM's layerwise reload, so a mismatch moves nothing;
2. streams ``source.iter_groups()`` (one decoder layer at a time) on every rank; the sender checks every tensor
   against the manifest, packs the stream into flat per-dtype host buckets of at most ``bucket_bytes`` and sends
   each one (one ``update_weights({"buckets": [layout]})`` chunk, its data broadcast over gloo while the workers
   receive);
3. commits with ``finish_weight_update(weight_version)`` only after every worker loaded every bucket.

A failure part-way abandons the sync: the workers put back their previous weights (``atomic``, see ``worker.py``)
and no version is committed; the sender keeps iterating the source to its end when the failure was not the
source's own, so that the other trainer ranks are not left waiting in its collective. Unless the stream merely
disagreed with the manifest, the gloo group is dropped and the next ``send_weights`` reconnects.

This module imports nothing of the worker side (``worker.py``, ``served.py``).
"""
from __future__ import annotations

import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Iterator

import torch
from vllm.distributed.weight_transfer.base import TrainerInitInfo, TrainerWeightTransferEngine, WeightSource

from memmgr.errors import MemmgrInputError, MemmgrSyncError, MemmgrSyncMismatchError
from memmgr.sync.engines.vllm.client import call_engine, shutdown_transfer_engine
from memmgr.sync.engines.vllm.registry import BACKEND
from memmgr.sync.source import SourceStream
from memmgr.sync.transports.base import DEFAULT_BUCKET_BYTES, ParamSpec, as_specs, bucketize, dtype_name
from memmgr.sync.transports.gloo import GlooTransport, connect

logger = logging.getLogger("memmgr")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for a group's store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class MemmgrGlooTrainerInitInfo(TrainerInitInfo):
    """Trainer init info of ``memmgr_gloo`` for ``WeightTransferTrainerFactory.trainer_init``: where this process
    hosts the group's store (``master_port`` None: a free port per connection), the number of engine worker
    processes (None: as many as answer ``collective_rpc("memmgr_weight_metadata")``), the bound of every step, the
    bytes of one bucket, and whether workers keep a copy to put back after a failed sync (``atomic``)."""
    backend: ClassVar[str] = BACKEND

    master_address: str = "127.0.0.1"
    master_port: int | None = None
    num_workers: int | None = None
    timeout_s: float = 120.0
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    atomic: bool = True


class MemmgrGlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[MemmgrGlooTrainerInitInfo]):
    """``memmgr_gloo`` on the trainer (see the module docstring). ``transport`` is the sender's gloo transport while
    connected (None elsewhere); ``last_buckets`` and ``last_nbytes`` count what the last ``send_weights`` sent."""

    init_info_cls = MemmgrGlooTrainerInitInfo

    def __init__(self, *, client: Any, source: WeightSource | None = None, is_sender: bool = True,
                 init_info: MemmgrGlooTrainerInitInfo | None = None) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.init_info = init_info if init_info is not None else MemmgrGlooTrainerInitInfo(rank=0 if is_sender else 1)
        self.num_workers = self.init_info.num_workers
        self.master_port = self.init_info.master_port
        self.transport: GlooTransport | None = None
        self.last_buckets = 0
        self.last_nbytes = 0

    @classmethod
    def trainer_init(cls, init_info: MemmgrGlooTrainerInitInfo, *, client: Any,
                     source: WeightSource | None = None) -> "MemmgrGlooTrainerWeightTransferEngine":
        if source is None:
            raise MemmgrInputError("memmgr_gloo trainer engine: pass source= (a vLLM WeightSource of the weights, "
                                   "e.g. memmgr.sync.engines.vllm.ExportWeightSource(exporter))")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, init_info=init_info)
        if engine.is_sender:
            engine.connect()
        return engine

    # -- the group -------------------------------------------------------------------------------------------------
    def connect(self) -> "MemmgrGlooTrainerWeightTransferEngine":
        """Joins the engine's workers in a gloo group of their own (sender only; idempotent)."""
        if self.transport is not None or not self.is_sender:
            return self
        info = self.init_info
        if self.num_workers is None:
            rpc = getattr(self.client, "collective_rpc", None)
            if not callable(rpc):
                raise MemmgrInputError("memmgr_gloo trainer engine: num_workers=None needs a client with "
                                       "collective_rpc to count the engine's workers; pass num_workers= in "
                                       "MemmgrGlooTrainerInitInfo")
            self.num_workers = len(call_engine("collective_rpc('memmgr_weight_metadata')", rpc,
                                             "memmgr_weight_metadata"))
        # a fixed port is the caller's; otherwise a fresh one per connection (a previous group's store may linger)
        port = info.master_port if info.master_port is not None else free_port(info.master_address)
        world = 1 + int(self.num_workers)
        init = {"master_address": info.master_address, "master_port": port, "world_size": world, "rank_offset": 1,
                "timeout_s": info.timeout_s, "atomic": info.atomic}
        joined: dict[str, Any] = {}

        def join() -> None:
            try:
                joined["group"] = connect(info.master_address, port, world, 0, timeout_s=info.timeout_s)
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
            call_engine("init_weight_transfer_engine", future.result, info.timeout_s)
        self.master_port = port
        self.transport = GlooTransport(joined["group"], announce=self._announce, timeout_s=info.timeout_s)
        return self

    def _announce(self, description: dict[str, Any]) -> None:
        self.client.update_weights({"buckets": [description]})

    # -- one sync ----------------------------------------------------------------------------------------------------
    def send_weights(self, weight_version: str | None = None) -> None:
        """One sync of ``source`` (see the module docstring); every trainer rank calls it. ``weight_version`` is
        committed on the engine with the sync (None: the engine keeps its version)."""
        source = self.source
        if source is None:
            raise MemmgrInputError("memmgr_gloo trainer engine: no source to send; build it with source=")
        specs = as_specs(source.metadata())
        if not self.is_sender:
            for _ in source.iter_groups():  # stay in the trainer-side collectives that materialize each tensor
                pass
            return
        self.connect()
        transport = self.transport
        assert transport is not None
        announced = {s.name: s for s in specs}
        manifest = [[s.name, list(s.shape), dtype_name(s.dtype)] for s in specs]
        call_engine("start_weight_update", self.client.start_weight_update)
        try:
            self.client.update_weights({"manifest": manifest})
        except Exception as exc:
            raise MemmgrSyncMismatchError(f"vLLM weight sync: the engine refused the sync's manifest before any "
                                          f"weight moved ({str(exc)[:800]}); it keeps its previous weights") from exc
        groups = SourceStream(source.iter_groups())
        seen: set[str] = set()
        transport.start(specs)
        nbuckets = nbytes = 0
        try:
            for bucket in bucketize(self._checked(groups, announced, seen), self.init_info.bucket_bytes,
                                    device="cpu"):
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
            groups.run_to_end_after(exc)
            raise
        call_engine("finish_weight_update", self.client.finish_weight_update, weight_version)
        self.last_buckets, self.last_nbytes = nbuckets, nbytes

    @staticmethod
    def _checked(groups: Iterable[tuple[list[str], list[Any]]], announced: dict[str, ParamSpec], seen: set[str]
                 ) -> Iterator[tuple[str, torch.Tensor]]:
        """The source's pairs, each checked against the manifest before it is packed."""
        for batch in groups:
            for name, tensor in zip(*batch):
                if tensor is None:
                    raise MemmgrInputError(f"vLLM weight sync: the weight source yielded no tensor for {name!r} on "
                                           f"trainer rank 0; {BACKEND} sends from rank 0, which must hold every "
                                           f"weight (build the export with rank 0 among its receivers)")
                got = ParamSpec(name, tuple(int(s) for s in tensor.shape), tensor.dtype)
                if announced.get(name) != got or name in seen:
                    raise MemmgrSyncMismatchError(
                        f"vLLM weight sync: the weight stream yielded {name!r} (shape {list(got.shape)}, "
                        f"{dtype_name(got.dtype)}) which its metadata does not announce, or twice; the stream and "
                        f"its metadata must agree. The sync was abandoned")
                seen.add(name)
                yield name, tensor

    def _abandon(self, exc: BaseException) -> None:
        """After a failure mid-sync: asks the engine to put back its previous weights and end its update session,
        without committing a version. Best effort when the transport itself broke (the worker restores on its own
        error then)."""
        try:
            self.client.update_weights({"abort": True})
            self.client.finish_weight_update(None)
        except Exception as inner:
            logger.warning("vLLM weight sync: could not close the engine's update session after %s: %s",
                           type(exc).__name__, inner)
        if not isinstance(exc, MemmgrSyncMismatchError):
            # the stream disagreeing with its metadata is caught between buckets, with the group idle; after
            # anything else a broadcast may be half done, so the group is dropped and the next sync reconnects
            self.close()

    def close(self) -> None:
        """Releases the gloo group on this side and asks the engine to release its side (the next
        ``send_weights`` reconnects)."""
        transport, self.transport = self.transport, None
        if transport is None:
            return
        transport.close()
        shutdown_transfer_engine(self.client)

    def shutdown(self) -> None:
        self.close()


__all__ = ["MemmgrGlooTrainerInitInfo", "MemmgrGlooTrainerWeightTransferEngine", "free_port"]
