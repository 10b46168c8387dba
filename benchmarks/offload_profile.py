"""Where one offload's time goes on the bench's states, after a pause and after another process's release (GPU).

An offload at the link's peak would take its copied bytes over the pinned-copy peak; this program says where the time
beyond that goes, for each state of ``--states`` (``gpt``: the bench's 1.3B GPT, built and stepped once as ``memmgr
bench`` does, under ``for_megatron``; ``synthetic``: ``make_state`` of ``--gib`` under the bench's MemoryManager),
with buckets of each size of ``--bucket-mb``:

- ``--cycles`` cycles per condition (``pause``: 0.5 s in this process; ``engine``: ``EngineStandIn.cycle()``, the
  helper process taking all free memory and releasing it), each: the condition, the onload, 0.5 s, then the offload
  timed as the bench times it (``timed``), and in the next cycle with the manager's ``empty_cache`` off, the call
  timed and then ``torch.cuda.empty_cache()`` timed apart (``split``);
- one offload per condition under ``torch.profiler`` (CPU and CUDA): from the call's start, when the first copy was
  issued and began on the device, when the last copy ended, how long the device copied (the union of the copies'
  spans) and stood idle between them, what came after the last copy, and the CUDA runtime calls by total time
  (``cudaFree``: the release);
- one offload after a pause under ``cProfile``: the Python functions by own and by cumulative time.

With ``--release-sizes``, first: 20 GiB allocated as segments of each size right after each condition, copied
device->host and released, the release timed (what ``cudaFree`` costs by segment size as an offload ends).

Writes ``offload_profile.json``, ``offload_profile.txt`` (the cProfile listings) and one Chrome trace per profiled
offload under ``--out``.

    python benchmarks/offload_profile.py --out DIR [--states gpt,synthetic] [--cycles 4] [--gib 16]
        [--bucket-mb 1024,2048] [--release-sizes 256,1024,20480]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import time
from typing import Any

import torch

import lab

CONDITIONS = ("pause", "engine")
COPY_CATEGORIES = ("gpu_memcpy", "kernel")
CALL_ANNOTATION = "memmgr.offload (profiled)"


def _interval_union(spans: list[tuple[float, float]]) -> float:
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop <= end:
            continue
        busy += stop - max(start, end)
        end = stop
    return busy


def trace_summary(trace_path: str) -> dict[str, Any]:
    """The profiled offload's timeline from a Chrome trace: times in ms from the start of the annotated call."""
    with open(trace_path) as f:
        events = [e for e in json.load(f).get("traceEvents", []) if e.get("ph") == "X"]
    call = next(e for e in events if e.get("name") == CALL_ANNOTATION and e.get("cat") == "user_annotation")
    t0, t_end = call["ts"], call["ts"] + call["dur"]
    inside = [e for e in events if t0 <= e["ts"] <= t_end + 2e5]  # device work may end after the call returns
    copies = [e for e in inside if e.get("cat") in COPY_CATEGORIES and t0 <= e["ts"] <= t_end]
    runtime = [e for e in inside if e.get("cat") in ("cuda_runtime", "cuda_driver") and e["ts"] <= t_end]
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in copies]
    by_call: dict[str, list[float]] = {}
    for e in runtime:
        by_call.setdefault(e["name"], []).append(e["dur"])
    issue = [e for e in runtime if "Memcpy" in e["name"] or "LaunchKernel" in e["name"]]
    ms = lambda us: round(us / 1e3, 3)  # noqa: E731
    out: dict[str, Any] = {"call_ms": ms(call["dur"]), "copies": len(copies)}
    if spans:
        first, last = min(s for s, _ in spans), max(e for _, e in spans)
        busy = _interval_union(spans)
        gaps = sorted((b[0] - a[1] for a, b in zip(sorted(spans), sorted(spans)[1:]) if b[0] > a[1]), reverse=True)
        out.update({"first_issue_ms": ms(min(e["ts"] for e in issue) - t0) if issue else None,
                    "first_copy_start_ms": ms(first - t0), "last_copy_end_ms": ms(last - t0),
                    "copy_busy_ms": ms(busy), "copy_idle_between_ms": ms(last - first - busy),
                    "largest_gaps_ms": [ms(g) for g in gaps[:5]], "after_last_copy_ms": ms(t_end - last),
                    "copy_bytes": sum(int((e.get("args") or {}).get("bytes", 0)) for e in copies)})
        if out["copy_bytes"]:
            out["copy_gbps_while_busy"] = round(out["copy_bytes"] / (busy / 1e6) / 1e9, 2)
    out["runtime_calls"] = {name: {"count": len(d), "total_ms": ms(sum(d)), "max_ms": ms(max(d))}
                            for name, d in sorted(by_call.items(), key=lambda kv: -sum(kv[1]))[:12]}
    return out


def _profiled_offload(mgr: Any, device: torch.device, path: str) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function(CALL_ANNOTATION):
            mgr.offload()
        torch.cuda.synchronize(device)
    prof.export_chrome_trace(path)
    return trace_summary(path)


def _python_profile(mgr: Any, device: torch.device) -> str:
    prof = cProfile.Profile()
    torch.cuda.synchronize(device)
    prof.enable()
    mgr.offload()
    prof.disable()
    torch.cuda.synchronize(device)
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(15)
    stats.sort_stats("cumulative").print_stats(25)
    return buf.getvalue()


def _build(state_name: str, device: torch.device, gib: float, bucket_mb: float) -> tuple[Any, Any]:
    """(state, manager): the bench's state and manager for ``state_name``, with buckets of ``bucket_mb``."""
    from memmgr.host_memory import HostMemoryPool

    if state_name == "gpt":
        from memmgr.tools import bench_megatron as bm

        bm.init_single_process()
        model = dict(bm.GPT_1_3B, layers=bm.layers_that_fit(torch.cuda.mem_get_info(device)[0], bm.GPT_1_3B, 0.4))
        ddp, opt = bm.build_gpt(**model)
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, model["vocab"], (2, model["seq"]), generator=gen).to(device)
        labels = torch.randint(0, model["vocab"], (2, model["seq"]), generator=gen).to(device)
        bm.train_step(ddp, opt, tokens, labels)
        state = bm.MegatronState(ddp, opt)
        mgr = bm.MegatronMemmgrMethod().build_manager(state, HostMemoryPool(), bucket_size_mb=bucket_mb)
    else:
        from memmgr.tools.bench_methods import MemmgrMethod, make_state

        state = make_state(gib * lab.GiB, device)
        mgr = MemmgrMethod().build_manager(state, HostMemoryPool(), bucket_size_mb=bucket_mb)
    return state, mgr


def profile_state(state_name: str, bucket_mb: float, device: torch.device, peak: dict, engine: Any,
                  args: argparse.Namespace, out_dir: str) -> dict[str, Any]:
    state, mgr = _build(state_name, device, args.gib, bucket_mb)
    state_name = f"{state_name}@{bucket_mb:g}MiB"
    copied = state.copied_bytes
    before = lab.checksum(state.copied)
    mgr.offload()  # the first offload pins the host buffers
    result: dict[str, Any] = {"state": state_name, "bucket_mb": bucket_mb, "copied_bytes": copied,
                              "units": sum(len(entry.group.units) for entry in mgr.entries()), "cycles": []}
    at_peak_ms = copied / (peak["d2h"] * lab.GB) * 1e3
    result["at_peak_ms"] = at_peak_ms
    print(f"{state_name}: {copied / lab.GB:.2f} GB in {result['units']} units; at the d2h peak "
          f"{at_peak_ms:.1f} ms", flush=True)
    for cycle in range(args.cycles):
        for condition in CONDITIONS:
            arm = "split" if cycle % 2 else "timed"
            lab.after_condition(engine, condition)
            onload_s = lab.timed(mgr.onload, device)
            time.sleep(0.5)
            mgr.empty_cache = arm == "timed"
            offload_s = lab.timed(mgr.offload, device)
            release_s = lab.timed(torch.cuda.empty_cache, device) if arm == "split" else 0.0
            mgr.empty_cache = True
            row = {"condition": condition, "arm": arm, "onload_s": onload_s, "offload_s": offload_s,
                   "release_s": release_s, "offload_ratio": at_peak_ms / 1e3 / (offload_s + release_s)}
            result["cycles"].append(row)
            print(f"cycle {state_name} {condition} {arm}: onload {onload_s * 1e3:.1f} ms, offload "
                  f"{offload_s * 1e3:.1f} ms" + (f" + release {release_s * 1e3:.1f} ms" if arm == "split" else "")
                  + f" ({row['offload_ratio']:.3f}x)", flush=True)
    result["profiled"] = {}
    for condition in CONDITIONS:
        lab.after_condition(engine, condition)
        mgr.onload()
        time.sleep(0.5)
        summary = _profiled_offload(mgr, device, os.path.join(out_dir, f"trace_{state_name}_{condition}.json"))
        result["profiled"][condition] = summary
        top_calls = list(summary["runtime_calls"].items())[:6]
        calls = ", ".join(f"{name} {v['count']}x {v['total_ms']} ms" for name, v in top_calls)
        print(f"profiled {state_name} {condition}: call {summary['call_ms']} ms; first copy issued "
              f"{summary.get('first_issue_ms')} ms, began {summary.get('first_copy_start_ms')} ms, last ended "
              f"{summary.get('last_copy_end_ms')} ms; copying {summary.get('copy_busy_ms')} ms "
              f"({summary.get('copy_gbps_while_busy')} GB/s), idle between copies "
              f"{summary.get('copy_idle_between_ms')} ms, after the last copy {summary.get('after_last_copy_ms')} ms; "
              f"{calls}", flush=True)
    lab.after_condition(engine, "pause")
    mgr.onload()
    time.sleep(0.5)
    result["python_profile"] = _python_profile(mgr, device)
    mgr.onload()
    result["intact"] = lab.checksum(state.copied) == before
    for condition in CONDITIONS:
        for arm in ("timed", "split"):
            rows = [r for r in result["cycles"] if r["condition"] == condition and r["arm"] == arm]
            if rows:
                offload = statistics.median(r["offload_s"] for r in rows)
                release = statistics.median(r["release_s"] for r in rows)
                print(f"median {state_name} {condition} {arm}: offload {offload * 1e3:.1f} ms"
                      + (f" + release {release * 1e3:.1f} ms" if arm == "split" else "")
                      + f" ({at_peak_ms / 1e3 / (offload + release):.3f}x)", flush=True)
    print(f"{state_name}: contents intact {result['intact']}", flush=True)
    mgr.close()
    del state, mgr
    lab.cleanup()
    return result


def release_by_segment_size(device: torch.device, engine: Any, sizes_mib: list[int],
                            total_gib: int = 20) -> list[dict[str, Any]]:
    """``total_gib`` allocated as segments of each size right after each condition (allocation timed), written,
    copied device->host segment by segment into one pinned 1 GiB buffer, and released (``empty_cache`` timed) right
    after the copies: what a release costs by segment size, as an offload ends."""
    host = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    rows = []
    for condition in CONDITIONS * 2:
        for size in sizes_mib:
            count = max(1, (total_gib << 10) // size)
            lab.after_condition(engine, condition)
            blocks, alloc_s = lab.written_blocks(count, size << 20, device, 7)
            for b in blocks:
                for start in range(0, b.numel(), host.numel()):
                    part = b[start:start + host.numel()]
                    host[:part.numel()].copy_(part, non_blocking=True)
            torch.cuda.synchronize(device)
            del blocks, part
            release_s = lab.timed(torch.cuda.empty_cache, device)
            row = {"condition": condition, "segment_mib": size, "segments": count, "alloc_ms": alloc_s * 1e3,
                   "release_ms": release_s * 1e3, "release_ms_per_segment": release_s * 1e3 / count}
            rows.append(row)
            print(f"release {condition}: {count} x {size} MiB allocated in {row['alloc_ms']:.1f} ms, released "
                  f"right after their copies in {row['release_ms']:.1f} ms ({row['release_ms_per_segment']:.2f} "
                  f"ms each)", flush=True)
    del host
    lab.cleanup()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--states", default="gpt,synthetic")
    parser.add_argument("--cycles", type=int, default=4)
    parser.add_argument("--gib", type=float, default=17.13e9 / 2**30, help="the synthetic state's copied GiB")
    parser.add_argument("--bucket-mb", default="1024", help="bucket sizes, comma-separated: each state under each")
    parser.add_argument("--release-sizes", default="", help="also the release part: segment sizes in MiB, "
                        "comma-separated (e.g. 256,1024,2048,4096,8192,20480)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device, peak = lab.gpu_program_start("offload_profile.py")
    from memmgr.tools.engine_standin import EngineStandIn

    out: dict[str, Any] = {"meta": lab.metadata(), "peak_gbps": peak, "states": []}
    engine = EngineStandIn(device)
    try:
        if args.release_sizes:
            out["release_by_segment_size"] = release_by_segment_size(
                device, engine, [int(x) for x in args.release_sizes.split(",")])
        for state_name in args.states.split(","):
            for bucket_mb in (float(x) for x in args.bucket_mb.split(",")):
                out["states"].append(profile_state(state_name, bucket_mb, device, peak, engine, args, args.out))
    finally:
        engine.close()
    lab.write_json(os.path.join(args.out, "offload_profile.json"), out)
    with open(os.path.join(args.out, "offload_profile.txt"), "w") as f:
        for s in out["states"]:
            f.write(f"== {s['state']}: one offload after a pause, cProfile\n{s['python_profile']}\n")


if __name__ == "__main__":
    main()
