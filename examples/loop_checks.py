"""What every example does around its loop: the device option, and the bit-for-bit comparison of the run with
memmgr against the run without it. Not part of memmgr; the examples import it from their own folder."""
from __future__ import annotations

import argparse
import os
import sys

import torch

from memmgr.tools.cpu_math import warm_up_vml


def fail(message: str) -> None:
    """Ends the example with exit status 1 and the message on stderr."""
    print(f"FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def differences(a, b, path: str = "") -> list[str]:
    """Where two nested state dicts differ: tensors by torch.equal (shape, dtype and every element), the rest by ==."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.device == b.device and torch.equal(a, b))
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path} (keys {sorted(map(str, a.keys() ^ b.keys()))})"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}.{k}" if path else str(k))]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def add_loop_arguments(parser: argparse.ArgumentParser, iterations: int, same_address: bool = False) -> None:
    """--device (default cuda where there is one) and --iterations; with ``same_address``, --same-address too."""
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iterations", type=int, default=iterations)
    if same_address:
        parser.add_argument("--same-address", action="store_true",
                            help="build the manager with same_address=True: every managed tensor keeps its address "
                                 "through the phases (CUDA graphs captured on them stay valid); needs --device cuda")


def check_loop_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses too few iterations for a checkpoint and a resume, and a CUDA device that is not there; makes the
    kernels deterministic (on CUDA) and the CPU math functions accurate from their first call, since the runs are
    compared bit for bit."""
    if args.iterations < 2:
        parser.error("--iterations must be at least 2: steps before the checkpoint and after the resume")
    if getattr(args, "same_address", False) and args.device != "cuda":
        parser.error("--same-address needs --device cuda (same-address memory is GPU memory)")
    warm_up_vml()  # oneMKL's first-call race would differ the runs (memmgr.tools.cpu_math)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device here")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def check_addresses_kept(before: list[int], after: list[int], iteration: int) -> None:
    """Fails unless every parameter is at the address it had before the phase (a same-address manager's promise)."""
    moved = sum(1 for a, b in zip(before, after) if a != b)
    if moved or len(before) != len(after):
        fail(f"iteration {iteration}: {moved} of {len(before)} parameters came back from the phase at another address "
             f"although the manager was built with same_address=True")


def check_same_training(managed: dict, plain: dict, parts: tuple[str, ...] = ("model", "optimizer")) -> None:
    """Fails unless the run with memmgr ended with the same state (each of ``parts``) and losses as the run without."""
    for what in parts:
        diff = differences(managed[what], plain[what])
        if diff:
            fail(f"with memmgr the final {what} state differs from the run without it in {len(diff)} tensor(s) or "
                 f"value(s): {diff[:10]}")
    if managed["losses"] != plain["losses"]:
        fail(f"the losses differ: with memmgr {managed['losses']}, without {plain['losses']}")
