"""Copy-path probe (python benchmarks/copy_path_probe.py --out DIR): host<->device copy speed of the copy engines,
the copy kernel and memmgr's 'auto', with the GPU's memory fresh from another process's release and
without, against the same run's pinned-copy peak.

What it measures (GB/s = 1e9 bytes/s, CUDA-event time on the copy stream):

- peak: one ``--size-gib`` pinned copy through the copy engines into/out of memory allocated long before, best of
  ``--peak-iters``, each direction. Every other figure is also given as a fraction of this.
- kernel grid sweep: the copy kernel alone with each ``--blocks`` grid size, each direction, no other process.
- scenarios ``alone`` and ``after_release``: before each copy the probe returns its cached GPU memory to the driver,
  and in ``after_release`` a helper process (memmgr.tools.engine_standin, started once) allocates and writes
  ``--other-gib`` of GPU memory and frees it (empty_cache) right before. Then the probe allocates the device side
  fresh (h2d: the destination; d2h: the source, filled on the GPU) and copies ``--size-gib`` pinned->device or
  device->pinned with each path of ``--paths``: ``engine``, ``kernel``, ``auto``, ``engineN`` (the engines on
  N streams at once) and ``splitF`` (the engines on the first F of the bytes, default 0.5, and the kernel on the rest,
  at once). Every copy's bytes are checked (h2d: all of them on the GPU; d2h: sampled windows).
- ``warm``: the same copies into/out of device memory allocated once, long before (no release anywhere).
  ``auto`` is the policy of memmgr.transfer (h2d: a probe of both paths on the first 2 x 64 MiB decides).
- FlatTensors cycles (``--flat-cycles``): one ``--size-gib`` bucket offloaded and onloaded (blocking, wall time,
  allocation included) with ``MEMMGR_COPY_PATH`` engine and auto, with the GPU's cache emptied after each offload
  and, in ``after_release``, the helper taking and releasing ``--other-gib`` between offload and onload: the
  colocated loop's onload.
- timeline: after one release, back-to-back 1 GiB copies with one path for ``--timeline-s`` seconds, to show how long
  the copy engines stay slow and whether the kernel is affected; per direction of ``--timeline-directions`` (d2h: out
  of device memory allocated and written right after the release, as an onload leaves it for the next offload).

Writes everything to DIR/copy_path_probe.json (with the run's metadata under ``meta``) and prints a summary table
to stdout. Needs a CUDA GPU, 2 x ``--size-gib`` of pinned host memory, and the native extension with its kernels
(otherwise only the engine rows are measured).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import lab
import memmgr
from memmgr._native import native_module
from memmgr.flat_tensors import FlatTensors
from memmgr.host_memory import allocate_host_buffer
from memmgr.tools.engine_standin import EngineStandIn
from memmgr.transfer import copy_paths_status, copy_stream, issue_copy, kernels_available

GiB = 1 << 30
MiB = 1 << 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR", help="folder for copy_path_probe.json")
    p.add_argument("--size-gib", type=float, default=8.0, help="bytes per copy (GiB), default 8")
    p.add_argument("--other-gib", type=float, default=48.0,
                   help="GPU memory the helper process takes and releases before each after_release copy")
    p.add_argument("--repeats", type=int, default=3, help="copies per path, scenario and direction")
    p.add_argument("--peak-iters", type=int, default=5)
    p.add_argument("--blocks", default="132,264,528,1056", help="kernel grid sizes for the sweep ('' skips it)")
    p.add_argument("--timeline-s", type=float, default=3.0, help="seconds of the timeline after a release (0 skips)")
    p.add_argument("--timeline-directions", default="h2d", help="directions of the timeline: h2d, d2h or both")
    p.add_argument("--scenarios", default="warm,alone,after_release")
    p.add_argument("--flat-cycles", type=int, default=3, help="FlatTensors cycles per path and scenario (0 skips)")
    p.add_argument("--directions", default="h2d,d2h")
    p.add_argument("--paths", default="engine,kernel,auto",
                   help="paths to compare: engine, kernel, auto, and engineN: the "
                        "copy engines on N streams at once, each with 1/N of the bytes (probe only, not a memmgr path)")
    return p.parse_args(argv)


class Probe:
    def __init__(self, args):
        self.args = args
        self.dev = torch.device("cuda", torch.cuda.current_device())
        self.n = int(args.size_gib * GiB) // 4096 * 4096
        self.kernels = kernels_available()
        t0 = time.perf_counter()
        self.host_src = allocate_host_buffer(self.n, pin=True, allow_pageable_fallback=False)
        self.host_dst = allocate_host_buffer(self.n, pin=True, allow_pageable_fallback=False)
        self.pin_seconds = time.perf_counter() - t0
        g = torch.Generator(device=self.dev).manual_seed(1234)
        self.ref = torch.randint(0, 256, (self.n,), dtype=torch.uint8, device=self.dev, generator=g)
        self.host_src.tensor.copy_(self.ref)
        torch.cuda.synchronize()
        self.errors: list[str] = []

    # ---- one timed copy ----
    def timed(self, direction: str, dst: torch.Tensor, src: torch.Tensor, path: str, fraction: float | None = None,
              blocks: int = 0) -> tuple[float, str]:
        stream = copy_stream(self.dev, direction)
        stream.wait_stream(torch.cuda.current_stream())
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            if path.startswith("engine") and path[6:].isdigit():
                self.multi_engine(direction, dst, src, int(path[6:]), stream)
                ran = path
            elif path.startswith("split"):
                self.split(dst, src, float(path[5:] or 0.5), stream, blocks)
                ran = path
            else:
                ran = issue_copy(dst, src, stream, path=path, kernel_blocks=blocks)
            end.record(stream)
        end.synchronize()
        return dst.numel() / (start.elapsed_time(end) / 1e3) / 1e9, ran

    def windows(self, fraction: float | None) -> list[tuple[int, int]]:
        """The sampled byte ranges a device->host copy is checked on: ends, middle, every possible split point and
        the auto probe's boundaries."""
        n = self.n
        points = [0, n // 3, n // 2, n - MiB, 64 * MiB, 128 * MiB]
        points += [int(n * f) // 4096 * 4096 for f in (0.3, 0.5, 0.7)]
        if fraction is not None:
            points.append(int(n * fraction) // 4096 * 4096)
        return [(max(0, p - MiB // 2), min(n, p + MiB // 2)) for p in points]

    def poison(self, direction: str, dst: torch.Tensor, fraction: float | None) -> None:
        """Overwrites what the check will look at, so that a copy that skips bytes cannot pass on old contents."""
        if direction == "h2d":
            dst.zero_()
            torch.cuda.synchronize()
        else:
            for lo, hi in self.windows(fraction):
                self.host_dst.tensor[lo:hi].fill_(0xA5)

    def check(self, direction: str, dst: torch.Tensor, label: str, fraction: float | None) -> bool:
        if direction == "h2d":
            ok = bool(torch.equal(dst, self.ref))
        else:
            ok = all(torch.equal(self.host_dst.tensor[lo:hi], self.ref[lo:hi].cpu())
                     for lo, hi in self.windows(fraction))
        if not ok:
            self.errors.append(f"{label}: contents differ")
            print(f"  !! {label}: contents differ", flush=True)
        return ok

    def fresh_device(self, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(dst, src) with the device side newly allocated from the driver."""
        if direction == "h2d":
            return torch.empty(self.n, dtype=torch.uint8, device=self.dev), self.host_src.tensor
        src = torch.empty(self.n, dtype=torch.uint8, device=self.dev)
        torch.add(self.ref, 0, out=src)  # written by the SMs: a device copy_ would queue on the busy copy engines
        torch.cuda.synchronize()
        return self.host_dst.tensor, src

    # ---- parts ----
    def peak(self) -> dict:
        out = {}
        dev_buf = torch.empty(self.n, dtype=torch.uint8, device=self.dev)
        for direction in ("h2d", "d2h"):
            speeds = []
            for _ in range(self.args.peak_iters + 1):
                dst, src = (dev_buf, self.host_src.tensor) if direction == "h2d" else (self.host_dst.tensor, dev_buf)
                speeds.append(self.timed(direction, dst, src, "engine")[0])
            out[direction] = {"best": max(speeds[1:]), "all": speeds}
            print(f"peak {direction}: {max(speeds[1:]):.1f} GB/s ({', '.join(f'{s:.1f}' for s in speeds)})",
                  flush=True)
        del dev_buf
        return out

    def block_sweep(self) -> list[dict]:
        rows = []
        dev_buf = torch.empty(self.n, dtype=torch.uint8, device=self.dev)
        for blocks in [int(b) for b in self.args.blocks.split(",") if b.strip()]:
            for direction in ("h2d", "d2h"):
                dst, src = (dev_buf, self.host_src.tensor) if direction == "h2d" else (self.host_dst.tensor, dev_buf)
                speeds = [self.timed(direction, dst, src, "kernel", blocks=blocks)[0] for _ in range(2)]
                rows.append({"blocks": blocks, "direction": direction, "gbps": speeds})
                print(f"kernel blocks={blocks} {direction}: {', '.join(f'{s:.1f}' for s in speeds)} GB/s", flush=True)
        del dev_buf
        return rows

    def configs(self) -> list[tuple[str, float | None]]:
        configs: list[tuple[str, float | None]] = []
        for path in [p.strip() for p in self.args.paths.split(",") if p.strip()]:
            if (path in ("kernel", "auto") or path.startswith("split")) and not self.kernels:
                continue
            configs.append((path, float(path[5:] or 0.5) if path.startswith("split") else None))
        return configs

    def split(self, dst: torch.Tensor, src: torch.Tensor, fraction: float, stream: torch.cuda.Stream,
              blocks: int) -> None:
        """The copy engines on the first ``fraction`` of the bytes and the copy kernel on the rest, at the same time
        (two streams): whether the two paths add up where each alone is held back by something else (the H100: the
        kernel by the SMs' reads of host memory, the engines by the driver's clearing after a release)."""
        cut = int(dst.numel() * fraction) // 4096 * 4096
        helper = copy_stream(self.dev, "split-kernel")
        helper.wait_stream(stream)
        dst[:cut].copy_(src[:cut], non_blocking=True)
        with torch.cuda.stream(helper):
            issue_copy(dst[cut:], src[cut:], helper, path="kernel", kernel_blocks=blocks)
        stream.wait_stream(helper)

    def multi_engine(self, direction: str, dst: torch.Tensor, src: torch.Tensor, streams: int,
                     stream: torch.cuda.Stream) -> None:
        """The copy engines on several streams at once, each on a contiguous 1/streams of the bytes."""
        n = dst.numel()
        bounds = [0] + [n * i // streams // 4096 * 4096 for i in range(1, streams)] + [n]
        helpers = [copy_stream(self.dev, f"{direction}-x{i}") for i in range(1, streams)]
        for h in helpers:
            h.wait_stream(stream)
        for i, s in enumerate([stream] + helpers):
            with torch.cuda.stream(s):
                dst[bounds[i]:bounds[i + 1]].copy_(src[bounds[i]:bounds[i + 1]], non_blocking=True)
        for h in helpers:
            stream.wait_stream(h)

    def scenarios(self, engine: EngineStandIn | None) -> list[dict]:
        rows = []
        other = int(self.args.other_gib * GiB)
        for scenario in self.args.scenarios.split(","):
            for direction in self.args.directions.split(","):
                warm = self.fresh_device(direction) if scenario == "warm" else None
                for rep in range(self.args.repeats):
                    for path, fraction in self.configs():
                        released_at = None
                        helper = None
                        if scenario != "warm":
                            torch.cuda.empty_cache()
                        if scenario == "after_release":
                            helper = release_after_taking(engine, other)
                            released_at = helper["released_at"]
                        dst, src = warm if warm is not None else self.fresh_device(direction)
                        self.poison(direction, dst, fraction)
                        since = time.time() - released_at if released_at is not None else None
                        gbps, ran = self.timed(direction, dst, src, path, fraction)
                        probe = copy_paths_status()["last_probe"].get(self.dev.index) if path == "auto" else None
                        label = f"{scenario} {direction} {path}{'' if fraction is None else f'@{fraction}'} #{rep}"
                        ok = self.check(direction, dst if direction == "h2d" else None, label, fraction)
                        del dst, src
                        rows.append({"scenario": scenario, "direction": direction, "path": path,
                                     "engine_fraction": fraction, "repeat": rep, "gbps": gbps, "ran": ran,
                                     "seconds_since_release": since, "helper": helper, "bytes_ok": ok,
                                     "auto_probe": probe})
                        print(f"{label}: {gbps:.1f} GB/s (ran {ran}"
                              f"{'' if since is None else f', {since:.2f} s after the release'})", flush=True)
                del warm
        return rows

    def flat_cycles(self, engine: EngineStandIn | None) -> list[dict]:
        rows = []
        other = int(self.args.other_gib * GiB)
        saved = os.environ.get("MEMMGR_COPY_PATH")
        try:
            for scenario in [s for s in self.args.scenarios.split(",") if s != "warm"]:
                for path in ("engine", "auto") if self.kernels else ("engine",):
                    os.environ["MEMMGR_COPY_PATH"] = path
                    torch.cuda.empty_cache()
                    bucket = FlatTensors.adopt(self.ref.clone(), name=f"probe-{path}")
                    for cycle in range(self.args.flat_cycles):
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        bucket.offload()
                        off_s = time.perf_counter() - t0
                        off_ran = memmgr.backend_info().copy_path_last.get("d2h")
                        torch.cuda.empty_cache()
                        if scenario == "after_release":
                            release_after_taking(engine, other)
                        t0 = time.perf_counter()
                        bucket.onload()
                        on_s = time.perf_counter() - t0
                        on_ran = memmgr.backend_info().copy_path_last.get("h2d")
                        ok = bool(torch.equal(bucket.flat, self.ref))
                        if not ok:
                            self.errors.append(f"flat {scenario} {path} #{cycle}: contents differ")
                        row = {"scenario": scenario, "path": path, "cycle": cycle,
                               "offload_gbps": self.n / off_s / 1e9, "onload_gbps": self.n / on_s / 1e9,
                               "offload_ran": off_ran, "onload_ran": on_ran, "bytes_ok": ok}
                        rows.append(row)
                        print(f"flat {scenario} {path} #{cycle}: offload {row['offload_gbps']:.1f} GB/s ({off_ran}), "
                              f"onload {row['onload_gbps']:.1f} GB/s ({on_ran}){'' if ok else ' CONTENTS DIFFER'}",
                              flush=True)
                    bucket.release_host_buffer()
                    del bucket
        finally:
            if saved is None:
                os.environ.pop("MEMMGR_COPY_PATH", None)
            else:
                os.environ["MEMMGR_COPY_PATH"] = saved
        return rows

    def timeline(self, engine: EngineStandIn, path: str, direction: str = "h2d") -> list[dict]:
        torch.cuda.empty_cache()
        released_at = release_after_taking(engine, int(self.args.other_gib * GiB))["released_at"]
        if direction == "h2d":
            dst, src = torch.empty(self.n, dtype=torch.uint8, device=self.dev), self.host_src.tensor
        else:
            dst, src = self.fresh_device("d2h")
        chunk = min(GiB, self.n)
        points = []
        i = 0
        while time.time() - released_at < self.args.timeline_s:
            lo = (i * chunk) % (self.n - chunk + 1)
            t = time.time() - released_at
            gbps, _ = self.timed(direction, dst[lo:lo + chunk], src[lo:lo + chunk], path)
            points.append({"t": t, "gbps": gbps})
            i += 1
        del dst, src
        shown = points[::max(1, len(points) // 12)]
        print(f"timeline {direction} {path}: " + ", ".join(f"{p['t']:.2f}s:{p['gbps']:.0f}" for p in shown),
              flush=True)
        return points


def release_after_taking(engine: EngineStandIn, nbytes: int) -> dict:
    """The other process takes (allocates and writes) ``nbytes`` of GPU memory, then releases it to the driver."""
    t0 = time.perf_counter()
    held = engine.occupy(nbytes)
    t1 = time.perf_counter()
    engine.release()
    return {"bytes": held, "take_s": t1 - t0, "release_s": time.perf_counter() - t1, "released_at": time.time()}


def summarize(result: dict) -> list[dict]:
    peak = result["peak"]
    groups: dict[tuple, list[float]] = {}
    for r in result["scenarios"]:
        key = (r["scenario"], r["direction"], r["path"], r["engine_fraction"])
        groups.setdefault(key, []).append(r["gbps"])
    rows = []
    for (scenario, direction, path, fraction), speeds in groups.items():
        p = peak[direction]["best"]
        rows.append({"scenario": scenario, "direction": direction, "path": path, "engine_fraction": fraction,
                     "first": speeds[0], "median": statistics.median(speeds), "min": min(speeds), "max": max(speeds),
                     "median_vs_peak": statistics.median(speeds) / p, "min_vs_peak": min(speeds) / p})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("copy_path_probe: needs a CUDA GPU", file=sys.stderr)
        return 2
    result: dict = {"meta": lab.metadata(), "args": vars(args), "device": torch.cuda.get_device_name(),
                    "torch": torch.__version__, "backend": memmgr.backend_info().describe()}
    native = native_module()
    if native is not None and hasattr(native, "kernel_copy_config"):
        result["kernel_config"] = dict(zip(("threads", "default_blocks"),
                                           native.kernel_copy_config(torch.cuda.current_device())))
    print(f"{result['device']}, torch {result['torch']}; {result['backend']}", flush=True)
    t_start = time.perf_counter()
    probe = Probe(args)
    result["pin_seconds"] = probe.pin_seconds
    engine = None
    try:
        if "after_release" in args.scenarios or args.timeline_s > 0:
            engine = EngineStandIn(probe.dev)
        result["peak"] = probe.peak()
        if probe.kernels and args.blocks:
            result["kernel_block_sweep"] = probe.block_sweep()
        result["scenarios"] = probe.scenarios(engine)
        if args.flat_cycles > 0:
            result["flat_cycles"] = probe.flat_cycles(engine)
        if engine is not None and args.timeline_s > 0:
            result["timeline"] = {}
            for direction in args.timeline_directions.replace("both", "h2d,d2h").split(","):
                key = "" if direction == "h2d" else f"_{direction}"  # h2d keeps the keys of earlier runs
                result["timeline"][f"engine{key}"] = probe.timeline(engine, "engine", direction)
                if probe.kernels:
                    result["timeline"][f"kernel{key}"] = probe.timeline(engine, "kernel", direction)
    finally:
        if engine is not None:
            engine.close()
    result["summary"] = summarize(result)
    result["errors"] = probe.errors
    result["seconds"] = time.perf_counter() - t_start
    written = lab.write_json(Path(args.out) / "copy_path_probe.json", result, indent=1)
    print(f"\n{'scenario':14} {'dir':4} {'path':10} {'first':>6} {'median':>6} {'min':>6}  median/peak  min/peak")
    for r in result["summary"]:
        name = r["path"] + ("" if r["engine_fraction"] is None else f"@{r['engine_fraction']}")
        print(f"{r['scenario']:14} {r['direction']:4} {name:10} {r['first']:6.1f} {r['median']:6.1f} {r['min']:6.1f}"
              f"  {r['median_vs_peak']:11.3f}  {r['min_vs_peak']:8.3f}")
    for r in result.get("flat_cycles", []):
        print(f"flat {r['scenario']:14} {r['path']:6} #{r['cycle']}: offload {r['offload_gbps']:5.1f} GB/s "
              f"({r['offload_ran']}), onload {r['onload_gbps']:5.1f} GB/s ({r['onload_ran']})")
    print(f"peak h2d {result['peak']['h2d']['best']:.1f}, d2h {result['peak']['d2h']['best']:.1f} GB/s; "
          f"{len(probe.errors)} content errors; {result['seconds']:.0f} s; wrote {written}", flush=True)
    return 1 if probe.errors else 0


if __name__ == "__main__":
    sys.exit(main())
