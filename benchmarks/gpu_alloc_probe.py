"""Where do offload/onload lose time against the copy peak? python benchmarks/gpu_alloc_probe.py --out DIR

Measures, on one GPU (--host-ab: only the host-memory A/B below; --trace-only: only the traces): cudaMalloc and cudaFree cost per GiB (through PyTorch's allocator after empty_cache), whether
an allocation waits for an in-flight copy, onload strategies (allocate-then-copy interleaved per bucket, all
allocations first, no allocation at all) and offload with and without returning memory to the driver, then profiles
memmgr's own offload/onload of the bench state. Writes DIR/alloc_probe.json and DIR/profile.txt.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GiB = 1 << 30
GB = 1e9


def sync() -> None:
    torch.cuda.synchronize()


def wall(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


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
    from memmgr.bench import MemmgrMethod, make_state

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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--gib", type=float, default=16)
    ap.add_argument("--trace-only", action="store_true", help="only the profiler traces of memmgr's copies")
    ap.add_argument("--host-ab", action="store_true", help="only the registered vs cudaHostAlloc onload A/B")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if args.host_ab:
        res["host_memory_ab"] = host_memory_ab(args.gib)
        (args.out / "alloc_probe.json").write_text(json.dumps(res, indent=1))
        return 0
    res["trace"] = trace_memmgr(args.gib)
    (args.out / "alloc_probe.json").write_text(json.dumps(res, indent=1))
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
    (args.out / "alloc_probe.json").write_text(json.dumps(res, indent=1))
    prof = profile_memmgr(args.gib)
    (args.out / "profile.txt").write_text(prof)
    print(prof[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
