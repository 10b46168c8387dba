"""Where an offload's time goes with and without an engine in another process (GPU; issue 16).

``memmgr bench`` finds offloads 5-15% slower when another process took the freed memory and released it before the
previous onload (its ``engine`` condition) than after a plain pause, by about a fixed time per offload. A memmgr
offload is the copies, then the release of PyTorch's cache (``torch.cuda.empty_cache``: one ``cudaFree`` per
segment), both inside the timed call. This program times the two apart, on the bench's synthetic state under a
MemoryManager built with ``empty_cache=False`` (the release is called and timed here):

- per cycle and condition (``pause``: 0.5 s in this process; ``engine``: ``EngineStandIn.cycle()``, the helper
  process taking all free memory and releasing it), the offload's copy time (``mgr.offload()``, which waits for the
  copies), the release's time and the segments it freed, and the onload's time (allocation included) with the copy
  path it ran; GB/s over the copied bytes, and x the same run's pinned-copy peak;
- the release alone: 20 GiB in 256 MiB blocks allocated and written right after each condition, then
  ``empty_cache`` timed.

Writes ``offload_phases.json`` under ``--out``.

    python benchmarks/offload_phases.py --out DIR [--cycles 4] [--gib 16]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import lab


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cycles", type=int, default=4)
    parser.add_argument("--gib", type=float, default=16.0, help="the synthetic state's copied bytes")
    parser.add_argument("--release-gib", type=int, default=20, help="the release-alone part's allocation")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("offload_phases.py needs a GPU")

    from memmgr.host_memory import HostMemoryPool
    from memmgr.manager import MemoryManager
    from memmgr.tools.bench_methods import make_state
    from memmgr.tools.engine_standin import EngineStandIn
    from memmgr.transfer import copy_paths_status

    device = torch.device("cuda", 0)
    peak = lab.pinned_peak(device)
    print(f"peak: d2h {peak['d2h']:.1f} GB/s, h2d {peak['h2d']:.1f} GB/s", flush=True)
    out: dict = {"meta": lab.metadata(), "peak_gbps": peak, "cycles": [],
                 "release_alone": []}
    engine = EngineStandIn(device)
    try:
        # the release alone: cudaFree of memory allocated right after each condition
        for condition in ("pause", "engine", "pause", "engine"):
            if condition == "engine":
                engine.cycle()
            else:
                time.sleep(0.5)
            blocks = [torch.empty(256 << 20, dtype=torch.uint8, device=device) for _ in range(args.release_gib * 4)]
            for b in blocks:
                b.fill_(2)
            torch.cuda.synchronize(device)
            time.sleep(0.5)
            del blocks
            seconds, freed = _release(device)
            row = {"condition": condition, "release_s": seconds, "segments": freed, "gib": args.release_gib}
            out["release_alone"].append(row)
            print(f"release_alone {condition}: {args.release_gib} GiB in {freed} segments freed in "
                  f"{seconds * 1e3:.1f} ms", flush=True)

        state = make_state(args.gib * lab.GiB, device)
        copied = state.copied_bytes
        pool = HostMemoryPool()
        mgr = MemoryManager(pool=pool, empty_cache=False)
        mgr.add_group("weights", state.weights)
        mgr.add_group("grads", state.grads, policy="discard")
        mgr.add_group("main_weights", state.main_weights)
        mgr.add_group("optimizer_states", state.moments)
        for condition in ["pause", "engine"] * args.cycles:
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            mgr.offload()
            copies_s = time.perf_counter() - t0
            release_s, freed = _release(device)
            if condition == "engine":
                engine.cycle()
            else:
                time.sleep(0.5)
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            mgr.onload()
            torch.cuda.synchronize(device)
            onload_s = time.perf_counter() - t0
            path = copy_paths_status()["last"].get("h2d")
            time.sleep(0.5)
            row = {"condition": condition, "copied_bytes": copied, "copies_s": copies_s, "release_s": release_s,
                   "segments_freed": freed, "onload_s": onload_s, "onload_path": path,
                   "offload_gbps": copied / (copies_s + release_s) / lab.GB,
                   "offload_copies_only_gbps": copied / copies_s / lab.GB, "onload_gbps": copied / onload_s / lab.GB}
            out["cycles"].append(row)
            print(f"cycle {condition}: offload {row['offload_gbps']:.1f} GB/s "
                  f"({row['offload_gbps'] / peak['d2h']:.2f}x; copies {copies_s * 1e3:.1f} ms = "
                  f"{row['offload_copies_only_gbps']:.1f} GB/s, release {release_s * 1e3:.1f} ms for {freed} "
                  f"segments), onload {row['onload_gbps']:.1f} GB/s "
                  f"({row['onload_gbps'] / peak['h2d']:.2f}x, {path})", flush=True)
        for condition in ("pause", "engine"):
            rows = [r for r in out["cycles"] if r["condition"] == condition][1:]  # the first offload pins
            if rows:
                summary = {k: statistics.median(r[k] for r in rows)
                           for k in ("copies_s", "release_s", "onload_s", "offload_gbps", "onload_gbps")}
                out.setdefault("steady", {})[condition] = summary
                print(f"steady {condition}: offload {summary['offload_gbps']:.1f} GB/s (copies "
                      f"{summary['copies_s'] * 1e3:.1f} ms, release {summary['release_s'] * 1e3:.1f} ms), onload "
                      f"{summary['onload_gbps']:.1f} GB/s", flush=True)
        mgr.close()
    finally:
        engine.close()
    lab.write_json(f"{args.out}/offload_phases.json", out)


if __name__ == "__main__":
    main()
