"""An RL loop over a megatron-core GPT with memmgr, checked bit for bit against the same loop without memmgr.

The trainer is a tiny Llama-shaped megatron-core GPT (TP=1, one rank; gloo on the CPU, NCCL on a GPU) wrapped in
megatron-core DDP, bf16 weights with fp32 main weights and Adam moments, under megatron's DistributedOptimizer or
Float16OptimizerWithFloat16Params. The engine is the transformers model of the same family (LlamaForCausalLM) in this
process.

Each iteration: ``with mgr.phase("generate")`` (weights, grads, main weights and Adam moments leave the device)
``sync_weights(mgr, exporter, engine)`` exports the trainer's weights to Hugging Face names from memmgr's host copy
(the trainer's weights stay off the device) into the engine, and the engine samples rollouts; then the trainer takes
a policy-gradient step on them. After each phase the engine's logits are compared with the trainer's. Half-way
through, a ``dist_checkpointing`` checkpoint (model and optimizer) is saved, the manager is closed, and a fresh model
and optimizer resume from the checkpoint under a new manager.

The same loop then runs again without memmgr (same seeds, data and resume); the final weights, main weights and
optimizer state must be equal, tensor by tensor (``torch.equal``). Exit status 0 and one summary line when they are,
1 and the differences otherwise.

    python examples/megatron_loop.py [--device cpu|cuda] [--iterations 10] [--optimizer distributed|float16]

On the CPU, megatron-core's few CUDA-only calls are redirected by memmgr.tools.megatron_cpu_shim (a GPU run needs
nothing of it).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import warnings

import torch

import memmgr
from loop_checks import add_loop_arguments, check_addresses_kept, check_loop_arguments, fail
from memmgr.sync import ModuleWeightLoader
from memmgr.sync.export import MegatronExporter
from memmgr.sync.session import sync_weights

HF_VOCAB, MEGATRON_VOCAB, PROMPT_LEN, NEW_TOKENS, BATCH = 120, 128, 4, 8, 4
SEQ = PROMPT_LEN + NEW_TOKENS
# megatron-core 0.16's distributed optimizer saves only with an explicit sharding type
CKPT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def hf_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=HF_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                       rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=False,
                       attention_dropout=0.0)


def build_trainer(device: torch.device, optimizer: str, seed: int):
    """(ddp, optimizer): a Llama-shaped GPT that matches hf_config() numerically, wrapped in megatron DDP."""
    from memmgr.tools.megatron_models import LLAMA_LAYOUT, ddp_and_optimizer, gpt_model, transformer_config

    dtype = torch.bfloat16  # bf16 weights; both optimizers keep fp32 main weights and moments
    torch.manual_seed(seed)
    cfg = transformer_config(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                             num_query_groups=2, kv_channels=16, layernorm_epsilon=1e-6, use_cpu_initialization=True,
                             bf16=True, params_dtype=dtype, pipeline_dtype=dtype, **LLAMA_LAYOUT)
    model = gpt_model(cfg, vocab_size=MEGATRON_VOCAB, max_sequence_length=64, rope=True).to(device)
    return ddp_and_optimizer(cfg, model, lr=1e-3, distributed_optimizer=optimizer == "distributed",
                             grad_reduce_in_fp32=False)


def build_engine(device: torch.device, dtype: torch.dtype):
    """The inference side: the transformers model of the trainer's family, with its own random weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(12345)
    return LlamaForCausalLM(hf_config()).to(device=device, dtype=dtype).eval()


@torch.no_grad()
def generate(engine, prompts: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator(device=prompts.device).manual_seed(seed)
    tokens = prompts
    for _ in range(NEW_TOKENS):
        probs = torch.softmax(engine(tokens).logits[:, -1].float(), -1)
        tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=g)], 1)
    return tokens


def positions(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def train_step(ddp, opt, rollouts: torch.Tensor) -> float:
    """REINFORCE on the generated tokens; the reward is the share of even token ids a rollout generated."""
    inputs, labels = rollouts[:, :-1], rollouts[:, 1:]
    generated = rollouts[:, PROMPT_LEN:]
    reward = (generated % 2 == 0).float().mean(1)
    advantage = reward - reward.mean()
    token_loss = ddp(inputs, positions(inputs), None, labels=labels).float()  # [batch, seq - 1]
    weights = torch.zeros_like(token_loss)
    weights[:, PROMPT_LEN - 1:] = advantage.unsqueeze(1)
    loss = (weights * token_loss).mean()
    loss.backward()
    ddp.finish_grad_sync()
    ok, _, _ = opt.step()
    if not ok:
        fail("the optimizer skipped a step")
    ddp.zero_grad_buffer()
    opt.zero_grad()
    return loss.item()


def save_checkpoint(ddp, opt, path: str) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    os.makedirs(path)
    msd = unwrap_model(ddp).sharded_state_dict()
    dist_checkpointing.save({"model": msd, "optimizer": opt.sharded_state_dict(msd, metadata=CKPT_METADATA)}, path)


def load_checkpoint(ddp, opt, path: str) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    for inner in opt.chained_optimizers:  # a fresh optimizer has no Adam state to load into yet: create it
        if not inner.optimizer.state and inner.init_state_fn is not None:
            inner.init_state_fn(inner.optimizer, inner.config)
            for state in inner.optimizer.state.values():
                state.setdefault("step", torch.tensor(0.0))
    msd = unwrap_model(ddp).sharded_state_dict()
    loaded = dist_checkpointing.load(
        {"model": msd, "optimizer": opt.sharded_state_dict(msd, is_loading=True, metadata=CKPT_METADATA)}, path)
    unwrap_model(ddp).load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optimizer"])


def training_state(ddp, opt) -> dict[str, torch.Tensor]:
    """Every tensor of the trainer: the model's parameters, and per inner optimizer its (main) parameters and state."""
    state = {f"model.{n}": p.detach() for n, p in ddp.named_parameters()}
    for k, inner in enumerate(opt.chained_optimizers):
        for g, group in enumerate(inner.optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                state[f"optimizer{k}.group{g}.param{i}"] = p.detach()
                for key, value in inner.optimizer.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor):
                        state[f"optimizer{k}.group{g}.param{i}.{key}"] = value
    return {n: t.clone() for n, t in state.items()}


def check_engine(ddp, engine, iteration: int) -> float:
    """The engine's logits against the trainer's on the same tokens (bf16 on both sides, different kernels: equal up
    to rounding; an engine with other weights misses by far more); returns the largest difference."""
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, HF_VOCAB, (2, SEQ), generator=g).to(engine.device)
    with torch.no_grad():
        trainer = ddp(tokens, positions(tokens), None)[..., :HF_VOCAB].float()
        served = engine(tokens).logits.float()
    diff = (trainer - served).abs().max().item()
    tolerance = 0.02 + 0.02 * trainer.abs().max().item()
    if not diff <= tolerance:
        fail(f"iteration {iteration}: the engine's logits differ from the trainer's by {diff:.3g} (> {tolerance}); "
             f"the weight sync did not give the engine the trainer's weights")
    return diff


def run_loop(args: argparse.Namespace, use_memmgr: bool, workdir: str) -> dict:
    device = torch.device(args.device)
    ddp, opt = build_trainer(device, args.optimizer, seed=0)
    engine = build_engine(device, torch.bfloat16)
    load_weights = ModuleWeightLoader(engine, include_buffers=False)  # HF names, bit for bit, nothing cast
    syncs: list[str] = []
    mgr = exporter = None

    def new_manager():
        # built BEFORE the first training step: Adam's moments, created by the first step, join at the next phase
        m = memmgr.for_megatron([ddp], opt, same_address=args.same_address)
        m.register_hook("after_weight_sync", lambda event, groups: syncs.append(event))
        return m, MegatronExporter([ddp], hf_config(), weights=m.group("weights"))

    if use_memmgr:
        mgr, exporter = new_manager()
    resume_at = args.iterations // 2
    losses, logit_diffs, sources = [], [], set()
    for it in range(args.iterations):
        if it == resume_at:  # checkpoint, then resume from it in a fresh model and optimizer under a new manager
            path = os.path.join(workdir, f"checkpoint-{it}")
            save_checkpoint(ddp, opt, path)
            if mgr is not None:
                mgr.close()
            ddp, opt = build_trainer(device, args.optimizer, seed=1)  # other initial weights: the load replaces them
            load_checkpoint(ddp, opt, path)
            if use_memmgr:
                mgr, exporter = new_manager()

        addresses = [p.data_ptr() for p in ddp.parameters()]
        with mgr.phase("generate") if mgr is not None else contextlib.nullcontext():
            if mgr is not None:
                still_on = [n for n, s in mgr.state.items() if s.device_bytes]
                if still_on:
                    fail(f"iteration {it}: inside the generate phase, groups {still_on} still hold device memory")
                result = sync_weights(mgr, exporter, load_weights)  # read from the host copy, nothing onloaded
                sources.add(result.source)
            else:
                for bucket in MegatronExporter([ddp], hf_config()).buckets():
                    load_weights(bucket.named_tensors())
            rollouts = generate(engine, prompts_for(it, device), seed=it)
        if args.same_address and mgr is not None:
            check_addresses_kept(addresses, [p.data_ptr() for p in ddp.parameters()], it)
        logit_diffs.append(check_engine(ddp, engine, it))
        losses.append(train_step(ddp, opt, rollouts))

    result = {"state": training_state(ddp, opt), "losses": losses, "logit_diff": max(logit_diffs),
              "sources": sources}
    if mgr is not None:
        if len(syncs) != args.iterations:
            fail(f"the after_weight_sync hook ran {len(syncs)} times in {args.iterations} syncs")
        mgr.close()
    return result


def prompts_for(iteration: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + iteration)
    return torch.randint(0, HF_VOCAB, (BATCH, PROMPT_LEN), generator=g).to(device)


@contextlib.contextmanager
def megatron_world(device: torch.device, workdir: str):
    """One rank, TP=PP=1: gloo on the CPU (with memmgr.tools.megatron_cpu_shim), NCCL on a GPU."""
    from megatron.core import parallel_state

    if device.type == "cpu":
        from memmgr.tools.megatron_cpu_shim import cpu_megatron

        shim = cpu_megatron()
    else:
        torch.cuda.set_device(0)
        shim = contextlib.nullcontext()
    with shim:
        torch.distributed.init_process_group("gloo" if device.type == "cpu" else "nccl",
                                             init_method=f"file://{workdir}/init", rank=0, world_size=1)
        try:
            parallel_state.initialize_model_parallel(1, 1)
            if device.type == "cuda":  # megatron's CUDA RNG tracker (forked around attention)
                from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

                model_parallel_cuda_manual_seed(0)
            yield
        finally:
            parallel_state.destroy_model_parallel()
            torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_loop_arguments(parser, iterations=10, same_address=True)
    parser.add_argument("--optimizer", choices=["distributed", "float16"], default="distributed")
    parser.add_argument("--corrupt", action="store_true",
                        help="flip one bit of the memmgr run's final optimizer state before the comparison, to see "
                             "the check fail (exit status 1)")
    args = parser.parse_args()
    check_loop_arguments(parser, args)
    for noise in (".*Transformer Engine and Apex.*", "Apex is not installed.*", "full scope is deprecated.*"):
        warnings.filterwarnings("ignore", message=noise)  # megatron-core without TransformerEngine and Apex
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as work, megatron_world(device, work):
        os.makedirs(os.path.join(work, "memmgr"))
        os.makedirs(os.path.join(work, "plain"))
        managed = run_loop(args, use_memmgr=True, workdir=os.path.join(work, "memmgr"))
        plain = run_loop(args, use_memmgr=False, workdir=os.path.join(work, "plain"))

    if args.corrupt:
        name = next(n for n in managed["state"] if n.endswith("exp_avg_sq"))
        managed["state"][name].view(-1)[0:1].view(torch.int32).bitwise_xor_(1)
    a, b = managed["state"], plain["state"]
    if a.keys() != b.keys():
        fail(f"the trainers hold different tensors: {sorted(a.keys() ^ b.keys())[:10]}")
    differ = [n for n in a if not (a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]))]
    if differ:
        fail(f"with memmgr {len(differ)} of {len(a)} weight and optimizer tensors differ from the run without it: "
             f"{differ[:10]}")
    if managed["losses"] != plain["losses"]:
        fail(f"the losses differ: with memmgr {managed['losses']}, without {plain['losses']}")
    if managed["sources"] != {"host copy"}:
        fail(f"the weight syncs read the weights from {sorted(managed['sources'])}, not memmgr's host copy alone")
    print(f"OK megatron_loop: {args.iterations} iterations on {args.device} with the {args.optimizer} optimizer, "
          f"resumed at iteration {args.iterations // 2}: {len(a)} weight, main-weight and optimizer tensors identical "
          f"to the loop without memmgr (final loss {managed['losses'][-1]:.6f}); engine logits within "
          f"{managed['logit_diff']:.2g} of the trainer's"
          f"{', every parameter at its address' if args.same_address else ''}")


if __name__ == "__main__":
    main()
