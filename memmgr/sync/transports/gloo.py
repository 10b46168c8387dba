"""The gloo transport: buckets broadcast over a gloo group of their own, for CPU engines and tests (the mechanism is
``memmgr.sync.transports.collective``)."""
from __future__ import annotations

from memmgr.sync.comm import SyncGroup
from memmgr.sync.transports.collective import CollectiveReceiver, CollectiveTransport
from memmgr.sync.transports.collective import connect as _connect_backend


def connect(master_address: str, master_port: int, world_size: int, rank: int, *,
            timeout_s: float = 120.0, prefix: str = "memmgr_gloo") -> SyncGroup:
    """Joins the gloo group of a weight sync: rank 0 (the trainer) hosts the TCP store at ``master_address:port``,
    ranks 1..world_size-1 are engine workers. Blocks until every rank joined or ``timeout_s`` passed."""
    return _connect_backend(master_address, master_port, world_size, rank, backend="gloo", timeout_s=timeout_s,
                            prefix=prefix)


class GlooTransport(CollectiveTransport):
    """Trainer side (rank 0) over gloo: CPU buckets (see CollectiveTransport)."""

    name = "gloo"
    backend = "gloo"


class GlooReceiver(CollectiveReceiver):
    """Engine-worker side (rank >= 1) over gloo: buckets received into CPU memory (see CollectiveReceiver)."""

    backend = "gloo"


__all__ = ["GlooTransport", "GlooReceiver", "connect"]
