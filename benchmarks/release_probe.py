"""What the extra wait of a release (``cudaFree``) after another process's release depends on (GPU; issue 16).

After the helper process (``EngineStandIn``) took memory and released it, this process's ``torch.cuda.empty_cache``
of memory it allocated afterwards took tens of ms more than after a pause (``offload_phases.py``). Each row here is
one trial: a condition (``engine``: the helper takes ``engine_gib`` (0: all that is free) and releases it;
``pause``: 0.5 s in this process), then ``alloc_at_s`` later one block of ``gib`` allocated through PyTorch (or
through its expandable segments, ``vmm``) and written, optionally a 2 MiB block allocated and released right after
(``absorb``, timed), then ``free_after_s`` later the block freed and ``empty_cache`` timed (``release_ms``), with
the time since the condition (``since_release_s``). It answers: does the wait fall with the time since the other
release, grow with the bytes the other process released, belong to memory allocated right after that release, go
away with virtual-memory mappings, or go to the first small release after it?

Writes ``release_probe.json`` under ``--out``.

    python benchmarks/release_probe.py --out DIR
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable

import lab
import torch


def _trial(device: torch.device, engine, *, condition: str, engine_gib: float, gib: float, alloc_at_s: float,
           free_after_s: float, absorb: bool = False, vmm: bool = False, write: bool = True) -> dict:
    if condition == "engine":
        engine.cycle(None if engine_gib == 0 else int(engine_gib * lab.GiB))
    else:
        time.sleep(0.5)
    t_release = time.perf_counter()
    time.sleep(alloc_at_s)
    if vmm:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    t0 = time.perf_counter()
    block = torch.empty(int(gib * lab.GiB), dtype=torch.uint8, device=device)
    if write:
        block.fill_(7)
    torch.cuda.synchronize(device)
    alloc_ms = (time.perf_counter() - t0) * 1e3
    if vmm:
        torch.cuda.memory._set_allocator_settings("expandable_segments:False")
    absorb_ms = None
    if absorb:
        t0 = time.perf_counter()
        probe = torch.empty(2 << 20, dtype=torch.uint8, device=device)
        del probe
        torch.cuda.empty_cache()
        absorb_ms = (time.perf_counter() - t0) * 1e3
    time.sleep(max(0.0, free_after_s - (time.perf_counter() - t_release - alloc_at_s)))
    since = time.perf_counter() - t_release
    del block
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    torch.cuda.empty_cache()
    release_ms = (time.perf_counter() - t0) * 1e3
    return {"condition": condition, "engine_gib": engine_gib, "gib": gib, "alloc_at_s": alloc_at_s,
            "free_after_s": free_after_s, "absorb": absorb, "vmm": vmm, "write": write, "alloc_ms": alloc_ms,
            "absorb_ms": absorb_ms,
            "since_release_s": since, "release_ms": release_ms, "engine_held_gb": engine.last_occupied_bytes / lab.GB
            if condition == "engine" else 0.0}


def _recovery(device: torch.device, engine, engine_gib: float, host: torch.Tensor,
              warm: torch.Tensor | None) -> dict:
    """After the helper took ``engine_gib`` (0: all) and released it: 256 MiB host->device copies through the copy
    engines back to back for 2 s, each timed by events, into ``warm`` (allocated long before) or, if None, into a
    block allocated right after the release; the time until they run at 0.9x the last one's speed."""
    engine.cycle(None if engine_gib == 0 else int(engine_gib * lab.GiB))
    t_release = time.perf_counter()
    dev = warm if warm is not None else torch.empty(host.numel(), dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    points = []
    while time.perf_counter() - t_release < 2.0:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        with torch.cuda.stream(stream):
            dev.copy_(host, non_blocking=True)
        end.record(stream)
        end.synchronize()
        points.append((time.perf_counter() - t_release, host.numel() / (start.elapsed_time(end) / 1e3) / lab.GB))
    settled = points[-1][1]
    recovered_at = next(t for t, gbps in points if gbps >= 0.9 * settled)
    return {"engine_gib": engine_gib, "fresh": warm is None, "engine_held_gb": engine.last_occupied_bytes / lab.GB,
            "points": points, "first_gbps": points[0][1], "settled_gbps": settled, "recovered_at_s": recovered_at}


def _sleep_until(t_release: float, at_s: float) -> None:
    time.sleep(max(0.0, at_s - (time.perf_counter() - t_release)))


def _timed_release(device: torch.device) -> float:
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    torch.cuda.empty_cache()
    return (time.perf_counter() - t0) * 1e3


class _Driver:
    """The CUDA driver calls the tickle part makes itself, outside PyTorch's allocator: a 2 MiB cuMemAlloc/cuMemFree
    (``malloc``), or memmgr's driver settle call, one granule (2 MiB on an H200) of physical memory created and
    released, never mapped, so no device work to wait for (``vmm``)."""

    def __init__(self, device_index: int):
        import ctypes

        self.ctypes = ctypes
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.index = device_index
        self.size = 2 << 20

    def tickle(self, how: str) -> None:
        from memmgr.driver_settle import physical_allocation_roundtrip

        ct = self.ctypes
        if how == "malloc":
            ptr = ct.c_uint64()
            for rc, what in ((self.lib.cuMemAlloc_v2(ct.byref(ptr), ct.c_size_t(self.size)), "cuMemAlloc"),
                             (self.lib.cuMemFree_v2(ptr), "cuMemFree")):
                if rc != 0:
                    raise RuntimeError(f"{what} failed with CUDA driver error {rc}")
        elif how == "vmm":
            physical_allocation_roundtrip(self.lib, self.index)


def _tickle(device: torch.device, engine, driver: _Driver, condition: str, how: str, in_thread: bool,
            at_s: float) -> dict:
    """20 GiB allocated and written right after the condition; at ``at_s`` a 2 MiB driver allocation made and
    released (``how``: none, malloc, vmm), on this thread or (``in_thread``) on another while this one runs 60
    matmuls; at 1.5 s the 20 GiB released: whether the small driver call takes the release's extra wait, and
    whether it holds up the device's work when made on another thread."""
    t_release = lab.after_condition(engine, condition)
    big = torch.empty(20 * lab.GiB, dtype=torch.uint8, device=device)
    big.fill_(3)
    x = _matmul_operand(device)
    _sleep_until(t_release, at_s)
    tickle_ms: list[float] = []

    def run_tickle() -> None:
        torch.cuda.set_device(device)
        t0 = time.perf_counter()
        driver.tickle(how)
        tickle_ms.append((time.perf_counter() - t0) * 1e3)

    if not in_thread:
        run_tickle()
    matmul_ms = _matmuls_beside(x, run_tickle if in_thread else None)
    del x
    _sleep_until(t_release, max(1.5, at_s + 0.5))
    del big
    big_ms = _timed_release(device)
    return {"condition": condition, "how": how, "in_thread": in_thread, "at_s": at_s, "tickle_ms": tickle_ms[0],
            "matmul_ms": matmul_ms, "big_ms": big_ms}


def _small_and_large(device: torch.device) -> list[torch.Tensor]:
    """A 32 MiB block and a 20 GiB block, written; only the returned list refers to them."""
    held = [torch.empty(32 * lab.MiB, dtype=torch.uint8, device=device),
            torch.empty(20 * lab.GiB, dtype=torch.uint8, device=device)]
    for i in range(len(held)):
        held[i].fill_(3)
    return held


def _matmul_operand(device: torch.device) -> torch.Tensor:
    x = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        x @ x
    torch.cuda.synchronize(device)
    return x


def _matmuls_beside(x: torch.Tensor, side: Callable[[], None] | None) -> float:
    """Runs 60 matmuls of ``x`` while ``side`` (if given) runs on another thread; returns the matmuls' wall ms."""
    thread = threading.Thread(target=side) if side is not None else None
    t0 = time.perf_counter()
    if thread is not None:
        thread.start()
    for _ in range(60):
        x @ x
    torch.cuda.synchronize(x.device)
    matmul_ms = (time.perf_counter() - t0) * 1e3
    if thread is not None:
        thread.join()
    return matmul_ms


def _sentinel(device: torch.device, engine, condition: str, sentinel_at_s: float, big_at_s: float) -> dict:
    """A 32 MiB block and a 20 GiB block allocated and written right after the condition; the small one released
    at ``sentinel_at_s``, the large one at ``big_at_s``: whether a first release takes the extra wait for both."""
    t_release = lab.after_condition(engine, condition)
    held = _small_and_large(device)
    _sleep_until(t_release, sentinel_at_s)
    del held[0]
    sentinel_ms = _timed_release(device)
    _sleep_until(t_release, big_at_s)
    held.clear()
    big_ms = _timed_release(device)
    return {"condition": condition, "sentinel_at_s": sentinel_at_s, "big_at_s": big_at_s, "sentinel_ms": sentinel_ms,
            "big_ms": big_ms}


def _background(device: torch.device, engine, condition: str, free_in_thread: bool) -> dict:
    """Memory allocated right after the condition; 1 s later the main thread runs 60 matmuls while (if
    ``free_in_thread``) another thread releases a 32 MiB block allocated with it: whether that release holds up the
    device's other work, and whether the later release of the rest is then quick."""
    t_release = lab.after_condition(engine, condition)
    held = _small_and_large(device)
    x = _matmul_operand(device)
    _sleep_until(t_release, 1.0)
    thread_ms: list[float] = []

    def release_small() -> None:
        t0 = time.perf_counter()
        torch.cuda.empty_cache()
        thread_ms.append((time.perf_counter() - t0) * 1e3)

    if free_in_thread:
        del held[0]
    matmul_ms = _matmuls_beside(x, release_small if free_in_thread else None)
    del x
    _sleep_until(t_release, 1.5)
    held.clear()
    big_ms = _timed_release(device)
    return {"condition": condition, "free_in_thread": free_in_thread, "matmul_ms": matmul_ms,
            "thread_ms": thread_ms[0] if thread_ms else None, "big_ms": big_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--parts", default=os.environ.get("MEMMGR_PROBE_PARTS", "trials,recovery"),
                        help="comma-separated: trials, recovery, sentinel, background, nowrite, async, tickle")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not torch.cuda.is_available():
        sys.exit("release_probe.py needs a GPU")
    from memmgr.tools.engine_standin import EngineStandIn

    device = torch.device("cuda", 0)
    torch.empty(1, device=device)
    # the helper keeps the default allocator whatever this process runs on
    os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    plan: list[tuple[str, dict]] = []
    if "nowrite" in parts:
        for condition in ("engine", "pause"):
            plan.append(("nowrite", dict(condition=condition, engine_gib=0, gib=20, alloc_at_s=0.0, free_after_s=1.0,
                                         write=False)))
            plan.append(("write", dict(condition=condition, engine_gib=0, gib=20, alloc_at_s=0.0, free_after_s=1.0)))
    if "async" in parts:  # this process on PyTorch's cudaMallocAsync backend (set by the parent), the helper not
        for condition in ("engine", "pause"):
            plan.append(("async", dict(condition=condition, engine_gib=0, gib=20, alloc_at_s=0.0, free_after_s=1.0)))
    if "trials" in parts:
        # time since the other release, for a 20 GiB block allocated right after it
        for free_after in (0.1, 0.5, 1.0, 3.0):
            for condition in ("engine", "pause"):
                plan.append(("since", dict(condition=condition, engine_gib=0, gib=20, alloc_at_s=0.0,
                                           free_after_s=free_after)))
        # memory allocated 2 s after the other release, freed soon after
        for free_after in (0.1, 1.0):
            plan.append(("late_alloc", dict(condition="engine", engine_gib=0, gib=20, alloc_at_s=2.0,
                                            free_after_s=free_after)))
        # the other process's size
        for engine_gib in (4, 16, 48):
            plan.append(("engine_size", dict(condition="engine", engine_gib=engine_gib, gib=20, alloc_at_s=0.0,
                                             free_after_s=1.0)))
        # this process's size
        for gib in (0.002, 1, 60):
            for condition in ("engine", "pause"):
                plan.append(("own_size", dict(condition=condition, engine_gib=0, gib=gib, alloc_at_s=0.0,
                                              free_after_s=1.0)))
        # a small release right after the allocation
        for condition in ("engine", "pause"):
            plan.append(("absorb", dict(condition=condition, engine_gib=0, gib=20, alloc_at_s=0.0, free_after_s=1.0,
                                        absorb=True)))
        # virtual-memory mappings (PyTorch's expandable segments: cuMemCreate/cuMemMap, released by cuMemUnmap/Release)
        for condition in ("engine", "pause"):
            plan.append(("vmm", dict(condition=condition, engine_gib=0, gib=20, alloc_at_s=0.0, free_after_s=1.0,
                                     vmm=True)))

    out: dict = {"meta": lab.metadata(), "rows": []}
    engine = EngineStandIn(device)
    try:
        for rep in range(args.repeats):
            for part, kw in plan:
                row = {"part": part, "repeat": rep, **_trial(device, engine, **kw)}
                out["rows"].append(row)
                held = "" if row["condition"] == "pause" else f" {row['engine_held_gb']:.0f} GB"
                absorbed = "" if row["absorb_ms"] is None else f", absorb {row['absorb_ms']:.1f} ms"
                print(f"{part} {row['condition']}{held}: {row['gib']:g} GiB{' vmm' if row['vmm'] else ''} at "
                      f"+{row['alloc_at_s']:g} s (alloc {row['alloc_ms']:.1f} ms{absorbed}), freed "
                      f"{row['since_release_s']:.2f} s after the release: {row['release_ms']:.2f} ms", flush=True)
        for rep in range(args.repeats):
            for condition in ("engine", "pause") if "sentinel" in parts else ():
                for sentinel_at, big_at in ((0.3, 1.5), (1.0, 1.5), (1.0, 1.02)):
                    row = {"repeat": rep, **_sentinel(device, engine, condition, sentinel_at, big_at)}
                    out.setdefault("sentinel", []).append(row)
                    print(f"sentinel {condition}: 32 MiB released at {sentinel_at:g} s in {row['sentinel_ms']:.2f} "
                          f"ms, then 20 GiB at {big_at:g} s in {row['big_ms']:.2f} ms", flush=True)
            for condition in ("engine", "pause") if "background" in parts else ():
                for free_in_thread in (False, True):
                    row = {"repeat": rep, **_background(device, engine, condition, free_in_thread)}
                    out.setdefault("background", []).append(row)
                    thread = "" if row["thread_ms"] is None else f", the thread's release {row['thread_ms']:.2f} ms"
                    print(f"background {condition}{' with a release in a thread' if free_in_thread else ''}: 60 "
                          f"matmuls {row['matmul_ms']:.1f} ms{thread}; 20 GiB released in {row['big_ms']:.2f} ms",
                          flush=True)
        driver = _Driver(device.index or 0)
        for rep in range(args.repeats if "tickle" in parts else 0):
            for condition in ("engine", "pause"):
                for how, in_thread, at_s in (("none", False, 1.0), ("malloc", False, 1.0), ("vmm", False, 1.0),
                                             ("malloc", True, 1.0), ("vmm", True, 1.0), ("vmm", False, 0.2)):
                    row = {"repeat": rep, **_tickle(device, engine, driver, condition, how, in_thread, at_s)}
                    out.setdefault("tickle", []).append(row)
                    print(f"tickle {condition} {how}{' in a thread' if in_thread else ''} at {at_s:g} s: "
                          f"{row['tickle_ms']:.2f} ms; 60 matmuls {row['matmul_ms']:.1f} ms; then 20 GiB released "
                          f"in {row['big_ms']:.2f} ms", flush=True)
        host = torch.empty(256 * lab.MiB, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(256 * lab.MiB, dtype=torch.uint8, device=device)
        for rep in range(args.repeats if "recovery" in parts else 0):
            for engine_gib, into in ((4, None), (16, None), (48, None), (0, None), (0, dev)):
                row = {"repeat": rep, **_recovery(device, engine, engine_gib, host, into)}
                torch.cuda.empty_cache()
                out.setdefault("recovery", []).append(row)
                print(f"median recovery after {row['engine_held_gb']:.0f} GB released, into "
                      f"{'new' if row['fresh'] else 'old'} memory: engines at "
                      f"{row['first_gbps']:.1f} GB/s at first, 0.9x of {row['settled_gbps']:.1f} after "
                      f"{row['recovered_at_s']:.2f} s", flush=True)
    finally:
        engine.close()
    keys = sorted({(r["part"], r["condition"], r["engine_gib"], r["gib"], r["alloc_at_s"], r["free_after_s"],
                    r["absorb"], r["vmm"]) for r in out["rows"]}, key=str)
    for key in keys:
        rows = [r for r in out["rows"] if (r["part"], r["condition"], r["engine_gib"], r["gib"], r["alloc_at_s"],
                                           r["free_after_s"], r["absorb"], r["vmm"]) == key]
        print(f"median {key}: release {statistics.median(r['release_ms'] for r in rows):.2f} ms", flush=True)
    lab.write_json(f"{args.out}/release_probe{'_async' if 'async' in parts else ''}.json", out)
    if "async" in parts or not parts & {"trials", "sentinel", "background", "nowrite"}:
        return
    # the same release on PyTorch's cudaMallocAsync backend (stream-ordered pool, trimmed by empty_cache): a process
    # of its own, since the backend is chosen at CUDA's start
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="backend:cudaMallocAsync")
    subprocess.run([sys.executable, __file__, "--out", args.out, "--repeats", str(args.repeats), "--parts", "async"],
                   env=env, check=False)


if __name__ == "__main__":
    main()
