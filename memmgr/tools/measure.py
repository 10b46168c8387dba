"""Measurements of the host<->device link and of pinning cost, shared by ``memmgr doctor`` and the benchmarks.

Speeds are in GB/s (1e9 bytes per second); pinning cost is in
seconds per GiB. Every function needs a CUDA GPU (``measure_pinning_speed`` measures what it can without one) and
frees what it allocated before returning.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from memmgr._native import native_module
from memmgr.host_memory import HostBuffer, allocate_host_buffer

logger = logging.getLogger("memmgr")

GiB = 1 << 30
MiB = 1 << 20


def _cuda_device(device: torch.device | str | int | None) -> torch.device:
    if not torch.cuda.is_available():
        raise RuntimeError("this measurement needs a CUDA GPU, and torch sees none")
    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    if isinstance(device, int):
        return torch.device("cuda", device)
    device = torch.device(device)
    if device.type != "cuda":
        raise RuntimeError(f"this measurement needs a CUDA device, got {device}")
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


def _release_host_caches() -> None:
    """Gives PyTorch's cached pinned host blocks back (torch.empty(pin_memory=True) keeps them)."""
    fn = getattr(torch._C, "_host_emptyCache", None)
    if fn is not None:
        try:
            fn()
        except Exception:
            pass


def _timed_copy(dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream) -> tuple[Any, Any]:
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        start.record(stream)
        dst.copy_(src, non_blocking=True)
        end.record(stream)
    return start, end


def measure_pinned_peak(nbytes: int = GiB, device: torch.device | str | int | None = None, iters: int = 3,
                        warmup: int = 1) -> dict[str, Any]:
    """The pinned-copy peak of the link: one ``nbytes`` copy device->host and host->device (best of ``iters``), and
    both directions at once on two streams (``both`` is the sum of the two directions' bytes over the wall time).

    Returns ``{"d2h", "h2d", "both", "both_d2h", "both_h2d"}`` in GB/s plus ``nbytes``, ``device`` and ``pinned``
    (False when pinning failed and the host buffers fell back to pageable memory: then these are pageable speeds).
    """
    dev = _cuda_device(device)
    bufs: list[HostBuffer] = []
    try:
        with torch.cuda.device(dev):
            host_a = allocate_host_buffer(nbytes, pin=True)
            bufs.append(host_a)
            host_b = allocate_host_buffer(nbytes, pin=True)
            bufs.append(host_b)
            dev_a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
            dev_b = torch.empty(nbytes, dtype=torch.uint8, device=dev)
            dev_a.fill_(1)
            dev_b.fill_(2)
            s1 = torch.cuda.Stream(device=dev)
            s2 = torch.cuda.Stream(device=dev)
            torch.cuda.synchronize(dev)

            def one_way(dst: torch.Tensor, src: torch.Tensor) -> float:
                best = 0.0
                for i in range(warmup + iters):
                    start, end = _timed_copy(dst, src, s1)
                    end.synchronize()
                    secs = start.elapsed_time(end) / 1e3
                    if i >= warmup and secs > 0:
                        best = max(best, nbytes / secs / 1e9)
                return best

            d2h = one_way(host_a.tensor, dev_a)
            h2d = one_way(dev_b, host_b.tensor)

            best_both = best_d2h = best_h2d = 0.0
            for i in range(warmup + iters):
                torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                e1 = _timed_copy(host_a.tensor, dev_a, s1)
                e2 = _timed_copy(dev_b, host_b.tensor, s2)
                torch.cuda.synchronize(dev)
                wall = time.perf_counter() - t0
                if i < warmup:
                    continue
                if wall > 0 and 2 * nbytes / wall / 1e9 > best_both:
                    best_both = 2 * nbytes / wall / 1e9
                    best_d2h = nbytes / (e1[0].elapsed_time(e1[1]) / 1e3) / 1e9
                    best_h2d = nbytes / (e2[0].elapsed_time(e2[1]) / 1e3) / 1e9
            pinned = host_a.pinned and host_b.pinned
            del dev_a, dev_b
        return {"nbytes": nbytes, "device": str(dev), "pinned": pinned, "d2h": d2h, "h2d": h2d,
                "both": best_both, "both_d2h": best_d2h, "both_h2d": best_h2d}
    finally:
        for b in bufs:
            b.release()
        torch.cuda.empty_cache()


def measure_pageable_copy(nbytes: int = GiB, device: torch.device | str | int | None = None,
                          iters: int = 2) -> dict[str, Any]:
    """Copies into and out of ordinary (pageable) host memory, best of ``iters``, GB/s: the speed of a fallback."""
    dev = _cuda_device(device)
    host = torch.empty(nbytes, dtype=torch.uint8)
    host.fill_(3)  # touch it, so page faults are not timed
    gpu = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    try:
        best = {"d2h": 0.0, "h2d": 0.0}
        for _ in range(iters):
            for key, dst, src in (("d2h", host, gpu), ("h2d", gpu, host)):
                torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                dst.copy_(src)
                torch.cuda.synchronize(dev)
                secs = time.perf_counter() - t0
                if secs > 0:
                    best[key] = max(best[key], nbytes / secs / 1e9)
        return {"nbytes": nbytes, "device": str(dev), **best}
    finally:
        del gpu
        torch.cuda.empty_cache()


def measure_pinning_speed(nbytes: int = GiB, num_threads: int | None = None) -> dict[str, Any]:
    """Seconds per GiB to get pinned host memory: with the native extension (parallel first touch +
    cudaHostRegister), with ``torch.empty(..., pin_memory=True)``, and with memmgr's pure-Python path (torch tensor +
    cudaHostRegister). A value is None when that path is unavailable (no CUDA, extension not built) or failed; the
    reason is under ``errors``."""
    from memmgr.host_memory import DEFAULT_TOUCH_THREADS

    threads = num_threads or DEFAULT_TOUCH_THREADS
    gib = nbytes / GiB
    out: dict[str, Any] = {"nbytes": nbytes, "native": None, "torch_pin_memory": None, "cudart_register": None,
                           "errors": {}}
    cuda = torch.cuda.is_available()
    if not cuda:
        out["errors"]["all"] = "no CUDA GPU: host memory cannot be pinned"
        return out
    torch.cuda.init()
    native = native_module()
    if native is None:
        out["errors"]["native"] = "extension not built"
    else:
        try:
            t0 = time.perf_counter()
            t = native.allocate(nbytes, threads, True, True)
            out["native"] = (time.perf_counter() - t0) / gib
            del t
        except Exception as exc:
            out["errors"]["native"] = f"{type(exc).__name__}: {exc}"
    try:
        t0 = time.perf_counter()
        t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        out["torch_pin_memory"] = (time.perf_counter() - t0) / gib
        del t
        _release_host_caches()
    except Exception as exc:
        out["errors"]["torch_pin_memory"] = f"{type(exc).__name__}: {exc}"
    try:
        t0 = time.perf_counter()
        t = torch.empty(nbytes, dtype=torch.uint8)
        ptr = t.data_ptr()
        err = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))
        if err != 0:
            raise RuntimeError(f"cudaHostRegister returned error {err}")
        out["cudart_register"] = (time.perf_counter() - t0) / gib
        torch.cuda.cudart().cudaHostUnregister(ptr)
        del t
    except Exception as exc:
        out["errors"]["cudart_register"] = f"{type(exc).__name__}: {exc}"
    return out


def check_pinning(nbytes: int = 64 * MiB) -> dict[str, Any]:
    """Allocates one host buffer the way memmgr does and says whether it came out pinned (``kind`` names the path;
    "pageable-fallback" means offload would run at pageable speed)."""
    if not torch.cuda.is_available():
        return {"pinned": False, "kind": "none (no CUDA)", "error": None}
    try:
        buf = allocate_host_buffer(nbytes, pin=True)
        result = {"pinned": buf.pinned, "kind": buf.kind, "error": None}
        buf.release()
        return result
    except Exception as exc:
        return {"pinned": False, "kind": "failed", "error": f"{type(exc).__name__}: {exc}"}


# Usable bandwidth of a PCIe link per lane and direction after encoding, GB/s.
PCIE_LANE_GBPS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}


def pcie_theoretical_gbps(gen: int | None, width: int | None) -> float | None:
    """The link's raw per-direction bandwidth (before packet overhead; copies reach about 85% of it)."""
    if not gen or not width or gen not in PCIE_LANE_GBPS:
        return None
    return PCIE_LANE_GBPS[gen] * width
