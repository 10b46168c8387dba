"""Warms up the CPU math functions PyTorch hands to oneMKL's VML, for programs that compare two computations bit
for bit (a loop with memmgr against the same loop without it: the examples, the tests, the stateful machine).

oneMKL 2024.2, which torch 2.13's CPU wheels bundle, resolves each VML function's kernel on its first call; when that
first call runs on several intra-op threads at once (a float op on more than 2048 elements with two or more threads),
one thread can run a low-accuracy kernel for its chunk (pytorch/pytorch#188792). A fresh process's first Adam step then
takes ``sqrt`` of half the moments with errors of ~1e-4, and a run compared with it differs although memmgr changed
nothing. One single-threaded call of each function and dtype before the runs resolves the dispatch for good.
"""
from __future__ import annotations

import torch

# ATen's float unary ops that go through MKL VML (aten/src/ATen/cpu/vml.h, IMPLEMENT_VML_MKL)
VML_FUNCTIONS = ("acos", "asin", "atan", "cos", "cosh", "erf", "erfc", "erfinv", "exp", "expm1", "log", "log10",
                 "log1p", "sin", "sinh", "sqrt", "tan", "tanh")

# The same, as the first line of a script run with ``python -c``.
WARM_UP_SOURCE = "from memmgr.tools.cpu_math import warm_up_vml; warm_up_vml()\n"


def warm_up_vml() -> None:
    """Calls every VML-backed unary op once on one element (a single thread) per floating dtype."""
    for name in VML_FUNCTIONS:
        for dtype in (torch.float32, torch.float64):
            getattr(torch, name)(torch.full((1,), 0.5, dtype=dtype))
