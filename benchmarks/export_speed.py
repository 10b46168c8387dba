"""Megatron -> Hugging Face export speed: python benchmarks/export_speed.py --out FILE.json [--tiny] [--bucket-mb N]

Builds the bench's 1.3B GPT in its Llama-shaped variant with megatron-core (24 layers, hidden 2048, 16 heads, SwiGLU
ffn 5504, RMSNorm, RoPE, no biases, untied embeddings, vocab 32000, bf16; local layer spec) in megatron DDP with the
distributed optimizer's param buffers, and a memmgr manager for it (``for_megatron``). Then, in one process
(world size 1, receiver rank 0):

1. device: ``MegatronExporter(...).buckets()`` iterated to the end from device memory, timed (best of --repeats
   after a warm-up, each ended by a device synchronize): GB/s of exported Hugging Face bytes.
2. host: the weights group offloaded to its pinned host copy; the same export read from the host copy (the weights
   stay offloaded), timed the same way, against the same run's pinned-copy peak (one host->device copy of the
   exported byte count from a pinned buffer, best of --repeats): GB/s and the ratio to the peak.
3. memory: peak extra device memory of each export (max_memory_allocated during the export minus the allocated bytes
   before it) against the bound of two buckets plus the largest single parameter's Hugging Face bytes.
4. identity: a checksum of every exported tensor from the device and from the host copy must agree.

--tiny builds a 2-layer hidden-64 model on the CPU (gloo; megatron through tests/megatron_shim.py) to smoke-test
the program; its numbers mean nothing. Writes the JSON to --out and prints a one-line summary per section.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

GB = 1e9
LLAMA_1_3B = dict(layers=24, hidden=2048, heads=16, kv_heads=16, ffn=5504, vocab=32000)
TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn=96, vocab=128)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--tiny", action="store_true", help="2-layer hidden-64 model on the CPU: a smoke test only")
    p.add_argument("--bucket-mb", type=float, default=256, help="export bucket bound in MiB (default 256)")
    p.add_argument("--repeats", type=int, default=5, help="timed exports per source (best is reported)")
    p.add_argument("--kv-heads", type=int, default=None, help="query groups (default: 16, as Llama-2; 2 with --tiny)")
    return p.parse_args()


def init(device: torch.device) -> None:
    from megatron.core import parallel_state

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29571")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    if device.type == "cuda":
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(1234)


def build(shape: dict, device: torch.device) -> Any:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    bf16 = True
    cfg = TransformerConfig(
        num_layers=shape["layers"], hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
        num_query_groups=shape["kv_heads"], ffn_hidden_size=shape["ffn"], normalization="RMSNorm",
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, bf16=bf16, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
        use_cpu_initialization=device.type != "cuda")
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=shape["vocab"], max_sequence_length=128, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False)
    if device.type == "cuda":
        model.cuda()
    model = Float16Module(cfg, model)
    return DistributedDataParallel(cfg, DistributedDataParallelConfig(use_distributed_optimizer=True), model)


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
    out = {}
    for name, t in bucket.named_tensors():
        raw = t.reshape(-1).view(torch.uint8)
        out[name] = int(raw.to(torch.int64).sum()) if raw.numel() < 2**31 else -1
    return out


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


def pinned_h2d_peak(nbytes: int, device: torch.device, repeats: int) -> float:
    if device.type != "cuda":
        src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
        dst = torch.empty_like(src)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - start)
        return nbytes / best / GB
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for i in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        if i:
            best = min(best, start.elapsed_time(end) / 1e3)
    del host, dev
    torch.cuda.empty_cache()
    return nbytes / best / GB


def main() -> int:
    args = parse_args()
    warnings.filterwarnings("ignore")
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and not args.tiny \
        else torch.device("cpu")
    shape = dict(TINY if args.tiny else LLAMA_1_3B)
    if args.kv_heads:
        shape["kv_heads"] = args.kv_heads
    result: dict[str, Any] = {"shape": shape, "device": str(device), "bucket_mb": args.bucket_mb,
                              "torch": torch.__version__}
    shim = None
    if device.type != "cuda":
        sys.path.insert(0, str(root / "tests"))
        from megatron_shim import cpu_megatron

        shim = cpu_megatron()
        shim.__enter__()
    try:
        from memmgr.integrations.megatron import for_megatron
        from memmgr.sync.export import MegatronExporter

        if device.type == "cuda":
            result["gpu"] = torch.cuda.get_device_name(device)
        init(device)
        ddp = build(shape, device)
        cfg = hf_config(shape)
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
        peak = pinned_h2d_peak(dev["exported_bytes"], device, args.repeats)
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
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
