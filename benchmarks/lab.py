"""What the benchmark and probe programs under benchmarks/ share: toy models, timing, the pinned-copy peak, the
transformers engine in a second process that the CUDA IPC sync programs feed (``IpcEngineProcess``, also used by
the IPC transport's GPU tests), the megatron-core set-up of one process per GPU, megatron-core models laid out like
a Hugging Face config, cleanup, and JSON output with the run's metadata.

Not a program and not part of the package: the programs import it as ``import lab`` (they run as
``python benchmarks/X.py``, which puts benchmarks/ on the path); importing it puts the repository root on the path
too, so ``import memmgr`` finds this checkout. Importing it needs no GPU; CUDA is touched only when a function is
called.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from memmgr.tools import bench_methods as _bench  # noqa: E402

GB = 1e9
GiB = 1 << 30
MiB = 1 << 20


# ---------------------------------------------------------------------------------------------------------------------
# toy transformer models
# ---------------------------------------------------------------------------------------------------------------------
class MHABlock(torch.nn.Module):
    """Pre-norm block on torch.nn.MultiheadAttention (ln1, attn, ln2, mlp); ``causal`` adds an upper-triangular
    mask built at every forward."""

    def __init__(self, hidden: int, heads: int, causal: bool = False):
        super().__init__()
        self.causal = causal
        self.ln1 = torch.nn.LayerNorm(hidden)
        self.attn = torch.nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.ln2 = torch.nn.LayerNorm(hidden)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(hidden, 4 * hidden), torch.nn.GELU(),
                                       torch.nn.Linear(4 * hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        mask = None
        if self.causal:
            n = x.shape[1]
            mask = torch.triu(torch.ones(n, n, dtype=torch.bool, device=x.device), 1)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class SDPABlock(torch.nn.Module):
    """Pre-norm causal block on scaled_dot_product_attention (ln1, qkv, proj, ln2, fc1, fc2)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = torch.nn.LayerNorm(hidden)
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.proj = torch.nn.Linear(hidden, hidden)
        self.ln2 = torch.nn.LayerNorm(hidden)
        self.fc1 = torch.nn.Linear(hidden, 4 * hidden)
        self.fc2 = torch.nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, h))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ToyGPT(torch.nn.Module):
    """A decoder-only toy transformer with random weights: token embedding, optional learned positions
    (``max_seq``), ``layers`` blocks, optional final LayerNorm, untied head without bias.

    ``block``: "mha" (MHABlock; ``causal`` picks the mask) or "sdpa" (SDPABlock, always causal). Parameters are
    registered in the order embed, pos, blocks, ln_f, head, so a given configuration always gives the same buckets.
    """

    def __init__(self, vocab: int = 32000, hidden: int = 2048, layers: int = 20, heads: int = 16, *,
                 block: str = "mha", causal: bool = False, final_norm: bool = True, max_seq: int | None = None):
        super().__init__()
        if block not in ("mha", "sdpa"):
            raise ValueError(f"block must be 'mha' or 'sdpa', got {block!r}")
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.pos = torch.nn.Embedding(max_seq, hidden) if max_seq else None
        self.blocks = torch.nn.ModuleList(
            (MHABlock(hidden, heads, causal) if block == "mha" else SDPABlock(hidden, heads)) for _ in range(layers))
        self.ln_f = torch.nn.LayerNorm(hidden) if final_norm else None
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        if self.pos is not None:
            x = x + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x) if self.ln_f is not None else x)


# ---------------------------------------------------------------------------------------------------------------------
# timing and the link's peak
# ---------------------------------------------------------------------------------------------------------------------
def default_device() -> torch.device:
    """The current CUDA device, or the CPU where there is none."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sync(device: torch.device | None = None) -> None:
    """Waits for the GPU (the current device unless ``device``); nothing on the CPU."""
    device = device or default_device()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | None = None) -> float:
    """Wall seconds of ``fn()`` with the device synchronized before and after (memmgr bench's timer,
    memmgr.tools.bench_methods.timed)."""
    return _bench.timed(fn, device or default_device())


def cuda_timed(fn: Callable[[], Any], stream: torch.cuda.Stream | None = None) -> float:
    """GPU seconds of the work ``fn`` issues on ``stream`` (the current stream unless given), between two CUDA
    events recorded around it; waits for the end event."""
    stream = stream or torch.cuda.current_stream()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        start.record(stream)
        fn()
        end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def pinned_peak(device: torch.device | None = None, nbytes: int = 2 * GiB, repeats: int = 10) -> dict[str, Any]:
    """The pinned-copy peak of the link in GB/s, best of ``repeats`` each way and both ways at once
    (memmgr.tools.measure.measure_pinned_peak through memmgr.tools.bench_methods.pinned_peak, as memmgr bench
    measures it): ``{"d2h", "h2d", "both", ...}``."""
    return _bench.pinned_peak(device or default_device(), nbytes=nbytes, repeats=repeats)


def checksum(tensors: list[torch.Tensor]) -> list[int]:
    """One integer per tensor from its raw bytes (memmgr bench's checksum): equal lists, same contents."""
    return _bench.checksum(tensors)


def process_gpu_bytes(device: torch.device) -> int | None:
    """This process's GPU memory as NVML sees it (the device-wide figure where NVML cannot say; None on the CPU)."""
    return _bench.process_gpu_bytes(device)


def device_used_bytes(cuda_index: int = 0) -> int | None:
    """NVML's used memory of the whole device (all processes), or None where NVML cannot say."""
    from memmgr import nvml

    index = nvml.nvml_index(cuda_index)
    mem = nvml.device_memory(index) if index is not None else None
    return mem.used if mem is not None else None


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes (compare with torch.equal for a bitwise check)."""
    return t.detach().reshape(-1).view(torch.uint8)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bytes."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def gpu_program_start(program: str) -> tuple[torch.device, dict[str, Any]]:
    """What a single-GPU lab program does first: exits saying it needs a GPU where there is none, else measures the
    pinned-copy peak on cuda:0 and prints it (the line ``run.py``'s summaries pick up); returns the device and peak."""
    if not torch.cuda.is_available():
        sys.exit(f"{program} needs a GPU")
    device = torch.device("cuda", 0)
    peak = pinned_peak(device)
    print(f"peak: d2h {peak['d2h']:.1f} GB/s, h2d {peak['h2d']:.1f} GB/s", flush=True)
    return device, peak


def after_condition(engine: Any, condition: str) -> float:
    """Gives this process's cache back, then stands in for the phase between two moves: ``engine`` (an
    ``EngineStandIn``) takes all free memory and releases it, or ("pause") 0.5 s pass. Returns when that ended
    (``time.perf_counter()``)."""
    torch.cuda.empty_cache()
    if condition == "engine":
        engine.cycle()
    else:
        time.sleep(0.5)
    return time.perf_counter()


def written_blocks(count: int, nbytes: int, device: torch.device, value: int) -> tuple[list[torch.Tensor], float]:
    """``count`` fresh device blocks of ``nbytes`` each, written with ``value`` and settled 0.5 s; returns them and the
    seconds their allocation took (synchronized)."""
    t0 = time.perf_counter()
    blocks = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(count)]
    torch.cuda.synchronize(device)
    alloc_s = time.perf_counter() - t0
    for b in blocks:
        b.fill_(value)
    torch.cuda.synchronize(device)
    time.sleep(0.5)
    return blocks, alloc_s


def cleanup(*pools: Any) -> None:
    """Collects garbage, waits for the GPU, gives cached device memory back and trims the given host pools."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    for p in pools:
        p.trim()


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------------
# a transformers engine fed through CUDA IPC (the IPC sync programs and the GPU tests of the IPC transport)
# ---------------------------------------------------------------------------------------------------------------------
def named_checksums(named: Any) -> dict[str, tuple[int, int]]:
    """Per (name, tensor) pair, two integer sums over the tensor's raw bits (plain and position-weighted): equal bits
    give equal sums, and the weighted sum catches permuted data."""
    out = {}
    for name, t in named:
        flat = t.detach().contiguous().reshape(-1)
        raw = flat.view(torch.int16 if flat.element_size() == 2 else torch.int32).to(torch.int64)
        pos = torch.arange(1, raw.numel() + 1, device=raw.device, dtype=torch.int64) % 65521
        out[name] = (int(raw.sum()), int((raw * pos).sum()))
    return out


def start_seeing(proc: Any, visible_devices: str | None) -> None:
    """Starts ``proc`` (spawned) with ``CUDA_VISIBLE_DEVICES`` set to ``visible_devices`` (None: as this process has
    it): the child reads it when it starts, so it is set only around ``start``."""
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices
    try:
        proc.start()
    finally:
        if visible_devices is not None:
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved


def _ipc_engine_main(config: Any, dtype: torch.dtype, device_index: int, descs: Any, acks: Any,
                     results: Any) -> None:
    """The engine process of ``IpcEngineProcess``: builds the model, then serves announced buckets and reports."""
    from transformers import AutoModelForCausalLM

    from memmgr.sync import ModuleWeightLoader
    from memmgr.sync.transports.ipc import CudaIpcReceiver

    device = torch.device("cuda", device_index)
    torch.cuda.set_device(device)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    loader = ModuleWeightLoader(model)
    receiver = CudaIpcReceiver(device)
    vllm = None
    acks.put(("ready", torch.cuda.memory_allocated(device)))
    while True:
        msg = descs.get()
        if msg is None:
            break
        if isinstance(msg, tuple) and msg[0] == "report":
            prompt = torch.tensor([msg[1]], device=device)
            with torch.no_grad():
                logits = model(prompt).logits.float().cpu()
            results.put({"checksums": named_checksums(model.state_dict().items()), "logits": logits,
                         "missing": loader.missing()})
            continue
        if isinstance(msg, tuple) and msg[0] == "vllm":  # vLLM's own IPC engine (benchmarks/vllm_ipc_receiver.py)
            try:
                if vllm is None:
                    from vllm_ipc_receiver import Receiver

                    vllm = Receiver(model, device)
                vllm.handle(msg[1], msg[2])
                acks.put(("ok", None))
            except Exception as exc:  # noqa: BLE001 - reported to the trainer like an RPC error
                acks.put(("error", f"{type(exc).__name__}: {exc}"))
            continue
        try:
            # one engine step: load the announced bucket (or begin/commit/abort a sync), rolling back on failure
            receiver.handle(msg, loader)
            acks.put(("ok", msg.get("slot") if isinstance(msg, dict) else None))
        except Exception as exc:  # noqa: BLE001 - reported to the producer like an RPC error
            acks.put(("error", f"{type(exc).__name__}: {exc}"))
    receiver.close()
    if vllm is not None:
        vllm.close()


class IpcEngineProcess:
    """A transformers "engine" in a second (spawned) process on the trainer's GPU, fed through memmgr's CUDA IPC
    transport: it builds ``AutoModelForCausalLM.from_config(config)`` on its GPU, then for each announced bucket maps
    the ring slot (``CudaIpcReceiver``), copies the views into its parameters (``ModuleWeightLoader``: names and
    shapes checked, nothing cast), synchronizes and answers. ``announce`` is the control channel a
    ``CudaIpcTransport`` takes; ``report(prompt)`` returns the engine's ``named_checksums`` of its state, its logits
    on ``prompt`` and the tensors no sync loaded (``missing``)."""

    def __init__(self, config: Any, dtype: torch.dtype = torch.bfloat16, device_index: int = 0,
                 visible_devices: str | None = None, timeout_s: float = 600.0):
        ctx = mp.get_context("spawn")
        self.descs, self.acks, self.results = ctx.Queue(), ctx.Queue(), ctx.Queue()
        self.timeout_s = timeout_s
        self.proc = ctx.Process(target=_ipc_engine_main,
                                args=(config, dtype, device_index, self.descs, self.acks, self.results), daemon=True)
        start_seeing(self.proc, visible_devices)
        status, self.model_bytes = self.acks.get(timeout=timeout_s)
        if status != "ready":
            raise RuntimeError(f"the IPC engine did not start: {status}")

    def announce(self, description: dict[str, Any]) -> None:
        self.descs.put(description)
        status, detail = self.acks.get(timeout=self.timeout_s)
        if status != "ok":
            raise RuntimeError(f"engine: {detail}")

    def report(self, prompt: list[int]) -> dict[str, Any]:
        self.descs.put(("report", list(prompt)))
        return self.results.get(timeout=self.timeout_s)

    def stop(self) -> None:
        self.descs.put(None)
        self.proc.join(60)


# ---------------------------------------------------------------------------------------------------------------------
# megatron-core, one process per GPU (every rank data parallel)
# ---------------------------------------------------------------------------------------------------------------------
def megatron_env() -> None:
    """Defaults the Megatron programs run under: deterministic cuBLAS (bitwise equivalence) and a local rendezvous.
    Call before the first cuBLAS call of the process."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29555")


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when started as a plain script."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def init_megatron() -> dict:
    """An NCCL group over every process (one per GPU), tensor and pipeline parallel size 1, seeded; returns the
    versions and device this process runs on."""
    from megatron.core import parallel_state, tensor_parallel

    import memmgr

    megatron_env()
    rank, world_size, local_rank = world()
    torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group("nccl", rank=rank, world_size=world_size)
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    import megatron.core

    return {"megatron_core": getattr(megatron.core, "__version__", "?"), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(), "rank": rank, "data_parallel_size": world_size,
            "memmgr_backend": memmgr.backend_info().describe()}


def init_megatron_one_process(device: torch.device) -> dict:
    """One process, tensor and pipeline parallel size 1: NCCL through ``init_megatron`` on a GPU, a gloo group of one
    on the CPU (megatron-core itself then runs through memmgr.tools.megatron_cpu_shim, which the caller enters)."""
    if device.type == "cuda":
        return init_megatron()
    from megatron.core import parallel_state

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    return {"torch": torch.__version__, "device": "cpu"}


def build_megatron_gpt(*, cpu_init: bool = True, **model: Any) -> tuple[Any, Any]:
    """memmgr.tools.megatron_models.build_gpt (DDP with grad_reduce_in_fp32, megatron Adam), initialized on the CPU
    by default so that every run starts from the same weights."""
    from memmgr.tools.megatron_models import build_gpt

    return build_gpt(cpu_init=cpu_init, **model)


def megatron_train_step(ddp: Any, opt: Any, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    """One step (zero_grad_buffer, forward, backward, finish_grad_sync, optimizer.step); returns the loss."""
    from memmgr.tools.bench_megatron import train_step

    return train_step(ddp, opt, tokens, labels)


def token_batches(n: int, batch: int, seq: int, vocab: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` (tokens, labels) pairs on the current GPU; each data-parallel rank draws its own samples."""
    g = torch.Generator().manual_seed(seed + 1000 * world()[0])
    return [(torch.randint(0, vocab, (batch, seq), generator=g).cuda(),
             torch.randint(0, vocab, (batch, seq), generator=g).cuda()) for _ in range(n)]


def positions(tokens: torch.Tensor) -> torch.Tensor:
    """Position ids 0..seq-1 for every row of ``tokens``."""
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand(tokens.shape[0], -1)


# ---------------------------------------------------------------------------------------------------------------------
# results: JSON with the run's metadata
# ---------------------------------------------------------------------------------------------------------------------
def git_commit() -> str | None:
    """The code's commit: $MEMMGR_GIT_COMMIT (set by benchmarks/run.py --commit on a machine whose copy of the
    tree has no .git), else ``git rev-parse HEAD`` with ``+dirty`` when tracked files differ, else None."""
    if os.environ.get("MEMMGR_GIT_COMMIT"):
        return os.environ["MEMMGR_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def source_digest() -> str:
    """SHA-256 (first 16 hex digits) over the paths and bytes of memmgr/, csrc/ and benchmarks/*.py: names the
    code that ran even where the tree has no .git; the same function over a checkout gives the same value."""
    h = hashlib.sha256()
    files = [p for d in ("memmgr", "csrc") for p in (ROOT / d).rglob("*")
             if p.is_file() and p.suffix in (".py", ".cpp", ".cu", ".h")]
    files += list((ROOT / "benchmarks").glob("*.py"))
    for p in sorted(files):
        h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def device_names() -> list[str]:
    """Names of the visible CUDA devices (empty on the CPU)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def metadata(argv: list[str] | None = None) -> dict[str, Any]:
    """Date (UTC), devices, software versions, the command line and the code's commit, for a results file."""
    import memmgr

    argv = sys.argv if argv is None else argv
    names = device_names()
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "device": names[0] if names else "cpu", "devices": names,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "memmgr": getattr(memmgr, "__version__", None), "backend": memmgr.backend_info().describe(),
        "python": sys.version.split()[0], "host": socket.gethostname(),
        "command": " ".join(shlex.quote(a) for a in ["python", *argv]),
        "git_commit": git_commit(), "source_digest": source_digest(),
    }
    try:  # from the installed metadata: importing megatron-core here could change what the program measures
        from importlib.metadata import version

        meta["megatron_core"] = version("megatron-core")
    except Exception:  # noqa: BLE001 - not installed: not recorded
        pass
    return meta


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    """Writes ``data`` as JSON (non-JSON values through str), atomically: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent, default=str))
    tmp.replace(path)
    return path
