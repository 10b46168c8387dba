"""``memmgr doctor``: what on this machine will slow offload down, measured where possible.

Prints the GPUs, driver, CUDA and torch versions, PCIe link (NVML), the pinned-copy peak each way and both ways at
once, the cost of pinning host memory (native extension and torch), the locked-memory limit, free host memory and
the versions of the frameworks memmgr integrates with, then one verdict line per problem found. On a machine without
a GPU it prints what it can and says so. The measurements live in ``memmgr.tools.measure``.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import resource
import sys
from typing import Any

import click
import torch

from memmgr import nvml
from memmgr.tools.measure import (
    GiB,
    MiB,
    check_pinning,
    measure_pinned_peak,
    measure_pinning_speed,
    pcie_theoretical_gbps,
)

logger = logging.getLogger("memmgr")

PACKAGES = {
    "torch": ("torch",),
    "megatron-core": ("megatron-core", "megatron_core"),
    "apex": ("apex",),
    "transformer-engine": ("transformer-engine", "transformer_engine", "transformer-engine-torch"),
    "torch_memory_saver": ("torch_memory_saver", "torch-memory-saver"),
    "nvidia-ml-py": ("nvidia-ml-py", "pynvml"),
}


def package_versions() -> dict[str, str | None]:
    """Installed versions by distribution metadata (nothing is imported); None when not installed."""
    out: dict[str, str | None] = {}
    for name, candidates in PACKAGES.items():
        out[name] = None
        for dist in candidates:
            try:
                out[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
            except Exception:
                continue
    return out


def memlock_limit() -> tuple[int | None, int | None]:
    """(soft, hard) RLIMIT_MEMLOCK in bytes; None means unlimited."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    inf = resource.RLIM_INFINITY
    return (None if soft == inf else int(soft), None if hard == inf else int(hard))


def host_memory() -> dict[str, int | None]:
    """Total and available host memory (``/proc/meminfo``) and the cgroup limit when one is set, in bytes."""
    info: dict[str, int | None] = {"total": None, "available": None, "cgroup_limit": None}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    info["total" if key == "MemTotal" else "available"] = int(rest.split()[0]) * 1024
    except OSError:
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            info["total"] = os.sysconf("SC_PHYS_PAGES") * page
            info["available"] = os.sysconf("SC_AVPHYS_PAGES") * page
        except (ValueError, OSError, AttributeError):
            pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as fh:
                text = fh.read().strip()
            if text.isdigit() and int(text) < (1 << 60):
                info["cgroup_limit"] = int(text)
            break
        except OSError:
            continue
    return info


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "unlimited"
    if n >= GiB:
        return f"{n / GiB:.1f} GiB"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / 1024:.0f} KiB"


def run_doctor(quick: bool = False) -> dict[str, Any]:
    """Prints the report (click.echo) and returns what it found, including ``verdicts`` (list of strings).
    MemmgrInputError if ``quick`` is not a bool."""
    from memmgr import arguments

    arguments.boolean("memmgr doctor", "quick", quick)
    echo = click.echo
    found: dict[str, Any] = {"verdicts": []}
    verdicts: list[str] = found["verdicts"]

    from memmgr import __version__, backend_info

    echo(f"memmgr {__version__} doctor{' (quick)' if quick else ''}")
    echo(f"  python {platform.python_version()} on {platform.platform()}")
    cuda_build = torch.version.cuda or "none (CPU build)"
    echo(f"  torch {torch.__version__}, built for CUDA {cuda_build}")

    # ---- NVML: driver, GPUs, PCIe ----
    nvml_status = nvml.status()
    found["nvml"] = nvml_status
    echo(f"  {nvml_status}")
    if nvml.available():
        echo(f"  driver {nvml.driver_version() or '?'}, supports CUDA {nvml.cuda_driver_version() or '?'}")
    gpus = []
    for i in range(nvml.device_count() or 0):
        d = nvml.describe_device(i)
        gpus.append(d)
        link = nvml.pcie_link(i)
        echo(f"  GPU {i}: {d['name']}, {_fmt_bytes(d['total'])} total, {_fmt_bytes(d['used'])} used; PCIe "
             f"{link.describe() if link else 'unknown'}")
        if link is not None and link.max_gen is not None and link.max_width is not None:
            if link.max_gen < 4 or link.max_width < 16:
                theo = pcie_theoretical_gbps(link.max_gen, link.max_width)
                verdicts.append(f"GPU {i}: PCIe link is gen{link.max_gen} x{link.max_width} (below gen4 x16): "
                                f"copies top out near {0.85 * (theo or 0):.0f} GB/s per direction, against about 27 "
                                f"(gen4 x16) or 54 (gen5 x16); check the slot, riser and BIOS link settings")
    found["gpus"] = gpus

    cuda = torch.cuda.is_available()
    found["cuda_available"] = cuda
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cuda:
        n = torch.cuda.device_count()
        echo(f"  torch sees {n} GPU(s)" + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "") +
             ": " + ", ".join(f"cuda:{i}=NVML {nvml.nvml_index(i)}" for i in range(n)))
    else:
        reason = "torch is a CPU build" if torch.version.cuda is None else "no GPU or driver visible to torch"
        echo(f"  no GPU: {reason}; offload has nothing to move here and link speeds cannot be measured")
        verdicts.append(f"no GPU ({reason}): run doctor on the training machine to check the link and pinning")
    if not nvml.available() and cuda:
        verdicts.append(f"NVML unavailable ({nvml.unavailable_reason()}): `memmgr report` cannot split out non-PyTorch "
                        f"memory; pip install nvidia-ml-py")

    # ---- memmgr backend ----
    info = backend_info()
    found["backend"] = info.describe()
    echo(f"  memmgr backend: {info.describe()}")
    native = None
    try:
        from memmgr._native import native_module

        native = native_module()
        if native is not None:
            ok, msg = native.cuda_status()
            rt = native.cuda_runtime_version()
            echo(f"  native extension: CUDA runtime {rt // 1000}.{(rt % 1000) // 10}, sees {msg}")
    except Exception as exc:
        echo(f"  native extension: status unknown ({exc})")
    found["copy_kernel_shape"] = _copy_kernel_shapes(echo)
    if not info.extension_built:
        from memmgr._native import build_hint

        echo(f"  native extension: missing ({info.extension_error})")
        verdicts.append("native extension not built: no copy kernel (onloads right after another process's release "
                        "run on the copy engines, at about half the link's speed until the driver has cleared that "
                        "memory) and pinning uses one-thread first touch + cudaHostRegister, slower to set up; "
                        + build_hint())

    # ---- host limits ----
    soft, hard = memlock_limit()
    found["memlock"] = {"soft": soft, "hard": hard}
    echo(f"  ulimit -l (RLIMIT_MEMLOCK): soft {_fmt_bytes(soft)}, hard {_fmt_bytes(hard)}")
    low_memlock = soft is not None and soft < GiB
    mem = host_memory()
    found["host_memory"] = mem
    echo(f"  host memory: {_fmt_bytes(mem['available'])} available of {_fmt_bytes(mem['total'])}"
         + (f", cgroup limit {_fmt_bytes(mem['cgroup_limit'])}" if mem["cgroup_limit"] else ""))
    gpu_total = sum(d["total"] or 0 for d in gpus)
    room = min(x for x in (mem["available"], mem["cgroup_limit"]) if x is not None) \
        if mem["available"] is not None or mem["cgroup_limit"] is not None else None
    if room is not None and gpu_total and room < gpu_total:
        verdicts.append(f"host memory available ({_fmt_bytes(room)}) is less than the GPUs' memory "
                        f"({_fmt_bytes(gpu_total)}): offloading full GPUs' state will not fit on the host")

    # ---- versions ----
    versions = package_versions()
    found["packages"] = versions
    echo("  packages: " + ", ".join(f"{k} {v or '-'}" for k, v in versions.items()))

    # ---- measurements ----
    if cuda:
        _measure(found, verdicts, quick, gpus)

    if low_memlock:
        pinned_ok = bool(found.get("pinning_check", {}).get("pinned"))
        if pinned_ok:
            echo(f"  note: ulimit -l is {_fmt_bytes(soft)} but pinning worked (the NVIDIA driver does not charge it); "
                 f"RDMA registration (NCCL over InfiniBand) may still need `ulimit -l unlimited`")
        else:
            verdicts.append(f"locked-memory limit is {_fmt_bytes(soft)} (ulimit -l): pinning host memory or RDMA "
                            f"registration can fail there and memmgr then falls back to pageable copies; run with "
                            f"`ulimit -l unlimited` (docker: --ulimit memlock=-1)")

    echo("verdict:")
    if verdicts:
        for v in verdicts:
            echo(f"  ! {v}")
    else:
        echo("  ok: nothing found that will slow offload down")
    return found


def _measure(found: dict[str, Any], verdicts: list[str], quick: bool, gpus: list[dict[str, Any]]) -> None:
    echo = click.echo
    nbytes = 256 * MiB if quick else GiB
    pin = check_pinning()
    found["pinning_check"] = pin
    echo(f"  host buffer as memmgr allocates it: {pin['kind']}" + (f" ({pin['error']})" if pin["error"] else ""))
    if not pin["pinned"]:
        verdicts.append(f"host memory could not be pinned ({pin['kind']}{': ' + pin['error'] if pin['error'] else ''}):"
                        f" offload falls back to pageable copies, about 4-7x slower; check ulimit -l and free memory")
    dev = torch.cuda.current_device()
    try:
        peak = measure_pinned_peak(nbytes, dev, iters=2 if quick else 3)
        found["pinned_peak"] = peak
        echo(f"  pinned copy peak, cuda:{dev}, {nbytes / GiB:g} GiB: device->host {peak['d2h']:.1f} GB/s, "
             f"host->device {peak['h2d']:.1f} GB/s, both at once {peak['both']:.1f} GB/s "
             f"({peak['both_d2h']:.1f} + {peak['both_h2d']:.1f})")
        j = nvml.nvml_index(dev)
        link = nvml.pcie_link(j) if j is not None else None
        theo = pcie_theoretical_gbps(link.max_gen, link.max_width) if link else None
        one_way = min(peak["d2h"], peak["h2d"])
        if theo and one_way < 0.6 * theo:
            verdicts.append(f"cuda:{dev}: pinned copies reach {one_way:.1f} GB/s, under 60% of the link's "
                            f"{theo:.0f} GB/s (gen{link.max_gen} x{link.max_width}): check NUMA placement (bind the "
                            f"process to the GPU's node), IOMMU settings and other traffic on the link")
        elif theo is None and one_way < 20:
            verdicts.append(f"cuda:{dev}: pinned copies reach only {one_way:.1f} GB/s one way (gen4 x16 gives about "
                            f"25, gen5 x16 about 54)")
        if peak["both"] < 1.2 * max(peak["d2h"], peak["h2d"]):
            verdicts.append(f"cuda:{dev}: both directions at once give {peak['both']:.1f} GB/s, barely more than one "
                            f"way: offloading one group while onloading another will not overlap")
    except Exception as exc:
        echo(f"  pinned copy peak: failed ({type(exc).__name__}: {exc})")
        found["pinned_peak_error"] = str(exc)
    try:
        speed = measure_pinning_speed(nbytes)
        found["pinning_speed"] = speed

        def s(v: float | None, key: str) -> str:
            return f"{v:.2f} s/GiB" if v is not None else f"n/a ({speed['errors'].get(key, 'unavailable')})"

        echo(f"  pinning {nbytes / GiB:g} GiB: native extension {s(speed['native'], 'native')}, torch "
             f"pin_memory=True {s(speed['torch_pin_memory'], 'torch_pin_memory')}, tensor + cudaHostRegister "
             f"{s(speed['cudart_register'], 'cudart_register')}")
        if speed["native"] is None and speed["cudart_register"] is None and speed["torch_pin_memory"] is None:
            verdicts.append("no way of pinning host memory worked here: offload will use pageable copies")
    except Exception as exc:
        echo(f"  pinning speed: failed ({type(exc).__name__}: {exc})")
        found["pinning_speed_error"] = str(exc)


if __name__ == "__main__":  # python -m memmgr.tools.doctor [--quick]
    unknown = [a for a in sys.argv[1:] if a != "--quick"]
    if unknown:
        sys.exit(f"Error: unknown argument(s) {' '.join(unknown)}; python -m memmgr.tools.doctor takes only --quick")
    run_doctor(quick="--quick" in sys.argv)


def _copy_kernel_shapes(echo) -> dict[str, object]:
    """The copy kernel's launch shape on each GPU (memmgr.copy_shape: measured now unless set or cached), with the
    host->device speed of every candidate where it was measured."""
    from memmgr import copy_shape, transfer

    if not transfer.kernels_available():
        return {}
    for index in range(torch.cuda.device_count()):
        if not transfer.prepare_kernels(index):
            continue
        choice = copy_shape.shape_for(index)
        speeds = ", ".join(f"{label} {gbps:.1f}" for label, gbps in sorted(choice.h2d_gbps.items()))
        verdict = "holds the link" if choice.kernel_holds_link else \
            "does not hold the link: auto uses the engines, with the kernel beside them where that measures faster"
        link = "" if choice.kernel_holds_link is None else \
            f"; copy engines device->host {choice.link_gbps:.1f} GB/s: the kernel {verdict}"
        echo(f"  copy kernel on GPU {index}: shape {choice.shape.label} (blocks per SM:unroll), {choice.source}"
             + (f"; host->device GB/s by shape: {speeds}" if speeds else "") + link)
    return copy_shape.shape_status()
