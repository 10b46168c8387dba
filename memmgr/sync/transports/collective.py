"""Broadcast transports: buckets broadcast over a torch.distributed group of their own, gloo (CPU engines and
tests, ``memmgr.sync.transports.gloo``) or NCCL (an engine on another GPU, ``memmgr.sync.transports.nccl``).

Rank 0 of the group is the trainer (``CollectiveTransport``); ranks 1..N are engine workers
(``CollectiveReceiver``), each getting every bucket. The group is made by ``memmgr.sync.init_sync_group`` on a TCP
store that the trainer hosts, so it does not touch the default torch.distributed group of either side (vLLM has one
of its own). Buckets live where the backend moves them: CPU memory for gloo, the current GPU for NCCL.

A bucket's layout reaches the receivers either through a control channel (``announce``: for vLLM, its
``update_weights`` RPC, which runs while the broadcast is in flight) or, without one, in-band: a length and the
JSON layout are broadcast before the data.
"""
from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch
import torch.distributed as dist

from memmgr.errors import MemmgrInputError, MemmgrSyncError, MemmgrSyncTimeoutError
from memmgr.sync import SyncGroup, init_sync_group
from memmgr.sync.transports.base import Transport, WeightBucket

logger = logging.getLogger("memmgr")

Announce = Callable[[dict[str, Any]], Any]
_POLL_S = 0.002


def _translate(exc: BaseException, *, step: str, rank: int, peers: str, backend: str = "gloo") -> MemmgrSyncError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    low = text.lower()
    if "timed out" in low or "timeout" in low:
        return MemmgrSyncTimeoutError(f"{backend} weight sync: {step} timed out on rank {rank} waiting for {peers} "
                                      f"({text[:300]}). The engine worker is gone or stuck; check its log, then "
                                      f"reconnect (a new transport) before the next sync")
    return MemmgrSyncError(f"{backend} weight sync: {step} failed on rank {rank} with {peers} ({type(exc).__name__}: "
                           f"{text[:300]}). The group is unusable; reconnect before the next sync")


def connect(master_address: str, master_port: int, world_size: int, rank: int, *, backend: str = "gloo",
            timeout_s: float = 120.0, prefix: str | None = None) -> SyncGroup:
    """Joins the ``backend`` group of a weight sync: rank 0 (the trainer) hosts the TCP store at
    ``master_address:port``, ranks 1..world_size-1 are engine workers. Blocks until every rank joined or
    ``timeout_s`` passed."""
    try:
        return init_sync_group(f"tcp://{master_address}:{int(master_port)}", world_size, rank, backend=backend,
                               timeout=timeout_s, prefix=prefix or f"memmgr_{backend}")
    except MemmgrSyncError:
        raise
    except MemmgrInputError:
        raise
    except Exception as exc:  # the store or the mesh did not come up
        who = "the engine workers (ranks 1..%d)" % (world_size - 1) if rank == 0 else "the trainer (rank 0)"
        raise _translate(exc, step=f"joining the group at {master_address}:{master_port}", rank=rank,
                         peers=who, backend=backend) from exc


def _broadcast(group: SyncGroup, tensor: torch.Tensor) -> Any:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    return group.backend.broadcast([tensor], opts)


def _group_device(backend: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


class CollectiveTransport(Transport):
    """Trainer side (rank 0): broadcasts each bucket's bytes to every engine worker of ``group``.

    With ``announce``, ``send_bucket`` calls ``announce(describe(bucket))`` on a helper thread while the broadcast
    is in flight and returns when both are done; if the control call fails first, the broadcast is abandoned and the
    failure raised (the group is then unusable: reconnect). ``timeout_s`` bounds each bucket.
    """

    name = "collective"
    backend = "gloo"

    def __init__(self, group: SyncGroup, *, announce: Announce | None = None, timeout_s: float | None = None):
        kind = type(self).__name__
        if not isinstance(group, SyncGroup) or group.backend_name != self.backend:
            raise MemmgrInputError(f"{kind} takes a {self.backend} SyncGroup from "
                                   f"memmgr.sync.transports.{self.backend}.connect() (or init_sync_group(..., "
                                   f"backend={self.backend!r}))")
        if group.rank != 0:
            raise MemmgrInputError(f"{kind} runs on rank 0 of the sync group (the trainer), this process is "
                                   f"rank {group.rank}; engine workers use the matching receiver")
        self.group = group
        self.device = _group_device(self.backend)
        self.announce = announce
        self.timeout_s = float(timeout_s) if timeout_s is not None else group.timeout.total_seconds()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"memmgr-{self.backend}-announce")
        self._broken: str | None = None
        self.buckets = 0
        self.nbytes = 0

    @property
    def peers(self) -> str:
        n = self.group.world_size - 1
        return "engine worker rank 1" if n == 1 else f"engine worker ranks 1..{n}"

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise MemmgrSyncError(f"{self.backend} weight sync: the transport is unusable after an earlier failure "
                                  f"({self._broken}); reconnect before the next sync")

    def _wait(self, work: Any, control: Future | None, step: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            if control is not None and control.done() and control.exception() is not None:
                exc = control.exception()
                self._broken = f"the engine's control call failed during {step}"
                raise MemmgrSyncError(f"{self.backend} weight sync: the engine failed during {step} ({type(exc).__name__}: "
                                      f"{str(exc)[:500]}); the data broadcast was abandoned, so the group is "
                                      f"unusable: reconnect before the next sync") from exc
            if work.is_completed():
                try:
                    work.wait()
                except Exception as exc:
                    self._broken = f"{step} failed"
                    raise _translate(exc, step=step, rank=0, peers=self.peers, backend=self.backend) from exc
                return
            if time.monotonic() > deadline:
                self._broken = f"{step} timed out"
                raise MemmgrSyncTimeoutError(f"{self.backend} weight sync: {step} did not complete within {self.timeout_s:.0f} s "
                                             f"on rank 0 waiting for {self.peers}; the engine worker is gone or "
                                             f"stuck. Reconnect before the next sync")
            time.sleep(_POLL_S)

    def send_bucket(self, bucket: WeightBucket) -> None:
        self._check_usable()
        step = f"bucket {self.buckets} ({bucket.dtype}, {bucket.nbytes} B)"
        if bucket.flat.device != self.device:
            raise MemmgrInputError(f"{type(self).__name__}: {step} is on {bucket.flat.device}; {self.backend} sends "
                                   f"tensors on {self.device} (gloo: CPU buckets; NCCL: buckets on this rank's "
                                   f"current GPU; the IPC transport for an engine on the same GPU)")
        control = None
        if self.announce is not None:
            control = self._pool.submit(self.announce, self.describe(bucket))
        else:
            meta = json.dumps(bucket.meta()).encode()
            head = torch.tensor([len(meta)], dtype=torch.int64, device=self.device)
            self._wait(_broadcast(self.group, head), None, f"{step} header")
            raw = torch.frombuffer(bytearray(meta), dtype=torch.uint8).to(self.device)
            self._wait(_broadcast(self.group, raw), None, f"{step} layout")
        self._wait(_broadcast(self.group, bucket.flat), control, step)
        if control is not None:
            remaining = max(1.0, self.timeout_s)
            try:
                control.result(timeout=remaining)
            except TimeoutError as exc:
                self._broken = f"{step}: the engine did not confirm"
                raise MemmgrSyncTimeoutError(f"{self.backend} weight sync: the engine did not confirm {step} within "
                                             f"{remaining:.0f} s after the data arrived ({self.peers})") from exc
            except Exception as exc:
                raise MemmgrSyncError(f"{self.backend} weight sync: the engine failed to load {step} ({type(exc).__name__}: "
                                      f"{str(exc)[:500]})") from exc
        self.buckets += 1
        self.nbytes += bucket.payload_bytes

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self.group.close()
        self._broken = self._broken or "closed"


class CollectiveReceiver:
    """Engine-worker side (rank >= 1): receives buckets broadcast by rank 0 into one reused buffer.

    ``receive(meta)`` returns the bucket that ``meta`` (a ``WeightBucket.meta()`` that came over the control
    channel) describes; ``receive()`` reads the layout in-band first. With ``reuse_buffer`` the returned bucket
    aliases one buffer that the next ``receive`` overwrites (load, i.e. copy, it before); without, each bucket gets
    memory of its own (for loaders that keep views until later buckets arrive, like vLLM's layerwise reload).
    """

    backend = "gloo"

    def __init__(self, group: SyncGroup, *, reuse_buffer: bool = True):
        kind = type(self).__name__
        if not isinstance(group, SyncGroup) or group.backend_name != self.backend:
            raise MemmgrInputError(f"{kind} takes a {self.backend} SyncGroup from "
                                   f"memmgr.sync.transports.{self.backend}.connect()")
        if group.rank == 0:
            raise MemmgrInputError(f"{kind} runs on an engine worker (rank >= 1); rank 0 is the trainer's transport")
        self.group = group
        self.reuse_buffer = reuse_buffer
        self.device = _group_device(self.backend)
        self._buffer = torch.empty(0, dtype=torch.uint8, device=self.device)

    def _wait(self, work: Any, step: str) -> None:
        try:
            work.wait()
        except Exception as exc:
            raise _translate(exc, step=step, rank=self.group.rank, peers="the trainer (rank 0)",
                             backend=self.backend) from exc

    def receive(self, meta: dict[str, Any] | None = None) -> WeightBucket:
        if meta is None:
            head = torch.zeros(1, dtype=torch.int64, device=self.device)
            self._wait(_broadcast(self.group, head), "receiving a bucket header")
            raw = torch.empty(int(head.item()), dtype=torch.uint8, device=self.device)
            self._wait(_broadcast(self.group, raw), "receiving a bucket layout")
            meta = json.loads(bytes(raw.cpu().numpy().tobytes()).decode())
        dtype, numel, _ = WeightBucket.layout_from_meta(meta)
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        if not self.reuse_buffer:
            flat = torch.empty(numel, dtype=dtype, device=self.device)
        else:
            if self._buffer.numel() < nbytes:
                self._buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            flat = self._buffer[:nbytes].view(dtype)
        self._wait(_broadcast(self.group, flat), f"receiving a {dtype} bucket of {nbytes} B")
        return WeightBucket.from_meta(meta, flat)

    def close(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.uint8, device=self.device)
        self.group.close()


__all__ = ["CollectiveTransport", "CollectiveReceiver", "connect"]
