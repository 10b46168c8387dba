"""Ordered onload: bring a model's weights back bucket by bucket in order of first use, and let the forward pass
start as soon as the buckets it needs first have arrived.

``onload_in_order(mgr_or_group, module)`` issues every bucket's host->device copy on the h2d copy stream (in
first-use order) from a side "issue" stream, so the compute stream is *not* made to wait for all of them, and
registers forward pre-hooks on the module's submodules: before a submodule runs, the compute stream waits
(``wait_event``, no host sync) on the copy events of the bucket(s) that hold its own parameters and buffers. Once
every bucket has been waited on (or ``finish()`` is called), the hooks remove themselves; from then on the weights
are ordinary resident tensors.

The order comes from ``record_first_use(group, module, run)`` (a forward pass once, with the weights on the device,
noting which bucket each submodule touches first) or, by default, the group's bucket order, which is the order the
tensors were given (``module.parameters()`` order, usually the forward order). For this to pay off, the weights must
be in several buckets (64-128 MiB suits a ~1B model) holding layers in forward order.

Per-bucket events are also exposed for callers that schedule their own work: ``bucket_events(group)`` (bucket name
-> events of its transfer in flight) and ``wait_for_buckets(buckets)`` (the current stream waits on them).

On the CPU every copy is synchronous: the hooks have nothing to wait on, but the orders and bookkeeping are the same.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from memmgr import arguments
from memmgr.errors import MemmgrInputError, MemmgrStateError
from memmgr.flat_tensors import BucketizedFlatTensors, FlatTensors
from memmgr.manager import MemoryManager
from memmgr.moves import OnloadTransaction
from memmgr.states import BucketState
from memmgr.transfer import TransferHandle, copy_stream

logger = logging.getLogger("memmgr")


# ---------------------------------------------------------------- per-bucket events
def bucket_events(group: BucketizedFlatTensors) -> dict[str, list[Any]]:
    """Bucket name -> the CUDA events of its transfer in flight (empty once it completed, or on the CPU). Capture
    this right after a non-blocking offload/onload: a bucket forgets its events once it sees them complete."""
    out: dict[str, list[Any]] = {}
    for bucket in group.buckets:
        pending = bucket.pending()
        out[bucket.name] = list(pending.events) if pending is not None else []
    return out


def wait_for_buckets(buckets: Iterable[FlatTensors], stream: Any = None) -> None:
    """Makes ``stream`` (default: the current stream) wait, without blocking the host, for the transfers in flight
    of the given buckets; work queued afterwards on that stream sees their contents."""
    for bucket in buckets:
        pending = bucket.pending()
        if pending is None:
            continue
        events = pending.events
        if not events:
            continue
        s = stream if stream is not None else torch.cuda.current_stream(bucket.device)
        for event in events:
            s.wait_event(event)


# ---------------------------------------------------------------- which bucket holds what
def _weights_group(target: Any) -> BucketizedFlatTensors:
    group = target
    if isinstance(target, MemoryManager):
        group = target.group(target.weights_group)
    if not isinstance(group, BucketizedFlatTensors):
        raise MemmgrInputError(f"ordered onload needs a BucketizedFlatTensors group (or a MemoryManager whose weights "
                               f"group is one), got {type(group).__name__}")
    return group


def tensor_to_bucket(group: BucketizedFlatTensors) -> dict[int, int]:
    """id(tensor) -> index of the bucket that holds it (parameters keep their identity when coalesced)."""
    return {id(member[1]): i for i, b in enumerate(group.buckets) for member in b.members}


def module_buckets(group: BucketizedFlatTensors, module: torch.nn.Module) -> dict[str, list[int]]:
    """Submodule name -> sorted indices of the buckets holding its own (not its children's) parameters and buffers.
    Tied parameters count for every module that holds them. Submodules holding none are left out."""
    where = tensor_to_bucket(group)
    out: dict[str, list[int]] = {}
    for name, sub in module.named_modules():
        own = [t for _, t in sub.named_parameters(recurse=False)] + [t for _, t in sub.named_buffers(recurse=False)]
        idx = sorted({where[id(t)] for t in own if id(t) in where})
        if idx:
            out[name] = idx
    return out


def registration_order(group: BucketizedFlatTensors, module: torch.nn.Module | None = None) -> list[int]:
    """Buckets in the order their tensors were registered: the order of ``module.named_modules()`` if a module is
    given (buckets not reached through it come last), else the group's bucket order."""
    if module is None:
        return list(range(len(group.buckets)))
    order: list[int] = []
    for idx in module_buckets(group, module).values():
        for i in idx:
            if i not in order:
                order.append(i)
    return order + [i for i in range(len(group.buckets)) if i not in order]


def record_first_use(group: BucketizedFlatTensors, module: torch.nn.Module, run: Callable[[], Any]) -> list[int]:
    """Runs ``run()`` (a forward pass; the weights must be on the device) once, noting the order in which
    submodules first touch each bucket. Returns bucket indices in first-use order; buckets the pass never touched
    come last, in group order."""
    group = _weights_group(group)
    arguments.instance("record_first_use", "module", module, torch.nn.Module)
    arguments.function("record_first_use", "run", run)
    group.require_on_device()
    owned = module_buckets(group, module)
    order: list[int] = []
    handles = []

    def make_hook(indices: list[int]) -> Callable[..., None]:
        def hook(_mod: torch.nn.Module, _args: Any) -> None:
            for i in indices:
                if i not in order:
                    order.append(i)
        return hook

    modules = dict(module.named_modules())
    try:
        for name, indices in owned.items():
            handles.append(modules[name].register_forward_pre_hook(make_hook(indices)))
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return order + [i for i in range(len(group.buckets)) if i not in order]


def check_order(order: Sequence[int], nbuckets: int) -> list[int]:
    if isinstance(order, (str, bytes)) or not hasattr(order, "__iter__"):
        raise MemmgrInputError(f"order must be a list of bucket indices, got {type(order).__name__}")
    order = [arguments.integer("ordered onload", "order[]", i, minimum=0, maximum=nbuckets) for i in order]
    if sorted(order) != list(range(nbuckets)):
        raise MemmgrInputError(f"order must name every bucket index 0..{nbuckets - 1} exactly once, got {order}")
    return order


# ---------------------------------------------------------------- the ordered onload
@dataclass
class OrderedOnload:
    """An onload in flight whose buckets the forward waits for one by one. ``finish()`` makes the current stream
    wait for every bucket and removes the hooks; ``wait()`` blocks the host until every copy is done."""

    group: BucketizedFlatTensors
    order: list[int]
    prefetch: int | None = None                          # buckets issued ahead of the one waited for (None: all)
    events: dict[int, list[Any]] = field(default_factory=dict)  # bucket index -> copy events (empty: on CPU / done)
    waited: set[int] = field(default_factory=set)        # buckets the compute stream already waits on
    hook_waits: list[int] = field(default_factory=list)  # bucket indices in the order the hooks waited on them
    handles: list[TransferHandle] = field(default_factory=list)
    issued: int = 0                                      # positions of ``order`` issued so far
    transaction: OnloadTransaction | None = field(default=None, repr=False)
    _issue_stream: Any = field(default=None, repr=False)
    _compute_stream: Any = field(default=None, repr=False)
    _hooks: list[Any] = field(default_factory=list, repr=False)

    @property
    def handle(self) -> TransferHandle:
        """The copies issued so far (``wait()`` issues the rest first)."""
        return TransferHandle.combine(self.handles)

    def _issue_one(self, i: int) -> None:
        bucket = self.group.buckets[i]
        state = bucket.state
        if state is BucketState.ON_DEVICE:
            self.events[i] = []
            return
        if state is BucketState.ONLOADING:
            pending = bucket.pending()
            self.events[i] = list(pending.events) if pending is not None else []
            return
        h = self.transaction.issue(bucket) or TransferHandle.completed()
        self.handles.append(h)
        ev = list(h.events)
        if self._issue_stream is not None:
            if not ev:  # a discarded bucket, zeroed on the issue stream
                e = torch.cuda.Event()
                e.record(self._issue_stream)
                ev = [e]
            bucket.flat.record_stream(self._compute_stream)  # its memory is used by the compute stream too
        self.events[i] = ev

    def issue_through(self, position: int) -> None:
        """Issues the onloads of ``order[:position + 1]`` not issued yet (allocation and copy, from the side stream)."""
        stop = min(len(self.order), position + 1)
        if self.issued >= stop:
            return
        ctx = torch.cuda.stream(self._issue_stream) if self._issue_stream is not None else contextlib.nullcontext()
        with ctx:
            while self.issued < stop:
                self._issue_one(self.order[self.issued])  # out of memory: the transaction undoes what it issued
                self.issued += 1

    def _position(self, i: int) -> int:
        return self.order.index(i)

    def wait_buckets(self, indices: Iterable[int], stream: Any = None) -> None:
        """The (current) stream waits on these buckets' copies, without blocking the host; issues them (and
        ``prefetch`` more) first if they were not issued yet."""
        indices = [i for i in indices if i not in self.waited]
        if not indices:
            return
        last = max(self._position(i) for i in indices)
        self.issue_through(len(self.order) if self.prefetch is None else last + self.prefetch)
        for i in indices:
            self.waited.add(i)
            events = self.events.get(i, [])
            if events:
                s = stream if stream is not None else torch.cuda.current_stream(self.group.buckets[i].device)
                for e in events:
                    s.wait_event(e)
        if len(self.waited) == len(self.order):
            self.remove_hooks()

    def finish(self) -> None:
        """The current stream waits for every bucket (use before touching weights outside the module's forward)."""
        self.wait_buckets(range(len(self.group.buckets)))
        self.remove_hooks()

    def wait(self) -> None:
        """Issues what is left, blocks until every copy is done, then checks opt-in checksums (group.verify)."""
        self.finish()
        self.handle.wait()
        self.transaction.verify()

    def remove_hooks(self) -> None:
        hooks, self._hooks = self._hooks, []
        for h in hooks:
            h.remove()

    @property
    def hooks_active(self) -> int:
        return len(self._hooks)


def onload_in_order(target: Any, module: torch.nn.Module, order: Sequence[int] | None = None, *,
                    prefetch: int | None = None, issue_stream: Any = None) -> OrderedOnload:
    """Onloads the weights group of a MemoryManager (or a BucketizedFlatTensors) bucket by bucket in ``order``
    (default: registration order of ``module``) and registers forward pre-hooks on ``module``'s submodules so the
    compute stream waits only for the buckets each submodule needs. Returns at once; run the forward right away.

    The copies go out on the h2d copy stream, issued (allocations included) from a side stream so that the current
    stream is not made to wait for all of them. ``prefetch=None`` issues every bucket now; ``prefetch=k`` issues the
    first ``k + 1`` now and, from each pre-hook, up to ``k`` buckets beyond the one it waits for, so the host's
    allocation and launch work interleaves with the forward's launches instead of delaying them. If the GPU runs
    out of memory while issuing up front, what this call allocated is freed again and MemmgrOutOfMemoryError is
    raised (host copies intact)."""
    mgr = target if isinstance(target, MemoryManager) else None
    group = _weights_group(target)
    arguments.instance("onload_in_order", "module", module, torch.nn.Module)
    arguments.integer("onload_in_order", "prefetch", prefetch, minimum=0, optional=True)
    if mgr is not None:
        mgr.check_open()
    if not group.buckets:
        raise MemmgrInputError(f"group {group.name!r} has no buckets to onload")
    require_single_device(group)
    order = registration_order(group, module) if order is None else check_order(order, len(group.buckets))
    device = group.devices[0]
    cuda = device.type == "cuda"
    names = (mgr.name_of(group),) if mgr is not None else (group.name,)
    scope = (mgr.onloading(names, f"onload in order {group.name}", non_blocking=True) if mgr is not None
             else contextlib.nullcontext())
    with scope:
        compute = torch.cuda.current_stream(device) if cuda else None
        issue = (issue_stream if issue_stream is not None else copy_stream(device, "issue")) if cuda else None
        if cuda:
            issue.wait_stream(compute)  # allocations and copies ordered after the compute stream's earlier work
        txn = OnloadTransaction(f"ordered onload of group {group.name!r}", group=group.name,
                                bytes_needed=sum(b.nbytes for b in group.buckets if not b.state.holds_device_memory))
        result = OrderedOnload(group, list(order), prefetch, transaction=txn, _issue_stream=issue,
                               _compute_stream=compute)
        result.issue_through(len(order) if prefetch is None else prefetch)
        modules = dict(module.named_modules())

        def make_hook(indices: list[int]) -> Callable[..., None]:
            def hook(_mod: torch.nn.Module, _args: Any) -> None:
                new = [i for i in indices if i not in result.waited]
                if new:
                    result.hook_waits.extend(new)
                    result.wait_buckets(new)
            return hook

        owned = module_buckets(group, module)
        for name, indices in owned.items():
            result._hooks.append(modules[name].register_forward_pre_hook(make_hook(indices)))
        uncovered = set(range(len(group.buckets))) - {i for v in owned.values() for i in v}
        if uncovered:
            logger.debug("ordered onload: buckets %s hold no tensor of the module; call finish() before using them",
                         sorted(uncovered))
    logger.debug("ordered onload of %s: %d of %d buckets issued up front, order %s", group.name, result.issued,
                 len(order), order)
    return result


def require_single_device(group: BucketizedFlatTensors) -> None:
    if len(group.devices) != 1:
        raise MemmgrStateError(f"group {group.name!r} spans {group.devices}; ordered onload handles one device")
