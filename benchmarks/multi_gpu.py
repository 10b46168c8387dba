"""Several GPUs (issue 19): NCCL communicators released between phases, cross-GPU weight handover, the Megatron->HF
export at TP=2 / PP=2 / EP=2, and a Megatron training step at TP=2 and PP=2 with memmgr offload/onload between steps.

    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --out DIR [--sections comms,handover,export,train]
    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --out DIR --cpu --tiny      (dry run: gloo on the CPU)

Sections (``--sections``, in the order given; each in its own try/except: an error is recorded and the next runs):

comms     NCCL communicators' memory (memmgr.comms.NcclCommunicators in a MemoryManager with a Ledger): three process
          groups over both ranks, each initialized by a few collectives; the process's GPU usage (NVML) measured as
          each group's communicator comes up, then released (native suspend where torch's ProcessGroupNCCL has it
          with NCCL >= 2.29.7, else destroy + re-create through a factory) and restored for --cycles cycles, bytes
          freed/restored per communicator; all-reduce and all-gather results checked on every group after every
          restore; the ledger's categories (its "nccl" line) after offload and after onload; torch/NCCL versions.
handover  cross-GPU weight handover: rank 0 (trainer, GPU 0) exports a Llama-shaped megatron-core GPTModel
          (--sizes: 1.3b, 4b; tiny with --tiny) to Hugging Face tensors and sends them with memmgr.sync's
          WeightSender over an NCCL sync group to rank 1 (engine, GPU 1), whose transformers LlamaForCausalLM (a
          plain module with the same names if transformers is absent) loads them through ModuleWeightLoader. Both
          ranks hold the same trainer weights (data-parallel replicas) and both receive the export, so rank 1
          checks the engine's weights against its copy bit for bit and the two ranks' export digests against each
          other. Bytes/s of steady-state syncs (the first one carries the metadata) against a plain broadcast of
          one buffer of the same size on the same group, timed the same way; ratio = sync / broadcast.
export    Megatron->HF export on the GPUs: TP=2 (qwen2, tied embeddings, qkv bias), PP=2 with 2 virtual stages
          (llama), EP=2 (qwen3_moe), each filled from one TP=1 model's state dict (memmgr.tools.megatron_models),
          against the TP=1 export of the same weights (same GPUs, data-parallel 2): every tensor identical.
train     a megatron-core training step (bf16, distributed optimizer, grad_reduce_in_fp32; fp32 on the CPU) at TP=2
          and at PP=2 (megatron's pipeline schedule, 2 microbatches): --steps steps with memmgr's full
          offload/onload after every step against none (run twice: the baseline is deterministic), losses and
          parameters bitwise on every rank.
handover_dp  data-parallel trainers each feeding their engine, under torchrun --nproc-per-node 4 on 2 GPUs (alone):
          ranks 0-1 are trainers on GPUs 0-1 (data parallel, the default group), ranks 2-3 their engines, the engine
          of trainer i on GPU (i + 1) % 2; both pairs export and sync at once, each engine checks its weights
          against the trainer's digests; per-pair GB/s against a same-run broadcast on the pair's group.

Writes DIR/multi_gpu.rankR.json after every section (rank 0's carries the run's metadata), DIR/ledger.rankR.jsonl
(comms) and prints one line per check (PASS/FAIL) and per measurement.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

import lab

log = logging.getLogger("multi_gpu")
GB = 1e9
MiB = float(1 << 20)
SECTIONS = ("comms", "handover", "export", "train", "handover_dp")
ALIASES = {"d": "comms", "c": "handover", "a": "export", "b": "train"}

# Llama shapes for the handover (HF names, megatron sizes); "tiny" runs on the CPU
SHAPES = {
    "tiny": dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn=96, vocab=128),
    "1.3b": dict(layers=24, hidden=2048, heads=16, kv_heads=16, ffn=5504, vocab=32000),
    "4b": dict(layers=36, hidden=3072, heads=24, kv_heads=8, ffn=8192, vocab=32000),  # 3.8 B parameters
}

# export cases: name -> (family, layers, parallel sizes, virtual pipeline stages)
EXPORT_CASES = {
    "tp2": ("qwen2", 2, dict(tp=2), None),
    "pp2-vpp2": ("llama", 4, dict(pp=2), 2),
    "ep2": ("qwen3_moe", 2, dict(ep=2), None),
}


# ---------------------------------------------------------------------------------------------------------------------
# set-up
# ---------------------------------------------------------------------------------------------------------------------
class Run:
    """This process's place in the job and where it writes."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rank, self.world, self.local_rank = lab.world()
        self.cpu = args.cpu
        # handover_dp: ranks 0..1 are data-parallel trainers on GPUs 0..1, ranks 2..3 their engines, the engine of
        # trainer i on GPU (i + 1) % 2 (reverse placement); only the trainers form the default group
        self.dp_pairs = args.section_list == ["handover_dp"]
        self.role = ("trainer" if self.rank < self.world // 2 else "engine") if self.dp_pairs else "rank"
        gpu = self.local_rank
        if self.dp_pairs:
            half = self.world // 2
            gpu = self.rank if self.rank < half else (self.rank - half + 1) % half
        if self.cpu:
            self.device = torch.device("cpu")
            backend = "gloo"
            torch.set_num_threads(1)
        else:
            gpu %= torch.cuda.device_count()
            torch.cuda.set_device(gpu)
            self.device = torch.device("cuda", gpu)
            backend = "nccl"
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29561")
        timeout = datetime.timedelta(seconds=args.collective_timeout)
        self.ports: list[int] = []
        if self.dp_pairs:
            # free ports for the trainers' store and each pair's sync group, picked by rank 0 and handed out
            # through torchrun's own store (MASTER_ADDR:MASTER_PORT)
            agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=timeout)
            if self.rank == 0:
                agent.set("multi_gpu/ports", ",".join(str(lab.free_port()) for _ in range(1 + self.world // 2)))
            self.ports = [int(x) for x in agent.get("multi_gpu/ports").decode().split(",")]
        if not self.dp_pairs:
            dist.init_process_group(backend, rank=self.rank, world_size=self.world, timeout=timeout)
        elif self.role == "trainer":
            # a store of the trainers' own (torchrun's agent store counts all 4 processes)
            store = dist.TCPStore(os.environ["MASTER_ADDR"], self.ports[0], self.world // 2, self.rank == 0,
                                  timeout=timeout)
            dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world // 2,
                                    timeout=timeout)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {}
        # the handover's trainer and engine dtype: bf16 on GPUs, fp32 on the CPU unless --bf16
        self.handover_dtype = torch.bfloat16 if (args.bf16 or not self.cpu) else torch.float32

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def all_true(self, flag: bool) -> bool:
        """True on every rank iff ``flag`` is true on every rank."""
        t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def write(self) -> None:
        data = {"rank": self.rank, "world_size": self.world, "results": self.results}
        if self.rank == 0:
            data["metadata"] = lab.metadata()
        lab.write_json(self.out / f"multi_gpu.rank{self.rank}.json", data)

    def say(self, msg: str, all_ranks: bool = False) -> None:
        if all_ranks or self.rank == 0:
            print(f"[rank {self.rank}] {msg}" if all_ranks else msg, flush=True)


@contextlib.contextmanager
def megatron_context(run: Run) -> Iterator[None]:
    """megatron-core on the CPU through memmgr.tools.megatron_cpu_shim (--cpu), else as it is. megatron-core reads
    ``moe_utils.te_general_gemm`` without TransformerEngine installed in some versions: set to None if absent."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if run.cpu:
        from memmgr.tools.megatron_models import megatron_on_cpu

        # megatron-core 0.19 asks for the current CUDA stream in its gradient sync (to wait for CUDA-graph events):
        # on a CPU-only build a stream with nothing to wait for stands in
        saved = torch.cuda.current_stream
        torch.cuda.current_stream = lambda *a, **k: _NoStream()
        try:
            with megatron_on_cpu():
                yield
        finally:
            torch.cuda.current_stream = saved
        return
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    yield


class _NoStream:
    """The CPU dry run's stand-in for a CUDA stream: every ordering call is a no-op (the CPU runs in order)."""

    def wait_event(self, *args: Any) -> None:
        return None

    def wait_stream(self, *args: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None


def init_parallel(run: Run, tp: int = 1, pp: int = 1, ep: int = 1, vpp: int | None = None) -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=vpp, expert_model_parallel_size=ep)
    if not run.cpu:
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(1234)


def destroy_parallel() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


def release_memory(run: Run) -> None:
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()


def section(run: Run, name: str, fn: Callable[[], dict]) -> None:
    t0 = time.perf_counter()
    try:
        run.results[name] = fn()
    except Exception as exc:  # noqa: BLE001 - recorded, the next section still runs
        run.results[name] = {"pass": False, "error": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc()}
        print(f"[rank {run.rank}] ERROR in {name}: {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc()
    run.results[name]["seconds"] = round(time.perf_counter() - t0, 2)
    run.write()
    release_memory(run)


# ---------------------------------------------------------------------------------------------------------------------
# comms: NCCL communicators released and restored
# ---------------------------------------------------------------------------------------------------------------------
def _exercise(run: Run, group: Any, nbytes: int) -> None:
    """A few collectives that make the communicator set up its connections (and so its buffers)."""
    n = max(1, nbytes // 4)
    t = torch.ones(n, device=run.device)
    dist.all_reduce(t, group=group)
    outs = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(outs, t, group=group)
    dist.broadcast(t, group_src=0, group=group)
    run.sync()


def _collectives_correct(run: Run, group: Any) -> bool:
    size = dist.get_world_size(group)
    me = dist.get_rank(group)
    t = torch.full((1024,), float(me + 1), device=run.device)
    dist.all_reduce(t, group=group)
    ok = bool(torch.all(t == size * (size + 1) / 2).item())
    outs = [torch.empty(16, device=run.device) for _ in range(size)]
    dist.all_gather(outs, torch.full((16,), float(me), device=run.device), group=group)
    ok &= all(bool(torch.all(o == r).item()) for r, o in enumerate(outs))
    return ok


def section_comms(run: Run) -> dict:
    from memmgr import MemoryManager
    from memmgr.comms import NcclCommunicators, group_backend, has_native_suspend, process_gpu_bytes, versions
    from memmgr.host_memory import HostMemoryPool
    from memmgr.ledger import Ledger, gpu_categories

    args = run.args
    res: dict[str, Any] = {"versions": versions()}
    ranks = list(range(run.world))
    names = ["tp", "pp", "dp"]
    holder: dict[str, Any] = {}
    usage: dict[str, Any] = {}
    usage["start"] = process_gpu_bytes(run.device)[0]
    for name in names:
        before = process_gpu_bytes(run.device)[0]
        holder[name] = dist.new_group(ranks)
        _exercise(run, holder[name], args.comms_mb * 2**20)
        after = process_gpu_bytes(run.device)[0]
        usage[f"after init {name}"] = after
        if before is not None and after is not None:
            usage[f"init growth {name}"] = after - before
    backend = group_backend(holder["tp"], run.device)
    res["backend_type"] = type(backend).__name__ if backend is not None else None
    res["backend_has_suspend_method"] = callable(getattr(backend, "suspend", None))
    res["native_suspend"] = has_native_suspend(backend)

    comms = NcclCommunicators("nccl", device=run.device, measure=True)
    methods = {}
    for name in names:
        methods[name] = comms.register(name, holder[name], create=lambda: dist.new_group(ranks),
                                       rebind=lambda g, n=name: holder.__setitem__(n, g))
    res["methods"] = methods
    mgr = MemoryManager(pool=HostMemoryPool())
    mgr.add_group("nccl", comms)
    ledger = Ledger(run.out / "ledger.jsonl", rank=run.rank)
    ledger.attach(mgr, "comms")
    cycles = []
    all_ok = True
    for cycle in range(args.cycles):
        release_memory(run)  # PyTorch's cached blocks out of the figures: only the communicators move
        before = process_gpu_bytes(run.device)[0]
        mgr.offload()
        released = process_gpu_bytes(run.device)[0]
        mgr.onload()
        release_memory(run)
        restored = process_gpu_bytes(run.device)[0]
        correct = {name: _collectives_correct(run, holder[name]) for name in names}
        all_ok &= all(correct.values())
        cycles.append({"process_bytes_before": before, "after_offload": released, "after_onload": restored,
                       "freed": None if before is None or released is None else before - released,
                       "restored": None if restored is None or released is None else restored - released,
                       "collectives_correct": correct, "communicators": comms.report()})
        run.say(f"comms cycle {cycle}: process GPU bytes {_mib(before)} -> offload {_mib(released)} -> onload "
                f"{_mib(restored)} MiB; collectives after restore: {'PASS' if all(correct.values()) else 'FAIL'}",
                all_ranks=True)
    res["cycles"] = cycles
    res["usage"] = usage
    res["communicators"] = comms.report()
    for row in comms.report():
        run.say(f"comms {row['name']}: {row['method']}, freed {_mib(row['bytes_freed'])} MiB in "
                f"{_ms(row['release_s'])} ms, restored {_mib(row['bytes_restored'])} MiB in {_ms(row['restore_s'])} "
                f"ms (measured by {row['measured_by']})", all_ranks=True)
    recs = [r for r in ledger.records if r.get("gpus")]
    res["ledger"] = [{"label": r["label"], "categories": (r["gpus"][0].get("categories") or
                                                          gpu_categories(r["gpus"][0]))} for r in recs]
    for r in res["ledger"][-2:]:
        run.say(f"ledger {r['label']!r}: " + ", ".join(f"{k} {_mib(v)} MiB" for k, v in r["categories"].items()))
    try:
        from memmgr.tools.report import format_table

        (run.out / f"ledger_table.rank{run.rank}.txt").write_text(format_table(ledger.records))
    except Exception as exc:  # noqa: BLE001 - the table is a convenience; the records are in the JSONL
        res["ledger_table_error"] = f"{type(exc).__name__}: {exc}"
    ledger.close()
    mgr.close()
    for name in names:
        dist.destroy_process_group(holder[name])
    freed = [c["freed"] for c in cycles if c["freed"] is not None]
    with megatron_context(run):
        try:
            res["megatron"] = comms_megatron(run)
            all_ok &= bool(res["megatron"]["pass"])
        except Exception as exc:  # noqa: BLE001 - the plain groups' results stand
            res["megatron"] = {"pass": False, "error": f"{type(exc).__name__}: {exc}",
                               "traceback": traceback.format_exc()}
            all_ok = False
            print(f"[rank {run.rank}] ERROR comms megatron: {type(exc).__name__}: {exc}", flush=True)
        finally:
            with contextlib.suppress(Exception):
                destroy_parallel()
    res["pass"] = run.all_true(all_ok)
    res["freed_bytes_per_cycle"] = freed
    run.say(f"comms: torch {res['versions']['torch']}, NCCL {res['versions']['nccl']}, backend "
            f"{res['backend_type']} native suspend {res['native_suspend']}; methods {methods}; collectives correct "
            f"after every restore: {'PASS' if res['pass'] else 'FAIL'}")
    return res


# role (memmgr.comms.MEGATRON_GETTERS) -> the parallel_state global its getter returns, where the re-create
# fallback hands the new group (megatron-core 0.12-0.19 names; a missing one is left alone and reported)
MEGATRON_GLOBALS = {
    "tensor": "_TENSOR_MODEL_PARALLEL_GROUP", "pipeline": "_PIPELINE_MODEL_PARALLEL_GROUP",
    "data": "_DATA_PARALLEL_GROUP", "data_context": "_DATA_PARALLEL_GROUP_WITH_CP",
    "context": "_CONTEXT_PARALLEL_GROUP", "model": "_MODEL_PARALLEL_GROUP",
    "tensor_context": "_TENSOR_AND_CONTEXT_PARALLEL_GROUP", "embedding": "_EMBEDDING_GROUP",
    "position_embedding": "_POSITION_EMBEDDING_GROUP", "expert": "_EXPERT_MODEL_PARALLEL_GROUP",
    "expert_tensor": "_EXPERT_TENSOR_PARALLEL_GROUP", "expert_data": "_EXPERT_DATA_PARALLEL_GROUP",
    "expert_tensor_model_pipeline": "_EXPERT_TENSOR_MODEL_PIPELINE_PARALLEL_GROUP",
    "expert_tensor_and_model": "_EXPERT_TENSOR_AND_MODEL_PARALLEL_GROUP",
}


def comms_megatron(run: Run) -> dict:
    """megatron-core's own groups at TP=2 (megatron_process_groups): each communicator set up by a few
    collectives, released and restored once through NcclCommunicators (re-created groups handed back to
    parallel_state's globals), then megatron's getters must return working groups."""
    from megatron.core import parallel_state as ps

    from memmgr.comms import NcclCommunicators
    from memmgr.integrations.megatron import megatron_process_groups

    init_parallel(run, tp=run.world)
    found = megatron_process_groups()
    res: dict[str, Any] = {"roles": {role: dist.get_process_group_ranks(g) for role, g in found.items()}}
    for group in found.values():
        _exercise(run, group, 2**20)
    comms = NcclCommunicators("megatron_nccl", device=run.device, measure=True)
    unbound = []
    for role, group in found.items():
        ranks = dist.get_process_group_ranks(group)
        attr = MEGATRON_GLOBALS.get(role)
        if attr is None or getattr(ps, attr, None) is not group:
            unbound.append(role)

        def rebind(new: Any, attr: str | None = attr) -> None:
            if attr is not None and hasattr(ps, attr):
                setattr(ps, attr, new)

        # only this group's members re-create it (other ranks' groups of the same role have other ranks)
        comms.register(role, group, create=lambda r=ranks: dist.new_group(r, use_local_synchronization=True),
                       rebind=rebind)
    res["not_rebound"] = unbound  # roles whose getter reads another global: the re-created group is not handed back
    release_memory(run)
    comms.offload()
    comms.onload()
    release_memory(run)
    res["communicators"] = comms.report()
    tp_group = ps.get_tensor_model_parallel_group()
    res["tensor_group_is_the_restored_one"] = tp_group is comms.process_group("tensor")
    res["collectives_correct"] = {role: _collectives_correct(run, comms.process_group(role)) for role in found}
    res["pass"] = bool(found) and all(res["collectives_correct"].values()) and \
        res["tensor_group_is_the_restored_one"]
    for row in res["communicators"]:
        run.say(f"comms megatron {row['name']}: {row['method']}, freed {_mib(row['bytes_freed'])} MiB, restored "
                f"{_mib(row['bytes_restored'])} MiB")
    run.say(f"comms megatron groups {sorted(found)}: collectives correct after restore: "
            f"{'PASS' if res['pass'] else 'FAIL'}")
    return res


def _mib(v: int | None) -> str:
    return "?" if v is None else f"{v / MiB:.1f}"


def _ms(v: float | None) -> str:
    return "?" if v is None else f"{v * 1e3:.1f}"


# ---------------------------------------------------------------------------------------------------------------------
# handover: trainer GPU 0 -> engine GPU 1
# ---------------------------------------------------------------------------------------------------------------------
def build_llama_gpt(run: Run, shape: dict) -> Any:
    """A megatron-core GPTModel with Llama's layout (RMSNorm, SwiGLU, RoPE, no biases, untied), bf16 on the GPU
    (fp32 on the CPU), weights filled from seeded generators so that every rank holds the same ones."""
    from memmgr.tools.megatron_models import LLAMA_LAYOUT, gpt_model, transformer_config

    dtype = run.handover_dtype
    cfg = transformer_config(
        num_layers=shape["layers"], hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
        num_query_groups=shape["kv_heads"], kv_channels=shape["hidden"] // shape["heads"],
        ffn_hidden_size=shape["ffn"], bf16=dtype == torch.bfloat16, params_dtype=dtype, pipeline_dtype=dtype,
        use_cpu_initialization=run.cpu, perform_initialization=False, **LLAMA_LAYOUT)
    model = gpt_model(cfg, vocab_size=shape["vocab"], max_sequence_length=256, rope=True)
    # megatron's torch RMSNorm (local spec) is built in fp32 whatever params_dtype says: one dtype, as
    # Float16Module would make it, so that the export matches the bf16 engine
    model.to(device=run.device, dtype=dtype)
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            g = torch.Generator(device=p.device).manual_seed(4321 + i)
            if "norm" in name:
                p.normal_(1.0, 0.1, generator=g)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model


def llama_hf_config(shape: dict) -> Any:
    fields = dict(num_hidden_layers=shape["layers"], hidden_size=shape["hidden"],
                  num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                  head_dim=shape["hidden"] // shape["heads"], intermediate_size=shape["ffn"],
                  vocab_size=shape["vocab"], tie_word_embeddings=False, rms_norm_eps=1e-6)
    try:
        from transformers import LlamaConfig

        return LlamaConfig(**fields)
    except ImportError:  # the export reads only these attributes
        return SimpleNamespace(model_type="llama", **fields)


class NamedParameters(torch.nn.Module):
    """An engine stand-in when transformers is absent: parameters under the given dotted names."""

    def __init__(self, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], device: torch.device):
        super().__init__()
        for name, (shape, dtype) in specs.items():
            *path, leaf = name.split(".")
            mod: torch.nn.Module = self
            for part in path:
                if not hasattr(mod, part):
                    mod.add_module(part, torch.nn.Module())
                mod = getattr(mod, part)
            mod.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device),
                                                            requires_grad=False))


def build_engine(run: Run, hf_cfg: Any, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> tuple[Any, str]:
    dtype = run.handover_dtype
    try:
        from transformers import AutoModelForCausalLM

        with torch.device(run.device):
            try:
                engine = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
            except TypeError:
                engine = AutoModelForCausalLM.from_config(hf_cfg, torch_dtype=dtype)
        engine.eval()
        if next(engine.parameters()).dtype != dtype:  # a transformers that ignored the dtype argument
            engine.to(dtype)
        return engine, f"transformers {type(engine).__name__}"
    except ImportError as exc:
        return NamedParameters(specs, run.device), f"stand-in module with the export's names ({exc})"


def _digests(pairs: list[tuple[str, torch.Tensor]]) -> dict[str, int]:
    from memmgr.tools.bench_methods import checksum

    sums = checksum([t for _, t in pairs])
    return {n: s for (n, _), s in zip(pairs, sums)}


def _timed_broadcast(run: Run, comm: Any, buf: torch.Tensor, repeats: int) -> list[float]:
    """Seconds of one broadcast of ``buf`` from rank 0 of the sync group, each started after an all-reduce (both
    sides ready) and ended when the receiver has it (a second all-reduce), as a sync is."""
    from memmgr.sync.comm import wait_work

    flag = torch.zeros(2, dtype=torch.int64, device=buf.device)
    times = []
    for _ in range(repeats):
        comm.allreduce_max(flag)
        run.sync()
        t0 = time.perf_counter()
        wait_work(comm.broadcast(buf, 0))
        comm.allreduce_max(flag)
        run.sync()
        times.append(time.perf_counter() - t0)
    return times


def handover_one(run: Run, size: str) -> dict:
    from memmgr.sync import ModuleWeightLoader, WeightReceiver, WeightSender, init_sync_group
    from memmgr.sync.comm import Comm
    from memmgr.sync.export import MegatronExporter

    args = run.args
    shape = SHAPES[size]
    res: dict[str, Any] = {"size": size, "shape": shape}
    init_parallel(run)  # TP=1, PP=1: the two ranks are data-parallel replicas of one trainer
    model = build_llama_gpt(run, shape)
    hf_cfg = llama_hf_config(shape)
    run.sync()
    t0 = time.perf_counter()
    exporter = MegatronExporter([model], hf_cfg, receivers=(0, 1), bucket_bytes=args.bucket_mb * 2**20)
    exported = [(n, t.clone()) for bucket in exporter.buckets() for n, t in bucket.named_tensors()]
    run.sync()
    res["export_s"] = time.perf_counter() - t0
    res["tensors"] = len(exported)
    res["bytes"] = nbytes = sum(t.numel() * t.element_size() for _, t in exported)
    res["params"] = sum(t.numel() for _, t in exported)
    del exporter, model
    release_memory(run)
    digests = _digests(exported)
    gathered: list[Any] = [None] * run.world
    dist.all_gather_object(gathered, digests)
    res["replicas_export_identical"] = gathered[0] == gathered[1]

    # the sync group: its own store and NCCL communicator, as an engine process would have
    port = [lab.free_port() if run.rank == 0 else None]
    dist.broadcast_object_list(port, src=0)
    group = init_sync_group(f"tcp://127.0.0.1:{port[0]}", 2, run.rank, backend="gloo" if run.cpu else "nccl",
                            timeout=args.collective_timeout)
    engine_kind = None
    try:
        syncs = []
        if run.rank == 0:
            sender = WeightSender(group, 0, bucket_size_mb=args.bucket_mb)
            weights = dict(exported)
            for _ in range(args.syncs):
                stats = sender.send(weights)
                syncs.append({"seconds": stats.seconds, "bucket_seconds": stats.bucket_seconds,
                              "metadata_sent": stats.metadata_sent, "buckets": stats.buckets,
                              "nbytes": stats.nbytes, "GBps": stats.gbps})
            del weights
        else:
            specs = {n: (tuple(t.shape), t.dtype) for n, t in exported}
            engine, engine_kind = build_engine(run, hf_cfg, specs)
            loader = ModuleWeightLoader(engine, include_buffers=False)
            receiver = WeightReceiver(group, 0, loader)
            for _ in range(args.syncs):
                stats = receiver.receive()
                syncs.append({"seconds": stats.seconds, "bucket_seconds": stats.bucket_seconds,
                              "metadata_sent": stats.metadata_sent, "nbytes": stats.nbytes, "GBps": stats.gbps})
            run.sync()
            params = dict(engine.named_parameters())
            differing = [n for n, t in exported if n not in params or not lab.bits_equal(params[n], t)]
            res["engine"] = engine_kind
            res["engine_params_not_filled"] = loader.missing()[:10]
            res["engine_equals_export"] = not differing
            res["engine_tensors_differing"] = differing[:10]
            del engine, loader, receiver, params
        res["syncs"] = syncs
        release_memory(run)
        # the same-run reference: one broadcast of a buffer of the same size on the same group
        comm = Comm(group)
        buf = torch.empty(nbytes, dtype=torch.uint8, device=run.device)
        times = _timed_broadcast(run, comm, buf, args.syncs)
        del buf
        res["broadcast_s"] = times
        res["broadcast_GBps"] = nbytes / min(times) / GB
    finally:
        group.close()
    steady = [s for s in res["syncs"] if not s["metadata_sent"]] or res["syncs"]
    best = min(steady, key=lambda s: s["seconds"])
    res["sync_GBps"] = nbytes / best["seconds"] / GB
    res["ratio_to_broadcast"] = res["sync_GBps"] / res["broadcast_GBps"] if res["broadcast_GBps"] else None
    ok = bool(res.get("engine_equals_export", True)) and res["replicas_export_identical"] and \
        not res.get("engine_params_not_filled")
    res["pass"] = run.all_true(ok)
    # rank 1's verdict and engine, on rank 0 too
    verdict: list[Any] = [None] * run.world
    dist.all_gather_object(verdict, {k: res.get(k) for k in ("engine", "engine_equals_export",
                                                            "engine_tensors_differing", "engine_params_not_filled")})
    res["engine_side"] = verdict[1]
    run.say(f"handover {size}: {res['params'] / 1e6:.1f} M params, {nbytes / GB:.3f} GB in {len(exported)} tensors; "
            f"engine ({verdict[1].get('engine')}) equals the export bit for bit: "
            f"{'PASS' if res['pass'] else 'FAIL'}; sync {res['sync_GBps']:.1f} GB/s vs broadcast "
            f"{res['broadcast_GBps']:.1f} GB/s on the same group: ratio {res['ratio_to_broadcast']:.2f} "
            f"(target >= 0.8); export {res['export_s']:.2f} s")
    del exported
    destroy_parallel()
    return res


def section_handover(run: Run) -> dict:
    if run.world != 2:
        raise RuntimeError(f"the handover needs exactly 2 ranks (trainer, engine), got {run.world}")
    sizes = ["tiny"] if run.args.tiny else [s.strip() for s in run.args.sizes.split(",") if s.strip()]
    out: dict[str, Any] = {}
    with megatron_context(run):
        for size in sizes:
            out[size] = handover_one(run, size)
            run.results["handover"] = dict(out, pass_all=all(v.get("pass") for v in out.values()))
            run.write()  # a larger size that runs out of time leaves this one written
    return dict(out, **{"pass": all(v.get("pass") for v in out.values())})


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.split(".")[-1])


def section_handover_dp(run: Run) -> dict:
    """Data-parallel trainers each feeding their engine at once: trainer i (GPU i) exports and sends to its engine
    on GPU (i + 1) % 2 over a sync group of their own; both pairs sync at the same time. The trainer leaves its
    export's names, shapes and digests in the sync group's store; the engine checks its weights against them."""
    import json

    from memmgr.sync import ModuleWeightLoader, WeightReceiver, WeightSender, init_sync_group
    from memmgr.sync.comm import Comm
    from memmgr.sync.export import MegatronExporter

    args = run.args
    half = run.world // 2
    if run.world != 4:
        raise RuntimeError(f"handover_dp needs 4 processes (2 trainers, 2 engines), got {run.world}")
    pair = run.rank % half
    size = "tiny" if args.tiny else args.sizes.split(",")[0].strip()
    shape = SHAPES[size]
    hf_cfg = llama_hf_config(shape)
    res: dict[str, Any] = {"role": run.role, "pair": pair, "size": size, "device": str(run.device)}
    port = run.ports[1 + pair]
    group = init_sync_group(f"tcp://{os.environ['MASTER_ADDR']}:{port}", 2, 0 if run.role == "trainer" else 1,
                            backend="gloo" if run.cpu else "nccl", timeout=args.collective_timeout)
    store = group.store
    try:
        if run.role == "trainer":
            with megatron_context(run):
                init_parallel(run)  # data-parallel 2 over the trainers
                model = build_llama_gpt(run, shape)
                exporter = MegatronExporter([model], hf_cfg, receivers=tuple(range(half)),
                                            bucket_bytes=args.bucket_mb * 2**20)
                exported = [(n, t.clone()) for b in exporter.buckets() for n, t in b.named_tensors()]
                del exporter, model
                destroy_parallel()
            release_memory(run)
            nbytes = sum(t.numel() * t.element_size() for _, t in exported)
            store.set("mg/specs", json.dumps([(n, list(t.shape), str(t.dtype)) for n, t in exported]))
            store.set("mg/digests", json.dumps(_digests(exported)))
            sender = WeightSender(group, 0, bucket_size_mb=args.bucket_mb)
            weights = dict(exported)
            syncs = []
            for _ in range(args.syncs):
                dist.barrier()  # both pairs start together
                stats = sender.send(weights)
                syncs.append({"seconds": stats.seconds, "metadata_sent": stats.metadata_sent, "nbytes": stats.nbytes})
            del weights
            verdict = json.loads(store.get("mg/verdict").decode())
            comm = Comm(group)
            dist.barrier()
            buf = torch.empty(nbytes, dtype=torch.uint8, device=run.device)
            times = _timed_broadcast(run, comm, buf, args.syncs)
            del buf
            steady = [x for x in syncs if not x["metadata_sent"]] or syncs
            res.update(bytes=nbytes, syncs=syncs, engine=verdict, broadcast_s=times,
                       sync_GBps=nbytes / min(x["seconds"] for x in steady) / GB,
                       broadcast_GBps=nbytes / min(times) / GB)
            res["ratio_to_broadcast"] = res["sync_GBps"] / res["broadcast_GBps"]
            res["pass"] = bool(verdict.get("equal")) and not verdict.get("not_filled")
            pairs: list[Any] = [None] * half
            dist.all_gather_object(pairs, {k: res[k] for k in ("pair", "pass", "sync_GBps", "broadcast_GBps",
                                                               "ratio_to_broadcast", "bytes")})
            res["pairs"] = pairs
            res["pass"] = all(p["pass"] for p in pairs)
            for p in pairs:
                run.say(f"handover_dp pair {p['pair']} (trainer GPU {p['pair']} -> engine GPU {(p['pair'] + 1) % half}"
                        f", {size}, both pairs at once): engine equals the export bit for bit "
                        f"{'PASS' if p['pass'] else 'FAIL'}; sync {p['sync_GBps']:.1f} GB/s vs broadcast "
                        f"{p['broadcast_GBps']:.1f} GB/s, ratio {p['ratio_to_broadcast']:.2f}")
            del exported
        else:
            specs = {n: (tuple(shp), _dtype(dt)) for n, shp, dt in json.loads(store.get("mg/specs").decode())}
            digests = json.loads(store.get("mg/digests").decode())
            engine, kind = build_engine(run, hf_cfg, specs)
            loader = ModuleWeightLoader(engine, include_buffers=False)
            receiver = WeightReceiver(group, 0, loader)
            for _ in range(args.syncs):
                receiver.receive()
            run.sync()
            params = dict(engine.named_parameters())
            mine = _digests([(n, params[n]) for n in specs if n in params])
            differing = [n for n in specs if mine.get(n) != digests.get(n)]
            verdict = {"engine": kind, "equal": not differing, "differing": differing[:10],
                       "not_filled": loader.missing()[:10]}
            store.set("mg/verdict", json.dumps(verdict))
            res.update(verdict)
            del engine, loader, receiver, params
            comm = Comm(group)
            nbytes = sum(int(torch.Size(shp).numel()) * torch.empty(0, dtype=dt).element_size()
                         for shp, dt in specs.values())
            buf = torch.empty(nbytes, dtype=torch.uint8, device=run.device)
            _timed_broadcast(run, comm, buf, args.syncs)
            del buf
            res["pass"] = verdict["equal"] and not verdict["not_filled"]
    finally:
        group.close()
    return res


# ---------------------------------------------------------------------------------------------------------------------
# export: TP=2, PP=2, EP=2 against TP=1
# ---------------------------------------------------------------------------------------------------------------------
def export_hf_config(family: str, layers: int) -> Any:
    from memmgr.tools import megatron_models as em

    try:
        return em.hf_config(family, layers)
    except ImportError:  # no transformers: the attributes the export reads
        fields = dict(em.FAMILIES[family]["hf"])
        return SimpleNamespace(vocab_size=em.HF_VOCAB, num_hidden_layers=layers, rms_norm_eps=em.RMS_EPS, **fields)


def _export_all(run: Run, chunks: list, family: str, layers: int) -> dict[str, torch.Tensor]:
    from memmgr.sync.export import MegatronExporter

    exporter = MegatronExporter(chunks, export_hf_config(family, layers), bucket_bytes=64 * 1024, receivers=(0,))
    return {n: t.detach().cpu().clone() for bucket in exporter.buckets() for n, t in bucket.named_tensors()}


def export_case(run: Run, name: str) -> dict:
    from memmgr.tools import megatron_models as em

    family, layers, sizes, vpp = EXPORT_CASES[name]
    tp, pp, ep = sizes.get("tp", 1), sizes.get("pp", 1), sizes.get("ep", 1)
    # the TP=1 reference: the whole model on every rank (data-parallel 2), exported to rank 0
    init_parallel(run)
    ref_chunks = em.build_chunks(family, layers)
    em.randomize(ref_chunks, seed=3)
    full = {n: p.detach().clone() for n, p in ref_chunks[0].named_parameters()}
    for c in ref_chunks:
        c.to(run.device)
    reference = _export_all(run, ref_chunks, family, layers)
    del ref_chunks
    # the parallel layout, filled from the same state dict by megatron's own split
    init_parallel(run, tp=tp, pp=pp, ep=ep, vpp=vpp)
    parallel = dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
                    pipeline_dtype=torch.float32)
    chunks = em.build_chunks(family, layers, vpp=vpp, **parallel)
    em.load_full_state(chunks, full)
    for c in chunks:
        c.to(run.device)
    got = _export_all(run, chunks, family, layers)
    del chunks
    destroy_parallel()
    res: dict[str, Any] = {"family": family, "layers": layers, "tp": tp, "pp": pp, "ep": ep, "vpp": vpp}
    if run.rank == 0:
        res["tensors"] = len(reference)
        res["same_names_and_order"] = list(got) == list(reference)
        res["differing"] = [n for n in reference if n not in got or not torch.equal(got[n], reference[n])][:10]
        ok = res["same_names_and_order"] and not res["differing"] and bool(reference)
    else:
        ok = not got  # only rank 0 receives
    res["pass"] = run.all_true(ok)
    run.say(f"export {name} ({family}, TP={tp} PP={pp} EP={ep}{f' VPP={vpp}' if vpp else ''}) equals the TP=1 "
            f"export, {res.get('tensors')} tensors: {'PASS' if res['pass'] else 'FAIL'}")
    return res


def section_export(run: Run) -> dict:
    if run.world != 2:
        raise RuntimeError(f"the export cases are laid out for 2 ranks, got {run.world}")
    out: dict[str, Any] = {}
    with megatron_context(run):
        for name in EXPORT_CASES:
            try:
                out[name] = export_case(run, name)
            except Exception as exc:  # noqa: BLE001 - one layout failing does not hide the others
                out[name] = {"pass": False, "error": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc()}
                print(f"[rank {run.rank}] ERROR export {name}: {type(exc).__name__}: {exc}", flush=True)
                with contextlib.suppress(Exception):
                    destroy_parallel()
    out["pass"] = all(v.get("pass") for v in out.values() if isinstance(v, dict))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# train: offload/onload between steps, bitwise, at TP=2 and PP=2
# ---------------------------------------------------------------------------------------------------------------------
TRAIN_LAYOUTS = {"tp2": dict(tp=2), "pp2": dict(pp=2)}


def build_trainer(run: Run, tp: int, pp: int, shape: dict) -> tuple[Any, Any]:
    from megatron.core import parallel_state as ps

    from memmgr.tools.megatron_models import build_gpt

    return build_gpt(layers=shape["layers"], hidden=shape["hidden"], heads=shape["heads"], vocab=shape["vocab"],
                     seq=shape["seq"], bf16=not run.cpu, cpu_init=True, seed=0, lr=1e-3, device=run.device,
                     tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                     pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())


def pipeline_train_step(run: Run, ddp: Any, opt: Any, batch: tuple[torch.Tensor, torch.Tensor], shape: dict,
                        microbatches: int) -> float | None:
    """One step through megatron's forward/backward schedule (1F1B at PP > 1); the loss on the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    try:
        from megatron.core.distributed import finalize_model_grads
    except ImportError:  # older megatron-core
        finalize_model_grads = None
    tokens, labels = batch
    mbs = tokens.shape[0] // microbatches
    micro = [(tokens[i * mbs:(i + 1) * mbs], labels[i * mbs:(i + 1) * mbs]) for i in range(microbatches)]

    def forward_step(data_iterator: Any, model: Any) -> tuple[torch.Tensor, Callable]:
        tok, lab_ = next(data_iterator)
        pos = torch.arange(tok.shape[1], device=tok.device).unsqueeze(0).expand(tok.shape[0], -1)
        out = model(tok, pos, None, labels=lab_)

        def loss_func(output: torch.Tensor) -> tuple[torch.Tensor, dict]:
            loss = output.float().mean()
            return loss, {"loss": loss.detach()}
        return out, loss_func

    ddp.zero_grad_buffer()
    opt.zero_grad()
    losses = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(micro), model=[ddp],
                                         num_microbatches=microbatches, seq_length=shape["seq"],
                                         micro_batch_size=mbs, forward_only=False)
    if finalize_model_grads is not None:
        finalize_model_grads([ddp])
    else:
        ddp.finish_grad_sync()
    opt.step()
    if losses:
        return float(sum(float(d["loss"]) for d in losses) / len(losses))
    return None


def train_layout(run: Run, name: str) -> dict:
    from memmgr.host_memory import HostMemoryPool
    from memmgr.integrations.megatron import for_megatron

    args = run.args
    sizes = TRAIN_LAYOUTS[name]
    tp, pp = sizes.get("tp", 1), sizes.get("pp", 1)
    shape = dict(layers=2, hidden=64, heads=4, vocab=128, seq=16, batch=4) if run.args.tiny else \
        dict(layers=4, hidden=256, heads=8, vocab=1024, seq=64, batch=8)
    g = torch.Generator().manual_seed(7)
    data = [(torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=g).to(run.device),
             torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=g).to(run.device))
            for _ in range(args.steps)]
    microbatches = 2 if pp > 1 else 1
    runs = []
    for offload in (False, False, True):
        init_parallel(run, tp=tp, pp=pp)
        ddp, opt = build_trainer(run, tp, pp, shape)
        pool = HostMemoryPool()
        mgr = for_megatron(ddp, opt, pool=pool) if offload else None
        losses, zero_after_offload = [], True
        for batch in data:
            losses.append(pipeline_train_step(run, ddp, opt, batch, shape, microbatches))
            if mgr is not None:
                mgr.offload()
                zero_after_offload &= all(s.device_bytes == 0 for s in mgr.state.values())
                mgr.onload()
        params = {n: lab.bits(p).cpu().clone() for n, p in ddp.named_parameters()}
        runs.append((losses, params, zero_after_offload))
        if mgr is not None:
            mgr.close()
        pool.trim()
        del ddp, opt, mgr
        destroy_parallel()
        release_memory(run)

    def same(a: tuple, b: tuple) -> bool:
        return a[0] == b[0] and list(a[1]) == list(b[1]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])

    local_ok = same(runs[0], runs[2]) and runs[2][2]
    res = {"tp": tp, "pp": pp, "steps": args.steps, "microbatches": microbatches, "shape": shape,
           "baseline_deterministic": run.all_true(same(runs[0], runs[1])),
           "all_groups_zero_after_offload": run.all_true(runs[2][2]),
           "losses_ref": runs[0][0], "losses_offload": runs[2][0],
           "params_differing": [k for k in runs[0][1] if not torch.equal(runs[0][1][k], runs[2][1][k])][:10]}
    res["pass"] = run.all_true(local_ok)
    gathered: list[Any] = [None] * run.world
    dist.all_gather_object(gathered, runs[2][0])
    res["losses_last_stage"] = next((ls for ls in reversed(gathered) if ls and ls[0] is not None), None)
    run.say(f"train {name} (TP={tp} PP={pp}, {args.steps} steps, offload+onload after each): bitwise equal to no "
            f"offload on every rank: {'PASS' if res['pass'] else 'FAIL'} (baseline deterministic: "
            f"{res['baseline_deterministic']}; losses {res['losses_last_stage']})")
    return res


def section_train(run: Run) -> dict:
    if run.world != 2:
        raise RuntimeError(f"the training layouts are laid out for 2 ranks, got {run.world}")
    out: dict[str, Any] = {}
    if not run.cpu:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with megatron_context(run):
            for name in TRAIN_LAYOUTS:
                try:
                    out[name] = train_layout(run, name)
                except Exception as exc:  # noqa: BLE001
                    out[name] = {"pass": False, "error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc()}
                    print(f"[rank {run.rank}] ERROR train {name}: {type(exc).__name__}: {exc}", flush=True)
                    with contextlib.suppress(Exception):
                        destroy_parallel()
    finally:
        torch.use_deterministic_algorithms(False)
    out["pass"] = all(v.get("pass") for v in out.values() if isinstance(v, dict))
    return out


# ---------------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated, run in this order: {', '.join(SECTIONS)} (or the issue's letters d, c, "
                         f"a, b)")
    ap.add_argument("--cpu", action="store_true",
                    help="gloo on the CPU (megatron through memmgr.tools.megatron_cpu_shim)")
    ap.add_argument("--tiny", action="store_true", help="tiny models (the CPU dry run)")
    ap.add_argument("--bf16", action="store_true", help="bf16 handover models on the CPU too (as on GPUs)")
    ap.add_argument("--sizes", default="1.3b", help="handover model sizes, comma-separated: 1.3b, 4b (default 1.3b)")
    ap.add_argument("--bucket-mb", type=int, default=256, help="sync and export bucket size in MiB (default 256)")
    ap.add_argument("--syncs", type=int, default=3, help="handover syncs (the first carries the metadata)")
    ap.add_argument("--cycles", type=int, default=2, help="comms release/restore cycles")
    ap.add_argument("--comms-mb", type=int, default=64, help="bytes of the collectives that set up each group, MiB")
    ap.add_argument("--steps", type=int, default=3, help="training steps per run in the train section")
    ap.add_argument("--collective-timeout", type=float, default=180.0, help="seconds before a collective fails")
    args = ap.parse_args(argv)
    names = [ALIASES.get(s.strip(), s.strip()) for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    args.section_list = names
    if "handover_dp" in names and names != ["handover_dp"]:
        ap.error("handover_dp runs alone (4 processes: 2 trainers, 2 engines)")
    if args.tiny:
        args.bucket_mb = min(args.bucket_mb, 1)
        args.comms_mb = min(args.comms_mb, 1)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("memmgr").setLevel(logging.WARNING)
    lab.megatron_env()
    run = Run(args)
    run.say(f"multi_gpu: {run.world} ranks on {run.device.type} ({', '.join(lab.device_names()) or 'cpu'}), "
            f"sections {args.section_list}")
    fns = {"comms": section_comms, "handover": section_handover, "export": section_export, "train": section_train,
           "handover_dp": section_handover_dp}
    for name in args.section_list:
        section(run, name, lambda fn=fns[name]: fn(run))
    ok = all(run.results[n].get("pass") for n in args.section_list)
    run.say("multi_gpu: " + ", ".join(f"{n} {'PASS' if run.results[n].get('pass') else 'FAIL'}"
                                      for n in args.section_list))
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier()
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
