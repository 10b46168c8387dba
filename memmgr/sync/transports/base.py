"""What every weight transport shares: the flat per-dtype bucket and its packer (the one packing rule of the weight
sync, which the export's plan follows too), the tensor metadata (``ParamSpec``), the check against what an engine
holds, and the trainer-side ``Transport`` interface.

A sync is a stream of ``WeightBucket`` s: each is one flat 1-D tensor of a single dtype holding several weights back
to back (each starting at a byte offset aligned to ``ALIGN_BYTES``), plus one ``TensorEntry`` per weight (name,
shape, dtype, byte offset). ``bucketize`` builds such a stream from ``(name, tensor)`` pairs; a transport moves each
bucket to the engine, where ``WeightBucket.views`` gives back ``(name, tensor)`` views for the engine's
``load_weights``.

Before any weight moves, ``check_specs`` compares the names, shapes and dtypes the trainer is about to send with
what the engine holds and raises ``MemmgrSyncMismatchError`` (memmgr.errors) naming the tensors that differ.
"""
from __future__ import annotations

import difflib
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from memmgr import arguments
from memmgr.errors import MemmgrInputError, MemmgrSyncError, MemmgrSyncMismatchError

logger = logging.getLogger("memmgr")

DEFAULT_BUCKET_BYTES = 256 << 20
ALIGN_BYTES = 256       # each weight starts at a multiple of this inside its bucket (the export's buckets too)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise MemmgrSyncError(f"weight sync metadata names dtype {name!r}, which this torch ({torch.__version__}) "
                              f"lacks; use the same torch version on trainer and engine")
    return dtype


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def aligned(nbytes: int, align: int = ALIGN_BYTES) -> int:
    """``nbytes`` rounded up to a multiple of ``align``: the bytes a weight of ``nbytes`` takes in a bucket."""
    return -(-nbytes // align) * align


def padded_numel(numel: int, dtype: torch.dtype) -> int:
    """The elements of ``dtype`` a weight of ``numel`` elements takes in a bucket (up to the next aligned offset)."""
    item = itemsize(dtype)
    return aligned(numel * item) // item



@dataclass(frozen=True)
class ParamSpec:
    """Name, shape and dtype of one weight: what the trainer sends or what the engine holds. The entries that place a
    weight inside a bucket (``TensorEntry``, the export's ``ExportEntry``) are ParamSpecs with an offset."""
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
class TensorEntry(ParamSpec):
    """One weight inside a bucket: its name, shape and dtype, and the byte offset where it starts in the flat
    tensor."""
    offset: int = 0


@dataclass
class WeightBucket:
    """Several weights of one dtype packed into one flat 1-D tensor.

    ``flat`` is contiguous and of the bucket's dtype; ``entries`` say where each weight lies (byte offsets, each a
    multiple of the dtype's size). ``views()`` returns ``(name, tensor)`` views into ``flat`` (no copy).
    """
    flat: torch.Tensor
    entries: tuple[TensorEntry, ...]

    def __post_init__(self) -> None:
        if self.flat.dim() != 1 or not self.flat.is_contiguous():
            raise MemmgrInputError(f"WeightBucket: flat must be a contiguous 1-D tensor, got shape "
                                   f"{tuple(self.flat.shape)}; build buckets with WeightBucket.pack or bucketize")
        item = self.flat.element_size()
        for e in self.entries:
            if e.dtype != self.flat.dtype:
                raise MemmgrInputError(f"WeightBucket: tensor {e.name!r} is {e.dtype} but the bucket is "
                                       f"{self.flat.dtype}; a bucket holds one dtype (bucketize groups by dtype)")
            if e.offset % item or e.offset < 0 or e.offset + e.nbytes > self.nbytes:
                raise MemmgrInputError(f"WeightBucket: tensor {e.name!r} (offset {e.offset} B, {e.nbytes} B) does "
                                       f"not lie inside the bucket's {self.nbytes} B at a multiple of {item} B")

    @property
    def dtype(self) -> torch.dtype:
        return self.flat.dtype

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    @property
    def payload_bytes(self) -> int:
        """Bytes of the weights themselves (without alignment padding)."""
        return sum(e.nbytes for e in self.entries)

    def views(self) -> list[tuple[str, torch.Tensor]]:
        """``(name, view)`` per weight; the views share ``flat``'s storage."""
        item = self.flat.element_size()
        return [(e.name, self.flat[e.offset // item:e.offset // item + e.numel].view(e.shape)) for e in self.entries]

    def specs(self) -> list[ParamSpec]:
        return [e.spec() for e in self.entries]

    def meta(self) -> dict[str, Any]:
        """The bucket's layout as plain JSON-able data (what a control channel carries; no tensor data)."""
        return self.meta_of(self.dtype, int(self.flat.numel()), self.entries)

    @staticmethod
    def meta_of(dtype: torch.dtype, numel: int, entries: Sequence[TensorEntry]) -> dict[str, Any]:
        """``meta()`` of a bucket of ``dtype`` x ``numel`` holding ``entries`` (e.g. from ``layout_of``), before it
        is packed."""
        return {"dtype": dtype_name(dtype), "numel": int(numel),
                "entries": [[e.name, list(e.shape), e.offset] for e in entries]}

    @staticmethod
    def layout_from_meta(meta: Mapping[str, Any]) -> tuple[torch.dtype, int, tuple[TensorEntry, ...]]:
        """(dtype, numel, entries) of a bucket described by ``meta()``."""
        try:
            dtype = dtype_from_name(str(meta["dtype"]))
            numel = int(meta["numel"])
            entries = tuple(TensorEntry(str(n), tuple(int(s) for s in shape), dtype, int(off))
                            for n, shape, off in meta["entries"])
        except (KeyError, TypeError, ValueError) as exc:
            raise MemmgrSyncError(f"weight sync: malformed bucket metadata ({exc!r}); trainer and engine must run the "
                                  f"same memmgr version") from exc
        return dtype, numel, entries

    @staticmethod
    def layout_of(pairs: Sequence[tuple[str, torch.Tensor]]) -> tuple[torch.dtype, int, tuple[TensorEntry, ...]]:
        """(dtype, numel, entries) of the bucket ``pack`` makes of ``pairs`` (all of one dtype), without copying:
        each weight at the next ``ALIGN_BYTES``-aligned byte offset, in order."""
        if not pairs:
            raise MemmgrInputError("WeightBucket.pack: no tensors given")
        dtype = pairs[0][1].dtype
        item = itemsize(dtype)
        entries = []
        offset = 0
        for name, t in pairs:
            if not isinstance(t, torch.Tensor):
                raise MemmgrInputError(f"WeightBucket.pack: {name!r} is a {type(t).__name__}, not a tensor")
            if t.dtype != dtype:
                raise MemmgrInputError(f"WeightBucket.pack: tensor {name!r} is {t.dtype} but the bucket's first "
                                       f"tensor is {dtype}; pack one dtype per bucket (bucketize does)")
            entries.append(TensorEntry(name, tuple(int(s) for s in t.shape), dtype, offset))
            offset = aligned(offset + t.numel() * item)
        return dtype, offset // item, tuple(entries)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], flat: torch.Tensor) -> "WeightBucket":
        """The bucket ``meta`` describes, over ``flat`` (e.g. a receive buffer; its first ``numel`` elements)."""
        dtype, numel, entries = cls.layout_from_meta(meta)
        if flat.dtype != dtype or flat.numel() < numel:
            raise MemmgrSyncError(f"weight sync: receive buffer is {flat.dtype} x {flat.numel()} but the bucket is "
                                  f"{dtype} x {numel}")
        return cls(flat[:numel], entries)

    @classmethod
    def pack(cls, pairs: Sequence[tuple[str, torch.Tensor]], *, out: torch.Tensor | None = None,
             device: torch.device | str | None = None) -> "WeightBucket":
        """Copies ``pairs`` (all of one dtype) into one flat tensor, each at an ``ALIGN_BYTES``-aligned offset.

        ``out`` (a 1-D tensor of that dtype, large enough) is reused instead of allocating: the ring buffers of a
        transport. Otherwise the bucket is allocated on ``device`` (default: the first tensor's device).
        """
        pairs = list(arguments.named_tensors("WeightBucket.pack", "pairs", pairs))
        dtype, numel, entries = cls.layout_of(pairs)
        if out is None:
            flat = torch.empty(numel, dtype=dtype, device=device if device is not None else pairs[0][1].device)
        else:
            if out.dtype != dtype or out.dim() != 1 or out.numel() < numel:
                raise MemmgrInputError(f"WeightBucket.pack: out is {out.dtype} x {tuple(out.shape)} but the bucket "
                                       f"needs a 1-D {dtype} tensor of at least {numel} elements")
            flat = out[:numel]
        bucket = cls(flat, entries)
        dst = [v.reshape(-1) for _, v in bucket.views()]
        src = [t.detach().reshape(-1) for _, t in pairs]
        with torch.no_grad():
            torch._foreach_copy_(dst, src)
        return bucket


def split_per_dtype(bucket: Any) -> list[WeightBucket]:
    """The ``WeightBucket`` s (one per dtype) of a bucket that holds one flat tensor per dtype: an object with
    ``flats`` (dtype -> flat 1-D tensor) and ``entries`` (each with ``name``, ``shape``, ``dtype`` and ``offset`` in
    elements of its dtype), like the Megatron export's ``ExportBucket``. No data is copied."""
    if not is_multi_dtype_bucket(bucket):
        raise MemmgrInputError(f"split_per_dtype: got a {type(bucket).__name__}, not a bucket with one flat tensor "
                               f"per dtype (``flats`` and ``entries``, like the export's ExportBucket)")
    out = []
    for dtype, flat in bucket.flats.items():
        item = flat.element_size()
        entries = tuple(TensorEntry(e.name, tuple(int(s) for s in e.shape), e.dtype, int(e.offset) * item)
                        for e in bucket.entries if e.dtype == dtype)
        if entries:
            out.append(WeightBucket(flat, entries))
    return out


def is_multi_dtype_bucket(obj: Any) -> bool:
    """Whether ``obj`` is a bucket with one flat tensor per dtype (see ``split_per_dtype``)."""
    return not isinstance(obj, WeightBucket) and hasattr(obj, "flats") and hasattr(obj, "entries")


def as_specs(items: Iterable[Any]) -> list[ParamSpec]:
    """``ParamSpec`` s from anything with ``name``, ``shape`` and ``dtype`` (e.g. the export's entries, vLLM's
    ``ParamMeta``)."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise MemmgrInputError(f"as_specs: items must be an iterable of tensor descriptions, got "
                               f"{type(items).__name__}")
    specs = []
    for s in items:
        if isinstance(s, ParamSpec):
            specs.append(s.spec())
        elif all(hasattr(s, a) for a in ("name", "shape", "dtype")):
            specs.append(ParamSpec(str(s.name), tuple(int(d) for d in s.shape), s.dtype))
        else:
            raise MemmgrInputError(f"as_specs: {s!r:.80} has no name, shape and dtype; pass ParamSpecs, the "
                                   f"export's entries or vLLM's ParamMeta")
    return specs


def group_pairs(pairs: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES
                ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Groups a stream of ``(name, tensor)`` pairs into lists of one dtype whose aligned bytes stay within
    ``bucket_bytes`` (a larger tensor gets a list of its own), keeping the stream's order within each dtype. Lazy: a
    list is yielded when it is full, so at most one open list per dtype is held. What ``bucketize`` packs, and what
    a transport that packs straight into its own buffers (``CudaIpcTransport.send_pairs``) takes."""
    arguments.integer("bucketize", "bucket_bytes", bucket_bytes, minimum=1)
    return _group_pairs(arguments.named_tensors("bucketize", "pairs", pairs), bucket_bytes)


def _group_pairs(pairs: Iterator[tuple[str, torch.Tensor]], bucket_bytes: int
                 ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    open_: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    fill: dict[torch.dtype, int] = {}
    seen: set[str] = set()
    for name, t in pairs:
        if name in seen:
            raise MemmgrInputError(f"bucketize: tensor {name!r} appears twice in the weight stream; each name must "
                                   f"be sent once per sync")
        seen.add(name)
        nbytes = aligned(t.numel() * t.element_size())
        members = open_.setdefault(t.dtype, [])
        if members and fill[t.dtype] + nbytes > bucket_bytes:
            yield list(members)
            members.clear()
            fill[t.dtype] = 0
        members.append((name, t))
        fill[t.dtype] = fill.get(t.dtype, 0) + nbytes
    for members in open_.values():
        if members:
            yield list(members)


def bucketize(pairs: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES, *,
              device: torch.device | str | None = None) -> Iterator[WeightBucket]:
    """Packs a stream of ``(name, tensor)`` pairs into flat per-dtype buckets of at most ``bucket_bytes`` (a larger
    tensor gets a bucket of its own), keeping the stream's order within each dtype (see ``group_pairs``). Each bucket
    is a new tensor on ``device`` (default: its first tensor's device)."""
    groups = group_pairs(pairs, bucket_bytes)  # checks the arguments now, not at the first bucket
    return (WeightBucket.pack(group, device=device) for group in groups)


def specs_of(weights: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor]) -> list[ParamSpec]:
    """The ``ParamSpec`` of each ``(name, tensor)`` (reads shapes and dtypes only)."""
    pairs = arguments.named_tensors("specs_of", "weights", weights)
    return [ParamSpec(n, tuple(int(s) for s in t.shape), t.dtype) for n, t in pairs]


def check_specs(sent: Sequence[ParamSpec], held: Mapping[str, tuple[Sequence[int], torch.dtype]], *,
                where: str = "the engine", require_all: bool = True, sent_as: Mapping[str, str] | None = None,
                fix: str | None = None) -> None:
    """Raises ``MemmgrSyncMismatchError`` if the weights about to be sent do not fit what ``where`` holds.

    ``held`` maps each name the engine accepts to (shape, dtype). A sent name the engine lacks, a shape or dtype
    that differs, a name sent twice, and (with ``require_all``) an engine weight that is not sent are each named in
    the message, with the closest engine names for an unknown one. ``sent_as`` (engine name -> the trainer's name
    of that tensor) adds the trainer's name to each; ``fix`` replaces the message's advice.
    """
    sent = as_specs(sent)
    if not isinstance(held, Mapping):
        raise MemmgrInputError(f"check_specs: held must map each engine weight's name to (shape, dtype), got "
                               f"{type(held).__name__}")
    sent_as = sent_as or {}

    def label(name: str) -> str:
        return f"{name!r}" + (f" (trainer tensor {sent_as[name]!r})" if name in sent_as else "")

    problems: list[str] = []
    names: set[str] = set()
    for spec in sent:
        if spec.name in names:
            problems.append(f"{label(spec.name)} is sent twice")
            continue
        names.add(spec.name)
        if spec.name not in held:
            close = difflib.get_close_matches(spec.name, list(held), n=3)
            problems.append(f"{label(spec.name)} (shape {list(spec.shape)}, {dtype_name(spec.dtype)}): {where} has "
                            f"no weight of that name" + (f" (closest: {close})" if close else ""))
            continue
        shape, dtype = held[spec.name]
        shape = tuple(int(s) for s in shape)
        if shape != spec.shape or dtype != spec.dtype:
            problems.append(f"{label(spec.name)}: sent shape {list(spec.shape)}, {dtype_name(spec.dtype)} but "
                            f"{where} holds shape {list(shape)}, {dtype_name(dtype)}")
    if require_all:
        missing = [n for n in held if n not in names]
        if missing:
            problems.append(f"{len(missing)} weight(s) of {where} are not sent: {missing[:5]}"
                            + (" ..." if len(missing) > 5 else ""))
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise MemmgrSyncMismatchError(
            f"weight sync refused before any weight moved; {where} keeps its previous weights. "
            + "; ".join(problems[:8]) + more + ". " + (fix or "Send the engine's checkpoint names (HF names for "
            "vLLM) with its shapes and dtype: fix the export's name mapping, build trainer and engine from the same "
            "architecture, or cast to the engine's dtype"))


class Transport(ABC):
    """The trainer side of one data plane: hands a stream of ``WeightBucket`` s to an engine.

    A transport may be given an ``announce`` callable: the control channel to the engine (for vLLM, its
    ``update_weights`` RPC). ``send_bucket`` then passes ``describe(bucket)`` to it while the data moves, and returns
    once the engine has loaded the bucket, so the caller may refill the bucket's memory afterwards. ``finish``
    returns once the engine has every bucket of this sync; ``close`` releases the channel. Failures raise
    ``MemmgrSyncError`` (``MemmgrSyncTimeoutError`` for a peer that does not answer) naming the rank and the step.

    A sync is ``start`` -> ``send_bucket`` ... -> ``finish``; whoever drives it calls ``abort`` when it stops
    part-way. Transports whose engine keeps sync sessions (``ModuleWeightLoader``, the IPC engine's
    ``CudaIpcReceiver.handle``) open one at ``start``, commit it at ``finish`` and roll it back at ``abort`` or when
    the engine fails, so a failed sync leaves the engine on its previous weights.
    """

    #: short name of the transport, used in messages
    name: str = "transport"
    #: what the engine holds (name -> (shape, dtype)), where the trainer knows it: ``start`` then checks the sync
    #: against it before any weight moves
    held: Mapping[str, tuple[Sequence[int], torch.dtype]] | None = None

    def start(self, specs: Sequence[ParamSpec]) -> None:
        """Called once per sync, after validation and before the first bucket: with ``held`` known, raises
        ``MemmgrSyncMismatchError`` (nothing moved, the engine keeps its weights) if a sent name is not one the
        engine holds or its shape or dtype differs."""
        if self.held is not None:
            check_specs(specs, self.held, where=f"the engine of the {self.name} transport", require_all=False)

    def reserve(self, dtype: torch.dtype, numel: int) -> torch.Tensor | None:
        """Memory of the transport (``numel`` elements of ``dtype``) that the next bucket of that dtype may be packed
        into in place: ``send_bucket`` of a bucket whose flat tensor is that memory then sends it without a copy.
        None (the default) when the transport has no such memory: the caller allocates the bucket itself."""
        return None

    def release_reservations(self) -> None:
        """Forgets memory ``reserve`` handed out that was never sent (a sync that stopped part-way)."""

    def describe(self, bucket: WeightBucket) -> dict[str, Any]:
        """The control message a receiver needs for this bucket: its layout (plus e.g. an IPC handle)."""
        return bucket.meta()

    @abstractmethod
    def send_bucket(self, bucket: WeightBucket) -> None:
        """Moves one bucket to the engine."""

    def finish(self) -> None:
        """Returns once every bucket sent in this sync has reached the engine (and, where the engine has sync
        sessions, the engine committed them)."""

    def abort(self, reason: str = "the sync failed") -> None:
        """Tells the engine that this sync stopped part-way (best effort; never raises): an engine with sync
        sessions puts back every tensor the sync overwrote (or, built non-atomic, marks itself not consistent)."""

    def close(self) -> None:
        """Releases the channel; the transport cannot send afterwards."""


__all__ = ["ALIGN_BYTES", "DEFAULT_BUCKET_BYTES", "ParamSpec",
           "TensorEntry", "WeightBucket", "bucketize", "group_pairs",
           "split_per_dtype", "is_multi_dtype_bucket", "as_specs",
           "specs_of", "check_specs", "Transport", "dtype_name", "dtype_from_name", "itemsize", "aligned",
           "padded_numel"]
