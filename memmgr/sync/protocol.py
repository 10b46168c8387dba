"""Constants of memmgr's own bucketed weight-sync wire protocol (sender and receiver agree on them)."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

PROTOCOL_VERSION = 1
MAGIC = 0x6D656D6D6772  # "memmgr"
HEADER_LEN = 8          # magic, protocol, status, layout version, metadata bytes, buckets, total bytes, message bytes
MESSAGE_BYTES = 4096    # fixed size of an error message a failing rank broadcasts to the others
ALIGN_BYTES = 256       # each tensor starts at a multiple of this inside its bucket

# status codes (all-reduced with MAX, so any failure wins)
STATUS_OK = 0
STATUS_ABORT = 1               # the sender failed before sending weights (e.g. its weights were discarded)
STATUS_MISMATCH = 2            # the receiver's metadata disagrees with the sender's
STATUS_LOAD_FAILED = 3         # load_weights raised on a receiver

LoadWeights = Callable[[Iterable[tuple[str, torch.Tensor]]], Any]

SAME_GPU_HINT = ("NCCL refuses two ranks of one communicator on the same GPU, so an engine cannot receive weights "
                 "from a trainer rank on its own GPU. Place the engine on another GPU: e.g. reverse placement, where "
                 "trainer rank i feeds the engine on GPU (i + 1) % n")
