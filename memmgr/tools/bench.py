"""``memmgr bench``: offload/onload of a Megatron-shaped training state, timed against the link's peak and peers.

Every method does the same work on the same state: the bf16 weights, fp32 main weights and fp32 Adam moments go to
host memory and come back; the fp32 gradients are dropped and re-zeroed. Ratios are to the pinned-copy peak
measured in the same run. On a machine without a GPU the CPU path runs (device tensors on ``cpu``; the "peak" is a
host memcpy) and is labelled as such.

Each cycle is offload, a pause, onload, a pause: the pauses stand in for the phases in between (generation, training)
and are not timed. They matter on a GPU: for about 0.1 s after memory goes back to the driver (``empty_cache``),
copies into newly allocated device memory run ~10% slower (the driver's doing, likely background work on the freed
memory), for every method alike (measured in run L, ``benchmarks/results/2026-11-21/h100-probe-l/fresh3/``; see
``benchmarks/results/README.md``). In an RL loop the generate phase sits there, so the bench measures the onload a
trainer actually gets; ``--phase-gap 0`` measures back-to-back cycles.
"""
from __future__ import annotations

import json
import logging
import math
import os
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass

import torch

from memmgr import arguments
from memmgr.errors import MemmgrInputError
from memmgr.tools.bench_methods import (  # noqa: F401
    DEFAULT_PHASE_GAP_S,
    GB,
    GiB,
    MemmgrMethod,
    MemmgrSameAddressMethod,
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


GPT_CHOICES = ("1.3b", "4b")
MAX_CYCLES = 1000
# GPU bytes of the synthetic state per copied byte: the fp32 gradients (dropped, not copied) come on top of the bf16
# weights, fp32 main weights and fp32 moments (2 + 4 + 8 bytes copied per parameter, 4 more on the device).
STATE_PER_COPIED = 18 / 14


def method_names() -> list[str]:
    """Every method ``--methods`` may name: the synthetic state's methods and the megatron GPT's built-in helpers."""
    from memmgr.tools.bench_megatron import MegatronBuiltinMethod

    names = [m.name for m in all_methods()]
    return names + [n for n in (MegatronBuiltinMethod.name,) if n not in names]


def smallest_state_bytes() -> int:
    """Copied bytes of the smallest synthetic state ``make_state`` builds (hidden 256, one layer)."""
    from memmgr.tools.bench_methods import gpt_shapes

    params = sum(math.prod(shape) for _, shape in gpt_shapes(256, 1))
    return params * 14


def host_memory_available() -> int | None:
    """Bytes of host memory this process can still take: MemAvailable, capped by a cgroup limit; None if unknown."""
    from memmgr.tools.doctor import host_memory

    info = host_memory()
    avail = info.get("available")
    limit = info.get("cgroup_limit")
    if limit is not None:
        avail = limit if avail is None else min(avail, limit)
    return avail


def _names_list(option: str, values: list[str] | None, allowed: list[str] | tuple[str, ...]) -> list[str] | None:
    if values is None:
        return None
    names = [v.strip() for v in values]
    if not names or any(not n for n in names):
        raise MemmgrInputError(f"{option}: empty name in {','.join(values)!r}; give comma-separated names from "
                               f"{', '.join(allowed)}")
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise MemmgrInputError(f"{option}: unknown {'name' if len(unknown) == 1 else 'names'} "
                               f"{', '.join(map(repr, unknown))}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def check_size(size_gb: float | None, device: torch.device) -> None:
    """MemmgrInputError unless ``size_gb`` (the copied bytes of the synthetic state, in GB) is a finite positive number
    that the bench can build and that fits the memory there is: on a GPU the state with its gradients in free GPU
    memory and its pinned host copy in available host memory; on the CPU path both in available host memory."""
    if size_gb is None:
        return
    if isinstance(size_gb, bool) or not isinstance(size_gb, (int, float)) or not math.isfinite(size_gb) \
            or size_gb <= 0:
        raise MemmgrInputError(f"--size-gb: {size_gb!r} is not a size; give a positive number of GB (e.g. 2), or "
                               f"leave it out to size the state to the free memory")
    smallest = smallest_state_bytes()
    copied = size_gb * GB
    if copied < smallest:
        raise MemmgrInputError(f"--size-gb {size_gb:g}: the smallest state the bench builds copies "
                               f"{smallest / GB:.2f} GB (one layer of width 256 and the embedding); give "
                               f"{math.ceil(smallest / GB * 100) / 100:.2f} or more")
    state = copied * STATE_PER_COPIED
    host = host_memory_available()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if state > free:
            raise MemmgrInputError(
                f"--size-gb {size_gb:g}: the state takes {state / GB:.1f} GB of GPU memory with its gradients; "
                f"{torch.cuda.get_device_name(device)} has {free / GB:.1f} GB free. Give --size-gb "
                f"{_floor2(free / STATE_PER_COPIED / GB)} or less, or leave it out to size the state to the free "
                f"memory")
        if host is not None and copied > host:
            raise MemmgrInputError(
                f"--size-gb {size_gb:g}: the offloaded copy takes {copied / GB:.1f} GB of pinned host memory; "
                f"{host / GB:.1f} GB is available. Give --size-gb {_floor2(host / GB)} or less")
    elif host is not None and state + copied > host:
        raise MemmgrInputError(
            f"--size-gb {size_gb:g}: the CPU path holds the state ({state / GB:.1f} GB with its gradients) and its "
            f"host copy ({copied / GB:.1f} GB) in host memory, {(state + copied) / GB:.1f} GB; {host / GB:.1f} GB "
            f"is available. Give --size-gb {_floor2(host / (STATE_PER_COPIED + 1) / GB)} or less, or leave it out "
            f"(the CPU path's default is {default_size(device) / GB:g} GB)")


def _floor2(x: float) -> str:
    return f"{math.floor(x * 100) / 100:.2f}"


def check_out(out: str) -> None:
    """MemmgrInputError unless ``out`` is (or can be made) a directory this process can write files in."""
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise MemmgrInputError(f"--out: {out!r} is not a directory path; give one (default memmgr-bench)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise MemmgrInputError(f"--out {out}: exists and is not a directory; give a directory for bench.json, "
                               f"bench.md and bench.png")
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise MemmgrInputError(f"--out {out}: cannot write there ({exc.strerror or exc}); give a directory you can "
                               f"write") from None


@dataclass
class BenchArguments:
    """``run_bench``'s arguments once checked: names de-duplicated, the device they were checked for."""

    device: torch.device
    methods: list[str] | None
    between: list[str]
    cycles: int
    phase_gap_s: float


def check_arguments(out: str = "memmgr-bench", size_gb: float | None = None, sweep: bool = False, cycles: int = 3,
                    methods: list[str] | None = None, megatron: bool | None = None,
                    phase_gap_s: float | None = None, between: list[str] | None = None,
                    gpt: str = "1.3b", device: torch.device | None = None) -> BenchArguments:
    """Checks every argument of ``run_bench`` before anything runs, and ``out`` by creating it and writing a file
    there: MemmgrInputError naming the option (as ``memmgr bench`` spells it), what it got and what to give."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    arguments.boolean("--sweep", "the flag", sweep)
    arguments.boolean("--megatron/--no-megatron", "the flag", megatron, optional=True)
    if isinstance(cycles, bool) or not isinstance(cycles, int) or not 1 <= cycles <= MAX_CYCLES:
        raise MemmgrInputError(f"--cycles: {cycles!r} is not a number of cycles; give 1 to {MAX_CYCLES} (each "
                               f"method needs at least one offload and onload to be timed)")
    if phase_gap_s is not None and (isinstance(phase_gap_s, bool) or not isinstance(phase_gap_s, (int, float))
                                    or not math.isfinite(phase_gap_s) or not 0 <= phase_gap_s <= 3600):
        raise MemmgrInputError(f"--phase-gap: {phase_gap_s!r} is not a pause; give seconds from 0 (back-to-back "
                               f"cycles) to 3600")
    if gpt not in GPT_CHOICES:
        raise MemmgrInputError(f"--gpt: unknown model {gpt!r}; choose from {', '.join(GPT_CHOICES)}")
    chosen = _names_list("--methods", methods, method_names())
    requested = _names_list("--between", between, BETWEEN_CHOICES)
    try:
        conditions = conditions_for(device, requested)
    except MemmgrInputError as exc:
        raise MemmgrInputError(f"--{exc}") from None
    if megatron:
        from memmgr.tools import bench_megatron

        reason = bench_megatron.unavailable_reason()
        if reason:
            raise MemmgrInputError(f"--megatron: the megatron-core GPT cannot run here: it {reason}; leave out "
                                   f"--megatron (the synthetic state still runs)")
    check_size(size_gb, device)
    check_out(out)
    return BenchArguments(device=device, methods=chosen, between=conditions, cycles=cycles,
                          phase_gap_s=phase_gap_for(device, phase_gap_s))


def run_bench(out: str = "memmgr-bench", size_gb: float | None = None, sweep: bool = False, cycles: int = 3,
              methods: list[str] | None = None, megatron: bool | None = None,
              phase_gap_s: float | None = None, between: list[str] | None = None, gpt: str = "1.3b") -> dict:
    """``memmgr bench``: checks every argument first (``check_arguments``: MemmgrInputError before anything runs),
    then times each method and writes bench.json, bench.md and bench.png into ``out``; returns the report."""
    import click
    from tqdm import tqdm

    from memmgr import backend_info
    from memmgr.tools.engine_standin import EngineStandIn

    checked = check_arguments(out=out, size_gb=size_gb, sweep=sweep, cycles=cycles, methods=methods,
                              megatron=megatron, phase_gap_s=phase_gap_s, between=between, gpt=gpt)
    device, methods = checked.device, checked.methods
    from memmgr import nvml

    card = nvml.card(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else None
    label = nvml.describe_card(card) if card else "CPU only (no GPU: the CPU path)"
    copied = size_gb * GB if size_gb else default_size(device)
    chosen = [m for m in all_methods() if methods is None or m.name in methods]
    if device.type != "cuda":
        chosen = [m for m in chosen if not isinstance(m, TorchMemorySaverMethod)]
    gap = checked.phase_gap_s
    condition_names = checked.between
    engine = EngineStandIn(device) if "engine" in condition_names else None
    conditions = {name: (engine.cycle if name == "engine" else None) for name in condition_names}
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": label, "card": card, "torch": torch.__version__,
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
    # the small-tensor state with memmgr, and with same-address buckets where those are benched and supported; as
    # many cycles as memmgr's other rows, so that its steady figure is a median too
    small_methods = [MemmgrMethod] + [type(m) for m in chosen
                                      if isinstance(m, MemmgrSameAddressMethod) and m.available() is None]
    for name, step in conditions.items():
        for method_type in small_methods:
            small = run_method(method_type(), 0, device, memmgr_cycles(cycles),
                               lambda: make_small_tensors(10_000, 64 * 1024, device), phase_gap_s=gap,
                               between=step).summary(peak)
            small["method"] = f"{method_type.name}_10000x64KiB"
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
    """memmgr's offload throughput over the best peer's, first cycle and steady state (peers: every method not
    memmgr's own on the same state; memmgr's other modes and states are not peers)."""
    measured = [r for r in results if "steady_offload_gbps" in r and not r.get("error")]
    ours = next((r for r in measured if r["method"] == "memmgr"), None)
    peers = [r for r in measured if not r["method"].startswith("memmgr")]
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
