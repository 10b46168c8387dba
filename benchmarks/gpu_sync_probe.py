"""Which step of a non-blocking offload waits for the GPU? python benchmarks/gpu_sync_probe.py --out DIR

Each step runs right after a 0.3 s spin kernel on the current stream and is timed on the CPU: a step that takes
~0.3 s waited for the kernel (a hidden synchronization), one that takes microseconds did not. The first step is the
first copy-stream creation of the process, so it must run before anything else creates streams.

Writes DIR/sync_probe.json (per step: the call's seconds, whether the stream was still busy after it, whether it
waited) and prints one line per step.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import lab
from lab import MiB


def spin_cycles(seconds: float) -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(seconds * getattr(props, "clock_rate", 1_800_000) * 1000)


def step(results: dict, name: str, fn, seconds: float = 0.3) -> None:
    torch.cuda.synchronize()
    torch.cuda._sleep(spin_cycles(seconds))
    t0 = time.perf_counter()
    fn()
    took = time.perf_counter() - t0
    busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    results[name] = {"call_seconds": round(took, 5), "stream_busy_after": busy, "waited": took > seconds / 2}
    print(f"{name:55s} {took * 1e3:9.3f} ms  busy after: {busy}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output directory (gets sync_probe.json)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from memmgr.flat_tensors import FlatTensors
    from memmgr.host_memory import HostMemoryPool, allocate_host_buffer
    from memmgr.transfer import copy_stream

    dev = torch.device("cuda", 0)
    r: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    x = torch.ones(64 * MiB, dtype=torch.uint8, device=dev)
    step(r, "memmgr copy_stream() first creation", lambda: copy_stream(dev, "d2h"))
    step(r, "torch.cuda.Stream() creation", lambda: torch.cuda.Stream())
    step(r, "torch.cuda.Event() + record", lambda: torch.cuda.Event().record())
    pinned = torch.empty(64 * MiB, dtype=torch.uint8, pin_memory=True)
    step(r, "d2h copy_ non_blocking into torch-pinned (current)", lambda: pinned.copy_(x, non_blocking=True))
    native = allocate_host_buffer(64 * MiB, True).tensor
    step(r, "d2h copy_ non_blocking into memmgr buffer (current)", lambda: native.copy_(x, non_blocking=True))
    side = copy_stream(dev, "d2h")

    def on_side():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            native.copy_(x, non_blocking=True)

    step(r, "d2h copy_ into memmgr buffer on the copy stream", on_side)
    y = torch.ones(64 * MiB, dtype=torch.uint8, device=dev)
    step(r, "storage.resize_(0)", lambda: y.untyped_storage().resize_(0))
    z = torch.ones(64 * MiB, dtype=torch.uint8, device=dev)

    def resize_recorded():
        z.record_stream(side)
        z.untyped_storage().resize_(0)

    step(r, "record_stream + storage.resize_(0)", resize_recorded)
    w = torch.empty(0, dtype=torch.uint8, device=dev)
    step(r, "storage.resize_(64 MiB) (allocate)", lambda: w.untyped_storage().resize_(64 * MiB))
    pool = HostMemoryPool()
    flat = torch.ones(64 * MiB, dtype=torch.uint8, device=dev)
    bucket = FlatTensors.coalesce([("t", flat)], name="probe", pool=pool)
    bucket.ensure_host_buffer()
    step(r, "FlatTensors.offload(non_blocking=True), host pinned ahead", lambda: bucket.offload(non_blocking=True))
    bucket.wait()
    step(r, "FlatTensors.onload(non_blocking=True)", lambda: bucket.onload(non_blocking=True))
    bucket.wait()
    r["meta"] = lab.metadata()  # last: nothing before the first step may create streams
    lab.write_json(args.out / "sync_probe.json", r, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
