"""The layout of one sync: tensor specs, their buckets and offsets, serialized and versioned by hash."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterable

import torch

from memmgr.errors import MemmgrSyncError
from memmgr.sync.protocol import ALIGN_BYTES, PROTOCOL_VERSION


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise MemmgrSyncError(f"sync metadata names dtype {name!r}, which this torch ({torch.__version__}) lacks; "
                              f"use the same torch version on both sides")
    return dtype


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def aligned(nbytes: int, align: int) -> int:
    """``nbytes`` rounded up to a multiple of ``align``."""
    return -(-nbytes // align) * align


@dataclass(frozen=True)
class ParamSpec:
    """Name, shape and dtype of one weight: what the trainer sends or what the engine holds. The entries that place a
    weight inside a bucket (``transports.base.TensorEntry``, ``export.ExportEntry``) are ParamSpecs with an offset."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    def spec(self) -> "ParamSpec":
        """The weight's name, shape and dtype alone."""
        return ParamSpec(self.name, tuple(self.shape), self.dtype)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the sync: where it lies in which bucket (offset and numel in elements of its dtype)."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    bucket: int
    offset: int
    numel: int


@dataclass(frozen=True)
class BucketSpec:
    """One flat bucket: a dtype, its length in elements and the indices of its tensors in ``SyncLayout.tensors``."""
    dtype: torch.dtype
    numel: int
    members: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


@dataclass(frozen=True)
class SyncLayout:
    """Names, shapes, dtypes and bucket layout of one set of weights; ``version`` hashes all of it."""
    tensors: tuple[TensorSpec, ...]
    buckets: tuple[BucketSpec, ...]
    bucket_bytes: int
    version: int
    device_uuid: str = ""

    @classmethod
    def build(cls, named: Iterable[tuple[str, tuple[int, ...], torch.dtype]], bucket_bytes: int,
              device_uuid: str = "") -> "SyncLayout":
        """Groups tensors by dtype, in order, into buckets of at most ``bucket_bytes`` (a larger tensor gets a
        bucket of its own)."""
        named = list(named)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, (_, _, dtype) in enumerate(named):
            by_dtype.setdefault(dtype, []).append(i)
        specs: list[TensorSpec | None] = [None] * len(named)
        buckets: list[BucketSpec] = []
        for dtype, indices in by_dtype.items():
            item = itemsize(dtype)
            align = max(1, ALIGN_BYTES // item)
            limit = max(1, bucket_bytes // item)
            members: list[int] = []
            fill = 0
            for i in indices:
                name, shape, _ = named[i]
                numel = 1
                for s in shape:
                    numel *= int(s)
                padded = -(-numel // align) * align
                if members and fill + numel > limit:
                    buckets.append(BucketSpec(dtype, fill, tuple(members)))
                    members, fill = [], 0
                specs[i] = TensorSpec(name, tuple(int(s) for s in shape), dtype, len(buckets), fill, numel)
                members.append(i)
                fill += padded
            if members:
                buckets.append(BucketSpec(dtype, fill, tuple(members)))
        tensors = tuple(s for s in specs if s is not None)
        version = cls._hash(tensors, buckets, bucket_bytes)
        return cls(tensors, tuple(buckets), bucket_bytes, version, device_uuid)

    @staticmethod
    def _hash(tensors: Iterable[TensorSpec], buckets: Iterable[BucketSpec], bucket_bytes: int) -> int:
        text = json.dumps([PROTOCOL_VERSION, bucket_bytes,
                           [[t.name, list(t.shape), dtype_name(t.dtype), t.bucket, t.offset] for t in tensors],
                           [[dtype_name(b.dtype), b.numel, list(b.members)] for b in buckets]])
        return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)

    @property
    def nbytes(self) -> int:
        """Bytes of the weights themselves (without alignment padding)."""
        return sum(t.numel * itemsize(t.dtype) for t in self.tensors)

    @property
    def max_bucket_nbytes(self) -> int:
        return max((b.nbytes for b in self.buckets), default=0)

    def to_bytes(self) -> bytes:
        return json.dumps({
            "protocol": PROTOCOL_VERSION, "version": self.version, "bucket_bytes": self.bucket_bytes,
            "device_uuid": self.device_uuid,
            "tensors": [[t.name, list(t.shape), dtype_name(t.dtype), t.bucket, t.offset, t.numel]
                        for t in self.tensors],
            "buckets": [[dtype_name(b.dtype), b.numel, list(b.members)] for b in self.buckets],
        }).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "SyncLayout":
        obj = json.loads(data.decode())
        if obj.get("protocol") != PROTOCOL_VERSION:
            raise MemmgrSyncError(f"sync metadata uses protocol {obj.get('protocol')} but this side speaks "
                                  f"{PROTOCOL_VERSION}; install the same memmgr version on trainer and engine")
        tensors = tuple(TensorSpec(n, tuple(s), dtype_from_name(d), b, o, k) for n, s, d, b, o, k in obj["tensors"])
        buckets = tuple(BucketSpec(dtype_from_name(d), k, tuple(m)) for d, k, m in obj["buckets"])
        layout = cls(tensors, buckets, obj["bucket_bytes"], obj["version"], obj.get("device_uuid", ""))
        if cls._hash(tensors, buckets, layout.bucket_bytes) != layout.version:
            raise MemmgrSyncError(f"sync metadata of version {layout.version:#x} does not hash to its version; it "
                                  f"was corrupted in transit or written by another memmgr version")
        return layout


@dataclass
class SyncStats:
    """What one sync did, on one side."""
    version: int = 0
    metadata_sent: bool = False       # sender: the layout went out this time; receiver: it came in this time
    collectives: int = 0              # collectives this side took part in
    buckets: int = 0
    nbytes: int = 0                   # weight bytes moved (without alignment padding)
    wire_bytes: int = 0               # bucket bytes broadcast (with padding)
    seconds: float = 0.0              # header to final status, inclusive
    bucket_seconds: float = 0.0       # first bucket broadcast to last one complete
    extra: dict = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        """Weight bytes per second over the whole sync, in GB/s (1e9)."""
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0
