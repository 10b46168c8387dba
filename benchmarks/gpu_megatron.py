"""GPU suite for memmgr.for_megatron: python benchmarks/gpu_megatron.py --out DIR [--quick] [--equivalence-only]

One process per GPU: started as a plain script it initializes a 1-process NCCL group itself (MASTER_ADDR/MASTER_PORT
default to 127.0.0.1:29555); under `torchrun --nproc_per_node N` every rank is a data-parallel rank, each trains on
its own samples, and the equivalence section also checks that the ranks end with the same parameters (the selective
section runs only at N = 1). Per-rank outputs then carry a `_rankR` suffix. Sections, each in its own try/except (an
error is recorded in the JSON and the rest still runs):

1. equivalence: a small GPTModel trained N steps with a full offload+onload after every step vs. none, bitwise
   (losses and parameters): bf16 + distributed optimizer (grad_reduce_in_fp32), fp32 + distributed optimizer,
   bf16 + Float16OptimizerWithFloat16Params. The no-offload run is repeated to show the baseline is deterministic.
2. speed (1.3B GPT, bf16, distributed optimizer, grad_reduce_in_fp32, torch AdamW, after one step): pinned-copy peak
   each way in the same run, then memmgr full offload/onload cycles (GB/s of copied bytes, ratio to peak; an untimed
   --phase-gap pause after each move stands in for the phases in between, as in memmgr bench), then
   megatron-core's built-in offload helpers where they exist; checksums of weights, main weights and Adam moments
   before/after every method.
3. memory: memory_reserved before the model vs after memmgr's full offload, itemized (allocator segments, live
   CUDA tensors, mgr.left_behind), NVML process usage split into PyTorch-allocated, PyTorch-cached, non-PyTorch.
4. selective: each group alone offloaded/onloaded on a mid-size model: NVML and memory_allocated deltas vs the
   group's bytes (1%); onload("weights") alone, then a forward pass matches the one before offloading.

--equivalence-only runs 1 and 4 (e.g. under megatron-core 0.14.0). Writes DIR/gpu_megatron.json and
DIR/gpu_megatron.log and prints a summary table.
"""
from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

import lab
import memmgr
from lab import bits, positions, timed, world
from memmgr import nvml
from memmgr.host_memory import HostMemoryPool
from memmgr.integrations.megatron import for_megatron
from memmgr.tools.bench_methods import DEFAULT_PHASE_GAP_S, checksum
from memmgr.tools.bench_megatron import MegatronBuiltinMethod, MegatronState, train_step

lab.megatron_env()  # deterministic cuBLAS for the equivalence section, before any cuBLAS call

log = logging.getLogger("gpu_megatron")
GB = 1e9
COPIED_GROUPS = ("weights", "main_weights", "optimizer_states")


# ---------------------------------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------------------------------
def init_distributed() -> dict:
    """One process per GPU; every rank is a data-parallel rank (tensor and pipeline parallel size 1)."""
    return lab.init_megatron()


def build(*, cpu_init: bool = True, **model: Any) -> tuple[Any, Any]:
    """memmgr.tools.megatron_models.build_gpt, with CPU initialization by default (the same weights on every run)."""
    return lab.build_megatron_gpt(cpu_init=cpu_init, **model)


def make_batches(n: int, batch: int, seq: int, vocab: int, seed: int = 1) -> list:
    return lab.token_batches(n, batch, seq, vocab, seed)


def release(*objs: Any) -> None:
    for o in objs:
        if isinstance(o, memmgr.MemoryManager):
            try:
                o.close()
            except Exception:  # noqa: BLE001
                log.exception("close failed")
    del objs
    lab.cleanup()


def process_usage() -> int | None:
    idx = nvml.nvml_index(torch.cuda.current_device())
    pm = nvml.process_memory(idx) if idx is not None else None
    return pm.nbytes if pm is not None else None


def memory_now() -> dict:
    torch.cuda.synchronize()
    usage = process_usage()
    reserved = torch.cuda.memory_reserved()
    allocated = torch.cuda.memory_allocated()
    return {"allocated": allocated, "reserved": reserved, "cached": reserved - allocated, "nvml_process": usage,
            "non_pytorch": (usage - reserved) if usage is not None else None}


def state_checksums(ddp, opt) -> dict:
    """Weights, main weights and optimizer states, read from megatron's own objects (method-independent)."""
    state = MegatronState(ddp, opt)
    return {"weights": checksum(list(state.weights.values())),
            "main_weights": checksum(list(state.main_weights.values())),
            "optimizer_states": checksum(list(state.moments.values()))}


# ---------------------------------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------------------------------
EQ_CONFIGS = {"bf16-distopt": (True, True), "fp32-distopt": (False, True), "bf16-float16opt": (True, False)}
SMALL = dict(layers=2, hidden=256, heads=8, vocab=1024, seq=64)


def section_equivalence(args) -> dict:
    steps = 5 if args.quick else 10
    torch.use_deterministic_algorithms(True, warn_only=True)
    results = {}
    try:
        for name, (bf16, dist_opt) in EQ_CONFIGS.items():
            try:
                data = make_batches(steps, 4, SMALL["seq"], SMALL["vocab"])
                runs = []
                for offload in (False, False, True):
                    ddp, opt = build(**SMALL, bf16=bf16, dist_opt=dist_opt)
                    pool = HostMemoryPool()
                    mgr = for_megatron(ddp, opt, pool=pool) if offload else None
                    losses, zero_after_offload = [], True
                    for b in data:
                        losses.append(train_step(ddp, opt, *b))
                        if mgr is not None:
                            mgr.offload()
                            zero_after_offload &= all(s.device_bytes == 0 for s in mgr.state.values())
                            mgr.onload()
                    params = {n: bits(p).cpu().clone() for n, p in ddp.named_parameters()}
                    runs.append((losses, params, zero_after_offload))
                    release(mgr)
                    pool.trim()
                    del ddp, opt, mgr
                    release()

                def same(a, b) -> bool:
                    return a[0] == b[0] and all(torch.equal(a[1][k], b[1][k]) for k in a[1])

                baseline_det = same(runs[0], runs[1])
                ranks_agree = ranks_hold_same_params(runs[2][1])
                results[name] = {
                    "pass": same(runs[0], runs[2]) and runs[2][2] and ranks_agree,
                    "data_parallel_size": world()[1],
                    "ranks_hold_same_final_params": ranks_agree,
                    "baseline_deterministic": baseline_det,
                    "all_groups_zero_after_offload": runs[2][2],
                    "losses_ref": runs[0][0], "losses_offload": runs[2][0],
                    "params_differing": [k for k in runs[0][1] if not torch.equal(runs[0][1][k], runs[2][1][k])][:10],
                }
                log.info("equivalence %s: %s", name, results[name]["pass"])
            except Exception as exc:  # noqa: BLE001
                results[name] = {"pass": False, "error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc()}
                log.exception("equivalence %s failed", name)
    finally:
        torch.use_deterministic_algorithms(False)
    return results


def ranks_hold_same_params(params: dict) -> bool:
    """Data-parallel ranks must end with the same parameters: one checksum per rank, gathered and compared."""
    if world()[1] == 1:
        return True
    total = torch.zeros(2, dtype=torch.int64, device="cuda")
    for k in sorted(params):
        words = params[k].cuda()
        total[0] += words.to(torch.int64).sum()
        total[1] += (words.to(torch.int64) * torch.arange(words.numel(), device="cuda") % 65521).sum()
    gathered = [torch.zeros_like(total) for _ in range(world()[1])]
    torch.distributed.all_gather(gathered, total)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def pinned_peak(nbytes: int, reps: int = 10) -> dict:
    """The same-run pinned-copy peak (lab.pinned_peak, as memmgr bench measures it), as
    ``{"d2h": {"seconds", "GBps"}, "h2d": {...}, "both_GBps", "bytes"}``."""
    peak = lab.pinned_peak(torch.device("cuda", torch.cuda.current_device()), nbytes=nbytes, repeats=reps)
    out: dict[str, Any] = {d: {"seconds": nbytes / (peak[d] * GB), "GBps": peak[d]} for d in ("d2h", "h2d")}
    out.update(both_GBps=peak["both"], pinned=peak.get("pinned"), bytes=nbytes)
    lab.cleanup()
    return out


def itemize_live_cuda_tensors(top: int = 15) -> list[dict]:
    seen, items = set(), {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or not obj.is_cuda:
                continue
            st = obj.untyped_storage()
            if st.nbytes() == 0 or st.data_ptr() in seen:
                continue
            seen.add(st.data_ptr())
            key = f"{tuple(obj.shape)} {obj.dtype}"
            entry = items.setdefault(key, {"what": key, "count": 0, "bytes": 0})
            entry["count"] += 1
            entry["bytes"] += st.nbytes()
        except Exception:  # noqa: BLE001
            continue
    return sorted(items.values(), key=lambda e: -e["bytes"])[:top]


def itemize_segments() -> dict:
    segs = torch.cuda.memory_snapshot()
    return {"segments": len(segs), "total_size": sum(s["total_size"] for s in segs),
            "allocated_size": sum(s["allocated_size"] for s in segs),
            "largest": sorted(({"total_size": s["total_size"], "allocated_size": s["allocated_size"],
                                "segment_type": s.get("segment_type")} for s in segs),
                              key=lambda s: -s["total_size"])[:10]}


def section_speed_and_memory(args, baseline: dict, results: dict) -> None:
    big = dict(layers=12 if args.quick else 24, hidden=2048, heads=16, ffn=8192, vocab=32000, seq=128)
    speed: dict[str, Any] = {"model": big}
    memory: dict[str, Any] = {"baseline_before_model": baseline}
    results["speed"], results["memory"] = speed, memory
    cycles = args.cycles or (2 if args.quick else 3)
    peak = pinned_peak((1 if args.quick else 4) << 30)
    speed["pinned_peak"] = peak
    ddp, opt = build(**big, bf16=True, dist_opt=True, cpu_init=False)
    data = make_batches(2, 2, big["seq"], big["vocab"])
    speed["loss_step1"] = train_step(ddp, opt, *data[0])
    speed["state_after_step"] = memory_now()
    reference = state_checksums(ddp, opt)
    speed["checksums_reference"] = reference

    pool = HostMemoryPool()
    mgr = None
    try:
        t0 = time.perf_counter()
        mgr = for_megatron(ddp, opt, pool=pool)
        speed["memmgr_build_seconds"] = time.perf_counter() - t0  # includes pinning the host copies
        speed["groups"] = {n: {"nbytes": s.nbytes, "policy": s.policy} for n, s in mgr.state.items()}
        copied = sum(mgr.group(n).nbytes for n in COPIED_GROUPS)
        speed["memmgr_copied_bytes"] = copied
        cyc = []
        speed["phase_gap_s"] = args.phase_gap
        for i in range(cycles):
            off = timed(mgr.offload)
            left = memory_now()
            time.sleep(args.phase_gap)
            on = timed(mgr.onload)
            intact = state_checksums(ddp, opt) == reference
            time.sleep(args.phase_gap)
            cyc.append({"offload_s": off, "onload_s": on, "offload_GBps": copied / off / GB,
                        "onload_GBps": copied / on / GB, "offload_vs_peak": copied / off / GB / peak["d2h"]["GBps"],
                        "onload_vs_peak": copied / on / GB / peak["h2d"]["GBps"], "intact": intact,
                        "reserved_after_offload": left["reserved"]})
            log.info("memmgr cycle %d: offload %.3fs onload %.3fs intact=%s", i, off, on, intact)
        speed["memmgr_cycles"] = cyc
        speed["memmgr_intact"] = all(c["intact"] for c in cyc)
        speed["loss_step2_after_cycles"] = train_step(ddp, opt, *data[1])
        reference = state_checksums(ddp, opt)
        speed["checksums_reference_after_step2"] = reference

        # memory after a full offload
        try:
            mgr.offload()
            torch.cuda.empty_cache()
            now = memory_now()
            memory["after_full_offload"] = now
            memory["reserved_over_baseline"] = now["reserved"] - baseline["reserved"]
            if now["nvml_process"] is not None and baseline["nvml_process"] is not None:
                memory["nvml_over_baseline"] = now["nvml_process"] - baseline["nvml_process"]
            memory["segments"] = itemize_segments()
            memory["live_cuda_tensors"] = itemize_live_cuda_tensors()
            memory["left_behind"] = dict(mgr.left_behind)
            memory["group_state"] = {n: {"state": s.state, "device_bytes": s.device_bytes, "host_bytes": s.host_bytes}
                                     for n, s in mgr.state.items()}
        except Exception as exc:  # noqa: BLE001
            memory["error"] = f"{type(exc).__name__}: {exc}"
            memory["traceback"] = traceback.format_exc()
        finally:
            mgr.onload()
            speed["intact_after_memory_section"] = state_checksums(ddp, opt) == reference
    finally:
        release(mgr)  # the built-in helpers rebind tensors, so memmgr lets go first
        pool.trim()
        mgr = None  # its buckets must not keep the old storages alive while the built-ins offload
        release()

    if getattr(args, "skip_builtin", False):
        speed["builtin"] = {"available": "skipped (--skip-builtin)"}
        return speed
    speed["builtin"] = builtin_cycles(ddp, opt, reference, peak, 1 if args.quick else 2, baseline, args.phase_gap)
    del ddp, opt, mgr
    release()


def builtin_cycles(ddp, opt, reference: dict, peak: dict, cycles: int, baseline: dict, phase_gap_s: float) -> dict:
    """megatron-core's own offload helpers on the same state (memmgr.tools.bench_megatron.MegatronBuiltinMethod)."""
    state = MegatronState(ddp, opt)
    method = MegatronBuiltinMethod(state)
    reason = method.available()
    if reason:
        return {"available": reason}
    copied = state.copied_bytes
    out: dict[str, Any] = {"available": True, "copied_bytes": copied}
    cyc = []
    for i in range(cycles):
        off = timed(lambda: method.offload(state))
        left = memory_now()
        time.sleep(phase_gap_s)
        on = timed(lambda: method.onload(state))
        intact = state_checksums(ddp, opt) == reference
        time.sleep(phase_gap_s)
        cyc.append({"offload_s": off, "onload_s": on, "offload_GBps": copied / off / GB,
                    "onload_GBps": copied / on / GB,
                    "offload_vs_peak": copied / off / GB / peak["d2h"]["GBps"],
                    "onload_vs_peak": copied / on / GB / peak["h2d"]["GBps"], "intact": intact,
                    "reserved_after_offload": left["reserved"],
                    "reserved_over_baseline_after_offload": left["reserved"] - baseline["reserved"]})
        log.info("builtin cycle %d: offload %.3fs onload %.3fs intact=%s", i, off, on, intact)
    out["cycles"] = cyc
    out["intact"] = all(c["intact"] for c in cyc)
    return out


def section_selective(args) -> dict:
    mid = dict(layers=2 if args.quick else 4, hidden=1024, heads=16, vocab=32000, seq=128)
    ddp, opt = build(**mid, bf16=True, dist_opt=True, cpu_init=False)
    data = make_batches(2, 4, mid["seq"], mid["vocab"])
    train_step(ddp, opt, *data[0])
    pool = HostMemoryPool()
    mgr = for_megatron(ddp, opt, pool=pool)
    out: dict[str, Any] = {"groups": {}}
    try:
        for name in mgr.group_names:
            nbytes = mgr.group(name).nbytes
            entry: dict[str, Any] = {"nbytes": nbytes}
            try:
                # The manager gives cuBLAS's workspaces back with the cache at every offload; released here first,
                # so that they are not counted as the first group's bytes.
                torch._C._cuda_clearCublasWorkspaces()
                torch.cuda.empty_cache()
                before = memory_now()
                mgr.offload(name)
                torch.cuda.empty_cache()
                mid_ = memory_now()
                mgr.onload(name)
                after = memory_now()
                entry["allocated_freed"] = before["allocated"] - mid_["allocated"]
                entry["allocated_restored"] = after["allocated"] - mid_["allocated"]
                if before["nvml_process"] is not None:
                    entry["nvml_freed"] = before["nvml_process"] - mid_["nvml_process"]
                    entry["nvml_restored"] = after["nvml_process"] - mid_["nvml_process"]
                judged = nbytes >= 16 << 20
                keys = [k for k in ("allocated_freed", "allocated_restored", "nvml_freed", "nvml_restored")
                        if k in entry]
                if name in ("grads", "scratch"):
                    # their bytes are what they hold right now; onload recreates nothing (megatron does, lazily)
                    keys = [k for k in keys if k.endswith("freed")]
                entry["within_1pct"] = {k: abs(entry[k] - nbytes) <= 0.01 * nbytes for k in keys} if judged else \
                    "too small to judge"
                entry["pass"] = (all(entry["within_1pct"].values()) if judged else True)
            except Exception as exc:  # noqa: BLE001
                entry.update(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(), **{"pass": False})
            out["groups"][name] = entry
        # weights alone, then a forward pass
        tokens, labels = data[1]
        with torch.no_grad():
            expected = ddp(tokens, positions(tokens), None, labels=labels).clone()
        mgr.offload()
        mgr.onload("weights")
        st = mgr.state
        with torch.no_grad():
            got = ddp(tokens, positions(tokens), None, labels=labels)
        out["weights_alone_forward"] = {
            "pass": bool(torch.equal(bits(got), bits(expected))) and st["optimizer_states"].device_bytes == 0
            and st["main_weights"].device_bytes == 0 and st["grad_buffers"].device_bytes == 0,
            "memory_with_weights_only": memory_now()}
        mgr.onload()
        out["train_after"] = train_step(ddp, opt, *data[1])
    finally:
        release(mgr)
        pool.trim()
        del ddp, opt, mgr
        release()
    out["pass"] = all(g.get("pass") for g in out["groups"].values()) and out["weights_alone_forward"]["pass"]
    return out


# ---------------------------------------------------------------------------------------------------------------------
def run_section(results: dict, name: str, fn: Callable[[], Any]) -> None:
    t0 = time.perf_counter()
    try:
        value = fn()
        if value is not None:
            results[name] = value
    except Exception as exc:  # noqa: BLE001
        log.exception("section %s failed", name)
        results.setdefault(name, {})
        if isinstance(results[name], dict):
            results[name].update(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
    results.setdefault("section_seconds", {})[name] = time.perf_counter() - t0


def summary(results: dict) -> str:
    rows = [("check", "result")]
    for name, r in (results.get("equivalence") or {}).items():
        if isinstance(r, dict):
            rows.append((f"equivalence {name}", ("PASS" if r.get("pass") else "FAIL") +
                         ("" if r.get("baseline_deterministic", True) else " (baseline nondeterministic)") +
                         (f" error: {r['error']}" if "error" in r else "")))
    sp = results.get("speed") or {}
    if "pinned_peak" in sp:
        p = sp["pinned_peak"]
        rows.append(("pinned peak d2h / h2d", f"{p['d2h']['GBps']:.1f} / {p['h2d']['GBps']:.1f} GB/s"))
    for label, cyc in (("memmgr", sp.get("memmgr_cycles")),
                       ("megatron built-in", (sp.get("builtin") or {}).get("cycles"))):
        for i, c in enumerate(cyc or []):
            rows.append((f"{label} cycle {i} off/on", f"{c['offload_s']:.2f}s {c['offload_GBps']:.1f} GB/s "
                         f"({c['offload_vs_peak']:.0%}) / {c['onload_s']:.2f}s {c['onload_GBps']:.1f} GB/s "
                         f"({c['onload_vs_peak']:.0%}) intact={c['intact']}"))
    if "builtin" in sp and "cycles" not in sp["builtin"]:
        rows.append(("megatron built-in", str(sp["builtin"].get("available"))))
    mem = results.get("memory") or {}
    if "after_full_offload" in mem:
        a = mem["after_full_offload"]
        rows.append(("reserved over pre-model baseline", f"{mem['reserved_over_baseline'] / GB:.3f} GB"))
        if a.get("nvml_process") is not None:
            rows.append(("after offload: allocated/cached/non-PyTorch",
                         f"{a['allocated'] / GB:.3f} / {a['cached'] / GB:.3f} / {a['non_pytorch'] / GB:.3f} GB"))
    sel = results.get("selective") or {}
    if "groups" in sel:
        rows.append(("selective per-group deltas (1%)", "PASS" if sel.get("pass") else "FAIL"))
        rows.append(("onload weights alone + forward",
                     "PASS" if (sel.get("weights_alone_forward") or {}).get("pass") else "FAIL"))
    for name, r in results.items():
        if isinstance(r, dict) and "error" in r and name != "equivalence":
            rows.append((f"{name} ERROR", r["error"][:100]))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a.ljust(width)}  {b}" for a, b in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--equivalence-only", action="store_true")
    parser.add_argument("--speed-only", action="store_true", help="only the 1.3B speed and memory section")
    parser.add_argument("--skip-builtin", action="store_true", help="do not time megatron-core's own helpers")
    parser.add_argument("--cycles", type=int, default=None, help="memmgr offload/onload cycles (default 3)")
    parser.add_argument("--phase-gap", type=float, default=DEFAULT_PHASE_GAP_S,
                        help="untimed seconds after each offload and onload, as in memmgr bench (0: back to back)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rank, world_size, _ = world()
    suffix = f"_rank{rank}" if world_size > 1 else ""
    handler = logging.FileHandler(args.out / f"gpu_megatron{suffix}.log", mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("gpu_megatron", "memmgr"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("gpu_megatron").addHandler(logging.StreamHandler(sys.stdout))
    warnings.filterwarnings("ignore")

    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "meta": lab.metadata()}
    t_start = time.perf_counter()
    try:
        results["env"] = init_distributed()
        baseline = memory_now()
        results["baseline_before_model"] = baseline
        if not args.equivalence_only:
            run_section(results, "speed_and_memory", lambda: section_speed_and_memory(args, baseline, results))
        if not args.speed_only:
            run_section(results, "equivalence", lambda: section_equivalence(args))
            if world_size == 1:  # NVML deltas per group are measured on one GPU
                run_section(results, "selective", lambda: section_selective(args))
    except Exception as exc:  # noqa: BLE001
        results["fatal"] = f"{type(exc).__name__}: {exc}"
        results["fatal_traceback"] = traceback.format_exc()
        log.exception("setup failed")
    results["total_seconds"] = time.perf_counter() - t_start
    lab.write_json(args.out / f"gpu_megatron{suffix}.json", results, indent=2)
    table = summary(results)
    (args.out / f"summary{suffix}.txt").write_text(table + "\n")
    print(f"[rank {rank} of {world_size}]\n{table}" if world_size > 1 else table)
    try:
        torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
