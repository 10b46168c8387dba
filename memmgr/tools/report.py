"""Renders memory ledgers (``memmgr.ledger``): a table per rank and GPU, JSON, and a PNG timeline."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from memmgr.errors import MemmgrInputError
from memmgr.ledger import CATEGORIES, CATEGORY_TITLES, GiB, Record, gpu_categories, ledger_files, read_records

logger = logging.getLogger("memmgr")


def _gib(n: int | float | None, width: int = 0, signed: bool = False) -> str:
    if n is None:
        text = "?"
    elif n and abs(n) < 0.01 * GiB:  # small models: MiB, marked, rather than 0.00
        text = (f"{n / (1 << 20):+.2f}M" if signed else f"{n / (1 << 20):.2f}M")
    else:
        text = f"{n / GiB:+.2f}" if signed else f"{n / GiB:.2f}"
    return text.rjust(width) if width else text


def _series(records: list[Record]) -> "dict[tuple[int, str], list[tuple[Record, Record | None]]]":
    """(rank, device) -> [(record, gpu entry or None)] in order; device "host" for records without a GPU."""
    out: dict[tuple[int, str], list[tuple[Record, Record | None]]] = {}
    by_rank: dict[int, list[Record]] = {}
    for r in records:
        by_rank.setdefault(int(r.get("rank") or 0), []).append(r)
    for rank, recs in sorted(by_rank.items()):
        devices: list[str] = []
        for r in recs:
            for g in r.get("gpus") or []:
                if g["device"] not in devices:
                    devices.append(g["device"])
        if not devices:
            out[(rank, "host")] = [(r, None) for r in recs]
            continue
        for dev in devices:
            out[(rank, dev)] = [(r, next((g for g in r.get("gpus") or [] if g["device"] == dev), None)) for r in recs]
    return out


def _group_key(g: Record, multi: bool) -> str:
    return f"{g['manager']}/{g['name']}" if multi else g["name"]


def _group_names(records: list[Record]) -> tuple[list[str], bool]:
    managers = {g["manager"] for r in records for g in r.get("groups") or []}
    multi = len(managers) > 1
    names: list[str] = []
    for r in records:
        for g in r.get("groups") or []:
            k = _group_key(g, multi)
            if k not in names:
                names.append(k)
    return names, multi


def _placement(g: Record | None, device: str) -> str:
    if g is None:
        return "-"
    on_this = g.get("devices", {}).get(device, 0) if device != "host" else g.get("device_bytes", 0)
    if g["state"] in ("on_device", "onloading"):
        return f"{_gib(on_this if device != 'host' else g['device_bytes'])} dev"
    if g["state"] in ("on_host", "offloading"):
        return f"{_gib(g['host_bytes'])} host"
    return "freed"


def format_table(records: list[Record]) -> str:
    """A human table per rank and GPU: sizes in GiB, the change since the previous snapshot (Δ), the largest holder
    of each snapshot marked with '*', the groups' placement, and at the end what still holds the GPU."""
    if not records:
        return "no snapshots"
    lines: list[str] = []
    nvml_states = {r.get("nvml") for r in records if r.get("nvml")}
    for s in sorted(nvml_states):
        if s != "ok":
            lines.append(f"NVML {s}: this process's GPU usage and the non-PyTorch share are not known")
    names, multi = _group_names(records)
    for (rank, device), series in _series(records).items():
        first = series[0][0]
        if device == "host":
            cuda = first.get("cuda", "unavailable")
            lines.append(f"rank {rank}, host {first.get('host', '?')}: no GPU in these snapshots (CUDA {cuda}); "
                         f"sizes in GiB")
        else:
            gpu0 = next((g for _, g in series if g is not None), {}) or {}
            lines.append(f"rank {rank}, {device} (NVML index {gpu0.get('nvml_index', '?')}, total "
                         f"{_gib(gpu0.get('total'))} GiB), host {first.get('host', '?')}; sizes in GiB, "
                         f"Δ = change since the previous snapshot, * = largest holder")
        lines.append(_table_rows(series, device, names, multi))
        last_rec, last_gpu = series[-1]
        if last_gpu is not None:
            lines.append(_explain(last_rec, last_gpu, device, multi))
        lines.append("")
    costs = [r.get("cost_s") for r in records if r.get("cost_s") is not None]
    if costs:
        lines.append(f"{len(records)} snapshot(s); each took {sum(costs) / len(costs) * 1e3:.2f} ms on average "
                     f"(max {max(costs) * 1e3:.2f} ms)")
    errors = [r for r in records if r.get("error")]
    for r in errors:
        lines.append(f"snapshot {r.get('seq')} ({r.get('label')}) failed: {r['error']}")
    return "\n".join(lines).rstrip() + "\n"


def _table_rows(series: list[tuple[Record, Record | None]], device: str, names: list[str], multi: bool) -> str:
    if device == "host":
        head = ["#", "t(s)", "label", "phase", "RSS", "ΔRSS", "pinned", "Δpinned"]
    else:
        head = ["#", "t(s)", "label", "phase", "process", "Δ", "managed", "other", "cached", "non-PT", "alloc",
                "reserved", "peak", "dev used", "pinned host", "RSS"]
    head += names
    rows: list[list[str]] = []
    prev: tuple[Record, Record | None] | None = None
    for rec, gpu in series:
        host = rec.get("host_memory") or {}
        row = [str(rec.get("seq", "")), f"{rec.get('elapsed_s', 0):.2f}", str(rec.get("label", ""))[:40],
               str(rec.get("phase") or "-")[:16]]
        if device == "host":
            rss, pin = host.get("rss"), host.get("pinned_bytes")
            prss = (prev[0].get("host_memory") or {}).get("rss") if prev else None
            ppin = (prev[0].get("host_memory") or {}).get("pinned_bytes") if prev else None
            row += [_gib(rss), _gib(rss - prss, signed=True) if rss is not None and prss is not None else "-",
                    _gib(pin), _gib(pin - ppin, signed=True) if pin is not None and ppin is not None else "-"]
        elif gpu is None:
            row += ["-"] * 12
        else:
            cats = gpu.get("categories") or gpu_categories(gpu)
            total = _process_total(gpu)
            ptotal = _process_total(prev[1]) if prev and prev[1] is not None else None
            largest = max((k for k in CATEGORIES if cats.get(k) is not None), key=lambda k: cats[k] or 0)
            cells = []
            for k in CATEGORIES:
                cells.append(_gib(cats.get(k)) + ("*" if k == largest and (cats.get(k) or 0) > 0 else ""))
            row += [_gib(total), _gib(total - ptotal, signed=True) if total is not None and ptotal is not None
                    else "-"] + cells + [_gib(gpu.get("allocated")), _gib(gpu.get("reserved")),
                                         _gib(gpu.get("max_allocated")), _gib(gpu.get("used")),
                                         _gib(host.get("pinned_bytes")), _gib(host.get("rss"))]
        by_name = {_group_key(g, multi): g for g in rec.get("groups") or []}
        row += [_placement(by_name.get(n), device) for n in names]
        rows.append(row)
        prev = (rec, gpu)
    widths = [max(len(head[c]), *(len(r[c]) for r in rows)) for c in range(len(head))]
    out = ["  ".join(h.ljust(w) if c in (2, 3) else h.rjust(w) for c, (h, w) in enumerate(zip(head, widths)))]
    for r in rows:
        out.append("  ".join(v.ljust(w) if c in (2, 3) else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def _process_total(gpu: Record | None) -> int | None:
    """The process's GPU usage: NVML's figure, else the sum of the PyTorch categories (non-PyTorch unknown)."""
    if gpu is None:
        return None
    if gpu.get("process") is not None:
        return int(gpu["process"])
    return None


def _explain(rec: Record, gpu: Record, device: str, multi: bool) -> str:
    """Why there is still memory on the GPU at this snapshot, largest holders first."""
    cats = gpu.get("categories") or gpu_categories(gpu)
    holders: list[tuple[int, str]] = []
    for g in rec.get("groups") or []:
        nb = g.get("devices", {}).get(device, 0)
        if nb:
            holders.append((nb, f"managed group {_group_key(g, multi)!r} is on the GPU ({g['state']})"))
    if cats.get("other_allocated"):
        lb = rec.get("left_behind") or {}
        hint = ""
        if lb:
            items = [f"{k} ({_gib(v)} GiB)" for m in lb.values() for k, v in m.items()]
            hint = "; integrations left behind: " + ", ".join(items[:4])
        holders.append((cats["other_allocated"], "live PyTorch tensors memmgr does not manage (activations, KV cache, "
                                                 "caches, buffers)" + hint))
    if cats.get("cached"):
        holders.append((cats["cached"], "PyTorch's caching allocator keeps it reserved but unused "
                                        "(torch.cuda.empty_cache() returns it)"))
    if cats.get("non_pytorch"):
        holders.append((cats["non_pytorch"], "outside PyTorch: CUDA context and loaded kernels, cuBLAS/cuDNN "
                                             "workspaces, NCCL buffers, other allocators"))
    total = _process_total(gpu)
    head = f"what holds {device} at {rec.get('label')!r}: "
    if total is not None:
        head += f"{total / GiB:.2f} GiB used by this process"
        if gpu.get("process_source") == "only-process":
            head += " (its pid is not visible to NVML; taken as the only process on the GPU)"
    else:
        head += f"this process's usage unknown ({gpu.get('process_source')}); PyTorch reserved " \
                f"{_gib(gpu.get('reserved'))} GiB"
    if gpu.get("used") is not None and total is not None and gpu["used"] > total:
        head += f"; {(gpu['used'] - total) / GiB:.2f} GiB more used on the device by other processes or the driver"
    lines = [head]
    for nb, what in sorted(holders, key=lambda h: -h[0]):
        lines.append(f"  * {nb / GiB:7.2f} GiB  {what}")
    return "\n".join(lines)


def to_json(records: list[Record], indent: int | None = 2) -> str:
    """The records as one JSON document ``{"records": [...], "summary": {...}}``."""
    costs = [r.get("cost_s") or 0.0 for r in records]
    summary = {"snapshots": len(records), "ranks": sorted({int(r.get("rank") or 0) for r in records}),
               "mean_cost_s": sum(costs) / len(costs) if costs else 0.0,
               "nvml": sorted({str(r.get("nvml")) for r in records if r.get("nvml")})}
    return json.dumps({"records": records, "summary": summary}, indent=indent, default=str)


def plot_timeline(records: list[Record], out_png: str | os.PathLike) -> Path:
    """A PNG with one subplot per (rank, GPU): stacked bars per snapshot of managed groups on the GPU (one colour per
    group), other PyTorch allocated, PyTorch cached and non-PyTorch memory, in GiB, with NVML's device use as a line.
    Without GPU entries the subplot shows the host side (RSS and pinned memory held by memmgr)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    series = _series(records)
    if not series:
        raise ValueError("no snapshots to plot")
    names, multi = _group_names(records)
    cmap = plt.get_cmap("tab10")
    group_colors = {n: cmap(i % 10) for i, n in enumerate(names)}
    fixed = {"other_allocated": "#9e9e9e", "cached": "#ffcc80", "non_pytorch": "#e57373"}
    n = len(series)
    width = max(8.0, min(24.0, 0.55 * max(len(s) for s in series.values()) + 4))
    fig, axes = plt.subplots(n, 1, figsize=(width, 4.8 * n), squeeze=False)
    for ax, ((rank, device), items) in zip(axes[:, 0], series.items()):
        x = list(range(len(items)))
        labels = [f"{r.get('seq')}: {str(r.get('label'))[:28]}" + (f"\n[{r.get('phase')}]" if r.get("phase") else "")
                  for r, _ in items]
        bottom = [0.0] * len(items)

        def stack(values: list[float], label: str, color: Any) -> None:
            if not any(values):
                return
            ax.bar(x, values, bottom=bottom, label=label, color=color, width=0.8, edgecolor="white", linewidth=0.3)
            for k, v in enumerate(values):
                bottom[k] += v

        if device == "host":
            rss = [((r.get("host_memory") or {}).get("rss") or 0) / GiB for r, _ in items]
            pinned = [max((r.get("host_memory") or {}).get("pinned_bytes") or 0,
                          (r.get("host_memory") or {}).get("pool_bytes") or 0) / GiB for r, _ in items]
            stack(pinned, "host buffers held by memmgr", "#64b5f6")
            stack([max(0.0, a - b) for a, b in zip(rss, pinned)], "rest of the process RSS", "#bdbdbd")
            ax.set_title(f"rank {rank}: host memory (no GPU in these snapshots)")
        else:
            for name in names:
                vals = []
                for r, gpu in items:
                    g = next((g for g in r.get("groups") or [] if _group_key(g, multi) == name), None)
                    vals.append((g.get("devices", {}).get(device, 0) if g else 0) / GiB if gpu else 0.0)
                stack(vals, f"managed: {name}", group_colors[name])
            for cat in ("other_allocated", "cached", "non_pytorch"):
                vals = [((gpu.get("categories") or gpu_categories(gpu)).get(cat) or 0) / GiB if gpu else 0.0
                        for _, gpu in items]
                stack(vals, CATEGORY_TITLES[cat], fixed[cat])
            used = [(gpu.get("used") / GiB) if gpu and gpu.get("used") is not None else None for _, gpu in items]
            if any(u is not None for u in used):
                ax.plot(x, [u if u is not None else float("nan") for u in used], color="black", marker=".",
                        linewidth=1, linestyle="--", label="device used (all processes, NVML)")
            nvml_state = next((r.get("nvml") for r, _ in items if r.get("nvml")), "?")
            title = f"rank {rank}, {device}: this process's GPU memory by holder"
            if nvml_state != "ok":
                title += f"  (NVML {nvml_state}; non-PyTorch unknown)"
            ax.set_title(title)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("GiB")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def load_snapshots(paths: Sequence[str]) -> list[Record]:
    """The snapshots of every ledger ``paths`` name (files, directories of ``*.jsonl``, globs or ``{rank}``
    patterns), checked one path at a time: MemmgrInputError naming a path that matches no file, a file that cannot
    be read as text, and a path whose files hold no snapshot (no JSON line with a snapshot's ``seq`` and ``label``:
    an empty ledger, or a file that is not one), with what to pass instead. Records come back as ``read_records``
    orders them."""
    if not paths:
        raise MemmgrInputError("LOGS: no ledger given; pass the JSON Lines file(s) a memmgr.ledger.Ledger wrote, or "
                               "their directory")
    for path in paths:
        files = ledger_files(path)
        if not files:
            what = "a directory without *.jsonl files" if os.path.isdir(path) else "no such file"
            raise MemmgrInputError(f"LOGS: {path!r} matches no ledger ({what}); pass the JSON Lines file(s) a "
                                   f"memmgr.ledger.Ledger wrote, their directory, a glob or a {{rank}} pattern")
        quiet = _Quiet()  # the checking read says nothing; the final read warns of skipped lines once
        logger.addFilter(quiet)
        try:
            found = read_records([path])
        except (OSError, UnicodeDecodeError) as exc:
            raise MemmgrInputError(f"LOGS: {path!r} cannot be read as a ledger ({type(exc).__name__}: {exc}); pass "
                                   f"the JSON Lines file(s) a memmgr.ledger.Ledger wrote") from None
        finally:
            logger.removeFilter(quiet)
        if not any(isinstance(r.get("seq"), int) and "label" in r for r in found):
            names = ", ".join(str(f) for f in files[:3]) + (", ..." if len(files) > 3 else "")
            raise MemmgrInputError(f"LOGS: no memmgr snapshots found in {path!r} ({names}: empty, or not a ledger "
                                   f"a memmgr.ledger.Ledger wrote); pass a ledger with at least one snapshot")
    return [r for r in read_records(paths) if isinstance(r.get("seq"), int) and "label" in r]


def check_plot(plot: str | None) -> None:
    """MemmgrInputError unless ``plot`` is None or a ``.png`` path whose directory exists (or can be made) and can be
    written."""
    if plot is None:
        return
    if not plot.lower().endswith(".png"):
        raise MemmgrInputError(f"--plot {plot}: the timeline is a PNG; give a path ending in .png")
    if os.path.isdir(plot):
        raise MemmgrInputError(f"--plot {plot}: is a directory; give a file path ending in .png")
    parent = os.path.dirname(os.path.abspath(plot))
    try:
        os.makedirs(parent, exist_ok=True)
        if not os.access(parent, os.W_OK):
            raise PermissionError(13, "Permission denied")
        if os.path.exists(plot) and not os.access(plot, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise MemmgrInputError(f"--plot {plot}: cannot write there ({exc.strerror or exc}); give a path you can "
                               f"write") from None


def render_logs(paths: Sequence[str], plot: str | None = None, as_json: bool = False,
                records: list[Record] | None = None) -> None:
    """``memmgr report``: reads ledgers (every rank's file is gathered) and prints a table or JSON; ``plot`` writes
    the PNG timeline too. ``records``: the snapshots already read (``load_snapshots``), else ``paths`` are read here
    and an empty result prints that no snapshots were found."""
    import click

    if records is None:
        records = read_records(paths)
    if not records:
        click.echo(f"no snapshots found in {', '.join(paths)}")
        return
    if as_json:
        click.echo(to_json(records))
    else:
        click.echo(format_table(records), nl=False)
    if plot:
        out = plot_timeline(records, plot)
        click.echo(f"wrote {out}", err=as_json)
