"""A transformers "engine" in a second process on the trainer's GPU, fed through memmgr's CUDA IPC transport.

``EngineProcess(config, dtype)`` spawns the engine: it builds ``AutoModelForCausalLM.from_config(config)`` on its
GPU, then for each announced bucket maps the ring slot (``CudaIpcReceiver``), copies the views into its parameters
(``ModuleWeightLoader``: names and shapes checked, nothing cast), synchronizes and answers. ``announce`` is the
control channel a ``CudaIpcTransport`` takes; ``report(prompt)`` returns the engine's per-tensor checksums and its
logits on ``prompt``. Used by the GPU tests and by benchmarks/ipc_sync_speed.py.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.multiprocessing as mp


def checksums(named: Any) -> dict[str, tuple[int, int]]:
    """Per tensor, two integer sums over its raw bits (plain and position-weighted): equal bits give equal sums,
    and the weighted sum catches permuted data."""
    out = {}
    for name, t in named:
        flat = t.detach().contiguous().reshape(-1)
        bits = flat.view(torch.int16 if flat.element_size() == 2 else torch.int32).to(torch.int64)
        pos = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.int64) % 65521
        out[name] = (int(bits.sum()), int((bits * pos).sum()))
    return out


def _engine_main(config: Any, dtype: torch.dtype, device_index: int, descs: Any, acks: Any, results: Any) -> None:
    from transformers import AutoModelForCausalLM

    from memmgr.sync import ModuleWeightLoader
    from memmgr.sync.transports.ipc import CudaIpcReceiver

    device = torch.device("cuda", device_index)
    torch.cuda.set_device(device)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    loader = ModuleWeightLoader(model)
    receiver = CudaIpcReceiver(device)
    acks.put(("ready", torch.cuda.memory_allocated(device)))
    while True:
        msg = descs.get()
        if msg is None:
            break
        if isinstance(msg, tuple) and msg[0] == "report":
            prompt = torch.tensor([msg[1]], device=device)
            with torch.no_grad():
                logits = model(prompt).logits.float().cpu()
            results.put({"checksums": checksums(model.state_dict().items()), "logits": logits,
                         "missing": loader.missing()})
            continue
        try:
            # one engine step: load the announced bucket (or begin/commit/abort a sync), rolling back on failure
            receiver.handle(msg, loader)
            acks.put(("ok", msg.get("slot") if isinstance(msg, dict) else None))
        except Exception as exc:  # reported to the producer like an RPC error
            acks.put(("error", f"{type(exc).__name__}: {exc}"))
    receiver.close()


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


class EngineProcess:
    """The engine process and its control channel (see the module docstring)."""

    def __init__(self, config: Any, dtype: torch.dtype = torch.bfloat16, device_index: int = 0,
                 visible_devices: str | None = None, timeout_s: float = 600.0):
        ctx = mp.get_context("spawn")
        self.descs, self.acks, self.results = ctx.Queue(), ctx.Queue(), ctx.Queue()
        self.timeout_s = timeout_s
        self.proc = ctx.Process(target=_engine_main,
                                args=(config, dtype, device_index, self.descs, self.acks, self.results), daemon=True)
        start_seeing(self.proc, visible_devices)
        status, self.model_bytes = self.acks.get(timeout=timeout_s)
        assert status == "ready", status

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
