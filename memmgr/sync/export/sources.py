"""Where a parameter's bytes are read from: the device (``param.data``) or memmgr's host copy of the weights.

``DeviceSource`` reads ``param.data``. ``HostCopySource`` reads through memmgr's ``weights`` group
(``mgr.group("weights")`` of ``for_megatron``): a parameter whose bucket is on the device is read there; one whose
bucket is offloaded is read from the bucket's host buffer (pinned when CUDA is present) at the parameter's offset, so
an export needs no onload of the trainer's weights. The parameter -> (bucket, offset) map comes from the bucket's
members (coalesced tensors) and, for megatron's adopted ``param_data`` buffers, from the DDP buffer's
``param_index_map``; it is built once, in any state of the group.
"""
from __future__ import annotations

from typing import Any, Iterable, Protocol

import torch

from memmgr.errors import MemmgrStateError
from memmgr.flat_tensors import BucketizedFlatTensors, FlatTensors
from memmgr.states import BucketState
from memmgr.sync.export.errors import MemmgrExportError


class WeightSource(Protocol):
    """Reads a parameter: returns a tensor of its shape and dtype holding its values now (a device tensor, or a
    host tensor the caller copies from; never a copy made here)."""

    def read(self, name: str, param: torch.Tensor) -> torch.Tensor: ...

    def problem(self, name: str, param: torch.Tensor) -> str | None:
        """Why ``read`` would fail now (None if it would not): checked on every rank before an export starts."""


def _has_memory(t: torch.Tensor) -> bool:
    return t.numel() == 0 or t.untyped_storage().nbytes() > 0


class DeviceSource:
    """Reads ``param.data`` where it lies; raises MemmgrStateError for a parameter whose memory is offloaded."""

    def problem(self, name: str, param: torch.Tensor) -> str | None:
        if _has_memory(param):
            return None
        return (f"parameter {name!r} has no device memory (its weights group is offloaded); export from the host "
                f"copy instead: MegatronExporter(..., weights=mgr.group('weights')), or onload the weights first")

    def read(self, name: str, param: torch.Tensor) -> torch.Tensor:
        problem = self.problem(name, param)
        if problem:
            raise MemmgrStateError(problem)
        return param.detach()


class HostCopySource:
    """Reads each parameter from its bucket of a memmgr weights group: on the device while the bucket is there, from
    the bucket's host buffer while it is offloaded."""

    def __init__(self, weights: BucketizedFlatTensors, params: Iterable[tuple[str, torch.Tensor]],
                 model_chunks: Iterable[Any] = ()):
        if not isinstance(weights, BucketizedFlatTensors):
            raise MemmgrExportError(f"weights= must be memmgr's weights group (mgr.group('weights'), a "
                                    f"BucketizedFlatTensors), got {type(weights).__name__}")
        self.weights = weights
        where: dict[int, tuple[FlatTensors, int]] = {}
        by_flat = {id(b.flat): b for b in weights.buckets}
        for bucket in weights.buckets:
            for _mname, tensor, offset in bucket.members:
                if tensor is not bucket.flat:
                    where[id(tensor)] = (bucket, offset)
        for chunk in model_chunks:
            buffers = []
            for attr in ("buffers", "expert_parallel_buffers"):  # megatron DDP's lists (a bare module's is a method)
                found = getattr(chunk, attr, None)
                buffers += list(found) if isinstance(found, (list, tuple)) else []
            for buf in buffers:
                data = getattr(buf, "param_data", None)
                bucket = by_flat.get(id(data)) if data is not None else None
                if bucket is None:
                    continue
                for param, (start, _end, _bucket_id) in getattr(buf, "param_index_map", {}).items():
                    where[id(param)] = (bucket, start)
        self._where: dict[int, tuple[FlatTensors, int]] = {}
        missing = []
        for name, param in params:
            found = where.get(id(param))
            if found is None:
                missing.append(name)
            else:
                self._where[id(param)] = found
        if missing:
            raise MemmgrExportError(
                f"{len(missing)} parameter(s) are not in the weights group {weights.name!r} (first: {missing[:3]}); "
                f"pass the group for_megatron built for these same model chunks (mgr.group('weights'))")

    def _state(self, param: torch.Tensor) -> tuple[FlatTensors, int, BucketState]:
        bucket, offset = self._where[id(param)]
        state = bucket.state
        if state in (BucketState.OFFLOADING, BucketState.ONLOADING):
            bucket.wait()
            state = bucket.state
        return bucket, offset, state

    def problem(self, name: str, param: torch.Tensor) -> str | None:
        bucket, _offset, state = self._state(param)
        if state is BucketState.ON_DEVICE or (state is BucketState.ON_HOST and bucket.host_buffer is not None):
            return None
        return (f"parameter {name!r}: bucket {bucket.name!r} of the weights group is {state.value} and holds no "
                f"copy of its contents; onload the weights group before exporting")

    def read(self, name: str, param: torch.Tensor) -> torch.Tensor:
        bucket, offset, state = self._state(param)
        if state is BucketState.ON_DEVICE:
            return param.detach()
        host = bucket.host_buffer
        if state is not BucketState.ON_HOST or host is None:
            raise MemmgrStateError(self.problem(name, param) or f"parameter {name!r} cannot be read")
        itemsize = param.element_size()
        start = offset * itemsize
        raw = host.tensor.narrow(0, start, param.numel() * itemsize)
        return raw.view(param.dtype).view(param.shape)
