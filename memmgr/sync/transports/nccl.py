"""The NCCL transport: buckets broadcast over an NCCL group of their own, from a trainer rank to the engine workers
on other GPUs (the mechanism is ``memmgr.sync.transports.collective``).

NCCL refuses two ranks of one communicator on the same GPU, so ``connect`` compares the ranks' device UUIDs through
the group's store before the first collective (``memmgr.sync.comm.check_distinct_gpus``) and raises
``MemmgrSyncError`` saying so (an engine on the trainer's own GPU takes the CUDA IPC transport,
``memmgr.sync.transports.ipc``). Buckets are on the current GPU of each rank: the export stages them there, also when
it reads the trainer's pinned host copy.
"""
from __future__ import annotations

import torch

from memmgr.errors import MemmgrSyncError
from memmgr.sync.comm import SyncGroup, check_distinct_gpus, device_uuid
from memmgr.sync.transports.collective import CollectiveReceiver, CollectiveTransport
from memmgr.sync.transports.collective import connect as _connect_backend


def connect(master_address: str, master_port: int, world_size: int, rank: int, *,
            timeout_s: float = 300.0, prefix: str = "memmgr_nccl") -> SyncGroup:
    """Joins the NCCL group of a weight sync (rank 0: the trainer, on its current GPU; ranks 1..world_size-1: engine
    workers, each on its own current GPU), after checking that no two ranks share a GPU."""
    group = _connect_backend(master_address, master_port, world_size, rank, backend="nccl", timeout_s=timeout_s,
                             prefix=prefix)
    mine = device_uuid(torch.device("cuda", torch.cuda.current_device()))
    try:
        check_distinct_gpus(group.store, rank, range(1, world_size) if rank == 0 else [0], mine, key=prefix,
                            what="NCCL weight sync",
                            advice="; or use memmgr.sync.transports.ipc for an engine on this GPU")
    except MemmgrSyncError:
        group.close()
        raise
    return group


class NcclTransport(CollectiveTransport):
    """Trainer side (rank 0) over NCCL: buckets on the trainer's current GPU (see CollectiveTransport)."""

    name = "nccl"
    backend = "nccl"


class NcclReceiver(CollectiveReceiver):
    """Engine-worker side (rank >= 1) over NCCL: buckets received into this worker's current GPU."""

    backend = "nccl"


__all__ = ["NcclTransport", "NcclReceiver", "connect"]
