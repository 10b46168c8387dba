"""GPU evidence for the core (flat tensors, pinned host memory) and the manager on a 1B-parameter transformer.

python benchmarks/gpu_core.py --out DIR   (one GPU; about 2 minutes on an H100)

Measures offload/onload speed of ~16 GiB in 600 mixed-dtype tensors and of a 1B toy transformer with AdamW under
memmgr.for_module, each against the pinned-copy peak of the same run, plus pinning cost, host bytes over payload, the
NVML drop after offload and bit-exactness. Writes DIR/core.json and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback

import torch

import lab
import memmgr
from lab import GB, GiB, pinned_peak, timed

DEV = torch.device("cuda", 0)


def nvml_used() -> int:
    return lab.device_used_bytes(0)


def mixed_tensors(total_bytes: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    """`count` tensors of log-uniform sizes and mixed dtypes summing to about `total_bytes`."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.exp(torch.rand(count, generator=g) * 9)  # sizes spread over ~4 orders of magnitude
    sizes = (weights / weights.sum() * total_bytes).long()
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.int64, torch.uint8, torch.float8_e4m3fn]
    tensors = []
    for i, nbytes in enumerate(sizes.tolist()):
        dtype = dtypes[i % len(dtypes)]
        numel = max(1, int(nbytes) // torch.empty(0, dtype=dtype).element_size() + (i % 7))  # odd sizes
        raw = torch.randint(-128, 127, (numel * torch.empty(0, dtype=dtype).element_size(),), dtype=torch.int8,
                            device=DEV)
        tensors.append(raw.view(dtype).clone())
        del raw
    return tensors


def core_section(total_gib: float, count: int, cycles: int) -> dict:
    out: dict = {}
    peak = pinned_peak(DEV, nbytes=4 * GiB)
    out["peak_gbps"] = peak
    torch.cuda.empty_cache()  # the peak's buffers must not leave cached segments for the state to be carved from
    tensors = mixed_tensors(int(total_gib * GiB), count)
    payload = sum(t.numel() * t.element_size() for t in tensors)
    out.update(payload_bytes=payload, tensors=len(tensors), dtypes=sorted({str(t.dtype) for t in tensors}))
    pool = memmgr.HostMemoryPool()
    t0 = time.perf_counter()
    group = memmgr.BucketizedFlatTensors(tensors, bucket_size_mb=512, name="state", pool=pool, pin_ahead=False)
    out["coalesce_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    group.ensure_host_buffers()
    pin_s = time.perf_counter() - t0
    # The reference copy lives on the host, so nothing else of this test shares the GPU's allocator segments.
    reference_store = memmgr.allocate_host_buffer(payload).tensor
    reference, offset = [], 0
    for t in tensors:
        n = t.numel() * t.element_size()
        reference.append(reference_store[offset:offset + n])
        reference[-1].copy_(t.view(torch.uint8).reshape(-1))
        offset += n
    out["pin_s_per_gib"] = pin_s / (payload / GiB)
    out["host_bytes_held"] = pool.bytes_held
    out["host_over_payload"] = pool.bytes_held / payload
    out["backend"] = memmgr.backend_info().describe()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    used_before = nvml_used()
    offs, ons = [], []
    for cycle in range(cycles):
        offs.append(timed(group.offload, DEV))
        if cycle == 0:
            torch.cuda.empty_cache()
            out["nvml_drop_bytes"] = used_before - nvml_used()
            out["nvml_drop_over_payload"] = out["nvml_drop_bytes"] / payload
            out["storage_zero_while_offloaded"] = all(t.untyped_storage().nbytes() == 0 for t in tensors)
        ons.append(timed(group.onload, DEV))
    out["offload_s"], out["onload_s"] = offs, ons
    out["bit_exact"] = all(torch.equal(t.view(torch.uint8).reshape(-1).cpu(), r) for t, r in zip(tensors, reference))
    steady_off, steady_on = statistics.median(offs[1:]), statistics.median(ons[1:])
    out["first_offload_gbps"] = payload / offs[0] / GB
    out["steady_offload_gbps"] = payload / steady_off / GB
    out["steady_onload_gbps"] = payload / steady_on / GB
    out["steady_offload_ratio"] = out["steady_offload_gbps"] / peak["d2h"]
    out["steady_onload_ratio"] = out["steady_onload_gbps"] / peak["h2d"]
    del group, tensors, reference, reference_store
    torch.cuda.empty_cache()
    # PyTorch's pinned allocator beside ours, same size as one large bucket
    for gib in (1, 4):
        t0 = time.perf_counter()
        x = torch.empty(gib * GiB, dtype=torch.uint8, pin_memory=True)
        out[f"torch_pin_memory_s_per_gib_{gib}GiB"] = (time.perf_counter() - t0) / gib
        del x
        t0 = time.perf_counter()
        y = memmgr.allocate_host_buffer(gib * GiB)
        out[f"memmgr_pin_s_per_gib_{gib}GiB"] = (time.perf_counter() - t0) / gib
        out[f"memmgr_pin_kind_{gib}GiB"] = y.kind
        del y
    torch._C._host_emptyCache()
    pool.trim()
    return out


def manager_section(cycles: int) -> dict:
    out: dict = {}
    peak = pinned_peak(DEV, nbytes=4 * GiB)
    out["peak_gbps"] = peak
    torch.cuda.empty_cache()
    reserved_before = torch.cuda.memory_reserved(DEV)
    torch.manual_seed(0)
    model = lab.ToyGPT(vocab=32000, hidden=2048, layers=20, heads=16, final_norm=False).to(DEV)
    out["params"] = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 32000, (2, 128), device=DEV)
    loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    opt.step()
    del loss
    mgr = memmgr.for_module(model, opt)
    mgr.offload("grads")  # gradients first (dropped), then time weights + optimizer states
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    state = mgr.state
    moved = state["weights"].nbytes + state["optimizer_states"].nbytes
    out["moved_bytes"] = moved
    used_loaded = nvml_used()
    offs, ons = [], []
    for cycle in range(cycles):
        offs.append(timed(mgr.offload, DEV))
        if cycle == 0:
            out["reserved_over_pre_model_bytes"] = torch.cuda.memory_reserved(DEV) - reserved_before
            out["live_tensors_after_offload"] = [
                {"bytes": b["size"], "segment_bytes": s["total_size"]}
                for s in torch.cuda.memory_snapshot() for b in s["blocks"] if b["state"] == "active_allocated"]
            out["nvml_drop_bytes"] = used_loaded - nvml_used()
            out["nvml_drop_over_moved"] = out["nvml_drop_bytes"] / moved
        ons.append(timed(mgr.onload, DEV))
    out["steady_offload_ratio"] = moved / statistics.median(offs[1:]) / GB / peak["d2h"]
    out["steady_onload_ratio"] = moved / statistics.median(ons[1:]) / GB / peak["h2d"]
    out["first_offload_ratio"] = moved / offs[0] / GB / peak["d2h"]
    out["offload_s"], out["onload_s"] = offs, ons
    # still trains after the cycles
    loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    opt.step()
    out["loss_after_cycles_finite"] = bool(torch.isfinite(loss).item())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (gets core.json)")
    ap.add_argument("--gib", type=float, default=16.0)
    ap.add_argument("--tensors", type=int, default=600)
    ap.add_argument("--cycles", type=int, default=4)
    args = ap.parse_args()
    meta = lab.metadata()
    result = {"date": meta["date"], "device": meta["device"], "torch": meta["torch"], "command": meta["command"],
              "meta": meta}
    for name, fn in (("core", lambda: core_section(args.gib, args.tensors, args.cycles)),
                     ("manager_1b", lambda: manager_section(args.cycles))):
        try:
            result[name] = fn()
        except Exception:
            result[name] = {"error": traceback.format_exc()}
        torch.cuda.empty_cache()
        lab.write_json(f"{args.out}/core.json", result, indent=2)
    core, m = result["core"], result["manager_1b"]
    print(json.dumps({k: v for k, v in core.items() if not isinstance(v, list)}, indent=1, default=str))
    print(json.dumps({k: v for k, v in m.items() if not isinstance(v, list)}, indent=1, default=str))


if __name__ == "__main__":
    main()
