"""Megatron -> Hugging Face export speed: python benchmarks/export_speed.py --out DIR [--tiny] [--bucket-mb N]

Builds the bench's 1.3B GPT in its Llama-shaped variant with megatron-core (24 layers, hidden 2048, 16 heads, SwiGLU
ffn 5504, RMSNorm, RoPE, no biases, untied embeddings, vocab 32000, bf16; local layer spec) in megatron DDP with the
distributed optimizer's param buffers, and a memmgr manager for it (``for_megatron``). Then, in one process
(world size 1, receiver rank 0):

1. device: ``MegatronExporter(...).buckets()`` iterated to the end from device memory, timed (best of --repeats
   after a warm-up, each ended by a device synchronize): GB/s of exported Hugging Face bytes.
2. host: the weights group offloaded to its pinned host copy; the same export read from the host copy (the weights
   stay offloaded), timed the same way, against the same run's pinned-copy peak (one host->device copy of the
   exported byte count from a pinned buffer, best of --repeats): GB/s and the ratio to the peak.
   The peak is memmgr bench's (lab.pinned_peak, host->device).
3. memory: peak extra device memory of each export (max_memory_allocated during the export minus the allocated bytes
   before it; the loop holds each bucket until the next arrives, as a consumer does) against the bound of two
   buckets plus the largest single parameter's Hugging Face bytes.
4. identity: checksums of every bucket exported from the device and from the host copy must agree.

--tiny builds a 2-layer hidden-64 model on the CPU (gloo; megatron through memmgr.tools.megatron_cpu_shim) to smoke-test
the program; its numbers mean nothing. Writes DIR/export_speed.json (with the run's metadata) and prints one
summary line per section to stdout.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

import lab

GB = lab.GB
LLAMA_1_3B = dict(layers=24, hidden=2048, heads=16, kv_heads=16, ffn=5504, vocab=32000)
TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn=96, vocab=128)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output directory (gets export_speed.json)")
    p.add_argument("--tiny", action="store_true", help="2-layer hidden-64 model on the CPU: a smoke test only")
    p.add_argument("--bucket-mb", type=float, default=256, help="export bucket bound in MiB (default 256)")
    p.add_argument("--repeats", type=int, default=5, help="timed exports per source (best is reported)")
    p.add_argument("--kv-heads", type=int, default=None, help="query groups (default: 16, as Llama-2; 2 with --tiny)")
    return p.parse_args()


def hf_config(shape: dict) -> Any:
    fields = dict(model_type="llama", num_hidden_layers=shape["layers"], hidden_size=shape["hidden"],
                  num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                  head_dim=shape["hidden"] // shape["heads"], intermediate_size=shape["ffn"],
                  vocab_size=shape["vocab"], tie_word_embeddings=False)
    try:
        from transformers import LlamaConfig

        return LlamaConfig(**{k: v for k, v in fields.items() if k != "model_type"})
    except ImportError:  # the export reads only these attributes
        return SimpleNamespace(**fields)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def checksums(bucket) -> dict[str, int]:
    """memmgr's position-weighted checksum of each flat tensor of a bucket (a swapped or changed byte shows)."""
    from memmgr.checksum import bucket_checksum

    return {f"{bucket.index}/{dtype}": int(bucket_checksum(flat)) for dtype, flat in bucket.flats.items()}


def run_export(make, device: torch.device, repeats: int, with_checksums: bool = False) -> dict:
    """Warm-up, then ``repeats`` timed full iterations; peak extra memory over all of them."""
    sums: dict[str, int] = {}
    exporter = make()
    for bucket in exporter.buckets():  # warm-up (and the checksums, off the clock)
        if with_checksums:
            sums.update(checksums(bucket))
    sync(device)
    nbytes = sum(e.numel * torch.empty(0, dtype=e.dtype).element_size() for e in exporter.entries)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _bucket in exporter.buckets():
            pass
        sync(device)
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else None
    best = min(times)
    return {"exported_bytes": nbytes, "seconds_best": best, "seconds_all": times, "GBps": nbytes / best / GB,
            "peak_extra_bytes": peak, "buckets": len(exporter.plan.buckets),
            "largest_parameter_hf_bytes": exporter.plan.largest_unit_bytes, "checksums": sums}


def main() -> int:
    args = parse_args()
    warnings.filterwarnings("ignore")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and not args.tiny \
        else torch.device("cpu")
    shape = dict(TINY if args.tiny else LLAMA_1_3B)
    if args.kv_heads:
        shape["kv_heads"] = args.kv_heads
    result: dict[str, Any] = {"metadata": lab.metadata(), "shape": shape, "bucket_mb": args.bucket_mb}
    shim = None
    if device.type != "cuda":
        from memmgr.tools.megatron_cpu_shim import cpu_megatron

        shim = cpu_megatron()
        shim.__enter__()
    try:
        from memmgr.integrations.megatron import for_megatron
        from memmgr.sync.export import MegatronExporter
        from memmgr.tools.megatron_models import gpt_for_hf

        result["setup"] = lab.init_megatron_one_process(device)
        cfg = hf_config(shape)
        ddp = gpt_for_hf(cfg, device)
        mgr = for_megatron(ddp, None)
        weights = mgr.group("weights")
        bucket_bytes = int(args.bucket_mb * 2**20)

        def make():
            return MegatronExporter([ddp], cfg, weights=weights, bucket_bytes=bucket_bytes)

        result["parameters"] = sum(p.numel() for p in ddp.parameters())
        dev = run_export(make, device, args.repeats, with_checksums=True)
        bound = 2 * bucket_bytes + dev["largest_parameter_hf_bytes"]
        dev["bound_bytes"] = bound
        dev["within_bound"] = dev["peak_extra_bytes"] is None or dev["peak_extra_bytes"] <= bound
        print(f"device: {dev['exported_bytes'] / GB:.2f} GB in {dev['seconds_best'] * 1e3:.1f} ms = "
              f"{dev['GBps']:.1f} GB/s; peak extra {dev['peak_extra_bytes']} B (bound {bound} B)")

        mgr.offload("weights")
        sync(device)
        peak = lab.pinned_peak(device, nbytes=dev["exported_bytes"], repeats=max(args.repeats, 3))["h2d"]
        host = run_export(make, device, args.repeats, with_checksums=True)
        host["pinned_h2d_peak_GBps"] = peak
        host["vs_peak"] = host["GBps"] / peak
        host["bound_bytes"] = bound
        host["within_bound"] = host["peak_extra_bytes"] is None or host["peak_extra_bytes"] <= bound
        host["weights_stayed_offloaded"] = weights.device_bytes == 0
        print(f"host copy: {host['GBps']:.1f} GB/s = {host['vs_peak']:.2f} x pinned peak {peak:.1f} GB/s; peak "
              f"extra {host['peak_extra_bytes']} B (bound {bound} B); weights stayed offloaded: "
              f"{host['weights_stayed_offloaded']}")
        result["identical"] = dev.pop("checksums") == host.pop("checksums")
        print(f"device and host-copy exports identical: {result['identical']}")
        result["from_device"] = dev
        result["from_host_copy"] = host
        mgr.onload()
        mgr.close()
    finally:
        if shim is not None:
            shim.__exit__(None, None, None)
    path = lab.write_json(args.out / "export_speed.json", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
