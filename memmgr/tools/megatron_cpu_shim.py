"""megatron-core's training path on a CPU-only PyTorch build, in one process (tests, CPU smoke runs of the
benchmarks, ``examples/megatron_loop.py --device cpu``).

megatron-core assumes CUDA in a few places that a tiny CPU test reaches. This module redirects exactly those to
the CPU, and nothing else, while ``cpu_megatron()`` is active (it restores everything on exit):

1. ``device="cuda"`` / ``device=torch.cuda.current_device()`` in tensor factories (the param/grad buffers of
   ``_ParamAndGradBuffer``, ``found_inf`` / ``_scale_one`` in the mixed-precision optimizer, the norm tensors in
   ``clip_grads``) and ``Tensor.cuda()``: a ``TorchFunctionMode`` rewrites CUDA devices to ``cpu``.
2. ``param.type()`` checks for ``'torch.cuda.FloatTensor'`` / ``'torch.cuda.BFloat16Tensor'`` in the distributed
   and float16 optimizers: the same mode answers ``Tensor.type()`` (no argument) of a CPU tensor with the CUDA
   type name, so the CPU parameters take the branch their CUDA twins would.
3. ``torch.cuda.current_device()`` (returns 0, which the mode maps to the CPU) and ``torch.cuda.synchronize()`` /
   ``torch.cuda.empty_cache()`` (no-ops): a CPU-only build raises on them.
4. The CUDA RNG tracker's ``fork()`` (used around dropout, which these tests set to 0): a no-op context, since a
   CPU-only build has no CUDA generator to fork.

The runtime never imports this module; it is tooling for runs without a GPU.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


@contextlib.contextmanager
def cpu_megatron() -> Iterator[None]:
    """Applies the redirections above for the duration of the block."""
    from megatron.core.tensor_parallel import random as mc_random

    saved = {
        (torch.cuda, "current_device"): torch.cuda.current_device,
        (torch.cuda, "synchronize"): torch.cuda.synchronize,
        (torch.cuda, "empty_cache"): torch.cuda.empty_cache,
        (mc_random.CudaRNGStatesTracker, "fork"): mc_random.CudaRNGStatesTracker.fork,
    }
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    mc_random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    mode = _CudaToCpu()
    mode.__enter__()
    try:
        yield
    finally:
        mode.__exit__(None, None, None)
        for (owner, attr), value in saved.items():
            setattr(owner, attr, value)
