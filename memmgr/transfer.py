"""Copy streams, the copy-path policy that moves a bucket's bytes, and the handles that non-blocking transfers return.

Two ways move bytes between a GPU and pinned host memory:

- ``engine``: ``Tensor.copy_``, which runs on the GPU's copy engines (DMA). At the link's peak when the engines are
  free; but for a while after GPU memory was given back to the driver (by another process, or by this one's
  ``empty_cache``) a host->device copy runs at about half the link's speed (measured: ~0.35 s after a 48 GiB release
  on an H200; ~2 s elsewhere), also on several streams at once. Device->host copies are not affected.
- ``kernel``: the extension's copy kernel (csrc/copy_kernels.cu): the SMs load and store across the link through the
  host buffer's mapped address (zero-copy). Unaffected by busy copy engines; it occupies SM slots while it runs and
  needs the native extension and pinned host memory.

Which one runs is a ``CopyPolicy``: the path (``auto``, ``engine`` or ``kernel``) and the kernel's grid size. A move
resolves it once, from ``MEMMGR_COPY_PATH`` (default ``auto``) and ``MEMMGR_COPY_KERNEL_BLOCKS`` (0: the extension's
default), with ``CopyPolicy.from_env()``, and makes it the policy of every copy it issues (``copy_policy_scope``;
``memmgr.moves`` does this for every offload and onload). ``issue_copy`` takes its ``policy`` argument, else the
policy of the move around it, else reads the environment for that one copy. ``copy_paths_status()`` says which paths
are available and which ran last in each direction.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
import threading
from typing import Callable, Iterable, Iterator

import torch

from memmgr import copy_shape
from memmgr._native import native_module, register_copy_paths_status
from memmgr.errors import MemmgrInputError

logger = logging.getLogger("memmgr")

_streams: dict[tuple[int, str], torch.cuda.Stream] = {}
_streams_lock = threading.Lock()


def copy_stream(device: torch.device, direction: str) -> torch.cuda.Stream:
    """The dedicated stream for one direction ("d2h" or "h2d") on one GPU, created once.

    Two streams per GPU let an offload of one group and an onload of another use both directions of the link at once.
    Any other name gives another stream of its own. Making a "h2d" or "d2h" stream also loads the copy kernels into
    the device's context (``prepare_kernels``), off the critical path of the first copy.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, direction)
    with _streams_lock:
        stream = _streams.get(key)
        if stream is None:
            stream = torch.cuda.Stream(device=index)
            _streams[key] = stream
            if direction in ("h2d", "d2h") and kernels_available():
                prepare_kernels(index)
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


# ---- copy paths ----
COPY_PATHS = ("auto", "engine", "kernel")
COPY_PATH_ENV = "MEMMGR_COPY_PATH"
KERNEL_BLOCKS_ENV = "MEMMGR_COPY_KERNEL_BLOCKS"
PROBE_MB_ENV = "MEMMGR_COPY_PROBE_MB"  # a fixed auto probe size in MiB, for measuring (unset: CopyPolicy.probe)

# The auto probe's sizes are multiples of this many bytes, so the parts after each probe keep the relative alignment
# of the whole (the kernel moves 16-byte vectors wherever source and destination are co-aligned).
_PROBE_ALIGN = 4096

# What 'auto' does, from benchmarks/copy_path_probe.py on H200s (PCIe Gen5 x16, pinned-copy peak 54.7-55.3 GB/s each
# way; benchmarks/results/2026-11-29/COPY_PATHS.md), 8 and 24 GiB copies:
# - device->host: the engines ran at 54.6-55.2 GB/s whether or not memory had just been released; the kernel
#   45.5-52.4, engines+kernel splits 50.8-54.4. So 'auto' uses the engines.
# - host->device: the engines ran at 55 on memory allocated long before, but at 27.5-32 right after another process
#   released 48-100 GiB (28 GB/s for the first 0.24-0.36 s, then 55; on 2 or 4 streams no faster) and at 45-46
#   right after this process's own empty_cache; the kernel ran at 51.0-51.3 (0.93x) in every case; a 50/50 split
#   ran at 53.2 on warm memory but at 36.6-41.9 in the other two cases (the two paths slow each other down on
#   reads from the host). So neither path is best in both states, and 'auto' asks the link: a large copy issued on
#   an idle stream starts with AUTO_PROBE_BYTES through the engines and the next AUTO_PROBE_BYTES through the
#   kernel, waits for both (~2.5 ms), and copies the rest with the kernel only if it was more than
#   AUTO_KERNEL_MARGIN times faster; copies that cannot probe (smaller than two probes, or queued behind other
#   work) reuse the device's last verdict. A move of many buckets thus probes with its first bucket (the copy stream
#   is idle then) and its later buckets, queued behind that one, follow the verdict. The margin: a 64 MiB probe
#   undersells the engines (48-51 GB/s on memory where a whole copy runs at 55) but not the kernel (50.9), so on
#   free engines the kernel probe read 0.99-1.05x the engine probe; right after a release it read 1.7-2.6x
#   (engines 19-29.5 GB/s, kernel 49.5-50.6).
# - The verdict holds for the whole move, although the engines' slow spell lasts about as long as the driver takes to
#   clear the released memory (0.02 s after 4 GB, 0.17 s after 52, 0.5-0.55 s after 146 GB: release_probe.py). Re-
#   timing the engines on 16 MiB at the head of a copy every 3 GiB of a kernel run, to hand the rest back to them,
#   read them as recovered while whole copies still ran at half speed (onloads at 0.59-0.76x instead of 0.89x;
#   benchmarks/results/2026-11-29/H200_SESSION5.md), so 'auto' does not.
# - An onload allocates each bucket while the one before it copies. Beside a kernel copy a fresh 150 MiB allocation
#   waits for the link's queue (3 ms at 2 blocks per SM, 1 ms at 1; 0.2 ms beside engine copies or compute), hence
#   the kernel's grid of 1 block per SM (csrc/copy_kernels.cu). Allocating all buckets before the first copy (0.80-
#   0.84x) or reserving them in one allocation (0.74x: 50 GiB takes 145-336 ms right after a release) was slower than
#   allocating as the copies go (0.89-0.90x; onload_timeline.py, H200_SESSION6.md). Each allocation beside the
#   kernel also slows it for a while, so memmgr's buckets are 1 GiB (memmgr.flat_tensors.DEFAULT_BUCKET_SIZE_MB):
#   a 16 GiB onload then ran at 0.91x, within 0.5% of the kernel copying into memory held throughout, against
#   0.89-0.90x with 256 MiB buckets. A 10% engine share beside the kernel after a release ran at 0.84x
#   (H200_SESSION7.md), so each copy runs on one path.
# - On an H100 the kernel read host memory at 0.54-0.57x of the link with every launch shape (memmgr.copy_shape),
#   warm or not (benchmarks/results/2026-12-07/H100_SESSION.md). Issue 30 reports, from an H100 run whose output is
#   not in this repository, the engines at 0.55x right after a 48 GiB release and at 0.92-0.94x over 24 GiB after an
#   80 GiB one, where the probe had chosen the kernel (0.53x). A kernel that cannot hold the link is then never
#   faster for long alone, so 'auto' probes engines against kernel only on devices where the kernel's measured shape
#   reaches copy_shape.KERNEL_LINK_SHARE of the engines' device->host speed. Elsewhere the engines move a copy, unless
#   their probe reads below AUTO_ENGINES_HEALTHY of the link: then both paths at once (the engines on the share of
#   the bytes their probe speed says, the kernel on the rest, two streams) are timed on the next probe's bytes and
#   keep the copy if they beat the engines by AUTO_SPLIT_MARGIN, since on such a card the two are held back by
#   different things (the kernel by the SMs' reads of host memory, the engines by the driver clearing released
#   memory). Whether they do is what benchmarks/run.py's copy-split suite measures.
AUTO_POLICY: dict[str, str] = {"h2d": "probe", "d2h": "engine"}
AUTO_PROBE_BYTES = 64 << 20
AUTO_PROBE_MIN_BYTES = 2 * AUTO_PROBE_BYTES
# A probe takes its bytes through both paths, the slower one included: after another process's release the engines
# ran 21-24 GB/s against the kernel's 50 (H100), so two 64 MiB probes cost a 655 MB copy ~3 ms of its 15
# (benchmarks/results/2026-12-07/h100-7-bench). Each probe is at most this share of its copy, and not below the floor.
AUTO_PROBE_SHARE = 32
AUTO_PROBE_FLOOR_BYTES = 16 << 20
AUTO_KERNEL_MARGIN = 1.3
AUTO_ENGINES_HEALTHY = 0.8  # engine probe speed, as a share of the link's, above which the engines need no help
AUTO_SPLIT_MARGIN = 1.15  # how much faster than the engines both paths at once must be

_last_paths: dict[str, str] = {}
_last_probe: dict[int, dict[str, float | str]] = {}  # per device: the last probe's speeds and verdict
_state_lock = threading.Lock()
_warned_kernel_failure = False
_prepared_devices: set[int] = set()


def kernels_available() -> bool:
    """Whether the copy-kernel path can run here: the native extension is built with its kernels and CUDA is up."""
    native = native_module()
    return native is not None and hasattr(native, "kernel_copy") and torch.cuda.is_available()


def prepare_kernels(device: int) -> bool:
    """Loads the copy kernels into a device's context now (a first launch would, and may wait for the device to go
    idle). Called when the device's copy streams are made; False if the kernels cannot run there."""
    if not kernels_available():
        return False
    if device in _prepared_devices:
        return True
    try:
        native_module().kernel_prepare(device)
    except RuntimeError as exc:
        _warn_kernel_failure(exc)
        return False
    _prepared_devices.add(device)
    copy_shape.shape_for(device)  # measured here, off the critical path, unless set or cached (memmgr.copy_shape)
    return True


def resolve_copy_path(path: str | None = None) -> str:
    """The requested copy path: ``path`` if given, else ``$MEMMGR_COPY_PATH``, else "auto"; validated."""
    source = "path argument"
    if path is None:
        path = os.environ.get(COPY_PATH_ENV) or "auto"
        source = f"${COPY_PATH_ENV}"
    if not isinstance(path, str):
        raise MemmgrInputError(f"copy path must be a string, one of {', '.join(COPY_PATHS)}; got "
                               f"{type(path).__name__} {path!r}")
    path = path.strip().lower()
    if path not in COPY_PATHS:
        raise MemmgrInputError(f"copy path {path!r} (from the {source}) is not one of {', '.join(COPY_PATHS)}; "
                               f"pass one of those, or unset {COPY_PATH_ENV} for 'auto'")
    return path


def _whole_number_env(name: str, minimum: int, meaning: str) -> int | None:
    """``$name`` as a whole number >= ``minimum`` (None where unset or empty); MemmgrInputError naming the variable and
    what it means otherwise."""
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise MemmgrInputError(f"${name}={raw!r} is not a whole number >= {minimum}; set it to {meaning}")
    return value


def resolve_kernel_blocks(kernel_blocks: int = 0) -> int:
    """The copy kernel's grid size: the argument if > 0, else ``$MEMMGR_COPY_KERNEL_BLOCKS``, else 0 (the default)."""
    _check_kernel_blocks(kernel_blocks)
    if kernel_blocks > 0:
        return kernel_blocks
    blocks = _whole_number_env(KERNEL_BLOCKS_ENV, 0, "the copy kernel's grid size in blocks, or 0 (or unset it) for "
                                                     "the extension's default")
    return blocks or 0


def resolve_probe_bytes() -> int:
    """The auto probe's size ``$MEMMGR_COPY_PROBE_MB`` asks for, in bytes (0 where unset: ``AUTO_PROBE_BYTES``);
    raises MemmgrInputError naming the variable unless it is a whole number of MiB >= 1."""
    mib = _whole_number_env(PROBE_MB_ENV, 1, f"the size of each of the copy-path probes in MiB, or unset it for the "
                                             f"default ({AUTO_PROBE_BYTES >> 20} MiB)")
    return (mib or 0) << 20


def _check_kernel_blocks(kernel_blocks: object) -> None:
    if isinstance(kernel_blocks, bool) or not isinstance(kernel_blocks, int) or kernel_blocks < 0:
        raise MemmgrInputError(f"kernel_blocks must be a whole number >= 0 (the copy kernel's grid size in blocks, 0 "
                               f"for the default), got {kernel_blocks!r}")


@dataclasses.dataclass(frozen=True)
class CopyPolicy:
    """How the copies of one move run: ``path`` ("auto", "engine" or "kernel") and the copy kernel's grid size
    (``kernel_blocks``, 0: the extension's default). Immutable; a move resolves it once (``from_env``) and every copy
    it issues uses it (``copy_policy_scope``)."""

    path: str = "auto"
    kernel_blocks: int = 0
    probe_bytes: int = 0  # each of 'auto''s probes, in bytes; 0: AUTO_PROBE_BYTES

    def __post_init__(self) -> None:
        if not isinstance(self.path, str):
            raise MemmgrInputError(f"CopyPolicy: path must be one of {', '.join(COPY_PATHS)}, got {self.path!r}; "
                                   f"CopyPolicy.from_env() reads ${COPY_PATH_ENV}")
        object.__setattr__(self, "path", resolve_copy_path(self.path))
        _check_kernel_blocks(self.kernel_blocks)
        if isinstance(self.probe_bytes, bool) or not isinstance(self.probe_bytes, int) or self.probe_bytes < 0:
            raise MemmgrInputError(f"CopyPolicy: probe_bytes must be a whole number >= 0 (0 for the default), got "
                                   f"{self.probe_bytes!r}")

    @classmethod
    def from_env(cls) -> "CopyPolicy":
        """The policy ``$MEMMGR_COPY_PATH``, ``$MEMMGR_COPY_KERNEL_BLOCKS`` and ``$MEMMGR_COPY_PROBE_MB`` ask for
        (unset: "auto", 0 and the default probe), read now; raises MemmgrInputError naming the variable and the
        allowed values when one is invalid."""
        return cls(resolve_copy_path(), resolve_kernel_blocks(), resolve_probe_bytes())

    def with_overrides(self, path: str | None = None, kernel_blocks: int = 0) -> "CopyPolicy":
        """This policy with ``path`` (if given) and ``kernel_blocks`` (if > 0) in place of its own."""
        _check_kernel_blocks(kernel_blocks)
        if path is None and kernel_blocks == 0:
            return self
        return CopyPolicy(self.path if path is None else path, kernel_blocks or self.kernel_blocks, self.probe_bytes)

    def probe(self, nbytes: int) -> int:
        """Bytes of each of 'auto''s probes for a copy of ``nbytes``, a multiple of the probe alignment:
        ``probe_bytes`` where set, else ``AUTO_PROBE_BYTES`` cut to ``1/AUTO_PROBE_SHARE`` of the copy (not below
        ``AUTO_PROBE_FLOOR_BYTES``), since a probe through the slower path costs a copy its share of the time."""
        probe = self.probe_bytes or min(AUTO_PROBE_BYTES, max(AUTO_PROBE_FLOOR_BYTES, nbytes // AUTO_PROBE_SHARE))
        return probe // _PROBE_ALIGN * _PROBE_ALIGN


_move_policy: contextvars.ContextVar[CopyPolicy | None] = contextvars.ContextVar("memmgr_copy_policy", default=None)


def active_copy_policy() -> CopyPolicy | None:
    """The policy of the ``copy_policy_scope`` this code runs in (None outside any)."""
    return _move_policy.get()


def resolve_copy_policy(policy: CopyPolicy | None = None, *, where: str = "copy policy") -> CopyPolicy:
    """``policy`` if given, else the enclosing ``copy_policy_scope``'s, else ``CopyPolicy.from_env()`` read now."""
    if policy is None:
        return _move_policy.get() or CopyPolicy.from_env()
    if not isinstance(policy, CopyPolicy):
        raise MemmgrInputError(f"{where}: policy must be a memmgr.transfer.CopyPolicy or None, got "
                               f"{type(policy).__name__}; e.g. CopyPolicy('engine') or CopyPolicy.from_env()")
    return policy


@contextlib.contextmanager
def copy_policy_scope(policy: CopyPolicy | None = None) -> Iterator[CopyPolicy]:
    """Makes ``policy`` the one every ``issue_copy`` without a policy argument uses inside the block (in this thread
    or task). ``policy`` None: the enclosing scope's, else ``CopyPolicy.from_env()`` read once now. Yields it."""
    policy = resolve_copy_policy(policy, where="copy_policy_scope")
    token = _move_policy.set(policy)
    try:
        yield policy
    finally:
        _move_policy.reset(token)


def _record(direction: str, ran: str) -> None:
    with _state_lock:
        _last_paths[direction] = ran


def copy_paths_status() -> dict[str, object]:
    """Which copy paths can run here, what 'auto' does per direction, which path ran last in each direction, and the
    last auto probe per device."""
    kernels = kernels_available()
    with _state_lock:
        last = dict(_last_paths)
        probes = {dev: dict(p) for dev, p in _last_probe.items()}
    return {"available": ["engine", "kernel"] if kernels else ["engine"],
            "requested": os.environ.get(COPY_PATH_ENV) or "auto",
            "auto": dict(AUTO_POLICY) if kernels else {"h2d": "engine", "d2h": "engine"},
            "last": last, "last_probe": probes, "kernel_shape": copy_shape.shape_status()}


register_copy_paths_status(copy_paths_status)


def _direction(dst: torch.Tensor, src: torch.Tensor) -> str:
    if dst.is_cuda and not src.is_cuda:
        return "h2d"
    if src.is_cuda and not dst.is_cuda:
        return "d2h"
    return "d2d" if dst.is_cuda else "h2h"


def _check_views(dst: torch.Tensor, src: torch.Tensor) -> None:
    for name, t in (("dst", dst), ("src", src)):
        if t.dtype != torch.uint8 or t.dim() != 1 or not t.is_contiguous():
            raise MemmgrInputError(f"issue_copy: {name} must be a contiguous 1-D uint8 view, got {t.dtype} of shape "
                                   f"{tuple(t.shape)}; pass tensor.view(torch.uint8) of a contiguous tensor")
    if dst.numel() != src.numel():
        raise MemmgrInputError(f"issue_copy: dst holds {dst.numel()} bytes but src {src.numel()}; pass views of the "
                               f"same size")


def issue_copy(dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream, *, policy: CopyPolicy | None = None,
               path: str | None = None, kernel_blocks: int = 0) -> str:
    """Issues the copy of ``src`` into ``dst`` on ``stream``, asynchronously, and returns the path that moved the bulk.

    ``dst`` and ``src`` are contiguous 1-D uint8 views of equal size; one of them is on the stream's GPU and the other
    is host memory (or also on that GPU). The copy is complete once the work enqueued on ``stream`` up to the return
    is. ``policy`` (else the one of the ``copy_policy_scope`` around the call, else ``CopyPolicy.from_env()`` read for
    this copy) picks the copy engines or the copy kernel; ``path`` and ``kernel_blocks`` > 0 override its fields.
    "auto" does what ``AUTO_POLICY`` says per direction, and when it probes (see there) it waits a few milliseconds
    for the probe. Where the kernel cannot run (no extension, pageable host memory, host<->host or device<->device),
    the engines move everything, whatever was asked. Returns "engine", "kernel" or, where 'auto' ran both at once,
    "split".
    """
    _check_views(dst, src)
    policy = resolve_copy_policy(policy, where="issue_copy").with_overrides(path, kernel_blocks)
    kernel_blocks = policy.kernel_blocks
    direction = _direction(dst, src)
    nbytes = dst.numel()
    chosen = policy.path
    if direction not in ("h2d", "d2h") or nbytes == 0 or not kernels_available():
        chosen = "engine"
    elif not (src if direction == "h2d" else dst).is_pinned():
        chosen = "engine"  # the kernels reach pinned host memory only; a pageable fallback buffer takes the engines
    if chosen == "auto":
        if AUTO_POLICY.get(direction) == "probe":
            return _issue_auto_probed(dst, src, stream, direction, kernel_blocks, policy.probe(nbytes))
        chosen = AUTO_POLICY.get(direction, "engine")
    chosen = _issue(dst, src, stream, chosen, kernel_blocks)
    _record(direction, chosen)
    return chosen


def _issue(dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream, chosen: str, kernel_blocks: int) -> str:
    """Enqueues one path ("engine" or "kernel") on ``stream``; returns the path that ran (the engines if the kernel
    could not be launched)."""
    if chosen == "kernel":
        try:
            _issue_kernel(dst, src, stream, kernel_blocks)
            return "kernel"
        except RuntimeError as exc:
            # Nothing was enqueued (the extension checks before it launches): the engines take the bytes.
            _warn_kernel_failure(exc)
    if dst.numel() > 0:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
    return "engine"


def _issue_auto_probed(dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream, direction: str,
                       kernel_blocks: int, probe: int) -> str:
    device = stream.device.index if stream.device.index is not None else torch.cuda.current_device()
    shape = copy_shape.shape_for(device)
    if shape.kernel_holds_link is False:  # the kernel is slower than the link on this card (see AUTO_POLICY)
        return _issue_engines_or_split(dst, src, stream, direction, kernel_blocks, device, shape, probe)
    nbytes = dst.numel()
    with _state_lock:
        verdict = str(_last_probe.get(device, {}).get("verdict", "engine"))
    if probe <= 0 or nbytes < max(AUTO_PROBE_MIN_BYTES, 2 * probe) or not stream.query():
        # Too small to measure, or queued behind other work (waiting would stall the caller): the last verdict.
        ran = _issue(dst, src, stream, verdict, kernel_blocks)
        _record(direction, f"{ran} (auto, last probe)")
        return ran
    ran_probes: list[str] = []
    engine_s, kernel_s = _timed(stream, lambda: _issue(dst[:probe], src[:probe], stream, "engine", kernel_blocks),
                                lambda: ran_probes.append(_issue(dst[probe:2 * probe], src[probe:2 * probe], stream,
                                                                 "kernel", kernel_blocks)))
    kernel_ran = ran_probes == ["kernel"]  # else it could not launch and the engines did its part
    engine_gbps = probe / engine_s / 1e9 if engine_s > 0 else float("inf")
    kernel_gbps = probe / kernel_s / 1e9 if kernel_s > 0 else float("inf")
    verdict = "kernel" if kernel_ran and kernel_gbps > AUTO_KERNEL_MARGIN * engine_gbps else "engine"
    with _state_lock:
        _last_probe[device] = {"verdict": verdict, "engine_gbps": engine_gbps, "kernel_gbps": kernel_gbps,
                               "probe_bytes": probe}
    ran = _issue(dst[2 * probe:], src[2 * probe:], stream, verdict, kernel_blocks)
    _record(direction, f"{ran} (auto, probe: engines {engine_gbps:.1f} GB/s, kernel {kernel_gbps:.1f} GB/s)")
    logger.debug("copy-path probe on cuda:%d: engines %.1f GB/s, kernel %.1f GB/s -> %s", device, engine_gbps,
                 kernel_gbps, ran)
    return ran


def _timed(stream: torch.cuda.Stream, *issues: Callable[[], object]) -> list[float]:
    """Seconds each of ``issues`` takes on the device, for the work each enqueues on ``stream`` one after the other;
    waits once, for the last."""
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(len(issues) + 1)]
    marks[0].record(stream)
    for issue, mark in zip(issues, marks[1:]):
        issue()
        mark.record(stream)
    marks[-1].synchronize()
    return [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]


def _issue_split(dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream, fraction: float,
                 kernel_blocks: int) -> str:
    """The engines on the first ``fraction`` of the bytes (on ``stream``) and the kernel on the rest (on a helper
    stream) at once; ``stream`` waits for both. Returns "split", or "engine" if the kernel could not launch."""
    cut = int(dst.numel() * fraction) // _PROBE_ALIGN * _PROBE_ALIGN
    helper = copy_stream(stream.device, "h2d-split")
    helper.wait_stream(stream)
    _issue(dst[:cut], src[:cut], stream, "engine", kernel_blocks)
    ran = _issue(dst[cut:], src[cut:], helper, "kernel", kernel_blocks)
    stream.wait_stream(helper)
    return "split" if ran == "kernel" else "engine"


def _issue_engines_or_split(dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream, direction: str,
                            kernel_blocks: int, device: int, shape: "copy_shape.ShapeChoice", probe: int) -> str:
    """'auto' host->device where the kernel cannot hold the link (see AUTO_POLICY): the engines, or both paths at
    once where a probe of each says so."""
    nbytes = dst.numel()
    with _state_lock:
        last = dict(_last_probe.get(device, {}))
    if last.get("verdict") not in ("engine", "split"):
        last = {"verdict": "engine", "fraction": 1.0}
    if probe <= 0 or nbytes < 3 * probe or not stream.query():
        # Too small to measure, or queued behind other work (waiting would stall the caller): the last verdict.
        ran = _issue_split(dst, src, stream, float(last["fraction"]), kernel_blocks) if last["verdict"] == "split" \
            else _issue(dst, src, stream, "engine", kernel_blocks)
        _record(direction, f"{ran} (auto, last probe)")
        return ran
    link = float(shape.link_gbps or 0.0)
    kernel_gbps = float(shape.h2d_gbps.get(shape.shape.label, 0.0))
    (engine_s,) = _timed(stream, lambda: _issue(dst[:probe], src[:probe], stream, "engine", kernel_blocks))
    engine_gbps = probe / engine_s / 1e9 if engine_s > 0 else float("inf")
    verdict, fraction, split_gbps, done = "engine", 1.0, None, probe
    if engine_gbps < AUTO_ENGINES_HEALTHY * link and kernel_gbps > 0:
        fraction = engine_gbps / (engine_gbps + kernel_gbps)
        part = slice(probe, 2 * probe)
        (split_s,) = _timed(stream, lambda: _issue_split(dst[part], src[part], stream, fraction, kernel_blocks))
        split_gbps = probe / split_s / 1e9 if split_s > 0 else float("inf")
        verdict = "split" if split_gbps > AUTO_SPLIT_MARGIN * engine_gbps else "engine"
        done = 2 * probe
    with _state_lock:
        _last_probe[device] = {"verdict": verdict, "fraction": fraction, "engine_gbps": engine_gbps,
                               "split_gbps": split_gbps, "probe_bytes": probe}
    ran = _issue_split(dst[done:], src[done:], stream, fraction, kernel_blocks) if verdict == "split" \
        else _issue(dst[done:], src[done:], stream, "engine", kernel_blocks)
    both = "" if split_gbps is None else f", both at once {split_gbps:.1f} GB/s"
    _record(direction, f"{ran} (auto: the copy kernel holds {kernel_gbps:.1f} GB/s here, the link "
                       f"{link:.1f}; probe: engines {engine_gbps:.1f} GB/s{both})")
    return ran


def _issue_kernel(dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream, kernel_blocks: int) -> None:
    """Launches the copy kernel on all of ``dst``'s bytes, on ``stream``."""
    native = native_module()
    device = stream.device.index if stream.device.index is not None else torch.cuda.current_device()
    prepare_kernels(device)
    shape = copy_shape.shape_for(device).shape
    blocks = kernel_blocks or shape.blocks(torch.cuda.get_device_properties(device).multi_processor_count)
    shape.launch(native, dst.data_ptr(), src.data_ptr(), dst.numel(), stream.cuda_stream, device, blocks)


def _warn_kernel_failure(exc: Exception) -> None:
    global _warned_kernel_failure
    if not _warned_kernel_failure:
        _warned_kernel_failure = True
        logger.warning("the copy kernel could not run (%s); the copy engines move these bytes instead. Set "
                       "MEMMGR_COPY_PATH=engine to stop trying the kernel.", exc)
