"""A memory ledger: where GPU and host memory is at each phase change, and why there is still memory on the GPU.

``Ledger.snapshot`` records, for each GPU this process uses, NVML's view (device total/used/free, this process's
usage) next to PyTorch's (allocated, reserved, peak), splits the process's usage into

* **managed**: memmgr groups still on the GPU,
* **other PyTorch allocated**: live tensors memmgr does not manage (activations, KV cache, buffers left behind),
* **PyTorch cached**: memory the caching allocator keeps reserved but unused (``torch.cuda.empty_cache`` frees it),
* **non-PyTorch**: everything else the process holds: CUDA context and loaded kernels, cuBLAS/cuDNN workspaces,
  NCCL communicator buffers, other allocators,
* **NCCL communicators** (only when a ``memmgr.comms.NcclCommunicators`` group is tracked): its measured bytes, taken
  out of non-PyTorch,

and adds each managed group's placement (GPU / host / freed), pinned host memory held by memmgr and the process's
RSS. ``MemoryManager.attach_ledger`` takes a snapshot after every offload, onload and phase change.

Snapshots go to JSON Lines (one file per rank); ``memmgr.tools.report`` renders them (``format_table``,
``to_json``, ``plot_timeline``), and ``memmgr report LOGS...`` does so from the command line. Everything works without
CUDA or NVML: what cannot be measured is recorded as null and the reason is kept.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import socket
import time
import weakref
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from memmgr import arguments, nvml
from memmgr.errors import MemmgrInputError

logger = logging.getLogger("memmgr")

GiB = float(1 << 30)
SCHEMA_VERSION = 1
CATEGORIES = ("managed", "other_allocated", "cached", "non_pytorch")
CATEGORY_TITLES = {
    "managed": "managed groups on GPU",
    "other_allocated": "other PyTorch allocated",
    "cached": "PyTorch cached (reserved, unused)",
    "non_pytorch": "non-PyTorch (CUDA context, NCCL, cuBLAS, ...)",
    "nccl": "NCCL communicators (memmgr.comms group)",
}
# Groups whose ``ledger_category`` is "nccl" (memmgr.comms.NcclCommunicators) hold memory outside PyTorch: their
# measured bytes are reported as this category, carved out of non_pytorch, instead of as managed tensors.
OPTIONAL_CATEGORIES = ("nccl",)

Record = dict[str, Any]


# ----------------------------------------------------------------------------------------------------------------
# collection
# ----------------------------------------------------------------------------------------------------------------

def _dist_rank_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:
        pass
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return rank, world


def rank_path(path: str | os.PathLike, rank: int, multi_rank: bool = True) -> Path:
    """The ledger file of ``rank``: ``{rank}`` in ``path`` is filled in; a path that already ends in
    ``.rank<N>.jsonl`` is kept; otherwise ``.rank<N>`` goes before the extension when ``multi_rank``."""
    text = os.fspath(path)
    if "{rank}" in text:
        return Path(text.replace("{rank}", str(rank)))
    p = Path(text)
    if p.is_dir():
        return p / f"ledger.rank{rank}.jsonl"
    if re.search(r"\.rank\d+\.jsonl$", p.name) or not multi_rank:
        return p
    suffix = p.suffix or ".jsonl"
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    return p.with_name(f"{stem}.rank{rank}{suffix}")


def ledger_files(path: str | os.PathLike) -> list[Path]:
    """Every rank's ledger file for a path given to ``Ledger`` (or a directory, or a glob), sorted by rank."""
    text = os.fspath(path)
    if "{rank}" in text:
        found = glob.glob(glob.escape(text).replace(glob.escape("{rank}"), "*"))
    elif os.path.isdir(text):
        found = glob.glob(os.path.join(glob.escape(text), "*.jsonl"))
    elif any(c in text for c in "*?["):
        found = glob.glob(text)
    else:
        p = Path(text)
        found = [text] if p.exists() else []
        if not re.search(r"\.rank\d+\.jsonl$", p.name):
            stem = p.name[: -len(p.suffix)] if p.suffix else p.name
            found += glob.glob(os.path.join(glob.escape(str(p.parent)),
                                            glob.escape(stem) + ".rank*" + (p.suffix or ".jsonl")))

    def key(f: str) -> tuple[int, str]:
        m = re.search(r"rank(\d+)", os.path.basename(f))
        return (int(m.group(1)) if m else -1, f)

    return [Path(f) for f in sorted(set(found), key=key)]


def read_records(paths: Iterable[str | os.PathLike]) -> list[Record]:
    """Reads JSON Lines ledgers (files, directories, globs or ``{rank}`` patterns; every rank's file is gathered),
    skipping lines that are not JSON. Records come back ordered by rank, then as written."""
    records: list[Record] = []
    seen: set[Path] = set()
    for path in paths:
        files = ledger_files(path)
        if not files:
            logger.warning("no ledger file found for %s", path)
        for f in files:
            if f.resolve() in seen:
                continue
            seen.add(f.resolve())
            bad = 0
            with open(f, encoding="utf-8") as fh:
                for line in fh:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        bad += 1
                        continue
                    if isinstance(rec, dict):
                        records.append(rec)
            if bad:
                logger.warning("%s: skipped %d line(s) that are not JSON (a run cut short?)", f, bad)
    records.sort(key=lambda r: (r.get("rank", 0) or 0, r.get("seq", 0)))
    return records


def process_rss() -> int | None:
    """Resident set size of this process in bytes (psutil when installed, else /proc/self/statm)."""
    try:
        import psutil  # type: ignore[import-not-found]

        return int(psutil.Process().memory_info().rss)
    except Exception:
        pass
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except Exception:
        return None


def _group_device_bytes(group: Any, same_address_only: bool = False) -> dict[str, int]:
    """Device bytes of a group by device ("cuda:0", "cpu"), from its buckets, its device or its tensors; with
    ``same_address_only``, those of its same-address buckets alone (memory memmgr maps itself, which PyTorch's
    allocator does not count)."""
    buckets = getattr(group, "buckets", None)
    if same_address_only:
        buckets = [b for b in buckets or [] if getattr(b, "same_address", False)]
        if not buckets:
            return {}
    if buckets:
        out: dict[str, int] = {}
        for b in buckets:
            nb = int(getattr(b, "device_bytes", 0) or 0)
            if nb:
                dev = str(getattr(b, "device", "unknown"))
                out[dev] = out.get(dev, 0) + nb
        return out
    nb = int(group.device_bytes or 0)
    if not nb:
        return {}
    dev = getattr(group, "device", None)
    if dev is None:
        tensors = getattr(group, "named_tensors", None) or []
        devs = {str(t.device) for _, t in tensors if isinstance(t, torch.Tensor)}
        dev = devs.pop() if len(devs) == 1 else "unknown"
    return {str(dev): nb}


def _pinned_host(pools: Sequence[Any]) -> dict[str, int | None]:
    pool_bytes = pool_pinned = pool_native_pinned = 0
    for pool in pools:
        try:
            pool_bytes += int(pool.bytes_held)
            pool_pinned += int(pool.pinned_bytes_held)
            bufs = pool.buffers()
            pool_native_pinned += sum(b.nbytes for b in bufs if b.pinned and str(b.kind).startswith("native"))
        except Exception as exc:
            logger.debug("could not read host pool %r: %s", pool, exc)
    native_mapped = native_registered = None
    try:
        from memmgr._native import native_module

        mod = native_module()
        if mod is not None:
            native_mapped, native_registered = (int(x) for x in mod.bytes_held())
    except Exception as exc:
        logger.debug("native bytes_held failed: %s", exc)
    # pool buffers made by the extension are in both counts; count them once
    pinned = pool_pinned + max(0, (native_registered or 0) - pool_native_pinned)
    torch_pinned = None
    try:
        if torch.cuda.is_available() and torch.cuda.is_initialized() and hasattr(torch.cuda, "host_memory_stats"):
            torch_pinned = int(torch.cuda.host_memory_stats().get("allocated_bytes.current", 0))
    except Exception:
        pass
    return {"pool_bytes": pool_bytes, "pool_pinned_bytes": pool_pinned, "native_mapped": native_mapped,
            "native_registered": native_registered, "pinned_bytes": pinned, "torch_pinned_cache": torch_pinned}


def gpu_categories(gpu: Record) -> dict[str, int | None]:
    """Splits one GPU entry of a record into CATEGORIES (bytes, clamped at 0; non_pytorch None when NVML could not
    say this process's usage), plus ``nccl`` (taken out of non_pytorch) when the entry has NCCL communicator bytes.
    Managed bytes in same-address buckets (``managed_same_address``, part of ``managed``) are memory memmgr maps
    itself, outside PyTorch's allocator: they are taken out of non_pytorch rather than out of PyTorch's allocated.
    Their sum equals the process's NVML usage whenever the parts are consistent."""
    allocated = int(gpu.get("allocated") or 0)
    reserved = int(gpu.get("reserved") or 0)
    same_address = int(gpu.get("managed_same_address") or 0)
    in_pytorch = max(0, int(gpu.get("managed") or 0) - same_address)
    managed = min(in_pytorch, allocated) if allocated else in_pytorch
    process = gpu.get("process")
    non_pytorch = None if process is None else max(0, int(process) - reserved)
    if non_pytorch is not None:
        same_address = min(same_address, non_pytorch)
        non_pytorch -= same_address
    cats: dict[str, int | None] = {
        "managed": managed + same_address,
        "other_allocated": max(0, allocated - managed),
        "cached": max(0, reserved - allocated),
        "non_pytorch": non_pytorch,
    }
    if "nccl" in gpu:
        nccl = int(gpu.get("nccl") or 0)
        if cats["non_pytorch"] is not None:
            nccl = min(nccl, cats["non_pytorch"])
            cats["non_pytorch"] -= nccl
        cats["nccl"] = nccl
    return cats


class Ledger:
    """Records memory snapshots; with ``path``, appends them to a JSON Lines file per rank.

    ``path`` may contain ``{rank}``; a directory gets ``ledger.rank<N>.jsonl``; a file path gets ``.rank<N>`` before
    its extension when ``rank`` is given or the job has several ranks. ``devices`` (torch CUDA indices) defaults to
    the current device plus every device a managed group lives on. ``snapshot`` never raises: a failure is logged
    and recorded in the snapshot's ``error`` field.
    """

    def __init__(self, path: str | os.PathLike | None = None, rank: int | None = None, *,
                 devices: Sequence[int] | None = None, append: bool = False, keep_records: bool = True):
        arguments.instance("Ledger", "path", path, (str, os.PathLike), optional=True)
        arguments.integer("Ledger", "rank", rank, minimum=0, maximum=1 << 24, optional=True)
        arguments.boolean("Ledger", "append", append)
        arguments.boolean("Ledger", "keep_records", keep_records)
        if devices is not None:
            if isinstance(devices, (str, bytes)) or not hasattr(devices, "__iter__"):
                raise MemmgrInputError(f"Ledger: devices must be a list of CUDA device indices or None, "
                                                 f"got {type(devices).__name__}")
            devices = [arguments.integer("Ledger", "devices[]", d, minimum=0, maximum=1 << 16) for d in devices]
        dist_rank, world = _dist_rank_world()
        self.rank = dist_rank if rank is None else int(rank)
        self.path = None if path is None else rank_path(path, self.rank, multi_rank=rank is not None or world > 1)
        self.devices = list(devices) if devices is not None else None
        self.keep_records = keep_records
        self.records: list[Record] = []
        self.total_cost_s = 0.0
        self._append = append
        self._fh = None
        self._seq = 0
        self._t0 = time.time()
        self._managers: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()
        self._manager_names: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
        self._host = socket.gethostname()

    # ---- managers ----
    def track(self, manager: Any, name: str | None = None) -> None:
        """Reports ``manager``'s groups in every later snapshot (also in those other managers trigger)."""
        if not hasattr(type(manager), "state"):
            raise MemmgrInputError(f"Ledger.track: manager must be a MemoryManager (with a state property), got "
                                   f"{type(manager).__name__}")
        arguments.string("Ledger.track", "name", name, optional=True)
        self._measure_communicators(manager)
        if manager in self._manager_names:
            if name:
                old = self._manager_names[manager]
                self._managers.pop(old, None)
                self._manager_names[manager] = name
                self._managers[name] = manager
            return
        name = name or f"m{len(self._manager_names)}"
        self._manager_names[manager] = name
        self._managers[name] = manager

    @staticmethod
    def _measure_communicators(manager: Any) -> None:
        """Turns on the byte measurement of the manager's NCCL communicator groups (off by default, since it
        synchronizes and polls NVML around every release): a ledger that reports them asked for it."""
        for name in getattr(manager, "group_names", ()):
            group = manager.group(name)
            if getattr(group, "ledger_category", None) == "nccl" and hasattr(group, "measure"):
                group.measure = True

    def attach(self, manager: Any, name: str | None = None) -> "Ledger":
        """``manager.attach_ledger(self)`` and ``track(manager, name)``."""
        self.track(manager, name)
        manager.attach_ledger(self)
        return self

    # ---- snapshots ----
    def snapshot(self, label: str, phase: str | None = None, managers: Iterable[Any] = ()) -> Record:
        """Records where memory is now under ``label``; returns the record (never raises)."""
        start = time.perf_counter()
        try:
            for m in managers:
                self.track(m)
            record = self._collect(label, phase)
        except Exception as exc:  # a report must never break training
            logger.warning("memmgr ledger: snapshot %r failed: %s: %s", label, type(exc).__name__, exc)
            record = self._base(label, phase)
            record["error"] = f"{type(exc).__name__}: {exc}"
        record["cost_s"] = time.perf_counter() - start
        self.total_cost_s += record["cost_s"]
        self._seq += 1
        if self.keep_records:
            self.records.append(record)
        self._write(record)
        return record

    def _base(self, label: str, phase: str | None) -> Record:
        now = time.time()
        return {"version": SCHEMA_VERSION, "seq": self._seq, "time": now, "elapsed_s": now - self._t0,
                "label": str(label), "phase": phase, "rank": self.rank, "pid": os.getpid(), "host": self._host}

    def _collect(self, label: str, phase: str | None) -> Record:
        record = self._base(label, phase)
        managers = [(n, m) for n, m in sorted(self._managers.items(), key=lambda kv: kv[0])]

        groups: list[Record] = []
        on_device: dict[str, int] = {}
        same_address_on_device: dict[str, int] = {}
        nccl_on_device: dict[str, int] | None = None
        pools: list[Any] = []
        left_behind: dict[str, dict[str, int]] = {}
        for mname, mgr in managers:
            self._measure_communicators(mgr)
            pool = getattr(mgr, "pool", None)
            if pool is not None and all(pool is not p for p in pools):
                pools.append(pool)
            if getattr(mgr, "left_behind", None):
                left_behind[mname] = {str(k): int(v) for k, v in mgr.left_behind.items()}
            for gname, st in mgr.state.items():
                try:
                    by_dev = _group_device_bytes(mgr.group(gname))
                except Exception:
                    by_dev = {}
                category = getattr(mgr.group(gname), "ledger_category", "managed")
                if category == "nccl":
                    nccl_on_device = {} if nccl_on_device is None else nccl_on_device
                target = nccl_on_device if category == "nccl" else on_device
                for dev, nb in by_dev.items():
                    target[dev] = target.get(dev, 0) + nb
                for dev, nb in _group_device_bytes(mgr.group(gname), same_address_only=True).items():
                    same_address_on_device[dev] = same_address_on_device.get(dev, 0) + nb
                freed = max(0, int(st.nbytes) - int(st.device_bytes) - int(st.host_bytes))
                groups.append({"manager": mname, "name": gname, "state": st.state, "policy": st.policy,
                               "nbytes": int(st.nbytes), "device_bytes": int(st.device_bytes),
                               "host_bytes": int(st.host_bytes), "freed_bytes": freed, "devices": by_dev,
                               "category": category})
        record["groups"] = groups
        if left_behind:
            record["left_behind"] = left_behind

        try:
            from memmgr.host_memory import default_pool

            dp = default_pool()
            if all(dp is not p for p in pools):
                pools.append(dp)
        except Exception:
            pass
        host = _pinned_host(pools)
        host["rss"] = process_rss()
        record["host_memory"] = host

        record["nvml"] = "ok" if nvml.available() else f"unavailable: {nvml.unavailable_reason()}"
        record["gpus"], record["cuda"] = self._gpus(on_device, nccl_on_device, same_address_on_device)
        return record

    def _gpu_indices(self, on_device: dict[str, int]) -> list[int]:
        if self.devices is not None:
            return list(self.devices)
        indices = {torch.cuda.current_device()}
        for dev in on_device:
            if dev.startswith("cuda"):
                indices.add(int(dev.split(":")[1]) if ":" in dev else torch.cuda.current_device())
        return sorted(indices)

    def _gpus(self, on_device: dict[str, int], nccl_on_device: dict[str, int] | None = None,
              same_address_on_device: dict[str, int] | None = None) -> tuple[list[Record], str]:
        if not torch.cuda.is_available():
            return [], "unavailable"
        if not torch.cuda.is_initialized():
            return [], "not initialized in this process"
        gpus = []
        for i in self._gpu_indices(on_device):
            gpu: Record = {"device": f"cuda:{i}", "torch_index": i}
            gpu["allocated"] = int(torch.cuda.memory_allocated(i))
            gpu["reserved"] = int(torch.cuda.memory_reserved(i))
            gpu["max_allocated"] = int(torch.cuda.max_memory_allocated(i))
            gpu["managed"] = int(on_device.get(f"cuda:{i}", 0))
            if same_address_on_device and same_address_on_device.get(f"cuda:{i}"):
                gpu["managed_same_address"] = int(same_address_on_device[f"cuda:{i}"])
            if nccl_on_device is not None:
                gpu["nccl"] = int(nccl_on_device.get(f"cuda:{i}", 0))
            j = nvml.nvml_index(i)
            gpu["nvml_index"] = j
            mem = nvml.device_memory(j) if j is not None else None
            if mem is not None:
                gpu.update(total=mem.total, used=mem.used, free=mem.free, memory_source="nvml")
            else:
                try:
                    free, total = torch.cuda.mem_get_info(i)
                    gpu.update(total=int(total), used=int(total - free), free=int(free), memory_source="cudaMemGetInfo")
                except Exception:
                    gpu.update(total=None, used=None, free=None, memory_source="unavailable")
            proc = nvml.process_memory(j) if j is not None else None
            gpu["process"] = proc.nbytes if proc is not None else None
            gpu["process_source"] = proc.source if proc is not None else "unavailable"
            gpu["non_pytorch"] = None if gpu["process"] is None else int(gpu["process"]) - gpu["reserved"]
            gpu["categories"] = gpu_categories(gpu)
            gpus.append(gpu)
        return gpus, "ok"

    # ---- output ----
    def _write(self, record: Record) -> None:
        if self.path is None:
            return
        try:
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.path, "a" if self._append else "w", encoding="utf-8")
                self._append = True  # reopened after close(): keep what is there
            self._fh.write(json.dumps(record, default=str) + "\n")
            self._fh.flush()
        except OSError as exc:
            logger.warning("memmgr ledger: cannot write %s (%s); keeping snapshots in memory only", self.path, exc)
            self.path = None

    @property
    def mean_cost_s(self) -> float:
        """Mean seconds one snapshot took."""
        return self.total_cost_s / self._seq if self._seq else 0.0

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
