"""Where an offload's time goes with and without an engine in another process (GPU; issue 16).

``memmgr bench`` finds offloads 5-15% slower when another process took the freed memory and released it before the
previous onload (its ``engine`` condition) than after a plain pause, by about a fixed time per offload. A memmgr
offload is the copies, then the release of PyTorch's cache (``torch.cuda.empty_cache``: one ``cudaFree`` per
segment), both inside the timed call. This program times the two apart, on the bench's synthetic state under the
bench's MemoryManager, whose ``empty_cache`` it turns off where it calls and times the release itself:

- per cycle, as the bench has it: a condition (``pause``: 0.5 s in this process; ``engine``:
  ``EngineStandIn.cycle()``, the helper process taking all free memory and releasing it), the onload (allocation
  included; the copy path it ran), 0.5 s, the offload, in the arms of ``ARMS``: ``split`` (the copies, then the
  release timed apart; no driver settle, as it starts only with the manager's own release), ``end`` (the offload as
  memmgr runs it: with the driver settle of ``memmgr.driver_settle``), ``end_unsettled`` (the same with
  ``MEMMGR_DRIVER_SETTLE=0``) and, if added to ``ARMS``, ``one_segment`` (the onload first
  allocates, and frees into PyTorch's cache, one block of the whole state's size, so that the buckets are carved out
  of one segment and the offload releases one); GB/s over the copied bytes, and x the same run's pinned peak;
- the allocation and the release alone: 20 GiB as 256 MiB blocks or as one block, allocated right after each
  condition, written, then ``empty_cache`` timed;
- with ``--release-wait``, after the engine condition and an onload: the offload's copies and release when the
  offload comes 0.5, 2 or 5 s after the onload, each with and without a small release (one 2 MiB segment) made
  right after the onload: whether the release's extra wait after another process's release is a matter of time, and
  whether an early small release takes it off the offload;
- with ``--release-overlap``, whether the release can run while copies do: 16 GiB in 256 MiB blocks copied
  device->host, ``end`` (every block freed with its copy in flight, then ``empty_cache`` once the copies are done)
  against ``during`` (each block freed once its own copy is done and released at once, while the later copies run);
  and the time ``empty_cache`` takes to release 4 GiB while an 8 GiB copy is in flight (about the copy's time: the
  release waits for the device; a few ms: it does not).

Writes ``offload_phases.json`` under ``--out``.

    python benchmarks/offload_phases.py --out DIR [--cycles 4] [--gib 16]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import lab


ARMS = ("split", "end", "end_unsettled")  # "one_segment" too: see the module's docstring


def _segments() -> int:
    return int(torch.cuda.memory_stats().get("segment.all.current", 0))


def _release(device: torch.device) -> tuple[float, int]:
    """Times torch.cuda.empty_cache(); returns (seconds, segments it freed)."""
    before = _segments()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    return time.perf_counter() - t0, before - _segments()


def _release_overlap(device: torch.device, engine, peak: dict, out: dict) -> None:
    block, count = 256 << 20, 64
    host = torch.empty(block * count, dtype=torch.uint8, pin_memory=True)
    stream = torch.cuda.Stream(device)
    for condition in ("pause", "engine") * 2:
        for arm in ("end", "during"):
            if condition == "engine":
                engine.cycle()
            else:
                time.sleep(0.5)
            blocks = [torch.empty(block, dtype=torch.uint8, device=device) for _ in range(count)]
            for b in blocks:
                b.fill_(3)
            torch.cuda.synchronize(device)
            time.sleep(0.5)
            t0 = time.perf_counter()
            stream.wait_stream(torch.cuda.current_stream(device))
            events = []
            with torch.cuda.stream(stream):
                for i, b in enumerate(blocks):
                    host[i * block:(i + 1) * block].copy_(b, non_blocking=True)
                    events.append(torch.cuda.Event())
                    events[-1].record(stream)
            if arm == "end":
                for b in blocks:
                    b.record_stream(stream)
                blocks.clear()
                events[-1].synchronize()
                torch.cuda.empty_cache()
            else:
                for i, event in enumerate(events):
                    event.synchronize()
                    blocks[i] = None
                    torch.cuda.empty_cache()
            torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            gbps = block * count / seconds / lab.GB
            out.setdefault("release_overlap", []).append({"condition": condition, "arm": arm, "seconds": seconds,
                                                          "gbps": gbps})
            print(f"release_overlap {condition} {arm}: 16 GiB copied and released in {seconds * 1e3:.1f} ms = "
                  f"{gbps:.1f} GB/s ({gbps / peak['d2h']:.2f}x)", flush=True)
    src = torch.empty(8 << 30, dtype=torch.uint8, device=device)
    src.fill_(4)
    for _ in range(2):
        spare = torch.empty(4 << 30, dtype=torch.uint8, device=device)
        spare.fill_(5)
        del spare
        torch.cuda.synchronize(device)
        with torch.cuda.stream(stream):
            host[:8 << 30].copy_(src, non_blocking=True)
        t0 = time.perf_counter()
        torch.cuda.empty_cache()
        release_s = time.perf_counter() - t0
        stream.synchronize()
        copy_s = time.perf_counter() - t0
        out.setdefault("release_with_copy_in_flight", []).append({"release_s": release_s, "copy_s": copy_s})
        print(f"release_overlap: empty_cache of 4 GiB with an 8 GiB copy in flight took {release_s * 1e3:.1f} ms "
              f"(the copy finished after {copy_s * 1e3:.1f} ms)", flush=True)
    del src, host
    torch.cuda.empty_cache()


def _release_wait(device: torch.device, engine, mgr, copied: int, peak: dict, out: dict) -> None:
    """After the engine condition and an onload: whether the release's extra wait shrinks as the offload comes later
    (``delay`` after the onload), and whether a small release right after the onload (one 2 MiB segment allocated and
    given back, ``absorb``) takes the wait instead of the offload."""
    mgr.empty_cache = False
    for delay in (0.5, 2.0, 5.0) * 2:
        for absorb in (False, True):
            engine.cycle()
            mgr.onload()
            torch.cuda.synchronize(device)
            absorb_s = 0.0
            if absorb:
                torch.cuda.empty_cache()
                t0 = time.perf_counter()
                probe = torch.empty(2 << 20, dtype=torch.uint8, device=device)
                del probe
                torch.cuda.empty_cache()
                absorb_s = time.perf_counter() - t0
            time.sleep(delay)
            t0 = time.perf_counter()
            mgr.offload()
            copies_s = time.perf_counter() - t0
            release_s, freed = _release(device)
            gbps = copied / (copies_s + release_s) / lab.GB
            out.setdefault("release_wait", []).append({"delay_s": delay, "absorb": absorb, "absorb_s": absorb_s,
                                                       "copies_s": copies_s, "release_s": release_s,
                                                       "segments": freed, "offload_gbps": gbps})
            print(f"release_wait delay {delay:g} s{' after a 2 MiB release' if absorb else ''}"
                  f"{f' ({absorb_s * 1e3:.1f} ms)' if absorb else ''}: copies {copies_s * 1e3:.1f} ms, release "
                  f"{release_s * 1e3:.1f} ms for {freed} segments, offload {gbps:.1f} GB/s "
                  f"({gbps / peak['d2h']:.2f}x)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cycles", type=int, default=4)
    parser.add_argument("--gib", type=float, default=16.0, help="the synthetic state's copied bytes")
    parser.add_argument("--release-overlap", action="store_true", help="also the release-overlap part")
    parser.add_argument("--release-wait", action="store_true", help="also the release-wait part")
    parser.add_argument("--release-gib", type=int, default=20, help="the release-alone part's allocation")
    args = parser.parse_args()
    device, peak = lab.gpu_program_start("offload_phases.py")

    from memmgr.driver_settle import SETTLE_ENV
    from memmgr.host_memory import HostMemoryPool
    from memmgr.tools.bench_methods import MemmgrMethod, make_state
    from memmgr.tools.engine_standin import EngineStandIn
    from memmgr.transfer import copy_paths_status

    out: dict = {"meta": lab.metadata(), "peak_gbps": peak, "cycles": [],
                 "release_alone": []}
    engine = EngineStandIn(device)
    try:
        # the release alone: cudaFree of memory allocated right after each condition
        for condition in ("pause", "engine", "pause", "engine"):
            for count in (args.release_gib * 4, 1):
                if condition == "engine":
                    engine.cycle()
                else:
                    time.sleep(0.5)
                blocks, alloc_s = lab.written_blocks(count, (args.release_gib << 30) // count, device, 2)
                del blocks
                seconds, freed = _release(device)
                row = {"condition": condition, "blocks": count, "alloc_s": alloc_s, "release_s": seconds,
                       "segments": freed, "gib": args.release_gib}
                out["release_alone"].append(row)
                print(f"release_alone {condition}: {args.release_gib} GiB as {count} blocks: allocated in "
                      f"{alloc_s * 1e3:.1f} ms, {freed} segments freed in {seconds * 1e3:.1f} ms", flush=True)

        if args.release_overlap:
            _release_overlap(device, engine, peak, out)

        state = make_state(args.gib * lab.GiB, device)
        copied = state.copied_bytes
        mgr = MemmgrMethod().build_manager(state, HostMemoryPool())  # the bench's groups and policies
        units = [unit for entry in mgr.entries() for unit in entry.group.units]
        buckets, state_bytes = len(units), sum(unit.nbytes for unit in units)
        mgr.offload()  # the first offload pins the host buffers
        torch.cuda.empty_cache()
        for condition in ["pause", "engine"] * args.cycles:
            for arm in ARMS:
                os.environ[SETTLE_ENV] = "0" if arm in ("end_unsettled", "one_segment") else "1"
                if condition == "engine":
                    engine.cycle()
                else:
                    time.sleep(0.5)
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                if arm == "one_segment":  # one cudaMalloc for the whole state: the buckets are carved out of it
                    torch.empty(state_bytes + 512 * buckets, dtype=torch.uint8, device=device)
                mgr.onload()
                torch.cuda.synchronize(device)
                onload_s = time.perf_counter() - t0
                path = copy_paths_status()["last"].get("h2d")
                time.sleep(0.5)
                # split: the copies and the release timed apart; end, one_segment: the offload as memmgr runs it
                mgr.empty_cache = arm != "split"
                segments = _segments()
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                mgr.offload()
                copies_s = time.perf_counter() - t0
                release_s, freed = _release(device) if arm == "split" else (0.0, segments - _segments())
                row = {"condition": condition, "arm": arm, "copied_bytes": copied, "offload_s": copies_s + release_s,
                       "copies_s": copies_s if arm == "split" else None, "release_s": release_s if arm == "split"
                       else None, "segments_freed": freed, "onload_s": onload_s, "onload_path": path,
                       "offload_gbps": copied / (copies_s + release_s) / lab.GB,
                       "onload_gbps": copied / onload_s / lab.GB}
                out["cycles"].append(row)
                detail = (f"; copies {copies_s * 1e3:.1f} ms = {copied / copies_s / lab.GB:.1f} GB/s, release "
                          f"{release_s * 1e3:.1f} ms" if arm == "split" else "") + f", {freed} segments freed"
                print(f"cycle {condition} {arm}: onload {row['onload_gbps']:.1f} GB/s "
                      f"({row['onload_gbps'] / peak['h2d']:.2f}x, {path}), then offload {row['offload_gbps']:.1f} "
                      f"GB/s ({row['offload_gbps'] / peak['d2h']:.2f}x{detail})", flush=True)
        os.environ[SETTLE_ENV] = "1"
        for condition in ("pause", "engine"):
            for arm in ARMS:
                rows = [r for r in out["cycles"] if r["condition"] == condition and r["arm"] == arm]
                summary = {k: statistics.median(r[k] for r in rows) for k in ("offload_gbps", "onload_gbps")}
                out.setdefault("median", {}).setdefault(condition, {})[arm] = summary
                print(f"median {condition} {arm}: offload {summary['offload_gbps']:.1f} GB/s "
                      f"({summary['offload_gbps'] / peak['d2h']:.2f}x), onload {summary['onload_gbps']:.1f} GB/s "
                      f"({summary['onload_gbps'] / peak['h2d']:.2f}x)", flush=True)
        if args.release_wait:
            _release_wait(device, engine, mgr, copied, peak, out)
        mgr.close()
    finally:
        engine.close()
    lab.write_json(f"{args.out}/offload_phases.json", out)


if __name__ == "__main__":
    main()
