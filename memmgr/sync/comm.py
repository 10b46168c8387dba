"""Process groups for weight sync and the few collectives the protocol needs."""
from __future__ import annotations

import datetime
import logging
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from memmgr.errors import MemmgrInputError, MemmgrSyncError
from memmgr.sync.protocol import SAME_GPU_HINT

logger = logging.getLogger("memmgr")

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


class Comm:
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
            raise translate_error(exc) from exc

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
            raise translate_error(exc) from exc


def translate_error(exc: Exception) -> Exception:
    text = str(exc)
    if "Duplicate GPU" in text or "duplicate GPU" in text:
        return MemmgrSyncError(f"two ranks of the weight-sync group are on one GPU ({text.strip()[:200]}). "
                               f"{SAME_GPU_HINT}")
    return exc


def wait_work(work: Any) -> None:
    try:
        work.wait()
    except Exception as exc:
        raise translate_error(exc) from exc


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
