"""GPU check of the memory ledger: python benchmarks/gpu_report.py --out DIR [--dtype bf16] [--megatron]

Builds a plain PyTorch transformer (~0.5B parameters) with AdamW, manages it with ``memmgr.for_module`` (or
``memmgr.for_megatron`` with --megatron, when that integration is present), attaches a Ledger writing
DIR/ledger.rank0.jsonl, and runs: train step -> rollout phase (everything offloaded; weight sync; generation with a
KV cache) -> train step again. At every snapshot it checks that the categories (managed groups on GPU, other PyTorch
allocated, PyTorch cached, non-PyTorch) add up to NVML's usage for this process within 1% and that each part is
consistent (managed <= allocated <= reserved <= process usage <= device used): DIR/report_check.json. Also writes
DIR/report.txt (the table), DIR/timeline.png and DIR/doctor.txt (``memmgr doctor``).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import lab
import memmgr
from memmgr import nvml
from memmgr.ledger import GiB, Ledger, gpu_categories
from memmgr.tools.report import format_table, plot_timeline

HAVE_MEGATRON_INTEGRATION = (Path(memmgr.__file__).parent / "integrations" / "megatron.py").exists()


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, vocab: int, device: torch.device) -> float:
    tokens = torch.randint(0, vocab, (4, 256), device=device)
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), tokens[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    return float(loss.detach())


def build_plain(args: argparse.Namespace, device: torch.device):
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = lab.ToyGPT(args.vocab, args.hidden, args.layers, args.heads, causal=True).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    mgr = memmgr.for_module(model, opt)

    def step() -> float:
        return train_step(model, opt, args.vocab, device)

    return model, mgr, step


def build_megatron(args: argparse.Namespace, device: torch.device):
    """A megatron-core GPT (world size 1, bf16, DDP + distributed optimizer) built by the same helpers as
    benchmarks/gpu_megatron.py (lab.py), managed by memmgr.for_megatron."""
    lab.init_megatron()
    ddp, opt = lab.build_megatron_gpt(layers=args.layers, hidden=args.hidden, heads=args.heads, vocab=args.vocab,
                                      seq=256, bf16=True, dist_opt=True)
    mgr = memmgr.for_megatron([ddp], opt)
    batches = lab.token_batches(2, 2, 256, args.vocab)

    def step() -> float:
        return float(lab.megatron_train_step(ddp, opt, *batches[0]))

    return ddp, mgr, step


def check_record(rec: dict, tolerance: float = 0.01) -> dict:
    """Whether the categories of each GPU entry add up to NVML's usage for this process, and are consistent."""
    out = {"seq": rec.get("seq"), "label": rec.get("label"), "phase": rec.get("phase"), "gpus": []}
    ok_all = bool(rec.get("gpus")) and "error" not in rec
    for gpu in rec.get("gpus") or []:
        cats = gpu_categories(gpu)
        process = gpu.get("process")
        entry = {"device": gpu["device"], "process_source": gpu.get("process_source"), "process": process,
                 "categories": cats, "allocated": gpu.get("allocated"), "reserved": gpu.get("reserved"),
                 "device_used": gpu.get("used"), "problems": []}
        if process is None:
            entry["problems"].append(f"NVML gave no usage for this process ({gpu.get('process_source')}; "
                                     f"{rec.get('nvml')})")
        else:
            total = sum(v for v in cats.values() if v is not None)
            entry["sum"] = total
            entry["rel_error"] = abs(total - process) / process if process else 0.0
            if entry["rel_error"] > tolerance:
                entry["problems"].append(f"categories sum to {total / GiB:.3f} GiB, NVML says {process / GiB:.3f} GiB")
            if process < gpu["reserved"]:
                entry["problems"].append("NVML's process usage is below PyTorch's reserved memory")
            if gpu.get("used") is not None and process > gpu["used"] * (1 + tolerance):
                entry["problems"].append("process usage above the device's used memory")
        if gpu.get("managed", 0) > gpu["allocated"]:
            entry["problems"].append("managed bytes on the GPU exceed PyTorch's allocated bytes")
        if gpu["allocated"] > gpu["reserved"]:
            entry["problems"].append("allocated above reserved")
        entry["ok"] = not entry["problems"]
        ok_all = ok_all and entry["ok"]
        out["gpus"].append(entry)
    out["ok"] = ok_all
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--kv-gib", type=float, default=2.0, help="size of the fake KV cache during generation")
    ap.add_argument("--quick-doctor", action="store_true", help="run `memmgr doctor --quick`")
    if HAVE_MEGATRON_INTEGRATION:
        ap.add_argument("--megatron", action="store_true", help="a megatron-core GPT via memmgr.for_megatron")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("gpu_report needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.init()
    torch.empty(1, device=device)  # create the context, so the baseline shows it

    ledger = Ledger(out / "ledger.rank0.jsonl", rank=0)
    ledger.snapshot("baseline (context only)")
    t0 = time.perf_counter()
    use_megatron = getattr(args, "megatron", False)
    model, mgr, step = (build_megatron if use_megatron else build_plain)(args, device)
    nparams = sum(p.numel() for p in model.parameters())
    ledger.attach(mgr, "actor")
    ledger.snapshot("model built")

    loss1 = step()
    ledger.snapshot("after train step 1", phase="train")
    with mgr.phase("rollout"):
        with mgr.weight_sync() as weights:
            with torch.no_grad():
                checksum = sum(float(w.float().sum()) for w in list(weights.values())[:4])
            ledger.snapshot("weight sync: weights on GPU", phase="rollout")
        kv = torch.empty(int(args.kv_gib * GiB), dtype=torch.uint8, device=device).fill_(1)
        ledger.snapshot("generating (KV cache live)", phase="rollout")
        del kv
        ledger.snapshot("generation done (KV cache freed, still cached)", phase="rollout")
        torch.cuda.empty_cache()
        ledger.snapshot("after empty_cache", phase="rollout")
    loss2 = step()
    ledger.snapshot("after train step 2", phase="train")
    mgr.offload()
    ledger.snapshot("final offload (what is left on the GPU)")
    mgr.onload()
    elapsed = time.perf_counter() - t0
    ledger.close()

    checks = [check_record(r) for r in ledger.records]
    summary = {
        "ok": all(c["ok"] for c in checks), "snapshots": len(checks),
        "failed": [c["seq"] for c in checks if not c["ok"]],
        "tolerance": 0.01, "params": nparams, "dtype": args.dtype, "megatron": use_megatron,
        "snapshot_cost_mean_s": ledger.mean_cost_s, "snapshot_cost_max_s": max(r["cost_s"] for r in ledger.records),
        "nvml": nvml.status(), "device": torch.cuda.get_device_name(device), "losses": [loss1, loss2],
        "weights_checksum": checksum, "elapsed_s": elapsed,
        "note": "the four categories sum to NVML's process usage by construction whenever every part is "
                "non-negative; the real checks are the ordering managed <= allocated <= reserved <= process <= "
                "device used and NVML reporting this process at all",
        "checks": checks, "meta": lab.metadata(),
    }
    lab.write_json(out / "report_check.json", summary, indent=2)
    (out / "report.txt").write_text(format_table(ledger.records))
    plot_timeline(ledger.records, out / "timeline.png")
    mgr.close()
    del model, mgr
    torch.cuda.empty_cache()

    cmd = [sys.executable, "-m", "memmgr", "doctor"] + (["--quick"] if args.quick_doctor else [])
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    doc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    (out / "doctor.txt").write_text(doc.stdout + (f"\n[stderr]\n{doc.stderr}" if doc.stderr.strip() else ""))

    print(format_table(ledger.records))
    print(f"params {nparams / 1e9:.2f}B; check {'OK' if summary['ok'] else 'FAILED at ' + str(summary['failed'])}; "
          f"snapshot cost {ledger.mean_cost_s * 1e3:.2f} ms mean; doctor rc={doc.returncode}; wrote {out}")
    return 0 if summary["ok"] and doc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
