"""An RL loop over a plain PyTorch policy with memmgr, checked bit for bit against the same loop without memmgr.

Each iteration: ``with mgr.phase("generate")`` (the trainer's weights, gradients and optimizer state leave the
device) the trainer's weights are synced into an in-process "engine" (a second copy of the policy, as a hybrid
engine holds one) through ``mgr.weight_sync()``, and the engine generates rollouts; then the trainer takes a
policy-gradient step on them (the trainer is back on the device, bit for bit). Half-way through, a checkpoint
(``torch.save`` of the model's and the optimizer's state dicts) is saved, the manager is closed and a fresh model and
optimizer resume from the checkpoint under a new manager. A ``memmgr.ledger.Ledger`` records memory at every phase
change, and ``memmgr report`` renders it at the end.

The same loop then runs again without memmgr (same seeds, same data, same resume); the final weights and the whole
optimizer state must be equal, tensor by tensor (``torch.equal``). Exit status 0 and one summary line when they are,
1 and the differences otherwise.

    python examples/plain_torch_loop.py [--device cpu|cuda] [--iterations 10] [--optimizer adam|adamw|sgd]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

import memmgr
from loop_checks import add_loop_arguments, check_addresses_kept, check_loop_arguments, check_same_training, fail
from memmgr.ledger import Ledger
from memmgr.sync import ModuleWeightLoader

VOCAB, HIDDEN, PROMPT_LEN, NEW_TOKENS, BATCH = 64, 64, 4, 6, 8


class Policy(torch.nn.Module):
    """A tiny causal language model: embeddings, two residual MLP blocks, a tied output head, and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.pos = torch.nn.Parameter(0.02 * torch.randn(PROMPT_LEN + NEW_TOKENS, HIDDEN))
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(HIDDEN), torch.nn.Linear(HIDDEN, 2 * HIDDEN), torch.nn.GELU(),
                                torch.nn.Linear(2 * HIDDEN, HIDDEN)) for _ in range(2))
        self.norm = torch.nn.LayerNorm(HIDDEN)
        self.register_buffer("temperature", torch.tensor(1.0))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # causal by construction: each position sees the running mean of the embeddings up to it
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        x = x.cumsum(1) / torch.arange(1, tokens.shape[1] + 1, device=tokens.device).unsqueeze(-1)
        for block in self.blocks:
            x = x + block(x)
        return self.norm(x) @ self.embed.weight.t() / self.temperature


class Engine:
    """The inference side: a copy of the policy plus a "KV cache" it frees while its weights are updated."""

    def __init__(self, device: torch.device) -> None:
        torch.manual_seed(12345)  # its own random init: only weight syncs make it the trainer's
        self.model = Policy().to(device).eval()
        self.load_weights = ModuleWeightLoader(self.model)  # name -> tensor, copied bit for bit
        self.kv_cache: torch.Tensor | None = None
        self.wake_kv_cache()

    def release_kv_cache(self, *_: object) -> None:
        self.kv_cache = None

    def wake_kv_cache(self, *_: object) -> None:
        self.kv_cache = torch.zeros(BATCH, PROMPT_LEN + NEW_TOKENS, HIDDEN, device=self.model.embed.weight.device)

    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, seed: int) -> torch.Tensor:
        """Sampled continuations (a seeded generator, so that both runs draw the same samples)."""
        assert self.kv_cache is not None, "generate with the KV cache released"
        g = torch.Generator(device=prompts.device).manual_seed(seed)
        tokens = prompts
        for _ in range(NEW_TOKENS):
            probs = torch.softmax(self.model(tokens)[:, -1].float(), -1)
            tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=g)], 1)
        return tokens


def build(device: torch.device, optimizer: str, seed: int) -> tuple[Policy, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Policy().to(device)
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt


def prompts_for(iteration: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + iteration)
    return torch.randint(0, VOCAB, (BATCH, PROMPT_LEN), generator=g).to(device)


def train_step(model: Policy, opt: torch.optim.Optimizer, rollouts: torch.Tensor) -> float:
    """REINFORCE on the generated tokens; the reward is the share of even token ids a rollout generated."""
    generated = rollouts[:, PROMPT_LEN:]
    reward = (generated % 2 == 0).float().mean(1)
    advantage = reward - reward.mean()
    logits = model(rollouts[:, :-1])[:, PROMPT_LEN - 1:]
    logp = -F.cross_entropy(logits.reshape(-1, VOCAB), generated.reshape(-1), reduction="none").view(BATCH, -1)
    loss = -(advantage.unsqueeze(1) * logp).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def run_loop(args: argparse.Namespace, use_memmgr: bool, workdir: str) -> dict:
    device = torch.device(args.device)
    model, opt = build(device, args.optimizer, seed=0)
    engine = Engine(device)
    ledger = Ledger(os.path.join(workdir, "ledger.jsonl")) if use_memmgr else None
    syncs: list[str] = []
    mgr = None

    def new_manager():
        # built BEFORE the first training step (the optimizer state created by the first step joins at the next
        # phase); the hooks free the engine's KV cache while its weights are updated
        m = memmgr.for_module(model, opt, same_address=args.same_address)
        m.register_hook("before_weight_sync", engine.release_kv_cache)
        m.register_hook("after_weight_sync", engine.wake_kv_cache)
        m.register_hook("after_weight_sync", lambda event, groups: syncs.append(event))
        ledger.attach(m, "trainer")
        return m

    if use_memmgr:
        mgr = new_manager()
    resume_at = args.iterations // 2
    losses = []
    for it in range(args.iterations):
        if it == resume_at:  # checkpoint, then resume from it in a fresh model and optimizer under a new manager
            path = os.path.join(workdir, "checkpoint.pt")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
            if mgr is not None:
                mgr.close()
            model, opt = build(device, args.optimizer, seed=1)  # other initial weights: the load must replace them
            ckpt = torch.load(path, map_location=device, weights_only=True)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            if use_memmgr:
                mgr = new_manager()

        addresses = [p.data_ptr() for p in model.parameters()]
        with mgr.phase("generate") if mgr is not None else contextlib.nullcontext():
            if mgr is not None:
                still_on = [n for n, s in mgr.state.items() if s.device_bytes]
                if still_on:
                    fail(f"iteration {it}: inside the generate phase, groups {still_on} still hold device memory")
                with mgr.weight_sync() as weights:  # only the weights come back, name -> tensor
                    engine.load_weights(weights.items())
                    check_engine_matches(engine, weights, it)
            else:
                engine.release_kv_cache()
                weights = dict(model.named_parameters()) | dict(model.named_buffers())
                engine.load_weights(weights.items())
                check_engine_matches(engine, weights, it)
                engine.wake_kv_cache()
            rollouts = engine.generate(prompts_for(it, device), seed=it)
        if args.same_address and mgr is not None:
            check_addresses_kept(addresses, [p.data_ptr() for p in model.parameters()], it)
        losses.append(train_step(model, opt, rollouts))

    result = {"model": model.state_dict(), "optimizer": opt.state_dict(), "losses": losses}
    if mgr is not None:
        if len(syncs) != args.iterations:
            fail(f"the after_weight_sync hook ran {len(syncs)} times in {args.iterations} syncs")
        mgr.close()
        result["ledger_records"] = len(ledger.records)
    return result


def check_engine_matches(engine: Engine, weights, iteration: int) -> None:
    held = dict(engine.model.named_parameters()) | dict(engine.model.named_buffers())
    differ = [n for n, t in weights.items() if not torch.equal(held[n], t)]
    if differ or held.keys() != weights.keys():
        fail(f"iteration {iteration}: after the weight sync the engine's weights differ from the trainer's: "
             f"{differ or sorted(held.keys() ^ weights.keys())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_loop_arguments(parser, iterations=10, same_address=True)
    parser.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], default="adam")
    parser.add_argument("--corrupt", action="store_true",
                        help="flip one bit of the memmgr run's final optimizer state before the comparison, to see "
                             "the check fail (exit status 1)")
    args = parser.parse_args()
    check_loop_arguments(parser, args)
    with tempfile.TemporaryDirectory() as work:
        os.makedirs(os.path.join(work, "memmgr"))
        os.makedirs(os.path.join(work, "plain"))
        managed = run_loop(args, use_memmgr=True, workdir=os.path.join(work, "memmgr"))
        plain = run_loop(args, use_memmgr=False, workdir=os.path.join(work, "plain"))
        report = subprocess.run([sys.executable, "-m", "memmgr", "report", "--json", os.path.join(work, "memmgr")],
                                capture_output=True, text=True)
    if report.returncode != 0:
        fail(f"`memmgr report` exited with {report.returncode}:\n{report.stdout}{report.stderr}")
    try:
        snapshots = int(json.loads(report.stdout)["summary"]["snapshots"])
    except (ValueError, KeyError, TypeError) as exc:
        fail(f"`memmgr report --json` printed no snapshots ({exc!r}):\n{report.stdout[:2000]}")
    if snapshots != managed["ledger_records"] or snapshots < 2 * args.iterations:
        fail(f"`memmgr report` shows {snapshots} snapshots; the ledger recorded {managed['ledger_records']}, and "
             f"{args.iterations} phases record at least {2 * args.iterations}")
    if args.corrupt:
        state = next(iter(managed["optimizer"]["state"].values()))
        key = "exp_avg_sq" if "exp_avg_sq" in state else "momentum_buffer"
        state[key].view(-1)[0:1].view(torch.int32).bitwise_xor_(1)
    check_same_training(managed, plain)
    n = sum(1 for _ in managed["model"].values()) + sum(
        1 for s in managed["optimizer"]["state"].values() for v in s.values() if isinstance(v, torch.Tensor))
    print(f"OK plain_torch_loop: {args.iterations} iterations on {args.device} with {args.optimizer}, resumed at "
          f"iteration {args.iterations // 2}: {n} weight and optimizer tensors identical to the loop without memmgr "
          f"(final loss {managed['losses'][-1]:.6f}){', every parameter at its address' if args.same_address else ''}; "
          f"`memmgr report` rendered {snapshots} snapshots")


if __name__ == "__main__":
    main()
