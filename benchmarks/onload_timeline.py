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
  onload runs, so that it, not an allocation, may meet the one-time wait.

Between onloads the state is offloaded (untimed). Writes ``onload_timeline.json`` under ``--out``.

    python benchmarks/onload_timeline.py --out DIR [--gib 50] [--cycles 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import torch

import lab

ARMS = ("as_is", "alloc_first", "settle_during")


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

        def onload(unit, non_blocking=False):
            handle = recorder._onload(unit, non_blocking=non_blocking)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--gib", type=float, default=50.0, help="the synthetic state's copied bytes")
    parser.add_argument("--cycles", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("onload_timeline.py needs a GPU")

    from memmgr import driver_settle
    from memmgr.flat_tensors import FlatTensors
    from memmgr.host_memory import HostMemoryPool
    from memmgr.tools.bench_methods import MemmgrMethod, make_state
    from memmgr.tools.engine_standin import EngineStandIn
    from memmgr.transfer import copy_paths_status, copy_stream

    device = torch.device("cuda", 0)
    peak = lab.pinned_peak(device)
    print(f"peak: d2h {peak['d2h']:.1f} GB/s, h2d {peak['h2d']:.1f} GB/s", flush=True)
    out: dict = {"meta": lab.metadata(), "peak_gbps": peak, "cycles": []}
    engine = EngineStandIn(device)
    settle = driver_settle.DriverSettle(enabled=True)
    try:
        state = make_state(args.gib * lab.GiB, device)
        copied = state.copied_bytes
        mgr = MemmgrMethod().build_manager(state, HostMemoryPool())
        units = [unit for entry in mgr.entries(order="onload") for unit in entry.group.units]
        mgr.offload()
        for _ in range(args.cycles):
            for condition in ("engine", "pause"):
                for arm in ARMS:
                    if condition == "engine":
                        engine.cycle()
                    else:
                        time.sleep(0.5)
                    stop = threading.Event()

                    def settle_loop() -> None:
                        while not stop.is_set():
                            settle.begin(device.index or 0)  # starts nothing while the last one still runs
                            stop.wait(0.02)
                        settle.wait()

                    settler = threading.Thread(target=settle_loop) if arm == "settle_during" else None
                    start = torch.cuda.Event(enable_timing=True)
                    with _Recorder(FlatTensors, copy_stream) as rec:
                        torch.cuda.synchronize(device)
                        rec.t0 = time.perf_counter()
                        start.record(copy_stream(device, "h2d"))
                        if settler is not None:
                            settler.start()
                        if arm == "alloc_first":
                            for unit in units:
                                unit.allocate()
                        mgr.onload()
                        torch.cuda.synchronize(device)
                        onload_s = time.perf_counter() - rec.t0
                    stop.set()
                    if settler is not None:
                        settler.join()
                    row = {"condition": condition, "arm": arm, "onload_s": onload_s,
                           "ratio": copied / onload_s / lab.GB / peak["h2d"], "buckets": len(rec.issues),
                           "alloc_total_ms": sum(rec.allocs) * 1e3, "alloc_max_ms": max(rec.allocs, default=0) * 1e3,
                           "starved_ms": rec.starved_ms(start), "last_issue_ms": rec.issues[-1][0] * 1e3,
                           "path": copy_paths_status()["last"].get("h2d")}
                    out["cycles"].append(row)
                    print(f"cycle {condition} {arm}: onload {row['onload_s'] * 1e3:.0f} ms ({row['ratio']:.2f}x, "
                          f"{row['path']}); allocations {row['alloc_total_ms']:.0f} ms (longest "
                          f"{row['alloc_max_ms']:.1f}), last issue at {row['last_issue_ms']:.0f} ms, copy stream "
                          f"starved {row['starved_ms']:.1f} ms", flush=True)
                    time.sleep(0.5)
                    mgr.offload()
        for condition in ("engine", "pause"):
            for arm in ARMS:
                rows = [r for r in out["cycles"] if r["condition"] == condition and r["arm"] == arm]
                summary = {k: statistics.median(r[k] for r in rows) for k in ("ratio", "alloc_total_ms",
                                                                                "alloc_max_ms", "starved_ms")}
                out.setdefault("median", {}).setdefault(condition, {})[arm] = summary
                print(f"median {condition} {arm}: onload {summary['ratio']:.2f}x, allocations "
                      f"{summary['alloc_total_ms']:.0f} ms (longest {summary['alloc_max_ms']:.1f}), starved "
                      f"{summary['starved_ms']:.1f} ms", flush=True)
        mgr.close()
    finally:
        engine.close()
    lab.write_json(f"{args.out}/onload_timeline.json", out)


if __name__ == "__main__":
    main()
