"""The weight sync's process groups and its collectives: the one module that calls torch.distributed.

- ``SyncGroup`` / ``init_sync_group``: a group of its own for a sync, independent of torch's default group
  (``as_sync_group`` wraps a torch.distributed group instead);
- ``Comm``: ``broadcast`` and ``allreduce_max`` over a SyncGroup (the bucket-stream transports and the
  name -> tensor front ends move every byte through it);
- ``report_status``: the status all-reduce, so that every rank of a group learns that one of them failed, and why;
- ``check_distinct_gpus``: the ranks' device UUIDs compared through the group's store before the first collective
  (NCCL refuses two ranks of one communicator on one GPU, with a far less helpful message, or hangs);
- ``translate_error``: a torch.distributed error turned into a ``MemmgrSyncError`` naming the step, rank and peers.
"""
from __future__ import annotations

import datetime
import logging
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from memmgr.errors import (
    MemmgrInputError,
    MemmgrSyncError,
    MemmgrSyncMismatchError,
    MemmgrSyncTimeoutError,
)

logger = logging.getLogger("memmgr")

SAME_GPU_HINT = ("NCCL refuses two ranks of one communicator on the same GPU, so an engine cannot receive weights "
                 "from a trainer rank on its own GPU. Place the engine on another GPU: e.g. reverse placement, where "
                 "trainer rank i feeds the engine on GPU (i + 1) % n")

MESSAGE_BYTES = 4096    # fixed size of the error message a failing rank broadcasts to the others

# status codes of ``report_status`` (all-reduced with MAX, so any failure wins)
STATUS_OK = 0
STATUS_ABORT = 1        # the sender failed before sending weights (e.g. its weights were discarded)
STATUS_MISMATCH = 2     # a receiver does not hold what the sender is about to send
STATUS_LOAD_FAILED = 3  # load_weights raised on a receiver

_DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)  # torch.distributed's default for a group


@dataclass
class SyncGroup:
    """A process group for weight sync: made by ``init_sync_group`` (a group of its own) or ``as_sync_group``."""
    backend: Any          # a torch.distributed Backend (ProcessGroupNCCL / ProcessGroupGloo) or ProcessGroup
    backend_name: str
    rank: int
    world_size: int
    store: Any            # the c10d Store it was built on (the device handshake), None for a torch group
    timeout: datetime.timedelta
    owned: bool = True    # made by init_sync_group: close() releases it

    def close(self) -> None:
        """Releases the communicator (NCCL) where torch offers a way to; a wrapped torch group is left alone."""
        if not self.owned:
            return
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
    (the trainer rank and each engine process) calls this with its own rank; ``timeout`` (seconds) bounds every
    collective and the store handshake, so a missing peer raises instead of hanging.
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


def as_sync_group(group: Any, store: Any = None) -> SyncGroup:
    """``group`` as a SyncGroup: a SyncGroup itself, or a torch.distributed group (None: the default group), which
    this process must be a member of. ``store`` (a c10d Store) enables ``check_distinct_gpus`` on a torch group."""
    if isinstance(group, SyncGroup):
        return group
    if not dist.is_initialized():
        raise MemmgrInputError("weight sync: no process group given and torch.distributed is not initialized; pass "
                               "a group from init_sync_group() or dist.new_group()")
    pg = group if group is not None else dist.group.WORLD
    rank = dist.get_rank(pg)
    if rank < 0:
        raise MemmgrInputError("weight sync: this process is not a member of the process group it was given")
    timeout = getattr(getattr(pg, "options", None), "_timeout", None) or _DEFAULT_TIMEOUT
    return SyncGroup(pg, str(dist.get_backend(pg)).lower(), rank, dist.get_world_size(pg), store, timeout,
                     owned=False)


class Comm:
    """``broadcast`` and ``allreduce_max`` over a SyncGroup or a torch.distributed group (``as_sync_group``);
    ``count`` counts the collectives this side took part in."""

    def __init__(self, group: Any, store: Any = None):
        self.group = as_sync_group(group, store)
        self.rank, self.size = self.group.rank, self.group.world_size
        self.backend = self.group.backend_name
        self.store = store if store is not None else self.group.store
        self.count = 0

    @property
    def device(self) -> torch.device:
        """Where this backend's tensors live: this rank's current GPU for NCCL, else the CPU."""
        return group_device(self.backend)

    def broadcast(self, tensor: torch.Tensor, src: int) -> Any:
        """Starts a broadcast of ``tensor`` from group rank ``src``; returns its work (``wait()`` it)."""
        self.count += 1
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        try:
            return self.group.backend.broadcast([tensor], opts)
        except Exception as exc:
            raise translate_error(exc) from exc

    def allreduce_max(self, tensor: torch.Tensor) -> None:
        self.count += 1
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        try:
            self.group.backend.allreduce([tensor], opts).wait()
        except Exception as exc:
            raise translate_error(exc) from exc


def group_device(backend: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")


def translate_error(exc: BaseException, *, step: str = "", rank: int | None = None, peers: str = "",
                    backend: str = "") -> Exception:
    """The exception to raise for ``exc`` from torch.distributed: a duplicate GPU gets the placement advice; with
    ``step`` given, a timeout becomes ``MemmgrSyncTimeoutError`` and anything else ``MemmgrSyncError``, naming the
    step, ``rank`` and ``peers``. Without ``step``, other errors are returned as they are."""
    text = str(exc)
    if "Duplicate GPU" in text or "duplicate GPU" in text:
        return MemmgrSyncError(f"two ranks of the weight-sync group are on one GPU ({text.strip()[:200]}). "
                               f"{SAME_GPU_HINT}")
    if not step:
        return exc if isinstance(exc, Exception) else MemmgrSyncError(text)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    low = first.lower()
    if "timed out" in low or "timeout" in low:
        return MemmgrSyncTimeoutError(f"{backend} weight sync: {step} timed out on rank {rank} waiting for {peers} "
                                      f"({first[:300]}). The engine worker is gone or stuck; check its log, then "
                                      f"reconnect (a new transport) before the next sync")
    return MemmgrSyncError(f"{backend} weight sync: {step} failed on rank {rank} with {peers} ({type(exc).__name__}: "
                           f"{first[:300]}). The group is unusable; reconnect before the next sync")


def wait_work(work: Any) -> None:
    try:
        work.wait()
    except Exception as exc:
        raise translate_error(exc) from exc


def report_status(comm: Comm, code: int, message: str, *, src: int) -> None:
    """The status all-reduce: every rank of ``comm`` reports ``code`` (``STATUS_*``); if any rank failed, every rank
    raises with the failing rank's ``message`` (a mismatch: ``MemmgrSyncMismatchError``, else ``MemmgrSyncError``).
    ``src`` is the sender's rank, to say on which side the failure was."""
    dev = comm.device
    flag = torch.tensor([code, (comm.rank + 1) if code else 0], dtype=torch.int64, device=dev)
    comm.allreduce_max(flag)
    worst, who = (int(v) for v in flag.cpu())
    if worst == STATUS_OK:
        return
    who -= 1
    buf = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8, device=dev)
    if who == comm.rank:
        data = (message or "unknown error").encode()[:MESSAGE_BYTES]
        buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
    wait_work(comm.broadcast(buf, who))
    text = bytes(buf.cpu().numpy().tobytes()).rstrip(b"\0").decode(errors="replace")
    cls = MemmgrSyncMismatchError if worst == STATUS_MISMATCH else MemmgrSyncError
    if who == comm.rank:
        raise cls(text)
    side = "sender" if who == src else "receiver"
    raise cls(f"weight sync failed on the {side} (rank {who} of the sync group): {text}")


def check_distinct_gpus(store: Any, rank: int, peers: Any, mine: str, *, key: str, what: str = "weight sync",
                        advice: str = "") -> None:
    """Publishes this rank's device UUID ``mine`` under ``key`` in ``store`` and raises ``MemmgrSyncError`` if one
    of ``peers`` (group ranks) is on the same GPU. Runs before the first collective."""
    store.set(f"{key}/uuid/{rank}", mine)
    for peer in peers:
        theirs = store.get(f"{key}/uuid/{peer}").decode()
        if mine and theirs == mine:
            raise MemmgrSyncError(f"{what}: rank {rank} and rank {peer} are on the same GPU (UUID {mine}). "
                                  f"{SAME_GPU_HINT}{advice}")


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
