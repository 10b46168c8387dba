"""verl: a checkpoint engine over memmgr's bucket transports, and verl's trainer offload/onload done by memmgr.

**The checkpoint engine.** verl moves the trainer's weights to its rollout replicas through a ``CheckpointEngine``
(``verl/checkpoint_engine/base.py``) chosen by name from ``CheckpointEngineRegistry``. ``MemmgrCheckpointEngine``
(registered as ``"memmgr"``) carries them over memmgr's broadcast transports: gloo (CPU) or NCCL (an engine on another
GPU), the trainer (actor rank 0) as rank 0 of a group of its own and every rollout worker as one more rank. verl's
calling pattern, per weight update (``CheckpointEngineManager.update_weights``):

1. ``prepare()`` on every worker (actor rank 0 picks the group's address and port);
2. ``build_topology(actor_world_size, rollout_world_size, metadata)`` on the controller: actor rank 0 sends, the other
   actor ranks only walk their weight generator (producing a weight is collective over the actor group), the
   rollout workers are ranks 1..N;
3. ``init_process_group(**kwargs)`` on every worker (the group is kept between updates unless ``rebuild_group``);
4. ``send_weights(weights)`` on the actors (``(name, tensor)`` pairs, sync or async, or a ``MemoryManager``: only
   its weights come back, for the sync only) while ``receive_weights()`` on the rollout workers yields
   ``(name, tensor)``: views into a receive buffer that the next bucket overwrites, so the rollout copies each one
   (verl's rollouts do);
5. ``finalize()`` on every worker.

On the wire each sync is a start message, then per bucket its layout and one broadcast of its flat per-dtype bytes
(``memmgr.sync.transports``' ``WeightBucket`` layout, each weight copied in as verl's generator yields it), then an end
message and the status all-reduce: a rollout worker that stopped taking weights part-way makes ``send_weights`` raise
``MemmgrSyncError`` on the trainer, and a trainer whose weight generator failed tells the rollouts, whose
``receive_weights`` raise too.

verl imports ``checkpoint_engine.custom_backend_module`` on every worker before it builds the engine, so
``custom_backend_module: memmgr.integrations.verl`` with ``backend: memmgr`` is all a verl config needs. Importing
this module does not import verl: it registers the engine at once only where verl's checkpoint engines are imported
already, and otherwise on first use (``engine_class()``, ``register()``, or the ``MemmgrCheckpointEngine``
attribute). Without verl these raise ``MemmgrVerlMissingError`` naming the install.

**Offload.** ``VerlOffload(manager)`` does what verl's trainer engines do with per-tensor helpers
(``offload_megatron_model_to_cpu`` / ``load_megatron_model_to_gpu`` / ``offload_megatron_optimizer`` /
``load_megatron_optimizer``, the ``offload_fsdp_*`` / ``load_fsdp_*`` family, and ``engine.to(device, model=...,
optimizer=..., grad=...)`` over them) with a memmgr manager (``memmgr.for_module`` / ``memmgr.for_megatron``):
whole buckets through pinned host buffers that are reused every cycle, gradients dropped, bit-exact restores.
``install(engine)`` makes a verl engine's ``to`` use it; ``install_helpers()`` puts it in place of those helpers
wherever verl looks them up (its ``megatron_utils`` / ``fsdp_utils`` modules and every module that bound them with
``from ... import``, verl's trainer engines among them), so that verl's own ``to``, ``save_checkpoint``,
``load_checkpoint`` and ``get_per_tensor_param`` with ``param_offload`` / ``optimizer_offload`` on move the state
through memmgr; the handle it returns puts verl's functions back.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time
from typing import Any, AsyncIterator

import torch

from memmgr import arguments
from memmgr.errors import MemmgrInputError, MemmgrIntegrationError, MemmgrStateError, MemmgrSyncError
from memmgr.manager import MemoryManager
from memmgr.sync.comm import STATUS_LOAD_FAILED, STATUS_OK
from memmgr.sync.transports.base import DEFAULT_BUCKET_BYTES, TensorEntry, WeightBucket, aligned, itemsize
from memmgr.sync.transports.collective import CollectiveReceiver, CollectiveTransport

logger = logging.getLogger("memmgr")

BACKEND_NAME = "memmgr"
WIRE_FORMAT = 1  # raised whenever the messages below change: trainer and rollouts must run the same memmgr
INSTALL_HINT = ("pip install verl==0.9.1 (its checkpoint engines import with `pip install --no-deps verl==0.9.1 ray "
            "msgpack tensordict==0.10.0 pyvers omegaconf codetiming` beside torch and transformers)")


class MemmgrVerlMissingError(MemmgrIntegrationError, ImportError):
    """verl (or what its checkpoint-engine modules import) is not installed."""


def _verl_checkpoint_engine() -> Any:
    try:
        import verl.checkpoint_engine as ce
    except ImportError as exc:
        raise MemmgrVerlMissingError(f"memmgr.integrations.verl needs verl's checkpoint engines, which did not import "
                                     f"({type(exc).__name__}: {exc}); {INSTALL_HINT}") from exc
    return ce


# ---------------------------------------------------------------------------------------------------------------
# the checkpoint engine
# ---------------------------------------------------------------------------------------------------------------

_ENGINE_CLASS: type | None = None


def engine_class() -> type:
    """``MemmgrCheckpointEngine``: a subclass of verl's ``CheckpointEngine``, defined on first use (it needs verl)
    and registered in verl's ``CheckpointEngineRegistry`` as ``"memmgr"``."""
    global _ENGINE_CLASS
    if _ENGINE_CLASS is None:
        ce = _verl_checkpoint_engine()
        _ENGINE_CLASS = type("MemmgrCheckpointEngine", (_EngineMixin, ce.CheckpointEngine),
                             {"__doc__": _EngineMixin.__doc__, "__module__": __name__})
        ce.CheckpointEngineRegistry.register(BACKEND_NAME)(_ENGINE_CLASS)
    return _ENGINE_CLASS


def register(name: str = BACKEND_NAME) -> type:
    """Registers ``MemmgrCheckpointEngine`` in verl's ``CheckpointEngineRegistry`` under ``name`` (also) and returns
    it. verl then builds it with ``CheckpointEngineRegistry.new(name, bucket_size=..., is_master=..., **engine_kwargs)``
    (``checkpoint_engine.engine_kwargs[name]``: ``transport``, ``master_address``, ``timeout_s``, ``rebuild_group``)."""
    if not isinstance(name, str) or not name:
        raise MemmgrInputError(f"register: name must be a non-empty str, got {name!r}")
    cls = engine_class()
    _verl_checkpoint_engine().CheckpointEngineRegistry.register(name)(cls)
    return cls


def __getattr__(name: str) -> Any:
    if name == "MemmgrCheckpointEngine":
        return engine_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _host_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


async def _pairs(weights: Any) -> AsyncIterator[tuple[str, torch.Tensor]]:
    """``weights`` (a mapping, an iterable or an async iterable of ``(name, tensor)``) as an async stream."""
    if hasattr(weights, "__aiter__"):
        async for item in weights:
            yield _checked_pair(item)
        return
    for item in arguments.named_tensors("MemmgrCheckpointEngine.send_weights", "weights", weights):
        yield item


def _checked_pair(item: Any) -> tuple[str, torch.Tensor]:
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)
            and isinstance(item[1], torch.Tensor)):
        raise MemmgrInputError(f"MemmgrCheckpointEngine.send_weights: each weight must be a (name, tensor) pair, got "
                               f"{type(item).__name__}")
    return item[0], item[1]


class _OpenBucket:
    """The bucket of one dtype being filled: a buffer of ``capacity`` bytes on the transport's device, each weight
    copied in at the next ``ALIGN_BYTES``-aligned offset (the layout ``WeightBucket.pack`` makes)."""

    def __init__(self, dtype: torch.dtype, capacity: int, device: torch.device) -> None:
        self.dtype = dtype
        self.buffer = torch.empty(capacity // itemsize(dtype), dtype=dtype, device=device)
        self.entries: list[TensorEntry] = []
        self.offset = 0  # bytes

    def fits(self, t: torch.Tensor) -> bool:
        return self.offset + aligned(t.numel() * t.element_size()) <= self.buffer.numel() * itemsize(self.dtype)

    def add(self, name: str, t: torch.Tensor) -> None:
        start = self.offset // itemsize(self.dtype)
        with torch.no_grad():
            self.buffer[start:start + t.numel()].copy_(t.detach().reshape(-1))
        self.entries.append(TensorEntry(name, tuple(int(s) for s in t.shape), self.dtype, self.offset))
        self.offset = aligned(self.offset + t.numel() * t.element_size())

    def close(self) -> WeightBucket:
        """The filled part as a bucket (sent before the next ``add``), and the buffer open again from its start."""
        bucket = WeightBucket(self.buffer[:self.offset // itemsize(self.dtype)], tuple(self.entries))
        self.entries, self.offset = [], 0
        return bucket


class _EngineMixin:
    """verl ``CheckpointEngine`` over memmgr's gloo / NCCL bucket transports (see ``memmgr.integrations.verl``).

    ``bucket_size`` (bytes; verl passes ``update_weights_bucket_megabytes << 20``) bounds each bucket (a larger tensor
    gets one of its own); ``is_master``: actor rank 0, which hosts the group. Engine kwargs: ``transport`` ("gloo",
    "nccl" or "auto": NCCL where CUDA is; the master's choice holds for the whole group), ``master_address`` (default:
    this host's address), ``timeout_s`` (each collective and the group's set-up), ``rebuild_group`` (a new group at
    every update instead of keeping it).
    """

    wire_format = "named_tensors"

    def __init__(self, bucket_size: int = DEFAULT_BUCKET_BYTES, is_master: bool = False, *, transport: str = "auto",
                 master_address: str | None = None, timeout_s: float = 300.0, rebuild_group: bool = False) -> None:
        arguments.integer("MemmgrCheckpointEngine", "bucket_size", bucket_size, minimum=1)
        arguments.boolean("MemmgrCheckpointEngine", "is_master", is_master)
        arguments.boolean("MemmgrCheckpointEngine", "rebuild_group", rebuild_group)
        arguments.number("MemmgrCheckpointEngine", "timeout_s", timeout_s, positive=True)
        if transport not in ("auto", "gloo", "nccl"):
            raise MemmgrInputError(f"MemmgrCheckpointEngine: transport must be 'auto', 'gloo' or 'nccl', got "
                                   f"{transport!r}")
        transport = transport if transport != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
        self.bucket_size = int(bucket_size)
        self.is_master = is_master
        self.transport = transport
        self.master_address = master_address
        self.timeout_s = float(timeout_s)
        self.rebuild_group = rebuild_group
        self.rank: int | None = None
        self.world_size: int | None = None
        self._group: Any = None
        self._sender: CollectiveTransport | None = None
        self._receiver: CollectiveReceiver | None = None
        self.last_stats: dict[str, float] = {}

    # ---- verl's set-up calls ----
    def prepare(self) -> dict[str, Any]:
        """Actor rank 0: the address, port and transport of the group (for ``build_topology``); others: ``{}``."""
        if not self.is_master:
            return {}
        address = self.master_address or _host_address()
        return {"master_address": address, "master_port": _free_port(address), "transport": self.transport}

    @classmethod
    def build_topology(cls, actor_wg_world_size: int, rollout_world_size: int,
                       metadata: list[dict]) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        """Actor rank 0 is rank 0 of the group, the other actor ranks take no part (rank -1), rollout worker i is rank
        i + 1. ``metadata``: what ``prepare`` returned on each worker, actors first."""
        if actor_wg_world_size < 1 or rollout_world_size < 1:
            raise MemmgrInputError(f"MemmgrCheckpointEngine.build_topology: needs at least one actor and one rollout "
                                   f"worker, got {actor_wg_world_size} and {rollout_world_size}")
        master = metadata[0] if metadata else None
        if not isinstance(master, dict) or "master_port" not in master:
            raise MemmgrInputError("MemmgrCheckpointEngine.build_topology: the first metadata is not the master's: "
                                   "build actor rank 0's engine with is_master=True and pass the actors' metadata "
                                   "first")
        world_size = 1 + rollout_world_size
        actor = {"rank": [0] + [-1] * (actor_wg_world_size - 1), "world_size": [world_size] * actor_wg_world_size,
                 "master_metadata": [master] * actor_wg_world_size}
        rollout = {"rank": list(range(1, world_size)), "world_size": [world_size] * rollout_world_size,
                   "master_metadata": [master] * rollout_world_size}
        return actor, rollout

    def init_process_group(self, rank: int, world_size: int, master_metadata: dict[str, Any]) -> None:
        """Joins the group (rank 0 hosts its store). Blocks until every rank joined or ``timeout_s`` passed. A group
        of the same rank and size from an earlier update is kept unless ``rebuild_group``."""
        if rank < 0:
            self.rank, self.world_size = rank, world_size
            return
        if self._group is not None and not self.rebuild_group and (self.rank, self.world_size) == (rank, world_size):
            return
        self._close_group()
        backend = master_metadata.get("transport", self.transport)
        if backend == "nccl":
            from memmgr.sync.transports.nccl import NcclReceiver, NcclTransport, connect
            sender_cls, receiver_cls = NcclTransport, NcclReceiver
        else:
            from memmgr.sync.transports.gloo import GlooReceiver, GlooTransport, connect
            sender_cls, receiver_cls = GlooTransport, GlooReceiver
        self._group = connect(master_metadata["master_address"], int(master_metadata["master_port"]), world_size, rank,
                              timeout_s=self.timeout_s, prefix=f"memmgr_verl_{backend}")
        self.rank, self.world_size, self.transport = rank, world_size, backend
        if rank == 0:
            self._sender = sender_cls(self._group, timeout_s=self.timeout_s, layout_in_band=False)
        else:
            self._receiver_cls = receiver_cls
        logger.info("verl checkpoint engine: rank %d of %d joined the %s group", rank, world_size, backend)

    def finalize(self) -> None:
        """Frees the receive buffer; with ``rebuild_group`` also the group."""
        self._receiver = None
        if self.rebuild_group:
            self._close_group()

    def _close_group(self) -> None:
        if self._sender is not None:
            self._sender.close()
        elif self._group is not None:
            self._group.close()
        self._group = self._sender = self._receiver = None

    def _require(self, rank_ok: bool, what: str) -> None:
        if self.rank is None:
            raise MemmgrStateError(f"MemmgrCheckpointEngine.{what}: call init_process_group first (verl's "
                                   f"CheckpointEngineManager does, after prepare and build_topology)")
        if not rank_ok:
            role = "the trainer's (rank 0)" if what == "send_weights" else "a rollout worker's (rank >= 1)"
            raise MemmgrStateError(f"MemmgrCheckpointEngine.{what}: this engine is rank {self.rank} of the group; "
                                   f"{what} runs on {role} engine")

    # ---- the trainer side ----
    async def send_weights(self, weights: Any, global_steps: int | None = None) -> dict[str, float]:
        """Sends one version of the weights to every rollout worker: ``weights`` is verl's generator of ``(name,
        tensor)`` (sync or async), a mapping, or a ``MemoryManager`` (its weights come back for this sync only, and
        leave again after it, also on errors). Actor ranks outside the group only walk the generator. Returns
        ``memmgr/...`` metrics for verl's trainer log once every rollout worker took every weight."""
        self._require(self.rank is not None and self.rank <= 0, "send_weights")
        if self.rank < 0:
            async for _ in _pairs(weights):  # producing each weight is collective over the actor group
                pass
            return {}
        if isinstance(weights, MemoryManager):
            with weights.weight_sync() as named:
                return await self._send(named.items(), global_steps)
        return await self._send(weights, global_steps)

    async def _send(self, weights: Any, global_steps: int | None) -> dict[str, float]:
        """Copies each weight into the open bucket of its dtype as it arrives (no reference to it is kept, so verl's
        generator may free what it gathered, and a manager's weights may leave as soon as the stream ends) and
        broadcasts a bucket once the next weight would not fit."""
        sender = self._sender
        assert sender is not None
        t0 = time.perf_counter()
        await asyncio.to_thread(sender.send_control, {"memmgr_verl": WIRE_FORMAT, "global_steps": global_steps},
                                "the start of the sync")
        open_: dict[torch.dtype, _OpenBucket] = {}
        seen: set[str] = set()
        stats = {"bytes": 0, "buckets": 0, "tensors": 0}

        async def ship(bucket: WeightBucket) -> None:
            await asyncio.to_thread(sender.send_control, bucket.meta(), f"bucket {stats['buckets']} layout")
            await asyncio.to_thread(sender.send_bucket, bucket)  # returns once broadcast: the buffer is free
            stats["bytes"] += bucket.payload_bytes
            stats["buckets"] += 1
            stats["tensors"] += len(bucket.entries)

        try:
            async for name, t in _pairs(weights):
                if name in seen:
                    raise MemmgrInputError(f"MemmgrCheckpointEngine.send_weights: tensor {name!r} appears twice in "
                                           f"the weight stream; each name must be sent once per sync")
                seen.add(name)
                if aligned(t.numel() * t.element_size()) > self.bucket_size:  # a bucket of its own
                    await ship(WeightBucket.pack([(name, t)], device=sender.device))
                    continue
                bucket = open_.get(t.dtype)
                if bucket is None:
                    bucket = open_[t.dtype] = _OpenBucket(t.dtype, self.bucket_size, sender.device)
                elif not bucket.fits(t):
                    await ship(bucket.close())
                bucket.add(name, t)
                t = None
            for bucket in open_.values():
                if bucket.entries:
                    await ship(bucket.close())
        except MemmgrSyncError:
            raise  # the group itself failed: nothing more can be said over it
        except BaseException as exc:
            try:
                sender.send_control({"abort": f"{type(exc).__name__}: {str(exc)[:1000]}"}, "the abort message")
            except Exception as err:  # the original error matters more
                logger.warning("verl checkpoint engine: could not tell the rollouts the sync was aborted: %s", err)
            raise
        finally:
            open_.clear()
        await asyncio.to_thread(sender.send_control, {"end": stats["tensors"]}, "the end of the sync")
        await asyncio.to_thread(sender.exchange_status, STATUS_OK)  # raises if a rollout worker failed
        seconds = time.perf_counter() - t0
        self.last_stats = {"memmgr/sync_bytes": float(stats["bytes"]), "memmgr/sync_buckets": float(stats["buckets"]),
                           "memmgr/sync_tensors": float(stats["tensors"]), "memmgr/sync_seconds": seconds}
        logger.info("verl checkpoint engine: sent %d tensors (%.1f MB) in %d buckets in %.3f s (step %s)",
                    stats["tensors"], stats["bytes"] / 1e6, stats["buckets"], seconds, global_steps)
        return dict(self.last_stats)

    # ---- the rollout side ----
    async def receive_weights(self, global_steps: int | None = None) -> AsyncIterator[tuple[str, torch.Tensor]]:
        """Yields every ``(name, tensor)`` the trainer sends in this sync, bucket by bucket. Each tensor is a view
        into a receive buffer that the next bucket overwrites: copy it before asking for the next one (verl's
        rollouts copy it into their own buffers). Raises ``MemmgrSyncError`` if the trainer aborted the sync; if
        this side stops part-way, the trainer's ``send_weights`` raises naming this rank."""
        self._require(self.rank is not None and self.rank > 0, "receive_weights")
        if self._receiver is None:
            self._receiver = self._receiver_cls(self._group)
        receiver = self._receiver
        start = await asyncio.to_thread(receiver.receive_control)
        if not isinstance(start, dict) or start.get("memmgr_verl") != WIRE_FORMAT:
            raise MemmgrSyncError(f"verl checkpoint engine: the trainer's sync starts with {str(start)[:200]}, not "
                                  f"memmgr's wire format {WIRE_FORMAT}; install the same memmgr on trainer and "
                                  f"rollouts")
        taken, finished = 0, False
        try:
            while True:
                message = await asyncio.to_thread(receiver.receive_control)
                if "abort" in message:
                    finished = True
                    raise MemmgrSyncError(f"verl checkpoint engine: the trainer aborted the sync after {taken} "
                                          f"tensors: {message['abort']}")
                if "end" in message:
                    finished = True
                    break
                bucket = await asyncio.to_thread(receiver.receive, message)
                for name, view in bucket.views():
                    yield name, view
                    taken += 1
                bucket = None
            await asyncio.to_thread(receiver.exchange_status, STATUS_OK)
        finally:
            if not finished:
                self._drain(receiver, taken)
        logger.info("verl checkpoint engine: rank %s received %d tensors (step %s)", self.rank, taken,
                    start.get("global_steps"))

    def _drain(self, receiver: CollectiveReceiver, taken: int) -> None:
        """The rollout stopped taking weights part-way: receive the rest, so the trainer does not hang, and report
        the failure through the status all-reduce, so that its ``send_weights`` raises."""
        try:
            while True:
                message = receiver.receive_control()
                if "end" in message or "abort" in message:
                    break
                receiver.receive(message)
            receiver.exchange_status(STATUS_LOAD_FAILED, f"the rollout worker stopped taking weights after {taken} "
                                                         f"tensors (its weight loading raised or was cancelled)")
        except MemmgrSyncError as exc:
            logger.warning("verl checkpoint engine: rank %s reported the aborted receive: %s", self.rank, exc)


if "verl.checkpoint_engine" in sys.modules:  # imported by verl as custom_backend_module: register now
    engine_class()

from memmgr.integrations.verl.offload import HELPERS, HelperHandle, VerlOffload  # noqa: E402 - offload imports INSTALL_HINT from here

__all__ = ["BACKEND_NAME", "HELPERS", "HelperHandle", "MemmgrVerlMissingError", "VerlOffload", "engine_class",
           "register"]
