"""A lean reference weight sync from trainer ranks to generation engines over a torch.distributed group.

One ``WeightSender`` on a trainer rank and one ``WeightReceiver`` in each process of the engine it feeds share a
process group (NCCL on GPUs, gloo on the CPU). Each sync:

1. the sender broadcasts a small header (protocol, layout version, sizes); the layout (names, shapes, dtypes,
   bucket membership and offsets) follows only when the receivers have not seen this version yet, so steady-state
   syncs send no metadata;
2. every rank reports its status in one all-reduce, so a disagreement (mismatched layout, a tensor the engine lacks
   or holds in another shape or dtype) raises a clear error on every side before any weight moves;
3. the weights travel as flat per-dtype buckets of bounded size, one broadcast per bucket; the sender packs the
   next bucket while the current one is in flight, and each receiver holds at most two buckets and hands
   ``(engine_name, view)`` pairs of the bucket it just got to ``load_weights`` (the callable vLLM model classes
   expose), after mapping trainer names with ``name_map``;
4. a last all-reduce reports whether every receiver loaded everything; a failure anywhere raises on every side.

Data-parallel trainers: every trainer rank holds the full weights, so give each engine its own sender (trainer rank
i feeds engine i) rather than one sender for all. An engine must not share a GPU with its sender: NCCL refuses two
ranks of one communicator on one GPU, so the receiver and the sender compare device UUIDs before the first
collective and raise an error that says so.
"""
from __future__ import annotations

import datetime
import difflib
import hashlib
import json
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Union
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from memmgr.errors import MemmgrError, MemmgrInputError, MemmgrStateError
from memmgr.manager import MemoryManager

logger = logging.getLogger("memmgr")

PROTOCOL_VERSION = 1
_MAGIC = 0x6D656D6D6772  # "memmgr"
_HEADER_LEN = 8          # magic, protocol, status, layout version, metadata bytes, buckets, total bytes, message bytes
_MESSAGE_BYTES = 4096    # fixed size of an error message a failing rank broadcasts to the others
_ALIGN_BYTES = 256       # each tensor starts at a multiple of this inside its bucket

# status codes (all-reduced with MAX, so any failure wins)
_OK = 0
_ABORT = 1               # the sender failed before sending weights (e.g. its weights were discarded)
_MISMATCH = 2            # the receiver's metadata disagrees with the sender's
_LOAD_FAILED = 3         # load_weights raised on a receiver

NameMap = Union[Callable[[str], Union[str, None]], Mapping[str, str], None]
LoadWeights = Callable[[Iterable[tuple[str, torch.Tensor]]], Any]

SAME_GPU_HINT = ("NCCL refuses two ranks of one communicator on the same GPU, so an engine cannot receive weights "
                 "from a trainer rank on its own GPU. Place the engine on another GPU: e.g. reverse placement, where "
                 "trainer rank i feeds the engine on GPU (i + 1) % n")


class MemmgrSyncError(MemmgrError, RuntimeError):
    """A weight sync failed on this rank or on the other side of the group; the message says where and why."""


# ---------------------------------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise MemmgrSyncError(f"sync metadata names dtype {name!r}, which this torch ({torch.__version__}) lacks; "
                              f"use the same torch version on both sides")
    return dtype


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the sync: where it lies in which bucket (offset and numel in elements of its dtype)."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    bucket: int
    offset: int
    numel: int


@dataclass(frozen=True)
class BucketSpec:
    """One flat bucket: a dtype, its length in elements and the indices of its tensors in ``SyncLayout.tensors``."""
    dtype: torch.dtype
    numel: int
    members: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


@dataclass(frozen=True)
class SyncLayout:
    """Names, shapes, dtypes and bucket layout of one set of weights; ``version`` hashes all of it."""
    tensors: tuple[TensorSpec, ...]
    buckets: tuple[BucketSpec, ...]
    bucket_bytes: int
    version: int
    device_uuid: str = ""

    @classmethod
    def build(cls, named: Iterable[tuple[str, tuple[int, ...], torch.dtype]], bucket_bytes: int,
              device_uuid: str = "") -> "SyncLayout":
        """Groups tensors by dtype, in order, into buckets of at most ``bucket_bytes`` (a larger tensor gets a
        bucket of its own)."""
        named = list(named)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, (_, _, dtype) in enumerate(named):
            by_dtype.setdefault(dtype, []).append(i)
        specs: list[TensorSpec | None] = [None] * len(named)
        buckets: list[BucketSpec] = []
        for dtype, indices in by_dtype.items():
            item = _itemsize(dtype)
            align = max(1, _ALIGN_BYTES // item)
            limit = max(1, bucket_bytes // item)
            members: list[int] = []
            fill = 0
            for i in indices:
                name, shape, _ = named[i]
                numel = 1
                for s in shape:
                    numel *= int(s)
                padded = -(-numel // align) * align
                if members and fill + numel > limit:
                    buckets.append(BucketSpec(dtype, fill, tuple(members)))
                    members, fill = [], 0
                specs[i] = TensorSpec(name, tuple(int(s) for s in shape), dtype, len(buckets), fill, numel)
                members.append(i)
                fill += padded
            if members:
                buckets.append(BucketSpec(dtype, fill, tuple(members)))
        tensors = tuple(s for s in specs if s is not None)
        version = cls._hash(tensors, buckets, bucket_bytes)
        return cls(tensors, tuple(buckets), bucket_bytes, version, device_uuid)

    @staticmethod
    def _hash(tensors: Iterable[TensorSpec], buckets: Iterable[BucketSpec], bucket_bytes: int) -> int:
        text = json.dumps([PROTOCOL_VERSION, bucket_bytes,
                           [[t.name, list(t.shape), _dtype_name(t.dtype), t.bucket, t.offset] for t in tensors],
                           [[_dtype_name(b.dtype), b.numel, list(b.members)] for b in buckets]])
        return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)

    @property
    def nbytes(self) -> int:
        """Bytes of the weights themselves (without alignment padding)."""
        return sum(t.numel * _itemsize(t.dtype) for t in self.tensors)

    @property
    def max_bucket_nbytes(self) -> int:
        return max((b.nbytes for b in self.buckets), default=0)

    def to_bytes(self) -> bytes:
        return json.dumps({
            "protocol": PROTOCOL_VERSION, "version": self.version, "bucket_bytes": self.bucket_bytes,
            "device_uuid": self.device_uuid,
            "tensors": [[t.name, list(t.shape), _dtype_name(t.dtype), t.bucket, t.offset, t.numel]
                        for t in self.tensors],
            "buckets": [[_dtype_name(b.dtype), b.numel, list(b.members)] for b in self.buckets],
        }).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "SyncLayout":
        obj = json.loads(data.decode())
        if obj.get("protocol") != PROTOCOL_VERSION:
            raise MemmgrSyncError(f"sync metadata uses protocol {obj.get('protocol')} but this side speaks "
                                  f"{PROTOCOL_VERSION}; install the same memmgr version on trainer and engine")
        tensors = tuple(TensorSpec(n, tuple(s), _dtype_from_name(d), b, o, k) for n, s, d, b, o, k in obj["tensors"])
        buckets = tuple(BucketSpec(_dtype_from_name(d), k, tuple(m)) for d, k, m in obj["buckets"])
        layout = cls(tensors, buckets, obj["bucket_bytes"], obj["version"], obj.get("device_uuid", ""))
        if cls._hash(tensors, buckets, layout.bucket_bytes) != layout.version:
            raise MemmgrSyncError(f"sync metadata of version {layout.version:#x} does not hash to its version; it "
                                  f"was corrupted in transit or written by another memmgr version")
        return layout


@dataclass
class SyncStats:
    """What one sync did, on one side."""
    version: int = 0
    metadata_sent: bool = False       # sender: the layout went out this time; receiver: it came in this time
    collectives: int = 0              # collectives this side took part in
    buckets: int = 0
    nbytes: int = 0                   # weight bytes moved (without alignment padding)
    wire_bytes: int = 0               # bucket bytes broadcast (with padding)
    seconds: float = 0.0              # header to final status, inclusive
    bucket_seconds: float = 0.0       # first bucket broadcast to last one complete
    extra: dict = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        """Weight bytes per second over the whole sync, in GB/s (1e9)."""
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------------------------------
# process groups
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class SyncGroup:
    """A process group of its own for weight sync, made by ``init_sync_group``: independent of the default group."""
    backend: Any          # a torch.distributed Backend (ProcessGroupNCCL / ProcessGroupGloo)
    backend_name: str
    rank: int
    world_size: int
    store: Any            # the c10d Store it was built on (used for the device handshake before any collective)
    timeout: datetime.timedelta

    def close(self) -> None:
        """Releases the communicator (NCCL) where torch offers a way to."""
        for meth in ("shutdown", "abort"):
            fn = getattr(self.backend, meth, None)
            if fn is not None:
                try:
                    fn()
                except Exception as exc:  # pragma: no cover - best effort
                    logger.debug("sync group %s() failed: %s", meth, exc)
                return


def init_sync_group(init_method: str, world_size: int, rank: int, backend: str = "nccl", *,
                    timeout: float = 300.0, store: Any = None, prefix: str = "memmgr_sync") -> SyncGroup:
    """Creates a process group for weight sync that does not touch torch's default group.

    ``init_method`` is ``tcp://host:port``; rank 0 hosts the store there (unless ``store`` is given). Every member
    (the sender and each engine process) calls this with its own rank; ``timeout`` (seconds) bounds every collective
    and the store handshake, so a missing peer raises instead of hanging.
    """
    backend = backend.lower()
    if backend not in ("nccl", "gloo"):
        raise MemmgrInputError(f"init_sync_group: backend {backend!r} is not supported; use 'nccl' (GPU) or 'gloo'")
    if not (0 <= rank < world_size):
        raise MemmgrInputError(f"init_sync_group: rank {rank} is outside world_size {world_size}")
    td = datetime.timedelta(seconds=timeout)
    if store is None:
        url = urlparse(init_method)
        if url.scheme != "tcp" or not url.hostname or not url.port:
            raise MemmgrInputError(f"init_sync_group: init_method {init_method!r} is not tcp://host:port")
        store = dist.TCPStore(url.hostname, url.port, world_size, rank == 0, timeout=td)
    store = dist.PrefixStore(prefix, store)
    if backend == "nccl":
        if not torch.cuda.is_available() or not dist.is_nccl_available():
            raise MemmgrInputError("init_sync_group: backend 'nccl' needs CUDA and a torch built with NCCL; use "
                                   "'gloo' on the CPU")
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = td
        pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
        seq = getattr(pg, "_set_sequence_number_for_group", None)
        if seq is not None:
            seq()
    else:
        pg = dist.ProcessGroupGloo(store, rank, world_size, td)
    return SyncGroup(pg, backend, rank, world_size, store, td)


class _Comm:
    """The few collectives the protocol needs, over a SyncGroup or a torch.distributed ProcessGroup."""

    def __init__(self, group: Any, store: Any = None):
        if isinstance(group, SyncGroup):
            self._pg = group.backend
            self._torch_group = None
            self.rank, self.size, self.backend = group.rank, group.world_size, group.backend_name
            self.store = store if store is not None else group.store
        else:
            if not dist.is_initialized():
                raise MemmgrInputError("weight sync: no process group given and torch.distributed is not "
                                       "initialized; pass a group from init_sync_group() or dist.new_group()")
            self._pg = None
            self._torch_group = group if group is not None else dist.group.WORLD
            self.rank = dist.get_rank(self._torch_group)
            self.size = dist.get_world_size(self._torch_group)
            self.backend = str(dist.get_backend(self._torch_group)).lower()
            self.store = store
            if self.rank < 0:
                raise MemmgrInputError("weight sync: this process is not a member of the process group it was given")
        self.count = 0

    @property
    def device(self) -> torch.device:
        if "nccl" in self.backend:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def broadcast(self, tensor: torch.Tensor, src: int) -> Any:
        self.count += 1
        try:
            if self._pg is not None:
                opts = dist.BroadcastOptions()
                opts.rootRank = src
                opts.rootTensor = 0
                return self._pg.broadcast([tensor], opts)
            return dist.broadcast(tensor, group=self._torch_group, group_src=src, async_op=True)
        except Exception as exc:
            raise _translate(exc) from exc

    def allreduce_max(self, tensor: torch.Tensor) -> None:
        self.count += 1
        try:
            if self._pg is not None:
                opts = dist.AllreduceOptions()
                opts.reduceOp = dist.ReduceOp.MAX
                self._pg.allreduce([tensor], opts).wait()
            else:
                dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self._torch_group)
        except Exception as exc:
            raise _translate(exc) from exc


def _translate(exc: Exception) -> Exception:
    text = str(exc)
    if "Duplicate GPU" in text or "duplicate GPU" in text:
        return MemmgrSyncError(f"two ranks of the weight-sync group are on one GPU ({text.strip()[:200]}). "
                               f"{SAME_GPU_HINT}")
    return exc


def _wait(work: Any) -> None:
    try:
        work.wait()
    except Exception as exc:
        raise _translate(exc) from exc


def device_uuid(device: torch.device | None) -> str:
    """A stable identity of the GPU behind ``device`` ("" for the CPU): its UUID, else its PCI bus id."""
    if device is None or device.type != "cuda":
        return ""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        return str(uuid)
    try:  # pragma: no cover - old torch
        import pynvml

        pynvml.nvmlInit()
        bus = getattr(props, "pci_bus_id", None)
        handle = pynvml.nvmlDeviceGetHandleByIndex(index) if bus is None else None
        return str(pynvml.nvmlDeviceGetUUID(handle)) if handle is not None else f"pci:{bus}"
    except Exception:  # pragma: no cover
        return f"{socket.gethostname()}:cuda:{index}"


def _describe_map(name_map: NameMap) -> str:
    if name_map is None:
        return "identity (no name_map)"
    if isinstance(name_map, Mapping):
        return f"a dict of {len(name_map)} entries"
    return getattr(name_map, "__qualname__", None) or getattr(name_map, "__name__", None) or repr(name_map)


def _map_name(name_map: NameMap, name: str) -> str | None:
    if name_map is None:
        return name
    if isinstance(name_map, Mapping):
        return name_map.get(name, name)
    return name_map(name)


class _Endpoint:
    """What sender and receiver share: the group, the status exchange and the device handshake."""

    def __init__(self, group: Any, src_rank: int, *, store: Any, device_uuid_override: str | None, tag: str):
        self._comm = _Comm(group, store)
        if not (0 <= src_rank < self._comm.size):
            raise MemmgrInputError(f"weight sync: src_rank {src_rank} is outside the group of {self._comm.size} "
                                   f"ranks; src_rank is the sender's rank inside the sync group")
        self.src_rank = src_rank
        self._uuid_override = device_uuid_override
        self._tag = tag
        self._handshaken = False

    @property
    def rank(self) -> int:
        return self._comm.rank

    def _my_uuid(self, device: torch.device | None) -> str:
        return self._uuid_override if self._uuid_override is not None else device_uuid(device)

    def _store_handshake(self, device: torch.device | None) -> None:
        """Exchanges device UUIDs through the group's store before the first collective (NCCL would fail on a
        duplicate GPU with a far less helpful message, or hang)."""
        if self._handshaken:
            return
        self._handshaken = True
        store = self._comm.store
        if store is None:
            return
        mine = self._my_uuid(device)
        key = f"{self._tag}/uuid/"
        store.set(key + str(self.rank), mine)
        if self.rank == self.src_rank:
            peers = [r for r in range(self._comm.size) if r != self.src_rank]
        else:
            peers = [self.src_rank]
        for r in peers:
            theirs = store.get(key + str(r)).decode()
            if mine and theirs and mine == theirs:
                raise MemmgrSyncError(f"weight sync: rank {self.rank} and rank {r} of the sync group are on the same "
                                      f"GPU (UUID {mine}). {SAME_GPU_HINT}")

    def _status(self, code: int, message: str, stats: SyncStats) -> None:
        """All ranks report a status; if any failed, every rank raises with the failing rank's message."""
        dev = self._comm.device
        flag = torch.tensor([code, (self.rank + 1) if code else 0], dtype=torch.int64, device=dev)
        self._comm.allreduce_max(flag)
        worst, who = (int(v) for v in flag.cpu())
        if worst == _OK:
            return
        who -= 1
        buf = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8, device=dev)
        if who == self.rank:
            data = (message or "unknown error").encode()[:_MESSAGE_BYTES]
            buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
        _wait(self._comm.broadcast(buf, who))
        text = bytes(buf.cpu().numpy().tobytes()).rstrip(b"\0").decode(errors="replace")
        side = "sender" if who == self.src_rank else "receiver"
        if who == self.rank:
            raise MemmgrSyncError(text) if worst != _MISMATCH else MemmgrInputError(text)
        cls = MemmgrInputError if worst == _MISMATCH else MemmgrSyncError
        raise cls(f"weight sync failed on the {side} (rank {who} of the sync group): {text}")


# ---------------------------------------------------------------------------------------------------------------------
# sender
# ---------------------------------------------------------------------------------------------------------------------
class WeightSender:
    """Broadcasts a trainer rank's weights to the engine processes of its sync group.

    ``send(source)`` takes a MemoryManager (the weights come back to the GPU for the sync only, through
    ``mgr.weight_sync()``, and leave again afterwards, also on errors) or a plain name -> tensor mapping.
    """

    def __init__(self, group: Any = None, src_rank: int = 0, *, bucket_size_mb: float = 256, store: Any = None,
                 device_uuid: str | None = None, tag: str = "weights"):
        self._ep = _Endpoint(group, src_rank, store=store, device_uuid_override=device_uuid, tag=tag)
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
            self._ep._store_handshake(None)
            comm = self._ep._comm
            data = message.encode()[:_MESSAGE_BYTES]
            header = torch.tensor([_MAGIC, PROTOCOL_VERSION, _ABORT, 0, 0, 0, 0, len(data)], dtype=torch.int64,
                                  device=comm.device)
            _wait(comm.broadcast(header, self.src_rank))
            buf = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
            buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            buf = buf.to(comm.device)
            _wait(comm.broadcast(buf, self.src_rank))
        except Exception as err:  # the original error matters more
            logger.warning("weight sync: could not tell the receivers that the sync was aborted: %s", err)

    @property
    def src_rank(self) -> int:
        return self._ep.src_rank

    def _layout_for(self, items: list[tuple[str, torch.Tensor]]) -> SyncLayout:
        if not items:
            raise MemmgrInputError("WeightSender: there are no weights to send (empty mapping)")
        device = items[0][1].device
        comm = self._ep._comm
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
            self.layout = SyncLayout.build(signature, self.bucket_bytes, self._ep._my_uuid(device))
            self._signature = signature
            logger.debug("weight sync: layout %#x, %d tensors in %d buckets", self.layout.version,
                         len(self.layout.tensors), len(self.layout.buckets))
        return self.layout

    def _send(self, weights: Mapping[str, torch.Tensor]) -> SyncStats:
        items = list(weights.items())
        try:
            layout = self._layout_for(items)
            device = items[0][1].device
            self._ep._store_handshake(device)
        except BaseException as exc:
            if not isinstance(exc, MemmgrSyncError):
                self._abort(exc)
            raise
        comm = self._ep._comm
        stats = SyncStats(version=layout.version)
        count0 = comm.count
        t0 = time.perf_counter()
        meta = layout.to_bytes() if self._sent_version != layout.version else b""
        header = torch.tensor([_MAGIC, PROTOCOL_VERSION, _OK, layout.version, len(meta), len(layout.buckets),
                               layout.nbytes, 0], dtype=torch.int64, device=device)
        _wait(comm.broadcast(header, self.src_rank))
        if meta:
            mt = torch.frombuffer(bytearray(meta), dtype=torch.uint8).to(device)
            _wait(comm.broadcast(mt, self.src_rank))
            stats.metadata_sent = True
        try:
            self._ep._status(_OK, "", stats)
        except MemmgrError:
            self._sent_version = None
            raise
        self._sent_version = layout.version

        tb = time.perf_counter()
        self._send_buckets(layout, [t for _, t in items], stats)
        del items
        self._ep._status(_OK, "", stats)  # receivers report whether load_weights took everything
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
        comm, device = self._ep._comm, tensors[0].device
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
                        _wait(works[slot])  # the broadcast that last used this buffer is done (stream-ordered on GPU)
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
                        _wait(w)
        finally:
            # views of the weights must not outlive the sync (a traceback keeps this frame alive, and the manager
            # refuses to offload weights that something still references)
            dst.clear()
            src.clear()
            tensors.clear()
        stats.buckets = len(layout.buckets)


# ---------------------------------------------------------------------------------------------------------------------
# receiver
# ---------------------------------------------------------------------------------------------------------------------
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
        self._ep = _Endpoint(group, src_rank, store=store, device_uuid_override=device_uuid, tag=tag)
        if self._ep.rank == src_rank:
            raise MemmgrInputError(f"WeightReceiver: this process is the source rank {src_rank} of the sync group; "
                                   f"build a WeightSender here instead")
        self.load_weights = load_weights
        self.name_map = name_map
        self.device = torch.device(device) if device is not None else self._ep._comm.device
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
        mine = self._ep._my_uuid(self.device)
        if mine and layout.device_uuid and mine == layout.device_uuid:
            return (f"the sender (rank {self.src_rank}) and this receiver (rank {self._ep.rank}) are on the same GPU "
                    f"(UUID {mine}). {SAME_GPU_HINT}")
        if self._expected is None:
            return ""
        expected = self._expected() if callable(self._expected) else self._expected
        problems = []
        seen = set()
        for spec in layout.tensors:
            target = _map_name(self.name_map, spec.name)
            if target is None:
                continue
            seen.add(target)
            how = f"trainer tensor {spec.name!r} -> engine name {target!r} (name_map: {_describe_map(self.name_map)})"
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
        ep, comm = self._ep, self._ep._comm
        ep._store_handshake(self.device)
        self._load_error_context: list[tuple[str, str]] = []
        stats = SyncStats()
        count0 = comm.count
        t0 = time.perf_counter()
        header_t = torch.zeros(_HEADER_LEN, dtype=torch.int64, device=comm.device)
        _wait(comm.broadcast(header_t, self.src_rank))
        magic, proto, status, version, meta_len, nbuckets, total, msg_len = (int(v) for v in header_t.cpu())
        if magic != _MAGIC:
            raise MemmgrSyncError(f"weight sync: rank {self.src_rank} sent a header that is not memmgr's (magic "
                                  f"{magic:#x}); another collective is running on this group. Give the weight sync "
                                  f"a process group of its own (init_sync_group)")
        if status == _ABORT:
            buf = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8, device=comm.device)
            _wait(comm.broadcast(buf, self.src_rank))
            text = bytes(buf[:msg_len].cpu().numpy().tobytes()).decode(errors="replace")
            raise MemmgrSyncError(f"weight sync aborted by the sender (rank {self.src_rank}) before any weight was "
                                  f"sent: {text}")
        stats.version = version
        problem = ""
        code = _OK
        if meta_len:
            meta_t = torch.empty(meta_len, dtype=torch.uint8, device=comm.device)
            _wait(comm.broadcast(meta_t, self.src_rank))
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
            code = _MISMATCH
        ep._status(code, problem, stats)
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
            _wait(works[slot])
            if k + 1 < len(layout.buckets) and nbuf > 1:
                post(k + 1)  # the other buffer is free: its load_weights ran already (stream-ordered on GPU)
            if error is None:
                flat = bufs[slot][:bucket.nbytes].view(bucket.dtype)
                pairs = []
                for i in bucket.members:
                    spec = layout.tensors[i]
                    target = _map_name(self.name_map, spec.name)
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
            ep._status(_LOAD_FAILED if error is not None else _OK, message, stats)
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
            text += f"; name_map: {_describe_map(self.name_map)}]"
        return text


# ---------------------------------------------------------------------------------------------------------------------
# load_weights for a plain torch module
# ---------------------------------------------------------------------------------------------------------------------
class ModuleWeightLoader:
    """``load_weights`` for a plain torch module: copies each (name, tensor) into the parameter or buffer of that
    name, bit for bit. A name the module lacks, or a shape or dtype that differs, raises MemmgrInputError naming the
    tensor and both shapes and dtypes; nothing is cast."""

    def __init__(self, module: torch.nn.Module, *, include_buffers: bool = True):
        if not isinstance(module, torch.nn.Module):
            raise MemmgrInputError(f"ModuleWeightLoader takes a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self._targets: dict[str, torch.Tensor] = dict(module.named_parameters())
        if include_buffers:
            for n, b in module.named_buffers():
                if b is not None:
                    self._targets.setdefault(n, b)
        self.loaded: set[str] = set()

    def expected(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Engine name -> (shape, dtype) of every tensor this loader can fill."""
        return {n: (tuple(t.shape), t.dtype) for n, t in self._targets.items()}

    def missing(self) -> list[str]:
        """Engine tensors no sync has filled yet."""
        return [n for n in self._targets if n not in self.loaded]

    def __call__(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        with torch.no_grad():
            for name, tensor in weights:
                target = self._targets.get(name)
                if target is None:
                    close = difflib.get_close_matches(name, list(self._targets), n=3)
                    raise MemmgrInputError(
                        f"load_weights: {type(self.module).__name__} has no parameter or buffer {name!r} (received "
                        f"shape {tuple(tensor.shape)}, {tensor.dtype}){'; closest: ' + str(close) if close else ''}. "
                        f"Fix the name_map so trainer names map onto the engine's names")
                if tuple(target.shape) != tuple(tensor.shape) or target.dtype != tensor.dtype:
                    raise MemmgrInputError(
                        f"load_weights: tensor {name!r} arrived as shape {tuple(tensor.shape)}, {tensor.dtype} but the "
                        f"engine's {name!r} is shape {tuple(target.shape)}, {target.dtype}; nothing is cast or "
                        f"reshaped. Build the engine with the trainer's architecture and dtype, or fix the name_map")
                if target.numel() and target.untyped_storage().nbytes() == 0:
                    raise MemmgrStateError(f"load_weights: engine tensor {name!r} (shape {tuple(target.shape)}) has "
                                           f"no storage: it is offloaded. Onload the engine's weights before the sync")
                target.copy_(tensor)
                self.loaded.add(name)


def module_load_weights(module: torch.nn.Module, *, include_buffers: bool = True) -> ModuleWeightLoader:
    """A ready ``load_weights`` for a plain torch module (see ModuleWeightLoader)."""
    return ModuleWeightLoader(module, include_buffers=include_buffers)


__all__ = ["WeightSender", "WeightReceiver", "SyncGroup", "init_sync_group", "SyncLayout", "SyncStats", "TensorSpec",
           "BucketSpec", "ModuleWeightLoader", "module_load_weights", "MemmgrSyncError", "device_uuid",
           "SAME_GPU_HINT", "PROTOCOL_VERSION"]
