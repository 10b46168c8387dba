"""Where a large onload's time goes right after another process's release (GPU; issue 16).

Under ``memmgr bench``'s engine condition the 3.7B GPT's onload ran at 0.85-0.92x of the pinned peak, below the copy
kernel's own 0.93x, by 0-100 ms per onload. An onload allocates each bucket (``FlatTensors.allocate``: a
``cudaMalloc`` through PyTorch's allocator) and then issues its copy, bucket after bucket; right after another
process's release, allocations wait for the driver to clear memory, and the first driver call some 0.1 s after the
release waits 25-45 ms more once (``release_probe.py``). If an allocation waits longer than the copies already
queued take, the copy stream runs dry.

This program onloads the bench's synthetic state (``--gib``, default 50: the 3.7B GPT's size) through the bench's
MemoryManager, with ``FlatTensors.allocate`` and ``FlatTensors.onload`` wrapped to time each allocation on the host
and to record an event on the host->device copy stream after each bucket's copy. Per onload it reports the wall time
and x the same run's pinned peak, the allocations' total and longest time, and the time the copy stream stood idle
waiting for the next bucket to be issued (``starved_ms``: for each bucket, how long after the previous bucket's copy
finished its own copy was issued). Arms, each under the engine condition and after a pause, ``--cycles`` times:

- ``as_is``: ``mgr.onload()``;
- ``alloc_first``: every bucket allocated (``unit.allocate()``) before ``mgr.onload()`` issues the copies;
- ``settle_during``: a side thread makes the driver settle's call (``memmgr.driver_settle``) every 20 ms while the
  onload runs, so that it, not an allocation, may meet the one-time wait;
- ``reserve_first``: one allocation of all the buckets' bytes, freed to PyTorch's cache at once, before
  ``mgr.onload()``: the buckets' allocations are then carved out of that cached block without driver calls;
- ``reserve_engines``: the same with every copy on the copy engines (``MEMMGR_COPY_PATH=engine``);
- ``raw_kernel``, ``raw_engine``: no onload, the ceiling it is measured against: the same bytes copied from one pinned
  1 GiB host buffer into a device buffer held throughout, in chunks of the bucket size, one ``issue_copy`` each
  through that path on one stream;
- any arm as ``ARM@BLOCKS``: with the copy kernel's grid at BLOCKS blocks (``MEMMGR_COPY_KERNEL_BLOCKS``), and as
  ``ARM:NAME=VALUE[:NAME=VALUE...]`` with those environment variables set for it (e.g.
  ``as_is:MEMMGR_COPY_PATH=kernel``); ``PROBE_MIB=N`` there sets the ``auto`` path's probe size
  (``memmgr.transfer.AUTO_PROBE_BYTES``) instead, ``DELAY_MS=N`` waits N ms between the condition and the onload
  (an onload that begins 0.1 s or more after another process's release meets the driver's one-time wait, 25-45 ms,
  at its first allocation), and ``SETTLE_AT_RELEASE=1`` starts a driver settle (``memmgr.driver_settle``) right
  after the condition, before that wait: whether a settle made while the trainer waits takes it off the onload.

The first cycle of each arm and condition also records every bucket's issue time on the host, the end of its copy on
the device and its size (``timeline``: [issue_ms, end_ms, bytes]), and each allocation's time (``alloc_ms``).

Between onloads the state is offloaded (untimed). Two more parts (``--parts``):

- ``alloc_beside``: after each condition (with the one-time wait paid first by a driver settle), ten fresh 150 MiB
  allocations while an 8 GiB copy runs on a side stream through the copy kernel (``kernel@BLOCKS``: with that grid),
  or the copy engines, or while matmuls run, or with nothing running (``--beside``): how long does an allocation take
  beside the work in flight, and how fast does the copy run?
- ``after_reserve``: right after each condition (or 0.5 s later), one 50 GiB allocation, then 1 GiB host->device
  copies into it one after the other, through the engines or the kernel: each copy's GB/s and when it ran, so as to
  see whether the engines' slow spell follows the other process's release or this process's allocation.

Writes ``onload_timeline.json`` under ``--out``.

    python benchmarks/onload_timeline.py --out DIR [--gib 50] [--cycles 3] [--bucket-mb MB]
        [--parts arms,alloc_beside,after_reserve]
        [--beside none,kernel@264,...] [--arms as_is,as_is@264,as_is:PROBE_MIB=16,...]

Through ``benchmarks/run.py onload-timeline``, ``$MEMMGR_TIMELINE_ARGS`` adds these options.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import threading
import time

import torch

import lab

ARMS = ("as_is", "alloc_first", "reserve_first", "reserve_engines", "raw_kernel", "raw_engine")
MiB = 1 << 20


class _Recorder:
    """Wraps FlatTensors.allocate/onload for the duration of one onload: host times of each allocation and issue, and
    an event on the copy stream after each copy."""

    def __init__(self, flat_tensors_cls, copy_stream):
        self.cls = flat_tensors_cls
        self.copy_stream = copy_stream
        self.allocs: list[float] = []
        self.issues: list[tuple[float, int, torch.cuda.Event]] = []
        self.t0 = 0.0
        self._allocate = flat_tensors_cls.allocate
        self._onload = flat_tensors_cls.onload

    def __enter__(self) -> "_Recorder":
        recorder = self

        def allocate(unit):
            t = time.perf_counter()
            fresh = recorder._allocate(unit)
            if fresh:
                recorder.allocs.append(time.perf_counter() - t)
            return fresh

        def onload(unit, non_blocking=False, **options):  # options: what the transaction passes on (zero_after)
            handle = recorder._onload(unit, non_blocking=non_blocking, **options)
            if unit.flat.is_cuda and unit.nbytes:
                event = torch.cuda.Event(enable_timing=True)
                event.record(recorder.copy_stream(unit.flat.device, "h2d"))
                recorder.issues.append((time.perf_counter() - recorder.t0, unit.nbytes, event))
            return handle

        self.cls.allocate, self.cls.onload = allocate, onload
        return self

    def __exit__(self, *exc) -> None:
        self.cls.allocate, self.cls.onload = self._allocate, self._onload

    def starved_ms(self, start: torch.cuda.Event) -> float:
        """Sum over buckets of max(0, host issue time - previous copy's end on the device), both from the start."""
        starved, previous_end = 0.0, 0.0
        for issued_s, _, event in self.issues:
            starved += max(0.0, issued_s * 1e3 - previous_end)
            previous_end = start.elapsed_time(event)
        return starved


@contextlib.contextmanager
def _arm_settings(arm_spec: str):
    """Applies an arm's settings (``ARM@BLOCKS``, ``ARM:NAME=VALUE...``) for its duration; yields the arm's name and
    what to do between the condition and the onload: (delay in seconds, whether to start a driver settle first)."""
    from memmgr import transfer

    head, *assignments = arm_spec.split(":")
    arm, _, blocks = head.partition("@")
    settings = dict(a.split("=", 1) for a in assignments)
    if blocks:
        settings["MEMMGR_COPY_KERNEL_BLOCKS"] = blocks
    if arm == "reserve_engines":
        settings["MEMMGR_COPY_PATH"] = "engine"
    probe = settings.pop("PROBE_MIB", None)
    before_onload = (float(settings.pop("DELAY_MS", 0)) / 1e3, settings.pop("SETTLE_AT_RELEASE", "0") == "1")
    saved_env = {name: os.environ.get(name) for name in settings}
    saved_probe = (transfer.AUTO_PROBE_BYTES, transfer.AUTO_PROBE_MIN_BYTES)
    os.environ.update(settings)
    if probe is not None:
        transfer.AUTO_PROBE_BYTES = int(float(probe) * MiB)
        transfer.AUTO_PROBE_MIN_BYTES = 2 * transfer.AUTO_PROBE_BYTES
    try:
        yield arm, before_onload
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        transfer.AUTO_PROBE_BYTES, transfer.AUTO_PROBE_MIN_BYTES = saved_probe


def _round_block(nbytes: int) -> int:
    """The bytes PyTorch's caching allocator gives a request of ``nbytes`` (multiples of 512)."""
    return max(512, (nbytes + 511) // 512 * 512)


def run_arms(args, device, peak, engine, out: dict) -> None:
    from memmgr.driver_settle import DriverSettle
    from memmgr.host_memory import HostMemoryPool
    from memmgr.tools.bench_methods import MemmgrMethod, make_state

    arms = [a for a in args.arms.split(",") if a]
    state = make_state(args.gib * lab.GiB, device)
    options = {"bucket_size_mb": args.bucket_mb} if args.bucket_mb else {}
    mgr = MemmgrMethod().build_manager(state, HostMemoryPool(), **options)
    out["buckets"] = {"bucket_size_mb": args.bucket_mb or "default",
                      "count": sum(len(entry.group.units) for entry in mgr.entries())}
    raw, raw_pool, raw_host = None, HostMemoryPool(), None
    if any(a.startswith("raw_") for a in arms):
        raw_host = raw_pool.acquire(lab.GiB)
        raw = (raw_host.tensor[:lab.GiB], torch.empty(state.copied_bytes, dtype=torch.uint8, device=device),
               int((args.bucket_mb or mgr.bucket_size_mb) * MiB))
    settle = DriverSettle(enabled=True)
    mgr.offload()
    for cycle in range(args.cycles):
        for condition in ("engine", "pause"):
            for arm_spec in arms:
                with _arm_settings(arm_spec) as (arm, (delay_s, settle_at_release)):
                    if condition == "engine":
                        engine.cycle()
                    else:
                        time.sleep(0.5)
                    if settle_at_release:
                        settle.begin(device.index or 0)
                    time.sleep(delay_s)
                    if arm.startswith("raw_"):
                        row = _timed_raw_copy(arm.removeprefix("raw_"), *raw, device, peak["h2d"])
                    else:
                        row = _timed_onload(mgr, arm, device, state.copied_bytes / lab.GB / peak["h2d"],
                                            keep_timeline=cycle == 0)
                row.update(condition=condition, arm=arm_spec)
                out["cycles"].append(row)
                if arm.startswith("raw_"):
                    print(f"cycle {condition} {arm_spec}: {row['gib']:.1f} GiB in {row['copy_ms']:.1f} ms "
                          f"({row['gbps']:.1f} GB/s, {row['ratio']:.3f}x) on the stream, {row['wall_ms']:.1f} ms "
                          f"on the host", flush=True)
                    time.sleep(0.5)
                    continue
                print(f"cycle {condition} {arm_spec}: onload {row['onload_s'] * 1e3:.0f} ms ({row['ratio']:.2f}x, "
                      f"{row['path']}); reserve {row['reserve_ms']:.1f} ms; allocations {row['alloc_total_ms']:.0f} "
                      f"ms (longest {row['alloc_max_ms']:.1f}), last issue at {row['last_issue_ms']:.0f} ms, copy "
                      f"stream starved {row['starved_ms']:.1f} ms; cache grew "
                      f"{row['reserved_grew_during_onload_gib']:.2f} GiB during it", flush=True)
                time.sleep(0.5)
                mgr.offload()
    for condition in ("engine", "pause"):
        for arm in arms:
            rows = [r for r in out["cycles"] if r["condition"] == condition and r["arm"] == arm]
            keys = ("ratio", "alloc_total_ms", "alloc_max_ms", "starved_ms", "reserve_ms")
            summary = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}
            out.setdefault("median", {}).setdefault(condition, {})[arm] = summary
            if arm.startswith("raw_"):  # copies into memory held throughout: no onload, allocation or reservation
                print(f"median {condition} {arm}: copies {summary['ratio']:.2f}x", flush=True)
                continue
            print(f"median {condition} {arm}: onload {summary['ratio']:.2f}x, reserve {summary['reserve_ms']:.0f} ms, "
                  f"allocations {summary['alloc_total_ms']:.0f} ms (longest {summary['alloc_max_ms']:.1f}), starved "
                  f"{summary['starved_ms']:.1f} ms", flush=True)
    mgr.close()
    del raw
    if raw_host is not None:
        raw_pool.release(raw_host)


def _timed_onload(mgr, arm: str, device: torch.device, seconds_at_peak: float, keep_timeline: bool) -> dict:
    """One ``mgr.onload()`` the way ``arm`` prepares it, timed from the host and on the copy stream."""
    from memmgr import driver_settle
    from memmgr.flat_tensors import FlatTensors
    from memmgr.transfer import copy_paths_status, copy_stream

    units = [unit for entry in mgr.entries(order="onload") for unit in entry.group.units]
    stop = threading.Event()
    settle = driver_settle.DriverSettle(enabled=True)

    def settle_loop() -> None:
        while not stop.is_set():
            settle.begin(device.index or 0)  # starts nothing while the last one still runs
            stop.wait(0.02)
        settle.wait()

    settler = threading.Thread(target=settle_loop) if arm == "settle_during" else None
    start = torch.cuda.Event(enable_timing=True)
    reserve_ms = 0.0
    with _Recorder(FlatTensors, copy_stream) as rec:
        torch.cuda.synchronize(device)
        rec.t0 = time.perf_counter()
        start.record(copy_stream(device, "h2d"))
        if settler is not None:
            settler.start()
        if arm == "alloc_first":
            for unit in units:
                unit.allocate()
        if arm.startswith("reserve"):
            reserve = sum(_round_block(unit.nbytes) for unit in units if unit.nbytes)
            block = torch.empty(reserve, dtype=torch.uint8, device=device)
            del block  # to the cache, whole: the buckets' allocations are carved out of it
            reserve_ms = (time.perf_counter() - rec.t0) * 1e3
        reserved_before = torch.cuda.memory_reserved(device)
        mgr.onload()
        returned_s = time.perf_counter() - rec.t0
        current_end = torch.cuda.Event(enable_timing=True)
        current_end.record(torch.cuda.current_stream(device))
        torch.cuda.synchronize(device)
        onload_s = time.perf_counter() - rec.t0
        grew_gib = (torch.cuda.memory_reserved(device) - reserved_before) / lab.GiB
    stop.set()
    if settler is not None:
        settler.join()
    row = {"onload_s": onload_s, "ratio": seconds_at_peak / onload_s, "buckets": len(rec.issues),
           "alloc_total_ms": sum(rec.allocs) * 1e3, "alloc_max_ms": max(rec.allocs, default=0) * 1e3,
           "reserve_ms": reserve_ms, "reserved_grew_during_onload_gib": grew_gib,
           "starved_ms": rec.starved_ms(start), "last_issue_ms": rec.issues[-1][0] * 1e3,
           "first_issue_ms": rec.issues[0][0] * 1e3, "returned_ms": returned_s * 1e3,
           "copies_end_ms": start.elapsed_time(rec.issues[-1][2]), "compute_end_ms": start.elapsed_time(current_end),
           "path": copy_paths_status()["last"].get("h2d")}
    if keep_timeline:
        row["timeline"] = [[issued_s * 1e3, start.elapsed_time(event), nbytes]
                           for issued_s, nbytes, event in rec.issues]
        row["alloc_ms"] = [a * 1e3 for a in rec.allocs]
    return row


def _timed_raw_copy(path: str, src: torch.Tensor, dst: torch.Tensor, chunk: int, device: torch.device,
                    peak_gbps: float) -> dict:
    """``dst``'s bytes copied from ``src`` (repeated) in chunks of ``chunk`` bytes through ``path`` on one stream."""
    from memmgr.transfer import copy_stream, issue_copy

    stream = copy_stream(device, "h2d")

    def copy_all() -> None:
        step = min(chunk, src.numel())
        for offset in range(0, dst.numel(), step):
            n = min(step, dst.numel() - offset)
            issue_copy(dst[offset:offset + n], src[:n], stream, path=path)

    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    copy_s = lab.cuda_timed(copy_all, stream)
    wall_ms = (time.perf_counter() - t0) * 1e3
    gbps = dst.numel() / copy_s / lab.GB
    return {"path": path, "gib": dst.numel() / lab.GiB, "copy_ms": copy_s * 1e3, "wall_ms": wall_ms, "gbps": gbps,
            "ratio": gbps / peak_gbps}


def alloc_beside(device, engine, out: dict, kinds: list[str], repeats: int) -> None:
    """Fresh allocations while other work runs on a side stream."""
    from memmgr.driver_settle import DriverSettle
    from memmgr.host_memory import HostMemoryPool
    from memmgr.transfer import issue_copy

    settle = DriverSettle(enabled=True)
    pool = HostMemoryPool()
    host = pool.acquire(8 * lab.GiB)
    src = host.tensor[: 8 * lab.GiB]
    dst = torch.empty(8 * lab.GiB, dtype=torch.uint8, device=device)
    x = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    side = torch.cuda.Stream(device)

    def work(kind: str) -> None:
        path, _, blocks = kind.partition("@")
        if path in ("kernel", "engine"):
            issue_copy(dst, src, side, path=path, kernel_blocks=int(blocks or 0))
        elif kind == "matmul":
            for _ in range(100):
                torch.mm(x, x)

    rows = out.setdefault("alloc_beside", [])
    for condition in ("engine", "pause"):
        for kind in kinds:
            for _ in range(repeats):
                lab.after_condition(engine, condition)
                settle.begin(device.index or 0)  # the one-time wait, paid here, before the allocations
                settle.wait()
                torch.cuda.synchronize(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                with torch.cuda.stream(side):
                    start.record(side)
                    work(kind)
                    end.record(side)
                t0 = time.perf_counter()
                blocks, times, done = [], [], []
                for _ in range(10):
                    t = time.perf_counter()
                    blocks.append(torch.empty(150 * MiB, dtype=torch.uint8, device=device))
                    times.append((time.perf_counter() - t) * 1e3)
                    done.append(end.query())
                allocs_ms = (time.perf_counter() - t0) * 1e3
                end.synchronize()
                row = {"condition": condition, "beside": kind, "work_ms": start.elapsed_time(end),
                       "work_gbps": 8 * lab.GiB / (start.elapsed_time(end) / 1e3) / lab.GB if "@" in kind or
                       kind in ("kernel", "engine") else None,
                       "allocs_ms": allocs_ms, "alloc_ms": times, "done_at_alloc": done}
                rows.append(row)
                print(f"alloc_beside {condition} {kind}: work {row['work_ms']:.1f} ms "
                      f"({row['work_gbps'] or 0:.1f} GB/s); ten 150 MiB allocations "
                      f"{allocs_ms:.1f} ms (first {times[0]:.2f}, longest {max(times):.2f}); work done at each: "
                      f"{''.join('y' if d else 'n' for d in done)}", flush=True)
                del blocks
    pool.release(host)
    torch.cuda.empty_cache()


def after_reserve(device, engine, out: dict, gib: float) -> None:
    """Copy speed through each path into one large allocation made right after a condition."""
    from memmgr.host_memory import HostMemoryPool
    from memmgr.transfer import issue_copy

    pool = HostMemoryPool()
    host = pool.acquire(lab.GiB)
    src = host.tensor[: lab.GiB]
    stream = torch.cuda.Stream(device)
    nbytes = int(gib * lab.GiB) // lab.GiB * lab.GiB
    rows = out.setdefault("after_reserve", [])
    for condition in ("engine", "pause"):
        for path, delay_s in (("engine", 0.0), ("engine", 0.5), ("kernel", 0.0)):
            t_condition = lab.after_condition(engine, condition)
            time.sleep(delay_s)
            t0 = time.perf_counter()
            block = torch.empty(nbytes, dtype=torch.uint8, device=device)
            torch.cuda.synchronize(device)
            reserve_ms = (time.perf_counter() - t0) * 1e3
            copies_at_s = time.perf_counter() - t_condition
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(nbytes // lab.GiB + 1)]
            marks[0].record(stream)
            for i in range(nbytes // lab.GiB):
                issue_copy(block[i * lab.GiB:(i + 1) * lab.GiB], src, stream, path=path)
                marks[i + 1].record(stream)
            marks[-1].synchronize()
            speeds = [lab.GiB / (marks[i].elapsed_time(marks[i + 1]) / 1e3) / lab.GB for i in range(len(marks) - 1)]
            total_s = marks[0].elapsed_time(marks[-1]) / 1e3
            slow = [i for i, v in enumerate(speeds) if v < 0.8 * peak_of(out)]
            row = {"condition": condition, "path": path, "delay_s": delay_s, "reserve_ms": reserve_ms,
                   "copies_start_s_after_condition": copies_at_s, "gbps": speeds,
                   "total_gbps": nbytes / total_s / lab.GB, "slow_chunks": len(slow),
                   "slow_until_s": (marks[0].elapsed_time(marks[max(slow) + 1]) / 1e3) if slow else 0.0}
            rows.append(row)
            print(f"after_reserve {condition} {path} +{delay_s:.1f}s: reserve {gib:.0f} GiB {reserve_ms:.1f} ms, "
                  f"copies from {copies_at_s:.3f} s after the condition: {row['total_gbps']:.1f} GB/s; "
                  f"{len(slow)} of {len(speeds)} GiB below 0.8x peak, until {row['slow_until_s']:.3f} s; first ten "
                  f"{' '.join(f'{v:.0f}' for v in speeds[:10])}", flush=True)
            del block
    pool.release(host)
    torch.cuda.empty_cache()


def peak_of(out: dict) -> float:
    return out["peak_gbps"]["h2d"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--gib", type=float, default=50.0, help="the synthetic state's copied bytes")
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--bucket-mb", type=float, default=0, help="the manager's bucket size (0: its default)")
    parser.add_argument("--arms", default="as_is,as_is:MEMMGR_COPY_PATH=kernel,as_is:PROBE_MIB=16",
                        help=f"of {', '.join(ARMS + ('settle_during',))}; ARM@BLOCKS runs it with that kernel grid")
    parser.add_argument("--parts", default="arms", help="of arms, alloc_beside, after_reserve")
    parser.add_argument("--beside", default="none,kernel@264,kernel@132,kernel@99",
                        help="alloc_beside's side work: none, matmul, engine, kernel or kernel@BLOCKS")
    parser.add_argument("--beside-repeats", type=int, default=2)
    args = parser.parse_args()
    device, peak = lab.gpu_program_start("onload_timeline.py")

    from memmgr.tools.engine_standin import EngineStandIn

    out: dict = {"meta": lab.metadata(), "peak_gbps": peak, "cycles": []}
    engine = EngineStandIn(device)
    parts = args.parts.split(",")
    try:
        if "alloc_beside" in parts:
            alloc_beside(device, engine, out, args.beside.split(","), args.beside_repeats)
        if "after_reserve" in parts:
            after_reserve(device, engine, out, args.gib)
        if "arms" in parts:
            run_arms(args, device, peak, engine, out)
    finally:
        engine.close()
        lab.write_json(f"{args.out}/onload_timeline.json", out)


if __name__ == "__main__":
    main()
