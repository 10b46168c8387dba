"""What an all-or-nothing weight sync costs: python benchmarks/atomic_sync_cost.py --out DIR [--presets 1.3b,4b]
[--reps 5] [--gap-s 0.5] [--bucket-mb 512] [--cpu]

The setting of benchmarks/ipc_sync_speed.py (its presets: the Llama-shaped 1.3B and the ~4B Qwen3, bf16): the
trainer is a transformers model on the GPU, the engine the same model in a second process on the same GPU, and every
weight travels through memmgr's CudaIpcTransport (a ring of 2 IPC buffers of --bucket-mb). The engine serves with
CudaIpcReceiver.handle and a ModuleWeightLoader, once with atomic=True (it keeps a pinned host copy of each tensor a
sync overwrites, refreshed on a side stream after each commit, and puts them all back if a sync fails) and once with
atomic=False. The timed syncs are --gap-s apart, the generation between two syncs of an RL loop.
Per preset it measures:
1. time: --reps full syncs (start -> every bucket -> commit) per setting, median and min seconds, GB/s, and the
   median's overhead of atomic over non-atomic;
2. memory: the engine's host bytes held by its undo buffers (pinned; allocated by the first sync, reused), its peak
   GPU memory above its model during a sync, and the trainer's peak extra GPU memory (the ring);
3. failure: with atomic=True, a sync whose engine fails at the middle bucket: the trainer must get a
   MemmgrSyncError, and every engine tensor must equal its value before that sync bit for bit (checksums); then a
   good sync must bring the new weights.
--cpu runs the same code on the CPU for the tiny presets, with the engine in this process behind the in-process
transport instead of CUDA IPC (a smoke test of the program; its numbers mean nothing).

Writes DIR/atomic_sync_cost.json (with the run's metadata) and DIR/atomic_sync_cost.md (a table), and prints one
line per preset to stdout. Needs transformers; and a GPU except with --cpu. About 3-4 minutes on one H100 for both
presets at the defaults.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import lab

PROMPT = [1, 17, 42, 99, 7, 3]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default=None,
                    help="comma-separated presets of ipc_sync_speed.py (default: 1.3b,4b; with --cpu: tiny,tiny-qwen3)")
    ap.add_argument("--reps", type=int, default=5, help="timed syncs per setting; medians reported (default 5)")
    ap.add_argument("--gap-s", type=float, default=0.5,
                    help="seconds between timed syncs, standing in for the generation between two syncs of an RL loop "
                         "(an atomic engine's host copies of a sync run then); default 0.5")
    ap.add_argument("--bucket-mb", type=float, default=512, help="ring buffer size in MiB (default 512)")
    ap.add_argument("--cpu", action="store_true", help="CPU smoke test: tiny presets, in-process engine")
    ap.add_argument("--out", type=Path, required=True,
                    help="output directory (gets atomic_sync_cost.json and atomic_sync_cost.md)")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.bucket_mb <= 0:
        ap.error("--reps must be at least 1 and --bucket-mb positive")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# the engine: a transformers model filled by CudaIpcReceiver.handle + ModuleWeightLoader
# ---------------------------------------------------------------------------------------------------------------------
def _checksums(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return lab.named_checksums(model.state_dict().items())


def _engine_main(config: Any, atomic: bool, descs: Any, acks: Any, results: Any) -> None:
    from transformers import AutoModelForCausalLM

    from memmgr.sync import ModuleWeightLoader
    from memmgr.sync.transports.ipc import CudaIpcReceiver

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    loader = ModuleWeightLoader(model, atomic=atomic)
    receiver = CudaIpcReceiver(device)
    base = torch.cuda.memory_allocated(device)
    acks.put(("ready", base))
    fail_at = None
    while True:
        msg = descs.get()
        if msg is None:
            break
        if isinstance(msg, tuple):
            if msg[0] == "report":
                torch.cuda.synchronize(device)
                results.put({"checksums": _checksums(model), "host_bytes": loader.undo.host_bytes,
                             "peak_extra_gpu_bytes": torch.cuda.max_memory_allocated(device) - base,
                             "consistent": loader.consistent})
                torch.cuda.reset_peak_memory_stats(device)
            elif msg[0] == "fail_at":
                fail_at = msg[1]  # the engine refuses its bucket number fail_at of the next sync
            continue
        try:
            if msg.get("control") == "begin":
                seen = 0
            if not msg.get("control"):
                if fail_at is not None and seen == fail_at:
                    fail_at = None
                    raise RuntimeError("injected: the engine failed to load this bucket")
                seen += 1
            receiver.handle(msg, loader)
            acks.put(("ok", None))
        except Exception as exc:
            if not msg.get("control"):
                receiver.done()
                from memmgr.sync.loaders import rollback_sync

                rollback_sync(loader, str(exc))
            acks.put(("error", f"{type(exc).__name__}: {exc}"))
    receiver.close()


class IpcEngine:
    """The engine process and the announce callable a CudaIpcTransport takes."""

    def __init__(self, config: Any, atomic: bool, timeout_s: float = 600.0):
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.descs, self.acks, self.results = ctx.Queue(), ctx.Queue(), ctx.Queue()
        self.timeout_s = timeout_s
        self.proc = ctx.Process(target=_engine_main, args=(config, atomic, self.descs, self.acks, self.results),
                                daemon=True)
        self.proc.start()
        status, self.model_bytes = self.acks.get(timeout=timeout_s)
        assert status == "ready", status

    def announce(self, description: dict) -> None:
        self.descs.put(description)
        status, detail = self.acks.get(timeout=self.timeout_s)
        if status != "ok":
            raise RuntimeError(f"engine: {detail}")

    def fail_at(self, index: int) -> None:
        self.descs.put(("fail_at", index))

    def report(self) -> dict:
        self.descs.put(("report",))
        return self.results.get(timeout=self.timeout_s)

    def transport(self, bucket_bytes: int) -> Any:
        from memmgr.sync.transports.ipc import CudaIpcTransport

        return CudaIpcTransport(self.announce, buffer_bytes=bucket_bytes, num_buffers=2)

    def stop(self) -> None:
        self.descs.put(None)
        self.proc.join(60)


class CpuEngine:
    """--cpu: the same model in this process behind the in-process transport (the transport's loader is the
    engine's ModuleWeightLoader; a failure is injected by the loader refusing a bucket)."""

    def __init__(self, config: Any, atomic: bool):
        from transformers import AutoModelForCausalLM

        from memmgr.sync import ModuleWeightLoader

        self.model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
        self.loader = ModuleWeightLoader(self.model, atomic=atomic)
        self._fail_at: int | None = None
        self._seen = 0

    def __call__(self, pairs: Any) -> None:
        if self._fail_at is not None and self._seen == self._fail_at:
            self._fail_at = None
            self.loader.rollback("injected")
            raise RuntimeError("injected: the engine failed to load this bucket")
        self._seen += 1
        self.loader(pairs)

    def begin(self) -> None:
        self._seen = 0
        self.loader.begin()

    def commit(self) -> None:
        self.loader.commit()

    def rollback(self, reason: str = "") -> int:
        return self.loader.rollback(reason)

    def fail_at(self, index: int) -> None:
        self._fail_at = index

    def report(self) -> dict:
        return {"checksums": _checksums(self.model), "host_bytes": self.loader.undo.host_bytes,
                "peak_extra_gpu_bytes": None, "consistent": self.loader.consistent}

    def transport(self, bucket_bytes: int) -> Any:
        from memmgr.sync.transports import InProcessTransport

        return InProcessTransport(self, held=self.loader.expected())

    def stop(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------------------------
# the measurement
# ---------------------------------------------------------------------------------------------------------------------
def _sync(transport: Any, weights: dict, specs: list, bucket_bytes: int, cpu: bool) -> None:
    """One sync as sync_weights drives a transport: start, every bucket, finish; abort if anything fails."""
    from memmgr.sync.transports import WeightBucket, group_pairs

    transport.start(specs)
    try:
        for group in group_pairs(weights.items(), bucket_bytes):
            if cpu:
                transport.send_bucket(WeightBucket.pack(group))
            else:
                transport.send_pairs(group)  # packed straight into the ring
        transport.finish()
    except BaseException as exc:
        transport.abort(f"{type(exc).__name__}: {exc}")
        raise


def measure_preset(preset: str, args: argparse.Namespace) -> dict:
    from ipc_sync_speed import hf_config
    from transformers import AutoModelForCausalLM

    from memmgr.errors import MemmgrSyncError
    from memmgr.sync.transports import group_pairs, specs_of

    device = torch.device("cpu" if args.cpu else "cuda")
    config = hf_config(preset)
    torch.manual_seed(0)
    with torch.device(device):
        trainer = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    weights = {n: t for n, t in trainer.state_dict().items()}
    specs = specs_of(weights)
    payload = sum(t.numel() * t.element_size() for t in weights.values())
    bucket_bytes = int(args.bucket_mb * 2**20) if not args.cpu else 64 << 10
    nbuckets = sum(1 for _ in group_pairs(weights.items(), bucket_bytes))
    row: dict[str, Any] = {"preset": preset, "params": sum(t.numel() for t in weights.values()),
                           "payload_bytes": payload, "bucket_bytes": bucket_bytes, "buckets": nbuckets}

    def noisy() -> dict:  # a stand-in for a training step: new weights, same names
        with torch.no_grad():
            return {n: t + 0.01 * torch.randn_like(t) if t.is_floating_point() else t for n, t in weights.items()}

    for atomic in (False, True):
        engine = CpuEngine(config, atomic) if args.cpu else IpcEngine(config, atomic)
        transport = engine.transport(bucket_bytes)
        try:
            _sync(transport, weights, specs, bucket_bytes, args.cpu)  # warm-up: maps the ring, allocates the undo
            engine.report()  # resets the engine's peak
            times, trainer_peaks = [], []
            for _ in range(args.reps):
                time.sleep(0 if args.cpu else args.gap_s)
                if not args.cpu:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                _sync(transport, weights, specs, bucket_bytes, args.cpu)
                times.append(time.perf_counter() - t0)
                if not args.cpu:
                    trainer_peaks.append(torch.cuda.max_memory_allocated() - base)
            rep = engine.report()
            key = "atomic" if atomic else "plain"
            row[key] = {"seconds": times, "median_s": statistics.median(times), "min_s": min(times),
                        "median_gbps": payload / statistics.median(times) / 1e9,
                        "engine_host_bytes": rep["host_bytes"],
                        "engine_peak_extra_gpu_bytes": rep["peak_extra_gpu_bytes"],
                        "trainer_peak_extra_gpu_bytes": max(trainer_peaks) if trainer_peaks else None}
            if atomic:
                # the failure run: the engine fails at the middle bucket of a sync of new weights
                before = engine.report()["checksums"]
                new = noisy()
                engine.fail_at(nbuckets // 2)
                failed = None
                try:
                    _sync(transport, new, specs, bucket_bytes, args.cpu)
                except MemmgrSyncError as exc:
                    failed = str(exc)[:300]
                after = engine.report()
                transport.close()
                transport = engine.transport(bucket_bytes)  # the failed transport is unusable: a new one
                _sync(transport, new, specs, bucket_bytes, args.cpu)
                good = engine.report()["checksums"] == lab.named_checksums(new.items())
                row["failure"] = {"fail_at_bucket": nbuckets // 2, "raised": failed,
                                  "engine_equal_to_before": after["checksums"] == before,
                                  "engine_consistent": after["consistent"], "next_sync_exact": good}
        finally:
            transport.close()
            engine.stop()
    row["atomic_overhead"] = row["atomic"]["median_s"] / row["plain"]["median_s"] - 1.0
    return row


def markdown(rows: list[dict], cpu: bool) -> str:
    lines = ["# Atomic weight sync: what it costs" + (" (CPU smoke test: numbers mean nothing)" if cpu else ""), "",
             "| preset | payload GB | buckets | plain median s | atomic median s | overhead | plain GB/s | atomic GB/s "
             "| engine host undo GB | engine peak extra GPU MB (plain / atomic) | failure: engine equal to before "
             "| next sync exact |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, p, f = r["atomic"], r["plain"], r["failure"]
        mb = lambda v: "-" if v is None else f"{v / 1e6:.0f}"  # noqa: E731
        lines.append(f"| {r['preset']} | {r['payload_bytes'] / 1e9:.2f} | {r['buckets']} | {p['median_s']:.3f} | "
                     f"{a['median_s']:.3f} | {100 * r['atomic_overhead']:+.1f}% | {p['median_gbps']:.1f} | "
                     f"{a['median_gbps']:.1f} | {a['engine_host_bytes'] / 1e9:.2f} | "
                     f"{mb(p['engine_peak_extra_gpu_bytes'])} / {mb(a['engine_peak_extra_gpu_bytes'])} | "
                     f"{f['engine_equal_to_before']} | {f['next_sync_exact']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("atomic_sync_cost.py needs a GPU (or --cpu for the smoke test)")
    presets = (args.presets or ("tiny,tiny-qwen3" if args.cpu else "1.3b,4b")).split(",")
    if args.cpu and any(not p.startswith("tiny") for p in presets):
        raise SystemExit("--cpu is a smoke test for the tiny presets")
    rows = []
    for preset in presets:
        row = measure_preset(preset, args)
        rows.append(row)
        print(f"atomic_sync_cost {preset}: plain {row['plain']['median_s']:.3f} s, atomic "
              f"{row['atomic']['median_s']:.3f} s ({100 * row['atomic_overhead']:+.1f}%), engine host undo "
              f"{row['atomic']['engine_host_bytes'] / 1e9:.2f} GB, failure at bucket "
              f"{row['failure']['fail_at_bucket']}: engine equal to before {row['failure']['engine_equal_to_before']}, "
              f"next sync exact {row['failure']['next_sync_exact']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"metadata": lab.metadata(), "benchmark": "atomic_sync_cost", "cpu": args.cpu, "reps": args.reps,
              "rows": rows}
    path = lab.write_json(args.out / "atomic_sync_cost.json", result)
    (args.out / "atomic_sync_cost.md").write_text(markdown(rows, args.cpu))
    print(f"wrote {path} and {args.out / 'atomic_sync_cost.md'}")
    if not all(r["failure"]["engine_equal_to_before"] and r["failure"]["next_sync_exact"] for r in rows):
        raise SystemExit("a failed sync left the engine with weights other than before, or the next sync was wrong")


if __name__ == "__main__":
    main()
