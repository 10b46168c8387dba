"""Where do offload/onload lose time against the copy peak? python benchmarks/gpu_alloc_probe.py --out DIR [FLAG]

With no flag, on one GPU: profiler traces of memmgr's copies, cudaMalloc and cudaFree cost per GiB (through
PyTorch's allocator after empty_cache), whether an allocation waits for an in-flight copy, onload strategies
(allocate-then-copy interleaved per bucket, all allocations first, no allocation at all), offload with and without
returning memory to the driver, and a cProfile of memmgr's own offload/onload of the bench state. Writes
DIR/alloc_probe.json and DIR/profile.txt.

Each flag runs one probe alone (their findings are in benchmarks/results/2026-11-21/README.md, runs K, L and N):
--trace-only (the traces), --host-ab (registered against cudaHostAlloc'd host memory), --link (the link's drift,
working-set size and copy pattern), --gap [--pause S] (memmgr against raw loops over its own buffers), --fresh
(onload into memory just given back to the driver), --free (the cost of empty_cache by segment size),
--free-while-copying (does empty_cache wait for copies in flight).

Every run writes DIR/alloc_probe.json (the probe's figures under its own key, with the run's metadata) and prints what
it found as it goes.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

import lab
from lab import GB, GiB, sync
from lab import timed as wall


def alloc_costs(total: int, chunk: int) -> dict:
    torch.cuda.empty_cache()
    held: list[torch.Tensor] = []
    t_alloc = wall(lambda: held.extend(torch.empty(chunk, dtype=torch.uint8, device="cuda")
                                       for _ in range(total // chunk)))
    held.clear()
    t_free = wall(torch.cuda.empty_cache)
    return {"chunk_MiB": chunk >> 20, "alloc_s_per_GiB": t_alloc / (total / GiB),
            "free_s_per_GiB": t_free / (total / GiB)}


def alloc_while_copying(host: torch.Tensor) -> dict:
    """Issue one large h2d copy, then allocate at once: does the allocation return before the copy ends?"""
    dev = torch.empty_like(host, device="cuda")
    torch.cuda.empty_cache()
    side = torch.cuda.Stream()
    sync()
    t0 = time.perf_counter()
    with torch.cuda.stream(side):
        dev.copy_(host, non_blocking=True)
    t_issued = time.perf_counter() - t0
    chunks = [torch.empty(256 << 20, dtype=torch.uint8, device="cuda") for _ in range(16)]
    t_alloc_done = time.perf_counter() - t0
    busy_after_alloc = not side.query()
    side.synchronize()
    t_copy_done = time.perf_counter() - t0
    del chunks, dev
    torch.cuda.empty_cache()
    return {"copy_issued_s": t_issued, "alloc_4GiB_returned_s": t_alloc_done, "copy_done_s": t_copy_done,
            "copy_still_busy_after_alloc": busy_after_alloc}


def onload_strategies(hosts: list[torch.Tensor]) -> dict:
    nbytes = sum(h.numel() for h in hosts)
    stream = torch.cuda.Stream()
    out = {}

    def interleaved():
        devs = []
        for h in hosts:
            d = torch.empty_like(h, device="cuda")
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                d.copy_(h, non_blocking=True)
            devs.append(d)
        stream.synchronize()
        return devs

    def alloc_first():
        devs = [torch.empty_like(h, device="cuda") for h in hosts]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for d, h in zip(devs, hosts):
                d.copy_(h, non_blocking=True)
        stream.synchronize()
        return devs

    for name, fn in (("interleaved", interleaved), ("alloc_first", alloc_first)):
        times = []
        for _ in range(3):
            torch.cuda.empty_cache()
            holder: list = []
            times.append(wall(lambda: holder.extend(fn())))
            holder.clear()
        out[name] = {"seconds": times, "GBps_best": nbytes / min(times) / GB}
    # no allocation at all: the blocks stay cached between rounds (the lower bound)
    devs = [torch.empty_like(h, device="cuda") for h in hosts]
    times = []
    for _ in range(3):
        def copy_only():
            with torch.cuda.stream(stream):
                for d, h in zip(devs, hosts):
                    d.copy_(h, non_blocking=True)
            stream.synchronize()
        times.append(wall(copy_only))
    out["no_alloc"] = {"seconds": times, "GBps_best": nbytes / min(times) / GB}
    # offload: copies d2h, then free, with and without giving the memory back to the driver
    for name, give_back in (("offload_copy_only", False), ("offload_copy_then_empty_cache", True)):
        times = []
        for _ in range(3):
            devs = [torch.empty_like(h, device="cuda") for h in hosts]
            def off():
                with torch.cuda.stream(stream):
                    for d, h in zip(devs, hosts):
                        h.copy_(d, non_blocking=True)
                stream.synchronize()
                devs.clear()
                if give_back:
                    torch.cuda.empty_cache()
            times.append(wall(off))
        out[name] = {"seconds": times, "GBps_best": nbytes / min(times) / GB}
    out["bytes"] = nbytes
    return out


def warmed_memmgr(gib: float):
    """The bench's state under memmgr, after one full cycle (host buffers pinned, copy streams made)."""
    from memmgr.tools.bench_methods import MemmgrMethod, make_state

    state = make_state(gib * GiB, torch.device("cuda"))
    m = MemmgrMethod()
    m.setup(state)
    m.offload(state)
    m.onload(state)
    return state, m


def copied_buckets(m) -> list:
    return [b for name in m.mgr.group_names for b in m.mgr.group(name).buckets if b.host_buffer is not None]


def profile_memmgr(gib: float) -> str:
    state, m = warmed_memmgr(gib)
    text = io.StringIO()
    for name in ("offload", "onload"):
        prof = cProfile.Profile()
        fn = getattr(m, name)
        sync()
        t0 = time.perf_counter()
        prof.enable()
        fn(state)
        sync()
        prof.disable()
        text.write(f"===== memmgr {name}: {time.perf_counter() - t0:.4f} s for {state.copied_bytes / GB:.2f} GB "
                   f"copied + {state.dropped_bytes / GB:.2f} GB dropped\n")
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
    m.teardown()
    return text.getvalue()


def copy_trace(fn, label: str) -> dict:
    """The memcpy activity of one call, from torch.profiler: busy time, gaps between copies, per-copy GB/s."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fn()
        sync()
    wall_s = time.perf_counter() - t0
    copies, others = [], []
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        start = e.time_range.start
        dur = e.time_range.end - e.time_range.start
        (copies if "Memcpy" in e.name or "memcpy" in e.name else others).append((start, dur, e.name))
    copies.sort()
    gaps = [b[0] - (a[0] + a[1]) for a, b in zip(copies, copies[1:])]
    busy = sum(d for _, d, _ in copies)
    span = (copies[-1][0] + copies[-1][1] - copies[0][0]) if copies else 0
    return {"label": label, "wall_s": wall_s, "copies": len(copies), "copy_busy_ms": busy / 1e3,
            "copy_span_ms": span / 1e3, "gap_total_ms": sum(gaps) / 1e3, "gap_max_ms": max(gaps, default=0) / 1e3,
            "first_copy_start_after_first_event_ms": (copies[0][0] - min(s for s, _, _ in copies + others)) / 1e3
            if copies else None,
            "kernels": [(n, round(d / 1e3, 3)) for _, d, n in others][:12],
            "copy_durations_ms": [round(d / 1e3, 3) for _, d, _ in copies][:100]}


def trace_memmgr(gib: float) -> dict:
    """memmgr's onload/offload of the bench state under the profiler, next to raw loops over the same host buffers."""
    state, m = warmed_memmgr(gib)
    out = {"memmgr_offload": copy_trace(lambda: m.offload(state), "memmgr offload")}
    out["memmgr_onload"] = copy_trace(lambda: m.onload(state), "memmgr onload")
    # raw loop over memmgr's own host buffers and device buckets: same bytes, no manager logic
    buckets = copied_buckets(m)
    m.offload(state)
    stream = torch.cuda.Stream()

    def raw_onload():
        for b in buckets:
            b.allocate()
            with torch.cuda.stream(stream):
                b.flat.view(torch.uint8).copy_(b.host_buffer.tensor, non_blocking=True)
        stream.synchronize()

    out["raw_onload_same_buffers"] = copy_trace(raw_onload, "raw onload over memmgr's buffers")
    for b in buckets:
        b.flat.untyped_storage().resize_(0)
    torch.cuda.empty_cache()

    def chained_onload():  # memmgr's per-bucket pattern: copy stream waits on current, current waits on the copy
        current = torch.cuda.current_stream()
        for b in buckets:
            b.allocate()
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                b.flat.view(torch.uint8).copy_(b.host_buffer.tensor, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
            current.wait_event(ev)
        current.synchronize()

    out["chained_onload_same_buffers"] = copy_trace(chained_onload, "raw onload, memmgr's stream pattern")
    for b in buckets:
        b.flat.untyped_storage().resize_(0)
    torch.cuda.empty_cache()

    def once_waited_onload():  # one wait on current before the first copy, current waits on each copy
        current = torch.cuda.current_stream()
        start = torch.cuda.Event()
        start.record(current)
        stream.wait_event(start)
        for b in buckets:
            b.allocate()
            with torch.cuda.stream(stream):
                b.flat.view(torch.uint8).copy_(b.host_buffer.tensor, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
            current.wait_event(ev)
        current.synchronize()

    out["once_waited_onload_same_buffers"] = copy_trace(once_waited_onload, "raw onload, one wait on current")
    for key in list(out):
        print(key, {k: v for k, v in out[key].items() if k not in ("copy_durations_ms",)}, flush=True)
    try:  # the raw loop bypassed the buckets' states; only the memory matters from here
        m.teardown()
    except Exception as exc:  # noqa: BLE001
        print("teardown:", exc)
    del state, buckets
    torch.cuda.empty_cache()
    return out


def anon_huge_pages() -> dict:
    """How much of this process's anonymous memory the kernel backs with transparent huge pages (memmgr's buffers
    ask for them with MADV_HUGEPAGE), next to the machine's THP setting."""
    out = {}
    for path, key in (("/proc/self/smaps_rollup", "AnonHugePages"), ("/proc/self/smaps_rollup", "Anonymous")):
        try:
            for line in open(path):
                if line.startswith(key + ":"):
                    out[key + "_kB"] = int(line.split()[1])
        except OSError as exc:
            out["error"] = str(exc)
    try:
        out["thp_enabled"] = open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip()
    except OSError:
        pass
    return out


def host_memory_ab(gib: float, rounds: int = 6) -> dict:
    """Onload of the bench state's buckets from memmgr's host buffers (mmap + parallel first touch +
    cudaHostRegister) against the same bytes in cudaHostAlloc'd memory (torch pin_memory=True), alternating arms
    so that drift hits both; each round starts with the device storage freed and the allocator's cache emptied.

    Why: in every H100 bench run so far, per-tensor copies out of PyTorch's pinned cache (cudaHostAlloc) came back
    faster (0.92-0.98x of peak) than memmgr's onload out of registered memory (0.83-0.89x)."""
    state, m = warmed_memmgr(gib)
    buckets = copied_buckets(m)
    registered = [b.host_buffer.tensor for b in buckets]
    host_alloc = [torch.empty(t.numel(), dtype=torch.uint8, pin_memory=True).copy_(t) for t in registered]
    nbytes = sum(t.numel() for t in registered)
    stream = torch.cuda.Stream()
    times: dict[str, list[float]] = {"registered": [], "cudaHostAlloc": []}

    def onload_from(hosts):
        for b in buckets:
            b.flat.untyped_storage().resize_(0)
        torch.cuda.empty_cache()
        sync()
        t0 = time.perf_counter()
        for b, h in zip(buckets, hosts):
            b.allocate()
            with torch.cuda.stream(stream):
                b.flat.view(torch.uint8).copy_(h, non_blocking=True)
        stream.synchronize()
        return time.perf_counter() - t0

    for i in range(rounds):
        order = (("registered", registered), ("cudaHostAlloc", host_alloc))
        for name, hosts in (order if i % 2 == 0 else order[::-1]):
            times[name].append(onload_from(hosts))
    out = {"bytes": nbytes, "seconds": times,
           "GBps_median": {k: nbytes / sorted(v)[len(v) // 2] / GB for k, v in times.items()},
           "process_huge_pages": anon_huge_pages()}
    print("host memory A/B:", json.dumps(out["GBps_median"]), flush=True)
    try:
        m.teardown()
    except Exception as exc:  # noqa: BLE001 - the raw loops bypassed the buckets' states
        print("teardown:", exc)
    del state, buckets, registered, host_alloc
    torch.cuda.empty_cache()
    return out


def link_probe(gib: float, rounds: int = 5) -> dict:
    """Is memmgr's gap to the peak memmgr's, or the link's on a large working set? In one process, interleaved so
    that drift hits every arm: the peak's own copy (one 2 GiB buffer, re-copied), the same 2 GiB copies walking over
    host/device working sets of 4, 8 and 16 GiB, one single 16 GiB copy, and memmgr's onload/offload of the bench
    state. Copies are timed with events around the whole arm; memmgr with the wall clock, as the bench does."""
    from memmgr.host_memory import allocate_host_buffer

    chunk = 2 * GiB
    ws_max = 16 * GiB
    host = allocate_host_buffer(ws_max, pin=True)
    dev = torch.empty(ws_max, dtype=torch.uint8, device="cuda")
    dev.fill_(1)
    host.tensor.fill_(2)
    stream = torch.cuda.Stream()
    state, m = warmed_memmgr(gib)

    def copies(ws: int, size: int, h2d: bool) -> float:
        def issue() -> None:
            for off in range(0, ws, size):
                d, h = dev[off:off + size], host.tensor[off:off + size]
                (d.copy_(h, non_blocking=True) if h2d else h.copy_(d, non_blocking=True))
        sync()
        return ws / lab.cuda_timed(issue, stream) / GB

    arms = {}
    for direction, h2d in (("h2d", True), ("d2h", False)):
        arms[f"{direction}_peak_2GiB_same_buffer"] = lambda h2d=h2d: copies(chunk, chunk, h2d)
        for ws in (4, 8, 16):
            arms[f"{direction}_2GiB_copies_over_{ws}GiB"] = lambda h2d=h2d, ws=ws: copies(ws * GiB, chunk, h2d)
        arms[f"{direction}_one_16GiB_copy"] = lambda h2d=h2d: copies(ws_max, ws_max, h2d)
        arms[f"{direction}_256MiB_copies_over_16GiB"] = lambda h2d=h2d: copies(ws_max, 256 << 20, h2d)
    state_bytes = state.copied_bytes
    arms["d2h_memmgr_offload"] = lambda: state_bytes / wall(lambda: m.offload(state)) / GB
    arms["h2d_memmgr_onload"] = lambda: state_bytes / wall(lambda: m.onload(state)) / GB
    results: dict[str, list[float]] = {k: [] for k in arms}
    names = list(arms)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        if r % 2 == 1:  # onload must follow offload
            i, j = order.index("h2d_memmgr_onload"), order.index("d2h_memmgr_offload")
            order[i], order[j] = order[j], order[i]
        for name in order:
            results[name].append(arms[name]())
    out = {"rounds": rounds, "state_bytes": state_bytes, "GBps": results,
           "median": {k: sorted(v)[len(v) // 2] for k, v in results.items()},
           "best": {k: max(v) for k, v in results.items()}}
    for k in names:
        print(f"{k:40s} median {out['median'][k]:6.2f}  best {out['best'][k]:6.2f}  all "
              + " ".join(f"{x:.1f}" for x in results[k]), flush=True)
    m.teardown()
    del dev, state
    host.release()
    torch.cuda.empty_cache()
    return out


def memmgr_gap(gib: float, rounds: int = 7, pause_s: float = 0.0) -> dict:
    """memmgr's own moves against raw loops over the very same host buffers and device buckets, interleaved: with
    the device storage re-allocated after empty_cache (what memmgr does), re-allocated from PyTorch's cache, and
    kept allocated (copies alone); and a control of 2 GiB copies between two fixed buffers. Separates the cost of
    fresh device memory from the cost of memmgr's bookkeeping and from the link's drift. ``pause_s``: an untimed
    pause between giving memory back (empty_cache) and the next timed onload, as memmgr bench's phase gap."""
    from memmgr.host_memory import allocate_host_buffer

    state, m = warmed_memmgr(gib)
    buckets = copied_buckets(m)
    nbytes = sum(b.nbytes for b in buckets)
    stream = torch.cuda.Stream()
    ctrl_host = allocate_host_buffer(2 * GiB, pin=True)
    ctrl_dev = torch.empty(2 * GiB, dtype=torch.uint8, device="cuda")

    def free(give_back: bool) -> None:
        for b in buckets:
            b.flat.untyped_storage().resize_(0)
        if give_back:
            torch.cuda.empty_cache()
            time.sleep(pause_s)

    def raw(h2d: bool, realloc: bool, give_back: bool) -> float:
        if realloc and h2d:
            free(give_back)
        sync()
        t0 = time.perf_counter()
        for b in buckets:
            if realloc and h2d:
                b.allocate()
            with torch.cuda.stream(stream):
                d, h = b.flat.view(torch.uint8), b.host_buffer.tensor
                (d.copy_(h, non_blocking=True) if h2d else h.copy_(d, non_blocking=True))
        stream.synchronize()
        if realloc and not h2d:
            free(give_back)
        secs = time.perf_counter() - t0
        if realloc and not h2d:  # back on the device for the next arm, contents from the host stores
            for b in buckets:
                b.allocate()
                b.flat.view(torch.uint8).copy_(b.host_buffer.tensor)
            sync()
        return nbytes / secs / GB

    def control(h2d: bool) -> float:
        sync()
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            for _ in range(4):
                (ctrl_dev.copy_(ctrl_host.tensor, non_blocking=True) if h2d
                 else ctrl_host.tensor.copy_(ctrl_dev, non_blocking=True))
        stream.synchronize()
        return 8 * GiB / (time.perf_counter() - t0) / GB

    def memmgr_cycle() -> tuple[float, float]:
        off = wall(lambda: m.offload(state))
        time.sleep(pause_s)
        on = wall(lambda: m.onload(state))
        return state.copied_bytes / off / GB, state.copied_bytes / on / GB

    arms = {
        "control_2GiB_x4": lambda: (control(False), control(True)),
        "memmgr": memmgr_cycle,
        "raw_copies_only": lambda: (raw(False, False, False), raw(True, False, False)),
        "raw_realloc_from_cache": lambda: (raw(False, True, False), raw(True, True, False)),
        "raw_realloc_after_empty_cache": lambda: (raw(False, True, True), raw(True, True, True)),
    }
    results: dict[str, dict[str, list[float]]] = {k: {"d2h": [], "h2d": []} for k in arms}
    names = list(arms)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            d2h, h2d = arms[name]()
            results[name]["d2h"].append(d2h)
            results[name]["h2d"].append(h2d)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    out = {"rounds": rounds, "pause_s": pause_s, "bucket_bytes": nbytes, "buckets": len(buckets), "state_bytes": state.copied_bytes,
           "GBps": results, "median": {k: {d: med(v) for d, v in r.items()} for k, r in results.items()}}
    for k in names:
        print(f"{k:32s} d2h median {out['median'][k]['d2h']:6.2f} [" + " ".join(f"{x:.1f}" for x in results[k]["d2h"])
              + f"]  h2d median {out['median'][k]['h2d']:6.2f} [" + " ".join(f"{x:.1f}" for x in results[k]["h2d"])
              + "]", flush=True)
    m.teardown()
    del state, buckets, ctrl_dev
    ctrl_host.release()
    torch.cuda.empty_cache()
    return out


def fresh_memory_onload(gib: float, rounds: int = 7) -> dict:
    """Onload into device memory that empty_cache gave back to the driver is slower than into cached blocks (the
    --gap probe). Which order of allocation and copy recovers it? Arms, interleaved, over memmgr's buckets: allocate
    and copy bucket by bucket (memmgr's order), allocate every bucket first and then copy, the same with a device
    synchronize between (copies timed alone, allocation timed apart), and re-allocation from PyTorch's cache."""
    state, m = warmed_memmgr(gib)
    buckets = copied_buckets(m)
    nbytes = sum(b.nbytes for b in buckets)
    stream = torch.cuda.Stream()

    def free(give_back: bool = True) -> None:
        for b in buckets:
            b.flat.untyped_storage().resize_(0)
        if give_back:
            torch.cuda.empty_cache()
        sync()

    def copy_all() -> None:
        with torch.cuda.stream(stream):
            for b in buckets:
                b.flat.view(torch.uint8).copy_(b.host_buffer.tensor, non_blocking=True)
        stream.synchronize()

    def interleaved(pause_s: float = 0.0) -> dict:
        free()
        time.sleep(pause_s)
        t0 = time.perf_counter()
        for b in buckets:
            b.allocate()
            with torch.cuda.stream(stream):
                b.flat.view(torch.uint8).copy_(b.host_buffer.tensor, non_blocking=True)
        stream.synchronize()
        return {"GBps": nbytes / (time.perf_counter() - t0) / GB}

    def alloc_first(split: bool, give_back: bool = True) -> dict:
        free(give_back)
        t0 = time.perf_counter()
        for b in buckets:
            b.allocate()
        if split:
            sync()
        t1 = time.perf_counter()
        copy_all()
        t2 = time.perf_counter()
        return {"GBps": nbytes / (t2 - t0) / GB, "alloc_ms": (t1 - t0) * 1e3, "copy_GBps": nbytes / (t2 - t1) / GB}

    def touched_first(give_back: bool = True) -> dict:
        free(give_back)
        t0 = time.perf_counter()
        for b in buckets:
            b.allocate()
        sync()
        t1 = time.perf_counter()
        for b in buckets:
            b.flat.view(torch.uint8).zero_()
        sync()
        t2 = time.perf_counter()
        copy_all()
        t3 = time.perf_counter()
        return {"GBps": nbytes / (t3 - t0) / GB, "alloc_ms": (t1 - t0) * 1e3, "touch_ms": (t2 - t1) * 1e3,
                "copy_GBps": nbytes / (t3 - t2) / GB}

    touch_stream = torch.cuda.Stream()

    def pipelined_touch() -> dict:
        free()
        t0 = time.perf_counter()
        for b in buckets:
            b.allocate()
            with torch.cuda.stream(touch_stream):
                b.flat.view(torch.uint8).zero_()
                ev = torch.cuda.Event()
                ev.record(touch_stream)
            stream.wait_event(ev)
            with torch.cuda.stream(stream):
                b.flat.view(torch.uint8).copy_(b.host_buffer.tensor, non_blocking=True)
        stream.synchronize()
        return {"GBps": nbytes / (time.perf_counter() - t0) / GB}

    arms = {**{f"interleaved_{p}s_after_empty_cache": (lambda p=p: interleaved(p)) for p in (0.1, 0.5, 2.0)},
            "touched_first_after_empty_cache": touched_first,
            "touched_first_from_cache": lambda: touched_first(give_back=False),
            "pipelined_touch_after_empty_cache": pipelined_touch,
            "interleaved_after_empty_cache": interleaved,
            "alloc_first_after_empty_cache": lambda: alloc_first(False),
            "alloc_first_sync_after_empty_cache": lambda: alloc_first(True),
            "alloc_first_sync_from_cache": lambda: alloc_first(True, give_back=False)}
    results: dict[str, list[dict]] = {k: [] for k in arms}
    names = list(arms)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            results[name].append(arms[name]())
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    out = {"rounds": rounds, "bytes": nbytes, "buckets": len(buckets), "runs": results,
           "median": {k: {f: med([x[f] for x in v]) for f in v[0]} for k, v in results.items()}}
    for k in names:
        print(f"{k:38s}", {f: round(x, 2) for f, x in out["median"][k].items()},
              "GBps:", " ".join(f"{x['GBps']:.1f}" for x in results[k]), flush=True)
    m.teardown()
    del state, buckets
    torch.cuda.empty_cache()
    return out


def free_cost(rounds: int = 3) -> dict:
    """What giving 16 GiB back to the driver costs at the end of an offload, by segment size: the time of
    empty_cache right after d2h copies out of buffers of that size (on a side stream, record_stream'd as memmgr
    does), against empty_cache of the same buffers when idle."""
    from memmgr.host_memory import allocate_host_buffer

    total = 16 * GiB
    host = allocate_host_buffer(total, pin=True)
    stream = torch.cuda.Stream()
    out = {}
    for chunk_mib in (256, 1024, 4096):
        chunk = chunk_mib << 20
        rows = {"after_copies_ms": [], "idle_ms": [], "copy_GBps": []}
        for _ in range(rounds):
            for after_copies in (True, False):
                torch.cuda.empty_cache()
                devs = [torch.empty(chunk, dtype=torch.uint8, device="cuda") for _ in range(total // chunk)]
                sync()
                if after_copies:
                    t0 = time.perf_counter()
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):
                        for i, d in enumerate(devs):
                            host.tensor[i * chunk:(i + 1) * chunk].copy_(d, non_blocking=True)
                            d.record_stream(stream)
                    for d in devs:
                        d.untyped_storage().resize_(0)
                    stream.synchronize()
                    rows["copy_GBps"].append(total / (time.perf_counter() - t0) / GB)
                devs.clear()
                t1 = time.perf_counter()
                torch.cuda.empty_cache()
                rows["after_copies_ms" if after_copies else "idle_ms"].append((time.perf_counter() - t1) * 1e3)
        out[f"{chunk_mib}MiB"] = rows
        print(chunk_mib, "MiB segments:", {k: [round(x, 1) for x in v] for k, v in rows.items()}, flush=True)
    host.release()
    return out


def free_while_copying() -> dict:
    """Does giving idle cached memory back (empty_cache) wait for copies in flight on another stream? If not, the
    dropped gradients' memory could go back while the offload's copies run."""
    from memmgr.host_memory import allocate_host_buffer

    host = allocate_host_buffer(8 * GiB, pin=True)
    src = torch.empty(8 * GiB, dtype=torch.uint8, device="cuda")
    idle = [torch.empty(256 << 20, dtype=torch.uint8, device="cuda") for _ in range(16)]  # 4 GiB
    side = torch.cuda.Stream()
    sync()
    idle.clear()  # cached, not in use
    t0 = time.perf_counter()
    with torch.cuda.stream(side):
        host.tensor.copy_(src, non_blocking=True)
    t_issued = time.perf_counter() - t0
    torch.cuda.empty_cache()
    t_freed = time.perf_counter() - t0
    busy_after_free = not side.query()
    side.synchronize()
    t_copy = time.perf_counter() - t0
    out = {"copy_issued_s": t_issued, "empty_cache_4GiB_returned_s": t_freed, "copy_done_s": t_copy,
           "copy_still_busy_after_empty_cache": busy_after_free}
    print("free while copying:", json.dumps(out), flush=True)
    del src
    host.release()
    torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output directory (gets alloc_probe.json)")
    ap.add_argument("--gib", type=float, default=16)
    ap.add_argument("--trace-only", action="store_true", help="only the profiler traces of memmgr's copies")
    ap.add_argument("--host-ab", action="store_true", help="only the registered vs cudaHostAlloc onload A/B")
    ap.add_argument("--link", action="store_true", help="only the link probe: working-set size and copy pattern")
    ap.add_argument("--gap", action="store_true", help="only memmgr against raw loops over its own buffers")
    ap.add_argument("--pause", type=float, default=0.0, help="--gap: untimed seconds after empty_cache")
    ap.add_argument("--fresh", action="store_true", help="only the onload-into-fresh-memory orders")
    ap.add_argument("--free", action="store_true", help="only the cost of empty_cache by segment size")
    ap.add_argument("--free-while-copying", action="store_true", help="only: does empty_cache wait for copies")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "meta": lab.metadata()}
    single = {  # flag -> (JSON key, probe): each runs alone
        "free_while_copying": ("free_while_copying", free_while_copying),
        "free": ("free", free_cost),
        "fresh": ("fresh", lambda: fresh_memory_onload(args.gib)),
        "gap": ("gap", lambda: memmgr_gap(args.gib, pause_s=args.pause)),
        "link": ("link", lambda: link_probe(args.gib)),
        "host_ab": ("host_memory_ab", lambda: host_memory_ab(args.gib)),
    }
    for flag, (key, probe) in single.items():
        if getattr(args, flag):
            res[key] = probe()
            lab.write_json(args.out / "alloc_probe.json", res, indent=1)
            return 0
    res["trace"] = trace_memmgr(args.gib)
    lab.write_json(args.out / "alloc_probe.json", res, indent=1)
    if args.trace_only:
        return 0
    total = int(args.gib * GiB)
    res["alloc_costs"] = [alloc_costs(total, c) for c in (2 << 20, 64 << 20, 256 << 20, 1 << 30)]
    print(json.dumps(res["alloc_costs"], indent=1), flush=True)
    host4 = torch.empty(4 * GiB, dtype=torch.uint8, pin_memory=True)
    res["alloc_while_copying"] = alloc_while_copying(host4)
    print(json.dumps(res["alloc_while_copying"], indent=1), flush=True)
    del host4
    for chunk in (256 << 20, 1 << 30):
        hosts = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(total // chunk)]
        res[f"strategies_{chunk >> 20}MiB"] = onload_strategies(hosts)
        print(chunk >> 20, json.dumps({k: v["GBps_best"] for k, v in res[f"strategies_{chunk >> 20}MiB"].items()
                                       if isinstance(v, dict)}), flush=True)
        del hosts
        torch._C._host_emptyCache()
    lab.write_json(args.out / "alloc_probe.json", res, indent=1)
    prof = profile_memmgr(args.gib)
    (args.out / "profile.txt").write_text(prof)
    print(prof[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
