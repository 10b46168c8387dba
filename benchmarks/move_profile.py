"""Where the time of one offload and one onload of many small tensors goes (GPU).

The state of the bench's ``memmgr_10000x64KiB`` row (10,000 float32 tensors of 64 KiB in one group of a
MemoryManager), three warm-up cycles, then:
- the wall time of ``offload()`` and ``onload()`` over ``--cycles`` cycles (synchronized before and after), beside
  one plain ``copy_`` of the same bytes between the same pinned host store and a device buffer each way;
- the Python time inside each call, by function (cProfile, top entries by own time);
- the CUDA timeline of one offload and one onload (torch.profiler: CPU-side calls and the GPU work, top entries).

It imports whatever ``memmgr`` is on the path, so ``PYTHONPATH=<an older tree>`` profiles that tree with the same
program (it uses only MemoryManager, add_group, offload and onload). Writes ``move_profile.json`` and
``move_profile.txt`` under ``--out``.

    python benchmarks/move_profile.py --out DIR [--cycles 5] [--label now]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time

import torch

TENSORS = 10_000
EACH_BYTES = 64 * 1024


def _timed(fn, device) -> float:
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--label", default="now", help="names this tree in the outputs")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("move_profile.py needs a GPU")
    os.makedirs(args.out, exist_ok=True)

    import memmgr
    from memmgr.host_memory import HostMemoryPool
    from memmgr.manager import MemoryManager

    device = torch.device("cuda", 0)
    numel = EACH_BYTES // 4
    tensors = {f"t{i}": torch.full((numel,), float(i), device=device) for i in range(TENSORS)}
    pool = HostMemoryPool()
    mgr = MemoryManager(pool=pool)
    mgr.add_group("optimizer_states", tensors)
    for _ in range(3):
        mgr.offload()
        mgr.onload()

    offload_s, onload_s = [], []
    for _ in range(args.cycles):
        offload_s.append(_timed(mgr.offload, device))
        onload_s.append(_timed(mgr.onload, device))
    nbytes = TENSORS * EACH_BYTES
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    plain_d2h = min(_timed(lambda: host.copy_(dev, non_blocking=True), device) for _ in range(5))
    plain_h2d = min(_timed(lambda: dev.copy_(host, non_blocking=True), device) for _ in range(5))

    python = {}
    for name, fn in (("offload", mgr.offload), ("onload", mgr.onload)):
        prof = cProfile.Profile()
        torch.cuda.synchronize(device)
        prof.enable()
        fn()
        prof.disable()
        torch.cuda.synchronize(device)
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
        python[name] = buf.getvalue()

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        mgr.offload()
        torch.cuda.synchronize(device)
        mgr.onload()
        torch.cuda.synchronize(device)
    prof.export_chrome_trace(os.path.join(args.out, "move_trace.json"))
    table_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    table_cuda = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12)

    result = {
        "benchmark": "move_profile", "label": args.label, "memmgr_path": memmgr.__file__,
        "backend": memmgr.backend_info().describe() if hasattr(memmgr, "backend_info") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__, "commit": os.environ.get("MEMMGR_GIT_COMMIT"),
        "command": " ".join(["python", *sys.argv]), "copy_path_env": os.environ.get("MEMMGR_COPY_PATH"),
        "tensors": TENSORS, "bytes": nbytes,
        "offload_ms": [s * 1e3 for s in offload_s], "onload_ms": [s * 1e3 for s in onload_s],
        "offload_median_ms": statistics.median(offload_s) * 1e3, "onload_median_ms": statistics.median(onload_s) * 1e3,
        "plain_copy_d2h_ms": plain_d2h * 1e3, "plain_copy_h2d_ms": plain_h2d * 1e3,
    }
    result["offload_over_plain"] = result["offload_median_ms"] / result["plain_copy_d2h_ms"]
    result["onload_over_plain"] = result["onload_median_ms"] / result["plain_copy_h2d_ms"]
    with open(os.path.join(args.out, "move_profile.json"), "w") as f:
        json.dump(result, f, indent=1)
    summary = (f"move_profile [{args.label}] {TENSORS} x {EACH_BYTES // 1024} KiB: offload median "
               f"{result['offload_median_ms']:.2f} ms ({result['offload_over_plain']:.2f}x one plain copy of "
               f"{result['plain_copy_d2h_ms']:.2f} ms), onload {result['onload_median_ms']:.2f} ms "
               f"({result['onload_over_plain']:.2f}x {result['plain_copy_h2d_ms']:.2f} ms)")
    with open(os.path.join(args.out, "move_profile.txt"), "w") as f:
        f.write(summary + "\n\n")
        for name, text in python.items():
            f.write(f"== Python, one {name} (cProfile, by own time)\n{text}\n")
        f.write(f"== torch.profiler, one offload + one onload, by CPU time\n{table_cpu}\n")
        f.write(f"== by CUDA time\n{table_cuda}\n")
    print(summary)


if __name__ == "__main__":
    main()
