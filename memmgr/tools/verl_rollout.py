"""A rollout worker and verl's weight-update choreography for trying ``memmgr.integrations.verl`` on the CPU, shared by
``examples/verl_loop.py`` and the tests.

- ``tiny_llama(seed)``: a tiny random transformers Llama (float32) with decisive logits, so greedy decoding has
  clear winners; nothing is downloaded.
- ``RolloutProcess``: a spawned process holding a verl checkpoint engine (built the way verl's
  ``CheckpointEngineWorker`` builds it: ``import_external_libs(custom_backend_module)`` then
  ``CheckpointEngineRegistry.new(backend, bucket_size=...)``) and a transformers model of its own random weights,
  that it loads the received weights into and generates with (greedy). Commands travel over a pipe.
- ``update_weights(trainer_engine, rollouts, weights)``: what verl's ``CheckpointEngineManager.update_weights`` does
  around one sync (prepare, ``build_topology``, ``init_process_group``, send and receive, finalize), with the
  trainer's engine in this process.

verl, transformers and the spawned process are used inside the functions; importing this module needs only torch.
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any


from memmgr.tools.vllm_models import greedy_hf, tiny_causal_lm

VOCAB, HIDDEN, NEW_TOKENS = 128, 64, 6


def tiny_llama(seed: int) -> Any:
    """A 2-layer random transformers Llama (``memmgr.tools.vllm_models.tiny_causal_lm``, float32, untied head of std
    1: decisive greedy choices)."""
    return tiny_causal_lm(seed=seed, hidden=HIDDEN, vocab=VOCAB).train()


def greedy(model: Any, prompts: Sequence[Sequence[int]], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    """Greedy token ids after each prompt (``memmgr.tools.vllm_models.greedy_hf``)."""
    return greedy_hf(model, prompts, new_tokens)


def _rollout_main(conn: Any, backend: str, bucket_size: int, engine_kwargs: dict, seed: int) -> None:
    """The spawned rollout worker: serves commands until ``stop``; each reply is ("ok", value) or ("error", text)."""
    from verl.checkpoint_engine import CheckpointEngineRegistry
    from verl.utils.import_utils import import_external_libs

    import_external_libs("memmgr.integrations.verl")  # verl's custom_backend_module
    engine = CheckpointEngineRegistry.new(backend, bucket_size=bucket_size, **engine_kwargs)
    model = tiny_llama(seed).eval()
    params = dict(model.named_parameters())

    async def receive(global_steps: int | None, stop_after: int | None) -> int:
        n = 0
        async for name, tensor in engine.receive_weights(global_steps=global_steps):
            if stop_after is not None and n == stop_after:
                raise RuntimeError(f"the rollout's weight loading failed at {name!r} (on purpose)")
            params[name].data.copy_(tensor)  # a view into the receive buffer: copied before the next one
            n += 1
        return n

    conn.send(("ok", type(engine).__name__))
    while True:
        command, args = conn.recv()
        try:
            if command == "stop":
                conn.send(("ok", None))
                return
            if command == "call":
                value = getattr(engine, args["method"])(**args.get("kwargs", {}))
            elif command == "update_weights":
                value = asyncio.run(receive(args.get("global_steps"), args.get("stop_after")))
            elif command == "generate":
                value = greedy(model, args["prompts"])
            elif command == "weights":
                value = {n: p.detach().clone() for n, p in params.items()}
            else:
                raise ValueError(f"unknown command {command!r}")
            conn.send(("ok", value))
        except Exception as exc:  # reported to the caller, which raises it
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class RolloutProcess:
    """A rollout worker in a process of its own (see the module docstring). ``call`` waits for the reply; ``submit``
    sends a command and ``result`` collects its reply later (the trainer sends meanwhile)."""

    def __init__(self, *, backend: str = "memmgr", bucket_size: int = 1 << 16, engine_kwargs: dict | None = None,
                 seed: int = 12345, timeout_s: float = 300.0):
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.timeout_s = timeout_s
        self.proc = ctx.Process(target=_rollout_main, args=(child, backend, bucket_size, engine_kwargs or {}, seed),
                                daemon=True)
        self.proc.start()
        self.engine_name = self._reply()

    def _reply(self) -> Any:
        if not self.conn.poll(self.timeout_s):
            raise TimeoutError(f"the rollout process gave no answer within {self.timeout_s:.0f} s")
        status, value = self.conn.recv()
        if status == "error":
            raise RuntimeError(f"rollout process: {value}")
        return value

    def submit(self, command: str, **args: Any) -> None:
        self.conn.send((command, args))

    def result(self) -> Any:
        return self._reply()

    def call(self, command: str, **args: Any) -> Any:
        self.submit(command, **args)
        return self.result()

    def engine(self, method: str, **kwargs: Any) -> Any:
        """``execute_checkpoint_engine(method, **kwargs)``: the engine's method, run in the rollout process."""
        return self.call("call", method=method, kwargs=kwargs)

    def close(self) -> None:
        try:
            if self.proc.is_alive():
                self.call("stop")
        finally:
            self.proc.join(30)


def update_weights(trainer_engine: Any, rollouts: Sequence[RolloutProcess], weights: Any, *,
                   global_steps: int | None = None, stop_after: int | None = None) -> tuple[dict, list]:
    """One weight update as verl's ``CheckpointEngineManager`` runs it, with one trainer rank (this process) and the
    rollout workers: prepare everywhere, ``build_topology``, ``init_process_group`` everywhere, ``send_weights`` here
    while every rollout runs ``receive_weights``, then finalize everywhere. Returns the trainer's metrics and each
    rollout's result (the number of tensors it took, or the exception it raised). ``stop_after``: the first rollout
    fails on purpose after that many tensors."""
    metadata = [trainer_engine.prepare()] + [r.engine("prepare") for r in rollouts]
    actor_kwargs, rollout_kwargs = type(trainer_engine).build_topology(1, len(rollouts), metadata)
    for i, r in enumerate(rollouts):
        r.submit("call", method="init_process_group", kwargs={k: v[i] for k, v in rollout_kwargs.items()})
    trainer_engine.init_process_group(**{k: v[0] for k, v in actor_kwargs.items()})
    for r in rollouts:
        r.result()
    for i, r in enumerate(rollouts):
        r.submit("update_weights", global_steps=global_steps, stop_after=stop_after if i == 0 else None)
    metrics: dict = {}
    error: BaseException | None = None
    try:
        metrics = asyncio.run(trainer_engine.send_weights(weights, global_steps=global_steps))
    except Exception as exc:  # the rollouts' answers first, then raise
        error = exc
    results: list = []
    for r in rollouts:
        try:
            results.append(r.result())
        except RuntimeError as exc:
            results.append(exc)
    trainer_engine.finalize()
    for r in rollouts:
        r.engine("finalize")
    if error is not None:
        raise error
    return metrics, results


__all__ = ["RolloutProcess", "greedy", "tiny_llama", "update_weights"]
