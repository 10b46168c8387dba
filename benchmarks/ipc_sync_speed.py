"""Same-GPU weight sync through CUDA IPC: python benchmarks/ipc_sync_speed.py --out DIR [--preset 1.3b|4b|tiny|...]
[--trainer transformers|megatron] [--cpu]

Trainer and engine are two processes on one GPU. The engine (lab.IpcEngineProcess) is a transformers model of the
preset (the bench's Llama-shaped 1.3B, 24 layers, hidden 2048, ffn 5504, vocab 32000; or a ~4B Qwen3, 36 layers,
hidden 2560; bf16, untied embeddings) in a second process on the same GPU, loading through
memmgr.sync.ModuleWeightLoader; every weight travels through memmgr.sync.transports.ipc.CudaIpcTransport, a ring of
--buffers IPC buffers of --bucket-mb exported once. GB/s are weight bytes over the time from entering the sync to
the engine having loaded everything, best of --reps, the syncs --gap-s apart.

--trainer transformers (default): the trainer is the same transformers model on the GPU.
1. device: packed straight from the trainer's parameters into the ring (send_pairs);
2. host: from flat pinned host buckets (send_bucket: one host->device copy per bucket), against the same run's
   pinned-copy peak (lab.pinned_peak, host->device, of the payload's size);
3. memory: the trainer's peak extra GPU memory during each sync (max_memory_allocated minus the bytes before it)
   against the ring's bytes (the ring, plus one oversize slot the size of the largest tensor where that tensor is
   larger than a bucket: the 4B's 778 MB embedding);
4. identity: after the syncs every engine tensor must equal the trainer's bit for bit (position-weighted checksums)
   and the engine's logits on a fixed prompt are compared with the trainer's.

--trainer megatron: the trainer is a megatron-core GPTModel of the preset's layout
(memmgr.tools.megatron_models.gpt_for_hf: bf16, megatron DDP, norm weights randomized) managed by memmgr.for_megatron;
each sync is one call of memmgr.sync.session.sync_weights(manager, MegatronExporter(..., weights=manager's weights
group), transport), which exports Hugging Face tensors in --bucket-mb buckets and streams them into the ring.
1. device: the weights on the GPU;
2. host: after a stand-in for a training step (noise added to every weight), the weights group offloaded: the
   export reads memmgr's pinned host copy and the weights stay offloaded (checked after every sync); against the
   same run's pinned-copy peak;
3. memory: peak extra GPU memory of each sync (sync_weights' figure, plus the ring where an earlier sync allocated
   it) against the ring plus the largest tensor (sync_weights packs the export into the ring's slots), and against
   a looser bound: the ring (with its oversize slot) plus the exporter's staging, two of its largest buckets
   plus the largest tensor (each rounded to PyTorch's 2 MiB blocks);
4. identity, after the device syncs and again after the host syncs: the engine's tensors equal the exported tensors
   bit for bit (checksums of the export, taken once off the clock), and the engine's logits on a fixed prompt equal
   those of a transformers model in the trainer's process loaded with the exported tensors (exactly; the same
   code on the same GPU), and are compared with megatron's own logits (max abs difference, relative to the largest
   logit, and the argmax per position: two implementations in bf16, so close, not equal).
--via (with --trainer megatron) picks how each sync reaches the transport; a comma list runs each in turn on the same
model, engine and ring (device syncs of every path, then host syncs of every path), each reported under "paths"
(the top-level figures are the first path's):
- sync_weights (default): memmgr.sync.session.sync_weights, as above;
- source: the WeightSource path, memmgr.sync.send_weight_source(ExportWeightSource(the same exporter), the same
  transport): the source's iter_groups() (one decoder layer per group, views into the export's buckets) gathered
  into buckets and packed into the CudaIpcTransport ring (send_pairs; --cpu: buckets into the in-process
  transport), between transport.start(the source's metadata()) and finish();
- vllm-ipc: vLLM's own IPC weight transfer over the same ExportWeightSource: vLLM's IPCTrainerWeightTransferEngine
  (WeightTransferTrainerFactory.trainer_init(IPCTrainerInitInfo(packed=True, packed_buffer_size_bytes=--bucket-mb,
  or the largest tensor where that is larger: vLLM's one buffer must hold it)))
  sends into vLLM's IPCWeightTransferEngine in the engine process, which loads the transformers model
  (benchmarks/vllm_ipc_receiver.py says what a vLLM worker adds); GPU only.
source and vllm-ipc need vLLM's weight-transfer modules: the installed vLLM or .vllm-py/ on PYTHONPATH
(benchmarks/make_vllm_subset.py). Each path's syncs are checked for the bytes they moved; the identity checks run
after the last path of each phase.
--cpu runs the megatron mode's code on the CPU (megatron through memmgr.tools.megatron_cpu_shim, a gloo group of one)
with the engine in this process behind memmgr's in-process transport instead of CUDA IPC, for the tiny presets: a smoke
test of the program, its numbers mean nothing.

Writes DIR/ipc_sync_speed.json (with the run's metadata) and prints a summary line to stdout. Needs transformers;
and a GPU except with --cpu.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import lab

PRESETS = {
    "tiny": dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=32, vocab_size=512),
    "1.3b": dict(model_type="llama", hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=16, head_dim=128, vocab_size=32000),
    "4b": dict(model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936),
    # head_dim 48 is not hidden / heads: kv_channels and the per-head q/k norms take the 4B's path
    "tiny-qwen3": dict(model_type="qwen3", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=48, vocab_size=512),
}
PROMPT = [1, 17, 42, 99, 7, 3]
VIAS = ("sync_weights", "source", "vllm-ipc")
MiB2 = 2 << 20  # PyTorch's allocator gives large tensors whole 2 MiB blocks


def hf_config(preset: str):
    """The preset's transformers config: untied, bf16, RMSNorm eps 1e-6 and RoPE theta 10000 (megatron's side is
    built from these)."""
    from transformers import AutoConfig

    fields = dict(PRESETS[preset])
    return AutoConfig.for_model(fields.pop("model_type"), tie_word_embeddings=False, rms_norm_eps=1e-6,
                                rope_theta=10000.0, **fields)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1.3b")
    ap.add_argument("--trainer", choices=("transformers", "megatron"), default="transformers",
                    help="the trainer's model: a transformers model (default) or a megatron-core GPTModel managed by "
                         "memmgr and exported through sync_weights")
    ap.add_argument("--cpu", action="store_true",
                    help="megatron mode on the CPU with an in-process engine (tiny presets; a smoke test only)")
    ap.add_argument("--bucket-mb", type=float, default=512, help="bucket bound in MiB: the ring's buffers and, with "
                    "--trainer megatron, the export's buckets (default 512)")
    ap.add_argument("--buffers", type=int, default=2, help="IPC ring buffers (default 2)")
    ap.add_argument("--staged", action="store_true",
                    help="with --trainer megatron: sync_weights(pack_in_place=False), the exporter's own buckets "
                         "copied into the ring (default: packed straight into the ring's slots)")
    ap.add_argument("--via", default="sync_weights",
                    help="with --trainer megatron: comma list of sync paths, sync_weights (default), source (vLLM's "
                         "WeightSource: ExportWeightSource.iter_groups, layer groups batched up to a bucket, into the "
                         "CUDA IPC ring), vllm-ipc (vLLM's IPC trainer and engine classes over ExportWeightSource)")
    ap.add_argument("--reps", type=int, default=3, help="timed syncs per source; the best is reported (default 3)")
    ap.add_argument("--gap-s", type=float, default=0.5,
                    help="seconds between two timed syncs, off the clock (default 0.5): the generation between two "
                         "syncs of an RL loop, in which the engine's atomic loader refreshes its host copy of what the "
                         "last sync wrote (back to back, the next sync would wait for that copy)")
    ap.add_argument("--out", type=Path, required=True, help="output directory (gets ipc_sync_speed.json)")
    args = ap.parse_args()
    if args.reps < 1 or args.buffers < 1 or args.bucket_mb <= 0 or args.gap_s < 0:
        ap.error("--reps and --buffers must be at least 1, --bucket-mb positive and --gap-s not negative")
    if args.cpu and args.trainer != "megatron":
        ap.error("--cpu runs the megatron trainer mode only (add --trainer megatron)")
    args.via = [v for v in args.via.split(",") if v]
    unknown = [v for v in args.via if v not in VIAS]
    if unknown or not args.via:
        ap.error(f"--via: unknown path(s) {unknown}; choose from {', '.join(VIAS)}")
    if args.via != ["sync_weights"] and args.trainer != "megatron":
        ap.error("--via source/vllm-ipc run with --trainer megatron (the WeightSource is memmgr's Megatron export)")
    if args.cpu and "vllm-ipc" in args.via:
        ap.error("--via vllm-ipc needs CUDA IPC: not with --cpu")
    if args.cpu and not args.preset.startswith("tiny"):
        ap.error(f"--cpu is a smoke test for the tiny presets, not --preset {args.preset}")
    return args


def main() -> None:
    args = parse_args()
    if args.trainer == "megatron":
        run_megatron(args)
    else:
        run_transformers(args)


def run_transformers(args: argparse.Namespace) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

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

    engine = lab.IpcEngineProcess(config, torch.bfloat16)
    peak = lab.pinned_peak(torch.device("cuda"), nbytes=payload, repeats=5)["h2d"]
    transport = CudaIpcTransport(engine.announce, buffer_bytes=bucket_bytes, num_buffers=args.buffers)

    def timed(send) -> dict:
        time.sleep(args.gap_s)
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
    mine = lab.named_checksums(weights.items())
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
        "metadata": lab.metadata(), "benchmark": "ipc_sync_speed", "trainer": "transformers", "preset": args.preset,
        "params": sum(t.numel() for t in weights.values()),
        "payload_bytes": payload, "bucket_bytes": bucket_bytes, "buffers": args.buffers, "gap_s": args.gap_s,
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


# ---------------------------------------------------------------------------------------------------------------------
# --trainer megatron
# ---------------------------------------------------------------------------------------------------------------------
class InProcessEngine:
    """The --cpu stand-in for lab.IpcEngineProcess: the same transformers model, in this process, filled
    through memmgr's in-process transport; ``report`` answers as IpcEngineProcess.report does."""

    def __init__(self, config, dtype):
        from transformers import AutoModelForCausalLM

        from memmgr.sync import ModuleWeightLoader
        from memmgr.sync.transports import InProcessTransport

        self.model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        self.loader = ModuleWeightLoader(self.model)
        self.transport = InProcessTransport(self.loader)

    def report(self, prompt: list[int]) -> dict:
        with torch.no_grad():
            logits = self.model(torch.tensor([prompt])).logits.float()
        return {"checksums": lab.named_checksums(self.model.state_dict().items()), "logits": logits,
                "missing": self.loader.missing()}

    def stop(self) -> None:
        self.transport.close()


def _blocks(nbytes: int) -> int:
    return -(-nbytes // MiB2) * MiB2


def run_megatron(args: argparse.Namespace) -> None:
    import warnings


    warnings.filterwarnings("ignore")
    device = torch.device("cpu") if args.cpu else torch.device("cuda", torch.cuda.current_device())
    shim = None
    if args.cpu:
        from memmgr.tools.megatron_cpu_shim import cpu_megatron

        shim = cpu_megatron()
        shim.__enter__()
    try:
        result = _megatron_sync(args, device)
    finally:
        if shim is not None:
            shim.__exit__(None, None, None)
    path = lab.write_json(args.out / "ipc_sync_speed.json", result)
    ident = result["identity"]
    print(f"ipc_sync megatron {args.preset} via {result['transport']}: device {result['best_device_gbps']:.1f} GB/s, "
          f"host copy {result['best_host_gbps']:.1f} GB/s ({_ratio(result['host_over_pinned_peak'])} the pinned peak "
          f"{_num(result['pinned_h2d_peak_gbps'])} GB/s), weights stayed offloaded "
          f"{result['weights_stayed_offloaded']}, bit_exact device {ident['device']['bit_exact']} host "
          f"{ident['host']['bit_exact']}, logits equal the exported model's {ident['device']['logits_equal_reference']}"
          f"/{ident['host']['logits_equal_reference']}, vs megatron max abs diff "
          f"{ident['host']['logits_vs_megatron_max_abs_diff']:.3g} (argmax agree "
          f"{ident['host']['argmax_agree_with_megatron']:.2f}), peak extra within bound "
          f"{result['peak_extra_within_bound']} ({_num(result['peak_extra_max_bytes'])} <= {result['bound_bytes']} B);"
          f" wrote {path}")
    for via, p in result["paths"].items():
        print(f"ipc_sync megatron {args.preset} path {via}: device {p['best_device_gbps']:.1f} GB/s, host copy "
              f"{p['best_host_gbps']:.1f} GB/s ({_ratio(p['host_over_pinned_peak'])} the pinned peak), moved every "
              f"byte {p['moved_every_byte']}, peak extra {_num(p['peak_extra_max_bytes'])} B, weights stayed "
              f"offloaded {p['weights_stayed_offloaded']}")
    problems = [f"the engine's weights differ from the exported tensors after the {src} syncs"
                for src in ("device", "host") if not ident[src]["bit_exact"]]
    problems += [f"path {via} moved other than the export's bytes" for via, p in result["paths"].items()
                 if not p["moved_every_byte"]]
    if not result["weights_stayed_offloaded"]:
        problems.append("the weights group was onloaded by a sync from the host copy")
    if problems:
        raise SystemExit("; ".join(problems))


SYNC_API = {
    "sync_weights": "memmgr.sync.session.sync_weights(manager, MegatronExporter, transport, "
                    "pack_in_place={pack_in_place})",
    "source": "memmgr.sync.send_weight_source(memmgr.sync.engines.vllm.ExportWeightSource(MegatronExporter), "
              "transport): iter_groups() gathered into buckets, send_pairs per bucket (vLLM's WeightSource path)",
    "vllm-ipc": "vLLM IPCTrainerWeightTransferEngine(ExportWeightSource(MegatronExporter), packed) -> vLLM "
                "IPCWeightTransferEngine in the engine process",
}


def _measured(cuda: bool, device: torch.device, sync) -> dict:
    """Runs ``sync()`` (which returns the bytes it moved and the number of sends) and measures its peak extra GPU
    memory as sync_weights(measure=True) does: max_memory_allocated over the bytes allocated before."""
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    nbytes, sends = sync()
    if cuda:
        torch.cuda.synchronize(device)
    return {"nbytes": nbytes, "buckets": sends, "source": None, "path_seconds": time.perf_counter() - t0,
            "peak_extra_gpu_bytes": torch.cuda.max_memory_allocated(device) - base if cuda else None}


def _path(via: str, args: argparse.Namespace, mgr, exporter, transport, engine, device: torch.device):
    """One sync through ``via`` (see --via), returning the run's figures."""
    from memmgr.sync.session import sync_weights

    cuda = device.type == "cuda"
    bucket_bytes = int(args.bucket_mb * 2**20)
    if via == "sync_weights":
        def run() -> dict:
            res = sync_weights(mgr, exporter, transport, pack_in_place=not args.staged, measure=True)
            return {"nbytes": res.nbytes, "buckets": res.buckets, "source": res.source,
                    "sync_weights_seconds": res.seconds, "peak_extra_gpu_bytes": res.peak_extra_gpu_bytes}
        return run

    from memmgr.sync.engines.vllm.source import ExportWeightSource

    if via == "source":
        from memmgr.sync import send_weight_source

        def send() -> tuple[int, int]:
            sent = send_weight_source(ExportWeightSource(exporter), transport, bucket_bytes=bucket_bytes)
            return sent.nbytes, sent.buckets
        return lambda: _measured(cuda, device, send)

    from vllm.distributed.weight_transfer.base import WeightSource
    from vllm_ipc_receiver import trainer_engine

    class Counted(WeightSource):
        """The ExportWeightSource, counting the bytes vLLM's trainer engine takes from it."""

        def __init__(self) -> None:
            self.inner, self.nbytes = ExportWeightSource(exporter), 0

        def metadata(self):
            return self.inner.metadata()

        def __iter__(self):
            for name, t in self.inner:
                self.nbytes += t.numel() * t.element_size()
                yield name, t

    # vLLM's packed producer refuses a tensor larger than its one buffer (the 4B's 778 MB embedding > 512 MiB)
    buffer_bytes = max(bucket_bytes, max(e.numel * e.dtype.itemsize for e in exporter.entries))

    def send_vllm() -> tuple[int, int]:
        source = Counted()
        trainer = trainer_engine(engine, source, packed=True, buffer_bytes=buffer_bytes)
        trainer.send_weights()
        return source.nbytes, 1
    return lambda: _measured(cuda, device, send_vllm)


def _path_summary(runs: dict, payload: int, peak, cuda: bool, via: str) -> dict:
    best_device = max(r["gbps"] for r in runs["device"])
    best_host = max(r["gbps"] for r in runs["host"])
    peaks = [r["peak_extra_with_ring_bytes"] for rs in runs.values() for r in rs]
    return {"sync_api": SYNC_API[via], "runs": runs, "best_device_gbps": best_device, "best_host_gbps": best_host,
            "host_over_pinned_peak": best_host / peak if peak else None,
            "moved_every_byte": all(r["nbytes"] == payload for rs in runs.values() for r in rs),
            "peak_extra_max_bytes": max(peaks) if cuda else None,
            "weights_stayed_offloaded": all(r["weights_offloaded_after"] for r in runs["host"])}


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def _ratio(v) -> str:
    return "n/a x" if v is None else f"{v:.2f}x"


def _megatron_sync(args: argparse.Namespace, device: torch.device) -> dict:
    from transformers import AutoModelForCausalLM

    from memmgr.integrations.megatron import for_megatron
    from memmgr.sync import ModuleWeightLoader
    from memmgr.sync.export import MegatronExporter
    from memmgr.tools.megatron_models import gpt_for_hf

    cuda = device.type == "cuda"
    config = hf_config(args.preset)
    bucket_bytes = int(args.bucket_mb * 2**20)
    setup = lab.init_megatron_one_process(device)

    # the engine first: on the GPU it is a second process that builds its own (differently random) copy
    if cuda:
        from memmgr.sync.transports.ipc import CudaIpcTransport

        engine = lab.IpcEngineProcess(config, torch.bfloat16)
        transport = CudaIpcTransport(engine.announce, buffer_bytes=bucket_bytes, num_buffers=args.buffers)
    else:
        torch.manual_seed(1)
        engine = InProcessEngine(config, torch.bfloat16)
        transport = engine.transport

    torch.manual_seed(0)
    ddp = gpt_for_hf(config, device)
    with torch.no_grad():  # norms of 1 would hide a q/k-norm mix-up in the logits
        for name, p in ddp.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    ddp.eval()
    mgr = for_megatron(ddp, None)
    weights = mgr.group("weights")
    exporter = MegatronExporter([ddp], config, weights=weights, bucket_bytes=bucket_bytes)
    with torch.device(device):  # the exported model in the trainer's process: the logits the engine must give
        reference = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    load_reference = ModuleWeightLoader(reference)
    prompt = torch.tensor([PROMPT], device=device)

    def snapshot() -> dict:
        """Off the clock: checksums of every exported tensor, the reference model loaded with them, both logits."""
        sums: dict = {}
        for bucket in exporter.buckets():
            pairs = bucket.named_tensors()
            sums.update(lab.named_checksums(pairs))
            load_reference(pairs)
        with torch.no_grad():
            ref = reference(prompt).logits.float().cpu()
            meg = ddp(prompt, torch.arange(prompt.shape[1], device=device).unsqueeze(0), None).float().cpu()
        return {"checksums": sums, "reference_logits": ref, "megatron_logits": meg[..., :config.vocab_size]}

    def identity(expected: dict) -> dict:
        report = engine.report(PROMPT)
        got = report["checksums"]
        logits = report["logits"].float().cpu()
        ref, meg = expected["reference_logits"], expected["megatron_logits"]
        diff_meg = float((logits - meg).abs().max())
        return {"bit_exact": all(got.get(n) == c for n, c in expected["checksums"].items()),
                "exported_tensors": len(expected["checksums"]),
                "differing": [n for n, c in expected["checksums"].items() if got.get(n) != c][:10],
                "engine_not_filled": report["missing"],
                "logits_vs_reference_max_abs_diff": float((logits - ref).abs().max()),
                "logits_equal_reference": bool(torch.equal(logits, ref)),
                "logits_vs_megatron_max_abs_diff": diff_meg,
                "megatron_max_abs_logit": float(meg.abs().max()),
                "logits_vs_megatron_relative": diff_meg / max(float(meg.abs().max()), 1e-30),
                "argmax_agree_with_megatron": float((logits.argmax(-1) == meg.argmax(-1)).float().mean())}

    syncs = {via: _path(via, args, mgr, exporter, transport, engine, device) for via in args.via}

    def sync_runs(source: str, via: str) -> list[dict]:
        runs = []
        for _ in range(args.reps):
            ring_before = getattr(transport, "ring_bytes", 0)
            if cuda:
                time.sleep(args.gap_s)
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            res = syncs[via]()
            seconds = time.perf_counter() - t0
            # vllm-ipc does not use the ring: its own packed buffer is inside its peak
            ring = 0 if via == "vllm-ipc" else ring_before
            run = {"seconds": seconds, "gbps": res["nbytes"] / seconds / 1e9, **res, "ring_bytes_before": ring_before,
                   "peak_extra_with_ring_bytes": (None if res["peak_extra_gpu_bytes"] is None
                                                  else res["peak_extra_gpu_bytes"] + ring)}
            if source == "host":
                run["weights_offloaded_after"] = weights.device_bytes == 0
            runs.append(run)
        return runs

    expected_device = snapshot()
    paths: dict[str, dict] = {via: {"device": sync_runs("device", via)} for via in args.via}
    ident = {"device": identity(expected_device)}

    torch.manual_seed(2)
    with torch.no_grad():  # a stand-in for a training step: every weight changes before the next sync
        for p in ddp.parameters():
            p.add_(torch.randn_like(p), alpha=0.01)
    expected_host = snapshot()
    payload = sum(e.numel * e.dtype.itemsize for e in exporter.entries)
    mgr.offload("weights")
    lab.sync(device)
    peak = lab.pinned_peak(device, nbytes=payload, repeats=5)["h2d"] if cuda else None
    for via in args.via:
        paths[via]["host"] = sync_runs("host", via)
    runs = paths[args.via[0]]
    ident["host"] = identity(expected_host)
    stayed = weights.device_bytes == 0 and all(r["weights_offloaded_after"] for p in paths.values()
                                               for r in p["host"])

    ring_bytes = getattr(transport, "ring_bytes", 0)
    plan = exporter.plan
    two_buckets = sum(sorted((_blocks(b.nbytes) for b in plan.buckets), reverse=True)[:2])
    staging = two_buckets + _blocks(plan.largest_unit_bytes)
    bound = ring_bytes + staging
    peaks = [r["peak_extra_with_ring_bytes"] for rs in runs.values() for r in rs]
    peak_max = max(peaks) if cuda else None
    for via in args.via:
        paths[via] = _path_summary(paths[via], payload, peak, cuda, via)
    if hasattr(transport, "close") and cuda:
        transport.close()
    engine.stop()
    mgr.onload()
    mgr.close()

    best_device = max(r["gbps"] for r in runs["device"])
    best_host = max(r["gbps"] for r in runs["host"])
    return {
        "metadata": lab.metadata(), "benchmark": "ipc_sync_speed", "trainer": "megatron", "preset": args.preset,
        "setup": setup, "transport": "cuda_ipc" if cuda else "inproc (--cpu)",
        "sync_api": SYNC_API[args.via[0]].format(pack_in_place=not args.staged),
        "via": args.via, "paths": paths,
        "vllm_from": getattr(sys.modules.get("vllm"), "__file__", None),
        "params": sum(p.numel() for p in ddp.parameters()), "payload_bytes": payload,
        "exported_tensors": len(exporter.entries), "bucket_bytes": bucket_bytes, "buffers": args.buffers,
        "gap_s": args.gap_s,
        "export_buckets": len(plan.buckets), "largest_bucket_bytes": max(b.nbytes for b in plan.buckets),
        "largest_tensor_bytes": plan.largest_unit_bytes, "ring_bytes": ring_bytes,
        "staging_bound_bytes": staging, "bound_bytes": bound,
        "pinned_h2d_peak_gbps": peak, "runs": runs,
        "best_device_gbps": best_device, "best_host_gbps": best_host,
        "host_over_pinned_peak": best_host / peak if peak else None,
        "device_at_least_100_gbps": best_device >= 100.0 if cuda else None,
        "host_at_least_0_9_of_peak": (best_host / peak >= 0.9) if peak else None,
        "peak_extra_max_bytes": peak_max,
        "peak_extra_within_bound": (peak_max <= bound) if peak_max is not None else None,
        # sync_weights packs the export into the ring's slots: beside the ring only a staged tensor of the largest
        "peak_extra_within_ring_and_largest_tensor": (peak_max <= ring_bytes + _blocks(plan.largest_unit_bytes)
                                                      if peak_max is not None else None),
        "weights_stayed_offloaded": stayed,
        "identity": ident,
    }


if __name__ == "__main__":
    main()
