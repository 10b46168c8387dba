"""``memmgr bench``: offload/onload of a Megatron-shaped training state, timed against the link's peak and peers.

Every method does the same work on the same state: the bf16 weights, fp32 main weights and fp32 Adam moments go to
host memory and come back; the fp32 gradients are dropped and re-zeroed. Ratios are to the pinned-copy peak
measured in the same run. On a machine without a GPU the CPU path runs (device tensors on ``cpu``; the "peak" is a
host memcpy) and is labelled as such.

Each cycle is offload, a pause, onload, a pause: the pauses stand in for the phases in between (generation, training)
and are not timed. They matter on a GPU: for about 0.1 s after memory goes back to the driver (``empty_cache``),
copies into newly allocated device memory run ~10% slower (the driver's doing, likely background work on the freed
memory), for every method alike (``benchmarks/gpu_alloc_probe.py --fresh``). In an RL loop the
generate phase sits there, so the bench measures the onload a trainer actually gets; ``--phase-gap 0`` measures
back-to-back cycles.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections import Counter

import torch

from memmgr.errors import MemmgrInputError
from memmgr.tools.bench_methods import (  # noqa: F401
    DEFAULT_PHASE_GAP_S,
    GB,
    GiB,
    MemmgrMethod,
    Method,
    MethodResult,
    PerTensorMethod,
    TorchMemorySaverMethod,
    TrainingState,
    all_methods,
    checksum,
    default_size,
    make_small_tensors,
    make_state,
    memmgr_cycles,
    phase_gap_for,
    pinned_peak,
    process_gpu_bytes,
    run_method,
    run_under_conditions,
    timed,
)

logger = logging.getLogger("memmgr")


BETWEEN_CHOICES = ("engine", "pause")


def conditions_for(device: torch.device, requested: list[str] | None) -> list[str]:
    """What stands between offload and onload: ``engine`` (another process takes the freed memory and releases it
    right before the onload, as in a colocated loop; GPU only) and/or ``pause`` (an untimed pause in this process).
    Default: both on a GPU, the pause on the CPU path."""
    if requested is None:
        return list(BETWEEN_CHOICES) if device.type == "cuda" else ["pause"]
    unknown = [c for c in requested if c not in BETWEEN_CHOICES]
    if unknown or not requested:
        raise MemmgrInputError(f"between: unknown condition(s) {unknown or requested}; choose from "
                               f"{list(BETWEEN_CHOICES)}")
    if "engine" in requested and device.type != "cuda":
        raise MemmgrInputError("between: 'engine' needs a GPU (another process takes the GPU memory); use 'pause'")
    return list(dict.fromkeys(requested))


def run_bench(out: str = "memmgr-bench", size_gb: float | None = None, sweep: bool = False, cycles: int = 3,
              methods: list[str] | None = None, megatron: bool | None = None,
              phase_gap_s: float | None = None, between: list[str] | None = None, gpt: str = "1.3b") -> dict:
    import click
    from tqdm import tqdm

    from memmgr import backend_info
    from memmgr.tools.engine_standin import EngineStandIn

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU only (no GPU: the CPU path)"
    os.makedirs(out, exist_ok=True)
    copied = size_gb * GB if size_gb else default_size(device)
    chosen = [m for m in all_methods() if methods is None or m.name in methods]
    if device.type != "cuda":
        chosen = [m for m in chosen if not isinstance(m, TorchMemorySaverMethod)]
    gap = phase_gap_for(device, phase_gap_s)
    condition_names = conditions_for(device, between)
    engine = EngineStandIn(device) if "engine" in condition_names else None
    conditions = {name: (engine.cycle if name == "engine" else None) for name in condition_names}
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": label, "torch": torch.__version__,
            "backend": backend_info().describe(), "requested_copied_bytes": copied, "phase_gap_s": gap,
            "between": condition_names}
    click.echo(f"memmgr bench on {label}: {backend_info().describe()}")
    peak = pinned_peak(device, nbytes=min(2 * GiB, int(copied)) if device.type == "cuda" else 256 * 2**20)
    click.echo(f"pinned-copy peak: d2h {peak['d2h']:.1f} GB/s, h2d {peak['h2d']:.1f} GB/s, "
               f"both {peak['both']:.1f} GB/s")
    # The real GPT first: once torch_memory_saver has run in this process, importing megatron-core fails
    # (megatron 0.19 probes torch_memory_saver's singleton at import), and its state is gone before the synthetic
    # state is sized to the free memory.
    megatron_bar = tqdm(total=4, desc="megatron GPT methods", unit="method", disable=device.type != "cuda")
    megatron_report = _megatron_section(device, megatron, peak, cycles, methods, megatron_bar, gap, conditions, gpt)
    megatron_bar.close()
    if device.type == "cuda" and size_gb is None:  # sized again to what the GPT left free
        copied = info["requested_copied_bytes"] = default_size(device)
    by_condition: dict[str, list] = {name: [] for name in conditions}
    progress = tqdm(chosen, desc="methods", unit="method")
    for method in progress:
        progress.set_postfix_str(method.name)
        n = memmgr_cycles(cycles) if isinstance(method, MemmgrMethod) else cycles
        run_under_conditions(method, conditions, by_condition, peak, n, copied_bytes=copied, device=device,
                             make=lambda: make_state(copied, device), phase_gap_s=gap)
    for name, step in conditions.items():
        small = run_method(MemmgrMethod(), 0, device, cycles,
                           lambda: make_small_tensors(10_000, 64 * 1024, device), phase_gap_s=gap,
                           between=step).summary(peak)
        small["method"] = "memmgr_10000x64KiB"
        by_condition[name].append(small)
    if engine is not None:
        engine.close()
    report = {"info": info, "peak_gbps": peak, "results": next(iter(by_condition.values())),
              "by_condition": by_condition}
    report["megatron"] = megatron_report
    if sweep:
        report["sweep"] = run_sweep(device, peak, out, gap)
    write_outputs(report, out)
    click.echo(format_table(report))
    click.echo(f"wrote {out}/bench.json, {out}/bench.md, {out}/bench.png")
    return report


def _megatron_section(device: torch.device, wanted: bool | None, peak: dict, cycles: int,
                      methods: list[str] | None, progress, phase_gap_s: float,
                      conditions: dict | None = None, gpt: str = "1.3b") -> dict | None:
    """The same comparison on a real megatron-core GPT (with megatron's built-in helpers beside memmgr), when
    megatron-core is installed and a GPU is present (``wanted`` None: whenever it can run; False: never)."""
    if wanted is False:
        return None
    from memmgr.tools import bench_megatron

    reason = bench_megatron.unavailable_reason()
    if reason:
        if wanted:
            return {"skipped": reason}
        logger.info("Megatron workload skipped: %s", reason)
        return None
    try:
        return bench_megatron.run_megatron_workload(peak, cycles, methods, progress, phase_gap_s, conditions, gpt)
    except Exception as exc:  # the synthetic comparison above still stands
        logger.exception("the Megatron workload failed")
        return {"error": f"{type(exc).__name__}: {exc}"}


def run_sweep(device: torch.device, peak: dict, out: str, phase_gap_s: float = 0.0) -> list[dict]:
    """memmgr offload/onload time against state size and tensor count; fitted slope and intercept."""
    from tqdm import tqdm

    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 2 * GiB
    sizes = [s for s in (1, 4, 16, 32) if s * GiB * 1.3 < free] if device.type == "cuda" else [0.0625, 0.125]
    rows = []
    for size in tqdm(sizes, desc="sweep sizes"):
        for per_gib in (10, 100, 1000, 10000):
            count = max(1, int(per_gib * size))
            each = int(size * GiB) // count // 4096 * 4096
            if each == 0:
                continue
            r = run_method(MemmgrMethod(), 0, device, 3, lambda: make_small_tensors(count, each, device),
                           phase_gap_s=phase_gap_s)
            rows.append({"size_gib": size, "tensors": count, "bytes": r.copied_bytes,
                         "offload_s": statistics.median(r.offload_s[1:]), "onload_s": statistics.median(r.onload_s[1:]),
                         "intact": r.intact})
    import numpy as np

    for key in ("offload_s", "onload_s"):
        x = np.array([r["bytes"] for r in rows], dtype=float)
        y = np.array([r[key] for r in rows])
        if len(rows) >= 2:
            slope, intercept = np.polyfit(x, y, 1)
            for r in rows:
                r[f"{key}_fit_gbps"] = 1 / slope / GB
                r[f"{key}_fit_intercept_ms"] = intercept * 1e3
    # per-tensor overhead: extra time per tensor at a fixed size, against the fewest-tensors run
    for r in rows:
        base = min((b for b in rows if b["size_gib"] == r["size_gib"]), key=lambda b: b["tensors"])
        r["per_tensor_overhead_us"] = ((r["offload_s"] - base["offload_s"]) / max(1, r["tensors"] - base["tensors"])
                                       * 1e6 if r["tensors"] > base["tensors"] else 0.0)
    _plot_sweep(rows, peak, os.path.join(out, "sweep.png"))
    return rows


def _plot_sweep(rows, peak, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for per in sorted({r["tensors"] / max(r["size_gib"], 1e-9) for r in rows}):
        sel = [r for r in rows if abs(r["tensors"] / max(r["size_gib"], 1e-9) - per) < 1e-6]
        ax[0].plot([r["bytes"] / GB for r in sel], [r["offload_s"] for r in sel], "o-", label=f"{per:.0f}/GiB")
        ax[1].plot([r["bytes"] / GB for r in sel], [r["onload_s"] for r in sel], "o-", label=f"{per:.0f}/GiB")
    for a, title, key in ((ax[0], "offload", "d2h"), (ax[1], "onload", "h2d")):
        xs = [0, max(r["bytes"] for r in rows) / GB]
        a.plot(xs, [x / peak[key] for x in xs], "k--", label=f"peak {peak[key]:.0f} GB/s")
        a.set_xlabel("state (GB)")
        a.set_ylabel("seconds")
        a.set_title(f"memmgr {title} time vs bytes (tensors per GiB)")
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_TABLE_HEAD = ["| method | state GB (copied/dropped) | tensors | offload 1st GB/s | offload steady GB/s (×peak) | "
               "onload steady GB/s (×peak) | GPU left over GB | host GB / payload | intact |",
               "|---|---|---|---|---|---|---|---|---|"]


def _table_rows(results: list[dict]) -> list[str]:
    lines = list(_TABLE_HEAD)
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['method']} | skipped: {r['skipped']} | | | | | | | |")
            continue
        if r.get("error"):
            first_line = r["error"].splitlines()[0] if r["error"].strip() else r["error"]
            lines.append(f"| {r['method']} | error: {first_line[:80]} | | | | | | | |")
            continue
        host = sum(r["host_bytes"].values()) if r["host_bytes"] else 0
        left = r["gpu_left_over_bytes"]
        lines.append(
            f"| {r['method']} | {r['copied_bytes'] / GB:.2f} / {r['dropped_bytes'] / GB:.2f} | {r['num_tensors']} | "
            f"{r['first_offload_gbps']:.1f} | {r['steady_offload_gbps']:.1f} ({r['steady_offload_ratio']:.2f}) | "
            f"{r['steady_onload_gbps']:.1f} ({r['steady_onload_ratio']:.2f}) | "
            f"{'n/a' if left is None else f'{left / GB:.2f}'} | "
            f"{host / GB:.2f} / {r['copied_bytes'] / GB:.2f} | {'yes' if r['intact'] else 'NO'} |")
    return lines


def against_best_peer(results: list[dict]) -> dict | None:
    """memmgr's offload throughput over the best peer's, first cycle and steady state (peers: every other method
    on the same state)."""
    measured = [r for r in results if "steady_offload_gbps" in r and not r.get("error")]
    ours = next((r for r in measured if r["method"] == "memmgr"), None)
    peers = [r for r in measured if r["method"] != "memmgr" and not r["method"].startswith("memmgr_")]
    if ours is None or not peers:
        return None
    best_first = max(peers, key=lambda r: r["first_offload_gbps"])
    best_steady = max(peers, key=lambda r: r["steady_offload_gbps"])
    return {"first": ours["first_offload_gbps"] / best_first["first_offload_gbps"], "first_peer": best_first["method"],
            "steady": ours["steady_offload_gbps"] / best_steady["steady_offload_gbps"],
            "steady_peer": best_steady["method"]}


def _peer_line(results: list[dict]) -> list[str]:
    vs = against_best_peer(results)
    if vs is None:
        return []
    return ["", f"memmgr offload against the best peer: first cycle {vs['first']:.1f}× ({vs['first_peer']}), "
                f"steady state {vs['steady']:.2f}× ({vs['steady_peer']})"]


def _paths_line(results: list[dict]) -> list[str]:
    """For memmgr's rows: which copy path each cycle's onload and offload ran, and the driver settle's times."""
    lines = []
    for r in results:
        paths = r.get("paths") or []
        if not r["method"].startswith("memmgr") or not paths:
            continue
        parts = []
        for move in ("onload", "offload"):
            kinds = Counter(str(p[move]).split(" (")[0] for p in paths if p.get(move))
            if kinds:
                parts.append(f"{move} " + ", ".join(f"{kind} ×{n}" for kind, n in kinds.most_common()))
        settles = [p["driver_settle_ms"] for p in paths if p.get("driver_settle_ms") is not None]
        if settles:
            parts.append(f"driver settle beside the offload's copies {min(settles):.1f}-{max(settles):.1f} ms")
        if parts:
            lines.append(f"{r['method']}, paths over {len(paths)} cycles: " + "; ".join(parts))
    return [""] + lines if lines else []


def format_table(report: dict) -> str:
    peak = report["peak_gbps"]
    lines = [f"# memmgr bench — {report['info']['device']} — {report['info']['date']}", "",
             f"pinned-copy peak (same run): d2h {peak['d2h']:.1f} GB/s, h2d {peak['h2d']:.1f} GB/s, "
             f"both ways {peak['both']:.1f} GB/s", ""]
    gap = report["info"].get("phase_gap_s")
    if gap is not None:
        lines += [f"untimed pause after each offload and onload (the phases in between): {gap:g} s", ""]
    by_condition = report.get("by_condition") or {"pause": report["results"]}
    mg = report.get("megatron")
    for name, rows in by_condition.items():
        title = CONDITION_TITLES.get(name, name)
        if mg:
            lines += [f"## Real megatron-core GPT, {title}", ""]
            if "results" in mg:
                mg_rows = (mg.get("by_condition") or {"pause": mg["results"]}).get(name, [])
                lines += [mg["description"], ""] + _table_rows(mg_rows) + _peer_line(mg_rows) + _paths_line(mg_rows)
                lines += [""]
            else:
                lines += [f"not run: {mg.get('skipped') or mg.get('error')}", ""]
        lines += [f"## Megatron-shaped synthetic state, {title}", ""]
        lines += _table_rows(rows) + _peer_line(rows) + _paths_line(rows) + [""]
    return "\n".join(lines).rstrip()


CONDITION_TITLES = {
    "engine": "an engine in another process takes the freed memory and releases it before each onload",
    "pause": "an untimed pause in this process between the moves",
}


def write_outputs(report: dict, out: str) -> None:
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    with open(os.path.join(out, "bench.md"), "w") as f:
        f.write(format_table(report) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if "steady_offload_gbps" in r]
    rows += [dict(r, method=f"megatron:{r['method']}") for r in (report.get("megatron") or {}).get("results", [])
             if "steady_offload_gbps" in r]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["steady_offload_gbps"] for r in rows], 0.4, label="offload (steady)")
    ax.bar([x + 0.2 for x in xs], [r["steady_onload_gbps"] for r in rows], 0.4, label="onload (steady)")
    ax.axhline(report["peak_gbps"]["d2h"], color="k", ls="--", lw=1, label="pinned peak d2h (same run)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["method"] for r in rows], rotation=25, ha="right", fontsize=7)
    ax.set_ylabel("GB/s")
    ax.set_title(f"memmgr bench — {report['info']['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bench.png"), dpi=110)
    plt.close(fig)
