"""The colocated RL cycle on N GPUs: generate -> weight sync -> train, with memmgr freeing each side in turn.

    python benchmarks/rl_cycle.py --gpus N --iters K --out DIR [--trainer megatron|plain|auto]

One process per GPU (torch.multiprocessing spawn). Process r hosts trainer rank r (data parallel over all N ranks:
a megatron-core GPTModel built by ``memmgr.tools.megatron_models`` and managed by ``memmgr.for_megatron``, or with
``--trainer plain`` a plain torch transformer managed by ``memmgr.for_module``) and the engine on GPU r (a copy of
the model for generation plus a KV-cache-sized buffer, managed by ``memmgr.for_module``). Weight sync uses reverse
placement: trainer rank i feeds the engine on GPU (i + 1) % N, through pair process groups of their own (NCCL refuses an
engine on its trainer's GPU). Pairs sync in rounds of disjoint pairs (two rounds for even N, three for odd), so no
process waits on two communicators at once.

Each iteration:
  generate  trainer fully offloaded; engine weights + KV cache on the GPU; greedy decode of a few tokens
  sync      KV cache dropped; ``WeightSender.send(mgr)`` onloads only the trainer's weights, broadcasts them in
            buckets, offloads them again; the engine's ``WeightReceiver`` loads them
  verify    (untimed) every engine tensor compared bit for bit with its trainer's, and logits on a fixed batch
  train     engine offloaded to the host; trainer onloaded; one optimizer step; trainer offloaded

DIR gets results.json (per-GPU NVML memory at every phase, timings, checks, errors), table.md and one
timeline_gpu<r>.png per GPU. Sync throughput is set beside the GPU-to-GPU broadcast peak measured in the same run
(one large NCCL broadcast per pair), and the weights' onload + offload time (the hooks' cost) beside
bytes / pinned peak (each direction at its own same-run pinned-copy peak, i.e. 2 x bytes / peak) + 50 ms.

NVLink multicast stays off: NCCL_NVLS_ENABLE=0 is set for every spawned process. ``--device cpu`` runs the same
cycle over gloo on the CPU (a smoke test of the logic; no memory or throughput numbers).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_k] = _v  # before torch, NCCL or any child process reads them

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import lab  # noqa: E402
import memmgr  # noqa: E402
from lab import bits_equal, free_port  # noqa: E402
from memmgr.sync import ModuleWeightLoader, WeightReceiver, WeightSender, init_sync_group  # noqa: E402
from memmgr.sync.comm import Comm  # noqa: E402  (the benchmark's own untimed checks use the same pair groups)

GB = 1e9
GiB = 2**30


# ---------------------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------------------
def tiny_gpt(**kw: Any) -> torch.nn.Module:
    """The --trainer plain model: lab.ToyGPT with SDPA blocks and learned positions (``max_seq``)."""
    return lab.ToyGPT(**kw, block="sdpa")


class PlainEngine(torch.nn.Module):
    """The engine's copy of tiny_gpt, under the prefix ``model.`` (as inference engines name their weights)."""

    def __init__(self, **kw: Any):
        super().__init__()
        self.model = tiny_gpt(**kw)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)


def plain_name_map(name: str) -> str:
    return "model." + name


def megatron_name_map(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module."):]
    return name


# ---------------------------------------------------------------------------------------------------------------------
# trainers and engines
# ---------------------------------------------------------------------------------------------------------------------
class Side:
    """A trainer or engine: its model, its manager and how to run it."""

    def __init__(self, **kw: Any):
        self.__dict__.update(kw)


def build_plain(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Side, Side]:
    kw = dict(vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads, max_seq=args.max_seq)
    torch.manual_seed(1234)  # identical initial weights on every data-parallel rank
    model = tiny_gpt(**kw).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    world = dist.get_world_size()

    def step(tokens: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 tokens[:, 1:].reshape(-1))
        loss.backward()
        # data-parallel gradient averaging as DDP does it, done by hand on one flat buffer: torch DDP's reducer
        # keeps gradient buckets (weight-sized) on the GPU that no manager can free during generation
        grads = [p.grad for p in model.parameters()]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(world)
        for g, f in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(f)
        del flat
        opt.step()
        return float(loss.detach())

    trainer = Side(kind="plain", model=model, forward=lambda t: model(t), step=step, opt=opt,
                   make_mgr=lambda: memmgr.for_module(model, opt))
    torch.manual_seed(4321 + dist.get_rank())  # the engine starts from other weights: the sync must overwrite them
    engine_model = PlainEngine(**kw).to(device=device, dtype=dtype)
    engine = Side(kind="plain", model=engine_model, forward=lambda t: engine_model(t), name_map=plain_name_map)
    return trainer, engine


def build_megatron(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Side, Side]:
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer.module import Float16Module

    from memmgr.tools.megatron_models import ddp_and_optimizer, gpt_model, transformer_config

    parallel_state.initialize_model_parallel(1, 1)  # data parallel over every rank
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    cfg = transformer_config(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                             bf16=dtype == torch.bfloat16, params_dtype=dtype, pipeline_dtype=dtype,
                             use_cpu_initialization=False)

    def gpt() -> torch.nn.Module:  # LayerNorm, learned positions, untied
        return gpt_model(cfg, vocab_size=args.vocab, max_sequence_length=args.max_seq).to(device)

    def wrap(model: torch.nn.Module) -> torch.nn.Module:  # bf16 GPTModels run under Float16Module
        return Float16Module(cfg, model) if dtype != torch.float32 else model

    core = gpt()
    # DDP (grad_reduce_in_fp32, distributed optimizer; Float16Module in bf16) and megatron Adam (lr 1e-4, clip 1.0)
    ddp, opt = ddp_and_optimizer(cfg, core, lr=1e-4)

    def positions(tokens: torch.Tensor) -> torch.Tensor:
        return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand(tokens.shape[0], -1)

    def step(tokens: torch.Tensor) -> float:
        ddp.zero_grad_buffer()
        opt.zero_grad()
        inp, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        loss = ddp(inp, positions(inp), None, labels=labels).float().mean()
        loss.backward()
        ddp.finish_grad_sync()
        opt.step()
        return float(loss.detach())

    def fwd(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda t: model(t, positions(t), None)

    trainer = Side(kind="megatron", model=core, forward=fwd(ddp), step=step, opt=opt,
                   make_mgr=lambda: memmgr.for_megatron([ddp], opt))
    torch.manual_seed(4321 + dist.get_rank())
    engine_model = gpt()
    engine_model.eval()
    engine = Side(kind="megatron", model=engine_model, forward=fwd(wrap(engine_model)), name_map=megatron_name_map)
    return trainer, engine


# ---------------------------------------------------------------------------------------------------------------------
# measurement helpers
# ---------------------------------------------------------------------------------------------------------------------
class Recorder:
    """Memory snapshots, phase timings and errors of one process, dumped to JSON after every phase."""

    def __init__(self, rank: int, device: torch.device, path: Path):
        self.rank, self.device, self.path = rank, device, path
        self.t0 = time.perf_counter()
        self.data: dict[str, Any] = {"rank": rank, "device": str(device), "snapshots": [], "iterations": [],
                                     "errors": [], "status": "running"}
        self.nvml_index = None
        if device.type == "cuda":
            from memmgr import nvml

            self._nvml = nvml
            self.nvml_index = nvml.nvml_index(device.index)
            self.data["nvml"] = nvml.status()
            self.data["gpu_uuid"] = memmgr.sync.device_uuid(device)
            self.data["gpu_name"] = torch.cuda.get_device_name(device)

    def memory(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.device.type != "cuda":
            return out
        torch.cuda.synchronize(self.device)
        used = None
        if self.nvml_index is not None:
            m = self._nvml.device_memory(self.nvml_index)
            if m is not None:
                used, out["source"] = m.used, "nvml"
        if used is None:
            free, total = torch.cuda.mem_get_info(self.device)
            used, out["source"] = total - free, "cudaMemGetInfo"
        reserved = torch.cuda.memory_reserved(self.device)
        peak_reserved = torch.cuda.max_memory_reserved(self.device)
        out.update(used=used, allocated=torch.cuda.memory_allocated(self.device), reserved=reserved,
                   peak_reserved_since_last=peak_reserved,
                   # what NVML would have read at the allocator's high-water mark since the last snapshot
                   peak_used_estimate=used + max(0, peak_reserved - reserved))
        torch.cuda.reset_peak_memory_stats(self.device)
        return out

    def snap(self, label: str, phase: str, it: int | None) -> None:
        self.data["snapshots"].append({"t": time.perf_counter() - self.t0, "label": label, "phase": phase,
                                       "iter": it, **self.memory()})

    def error(self, where: str, exc: BaseException) -> None:
        self.data["errors"].append({"where": where, "type": type(exc).__name__, "error": str(exc)[:4000],
                                    "traceback": traceback.format_exc()[-4000:]})

    def dump(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def edge_colors(n: int) -> list[int]:
    """Round of each edge i -> (i+1) % n, so edges of one round share no process: 2 rounds for even n, 3 for odd."""
    return [2 if (n % 2 and i == n - 1) else i % 2 for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------------
# one process: trainer rank r + engine on GPU r
# ---------------------------------------------------------------------------------------------------------------------
class Abort(Exception):
    pass


def worker(rank: int, args: argparse.Namespace, port: int) -> None:
    for k, v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ[k] = v
    n = args.gpus
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    out = Path(args.out)
    rec = Recorder(rank, device, out / f"rank{rank}.json")
    timeout = datetime.timedelta(seconds=args.pg_timeout)
    it: int | None = None

    def phase(name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:
            rec.error(f"{name} (iteration {it})", exc)
            rec.data["status"] = f"failed in {name}"
            rec.dump()
            print(f"[rank {rank}] {name} failed: {type(exc).__name__}: {str(exc)[:500]}", flush=True)
            raise Abort from exc

    try:
        store = dist.TCPStore("127.0.0.1", port, n, rank == 0, timeout=timeout)
        dist.init_process_group(backend, store=dist.PrefixStore("trainer", store), rank=rank, world_size=n,
                                timeout=timeout)
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        kind = args.trainer
        rec.data["trainer"] = kind
        trainer, engine = phase("build", lambda: (build_megatron if kind == "megatron" else build_plain)(
            args, device, dtype))

        # ---- pair groups: edge i is trainer rank i -> engine in process (i + 1) % n ----
        colors = edge_colors(n)
        send_edge, recv_edge = rank, (rank - 1) % n
        groups: dict[int, Any] = {}
        src_index: dict[int, int] = {}

        def rounds(on_send: Callable[[], Any], on_recv: Callable[[], Any]) -> None:
            for c in sorted(set(colors)):
                if colors[send_edge] == c:
                    on_send()
                elif colors[recv_edge] == c:
                    on_recv()

        def make_groups() -> None:
            if args.sync_group == "new_group":
                made: dict[tuple[int, ...], Any] = {}
                for e in range(n):  # every rank creates every group, in one order
                    ranks = tuple(sorted({e, (e + 1) % n}))
                    if ranks not in made:
                        made[ranks] = dist.new_group(list(ranks), timeout=timeout)
                    groups[e], src_index[e] = made[ranks], ranks.index(e)
            else:  # a group of its own per pair (init_sync_group), built only by its two processes, in rounds
                def make(e: int, me: int) -> None:
                    groups[e] = init_sync_group("", 2, me, backend, timeout=args.pg_timeout, store=store,
                                                prefix=f"pair{e}")
                    src_index[e] = 0
                rounds(lambda: make(send_edge, 0), lambda: make(recv_edge, 1))
        phase("groups", make_groups)

        g = torch.Generator().manual_seed(7)
        fixed_batch = torch.randint(0, args.vocab, (args.check_batch, args.check_seq), generator=g).to(device)
        prompts = torch.randint(0, args.vocab, (args.gen_batch, args.prompt_len), generator=g).to(device)

        def train_tokens(i: int) -> torch.Tensor:
            gen = torch.Generator().manual_seed(1000 * i + rank)
            return torch.randint(0, args.vocab, (args.train_batch, args.train_seq + 1), generator=gen).to(device)

        def generate() -> list[list[int]]:
            tokens = prompts
            with torch.no_grad():
                for _ in range(args.gen_tokens):
                    nxt = engine.forward(tokens)[:, -1].argmax(-1, keepdim=True)
                    tokens = torch.cat([tokens, nxt], dim=1)
            sync_device(device)
            return tokens[:, args.prompt_len:].tolist()

        kv_bytes = int(args.kv_gb * GB) if cuda else 2**20

        # ---- setup: everything resident at once (the baseline memmgr avoids) ----
        def setup() -> None:
            loss = trainer.step(train_tokens(0))  # creates the optimizer state
            kv = torch.empty(kv_bytes, dtype=torch.uint8, device=device)
            generate()
            trainer.step(train_tokens(0))
            rec.data["setup_loss"] = loss
            rec.snap("both resident (trainer state + engine + KV)", "setup", None)
            del kv
        phase("setup", setup)

        mgr = phase("trainer manager", trainer.make_mgr)
        engine_mgr = phase("engine manager", lambda: memmgr.for_module(engine.model))
        state = mgr.state
        rec.data["trainer_state_bytes"] = {k: v.nbytes for k, v in state.items()}
        rec.data["weight_bytes"] = state["weights"].nbytes
        rec.data["sync_weight_bytes"] = sum(t.numel() * t.element_size() for t in mgr.named_weights().values())
        rec.data["engine_weight_bytes"] = engine_mgr.state["weights"].nbytes
        rec.data["kv_bytes"] = kv_bytes
        rec.data["left_behind"] = dict(getattr(mgr, "left_behind", {}))
        phase("offload trainer", lambda: mgr.offload())
        rec.snap("trainer offloaded", "setup", None)

        # the hooks' cost: weights onload + offload inside the sync
        hook_t: dict[str, float] = {}
        in_sync = {"on": False}

        def timer(event: str, names: tuple) -> None:
            if in_sync["on"] and "weights" in names:
                if event in ("before_onload", "before_offload"):
                    sync_device(device)
                hook_t[event] = time.perf_counter()
                if event == "after_onload":
                    rec.snap("sync: trainer weights on", "sync", it)
        for ev in ("before_onload", "after_onload", "before_offload", "after_offload"):
            mgr.register_hook(ev, timer)

        sender = WeightSender(groups[send_edge], src_index[send_edge], bucket_size_mb=args.bucket_mb,
                              store=dist.PrefixStore(f"uuid{send_edge}", store))
        loader = ModuleWeightLoader(engine.model)
        receiver = WeightReceiver(groups[recv_edge], src_index[recv_edge], loader, name_map=engine.name_map,
                                  device=device, store=dist.PrefixStore(f"uuid{recv_edge}", store))

        # ---- same-run peaks: pinned host<->GPU copy, GPU->GPU broadcast per pair ----
        def peaks() -> None:
            res: dict[str, Any] = {}
            if cuda:
                from memmgr.tools.measure import measure_pinned_peak

                dist.barrier()
                res["pinned"] = measure_pinned_peak(nbytes=args.peak_mb * 2**20, device=device)
            nbytes = args.peak_mb * 2**20 if cuda else 2**20
            buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
            tiny = torch.zeros(1, device=device)
            best: dict[str, float] = {}

            def one(edge: int, side: str) -> None:  # best of 3 after a warm-up, timed on each side
                comm = Comm(groups[edge])
                for i in range(4):
                    comm.broadcast(tiny, src_index[edge]).wait()
                    sync_device(device)
                    t0 = time.perf_counter()
                    comm.broadcast(buf, src_index[edge]).wait()  # noqa: F821 - deleted after the last use
                    sync_device(device)
                    if i:
                        best[side] = max(best.get(side, 0.0), nbytes / (time.perf_counter() - t0) / GB)
            rounds(lambda: one(send_edge, "send"), lambda: one(recv_edge, "recv"))
            # this GPU's outgoing pair (the one its sync numbers are for), timed on the sender, and its incoming pair
            res["broadcast_gbps"] = best.get("send")
            res["broadcast_gbps_incoming"] = best.get("recv")
            res["broadcast_bytes"] = nbytes
            rec.data["peaks"] = res
            del buf
            if cuda:
                torch.cuda.empty_cache()
        phase("peaks", peaks)
        rec.dump()

        # ---- the cycle ----
        hold: dict[str, torch.Tensor] = {}  # the engine's KV cache while it exists
        for it in range(args.iters):
            itrec: dict[str, Any] = {"iter": it}
            rec.data["iterations"].append(itrec)
            t_phase = time.perf_counter()

            def do_generate() -> None:
                if engine_mgr.state["weights"].state != "on_device":
                    engine_mgr.onload()
                hold["kv"] = torch.empty(kv_bytes, dtype=torch.uint8, device=device)
                rec.snap("generate: engine weights + KV cache", "generate", it)
                itrec["generated"] = generate()[0]
                rec.snap("generate: done", "generate", it)
            phase("generate", do_generate)
            itrec["generate_s"] = time.perf_counter() - t_phase

            def do_sync() -> None:
                hold.pop("kv", None)
                if cuda:
                    torch.cuda.empty_cache()
                rec.snap("sync: KV cache dropped", "sync", it)
                res: dict[str, Any] = {}

                def send() -> None:
                    hook_t.clear()
                    in_sync["on"] = True
                    t0 = time.perf_counter()
                    try:
                        st = sender.send(mgr)
                    finally:
                        in_sync["on"] = False
                    total = time.perf_counter() - t0
                    onload = hook_t["after_onload"] - hook_t["before_onload"]
                    offload = hook_t["after_offload"] - hook_t["before_offload"]
                    res["send"] = {"seconds": st.seconds, "bucket_seconds": st.bucket_seconds, "gbps": st.gbps,
                                   "nbytes": st.nbytes, "buckets": st.buckets, "collectives": st.collectives,
                                   "metadata_sent": st.metadata_sent, "total_with_hooks_s": total,
                                   "onload_s": onload, "offload_s": offload, "hooks_s": onload + offload}

                def recv() -> None:
                    st = receiver.receive()
                    res["recv"] = {"seconds": st.seconds, "bucket_seconds": st.bucket_seconds, "gbps": st.gbps,
                                   "collectives": st.collectives, "metadata_received": st.metadata_sent,
                                   "engine_params_not_loaded": [p for p in loader.missing()
                                                                if p in dict(engine.model.named_parameters())]}
                rounds(send, recv)
                itrec["sync"] = res
                rec.snap("sync: done (trainer weights off)", "sync", it)
            t_phase = time.perf_counter()
            phase("sync", do_sync)
            itrec["sync_s"] = time.perf_counter() - t_phase

            def do_verify() -> None:
                res: dict[str, Any] = {}

                def send() -> None:
                    comm = Comm(groups[send_edge])
                    with mgr.weight_sync() as weights:
                        for _, t in weights.items():
                            comm.broadcast(t.detach().contiguous(), src_index[send_edge]).wait()
                        with torch.no_grad():
                            logits = trainer.forward(fixed_batch).contiguous()
                        comm.broadcast(logits, src_index[send_edge]).wait()
                        sync_device(device)
                        del logits

                def recv() -> None:
                    comm = Comm(groups[recv_edge])
                    targets = dict(engine.model.named_parameters())
                    targets.update(dict(engine.model.named_buffers()))
                    bad = []
                    for spec in receiver.layout.tensors:
                        got = torch.empty(spec.shape, dtype=spec.dtype, device=device)
                        comm.broadcast(got, src_index[recv_edge]).wait()
                        mine = targets.get(engine.name_map(spec.name))
                        if mine is None or not bits_equal(mine, got):
                            bad.append(spec.name)
                    with torch.no_grad():
                        logits = engine.forward(fixed_batch).contiguous()
                    theirs = torch.empty_like(logits)
                    comm.broadcast(theirs, src_index[recv_edge]).wait()
                    res["weights_bitwise"] = not bad
                    res["weights_mismatched"] = bad[:20]
                    res["tensors_checked"] = len(receiver.layout.tensors)
                    res["logits_bitwise"] = bits_equal(logits, theirs)
                    res["logits_max_abs_diff"] = float((logits.float() - theirs.float()).abs().max())
                    res["logits_dtype"] = str(logits.dtype)
                    res["logits_note"] = (
                        "same model class, weights and kernels on the same GPU type: bitwise expected"
                        if res["logits_bitwise"] else
                        "weights are bit-identical, so the difference comes from the kernels: the trainer's forward "
                        "runs inside its DDP wrapper on another GPU, where cuBLAS/attention may pick other algorithms")
                rounds(send, recv)
                itrec["verify"] = res
            phase("verify", do_verify)

            def do_train() -> None:
                t0 = time.perf_counter()
                engine_mgr.offload()
                rec.snap("train: engine offloaded", "train", it)
                mgr.onload()
                t1 = time.perf_counter()
                rec.snap("train: trainer onloaded", "train", it)
                itrec["loss"] = trainer.step(train_tokens(it + 1))
                sync_device(device)
                t2 = time.perf_counter()
                rec.snap("train: after optimizer step", "train", it)
                mgr.offload()
                rec.snap("train: trainer offloaded", "train", it)
                engine_mgr.onload()
                t3 = time.perf_counter()
                itrec["train"] = {"switch_in_s": t1 - t0, "step_s": t2 - t1, "switch_out_s": t3 - t2}
            t_phase = time.perf_counter()
            phase("train", do_train)
            itrec["train_s"] = time.perf_counter() - t_phase
            rec.dump()
            if rank == 0:
                print(f"[rank 0] iteration {it} done: loss {itrec.get('loss'):.4f}, sync "
                      f"{itrec['sync'].get('send', {}).get('gbps', 0):.1f} GB/s", flush=True)
        rec.data["status"] = "ok"
        rec.dump()
        dist.barrier()
        dist.destroy_process_group()
    except Abort:
        rec.dump()
        os._exit(1)  # peers may be stuck in a collective; the parent reports and ends them
    except Exception as exc:
        rec.error("worker", exc)
        rec.data["status"] = "failed"
        rec.dump()
        os._exit(1)


# ---------------------------------------------------------------------------------------------------------------------
# parent: spawn, wait with a deadline, merge, report
# ---------------------------------------------------------------------------------------------------------------------
def summarize(ranks: list[dict], n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"gpus": []}
    for r in ranks:
        if not r:
            continue
        snaps = [s for s in r.get("snapshots", []) if "used" in s]
        both = next((s for s in snaps if s["phase"] == "setup" and s["label"].startswith("both")), None)
        cycle = [s for s in snaps if s["phase"] in ("generate", "sync", "train")]
        by_phase = {}
        for ph in ("generate", "sync", "train"):
            vals = [s["peak_used_estimate"] for s in cycle if s["phase"] == ph]
            if vals:
                by_phase[ph] = max(vals)
        iters = r.get("iterations", [])
        sends = [i["sync"]["send"] for i in iters if "send" in i.get("sync", {})]
        steady = sends[1:] or sends
        peaks = r.get("peaks", {})
        pinned = peaks.get("pinned") or {}
        wb = r.get("weight_bytes", 0)
        budget = None
        if pinned.get("h2d") and pinned.get("d2h"):
            budget = wb / (pinned["h2d"] * GB) + wb / (pinned["d2h"] * GB) + 0.050
        state_bytes = sum(r.get("trainer_state_bytes", {}).values())
        g = {
            "rank": r["rank"], "trainer": r.get("trainer"), "status": r.get("status"),
            "errors": len(r.get("errors", [])),
            "weight_bytes": wb, "sync_weight_bytes": r.get("sync_weight_bytes"),
            "trainer_state_bytes": state_bytes, "engine_weight_bytes": r.get("engine_weight_bytes"),
            "kv_bytes": r.get("kv_bytes"),
            "both_resident_measured": both["peak_used_estimate"] if both else None,
            "both_resident_computed": (state_bytes + (r.get("engine_weight_bytes") or 0) + (r.get("kv_bytes") or 0)),
            "cycle_peak": max(by_phase.values()) if by_phase else None, "phase_peaks": by_phase,
            "sync_gbps_steady": statistics.median([s["gbps"] for s in steady]) if steady else None,
            "sync_gbps_first": sends[0]["gbps"] if sends else None,
            "broadcast_peak_gbps": peaks.get("broadcast_gbps"),
            "pinned_h2d_gbps": pinned.get("h2d"), "pinned_d2h_gbps": pinned.get("d2h"),
            "hooks_s_steady": statistics.median([s["hooks_s"] for s in steady]) if steady else None,
            "hooks_budget_s": budget,
            "weights_bitwise_all": None,
            "logits_bitwise_all": None,
            "logits_max_abs_diff": max((i["verify"]["logits_max_abs_diff"] for i in iters
                                        if "logits_max_abs_diff" in i.get("verify", {})), default=None),
            "iterations_done": sum(1 for i in iters if "train_s" in i),
        }
        # checks are made on the engine side: this GPU's engine, fed by trainer rank (r - 1) % n
        checks = [i["verify"] for i in iters if "weights_bitwise" in i.get("verify", {})]
        if checks:
            g["weights_bitwise_all"] = all(c["weights_bitwise"] for c in checks)
            g["logits_bitwise_all"] = all(c["logits_bitwise"] for c in checks)
        if g["sync_gbps_steady"] and g["broadcast_peak_gbps"]:
            g["sync_vs_broadcast_peak"] = g["sync_gbps_steady"] / g["broadcast_peak_gbps"]
        if g["hooks_s_steady"] is not None and budget:
            g["hooks_within_budget"] = g["hooks_s_steady"] <= budget
        out["gpus"].append(g)
    return out


def fmt_gb(x: Any) -> str:
    return "-" if x is None else f"{x / GB:.2f}"


def write_table(results: dict, path: Path) -> None:
    cfg = results["config"]
    lines = [f"# Colocated RL cycle: {cfg['gpus']} GPU(s), trainer {cfg['trainer']}, {cfg['iters']} iteration(s)", ""]
    lines.append("| GPU | status | weights GB | trainer state GB | engine GB | KV GB | both resident GB (measured) "
                 "| both resident GB (sizes) | cycle peak GB | generate / sync / train peak GB |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for g in results["summary"]["gpus"]:
        pp = g["phase_peaks"]
        lines.append(f"| {g['rank']} | {g['status']} | {fmt_gb(g['weight_bytes'])} "
                     f"| {fmt_gb(g['trainer_state_bytes'])} "
                     f"| {fmt_gb(g['engine_weight_bytes'])} | {fmt_gb(g['kv_bytes'])} "
                     f"| {fmt_gb(g['both_resident_measured'])} | {fmt_gb(g['both_resident_computed'])} "
                     f"| {fmt_gb(g['cycle_peak'])} "
                     f"| {' / '.join(fmt_gb(pp.get(p)) for p in ('generate', 'sync', 'train'))} |")
    lines += ["", "| GPU | sync GB/s (steady) | first sync GB/s | broadcast peak GB/s | ratio "
              "| hooks ms (onload+offload) | budget ms (2 x bytes / pinned peak + 50) | pinned H2D / D2H GB/s "
              "| weights bitwise | logits bitwise "
              "| logits max abs diff |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x: Any, spec: str = ".1f", scale: float = 1.0) -> str:
        return "-" if x is None else format(x * scale, spec)
    for g in results["summary"]["gpus"]:
        lines.append(f"| {g['rank']} | {f(g['sync_gbps_steady'])} | {f(g['sync_gbps_first'])} "
                     f"| {f(g['broadcast_peak_gbps'])} | {f(g.get('sync_vs_broadcast_peak'), '.2f')} "
                     f"| {f(g['hooks_s_steady'], '.1f', 1e3)} | {f(g['hooks_budget_s'], '.1f', 1e3)} "
                     f"| {f(g['pinned_h2d_gbps'])} / {f(g['pinned_d2h_gbps'])} | {g['weights_bitwise_all']} "
                     f"| {g['logits_bitwise_all']} | {f(g['logits_max_abs_diff'], '.3g')} |")
    lines += ["", "Memory is NVML's device usage (cudaMemGetInfo where NVML is missing) at each phase boundary, "
              "raised by the caching allocator's high-water mark since the previous snapshot. 'Both resident' was "
              "measured once at setup with the trainer's full state, the engine and its KV cache on the GPU at once. "
              "Sync GB/s counts weight bytes over the sender's header-to-final-status time (hooks excluded); the "
              "broadcast peak is one large NCCL broadcast over the same pair group in the same run."]
    if results.get("notes"):
        lines += [""] + [f"Note: {x}" for x in results["notes"]]
    errors = [(r["rank"], e) for r in results["ranks"] if r for e in r.get("errors", [])]
    if errors or results.get("process_errors"):
        lines += ["", "## Errors", ""]
        for rank, e in errors:
            lines.append(f"- rank {rank}, {e['where']}: {e['type']}: {e['error'][:300]}")
        for e in results.get("process_errors", []):
            lines.append(f"- {e}")
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # pragma: no cover
        return [f"matplotlib unavailable: {exc}"]
    colors = {"setup": "#999999", "generate": "#1f77b4", "sync": "#ff7f0e", "train": "#2ca02c"}
    written = []
    for r in results["ranks"]:
        snaps = [s for s in (r or {}).get("snapshots", []) if "used" in s]
        if not snaps:
            continue
        g = next(x for x in results["summary"]["gpus"] if x["rank"] == r["rank"])
        fig, ax = plt.subplots(figsize=(11, 4.5))
        ts = [s["t"] for s in snaps]
        ax.step(ts, [s["used"] / GB for s in snaps], where="post", color="black", lw=1.2, label="NVML used")
        for ph, col in colors.items():
            pts = [(s["t"], s["peak_used_estimate"] / GB) for s in snaps if s["phase"] == ph]
            if pts:
                ax.scatter(*zip(*pts), color=col, s=18, zorder=3, label=f"{ph} (peak since previous point)")
        if g.get("both_resident_measured"):
            ax.axhline(g["both_resident_measured"] / GB, color="red", ls="--", lw=1,
                       label=f"both resident: {g['both_resident_measured'] / GB:.1f} GB")
        if g.get("cycle_peak"):
            ax.axhline(g["cycle_peak"] / GB, color="green", ls=":", lw=1,
                       label=f"colocated cycle peak: {g['cycle_peak'] / GB:.1f} GB")
        ax.set_xlabel("seconds since process start")
        ax.set_ylabel("GPU memory used (GB)")
        ax.set_title(f"GPU {r['rank']}: trainer rank {r['rank']} + engine fed by trainer rank "
                     f"{(r['rank'] - 1) % results['config']['gpus']} ({r.get('trainer')})")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = out / f"timeline_gpu{r['rank']}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(str(p))
    return written


def resolve_trainer(args: argparse.Namespace) -> tuple[str, str | None]:
    if args.trainer != "auto":
        return args.trainer, None
    if args.device != "cuda":
        return "plain", "megatron-core needs CUDA here; --device cpu uses the plain trainer"
    try:
        import megatron.core  # noqa: F401

        return "megatron", None
    except Exception as exc:
        return "plain", f"megatron-core unavailable ({type(exc).__name__}: {exc}); using the plain trainer"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2, help="GPUs = processes (>= 2)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--trainer", choices=("auto", "megatron", "plain"), default="auto")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: gloo smoke test of the logic")
    ap.add_argument("--sync-group", choices=("new_group", "stateless"), default="new_group",
                    help="pair groups from dist.new_group, or memmgr.sync.init_sync_group (groups of their own)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--max-seq", type=int, default=1024)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-seq", type=int, default=512)
    ap.add_argument("--gen-batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=8)
    ap.add_argument("--check-batch", type=int, default=2)
    ap.add_argument("--check-seq", type=int, default=64)
    ap.add_argument("--kv-gb", type=float, default=16.0, help="KV-cache-sized buffer of the engine, GB")
    ap.add_argument("--bucket-mb", type=float, default=256)
    ap.add_argument("--peak-mb", type=int, default=1024, help="size of the pinned-copy and broadcast peak probes")
    ap.add_argument("--pg-timeout", type=float, default=120, help="seconds before a collective gives up")
    ap.add_argument("--deadline", type=float, default=480, help="seconds before the parent ends every process")
    args = ap.parse_args(argv)
    if args.gpus < 2:
        ap.error("--gpus must be at least 2 (the engine must sit on another GPU than its trainer rank)")
    if args.device == "cuda":
        if not torch.cuda.is_available() or torch.cuda.device_count() < args.gpus:
            ap.error(f"--gpus {args.gpus} but torch sees {torch.cuda.device_count()} GPU(s)")
    args.trainer, note = resolve_trainer(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rank*.json"):
        old.unlink()

    import torch.multiprocessing as mp

    t0 = time.perf_counter()
    ctx = mp.start_processes(worker, args=(args, free_port()), nprocs=args.gpus, join=False, start_method="spawn")
    process_errors: list[str] = []
    while True:
        try:
            if ctx.join(timeout=2):
                break
        except Exception as exc:  # a worker exited non-zero: give the others a moment to write, then end them
            process_errors.append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}")
            time.sleep(3)
            break
        if time.perf_counter() - t0 > args.deadline:
            process_errors.append(f"deadline of {args.deadline:.0f} s passed; processes ended")
            break
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
            process_errors.append(f"process {p.pid} was still running and was killed")
    ranks = []
    for r in range(args.gpus):
        f = out / f"rank{r}.json"
        ranks.append(json.loads(f.read_text()) if f.exists() else {"rank": r, "status": "no output"})
    results = {"config": vars(args), "meta": lab.metadata(), "wall_s": time.perf_counter() - t0, "ranks": ranks,
               "process_errors": process_errors, "notes": [note] if note else [],
               "env": {"torch": torch.__version__, "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE"),
                       "nccl": ".".join(map(str, torch.cuda.nccl.version())) if args.device == "cuda" else None}}
    for r in range(args.gpus):  # merged into results.json (keeps DIR to results.json, table.md and N PNGs)
        (out / f"rank{r}.json").unlink(missing_ok=True)
    results["summary"] = summarize(ranks, args.gpus)
    results["plots"] = plot(results, out)
    lab.write_json(out / "results.json", results, indent=1)
    write_table(results, out / "table.md")
    print((out / "table.md").read_text())
    ok = all(r.get("status") == "ok" for r in ranks) and not process_errors
    print(f"wrote {out / 'results.json'}, {out / 'table.md'} and {len(results['plots'])} timeline(s) "
          f"in {results['wall_s']:.0f} s; {'all ranks ok' if ok else 'ERRORS: see results.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
