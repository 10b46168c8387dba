"""Soak test for memmgr.for_megatron: python benchmarks/gpu_soak.py --out DIR [--cycles 1000] [--cpu-smoke]

One GPU, one process (a 1-process NCCL group on 127.0.0.1 and a free port, set up by the Megatron helpers of
benchmarks/lab.py that benchmarks/gpu_megatron.py uses). A small GPTModel (4 layers, hidden 512, 8 heads, vocab 8192,
seq 128, batch 4, bf16, DistributedDataParallel with grad_reduce_in_fp32 and the distributed optimizer, torch AdamW)
runs N cycles of

    training step (zero_grad_buffer, forward, backward, finish_grad_sync, optimizer.step), then, with the default
    ``--via phase`` (the README's loop): ``with mgr.phase("generate"):`` a weight sync inside it
    (``with mgr.weight_sync() as weights``, which reads every weight) and the phase's exit brings everything back;
    with ``--via calls``: ``mgr.offload()`` -> ``mgr.onload()``.

The manager is built right after the model, before the first step (optimizer state is created at step 1 and picked up
at the first offload). In phase mode every cycle checks that every group is back on the device after the phase, and
``--reference`` runs the same steps on a fresh model without memmgr afterwards and compares the losses bit for bit. At
cycles 1, 10, 100, 250, 500, 750, 1000 (and N), right after the offload, i.e. while offloaded, it records NVML process
usage and device used, torch memory_reserved/allocated, host RSS (VmRSS), the memmgr pool's bytes_held, the bytes still
on the device per group, and the cycle's loss. At the end, cycle N is compared with cycle 10 (NVML process usage,
reserved, RSS each within 1%), losses must be finite, and per-phase times (step / offload / onload, median and p90) and
the total wall time are reported.

--cpu-smoke: a few cycles of a small MLP on the CPU with memmgr.for_module and torch.optim.AdamW, to check the
bookkeeping without a GPU (NVML and CUDA fields are null there).

Writes DIR/soak.json (the checkpoint records, per-cycle times, the checks and the run's metadata) and prints a short
summary.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import lab
from lab import free_port

CHECKPOINTS = (1, 10, 100, 250, 500, 750, 1000)
TOLERANCE = 0.01
MODEL = dict(layers=4, hidden=512, heads=8, vocab=8192, seq=128)
BATCH = 4
NUM_BATCHES = 16


def host_rss() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def time_stats(xs: list[float]) -> dict:
    return {"median_s": median(xs), "p90_s": pct(xs, 0.9), "min_s": min(xs) if xs else None,
            "max_s": max(xs) if xs else None, "mean_s": (sum(xs) / len(xs)) if xs else None, "n": len(xs)}


# ---------------------------------------------------------------------------------------------------------------------
# the two setups: each returns (step_fn, mgr, measure_fn, env)
# ---------------------------------------------------------------------------------------------------------------------
def setup_gpu(manage: bool = True, same_address: bool = False
              ) -> tuple[Callable[[int], float], Any, Callable[[], dict], dict]:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    import torch

    from memmgr import nvml
    from memmgr.host_memory import HostMemoryPool
    from memmgr.integrations.megatron import for_megatron

    env = lab.init_megatron() if not torch.distributed.is_initialized() else {}
    env["master_port"] = os.environ["MASTER_PORT"]
    idx = nvml.nvml_index(0)
    env["nvml_index"] = idx
    env["nvml_status"] = nvml.status()
    baseline = measure_cuda(torch, nvml, idx)
    ddp, opt = lab.build_megatron_gpt(**MODEL, bf16=True, dist_opt=True)
    inner = [type(o.optimizer).__name__ for o in getattr(opt, "chained_optimizers", [opt])
             if hasattr(o, "optimizer")]
    env["optimizer"] = f"{type(opt).__name__} over {inner}"
    env["params"] = sum(p.numel() for p in ddp.parameters())
    env["baseline_before_model"] = baseline
    data = lab.token_batches(NUM_BATCHES, BATCH, MODEL["seq"], MODEL["vocab"])
    mgr = for_megatron(ddp, opt, pool=HostMemoryPool(), same_address=same_address) if manage else None
    # parameters and their grad-buffer views (both adopted at the build; optimizer state created at the first step
    # is collected, and gets its lasting address, at the first offload)
    env["parameters"] = lambda: [p.data_ptr() for p in ddp.parameters()] + [
        p.main_grad.data_ptr() for p in ddp.parameters() if getattr(p, "main_grad", None) is not None]

    def optimizer_state() -> list[int]:
        """Where the optimizer's CUDA tensors live: the fp32 main parameters it steps and its moments (made at the
        first step; the first offload collects them and gives them their lasting addresses)."""
        ptrs: list[int] = []
        for o in getattr(opt, "chained_optimizers", [opt]):
            inner = getattr(o, "optimizer", None)
            if inner is None:
                continue
            for group in inner.param_groups:
                ptrs += [p.data_ptr() for p in group["params"] if p.is_cuda]
            for state in inner.state.values():
                ptrs += [t.data_ptr() for t in state.values() if torch.is_tensor(t) and t.is_cuda]
        return ptrs

    env["optimizer_state"] = optimizer_state

    def step(i: int) -> float:
        return lab.megatron_train_step(ddp, opt, *data[i % len(data)])

    return step, mgr, lambda: measure_cuda(torch, nvml, idx), env


def measure_cuda(torch: Any, nvml: Any, idx: int | None) -> dict:
    torch.cuda.synchronize()
    pm = nvml.process_memory(idx) if idx is not None else None
    dm = nvml.device_memory(idx) if idx is not None else None
    return {"nvml_process": pm.nbytes if pm is not None else None,
            "nvml_process_source": pm.source if pm is not None else None,
            "nvml_device_used": dm.used if dm is not None else None,
            "reserved": torch.cuda.memory_reserved(), "allocated": torch.cuda.memory_allocated(),
            "rss": host_rss()}


def setup_cpu(manage: bool = True) -> tuple[Callable[[int], float], Any, Callable[[], dict], dict]:
    import torch

    import memmgr

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 256, generator=g), torch.randn(32, 256, generator=g)) for _ in range(NUM_BATCHES)]
    mgr = memmgr.for_module(model, opt) if manage else None

    def step(i: int) -> float:
        x, y = data[i % len(data)]
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def measure() -> dict:
        return {"nvml_process": None, "nvml_process_source": None, "nvml_device_used": None, "reserved": None,
                "allocated": None, "rss": host_rss()}

    env = {"torch": torch.__version__, "device": "cpu", "memmgr_backend": memmgr.backend_info().describe(),
           "params": sum(p.numel() for p in model.parameters()), "optimizer": type(opt).__name__}
    return step, mgr, measure, env


# ---------------------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    import torch

    cuda = not args.cpu_smoke

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()},
                               "mode": "cpu-smoke" if args.cpu_smoke else "gpu-megatron",
                               "model": MODEL if cuda else "MLP 256-1024-256", "batch": BATCH}
    t_start = time.perf_counter()
    checkpoints = sorted({c for c in CHECKPOINTS if c <= args.cycles} | {args.cycles})
    records: list[dict] = []
    losses: list[float] = []
    times: dict[str, list[float]] = {"step": [], "offload": [], "onload": [], "weight_sync": []}
    synced_numel: list[int] = []
    results["records"] = records
    results["via"] = args.via
    mgr = None
    try:
        t0 = time.perf_counter()
        if args.cpu_smoke:
            step, mgr, measure, env = setup_cpu()
        else:
            step, mgr, measure, env = setup_gpu(same_address=args.same_address)
        addresses = env.pop("parameters", None)  # where each parameter lives (--same-address: after every phase too)
        optimizer_addresses = env.pop("optimizer_state", None)  # and each optimizer tensor, from the first phase on
        results["env"] = env
        results["same_address"] = bool(getattr(args, "same_address", False))
        at_build = addresses() if addresses is not None else None
        moved: list[int] = []
        results["parameters_moved_after_phase"] = moved
        optimizer_moved: list[int] = []
        results["optimizer_state_moved_after_phase"] = optimizer_moved
        optimizer_at_first = None
        results["setup_seconds"] = time.perf_counter() - t0
        results["groups_at_build"] = {n: {"nbytes": s.nbytes, "policy": str(s.policy)} for n, s in mgr.state.items()}
        t_loop = time.perf_counter()
        not_back: list[int] = []
        results["not_back_after_phase"] = not_back
        for cycle in range(1, args.cycles + 1):
            sync()
            t0 = time.perf_counter()
            loss = step(cycle - 1)  # float(loss) synchronizes on the loss; sync() below covers optimizer.step
            sync()
            t1 = time.perf_counter()

            def record() -> None:
                if cycle in checkpoints:
                    records.append({"cycle": cycle, "loss": loss, **measure(), "pool_bytes_held": mgr.pool.bytes_held,
                                    "device_bytes_while_offloaded": {n: s.device_bytes
                                                                     for n, s in mgr.state.items()},
                                    "left_behind_bytes": sum(getattr(mgr, "left_behind", {}).values())})

            if args.via == "phase":
                with mgr.phase("generate"):
                    sync()
                    t2 = time.perf_counter()
                    record()
                    ts = time.perf_counter()
                    with mgr.weight_sync() as weights:
                        # what an engine's copy does: every weight read on the device
                        read = sum(int(t.numel()) for t in weights.values())
                        torch.cat([t.reshape(-1)[:1].float() for t in weights.values()]).sum().item()
                    sync()
                    times["weight_sync"].append(time.perf_counter() - ts)
                    synced_numel.append(read)
                    t3 = time.perf_counter()
                sync()
                t4 = time.perf_counter()
                if any(s.state != "on_device" for n, s in mgr.state.items() if s.nbytes):
                    not_back.append(cycle)
            else:
                mgr.offload()
                sync()
                t2 = time.perf_counter()
                record()
                sync()
                t3 = time.perf_counter()
                mgr.onload()
                sync()
                t4 = time.perf_counter()
            if results["same_address"]:
                if addresses() != at_build:
                    moved.append(cycle)
                if optimizer_addresses is not None:
                    now = optimizer_addresses()
                    if optimizer_at_first is None:
                        optimizer_at_first = now
                    elif now != optimizer_at_first:
                        optimizer_moved.append(cycle)
            losses.append(loss)
            times["step"].append(t1 - t0)
            times["offload"].append(t2 - t1)
            times["onload"].append(t4 - t3)
            if cycle in checkpoints:
                r = records[-1]
                print(f"cycle {cycle:5d}  loss {loss:.4f}  nvml_process {fmt_bytes(r['nvml_process'])}  "
                      f"reserved {fmt_bytes(r['reserved'])}  rss {fmt_bytes(r['rss'])}  "
                      f"pool {fmt_bytes(r['pool_bytes_held'])}  "
                      f"off/on {times['offload'][-1] * 1e3:.1f}/{times['onload'][-1] * 1e3:.1f} ms", flush=True)
        results["loop_seconds"] = time.perf_counter() - t_loop
    except Exception as exc:  # noqa: BLE001
        results["error"] = f"{type(exc).__name__}: {exc}"
        results["traceback"] = traceback.format_exc()
        print(results["traceback"], file=sys.stderr)
    results["cycles_completed"] = len(losses)
    results["losses"] = losses
    results["weight_sync_numel"] = sorted(set(synced_numel))
    if mgr is not None:
        try:
            mgr.close()
        except Exception as exc:  # noqa: BLE001
            results.setdefault("error", f"close: {type(exc).__name__}: {exc}")
        mgr = None
    if args.reference and "error" not in results:
        results["reference"] = reference_losses(args, losses)
    results["times_per_cycle_s"] = {k: [round(x, 6) for x in v] for k, v in times.items()}
    results["time_stats"] = {k: time_stats(v) for k, v in times.items()}
    results["total_seconds"] = time.perf_counter() - t_start
    results["checks"] = checks(records, losses, args.cycles, results)
    return results


def reference_losses(args: argparse.Namespace, losses: list[float]) -> dict:
    """The same steps on a fresh model built the same way, without memmgr: the losses must be equal bit for bit."""
    step, _none, _measure, _env = (setup_cpu if args.cpu_smoke else setup_gpu)(manage=False)
    ref = [step(i) for i in range(len(losses))]
    differ = [i + 1 for i, (a, b) in enumerate(zip(losses, ref)) if a != b]
    return {"cycles": len(ref), "equal": not differ, "first_differing_cycles": differ[:20],
            "max_abs_diff": max((abs(a - b) for a, b in zip(losses, ref)), default=0.0)}


def checks(records: list[dict], losses: list[float], cycles: int, results: dict) -> dict:
    by_cycle = {r["cycle"]: r for r in records}
    ref_cycle = 10 if (10 in by_cycle and cycles > 10) else (records[0]["cycle"] if records else None)
    last = by_cycle.get(cycles)
    out: dict[str, Any] = {"reference_cycle": ref_cycle, "final_cycle": cycles if last else None,
                           "tolerance": TOLERANCE, "metrics": {}}
    judged: list[bool] = []
    for key in ("nvml_process", "reserved", "rss"):
        entry: dict[str, Any] = {}
        ref = by_cycle.get(ref_cycle, {}).get(key) if ref_cycle is not None else None
        fin = last.get(key) if last else None
        entry["reference"], entry["final"] = ref, fin
        if ref is None or fin is None:
            entry["ratio"], entry["pass"] = None, None
            entry["note"] = "not measured (no final record)" if last is None else "not available"
        elif ref == 0:
            entry["ratio"], entry["pass"] = None, fin == 0
            entry["delta_bytes"] = fin
        else:
            entry["ratio"] = fin / ref
            entry["delta_bytes"] = fin - ref
            entry["pass"] = abs(fin / ref - 1) <= TOLERANCE
            entry["pass_growth_only"] = fin / ref - 1 <= TOLERANCE  # a shrink is not a leak; "pass" is symmetric
        if entry["pass"] is not None:
            judged.append(entry["pass"])
        out["metrics"][key] = entry
    # informational: the same ratios for the other tracked quantities
    info = {}
    for key in ("allocated", "nvml_device_used", "pool_bytes_held"):
        ref = by_cycle.get(ref_cycle, {}).get(key) if ref_cycle is not None else None
        fin = last.get(key) if last else None
        info[key] = {"reference": ref, "final": fin,
                     "ratio": (fin / ref) if (ref and fin is not None) else None}
    out["informational"] = info
    # informational: growth after warm-up (cycle 100 -> final), which tells a one-time step in the first cycles (the C
    # allocator's dynamic mmap threshold moving host buffers onto its heap, on the CPU path) from a steady leak
    warm = 100 if (100 in by_cycle and cycles >= 200) else None
    out["after_warmup"] = {key: {"reference_cycle": warm, "reference": by_cycle[warm].get(key),
                                 "final": last.get(key) if last else None,
                                 "ratio": (last[key] / by_cycle[warm][key])
                                 if (last and last.get(key) and by_cycle[warm].get(key)) else None}
                           for key in ("nvml_process", "reserved", "rss")} if warm is not None else {}
    nonfinite = [i + 1 for i, x in enumerate(losses) if not math.isfinite(x)]
    out["losses_finite"] = {"pass": bool(losses) and not nonfinite, "nonfinite_cycles": nonfinite[:20],
                            "first": losses[0] if losses else None, "last": losses[-1] if losses else None}
    out["all_offloaded_to_zero"] = all(sum(r["device_bytes_while_offloaded"].values()) == 0 for r in records) \
        if records else None
    completed = len(losses) == cycles and "error" not in results
    out["completed"] = completed
    out["all_back_after_phase"] = not results.get("not_back_after_phase")
    out["addresses_kept"] = not (results.get("parameters_moved_after_phase")
                                 or results.get("optimizer_state_moved_after_phase")) \
        if results.get("same_address") else None
    reference = results.get("reference")
    out["losses_equal_reference"] = reference.get("equal") if reference else None
    out["pass"] = completed and bool(judged) and all(judged) and out["losses_finite"]["pass"] and \
        out["all_back_after_phase"] and out["losses_equal_reference"] is not False and \
        out["addresses_kept"] is not False
    return out


def fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def summary(results: dict) -> str:
    c = results.get("checks", {})
    lines = [f"gpu_soak ({results.get('mode')}): {results.get('cycles_completed')}/{results['args'].get('cycles')} "
             f"cycles in {results.get('total_seconds', 0):.1f}s (loop {results.get('loop_seconds') or 0:.1f}s, "
             f"setup {results.get('setup_seconds') or 0:.1f}s)"]
    ts = results.get("time_stats", {})
    if ts.get("offload", {}).get("n"):
        lines.append("median/p90 ms: " + ", ".join(
            f"{k} {ts[k]['median_s'] * 1e3:.2f}/{ts[k]['p90_s'] * 1e3:.2f}"
            for k in ("step", "offload", "onload", "weight_sync") if ts.get(k, {}).get("n")))
    if results.get("via") == "phase":
        lines.append(f"every group back on the device after each phase: "
                     f"{'PASS' if c.get('all_back_after_phase') else 'FAIL'}")
    if results.get("same_address"):
        moved = results.get("parameters_moved_after_phase") or []
        lines.append(f"same_address=True: every parameter at its address after each phase: "
                     f"{'FAIL (cycles ' + str(moved[:10]) + ')' if moved else 'PASS'}")
        moved = results.get("optimizer_state_moved_after_phase") or []
        lines.append(f"same_address=True: every optimizer tensor (fp32 main parameters, moments) at its address after "
                     f"each phase from the first on: {'FAIL (cycles ' + str(moved[:10]) + ')' if moved else 'PASS'}")
    if c.get("losses_equal_reference") is not None:
        lines.append(f"losses equal to the same steps without memmgr, bit for bit: "
                     f"{'PASS' if c['losses_equal_reference'] else 'FAIL'} {results.get('reference')}")
    for key, m in (c.get("metrics") or {}).items():
        verdict = "n/a" if m.get("pass") is None else ("PASS" if m["pass"] else "FAIL")
        ratio = f"{m['ratio']:.5f}" if m.get("ratio") is not None else "-"
        lines.append(f"{key:>13}: cycle {c.get('reference_cycle')} {fmt_bytes(m.get('reference'))} -> cycle "
                     f"{c.get('final_cycle')} {fmt_bytes(m.get('final'))}  ratio {ratio}  {verdict}")
    after = {k: m["ratio"] for k, m in (c.get("after_warmup") or {}).items() if m.get("ratio") is not None}
    if after:
        lines.append("after warm-up (cycle 100 -> final, informational): " +
                     ", ".join(f"{k} {r:.5f}" for k, r in after.items()))
    lf = c.get("losses_finite") or {}
    lines.append(f"losses finite: {'PASS' if lf.get('pass') else 'FAIL'} (first {lf.get('first')}, "
                 f"last {lf.get('last')}); all groups at 0 device bytes while offloaded: "
                 f"{c.get('all_offloaded_to_zero')}")
    if "error" in results:
        lines.append(f"ERROR: {results['error']}")
    lines.append(f"OVERALL: {'PASS' if c.get('pass') else 'FAIL'}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output directory (gets soak.json)")
    parser.add_argument("--cycles", type=int, default=None, help="default 1000 (20 with --cpu-smoke)")
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--via", choices=("phase", "calls"), default="phase",
                        help="phase: the README's loop (mgr.phase with a weight sync inside); calls: offload/onload")
    parser.add_argument("--same-address", action="store_true",
                        help="build the manager with same_address=True and check every parameter's address after "
                             "each phase (GPU only)")
    parser.add_argument("--reference", action="store_true",
                        help="afterwards, run the same steps without memmgr and compare the losses bit for bit")
    args = parser.parse_args()
    if args.cycles is None:
        args.cycles = 20 if args.cpu_smoke else 1000
    if args.cycles < 1:
        parser.error("--cycles must be >= 1")
    if args.same_address and args.cpu_smoke:
        parser.error("--same-address needs the GPU (same-address memory is GPU memory)")
    args.out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    results = run(args)
    results["meta"] = lab.metadata()
    lab.write_json(args.out / "soak.json", results, indent=1)
    print(summary(results))
    if not args.cpu_smoke:
        try:
            import torch

            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
    gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
