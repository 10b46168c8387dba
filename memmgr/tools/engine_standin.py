"""A stand-in for an inference engine that shares the GPU with the trainer: a helper process, started once, that takes
GPU memory and gives it back when told.

In a colocated RL loop the engine uses the memory the trainer freed and releases it just before the trainer onloads.
A release by another process leaves the GPU's copy engines busy for a few seconds (host->device copies run at about
half the link's speed meanwhile), which a pause in the trainer's own process does not reproduce. Benchmarks use this
to put every method under the same conditions::

    with EngineStandin(device=0) as engine:
        mgr.offload()
        engine.take(fraction=0.9)    # the engine's phase: allocates and writes 90% of the free memory
        engine.release()             # frees it and returns its cached blocks to the driver
        mgr.onload()                 # runs right after another process released its memory

The helper is a spawned process (CUDA cannot be forked) that keeps its CUDA context between phases, as an engine
does when it sleeps. Only torch is needed.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from typing import Any

import torch

from memmgr.errors import MemmgrInputError, MemmgrStateError

logger = logging.getLogger("memmgr")

_ALIGN = 2 << 20  # allocations are rounded down to whole 2 MiB pages


def _serve(conn: Any, device: int) -> None:
    """The helper's loop: one reply per command, ("ok", result) or ("error", text)."""
    try:
        torch.cuda.set_device(device)
        torch.zeros(1, device=f"cuda:{device}")  # creates the context now, not inside the first timed phase
        torch.cuda.synchronize(device)
        conn.send(("ok", {"pid": os.getpid(), "device": device}))
    except Exception as exc:  # reported to the parent, which raises
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    held: list[torch.Tensor] = []
    while True:
        try:
            command, args = conn.recv()
        except EOFError:  # the parent went away
            return
        try:
            if command == "take":
                nbytes, fraction, fill = args
                t0 = time.perf_counter()
                if nbytes is None:
                    free, _ = torch.cuda.mem_get_info(device)
                    nbytes = int(free * fraction)
                nbytes = max(_ALIGN, nbytes // _ALIGN * _ALIGN)
                # Only `held` refers to the block: a local name would keep it alive through release().
                held.append(torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{device}"))
                if fill:
                    held[-1].fill_(0x5A)  # an engine writes what it allocates (weights, KV cache)
                torch.cuda.synchronize(device)
                conn.send(("ok", {"bytes": nbytes, "seconds": time.perf_counter() - t0,
                                  "held_bytes": sum(b.numel() for b in held)}))
            elif command == "release":
                t0 = time.perf_counter()
                released = sum(b.numel() for b in held)
                held.clear()
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
                torch.cuda.synchronize(device)
                conn.send(("ok", {"bytes": released, "seconds": time.perf_counter() - t0,
                                  "released_at": time.time()}))
            elif command == "close":
                held.clear()
                torch.cuda.empty_cache()
                conn.send(("ok", {}))
                return
            else:
                conn.send(("error", f"unknown command {command!r}"))
        except Exception as exc:
            held.clear()
            torch.cuda.empty_cache()
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class EngineStandin:
    """A helper process on one GPU that takes GPU memory (``take``) and releases it (``release``) on command.

    ``take`` and ``release`` block until the helper has done it (allocated and written the memory; freed it and
    returned its cached blocks to the driver) and return what it reports: bytes, seconds, and for a release the wall
    time (``time.time()``) at which the memory was back with the driver.
    """

    def __init__(self, device: int | torch.device | None = None, start_timeout_s: float = 120.0,
                 reply_timeout_s: float = 300.0):
        if device is None:
            device = torch.cuda.current_device()
        if isinstance(device, torch.device):
            device = device.index if device.index is not None else torch.cuda.current_device()
        self.device = int(device)
        self._reply_timeout_s = reply_timeout_s
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, self.device), daemon=True,
                                 name="memmgr-engine-standin")
        self._proc.start()
        child.close()
        self.info = self._reply("start", start_timeout_s)
        logger.debug("engine stand-in started: %s", self.info)

    def _reply(self, what: str, timeout_s: float) -> dict[str, Any]:
        if not self._conn.poll(timeout_s):
            alive = self._proc.is_alive()
            self.close()
            raise MemmgrStateError(f"engine stand-in on cuda:{self.device}: no answer to {what} within {timeout_s:.0f}"
                                   f" s (helper {'still running' if alive else 'exited'}); check the GPU's free "
                                   f"memory and that CUDA works in a spawned process")
        try:
            status, result = self._conn.recv()
        except EOFError:
            raise MemmgrStateError(f"engine stand-in on cuda:{self.device}: the helper process exited during {what} "
                                   f"(exit code {self._proc.exitcode}); look at its stderr") from None
        if status != "ok":
            raise MemmgrStateError(f"engine stand-in on cuda:{self.device}: {what} failed in the helper: {result}")
        return result

    def _call(self, command: str, args: tuple = ()) -> dict[str, Any]:
        if not self._proc.is_alive():
            raise MemmgrStateError(f"engine stand-in on cuda:{self.device} is not running (closed, or exited with "
                                   f"code {self._proc.exitcode}); start a new EngineStandin")
        self._conn.send((command, args))
        return self._reply(command, self._reply_timeout_s)

    def take(self, nbytes: int | None = None, *, fraction: float = 0.9, fill: bool = True) -> dict[str, Any]:
        """Allocates ``nbytes`` of GPU memory in the helper (or ``fraction`` of the free memory when ``nbytes`` is
        None) and writes it; the memory stays taken until ``release``."""
        if nbytes is not None and nbytes <= 0:
            raise MemmgrInputError(f"engine stand-in: nbytes must be positive, got {nbytes}; pass None to take a "
                                   f"fraction of the free memory")
        if not 0.0 < fraction <= 1.0:
            raise MemmgrInputError(f"engine stand-in: fraction must be in (0, 1], got {fraction}")
        return self._call("take", (nbytes, fraction, fill))

    def release(self) -> dict[str, Any]:
        """Frees everything the helper took and returns its cached blocks to the driver."""
        return self._call("release")

    def cycle(self, nbytes: int | None = None, *, fraction: float = 0.9, hold_s: float = 0.0) -> dict[str, Any]:
        """One engine phase: take, hold for ``hold_s`` seconds, release. Returns both replies."""
        took = self.take(nbytes, fraction=fraction)
        if hold_s > 0:
            time.sleep(hold_s)
        return {"take": took, "release": self.release()}

    def close(self) -> None:
        """Stops the helper (its memory goes back with its context)."""
        if self._proc.is_alive():
            try:
                self._conn.send(("close", ()))
                if self._conn.poll(30):
                    self._conn.recv()
            except (OSError, EOFError):
                pass
            self._proc.join(timeout=30)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(timeout=10)
        self._conn.close()

    def __enter__(self) -> "EngineStandin":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
