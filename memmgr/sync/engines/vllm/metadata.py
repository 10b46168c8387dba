"""What a vLLM engine holds: the names, shapes and dtypes of the checkpoint it was started from, and their encoding
on ``collective_rpc``.

The engine holds exactly the tensors of its safetensors files (HF names for an HF checkpoint), floating-point ones
in the engine's dtype. ``engine_weight_metadata`` reads them from the files' headers (no tensor is read); a sync
must send exactly those tensors, and anything else is refused before the engine's layers are touched. The worker
sends this table to the trainer as plain lists (``encode_metadata``), and the trainer turns it back into shapes and
dtypes (``decode_metadata``).
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Mapping, Sequence

import torch

from memmgr.errors import MemmgrSyncError
from memmgr.sync.transports.base import dtype_from_name, dtype_name

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

Metadata = dict[str, tuple[tuple[int, ...], torch.dtype]]


def _safetensors_header(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def _checkpoint_files(model_config: Any) -> list[str]:
    root = str(model_config.model)
    if not os.path.isdir(root):
        try:
            from huggingface_hub import snapshot_download

            root = snapshot_download(root, revision=getattr(model_config, "revision", None), local_files_only=True,
                                     allow_patterns=["*.safetensors", "*.safetensors.index.json"])
        except Exception as exc:
            raise MemmgrSyncError(f"memmgr weight sync: the engine's model {model_config.model!r} is neither a folder "
                                  f"nor in the local Hugging Face cache ({exc}); start the engine from a local "
                                  f"folder so its weight names and shapes can be checked") from exc
    index = os.path.join(root, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(root, n) for n in names]
    files = sorted(os.path.join(root, n) for n in os.listdir(root) if n.endswith(".safetensors"))
    if not files:
        raise MemmgrSyncError(f"memmgr weight sync: the engine's model folder {root!r} has no .safetensors file; "
                              f"memmgr reads the engine's weight names and shapes from safetensors headers")
    return files


def engine_weight_metadata(model_config: Any) -> Metadata:
    """Name -> (shape, dtype) of every weight the engine was loaded with: its checkpoint's safetensors headers
    (no tensor is read), floating-point tensors in the engine's dtype (``model_config.dtype``)."""
    engine_dtype = model_config.dtype
    out: Metadata = {}
    for path in _checkpoint_files(model_config):
        for name, info in _safetensors_header(path).items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise MemmgrSyncError(f"memmgr weight sync: checkpoint tensor {name!r} in {path} has safetensors "
                                      f"dtype {info['dtype']!r}, which memmgr does not know")
            if dtype.is_floating_point and isinstance(engine_dtype, torch.dtype):
                dtype = engine_dtype
            out[name] = (tuple(int(s) for s in info["shape"]), dtype)
    return out


def encode_metadata(meta: Mapping[str, tuple[Sequence[int], torch.dtype]]) -> dict[str, list]:
    """Name -> [shape, dtype name]: ``engine_weight_metadata`` as plain lists, for ``collective_rpc``."""
    return {n: [list(shape), dtype_name(dtype)] for n, (shape, dtype) in meta.items()}


def decode_metadata(meta: Mapping[str, Sequence]) -> Metadata:
    """The inverse of ``encode_metadata``."""
    return {n: (tuple(int(s) for s in shape), dtype_from_name(d)) for n, (shape, d) in meta.items()}


__all__ = ["engine_weight_metadata", "encode_metadata", "decode_metadata"]
