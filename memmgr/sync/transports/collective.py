"""Broadcast transports: buckets broadcast over a torch.distributed group of their own, gloo (CPU engines and
tests, ``memmgr.sync.transports.gloo``) or NCCL (an engine on another GPU, ``memmgr.sync.transports.nccl``).

The trainer is rank ``src_rank`` (0 by default) of the group (``CollectiveTransport``); every other rank is an
engine worker (``CollectiveReceiver``), each getting every bucket. The group is made by ``connect`` (through
``memmgr.sync.comm.init_sync_group``) on a TCP store that the trainer hosts, so it does not touch the default
torch.distributed group of either side (vLLM has one of its own). Buckets live where the backend moves them: CPU
memory for gloo, the current GPU for NCCL. Every byte goes through ``memmgr.sync.comm.Comm.broadcast``.

A bucket's layout reaches the receivers through a control channel (``announce``: for vLLM, its ``update_weights``
RPC, which runs while the broadcast is in flight), or in-band: a length and the JSON layout broadcast before the data
(``send_control``/``receive_control``, which also carry a caller's own messages), or not at all where the receivers
know it already (``layout_in_band=False``: the name -> tensor front end sends the whole sync's plan first).
``exchange_status`` is the status all-reduce: every rank reports, and if one failed every rank raises its message.
"""
from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch

from memmgr.errors import MemmgrInputError, MemmgrSyncError, MemmgrSyncTimeoutError
from memmgr.sync.comm import (
    STATUS_OK,
    Comm,
    SyncGroup,
    group_device,
    init_sync_group,
    report_status,
    translate_error,
)
from memmgr.sync.transports.base import Transport, WeightBucket

logger = logging.getLogger("memmgr")

Announce = Callable[[dict[str, Any]], Any]
_POLL_S = 0.002


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
        raise translate_error(exc, step=f"joining the group at {master_address}:{master_port}", rank=rank,
                         peers=who, backend=backend) from exc


def _peers_of(group: SyncGroup, src: int) -> str:
    ranks = [r for r in range(group.world_size) if r != src]
    if len(ranks) == 1:
        return f"engine worker rank {ranks[0]}"
    return f"engine worker ranks {ranks[0]}..{ranks[-1]}" if ranks == list(range(ranks[0], ranks[-1] + 1)) else \
        f"engine worker ranks {ranks}"


def _send_json(comm: Comm, src: int, obj: Any, device: torch.device, wait: Callable[[Any, str], None],
               head_step: str, step: str) -> None:
    data = json.dumps(obj).encode()
    head = torch.tensor([len(data)], dtype=torch.int64, device=device)
    wait(comm.broadcast(head, src), head_step)
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    wait(comm.broadcast(raw, src), step)


def _receive_json(comm: Comm, src: int, device: torch.device, wait: Callable[[Any, str], None], head_step: str,
                  step: str) -> Any:
    head = torch.zeros(1, dtype=torch.int64, device=device)
    wait(comm.broadcast(head, src), head_step)
    raw = torch.empty(int(head.item()), dtype=torch.uint8, device=device)
    wait(comm.broadcast(raw, src), step)
    return json.loads(bytes(raw.cpu().numpy().tobytes()).decode())


class CollectiveTransport(Transport):
    """Trainer side (rank ``src_rank``, 0 by default): broadcasts each bucket's bytes to every engine worker of
    ``group``.

    With ``announce``, ``send_bucket`` calls ``announce(describe(bucket))`` on a helper thread while the broadcast
    is in flight and returns when both are done; if the control call fails first, the broadcast is abandoned and the
    failure raised (the group is then unusable: reconnect). Without it, each bucket's layout is broadcast before its
    data unless ``layout_in_band`` is False (the receivers know it from a message of the caller's). ``timeout_s``
    bounds each bucket.
    """

    name = "collective"
    backend = "gloo"

    def __init__(self, group: SyncGroup, *, announce: Announce | None = None, timeout_s: float | None = None,
                 src_rank: int = 0, layout_in_band: bool = True):
        kind = type(self).__name__
        if not isinstance(group, SyncGroup) or group.backend_name != self.backend:
            raise MemmgrInputError(f"{kind} takes a {self.backend} SyncGroup from "
                                   f"memmgr.sync.transports.{self.backend}.connect() (or init_sync_group(..., "
                                   f"backend={self.backend!r}))")
        if group.rank != src_rank:
            raise MemmgrInputError(f"{kind} runs on rank {src_rank} of the sync group (the trainer), this process is "
                                   f"rank {group.rank}; engine workers use the matching receiver")
        self.group = group
        self.src_rank = src_rank
        self.comm = Comm(group)
        self.device = group_device(self.backend)
        self.announce = announce
        self.layout_in_band = layout_in_band
        self.timeout_s = float(timeout_s) if timeout_s is not None else group.timeout.total_seconds()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"memmgr-{self.backend}-announce")
        self._broken: str | None = None
        self.buckets = 0
        self.nbytes = 0

    @property
    def peers(self) -> str:
        return _peers_of(self.group, self.src_rank)

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
                raise MemmgrSyncError(f"{self.backend} weight sync: the engine failed during {step} "
                                      f"({type(exc).__name__}: "
                                      f"{str(exc)[:500]}); the data broadcast was abandoned, so the group is "
                                      f"unusable: reconnect before the next sync") from exc
            if work.is_completed():
                try:
                    work.wait()
                except Exception as exc:
                    self._broken = f"{step} failed"
                    raise translate_error(exc, step=step, rank=self.src_rank, peers=self.peers,
                                     backend=self.backend) from exc
                return
            if time.monotonic() > deadline:
                self._broken = f"{step} timed out"
                raise MemmgrSyncTimeoutError(f"{self.backend} weight sync: {step} did not complete within "
                                             f"{self.timeout_s:.0f} s "
                                             f"on rank {self.src_rank} waiting for {self.peers}; the engine worker is "
                                             f"gone or stuck. Reconnect before the next sync")
            time.sleep(_POLL_S)

    def send_control(self, message: Any, step: str = "a control message") -> None:
        """Broadcasts ``message`` (JSON-able) to the engine workers: their ``receive_control()`` returns it."""
        self._check_usable()
        _send_json(self.comm, self.src_rank, message, self.device, lambda w, st: self._wait(w, None, st),
                   f"{step} header", step)

    def exchange_status(self, code: int = STATUS_OK, message: str = "") -> None:
        """The status all-reduce (``memmgr.sync.comm.report_status``): raises on every rank if any rank failed."""
        report_status(self.comm, code, message, src=self.src_rank)

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
        elif self.layout_in_band:
            _send_json(self.comm, self.src_rank, bucket.meta(), self.device,
                       lambda w, st: self._wait(w, None, st), f"{step} header", f"{step} layout")
        self._wait(self.comm.broadcast(bucket.flat, self.src_rank), control, step)
        if control is not None:
            remaining = max(1.0, self.timeout_s)
            try:
                control.result(timeout=remaining)
            except TimeoutError as exc:
                self._broken = f"{step}: the engine did not confirm"
                raise MemmgrSyncTimeoutError(f"{self.backend} weight sync: the engine did not confirm {step} within "
                                             f"{remaining:.0f} s after the data arrived ({self.peers})") from exc
            except Exception as exc:
                raise MemmgrSyncError(f"{self.backend} weight sync: the engine failed to load {step} "
                                      f"({type(exc).__name__}: {str(exc)[:500]})") from exc
        self.buckets += 1
        self.nbytes += bucket.payload_bytes

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self.group.close()
        self._broken = self._broken or "closed"


class CollectiveReceiver:
    """Engine-worker side (any rank but ``src_rank``): receives buckets broadcast by the trainer into one reused
    buffer.

    ``receive(meta)`` returns the bucket that ``meta`` (a ``WeightBucket.meta()`` that came over the control
    channel) describes; ``receive()`` reads the layout in-band first. With ``reuse_buffer`` the returned bucket
    aliases one buffer that the next ``receive`` overwrites (load, i.e. copy, it before); without, each bucket gets
    memory of its own (for loaders that keep views until later buckets arrive, like vLLM's layerwise reload).
    """

    backend = "gloo"

    def __init__(self, group: SyncGroup, *, reuse_buffer: bool = True, src_rank: int = 0):
        kind = type(self).__name__
        if not isinstance(group, SyncGroup) or group.backend_name != self.backend:
            raise MemmgrInputError(f"{kind} takes a {self.backend} SyncGroup from "
                                   f"memmgr.sync.transports.{self.backend}.connect()")
        if group.rank == src_rank:
            raise MemmgrInputError(f"{kind} runs on an engine worker (rank >= 1); rank {src_rank} is the trainer's "
                                   f"transport" if src_rank == 0 else
                                   f"{kind} runs on an engine worker; rank {src_rank} is the trainer's transport")
        self.group = group
        self.src_rank = src_rank
        self.comm = Comm(group)
        self.reuse_buffer = reuse_buffer
        self.device = group_device(self.backend)
        self._buffer = torch.empty(0, dtype=torch.uint8, device=self.device)

    def _wait(self, work: Any, step: str) -> None:
        try:
            work.wait()
        except Exception as exc:
            raise translate_error(exc, step=step, rank=self.group.rank, peers=f"the trainer (rank {self.src_rank})",
                             backend=self.backend) from exc

    def receive_control(self) -> Any:
        """The message the trainer's ``send_control`` broadcast."""
        return _receive_json(self.comm, self.src_rank, self.device, self._wait, "receiving a control message header",
                             "receiving a control message")

    def exchange_status(self, code: int = STATUS_OK, message: str = "") -> None:
        """The status all-reduce (``memmgr.sync.comm.report_status``): raises on every rank if any rank failed."""
        report_status(self.comm, code, message, src=self.src_rank)

    def receive(self, meta: dict[str, Any] | None = None) -> WeightBucket:
        if meta is None:
            meta = _receive_json(self.comm, self.src_rank, self.device, self._wait, "receiving a bucket header",
                                 "receiving a bucket layout")
        dtype, numel, _ = WeightBucket.layout_from_meta(meta)
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        if not self.reuse_buffer:
            flat = torch.empty(numel, dtype=dtype, device=self.device)
        else:
            if self._buffer.numel() < nbytes:
                self._buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            flat = self._buffer[:nbytes].view(dtype)
        self._wait(self.comm.broadcast(flat, self.src_rank), f"receiving a {dtype} bucket of {nbytes} B")
        return WeightBucket.from_meta(meta, flat)

    def close(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.uint8, device=self.device)
        self.group.close()


__all__ = ["CollectiveTransport", "CollectiveReceiver", "connect"]
