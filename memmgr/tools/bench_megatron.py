"""``memmgr bench`` on a real megatron-core GPT: memmgr, megatron-core's built-in helpers and per-tensor copies.

Used by ``memmgr bench`` when megatron-core is installed and a GPU is present. The model is the 1.3B GPT of the
project's reference measurements (24 layers, hidden 2048, 16 heads, ffn 8192, vocab 32000, seq 128, local layer
spec, bf16, distributed optimizer, grad_reduce_in_fp32, torch Adam), with fewer layers where the GPU's free memory is
short, after one training step. Every method moves the same bytes: the bf16 param buffers, the fp32 main-weight
shards and the Adam moments go to the host and come back; the grad buffers are dropped and re-zeroed.
"""
from __future__ import annotations

import gc
import logging
import os
from typing import Any

import torch

from memmgr.tools.bench_methods import (MemmgrMethod, Method, PerTensorMethod, TrainingState, memmgr_cycles,
                                        run_under_conditions)
from memmgr.tools.megatron_models import build_gpt

logger = logging.getLogger("memmgr")

GPT_1_3B = dict(layers=24, hidden=2048, heads=16, ffn=8192, vocab=32000, seq=128)
GPT_4B = dict(layers=36, hidden=3072, heads=24, ffn=10240, vocab=32000, seq=128)  # 3.7B: ~52 GB moved each way
GPT_PRESETS = {"1.3b": GPT_1_3B, "4b": GPT_4B}
# Training-state bytes per parameter: 2 bf16 weight + 4 fp32 grad + 4 fp32 main weight + 8 Adam moments; activations
# of one micro-batch of 2 x 128 tokens are small beside these.
_STATE_BYTES_PER_PARAM = 18


def _layer_params(model: dict) -> float:
    """Parameters of one transformer layer (fused qkv, projection, fc1, fc2; norms and biases are negligible)."""
    return 4 * model["hidden"] ** 2 + 2 * model["hidden"] * model["ffn"]


def _fixed_params(model: dict) -> float:
    """The embedding, shared with the output layer."""
    return model["vocab"] * model["hidden"]


def unavailable_reason() -> str | None:
    """Why the Megatron workload cannot run here, or None."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    try:
        import megatron.core  # noqa: F401
        from megatron.core.models.gpt import GPTModel  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - an old or broken install is a reason too
        return f"megatron-core not importable ({type(exc).__name__}: {exc})"
    return None


def layers_that_fit(free_bytes: int, model: dict = GPT_1_3B, fraction: float = 0.4) -> int:
    """Layers of ``model`` (at most its own) whose training state takes at most ``fraction`` of the free memory."""
    per_layer = _layer_params(model) * _STATE_BYTES_PER_PARAM
    fixed = _fixed_params(model) * _STATE_BYTES_PER_PARAM
    return max(1, min(model["layers"], int((fraction * free_bytes - fixed) / per_layer)))


def init_single_process() -> None:
    """A one-process NCCL group and model-parallel state, unless the caller already made them."""
    from megatron.core import parallel_state, tensor_parallel

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29561")
        torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)


def train_step(ddp: Any, opt: Any, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    ddp.zero_grad_buffer()
    opt.zero_grad()
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand(tokens.shape[0], -1)
    loss = ddp(tokens, positions, None, labels=labels).float().mean()
    loss.backward()
    ddp.finish_grad_sync()
    opt.step()
    return float(loss.detach())


def _inner_optimizers(opt: Any) -> list:
    return list(getattr(opt, "chained_optimizers", None) or [opt])


class MegatronState(TrainingState):
    """The tensors of a megatron DDP model and its optimizer, read from megatron's own objects at every access
    (megatron's built-in helpers rebind some of them)."""

    def __init__(self, ddp: Any, opt: Any):
        self.ddp, self.opt = ddp, opt

    def buffers(self) -> list:
        return list(self.ddp.buffers) + list(getattr(self.ddp, "expert_parallel_buffers", []) or [])

    @property
    def weights(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {f"buffer{i}.param_data": b.param_data for i, b in enumerate(self.buffers())
                if b.param_data is not None}

    @property
    def grads(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {f"buffer{i}.grad_data": b.grad_data for i, b in enumerate(self.buffers()) if b.grad_data is not None}

    @property
    def main_weights(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        out = {}
        for k, o in enumerate(_inner_optimizers(self.opt)):
            for g, group in enumerate(getattr(o, "shard_fp32_from_float16_groups", None) or []):
                out.update({f"opt{k}.main{g}.{i}": p for i, p in enumerate(group) if p is not None})
        return out

    @property
    def moments(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """Optimizer state tensors on the training device (Adam's step counter, one element, stays)."""
        device = next(self.ddp.parameters()).device
        out = {}
        for k, o in enumerate(_inner_optimizers(self.opt)):
            for i, state in enumerate(o.optimizer.state.values()):
                out.update({f"opt{k}.state{i}.{name}": v for name, v in state.items()
                            if isinstance(v, torch.Tensor) and v.device == device and v.numel() > 1})
        return out


class MegatronMemmgrMethod(MemmgrMethod):
    name = "memmgr"
    description = "memmgr.for_megatron: DDP buffers adopted, main weights and Adam moments coalesced, pinned ahead"

    def build_manager(self, state: MegatronState, pool, **manager_options):
        from memmgr.integrations.megatron import for_megatron

        return for_megatron(state.ddp, state.opt, pool=pool, **manager_options)


class MegatronBuiltinMethod(Method):
    name = "megatron_builtin"
    description = ("megatron-core's own helpers: DDP.offload_grad_buffers, _ParamAndGradBuffer.offload_to_cpu, "
                   "MegatronOptimizer.offload_to_cpu")

    def __init__(self, state: MegatronState):
        self.state = state

    def available(self) -> str | None:
        ddp, opt = self.state.ddp, self.state.opt
        buffers = self.state.buffers()
        missing = [name for name, ok in (
            ("DDP.offload_grad_buffers/restore_grad_buffers",
             hasattr(ddp, "offload_grad_buffers") and hasattr(ddp, "restore_grad_buffers")),
            ("_ParamAndGradBuffer.offload_to_cpu/reload_from_cpu",
             all(hasattr(b, "offload_to_cpu") and hasattr(b, "reload_from_cpu") for b in buffers)),
            ("MegatronOptimizer.offload_to_cpu/restore_from_cpu",
             hasattr(opt, "offload_to_cpu") and hasattr(opt, "restore_from_cpu"))) if not ok]
        return f"this megatron-core has no {', '.join(missing)} (added in 0.16)" if missing else None

    def offload(self, state):
        state.ddp.offload_grad_buffers()
        for b in state.buffers():
            b.offload_to_cpu(move_params=True, move_grads=False)
        state.opt.offload_to_cpu()
        torch.cuda.empty_cache()

    def onload(self, state):
        state.ddp.restore_grad_buffers()
        for b in state.buffers():
            b.reload_from_cpu(move_params=True, move_grads=False)
        state.opt.restore_from_cpu()


def run_megatron_workload(peak: dict, cycles: int, methods: list[str] | None = None,
                          progress: Any = None, phase_gap_s: float = 0.0,
                          conditions: dict[str, Any] | None = None, gpt: str = "1.3b") -> dict:
    """Builds the GPT (``gpt``: a key of ``GPT_PRESETS``), takes one step, and times each method on it under each
    condition (name -> the ``between`` step of ``run_method``, None for the plain pause). Returns {"model",
    "description", "loss_step1", "state_bytes", "by_condition": {name: [MethodResult.summary(...)]}, "results": the
    first condition's}."""
    from memmgr.tools.bench_methods import process_gpu_bytes

    device = torch.device("cuda", torch.cuda.current_device())
    created_group = not torch.distributed.is_initialized()
    init_single_process()
    torch.cuda.empty_cache()
    baseline = (process_gpu_bytes(device), torch.cuda.memory_reserved(device))
    free = torch.cuda.mem_get_info(device)[0]
    # the 1.3B leaves room for the peers' own buffers; the 4B is for memmgr alone (--methods memmgr)
    preset = GPT_PRESETS[gpt]
    model = dict(preset, layers=layers_that_fit(free, preset, 0.4 if gpt == "1.3b" else 0.65))
    logger.info("Megatron workload: GPT %s", model)
    ddp, opt = build_gpt(**model)
    batch = 2
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model["vocab"], (batch, model["seq"]), generator=gen).to(device)
    labels = torch.randint(0, model["vocab"], (batch, model["seq"]), generator=gen).to(device)
    out: dict[str, Any] = {"model": model, "description": describe(model),
                           "loss_step1": train_step(ddp, opt, tokens, labels)}
    del tokens, labels
    state = MegatronState(ddp, opt)
    out["state_bytes"] = {"weights": sum(_nbytes(t) for t in state.weights.values()),
                          "main_weights": sum(_nbytes(t) for t in state.main_weights.values()),
                          "optimizer_states": sum(_nbytes(t) for t in state.moments.values()),
                          "grad_buffers_dropped": state.dropped_bytes}
    # The per-tensor peers run before memmgr coalesces the main weights and moments into buckets (they would then
    # move views of shared storages); the built-ins run last because they rebind tensors.
    candidates: list[Method] = [PerTensorMethod(pinned_cache=True), PerTensorMethod(pinned_cache=False),
                                MegatronMemmgrMethod(), MegatronBuiltinMethod(state)]
    conditions = conditions or {"pause": None}
    by_condition: dict[str, list] = {name: [] for name in conditions}
    for method in candidates:
        if methods is not None and method.name not in methods:
            continue
        if progress is not None:
            progress.set_postfix_str(method.name)
            progress.update(1)
        n = memmgr_cycles(cycles) if isinstance(method, MegatronMemmgrMethod) else cycles
        run_under_conditions(method, conditions, by_condition, peak, n, copied_bytes=0, device=device,
                             make=lambda: state, baseline=baseline, phase_gap_s=phase_gap_s)
    out["by_condition"] = by_condition
    out["results"] = next(iter(by_condition.values()))
    state = ddp = opt = candidates = method = None
    gc.collect()  # megatron's modules hold reference cycles
    torch.cuda.empty_cache()
    if created_group:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def describe(model: dict) -> str:
    params = model["layers"] * _layer_params(model) + _fixed_params(model)
    return (f"megatron-core GPT, ~{params / 1e9:.2f}B parameters ({model['layers']} layers, hidden {model['hidden']}), "
            "bf16, distributed optimizer, grad_reduce_in_fp32, after one training step")
