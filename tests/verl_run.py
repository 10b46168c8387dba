"""TEST-ONLY: memmgr's verl checkpoint engine against the real verl package, run as its own process by
test_verl_integration.py (verl may sit in a folder of its own, MEMMGR_VERL_SITE, put on this process's PYTHONPATH
only). Prints one JSON object: the registration, the topology, a 3-iteration loop with and without memmgr, and the
two failure paths (the trainer's stream fails; the rollout stops taking weights), each followed by a good sync."""
from __future__ import annotations

import json
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")
PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10, 11, 12]]


def train_step(model, opt, completions) -> float:
    tokens = torch.tensor([p + c for p, c in zip(PROMPTS, completions)])
    generated = tokens[:, 5:]
    advantage = (generated % 2 == 0).float().mean(1)
    advantage = advantage - advantage.mean()
    logits = model(tokens[:, :-1]).logits[:, 4:]
    logp = -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), generated.reshape(-1), reduction="none")
    loss = -(advantage.unsqueeze(1) * logp.view(len(PROMPTS), -1)).mean() - 0.01 * logp.mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def loop(engine, rollout, use_memmgr: bool) -> dict:
    import memmgr
    from memmgr.integrations.verl import VerlOffload
    from memmgr.tools.verl_rollout import greedy, tiny_llama, update_weights

    model = tiny_llama(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    offload = VerlOffload(memmgr.for_module(model, opt, include_buffers=False)) if use_memmgr else None
    out = {"same_generation": [], "taken": [], "device_bytes_in_rollout": [], "losses": []}
    for it in range(3):
        if offload is not None:
            offload.to("cpu")
            out["device_bytes_in_rollout"].append(sum(s.device_bytes for s in offload.manager.state.values()))
            weights = offload.manager  # send_weights brings back the manager's weights for the sync only
        else:
            weights = model.named_parameters()
        _, taken = update_weights(engine, [rollout], weights, global_steps=it)
        out["taken"].append(taken[0])
        completions = rollout.call("generate", prompts=PROMPTS)
        if offload is not None:
            offload.to("cuda")
        out["same_generation"].append(completions == greedy(model, PROMPTS))
        out["losses"].append(train_step(model, opt, completions))
    if offload is not None:
        offload.manager.close()
    out["state"] = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    return out


def same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


def main() -> None:
    from verl.checkpoint_engine import CheckpointEngine, CheckpointEngineRegistry
    from verl.utils.import_utils import import_external_libs

    from memmgr.tools.verl_rollout import RolloutProcess, tiny_llama, update_weights

    import_external_libs("memmgr.integrations.verl")  # what verl does with custom_backend_module
    cls = CheckpointEngineRegistry.get("memmgr")
    result = {"class": cls.__name__, "is_checkpoint_engine": issubclass(cls, CheckpointEngine)}
    master = {"master_address": "127.0.0.1", "master_port": 1, "transport": "gloo"}
    result["topology"] = cls.build_topology(2, 3, [master, {}, {}, {}, {}])
    kwargs = {"transport": "gloo", "master_address": "127.0.0.1", "timeout_s": 60.0}
    engine = CheckpointEngineRegistry.new("memmgr", is_master=True, bucket_size=1 << 14, **kwargs)
    rollout = RolloutProcess(bucket_size=1 << 14, engine_kwargs=kwargs)
    try:
        managed, plain = loop(engine, rollout, True), loop(engine, rollout, False)
        result["managed"] = {k: v for k, v in managed.items() if k != "state"}
        result["plain"] = {k: v for k, v in plain.items() if k != "state"}
        result["bit_exact"] = same_state(managed["state"], plain["state"])
        weights = dict(tiny_llama(7).named_parameters())

        def failing():
            yield from list(weights.items())[:2]
            raise ValueError("the trainer's weight generator failed (on purpose)")

        failures = {}
        for case, args in (("trainer_fails", dict(weights=failing())),
                           ("rollout_fails", dict(weights=weights.items(), stop_after=3))):
            try:
                update_weights(engine, [rollout], **args)
                failures[case] = {"trainer": None}
            except Exception as exc:
                failures[case] = {"trainer": f"{type(exc).__name__}: {exc}"}
            _, taken = update_weights(engine, [rollout], weights.items())  # the next sync works
            got = rollout.call("weights")
            failures[case]["next_sync"] = taken[0] == len(weights) and all(
                torch.equal(got[n], w.detach()) for n, w in weights.items())
        result["failures"] = failures
    finally:
        rollout.close()
    print(json.dumps(result))


if __name__ == "__main__":
    from memmgr.tools.cpu_math import warm_up_vml
    warm_up_vml()  # the run is compared bit for bit (memmgr.tools.cpu_math)
    main()
