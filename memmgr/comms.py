"""NCCL communicators as a manager group: their GPU memory is released at offload and restored at onload.

An NCCL communicator holds GPU memory of its own (channel buffers, proxy and work FIFOs, NVLS/IPC mappings) from
its first collective until it is destroyed: tens of MiB to GiBs per communicator, outside PyTorch's allocator, in
every process group a trainer keeps (tensor, pipeline, data, expert parallel, and their combinations).
``NcclCommunicators`` holds named ``torch.distributed`` process groups and implements the manager's group and unit
protocols (``memmgr.groups.StateGroup``/``MovableUnit``, policy DISCARD), so that

    comms = NcclCommunicators()
    comms.register("tp", tp_group)                                   # native suspend/resume when torch has it
    comms.register("dp", dp_group, create=lambda: dist.new_group(dp_ranks), rebind=set_dp_group)
    mgr.add_group("nccl", comms)
    mgr.offload()    # ... every communicator released ...
    mgr.onload()     # ... restored; collectives work again

Two ways to release a communicator, chosen per group at ``register``:

* **native** (``suspend``): where the process group's backend for the device is NCCL's, has ``suspend()`` and
  ``resume()`` (recent PyTorch exposes NCCL's ``ncclCommSuspend``/``ncclCommResume`` there) and torch runs NCCL >=
  2.29.7. torch >= 2.12 puts both methods on every backend's base class, raising where a backend lacks them, so
  their presence alone proves nothing; a ``suspend()`` that still fails switches that group to re-create when it
  has a factory. The group object stays the same: every reference a framework keeps stays valid.
* **re-create** (``recreate``): the group is destroyed (``torch.distributed.destroy_process_group(group)``, which
  shuts its NCCL communicators down and returns their memory to the driver) and ``create()`` builds a new one at
  onload, which ``rebind(new_group)`` hands to whoever uses it; one small all-reduce then initializes the new
  communicator, so its set-up cost is paid at onload and not at the first training collective. What this cannot do:
  objects that kept the old group (modules that cached it, DDP, a DeviceMesh) still hold a destroyed group; only
  what ``rebind`` updates sees the new one. ``create`` is usually ``dist.new_group(ranks,
  use_local_synchronization=True)`` (only the group's members call it) or plain ``dist.new_group(ranks)``, which
  every rank of the default group must call in the same order, members or not; either way the members must offload
  and onload their ``NcclCommunicators`` together with the same registrations. The default (world) group cannot be
  re-created this way (destroying it ends torch.distributed). The new group has a new name in torch's registry, and
  re-creating costs an NCCL initialization (a bootstrap through the store) per group at every onload.

A group that has neither (no native suspend, no ``create``) is refused at ``register`` with the fix.

Bytes, with ``measure=True``: each communicator's GPU memory is measured as the change of this process's GPU usage
(NVML, else ``cudaMemGetInfo``) across its own release and restore (the device is synchronized and the usage polled
until it settles, around each); ``device_bytes`` is the measured bytes of the communicators that are live (0
before the first measurement, on the CPU, and without ``measure``, the default: then a release or restore runs no
NVML query, no poll and no synchronize beyond the one a release needs, see ``release``).
``report()`` lists, per communicator, how it is released, its state, the bytes freed and restored, the seconds, and
the backend's ``memory_stats()`` where it has them; ``versions()`` says which torch and NCCL are in use.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from memmgr import arguments, nvml
from memmgr.errors import MemmgrInputError, MemmgrStateError
from memmgr.groups import ContentlessUnit
from memmgr.states import BucketState, Policy
from memmgr.transfer import TransferHandle

logger = logging.getLogger("memmgr")

NATIVE = "suspend"
RECREATE = "recreate"

LIVE = "live"
SUSPENDED = "suspended"
DESTROYED = "destroyed"


def versions() -> dict[str, Any]:
    """The torch version and the NCCL version torch runs with (None where torch has no NCCL)."""
    nccl_version = None
    try:
        if torch.cuda.is_available():
            v = torch.cuda.nccl.version()
            nccl_version = ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
    except Exception as exc:  # a CPU-only build, or NCCL not loadable
        logger.debug("NCCL version unknown: %s", exc)
    return {"torch": torch.__version__, "nccl": nccl_version}


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def group_backend(group: Any, device: torch.device) -> Any | None:
    """The backend object of ``group`` for ``device`` (e.g. ProcessGroupNCCL), or None if it has none there."""
    get = getattr(group, "_get_backend", None)  # torch's accessor; no public name for it exists
    if get is None:
        return None
    try:
        return get(device)
    except Exception as exc:
        logger.debug("no backend for %s on group %r: %s", device, group, exc)
        return None


NATIVE_MIN_NCCL = (2, 29, 7)  # ncclCommSuspend / ncclCommResume


def nccl_version_tuple() -> tuple[int, ...] | None:
    try:
        if torch.cuda.is_available():
            v = torch.cuda.nccl.version()
            return tuple(int(x) for x in v) if isinstance(v, tuple) else None
    except Exception:
        return None
    return None


def has_native_suspend(backend: Any) -> bool:
    """Whether ``backend`` can release its communicator's memory in place. torch's C++ ``Backend`` base class
    (torch >= 2.12) has ``suspend()``/``resume()`` on every backend, raising "does not support" where the backend does
    not implement them; so a torch backend counts only if it is NCCL's and torch runs NCCL >= 2.29.7. Any other
    object (a framework's own communicator wrapper) counts if it has both methods."""
    if backend is None or not (callable(getattr(backend, "suspend", None)) and
                               callable(getattr(backend, "resume", None))):
        return False
    torch_backend = getattr(getattr(torch._C, "_distributed_c10d", None), "Backend", None)
    if torch_backend is None or not isinstance(backend, torch_backend):
        return True
    if "nccl" not in type(backend).__name__.lower():
        return False
    version = nccl_version_tuple()
    return version is not None and version >= NATIVE_MIN_NCCL


def process_gpu_bytes(device: torch.device) -> tuple[int | None, str]:
    """This process's GPU memory on ``device`` and where the figure comes from ("nvml", "cudaMemGetInfo" for the
    whole device's usage, or "unavailable")."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None, "unavailable"
    index = device.index if device.index is not None else torch.cuda.current_device()
    j = nvml.nvml_index(index)
    proc = nvml.process_memory(j) if j is not None else None
    if proc is not None and proc.nbytes is not None:
        return int(proc.nbytes), "nvml"
    free, total = torch.cuda.mem_get_info(index)
    return int(total - free), "cudaMemGetInfo"


@dataclasses.dataclass
class Communicator:
    """One registered process group and what is known about its memory."""

    name: str
    group: Any
    method: str
    create: Callable[[], Any] | None = None
    rebind: Callable[[Any], Any] | None = None
    backend: Any = None
    state: str = LIVE
    bytes_held: int = 0           # the larger of the last measured freed / restored bytes
    bytes_freed: int | None = None
    bytes_restored: int | None = None
    release_s: float | None = None
    restore_s: float | None = None
    releases: int = 0
    memory_stats: dict[str, Any] | None = None
    measure_source: str = "unavailable"

    def row(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "state": self.state, "bytes_held": self.bytes_held,
                "bytes_freed": self.bytes_freed, "bytes_restored": self.bytes_restored, "release_s": self.release_s,
                "restore_s": self.restore_s, "releases": self.releases, "memory_stats": self.memory_stats,
                "measured_by": self.measure_source}


def _is_process_group(group: Any) -> bool:
    """Whether ``group`` is a torch.distributed process group (or the world group's handle)."""
    if group is None or group is getattr(dist.GroupMember, "NON_GROUP_MEMBER", object()):
        return False
    kinds = tuple(k for k in (getattr(dist, "ProcessGroup", None),
                              getattr(getattr(torch._C, "_distributed_c10d", None), "ProcessGroup", None))
                  if isinstance(k, type))
    return isinstance(group, kinds) if kinds else hasattr(group, "size") and hasattr(group, "rank")


class NcclCommunicators(ContentlessUnit):
    """A manager group (and its own single unit, policy DISCARD) of named process groups whose communicators'
    memory leaves the GPU at offload (release) and comes back at onload (restore). See the module docstring for
    the two ways a communicator is released and what each can and cannot do.

    ``device``: the GPU whose memory the communicators hold (default: the current CUDA device, else the CPU, where
    nothing is measured). ``measure`` (default False): measure bytes per communicator (a device synchronize and an
    NVML query before each release and restore, and after it a synchronize and queries every 20 ms until the usage
    stops changing). ``warmup``: run one small all-reduce on a re-created group at onload so that its
    communicator exists (and is measured) before the next phase."""

    policy = Policy.DISCARD
    ledger_category = "nccl"  # memmgr.ledger reports these bytes as NCCL memory, not as PyTorch tensors

    def __init__(self, name: str = "nccl", *, device: torch.device | str | None = None, measure: bool = False,
                 warmup: bool = True):
        where = "NcclCommunicators"
        self.name = arguments.string(where, "name", name)
        self._device = arguments.device(where, "device", device, optional=True) or default_device()
        self.measure = arguments.boolean(where, "measure", measure)
        self.warmup = arguments.boolean(where, "warmup", warmup)
        self._comms: dict[str, Communicator] = {}

    # ---- registration ----
    def register(self, name: str, group: Any, *, create: Callable[[], Any] | None = None,
                 rebind: Callable[[Any], Any] | None = None, backend: Any = None) -> str:
        """Adds a process group under ``name``; returns how it will be released (``"suspend"`` or
        ``"recreate"``). ``backend``: the object whose ``suspend()``/``resume()`` release this group's communicator
        (default: the group's backend for the device, if it has them). ``create``/``rebind``: the re-create
        fallback (``create()`` returns a new equivalent group, ``rebind(new)`` hands it to its users); used only
        when there is no native suspend. Every rank registers the same groups in the same order."""
        where = f"NcclCommunicators({self.name!r}).register"
        arguments.string(where, "name", name)
        arguments.function(where, "create", create, optional=True)
        arguments.function(where, "rebind", rebind, optional=True)
        if not _is_process_group(group):
            raise MemmgrInputError(f"{where}: group for {name!r} must be a torch.distributed ProcessGroup this rank "
                                   f"is a member of (e.g. dist.new_group(ranks)), got {type(group).__name__}")
        if name in self._comms:
            raise MemmgrInputError(f"NcclCommunicators {self.name!r}: communicator {name!r} is registered already; "
                                   f"registered: {list(self._comms)}")
        if any(c.state != LIVE for c in self._comms.values()):
            raise MemmgrStateError(f"NcclCommunicators {self.name!r}: cannot register {name!r} while communicators "
                                   f"are released; onload first")
        if group is None or group is getattr(dist.GroupMember, "NON_GROUP_MEMBER", object()):
            raise MemmgrInputError(f"NcclCommunicators {self.name!r}: {name!r} is not a process group of this rank "
                                   f"(got {group!r}); register only groups this rank is a member of")
        if backend is None:
            backend = group_backend(group, self._device)
        if has_native_suspend(backend):
            method = NATIVE
            if create is not None and dist.is_initialized() and group is dist.group.WORLD:
                create = None  # the world group is never destroyed
        elif create is not None:
            if dist.is_initialized() and group is dist.group.WORLD:
                raise MemmgrInputError(f"NcclCommunicators {self.name!r}: {name!r} is the default (world) group, "
                                       f"which cannot be destroyed and re-created without ending torch.distributed; "
                                       f"this torch ({torch.__version__}) has no native suspend(). Leave the world "
                                       f"group out, or use a torch whose ProcessGroupNCCL has suspend()/resume()")
            method = RECREATE
        else:
            raise MemmgrInputError(
                f"NcclCommunicators {self.name!r}: the backend of {name!r} ({type(backend).__name__}) has no "
                f"suspend()/resume() (torch {versions()['torch']}, NCCL {versions()['nccl']}; native suspend needs "
                f"a PyTorch that exposes NCCL >= 2.29.7's ncclCommSuspend). Pass create= (a callable returning a new "
                f"equivalent group, e.g. lambda: dist.new_group(ranks)) and rebind= (a callable receiving it) so "
                f"memmgr can destroy and re-create the group")
        self._comms[name] = Communicator(name, group, method, create, rebind, backend if method == NATIVE else None)
        logger.info("NcclCommunicators %s: %r registered, released by %s (torch %s, NCCL %s)", self.name, name,
                    method, *versions().values())
        return method

    def process_group(self, name: str) -> Any:
        """The current group registered under ``name`` (after a re-create, the new one)."""
        comm = self._communicator(name)
        if comm.state != LIVE:
            raise MemmgrStateError(f"NcclCommunicators {self.name!r}: {name!r} is {comm.state}; onload the group "
                                   f"before using it")
        return comm.group

    @property
    def names(self) -> list[str]:
        return list(self._comms)

    def report(self) -> list[dict[str, Any]]:
        """One row per communicator: method, state, bytes freed/restored, seconds, backend memory_stats."""
        return [c.row() for c in self._comms.values()]

    @staticmethod
    def versions() -> dict[str, Any]:
        return versions()

    # ---- release / restore ----
    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def _measure(self) -> int | None:
        if not self.measure:
            return None
        self._sync()
        nbytes, _source = process_gpu_bytes(self._device)
        return nbytes

    def _measure_settled(self, polls: int = 10, interval_s: float = 0.02) -> int | None:
        """The usage once it stops changing: a communicator's teardown may return its memory to the driver a
        moment after the call that started it returned. None (and no query, no wait) without ``measure``."""
        if not self.measure:
            return None
        value = self._measure()
        for _ in range(polls):
            if value is None:
                return None
            time.sleep(interval_s)
            again = self._measure()
            if again == value:
                return value
            value = again
        return value

    def _stats(self, comm: Communicator) -> None:
        fn = getattr(comm.backend, "memory_stats", None) if comm.backend is not None else None
        if fn is None:
            return
        try:
            stats = fn()
            comm.memory_stats = {str(k): (int(v) if isinstance(v, (int, float)) else str(v))
                                 for k, v in dict(stats).items()}
        except Exception as exc:
            logger.debug("memory_stats() of %r failed: %s", comm.name, exc)

    def _communicator(self, name: str) -> Communicator:
        comm = self._comms.get(name) if isinstance(name, str) else None
        if comm is None:
            raise MemmgrInputError(f"NcclCommunicators {self.name!r}: no communicator {name!r}; registered: "
                                   f"{list(self._comms)}")
        return comm

    def release(self, name: str) -> int | None:
        """Releases one communicator's memory; returns the bytes this process's GPU usage dropped by (None where
        not measured)."""
        comm = self._communicator(name)
        if comm.state != LIVE:
            return 0
        # Needed whether or not anything is measured: suspending or destroying a communicator frees the buffers its
        # kernels use, and collectives queued on it (on NCCL's streams, or waited for by the caller's) may still be
        # running. NCCL does not wait for them, so the device must be idle first.
        self._sync()
        if comm.method == NATIVE:
            self._stats(comm)
        before = self._measure()
        t0 = time.perf_counter()
        try:
            if comm.method == NATIVE:
                try:
                    comm.backend.suspend()
                except Exception as exc:
                    if comm.create is None:
                        raise
                    # the backend has the method but this build cannot suspend: re-create from now on
                    logger.warning("NcclCommunicators %s: %r: suspend() failed (%s: %s); destroying and "
                                   "re-creating it instead from now on", self.name, name, type(exc).__name__, exc)
                    comm.method, comm.backend = RECREATE, None
            if comm.method == NATIVE:
                comm.state = SUSPENDED
            else:
                dist.destroy_process_group(comm.group)
                comm.group = None
                comm.state = DESTROYED
        except Exception as exc:
            raise MemmgrStateError(f"NcclCommunicators {self.name!r}: releasing {name!r} by {comm.method} failed "
                                   f"({type(exc).__name__}: {exc}); it is still usable. Check that no collective "
                                   f"is pending on it and that every rank offloads together") from exc
        comm.release_s = time.perf_counter() - t0
        after = self._measure_settled()
        comm.releases += 1
        if before is not None and after is not None:
            comm.bytes_freed = max(0, before - after)
            comm.bytes_held = max(comm.bytes_held, comm.bytes_freed)
            comm.measure_source = process_gpu_bytes(self._device)[1]
        logger.info("NcclCommunicators %s: %r released by %s in %.3f s, %s bytes freed", self.name, name,
                    comm.method, comm.release_s, comm.bytes_freed)
        return comm.bytes_freed

    def restore(self, name: str) -> int | None:
        """Restores one communicator; returns the bytes this process's GPU usage grew by (None where not
        measured). A re-created group is handed to ``rebind`` and, with ``warmup``, initialized by one all-reduce."""
        comm = self._communicator(name)
        if comm.state == LIVE:
            return 0
        probe = torch.zeros(1, device=self._device) if comm.method == RECREATE and self.warmup else None
        before = self._measure()  # after the probe's allocation, so that only the communicator is counted
        t0 = time.perf_counter()
        try:
            if comm.method == NATIVE:
                comm.backend.resume()
            else:
                new = comm.create()
                if new is None or new is getattr(dist.GroupMember, "NON_GROUP_MEMBER", object()):
                    raise MemmgrInputError(f"create() returned {new!r}, not a group this rank belongs to")
                comm.group = new
                if comm.rebind is not None:
                    comm.rebind(new)
                if probe is not None:
                    dist.all_reduce(probe, group=new)
            comm.state = LIVE
        except Exception as exc:
            raise MemmgrStateError(f"NcclCommunicators {self.name!r}: restoring {name!r} by {comm.method} failed "
                                   f"({type(exc).__name__}: {exc}); it stays {comm.state}. Every rank must onload "
                                   f"together (re-creating a group is collective over the default group)") from exc
        comm.restore_s = time.perf_counter() - t0
        after = self._measure_settled()
        if comm.method == NATIVE:
            self._stats(comm)
        if before is not None and after is not None:
            comm.bytes_restored = max(0, after - before)
            comm.bytes_held = max(comm.bytes_held, comm.bytes_restored)
        logger.info("NcclCommunicators %s: %r restored by %s in %.3f s, %s bytes", self.name, name, comm.method,
                    comm.restore_s, comm.bytes_restored)
        return comm.bytes_restored

    # ---- the unit (memmgr.groups.MovableUnit) ----
    @property
    def units(self) -> list["NcclCommunicators"]:
        return [self]

    def offload(self, non_blocking: bool = False, discard: bool | None = None) -> TransferHandle:
        for name in self._comms:
            self.release(name)
        return TransferHandle.completed()

    def allocate(self) -> bool:
        return False

    def onload(self, non_blocking: bool = False, *, zero_after: torch.cuda.Event | None = None) -> TransferHandle:
        for name in self._comms:
            self.restore(name)
        return TransferHandle.completed()

    def revert_onload(self, state: BucketState) -> None:
        if state is BucketState.DISCARDED:
            for name in self._comms:
                self.release(name)

    @property
    def state(self) -> BucketState:
        return BucketState.ON_DEVICE if all(c.state == LIVE for c in self._comms.values()) else \
            BucketState.DISCARDED

    @property
    def device(self) -> torch.device | None:
        return self._device

    @property
    def nbytes(self) -> int:
        return sum(c.bytes_held for c in self._comms.values())

    @property
    def device_bytes(self) -> int:
        return sum(c.bytes_held for c in self._comms.values() if c.state == LIVE)

    @property
    def host_bytes(self) -> int:
        return 0

    @property
    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return []
