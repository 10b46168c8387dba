"""A stand-in for the inference engine of a colocated RL loop: another process on the same GPU that takes the memory
the trainer freed and gives it back just before the trainer onloads.

That is the situation a trainer's onload meets in a real loop, and it differs from a pause in one process: right
after another process releases device memory, the driver is busy with it, and copies into newly allocated memory
can run slower than after a pause. ``EngineStandIn`` starts the helper once (``python -m memmgr.tools.engine_standin``)
and tells it, over its stdin, when to take memory and when to release it; each call returns once the helper
confirmed, so the caller's next step starts right after the release.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import torch

from memmgr.errors import MemmgrStateError

logger = logging.getLogger("memmgr")

_READY = "ready"


class EngineStandIn:
    """The helper process for one GPU. ``occupy(nbytes)`` makes it allocate and write ``nbytes`` (at most what is
    free, less ``headroom_bytes``); ``release()`` makes it free them and return them to the driver; ``cycle()`` does
    both. ``close()`` (or the context manager) ends it."""

    def __init__(self, device: torch.device, *, headroom_bytes: int = 2 << 30, timeout_s: float = 120.0):
        if device.type != "cuda":
            raise MemmgrStateError(f"the engine stand-in needs a CUDA device, got {device}")
        self.device = device
        self.headroom_bytes = int(headroom_bytes)
        self.timeout_s = timeout_s
        index = device.index if device.index is not None else torch.cuda.current_device()
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._proc = subprocess.Popen([sys.executable, "-m", "memmgr.tools.engine_standin", str(index)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._expect(_READY)
        self.last_occupied_bytes = 0

    def _send(self, line: str) -> str:
        if self._proc.poll() is not None:
            raise MemmgrStateError(f"the engine stand-in exited with code {self._proc.returncode}")
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()
        return self._read()

    def _read(self) -> str:
        reply = self._proc.stdout.readline().strip()
        if not reply:
            raise MemmgrStateError(f"the engine stand-in stopped answering (exit code {self._proc.poll()})")
        return reply

    def _expect(self, word: str) -> str:
        reply = self._read()
        if not reply.startswith(word):
            raise MemmgrStateError(f"the engine stand-in answered {reply!r}, expected {word!r}")
        return reply

    def occupy(self, nbytes: int | None = None) -> int:
        """Allocates and writes up to ``nbytes`` in the helper (None: all that is free less the headroom); returns
        the bytes it holds."""
        free = torch.cuda.mem_get_info(self.device)[0]
        want = free - self.headroom_bytes if nbytes is None else min(int(nbytes), free - self.headroom_bytes)
        reply = self._send(f"occupy {max(0, want)}")
        self.last_occupied_bytes = int(reply.split()[1])
        return self.last_occupied_bytes

    def release(self) -> None:
        """Frees what the helper holds and returns it to the driver; returns once that is done."""
        self._send("release")

    def cycle(self, nbytes: int | None = None) -> int:
        """``occupy`` then ``release``: an engine's generate phase in between the trainer's offload and onload."""
        held = self.occupy(nbytes)
        self.release()
        return held

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write("exit\n")
                self._proc.stdin.flush()
                self._proc.wait(timeout=self.timeout_s)
            except Exception:  # pragma: no cover - a stuck helper is killed
                self._proc.kill()

    def __enter__(self) -> "EngineStandIn":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve(index: int) -> None:
    """The helper's loop: one command per line on stdin, one answer per line on stdout."""
    torch.cuda.set_device(index)
    torch.empty(1, device="cuda")  # the CUDA context exists before the first command
    held: list[torch.Tensor] = []
    print(_READY, flush=True)
    chunk = 1 << 30
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "occupy":
            want = int(cmd[1])
            got = 0
            while got < want:
                n = min(chunk, want - got)
                # Only `held` refers to the blocks: a local name would keep the last one alive through release.
                try:
                    held.append(torch.empty(n, dtype=torch.uint8, device="cuda"))
                except torch.OutOfMemoryError:
                    break
                held[-1].fill_(1)  # the engine writes what it takes (weights, KV cache)
                got += n
            torch.cuda.synchronize()
            print(f"occupied {got}", flush=True)
        elif cmd[0] == "release":
            held.clear()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            print("released", flush=True)
        elif cmd[0] == "exit":
            break
        else:
            print(f"error unknown command {cmd[0]!r}", flush=True)
    time.sleep(0)


if __name__ == "__main__":
    _serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
