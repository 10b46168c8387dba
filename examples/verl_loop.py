"""An RL loop that feeds a rollout worker through verl's checkpoint-engine interface with memmgr's backend, the
trainer's offload and onload done by memmgr; checked against transformers and against the same loop without memmgr.

The trainer is a tiny random Llama (transformers, fp32) with AdamW under ``memmgr.for_module``, moved the way verl's
workers move a trainer engine (``engine.to("cpu")`` before rollout, ``engine.to("cuda")`` before training) by
``memmgr.integrations.verl.VerlOffload``, which brings the state back to where it was (the CPU in a CPU run). The
rollout worker runs in a process of its own with a transformers model of other random weights; both sides build their
checkpoint engine as verl does (``custom_backend_module: memmgr.integrations.verl``, ``backend: memmgr``,
``engine_kwargs: {memmgr: {transport: gloo}}``), and each weight update runs verl's ``CheckpointEngineManager``
choreography (prepare, ``build_topology``, ``init_process_group``, ``send_weights`` / ``receive_weights``, ``finalize``;
``memmgr.tools.verl_rollout.update_weights``).

Each iteration: the trainer goes to the CPU (weights and optimizer state to host memory, gradients dropped), only its
weights come back for the sync (``VerlOffload.per_tensor_params``) and leave again, the rollout generates greedy
completions, which must equal transformers' greedy generation with the trainer's weights; then the trainer comes back
and takes a policy-gradient step. Half-way through, a checkpoint is saved and a fresh model and optimizer resume from
it under a new manager. The same loop then runs without memmgr (same rollout process, seeds, data and resume); the
final weights and optimizer state must be equal, tensor by tensor. Exit status 0 and one summary line when they are.

    python examples/verl_loop.py [--device cpu|cuda] [--iterations 3]

Needs verl's checkpoint engines (``pip install verl``; see the weight-sync guide for a ``--no-deps`` install beside
vLLM) and transformers. Weights travel over gloo; ``--device`` places the trainer.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.nn.functional as F

import memmgr
from loop_checks import add_loop_arguments, check_loop_arguments, check_same_training, fail

PROMPT_LEN, PROMPTS = 5, 3


def prompts_for(iteration: int) -> list[list[int]]:
    from memmgr.tools.verl_rollout import VOCAB

    g = torch.Generator().manual_seed(1000 + iteration)
    return [[1] + torch.randint(4, VOCAB, (PROMPT_LEN - 1,), generator=g).tolist() for _ in range(PROMPTS)]


def build(device: torch.device, seed: int):
    from memmgr.tools.verl_rollout import tiny_llama

    model = tiny_llama(seed).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


def train_step(model, opt, prompts: list[list[int]], completions: list[list[int]]) -> float:
    """REINFORCE on the rollout's completions; the reward is the share of even token ids a completion holds."""
    tokens = torch.tensor([p + c for p, c in zip(prompts, completions)], device=model.device)
    generated = tokens[:, PROMPT_LEN:]
    reward = (generated % 2 == 0).float().mean(1)
    advantage = reward - reward.mean()
    logits = model(tokens[:, :-1]).logits[:, PROMPT_LEN - 1:]
    logp = -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), generated.reshape(-1),
                            reduction="none").view(len(prompts), -1)
    loss = -(advantage.unsqueeze(1) * logp).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def run_loop(args, trainer_engine, rollout, use_memmgr: bool, workdir: str) -> dict:
    from memmgr.integrations.verl import VerlOffload
    from memmgr.tools.verl_rollout import greedy, update_weights

    device = torch.device(args.device)
    model, opt = build(device, seed=0)
    offload = VerlOffload(memmgr.for_module(model, opt, include_buffers=False)) if use_memmgr else None
    resume_at = args.iterations // 2
    losses, before = [], rollout.call("generate", prompts=prompts_for(0))
    for it in range(args.iterations):
        if it == resume_at:  # checkpoint, then resume from it in a fresh model and optimizer (new manager)
            path = os.path.join(workdir, "checkpoint.pt")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
            if offload is not None:
                offload.manager.close()
            model, opt = build(device, seed=1)  # other initial weights: the load must replace them
            ckpt = torch.load(path, map_location=device, weights_only=True)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            if use_memmgr:
                offload = VerlOffload(memmgr.for_module(model, opt, include_buffers=False))

        prompts = prompts_for(it)
        if offload is not None:
            offload.to("cpu")  # what verl's worker does before rollout: engine.to("cpu")
            still_on = [n for n, s in offload.manager.state.items() if s.device_bytes]
            if still_on:
                fail(f"iteration {it}: after to('cpu') groups {still_on} still hold device memory")
            weights = offload.per_tensor_params()  # only the weights come back, for the sync only
        else:
            weights = model.named_parameters()
        metrics, taken = update_weights(trainer_engine, [rollout], weights, global_steps=it)
        if taken != [len(list(model.parameters()))] or metrics.get("memmgr/sync_tensors") != taken[0]:
            fail(f"iteration {it}: the rollout took {taken} tensors, the trainer sent {metrics}")
        completions = rollout.call("generate", prompts=prompts)
        if offload is not None:
            offload.to("cuda")  # before training verl calls engine.to(get_device_name()): back where it was
        expected = greedy(model, prompts)  # the trainer's weights on transformers
        if completions != expected:
            fail(f"iteration {it}: the rollout generated {completions} after the sync, transformers with the "
                 f"trainer's weights {expected}")
        if it == 0 and completions == before:
            fail("the rollout generated the same before the first sync as after it: the check could not tell")
        losses.append(train_step(model, opt, prompts, completions))
    if offload is not None:
        offload.manager.close()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_loop_arguments(parser, iterations=3)
    args = parser.parse_args()
    check_loop_arguments(parser, args)
    try:
        from verl.checkpoint_engine import CheckpointEngineRegistry
        from verl.utils.import_utils import import_external_libs
    except ImportError as exc:
        fail(f"verl's checkpoint engines do not import ({exc}); pip install verl (docs/guides/weight-sync.md)")
    from memmgr.tools.verl_rollout import RolloutProcess

    # as verl builds it on the trainer (actor rank 0): the backend module imported, then the registry's engine
    import_external_libs("memmgr.integrations.verl")
    kwargs = {"transport": "gloo", "master_address": "127.0.0.1", "timeout_s": 120.0}
    trainer_engine = CheckpointEngineRegistry.new("memmgr", is_master=True, bucket_size=1 << 16, **kwargs)
    rollout = RolloutProcess(bucket_size=1 << 16, engine_kwargs=kwargs)
    try:
        with tempfile.TemporaryDirectory() as work:
            os.makedirs(os.path.join(work, "memmgr"))
            os.makedirs(os.path.join(work, "plain"))
            managed = run_loop(args, trainer_engine, rollout, use_memmgr=True, workdir=os.path.join(work, "memmgr"))
            plain = run_loop(args, trainer_engine, rollout, use_memmgr=False, workdir=os.path.join(work, "plain"))
    finally:
        rollout.close()
    check_same_training(managed, plain)
    print(f"OK verl_loop: {args.iterations} iterations on {args.device} (trainer) through verl's checkpoint-engine "
          f"interface ({rollout.engine_name}, gloo), resumed at iteration {args.iterations // 2}: the rollout's greedy "
          f"generation equal to transformers' after every sync; weights and optimizer state identical to the loop "
          f"without memmgr (final loss {managed['losses'][-1]:.6f})")


if __name__ == "__main__":
    main()
