"""Same-GPU weight sync through memmgr's CUDA IPC transport: trainer and engine as two processes on one GPU.

The trainer holds a random transformers model (``--preset``: a ~1.3B Llama or a ~4B Qwen3, bf16) on the GPU; the
engine (tests/ipc_support.py) is the same architecture in a second process on the same GPU. Each sync streams every
weight through a ring of ``--buffers`` IPC buffers of ``--bucket-mb``, either packed from the trainer's parameters on
the device (``send_pairs``) or from flat pinned host buckets (``send_bucket``, the offloaded case). Recorded per
sync: payload bytes over the time from entering the sync to the engine having loaded everything; the pinned
host-to-device copy peak of this machine for comparison; the trainer's peak extra GPU memory against the ring's
bytes. After the syncs, the engine's tensors are compared bit for bit (checksums) with the trainer's, and its logits
with the trainer's logits.

    python benchmarks/ipc_sync_speed.py --preset 1.3b --out ipc_1.3b.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

PRESETS = {
    "tiny": dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=32, vocab_size=512),
    "1.3b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=16, head_dim=128, vocab_size=32000),
    "4b": dict(model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936),
}


def pinned_peak_gbps(torch, nbytes: int = 1 << 30, reps: int = 5) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    best = 0.0
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = max(best, nbytes / (time.perf_counter() - t0) / 1e9)
    del src, dst
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1.3b")
    ap.add_argument("--bucket-mb", type=float, default=512)
    ap.add_argument("--buffers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="ipc_sync_speed.json")
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
    peak = pinned_peak_gbps(torch)
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
    transport.close()
    engine.stop()

    best_device = max(r["gbps"] for r in runs["device"])
    best_host = max(r["gbps"] for r in runs["host"])
    result = {
        "benchmark": "ipc_sync_speed", "preset": args.preset, "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(), "params": sum(t.numel() for t in weights.values()),
        "payload_bytes": payload, "bucket_bytes": bucket_bytes, "buffers": args.buffers,
        "ring_bytes": bucket_bytes * args.buffers, "pinned_h2d_peak_gbps": peak, "runs": runs,
        "best_device_gbps": best_device, "best_host_gbps": best_host,
        "host_over_pinned_peak": best_host / peak if peak else None,
        "peak_extra_within_ring": all(r["peak_extra_gpu_bytes"] <= bucket_bytes * args.buffers
                                      for rs in runs.values() for r in rs),
        "bit_exact": bit_exact, "engine_missing": report["missing"], "logits_max_abs_diff": diff,
        "logits_equal": diff == 0.0,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    if not bit_exact:
        raise SystemExit("the engine's weights differ from the trainer's after the sync")


if __name__ == "__main__":
    main()
