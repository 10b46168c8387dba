"""Same-GPU weight sync through CUDA IPC: python benchmarks/ipc_sync_speed.py --out DIR [--preset 1.3b|4b|tiny]

Trainer and engine are two processes on one GPU. The trainer holds a random transformers model (--preset: the
bench's Llama-shaped 1.3B, 24 layers, hidden 2048, ffn 5504, vocab 32000; or a ~4B Qwen3, 36 layers, hidden 2560;
bf16, untied embeddings) on the GPU; the engine (tests/ipc_support.py) is the same architecture in a second process
on the same GPU, loading through memmgr.sync.ModuleWeightLoader. Each sync streams every weight through
memmgr.sync.transports.ipc.CudaIpcTransport, a ring of --buffers IPC buffers of --bucket-mb exported once:

1. device: packed straight from the trainer's parameters into the ring (send_pairs); GB/s of weight bytes over the
   time from entering the sync to the engine having loaded everything (best of --reps);
2. host: from flat pinned host buckets (send_bucket: one host->device copy per bucket), timed the same way, against
   the same run's pinned-copy peak (lab.pinned_peak, host->device, of the payload's size);
3. memory: the trainer's peak extra GPU memory during each sync (max_memory_allocated minus the bytes before it)
   against the ring's bytes (the ring, plus one oversize slot the size of the largest tensor where that tensor is
   larger than a bucket: the 4B's 778 MB embedding);
4. identity: after the syncs every engine tensor must equal the trainer's bit for bit (position-weighted checksums)
   and the engine's logits on a fixed prompt are compared with the trainer's.

Writes DIR/ipc_sync_speed.json (with the run's metadata) and prints a summary line to stdout. Needs a GPU and
transformers.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import lab

PRESETS = {
    "tiny": dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=32, vocab_size=512),
    "1.3b": dict(model_type="llama", hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=16, head_dim=128, vocab_size=32000),
    "4b": dict(model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1.3b")
    ap.add_argument("--bucket-mb", type=float, default=512)
    ap.add_argument("--buffers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True, help="output directory (gets ipc_sync_speed.json)")
    args = ap.parse_args()

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:0] = [repo, os.path.join(repo, "tests")]
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ipc_support import EngineProcess, checksums
    from memmgr.sync.transports import WeightBucket, group_pairs
    from memmgr.sync.transports.ipc import CudaIpcTransport

    preset = dict(PRESETS[args.preset])
    config = AutoConfig.for_model(preset.pop("model_type"), tie_word_embeddings=False, **preset)
    torch.manual_seed(0)
    with torch.device("cuda"):
        trainer = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    weights = dict(trainer.state_dict())
    payload = sum(t.numel() * t.element_size() for t in weights.values())
    bucket_bytes = int(args.bucket_mb * 2**20)

    engine = EngineProcess(config, torch.bfloat16)
    peak = lab.pinned_peak(torch.device("cuda"), nbytes=payload, repeats=5)["h2d"]
    transport = CudaIpcTransport(engine.announce, buffer_bytes=bucket_bytes, num_buffers=args.buffers)

    def timed(send) -> dict:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        send()
        transport.finish()
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "gbps": payload / seconds / 1e9,
                "peak_extra_gpu_bytes": torch.cuda.max_memory_allocated() - base}

    def from_device() -> None:
        for group in group_pairs(weights.items(), bucket_bytes):
            transport.send_pairs(group)

    host_buckets = []
    for group in group_pairs(weights.items(), bucket_bytes):
        dtype, item = group[0][1].dtype, group[0][1].element_size()
        numel = sum(-(-t.numel() * item // 256) * 256 for _, t in group) // item  # ALIGN_BYTES-aligned entries
        flat = torch.empty(numel, dtype=dtype, pin_memory=True)
        host_buckets.append(WeightBucket.pack(group, out=flat))

    def from_host() -> None:
        for bucket in host_buckets:
            transport.send_bucket(bucket)

    runs = {"device": [timed(from_device) for _ in range(args.reps)],
            "host": [timed(from_host) for _ in range(args.reps)]}
    # after the last sync the engine holds the weights of the host buckets, which are the trainer's weights
    prompt = [1, 17, 42, 99, 7, 3]
    report = engine.report(prompt)
    mine = checksums(weights.items())
    bit_exact = all(report["checksums"].get(n) == c for n, c in mine.items())
    with torch.no_grad():
        logits = trainer(torch.tensor([prompt], device="cuda")).logits.float().cpu()
    diff = float((logits - report["logits"]).abs().max())
    ring_bytes = transport.ring_bytes  # the ring, plus the oversize slot where a tensor is larger than a bucket
    largest = max(t.numel() * t.element_size() for t in weights.values())
    transport.close()
    engine.stop()

    best_device = max(r["gbps"] for r in runs["device"])
    best_host = max(r["gbps"] for r in runs["host"])
    result = {
        "metadata": lab.metadata(), "benchmark": "ipc_sync_speed", "preset": args.preset,
        "params": sum(t.numel() for t in weights.values()),
        "payload_bytes": payload, "bucket_bytes": bucket_bytes, "buffers": args.buffers,
        "ring_bytes": ring_bytes, "largest_tensor_bytes": largest,
        "bound_bytes": bucket_bytes * args.buffers + (largest if largest > bucket_bytes else 0),
        "pinned_h2d_peak_gbps": peak, "runs": runs,
        "best_device_gbps": best_device, "best_host_gbps": best_host,
        "host_over_pinned_peak": best_host / peak if peak else None,
        "peak_extra_within_ring": all(r["peak_extra_gpu_bytes"] <= ring_bytes for rs in runs.values() for r in rs),
        # the bound: the ring's buckets plus the largest tensor (PyTorch rounds a block to 2 MiB)
        "ring_within_bound": ring_bytes <= bucket_bytes * args.buffers + (
            -(-largest // (2 << 20)) * (2 << 20) if largest > bucket_bytes else 0),
        "bit_exact": bit_exact, "engine_missing": report["missing"], "logits_max_abs_diff": diff,
        "logits_equal": diff == 0.0,
    }
    path = lab.write_json(args.out / "ipc_sync_speed.json", result)
    print(f"ipc_sync {args.preset}: device {best_device:.1f} GB/s, host {best_host:.1f} GB/s "
          f"({result['host_over_pinned_peak']:.2f}x the pinned peak {peak:.1f} GB/s), bit_exact {bit_exact}, "
          f"logits max abs diff {diff:.3g}, peak extra within ring {result['peak_extra_within_ring']}; wrote {path}")
    if not bit_exact:
        raise SystemExit("the engine's weights differ from the trainer's after the sync")


if __name__ == "__main__":
    main()
