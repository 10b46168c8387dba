"""Copy streams and the handles that non-blocking transfers return."""
from __future__ import annotations

import threading
from typing import Callable, Iterable

import torch

_streams: dict[tuple[int, str], torch.cuda.Stream] = {}
_streams_lock = threading.Lock()


def copy_stream(device: torch.device, direction: str) -> torch.cuda.Stream:
    """The dedicated stream for one direction ("d2h" or "h2d") on one GPU, created once.

    Two streams per GPU let an offload of one group and an onload of another use both directions of the link at once.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, direction)
    with _streams_lock:
        stream = _streams.get(key)
        if stream is None:
            stream = torch.cuda.Stream(device=index)
            _streams[key] = stream
        return stream


class TransferHandle:
    """A transfer in flight: ``done()`` polls, ``wait()`` blocks; both run the completion steps exactly once.

    A group counts as moved (and, for an offload, its memory as free) only once its handle reports done.
    """

    def __init__(self, events: Iterable[torch.cuda.Event] = (), on_complete: Iterable[Callable[[], None]] = (),
                 children: Iterable["TransferHandle"] = ()):
        self._events = list(events)
        self._on_complete = list(on_complete)
        self._children = list(children)  # a combined handle is done when all of these are
        self._completed = False
        self._lock = threading.Lock()

    @classmethod
    def completed(cls) -> "TransferHandle":
        handle = cls()
        handle._completed = True
        return handle

    @classmethod
    def combine(cls, handles: Iterable["TransferHandle"]) -> "TransferHandle":
        pending = [h for h in handles if not h._completed]
        return cls(children=pending) if pending else cls.completed()

    def add_done_callback(self, fn: Callable[[], None]) -> None:
        """Runs ``fn`` once the transfer is complete (at once if it already is)."""
        with self._lock:
            if not self._completed:
                self._on_complete.append(fn)
                return
        fn()

    def settle(self) -> None:
        """Runs the completion steps not run yet; call only once the transfer is known to be complete (e.g. a later
        copy on the same stream finished after it)."""
        # Each callback is taken off the list before it runs and the handle counts as complete only after the last,
        # so an interrupt in between leaves the remaining callbacks to the next done()/wait().
        while True:
            with self._lock:
                if self._completed:
                    return
                if not self._on_complete:
                    self._completed = True
                    return
                callback = self._on_complete.pop(0)
            callback()

    def done(self) -> bool:
        if self._completed:
            return True
        if all(child.done() for child in self._children) and all(event.query() for event in self._events):
            self.settle()
        return self._completed

    def wait(self) -> None:
        if self._completed:
            return
        for child in self._children:
            child.wait()
        for event in self._events:
            event.synchronize()
        self.settle()

    @property
    def events(self) -> list[torch.cuda.Event]:
        return [e for child in self._children for e in child.events] + list(self._events)

    def __repr__(self) -> str:
        return f"TransferHandle(done={self._completed})"
