"""What sender and receiver share: the group, the status exchange and the device handshake."""
from __future__ import annotations

from typing import Any

import torch

from memmgr.errors import MemmgrInputError, MemmgrSyncError
from memmgr.sync.comm import Comm, device_uuid, wait_work
from memmgr.sync.layout import SyncStats
from memmgr.sync.protocol import MESSAGE_BYTES, SAME_GPU_HINT, STATUS_MISMATCH, STATUS_OK


class Endpoint:
    """What sender and receiver share: the group, the status exchange and the device handshake."""

    def __init__(self, group: Any, src_rank: int, *, store: Any, device_uuid_override: str | None, tag: str):
        self.comm = Comm(group, store)
        if not (0 <= src_rank < self.comm.size):
            raise MemmgrInputError(f"weight sync: src_rank {src_rank} is outside the group of {self.comm.size} "
                                   f"ranks; src_rank is the sender's rank inside the sync group")
        self.src_rank = src_rank
        self._uuid_override = device_uuid_override
        self._tag = tag
        self._handshaken = False

    @property
    def rank(self) -> int:
        return self.comm.rank

    def my_uuid(self, device: torch.device | None) -> str:
        return self._uuid_override if self._uuid_override is not None else device_uuid(device)

    def handshake(self, device: torch.device | None) -> None:
        """Exchanges device UUIDs through the group's store before the first collective (NCCL would fail on a
        duplicate GPU with a far less helpful message, or hang)."""
        if self._handshaken:
            return
        self._handshaken = True
        store = self.comm.store
        if store is None:
            return
        mine = self.my_uuid(device)
        key = f"{self._tag}/uuid/"
        store.set(key + str(self.rank), mine)
        if self.rank == self.src_rank:
            peers = [r for r in range(self.comm.size) if r != self.src_rank]
        else:
            peers = [self.src_rank]
        for r in peers:
            theirs = store.get(key + str(r)).decode()
            if mine and theirs and mine == theirs:
                raise MemmgrSyncError(f"weight sync: rank {self.rank} and rank {r} of the sync group are on the same "
                                      f"GPU (UUID {mine}). {SAME_GPU_HINT}")

    def report_status(self, code: int, message: str, stats: SyncStats) -> None:
        """All ranks report a status; if any failed, every rank raises with the failing rank's message."""
        dev = self.comm.device
        flag = torch.tensor([code, (self.rank + 1) if code else 0], dtype=torch.int64, device=dev)
        self.comm.allreduce_max(flag)
        worst, who = (int(v) for v in flag.cpu())
        if worst == STATUS_OK:
            return
        who -= 1
        buf = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8, device=dev)
        if who == self.rank:
            data = (message or "unknown error").encode()[:MESSAGE_BYTES]
            buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
        wait_work(self.comm.broadcast(buf, who))
        text = bytes(buf.cpu().numpy().tobytes()).rstrip(b"\0").decode(errors="replace")
        side = "sender" if who == self.src_rank else "receiver"
        if who == self.rank:
            raise MemmgrSyncError(text) if worst != STATUS_MISMATCH else MemmgrInputError(text)
        cls = MemmgrInputError if worst == STATUS_MISMATCH else MemmgrSyncError
        raise cls(f"weight sync failed on the {side} (rank {who} of the sync group): {text}")
