"""The copy kernel's launch shape on each device: blocks per multiprocessor and 16-byte vectors each thread loads
before it stores (``unroll``), chosen by a short measurement at the device's first kernel use and cached by device
UUID, driver and kernel build.

Why measure: the shape that held the link on the H200 (1 block per SM, 4 vectors per thread) read host memory at
~0.55x of the link on the H100 (issue 30). The measurement times host->device copies (the direction 'auto' gives the
kernel; ``memmgr.transfer``) of ``MEASURE_BYTES`` with every candidate shape and keeps the fastest; among shapes
within ``SHAPE_TOLERANCE`` of it, the one with the fewest bytes in flight (blocks x unroll), since a deeper queue on
the link makes allocations beside the kernel wait (H200: a 150 MiB allocation took ~3 ms beside a 2-blocks-per-SM
copy, ~1 ms at 1; csrc/copy_kernels.cu). On an H100 every shape ran at 0.54-0.57x (8 GiB, warm and right after
another process's release; benchmarks/results/2026-12-07/H100_SESSION.md): four to eight times the reads in flight
change nothing there, so the card's SMs, not the kernel's shape, set that ceiling.

It also times the copy engines device->host on the same bytes (``link_gbps``: that direction runs at the link's
speed whether or not memory was just released), so that ``kernel_holds_link`` says whether the kernel can keep up
with the link on this device at all: where it cannot (the H100), 'auto' leaves host->device copies to the engines,
which are never slower there for long (``memmgr.transfer``).

With ``MEMMGR_COPY_KERNEL_BULK=1``, on devices of compute capability 9.0 and later, the candidates also hold the
kernel's bulk variant (``B:bulk``: one thread per block moves 24 KiB chunks with ``cp.async.bulk``, four in flight
per block; csrc/copy_kernels.cu), whose link requests come from the bulk copy unit rather than from the threads'
16-byte loads. Every candidate's copy is checked byte for byte while it is measured: one that does not arrive intact
is never chosen.

``MEMMGR_COPY_SHAPE=B:U`` (blocks per SM, unroll; or ``B:bulk``) sets the shape without measuring;
``MEMMGR_COPY_SHAPE_CACHE`` names the cache file (default ``$XDG_CACHE_HOME/memmgr/copy_shapes.json``, else
``~/.cache/...``; ``off``: no file, each process measures once). A cache that cannot be read or written is ignored
with a warning: the shape is then measured.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from memmgr.errors import MemmgrInputError

logger = logging.getLogger("memmgr")

# Bump when the kernel or the candidates change: a cached choice names the build it was measured with.
KERNEL_BUILD = "copy-kernel-unroll-4-8-16-bulk+link+checked"
UNROLLS = (4, 8, 16)
BULK = "bulk"  # the second half of a bulk shape's label
# A bulk block's bytes in flight (4 x 24 KiB) in the vector kernel's units (256 threads x 16 bytes per unroll step)
BULK_DEPTH = 24
BLOCKS_PER_SM = (1, 2)
MEASURE_BYTES = 64 << 20
MEASURE_REPEATS = 3
SHAPE_TOLERANCE = 0.03
# The kernel holds the link when its best shape reaches this share of the engines' device->host speed on the same
# bytes. On 64 MiB the H200's kernel probe read 0.99-1.05x of the engines' (memmgr.transfer's AUTO_POLICY notes); the
# H100's best shape measured 33.4 GB/s on 64 MiB where its pinned peak is 55 GB/s (2026-12-07), about 0.6x. The
# engines' own 64 MiB device->host figure is not measured on either card yet: the threshold sits between the two.
KERNEL_LINK_SHARE = 0.85
LINK_KEY = "engines d2h"  # the key of the engines' speed in what ``measure`` returns


@dataclass(frozen=True, order=True)
class CopyShape:
    """A launch shape of the copy kernel: ``blocks_per_sm`` x the device's SMs blocks of 256 threads, each thread
    loading ``unroll`` 16-byte vectors before it stores them; or, with ``bulk``, as many blocks of the bulk variant
    (``unroll`` 0)."""

    blocks_per_sm: int
    unroll: int = 0
    bulk: bool = False

    def __post_init__(self) -> None:
        if self.blocks_per_sm < 1 or (self.unroll != 0 if self.bulk else self.unroll not in UNROLLS):
            raise MemmgrInputError(f"copy kernel shape {self.blocks_per_sm}:{self.unroll}: blocks per SM must be >= 1 "
                                   f"and the unroll one of {UNROLLS} (0 with bulk)")

    @property
    def label(self) -> str:
        return f"{self.blocks_per_sm}:{BULK if self.bulk else self.unroll}"

    @property
    def depth(self) -> int:
        """Relative bytes in flight per SM."""
        return self.blocks_per_sm * (BULK_DEPTH if self.bulk else self.unroll)

    def blocks(self, sm_count: int) -> int:
        return max(1, sm_count) * self.blocks_per_sm

    def launch(self, native, dst: int, src: int, nbytes: int, stream: int, device: int, blocks: int) -> None:
        """Copies ``nbytes`` from ``src`` to ``dst`` (device or mapped pinned host addresses) on the raw ``stream``
        with this shape's kernel and ``blocks`` blocks."""
        if self.bulk:
            native.bulk_kernel_copy(dst, src, nbytes, stream, device, blocks)
        else:
            native.kernel_copy(dst, src, nbytes, stream, device, blocks, self.unroll)

    @classmethod
    def parse(cls, text: str, where: str = "MEMMGR_COPY_SHAPE") -> "CopyShape":
        try:
            blocks, unroll = text.split(":")
            if unroll.strip() == BULK:
                return cls(int(blocks), 0, bulk=True)
            return cls(int(blocks), int(unroll))
        except ValueError:
            raise MemmgrInputError(f"{where}={text!r}: expected BLOCKS_PER_SM:UNROLL, e.g. 1:8 (unroll one of "
                                   f"{UNROLLS}, or {BULK})") from None


DEFAULT_SHAPE = CopyShape(1, 4)
CANDIDATES = tuple(CopyShape(b, u) for b in BLOCKS_PER_SM for u in UNROLLS)
BULK_CANDIDATES = tuple(CopyShape(b, 0, bulk=True) for b in BLOCKS_PER_SM)


def candidates_for(device: int) -> tuple[CopyShape, ...]:
    """The shapes measured on ``device``: the vector ones, and with ``MEMMGR_COPY_KERNEL_BULK=1`` the bulk ones where
    the device and the build run them. The bulk variant is opt-in until a GPU run has shown it copying intact on both
    cards: a fault inside a kernel would end the process's CUDA context, and this measurement runs in users' processes
    at their first kernel copy."""
    if os.environ.get("MEMMGR_COPY_KERNEL_BULK", "").strip() != "1":
        return CANDIDATES
    from memmgr._native import native_module
    native = native_module()
    bulk = native is not None and hasattr(native, "bulk_kernel_supported") and native.bulk_kernel_supported(device)
    return CANDIDATES + (BULK_CANDIDATES if bulk else ())


@dataclass(frozen=True)
class ShapeChoice:
    """The shape the kernel uses on a device, where it came from (``measured``, ``cache``, ``environment`` or
    ``default``, with why), the cache key, and the host->device speed of each candidate measured (GB/s by label)."""

    shape: CopyShape
    source: str
    key: str = ""
    h2d_gbps: dict[str, float] = field(default_factory=dict)
    link_gbps: float | None = None  # the copy engines device->host on the same bytes

    @property
    def kernel_holds_link(self) -> bool | None:
        """Whether the kernel's shape reached ``KERNEL_LINK_SHARE`` of the link (None: not measured)."""
        kernel = self.h2d_gbps.get(self.shape.label)
        if kernel is None or not self.link_gbps:
            return None
        return kernel >= KERNEL_LINK_SHARE * self.link_gbps

    def as_dict(self) -> dict[str, object]:
        return {"shape": self.shape.label, "blocks_per_sm": self.shape.blocks_per_sm, "unroll": self.shape.unroll,
                "bulk": self.shape.bulk,
                "source": self.source, "key": self.key, "h2d_gbps": dict(self.h2d_gbps), "link_gbps": self.link_gbps,
                "kernel_holds_link": self.kernel_holds_link}


def choose(speeds: dict[CopyShape, float], tolerance: float = SHAPE_TOLERANCE) -> CopyShape:
    """The fastest shape; among those within ``tolerance`` of it, the one with the fewest bytes in flight (then the
    fewest blocks)."""
    if not speeds:
        return DEFAULT_SHAPE
    best = max(speeds.values())
    close = [s for s, gbps in speeds.items() if gbps >= best * (1.0 - tolerance)]
    return min(close, key=lambda s: (s.depth, s.blocks_per_sm))


def cache_path() -> str | None:
    raw = os.environ.get("MEMMGR_COPY_SHAPE_CACHE", "").strip()
    if raw.lower() == "off":
        return None
    if raw:
        return raw
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "memmgr", "copy_shapes.json")


def read_cache(path: str | None) -> dict[str, dict]:
    if path is None or not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, ValueError) as exc:
        logger.warning("the copy-kernel shape cache %s cannot be read (%s); measuring instead", path, exc)
        return {}


def write_cache(path: str | None, key: str, choice: ShapeChoice) -> None:
    if path is None:
        return
    data = read_cache(path)
    data[key] = {"shape": choice.shape.label, "h2d_gbps": choice.h2d_gbps, "link_gbps": choice.link_gbps}
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: a process reading meanwhile sees the old file or the new one
    except OSError as exc:
        logger.warning("the copy-kernel shape cache %s cannot be written (%s); the next process measures again",
                       path, exc)


def device_key(device: int) -> str:
    """UUID, driver and kernel build: a cached shape holds for this card, this driver and this kernel only."""
    from memmgr import nvml
    props = torch.cuda.get_device_properties(device)
    uuid = str(getattr(props, "uuid", "")) or props.name
    return f"{uuid}|driver {nvml.driver_version() or torch.version.cuda}|{KERNEL_BUILD}"


def measure(device: int, nbytes: int = MEASURE_BYTES, repeats: int = MEASURE_REPEATS,
            candidates: tuple[CopyShape, ...] | None = None) -> dict[CopyShape | str, float] | None:
    """Host->device GB/s of each candidate (default: ``candidates_for(device)``): ``nbytes`` from pinned, mapped host
    memory into device memory, the median of ``repeats`` timed copies after one untimed one, on a cleared destination
    that must then equal the source (a candidate whose copy does not is left out, with a warning); and under
    ``LINK_KEY`` the copy engines' device->host GB/s on the same bytes. None while a CUDA graph is being captured (no
    copies or allocations may run then)."""
    if torch.cuda.is_current_stream_capturing():
        return None
    from memmgr._native import native_module
    from memmgr.host_memory import allocate_host_buffer
    native = native_module()
    candidates = candidates_for(device) if candidates is None else candidates
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    reserved = torch.cuda.memory_reserved(device)
    host = allocate_host_buffer(nbytes, pin=True, allow_pageable_fallback=False)
    host.tensor[: nbytes - nbytes % 4].view(torch.int32).copy_(torch.arange(nbytes // 4, dtype=torch.int32))
    dev = torch.empty(nbytes, dtype=torch.uint8, device=torch.device("cuda", device))
    stream = torch.cuda.Stream(device)
    speeds: dict[CopyShape | str, float] = {}
    expected = None

    def timed(copy: Callable[[], None]) -> float:
        times = []
        for i in range(repeats + 1):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            copy()
            end.record(stream)
            end.synchronize()
            if i:
                times.append(start.elapsed_time(end) / 1e3)
        return nbytes / statistics.median(times) / 1e9

    try:
        with torch.cuda.stream(stream):
            expected = host.tensor.to(dev.device, non_blocking=True)  # through the copy engines
        for shape in candidates:
            with torch.cuda.stream(stream):
                dev.zero_()
            gbps = timed(lambda: shape.launch(native, dev.data_ptr(), host.tensor.data_ptr(), nbytes,
                                              stream.cuda_stream, device, shape.blocks(sms)))
            with torch.cuda.stream(stream):
                intact = torch.equal(dev, expected)
            if intact:
                speeds[shape] = gbps
            else:
                logger.warning("the copy kernel's shape %s did not copy %d bytes intact on cuda:%d; it is not used",
                               shape.label, nbytes, device)
        with torch.cuda.stream(stream):
            speeds[LINK_KEY] = timed(lambda: host.tensor.copy_(dev, non_blocking=True))
    finally:
        stream.synchronize()
        dev = expected = None  # the buffers go before the cache is emptied below
        host.release()
        if torch.cuda.memory_reserved(device) > reserved:
            # the measurement's buffer took new memory from the driver: give it back rather than leave it cached
            torch.cuda.empty_cache()
    return speeds


class _Choices:
    """The choice per device, made once per process (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_device: dict[int, ShapeChoice] = {}

    def get(self, device: int,
            measure_fn: Callable[[int], dict[CopyShape | str, float] | None] | None = None) -> ShapeChoice:
        with self._lock:
            choice = self._by_device.get(device)
            if choice is None:
                choice = _decide(device, measure_fn or measure)
                if choice is None:
                    return ShapeChoice(DEFAULT_SHAPE, "default (a CUDA graph is being captured)")
                self._by_device[device] = choice
            return choice

    def snapshot(self) -> dict[int, ShapeChoice]:
        with self._lock:
            return dict(self._by_device)


_choices = _Choices()


def _decide(device: int, measure_fn: Callable[[int], dict[CopyShape | str, float] | None]) -> ShapeChoice | None:
    """The choice for ``device``, or None where it cannot be made now (a CUDA graph is being captured)."""
    forced = os.environ.get("MEMMGR_COPY_SHAPE", "").strip()
    if forced:
        return ShapeChoice(CopyShape.parse(forced), "environment (MEMMGR_COPY_SHAPE)")
    key = device_key(device)
    path = cache_path()
    cached = read_cache(path).get(key)
    if isinstance(cached, dict):
        try:
            link = cached.get("link_gbps")
            return ShapeChoice(CopyShape.parse(str(cached.get("shape")), where=f"{path}[{key!r}]"), "cache", key,
                               dict(cached.get("h2d_gbps") or {}), float(link) if link else None)
        except MemmgrInputError as exc:
            logger.warning("ignoring the cached copy-kernel shape (%s); measuring", exc)
    try:
        speeds = measure_fn(device)
    except Exception as exc:  # noqa: BLE001 - a tuning step must never stop a copy: the shape that held on the H200
        logger.warning("the copy kernel's launch shape could not be measured on cuda:%d (%s); using %s", device, exc,
                       DEFAULT_SHAPE.label)
        return ShapeChoice(DEFAULT_SHAPE, f"default (measurement failed: {exc})", key)
    if speeds is None:
        return None  # inside a capture: the default until the next kernel use outside one
    link = speeds.pop(LINK_KEY, None)
    shapes = {s: g for s, g in speeds.items() if isinstance(s, CopyShape)}
    choice = ShapeChoice(choose(shapes), "measured", key, {s.label: round(g, 2) for s, g in shapes.items()},
                         round(link, 2) if link else None)
    logger.info("copy kernel on cuda:%d: shape %s (blocks per SM : unroll) measured at %s GB/s host->device; copy "
                "engines %s GB/s device->host (the kernel %s the link)", device, choice.shape.label, choice.h2d_gbps,
                choice.link_gbps, {True: "holds", False: "does not hold", None: "?"}[choice.kernel_holds_link])
    write_cache(path, key, choice)
    return choice


def shape_for(device: int) -> ShapeChoice:
    """The kernel's launch shape on ``device``: from ``MEMMGR_COPY_SHAPE``, the cache, or a measurement now."""
    return _choices.get(device)


def shape_status() -> dict[str, dict[str, object]]:
    """The choices made in this process so far, by device, for reports."""
    return {f"cuda:{d}": c.as_dict() for d, c in sorted(_choices.snapshot().items())}
