"""The streaming export: megatron-core model chunks -> Hugging Face tensors in flat per-dtype buckets.

Every rank of the job builds a ``MegatronExporter`` and iterates ``buckets()`` together. For each bucket of the plan
(whole megatron parameters, at most ``bucket_bytes`` of Hugging Face tensors, in checkpoint order) each receiver
allocates the bucket's flat tensors; then, round by round (consecutive parameters whose shards together take at most
the largest parameter's bytes), it places the shards it holds itself, and every rank that holds a shard the round
needs (the lowest rank holding it: data-parallel replicas stay idle) reads it from its source and sends it in one
message per receiver, which the receivers place. Point-to-point on the default process group, or on the group given as
``group`` (e.g. one model replica's model-parallel group; ``torch.distributed.batch_isend_irecv``): NCCL on GPUs, gloo
on the CPU.

Extra device memory at any time, per rank: a receiver holds the bucket being filled plus either one staged parameter
(a fused layout read from host memory, placed by kernels on a side stream so that the next host->device copies run
meanwhile; its memory returns once they finish, so a second staged one may exist for that moment) or one round's
received messages (at most the largest parameter's bytes); with the bucket the caller still holds, that is two
buckets plus the largest parameter (twice that parameter for the moment above). A rank that sends holds one
round's message (at most the largest parameter's bytes), a receiver that also sends to other receivers as well.
"""
from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from memmgr import arguments
from memmgr.errors import MemmgrInputError, MemmgrStateError
from memmgr.flat_tensors import BucketizedFlatTensors
from memmgr.sync.export.discovery import local_parameters
from memmgr.sync.export.errors import MemmgrExportError
from memmgr.sync.export.layouts import place, stages_on_device
from memmgr.sync.export.plan import BucketPlan, ExportEntry, ExportPlan, Messages, Unit, build_plan
from memmgr.sync.export.sources import DeviceSource, HostCopySource, WeightSource

logger = logging.getLogger("memmgr")

DEFAULT_BUCKET_BYTES = 256 * 2**20

Allocate = Callable[[torch.dtype, int], "torch.Tensor | None"]


@dataclass(eq=False)
class ExportBucket:
    """Hugging Face tensors packed into one flat 1-D tensor per dtype; ``entries`` says where each one lies."""
    index: int
    flats: dict[torch.dtype, torch.Tensor]
    entries: list[ExportEntry]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.flats.values())

    def tensor(self, entry: ExportEntry) -> torch.Tensor:
        """A view of one entry's tensor inside its flat buffer."""
        return self.flats[entry.dtype].narrow(0, entry.offset, entry.numel).view(entry.shape)

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """``(hf_name, view)`` for every entry, in checkpoint order; the views share the bucket's memory."""
        return [(e.name, self.tensor(e)) for e in self.entries]


def _device_argument(where: str, device: Any) -> torch.device | None:
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise MemmgrInputError(f"{where}: device must be None, a torch.device or a device string such as 'cuda:0' or "
                               f"'cpu', got {device!r} ({type(device).__name__})")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise MemmgrInputError(f"{where}: device={device!r} is not a device torch knows ({exc}); pass None (the "
                               f"device of this rank's parameters), 'cpu' or 'cuda:N'") from exc
    if dev.type not in ("cpu", "cuda"):
        raise MemmgrInputError(f"{where}: device={device!r}: the export builds buckets on 'cpu' (gloo) or 'cuda' "
                               f"(NCCL) only")
    return dev


def _check_open(weights: Any, where: str) -> None:
    """A weights group whose manager was closed refuses (``check_open`` raises MemmgrStateError)."""
    check = getattr(weights, "check_open", None)
    if callable(check):
        check(where)


class MegatronExporter:
    """Exports megatron-core model chunks as Hugging Face tensors (see the module docstring). Collective: every rank
    of ``group`` (None: the default process group) constructs it, with its own chunks, and iterates ``buckets()`` to
    the end; those ranks together must hold the whole model.

    ``model_chunks``: this rank's chunks (what ``for_megatron`` takes: DDP-wrapped or bare GPTModel, one per virtual
    pipeline stage). ``hf_config``: the Hugging Face config of the model the engine serves (its ``model_type``
    picks the family table; sizes are checked against the model). ``weights``: memmgr's weights group
    (``mgr.group("weights")``) to read offloaded parameters from its host copy; None reads ``param.data``.
    ``bucket_bytes``: bound on the Hugging Face bytes of one bucket (a larger single parameter gets a bucket of its
    own). ``receivers``: ranks (in ``group``; in the default group where it is None) that receive full tensors.
    ``device``: where buckets are built (default: the device of this rank's parameters; it must suit the process
    group's backend). ``group``: the torch.distributed group the export runs on, of which this process is a
    member; nothing then runs on the default group.

    Raises MemmgrExportError on every rank, before anything is sent, for an unknown parameter, a family without a
    table, a Hugging Face config that disagrees with the model, or a model that lacks a tensor the family's table
    requires (e.g. a norm replaced by an identity, or q/k norms for qwen3), naming the missing Hugging Face and
    megatron names. Bad ``receivers``, ``device`` or ``bucket_bytes`` raise MemmgrInputError naming the argument.
    ``buckets()`` refuses with MemmgrStateError once the manager of ``weights`` was closed. ``hf_config`` may be any
    object with the Hugging Face config attributes (transformers itself is not needed).

    Build it once, while or after the model exists, and call ``buckets()`` at every sync: the plan (one gather of
    metadata) is made here; each export re-reads the weights where they are then (device or host copy). Rebuild it
    if the model's parameter tensors are replaced (not merely updated, offloaded or onloaded in place).
    """

    def __init__(self, model_chunks: torch.nn.Module | Sequence[torch.nn.Module], hf_config: Any, *,
                 weights: BucketizedFlatTensors | None = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 receivers: Sequence[int] = (0,), device: torch.device | str | None = None, group: Any = None):
        chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        if not chunks or not all(isinstance(c, torch.nn.Module) for c in chunks):
            raise MemmgrExportError("model_chunks must be a torch.nn.Module or a non-empty list of them (the chunks "
                                    "given to for_megatron)")
        where = "MegatronExporter"
        arguments.integer(where, "bucket_bytes", bucket_bytes, minimum=1)
        rank_list = arguments.sequence_of(where, "receivers", receivers,
                                          lambda r: isinstance(r, numbers.Integral) and not isinstance(r, bool),
                                          "global ranks (int)")
        device = _device_argument(where, device)
        self.distributed = dist.is_available() and dist.is_initialized()
        if group is not None:
            try:
                member = self.distributed and dist.get_rank(group) >= 0
            except Exception:  # not a process group
                member = False
            if not member:
                raise MemmgrInputError(f"{where}: group={group!r} is not a torch.distributed group this process is a "
                                       f"member of (torch.distributed is {'' if self.distributed else 'not '}"
                                       f"initialized); pass e.g. parallel_state.get_model_parallel_group(), or None "
                                       f"for the default group")
        self.group = group
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world_size = dist.get_world_size(group) if self.distributed else 1
        self.receivers = sorted({int(r) for r in rank_list})
        if not self.receivers or any(r < 0 or r >= self.world_size for r in self.receivers):
            raise MemmgrExportError(f"{where}: receivers={[int(r) for r in rank_list]} must be a non-empty list of "
                                    f"ranks of the export's group in [0, {self.world_size}) (the ranks that feed the "
                                    f"engine); pass "
                                    f"e.g. receivers=(0,)")
        self.bucket_bytes = bucket_bytes

        self._weights = weights
        if weights is not None:
            _check_open(weights, "MegatronExporter")
        local = local_parameters(chunks)
        try:
            self.source: WeightSource = (HostCopySource(weights, zip(local.local_names, local.tensors), chunks)
                                         if weights is not None else DeviceSource())
        except MemmgrExportError as e:
            self.source = DeviceSource()
            local.errors.append(str(e))
        summary = local.summary()
        if self.distributed:
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, summary, group=group)
        else:
            gathered = [summary]
        self.plan: ExportPlan = build_plan(gathered, hf_config, bucket_bytes)
        self._local = {(info.name, info.expert_offset, info.shard): (name, tensor)
                       for info, name, tensor in zip(local.infos, local.local_names, local.tensors)}
        if device is None:
            device = local.tensors[0].device if local.tensors else torch.device("cpu")
        self.device = device
        self._side_stream: torch.cuda.Stream | None = None  # where staged shards are placed (made at first use)
        logger.info("export plan: %s, %d Hugging Face tensors in %d bucket(s) of <= %.1f MiB, receivers %s",
                    self.plan.family.name, len(self.plan.entries), len(self.plan.buckets), bucket_bytes / 2**20,
                    self.receivers)

    # ---- what will be exported ----
    @property
    def entries(self) -> list[ExportEntry]:
        """Every Hugging Face tensor of the export, in order (the same list on every rank)."""
        return self.plan.entries

    @property
    def bucket_layouts(self) -> list[tuple[dict[torch.dtype, int], list[ExportEntry]]]:
        """For each bucket ``buckets()`` will yield, in order: the length (elements) of its flat tensor of each dtype
        and its entries. The same on every rank and known before any weight moves, so a transport can announce the
        layout once and receivers can pre-allocate."""
        return [(dict(bp.numels), [e for u in bp.units for e in u.entries]) for bp in self.plan.buckets]

    @property
    def is_receiver(self) -> bool:
        return self.rank in self.receivers

    # ---- the stream ----
    def _read(self, unit: Unit, shard: int) -> torch.Tensor:
        name, tensor = self._local[(unit.key[0], unit.key[1], shard)]
        return self.source.read(name, tensor)

    def _place_shard(self, unit: Unit, shard: int, data: torch.Tensor, outputs: list[torch.Tensor]) -> None:
        if data.device != self.device and stages_on_device(unit.kind):
            data = torch.empty(data.shape, dtype=data.dtype, device=self.device).copy_(data, non_blocking=True)
            if self.device.type == "cuda":
                self._place_aside(unit, shard, data, outputs)
                return
        place(unit.kind, data, shard, unit.geometry, outputs)

    def _place_aside(self, unit: Unit, shard: int, staged: torch.Tensor, outputs: list[torch.Tensor]) -> None:
        """Places a staged shard with kernels on a side stream, so that the host->device copies of the next
        parameters keep the link busy meanwhile (on one stream the link idles while the strided kernels run)."""
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        self._side_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side_stream):
            place(unit.kind, staged, shard, unit.geometry, outputs)
        staged.record_stream(self._side_stream)

    def _join_placements(self) -> None:
        """Orders the bucket's consumers (on the current stream) after placements made beside it."""
        if self._side_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._side_stream)

    def _message(self, bp: BucketPlan, messages: Messages) -> torch.Tensor:
        items, total = messages[self.rank]
        buf = torch.empty(total, dtype=torch.uint8, device=self.device)
        for pos, shard, offset in items:
            unit = bp.units[pos]
            view = buf.narrow(0, offset, unit.shard_nbytes).view(unit.dtype).view(unit.shard_shape)
            view.copy_(self._read(unit, shard), non_blocking=True)
        return buf

    def _preflight(self) -> None:
        """Every rank checks that it can read the shards it sends; one gather, then all raise together."""
        problems = []
        for bp in self.plan.buckets:
            for messages in bp.rounds:
                for pos, shard, _offset in messages.get(self.rank, ([], 0))[0]:
                    unit = bp.units[pos]
                    name, tensor = self._local[(unit.key[0], unit.key[1], shard)]
                    problem = self.source.problem(name, tensor)
                    if problem and len(problems) < 4:
                        problems.append(f"rank {self.rank}: {problem}")
        if self.distributed:
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, problems, group=self.group)
            problems = [p for rank_problems in gathered for p in rank_problems]
        if problems:
            raise MemmgrStateError("cannot export now, nothing was sent: " + "; ".join(problems[:8]))

    def buckets(self, allocate: Allocate | None = None) -> Iterator[ExportBucket]:
        """Yields the buckets on receiver ranks (nothing elsewhere); every rank must iterate to the end. A bucket's
        tensors are valid until the caller drops them (the exporter keeps no reference once the next one is asked
        for); a caller that holds each bucket until the next arrives holds two. Before anything moves, every rank
        checks that its weights can be read (one small gather) and all raise MemmgrStateError together if not.

        ``allocate(dtype, numel)``, if given, provides each bucket's flat tensor of a dtype (e.g. a transport's
        ``reserve``, so that the bucket is packed straight into the memory it is sent from); where it returns None
        the exporter allocates."""
        _check_open(self._weights, "MegatronExporter.buckets")
        self._preflight()
        me = self.rank
        others = [q for q in self.receivers if q != me]
        receiver = self.is_receiver
        try:
            for bp in self.plan.buckets:
                if receiver:
                    flats = {dtype: self._flat(dtype, n, allocate) for dtype, n in bp.numels.items()}
                    bucket = ExportBucket(bp.index, flats, [e for u in bp.units for e in u.entries])
                    outputs = [[bucket.tensor(e) for e in u.entries] for u in bp.units]
                for messages in bp.rounds:
                    if receiver:
                        # own shards first, before any receive buffer exists: a staged shard and the received
                        # messages are never held at the same time
                        for pos, shard, _offset in messages.get(me, ([], 0))[0]:
                            unit = bp.units[pos]
                            self._place_shard(unit, shard, self._read(unit, shard), outputs[pos])
                    ops = []
                    send_buf = self._message(bp, messages) if me in messages and others else None
                    if send_buf is not None:
                        ops += [dist.P2POp(dist.isend, send_buf, self._peer(q), self.group) for q in others]
                    recv_bufs: dict[int, torch.Tensor] = {}
                    if receiver:
                        for provider, (_items, total) in messages.items():
                            if provider != me:
                                recv_bufs[provider] = torch.empty(total, dtype=torch.uint8, device=self.device)
                                ops.append(dist.P2POp(dist.irecv, recv_bufs[provider], self._peer(provider),
                                                      self.group))
                    for work in (dist.batch_isend_irecv(ops) if ops else []):
                        work.wait()
                    for provider, buf in recv_bufs.items():
                        for pos, shard, offset in messages[provider][0]:
                            unit = bp.units[pos]
                            data = buf.narrow(0, offset, unit.shard_nbytes).view(unit.dtype).view(unit.shard_shape)
                            place(unit.kind, data, shard, unit.geometry, outputs[pos])
                    del recv_bufs, send_buf, ops
                if receiver:
                    del outputs, flats
                    self._join_placements()
                    yield bucket
                    del bucket
        finally:  # a failed or abandoned export leaves no placement running into memory handed back
            self._join_placements()

    def _peer(self, rank: int) -> int:
        """The global rank of ``rank`` of the export's group (point-to-point ops name global ranks)."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _flat(self, dtype: torch.dtype, numel: int, allocate: Allocate | None) -> torch.Tensor:
        given = allocate(dtype, numel) if allocate is not None else None
        if given is None:
            return torch.empty(numel, dtype=dtype, device=self.device)
        if not isinstance(given, torch.Tensor) or given.dtype != dtype or given.dim() != 1 or \
                given.numel() < numel or given.device != self.device or not given.is_contiguous():
            shown = (f"{given.dtype} x {tuple(given.shape)} on {given.device}" if isinstance(given, torch.Tensor)
                     else type(given).__name__)
            raise MemmgrInputError(f"MegatronExporter.buckets: allocate({dtype}, {numel}) returned {shown}; it must "
                                   f"return None or a contiguous 1-D {dtype} tensor of at least {numel} elements on "
                                   f"{self.device}")
        return given[:numel]

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(hf_name, tensor)`` pairs on receiver ranks, bucket by bucket (views into the current bucket)."""
        for bucket in self.buckets():
            yield from bucket.named_tensors()


def export_buckets(model_chunks: torch.nn.Module | Sequence[torch.nn.Module], hf_config: Any,
                   **kwargs: Any) -> Iterator[ExportBucket]:
    """One-shot form: ``MegatronExporter(model_chunks, hf_config, **kwargs).buckets()`` (collective)."""
    return MegatronExporter(model_chunks, hf_config, **kwargs).buckets()
