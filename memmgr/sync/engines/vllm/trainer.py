"""``VLLMWeightSync``: the trainer's weights into a running vLLM engine, through any of vLLM's trainer-side
weight-transfer engines, picked by name.

Every sync takes one path: the weights become a vLLM ``WeightSource`` (``plan.as_weight_source``: a
``MegatronExporter`` becomes an ``ExportWeightSource``), their metadata is checked against what the engine holds
(``metadata.engine_weight_metadata``, asked from every worker) before any weight moves, and the backend's trainer
engine, built once by vLLM's ``WeightTransferTrainerFactory``, sends the source: vLLM's ``ipc`` (CUDA IPC, engine on
the trainer's GPUs) or ``nccl`` (engine on other GPUs), or memmgr's ``memmgr_gloo`` (host memory over gloo: CPU
engines; ``trainer_engine.py``). The ``weight_version`` is committed with the engine's ``finish_weight_update``,
only after every worker loaded everything.

A sync is all-or-nothing by default (``atomic=True``): ``memmgr_gloo``'s workers keep a host copy of what they
serve and put it back when a sync fails; for ``ipc`` and ``nccl``, which keep none, the worker extension does the
same around the backend (``memmgr_begin_weight_update`` / ``memmgr_abandon_weight_update`` over
``collective_rpc``). After a failure other than a stream that disagreed with its metadata, the backend's connection
is dropped and the next sync reconnects.

This module imports nothing of the worker side (``worker.py``, ``served.py``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Collection, Iterator, Mapping, Sequence

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

from memmgr import arguments
from memmgr.errors import MemmgrInputError, MemmgrStateError, MemmgrSyncError, MemmgrSyncMismatchError
from memmgr.sync.engines.vllm.client import as_client, call_engine, shutdown_transfer_engine
from memmgr.sync.engines.vllm.metadata import decode_metadata
from memmgr.sync.engines.vllm.plan import Weights, as_weight_source
from memmgr.sync.engines.vllm.registry import BACKEND, BACKENDS
from memmgr.sync.engines.vllm.source import ExportWeightSource
from memmgr.sync.engines.vllm.trainer_engine import (
    MemmgrGlooTrainerInitInfo,
    free_port,
)
from memmgr.sync.transports.base import DEFAULT_BUCKET_BYTES, as_specs, check_specs

logger = logging.getLogger("memmgr")


@dataclass
class VLLMSyncReport:
    """What one sync did: buckets (``memmgr_gloo``) or layer groups (other backends) and weight bytes moved, wall
    time from entering ``sync`` to the engine having committed, and the weight version committed."""
    weight_version: str
    buckets: int
    nbytes: int
    seconds: float

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class _CommitClient:
    """The caller's client as the backend's trainer engine sees it: ``finish_weight_update`` without a version
    commits the sync's pending one (vLLM's ``ipc`` and ``nccl`` finish without a version), and an abort chunk drops
    it, so that a sync that fails commits nothing."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.pending: str | None = None

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.inner.init_weight_transfer_engine(init_info)

    def start_weight_update(self) -> None:
        self.inner.start_weight_update()

    def update_weights(self, update_info: Any) -> None:
        if isinstance(update_info, Mapping) and update_info.get("abort"):
            self.pending = None
        self.inner.update_weights(update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version, self.pending = (weight_version if weight_version is not None else self.pending), None
        self.inner.finish_weight_update(version)

    def __getattr__(self, name: str) -> Any:  # collective_rpc, shutdown_weight_transfer_engine, ...
        return getattr(self.inner, name)


class _CountedSource(WeightSource):
    """A source as it is sent: delegates every channel and counts the groups and bytes iteration yields."""

    def __init__(self, inner: WeightSource) -> None:
        self.inner = inner
        self.groups_sent = 0
        self.nbytes = 0

    def metadata(self) -> list[ParamMeta]:
        return self.inner.metadata()

    def held_names(self) -> Collection[str] | None:
        return self.inner.held_names()

    def groups(self) -> list[list[str]]:
        return self.inner.groups()

    def _count(self, tensor: Any) -> None:
        if isinstance(tensor, torch.Tensor):
            self.nbytes += tensor.numel() * tensor.element_size()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.inner:
            self._count(tensor)
            yield name, tensor

    def iter_groups(self) -> Iterator[tuple[list[str], list[torch.Tensor]]]:
        for names, tensors in self.inner.iter_groups():
            for t in tensors:
                self._count(t)
            self.groups_sent += 1
            yield names, tensors


class _NoSource(WeightSource):
    """The source a backend's engine is built with before the first sync hands it one (vLLM's ``ipc`` and ``nccl``
    refuse None)."""

    def metadata(self) -> list[ParamMeta]:
        return []

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(())


class VLLMWeightSync:
    """The trainer side of memmgr's vLLM weight sync (see the module docstring).

    ``client`` is the engine's control plane: a ``vllm.LLM`` (offline, wrapped in ``OfflineLLMClient``), or anything
    with the four methods of vLLM's ``VLLMWeightSyncClient`` protocol (plain dicts) plus ``collective_rpc`` (to ask
    the engine what it holds); None on trainer ranks other than 0, which only take part in the source's collective.
    ``backend``: ``"memmgr_gloo"`` (CPU engines), ``"ipc"`` or ``"nccl"`` (vLLM's own, GPUs); the engine must be
    started with the same (``vllm_engine_kwargs(backend=...)``). ``rank``: this trainer process's rank (0 sends).
    ``num_workers`` is the number of engine worker processes (default: as many as answer ``collective_rpc``).
    ``master_address`` / ``master_port`` (None: a free port) are where ``memmgr_gloo`` and ``nccl`` rendezvous.
    Every ``memmgr_gloo`` step is bounded by ``timeout_s``; ``bucket_bytes`` bounds its buckets. ``atomic`` (default
    True): a failed sync leaves the engine on its previous weights, all of them; False saves that host copy and
    time, and a failed ``memmgr_gloo`` sync then leaves the engine not consistent (``consistent()``) until a sync
    commits. ``init_options``: extra fields of the backend's trainer init info (e.g. ``{"packed": False}`` for
    ``nccl``). Bad arguments raise ``MemmgrInputError`` naming them.
    """

    def __init__(self, client: Any, *, backend: str = BACKEND, rank: int = 0, master_address: str = "127.0.0.1",
                 master_port: int | None = None, num_workers: int | None = None, timeout_s: float = 120.0,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, atomic: bool = True,
                 init_options: Mapping[str, Any] | None = None):
        where = "VLLMWeightSync"
        if backend not in BACKENDS:
            raise MemmgrInputError(f"{where}: backend={backend!r} is not one memmgr drives; pick one of {BACKENDS} "
                                   f"('{BACKEND}' for CPU engines, 'ipc' for an engine on the trainer's GPUs, 'nccl' "
                                   f"for one on other GPUs)")
        arguments.integer(where, "rank", rank, minimum=0, maximum=1 << 20)
        arguments.string(where, "master_address", master_address)
        arguments.integer(where, "master_port", master_port, minimum=1, maximum=65535, optional=True)
        arguments.integer(where, "num_workers", num_workers, minimum=1, maximum=1 << 20, optional=True)
        arguments.number(where, "timeout_s", timeout_s, positive=True)
        arguments.integer(where, "bucket_bytes", bucket_bytes, minimum=1)
        arguments.boolean(where, "atomic", atomic)
        if init_options is not None and not isinstance(init_options, Mapping):
            raise MemmgrInputError(f"{where}: init_options must be a dict of the backend's init info fields, got "
                                   f"{type(init_options).__name__}")
        if client is None and rank == 0:
            raise MemmgrInputError(f"{where}: trainer rank 0 sends and needs the engine's client; pass the vllm.LLM "
                                   f"(or a client with vLLM's weight-transfer methods and collective_rpc)")
        if client is not None:
            client = as_client(client)
            for meth in ("init_weight_transfer_engine", "start_weight_update", "update_weights",
                         "finish_weight_update", "collective_rpc"):
                if not callable(getattr(client, meth, None)):
                    raise MemmgrInputError(f"{where}: client {type(client).__name__} has no {meth}(); pass a "
                                           f"vllm.LLM started with vllm_engine_kwargs(), or a client with vLLM's "
                                           f"weight-transfer methods and collective_rpc")
        self.client = client
        self.backend = backend
        self.rank = int(rank)
        self.master_address = master_address
        self.master_port = master_port
        self._fixed_port = master_port is not None
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.bucket_bytes = int(bucket_bytes)
        self.atomic = atomic
        self.init_options = dict(init_options or {})
        self._client = _CommitClient(client)
        self.engine: Any = None  # the backend's trainer engine while connected
        self.syncs = 0
        self.last_report: VLLMSyncReport | None = None

    @property
    def is_sender(self) -> bool:
        return self.rank == 0

    @property
    def transport(self) -> Any:
        """``memmgr_gloo``'s gloo transport while connected (None otherwise, and for other backends)."""
        return getattr(self.engine, "transport", None)

    # -- what the engine holds -----------------------------------------------------------------------------------
    def _collective(self, method: str) -> list[Any]:
        if self.client is None:
            raise MemmgrStateError(f"vLLM weight sync: trainer rank {self.rank} has no client; ask rank 0")
        return list(call_engine(f"collective_rpc({method!r})", self.client.collective_rpc, method))

    def engine_metadata(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of what the engine holds (asked from every worker; they must agree)."""
        answers = self._collective("memmgr_weight_metadata")
        if not answers:
            raise MemmgrSyncError("vLLM weight sync: no engine worker answered memmgr_weight_metadata")
        first = answers[0]
        for rank, other in enumerate(answers[1:], start=1):
            if other != first:
                raise MemmgrSyncError(f"vLLM weight sync: engine workers 0 and {rank} hold different checkpoints; "
                                      f"every worker must serve the same model")
        if self.num_workers is None:
            self.num_workers = len(answers)
        return decode_metadata(first)

    def weight_state(self) -> list[dict[str, Any]]:
        """Each worker's ``{"inconsistent": None or why, "host_bytes": its atomicity copy, "syncing": bool}``."""
        return self._collective("memmgr_weight_state")

    def consistent(self) -> bool:
        """Whether every worker serves the weights of one committed sync (or of its checkpoint). Always True with
        ``atomic``; False after a failed sync with ``atomic=False``, until a sync commits."""
        return all(state.get("inconsistent") is None for state in self.weight_state())

    def check_consistent(self) -> None:
        """Raises ``MemmgrStateError`` if some worker serves a mix of old and new weights (see ``consistent``)."""
        bad = [f"worker {i}: {st['inconsistent']}" for i, st in enumerate(self.weight_state())
               if st.get("inconsistent") is not None]
        if bad:
            raise MemmgrStateError(f"vLLM weight sync: the engine serves a mix of old and new weights ({'; '.join(bad)}"
                                   f"); sync again before generating (or build VLLMWeightSync with atomic=True)")

    # -- the backend ---------------------------------------------------------------------------------------------
    def init_info(self) -> Any:
        """The backend's trainer init info (vLLM's ``IPCTrainerInitInfo`` / ``NCCLTrainerInitInfo``, or
        ``MemmgrGlooTrainerInitInfo``) for this rank, with ``init_options`` merged in."""
        if self.is_sender and self.num_workers is None and self.backend != "ipc":
            self.engine_metadata()
        if self.backend == BACKEND:
            fields: dict[str, Any] = dict(master_address=self.master_address,
                                          master_port=self.master_port if self._fixed_port else None,
                                          num_workers=self.num_workers, timeout_s=self.timeout_s,
                                          bucket_bytes=self.bucket_bytes, atomic=self.atomic)
            cls: Any = MemmgrGlooTrainerInitInfo
        elif self.backend == "ipc":
            from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo as cls
            fields = {}
        else:
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo as cls
            port = self.master_port if self._fixed_port else (free_port(self.master_address) if self.is_sender
                                                              else 0)
            self.master_port = port
            fields = dict(master_address=self.master_address, master_port=port,
                          world_size=1 + int(self.num_workers or 1))
        fields.update(self.init_options)
        try:
            return cls(rank=self.rank, **fields)
        except TypeError as exc:
            raise MemmgrInputError(f"VLLMWeightSync: init_options={self.init_options} do not fit {cls.__name__} "
                                   f"({exc})") from exc

    def connect(self) -> "VLLMWeightSync":
        """Builds the backend's trainer engine through vLLM's ``WeightTransferTrainerFactory`` (its rendezvous with
        the engine's workers included); every trainer rank calls it (``sync`` does, on first use)."""
        if self.engine is not None:
            return self
        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory

        info = self.init_info()
        try:
            self.engine = WeightTransferTrainerFactory.trainer_init(info, client=self._client, source=_NoSource())
        except MemmgrSyncError:
            raise
        except Exception as exc:
            advice = ("; ipc and nccl need CUDA on the trainer and the engine (CPU engines take "
                      f"backend='{BACKEND}'), and the engine must be started with vllm_engine_kwargs(backend="
                      f"{self.backend!r})") if self.backend != BACKEND else ""
            raise MemmgrSyncError(f"vLLM weight sync: the {self.backend} trainer engine failed to start on trainer "
                                  f"rank {self.rank} ({type(exc).__name__}: {str(exc)[:800]}){advice}") from exc
        if self.backend == BACKEND:
            self.master_port = self.engine.master_port
        return self

    # -- one sync ------------------------------------------------------------------------------------------------
    def sync(self, weights: Weights, *, specs: Sequence[Any] | None = None,
             weight_version: str | None = None) -> VLLMSyncReport:
        """Sends ``weights`` to the engine and commits ``weight_version`` (default: the count of syncs so far).

        ``weights``: a vLLM ``WeightSource`` (e.g. ``ExportWeightSource``), a ``MegatronExporter``, a dict or list of
        ``(hf_name, tensor)``, a list of ``WeightBucket`` s (or of the Megatron export's buckets, one flat tensor per
        dtype), or a one-pass iterator of any of these together with ``specs`` (``ParamSpec`` s, or the export's
        ``entries``: anything with name, shape and dtype). Every trainer rank calls it with its own source (the
        export is collective). Names, shapes and dtypes are checked against the engine before any weight moves
        (``MemmgrSyncMismatchError``; the engine keeps its previous weights). The version is committed only after
        every engine worker finished loading.
        """
        t0 = time.perf_counter()
        source = as_weight_source(weights, specs)
        version = str(weight_version) if weight_version is not None else str(self.syncs + 1)
        try:
            self._check_source(source)
        except BaseException:
            _run_out(source)
            raise
        self.connect()
        engine = self.engine
        counted = _CountedSource(source)
        engine.source = counted
        bracket = self.is_sender and self.backend != BACKEND
        try:
            if bracket and self.atomic:
                self._collective("memmgr_begin_weight_update")
            self._client.pending = version
            engine.send_weights()
        except BaseException as exc:
            self._client.pending = None
            self._after_failure(exc, bracket)
            raise
        finally:
            engine.source = _NoSource()
        if bracket and self.atomic:
            self._collective("memmgr_end_weight_update")
        self.syncs += 1
        buckets = engine.last_buckets if self.backend == BACKEND else counted.groups_sent
        self.last_report = VLLMSyncReport(version, buckets, counted.nbytes, time.perf_counter() - t0)
        if self.is_sender:
            logger.info("vLLM weight sync %s over %s: %d %s, %.1f MB in %.3f s", version, self.backend, buckets,
                        "buckets" if self.backend == BACKEND else "layer groups", counted.nbytes / 1e6,
                        self.last_report.seconds)
        return self.last_report

    def _check_source(self, source: WeightSource) -> None:
        """Before any weight moves: the source's metadata against what the engine holds (sender), and that the
        ranks the backend sends from hold every weight (``held_names()``)."""
        meta = source.metadata()
        if self.is_sender:
            check_specs(as_specs(meta), self.engine_metadata(), where="the vLLM engine")
        if self.is_sender or self.backend == "ipc":  # ipc: every rank shares its own copy of every tensor
            held = source.held_names()
            if held is not None:
                lacking = [m.name for m in meta if m.name not in set(held)]
                if lacking:
                    raise MemmgrInputError(
                        f"VLLMWeightSync: the {self.backend} backend sends every weight from trainer rank "
                        f"{'0' if self.backend != 'ipc' else self.rank}, whose source holds {len(meta) - len(lacking)} "
                        f"of {len(meta)} (e.g. not {lacking[0]!r}); build the export with this rank among its "
                        f"receivers (MegatronExporter(..., receivers=...))")

    def _after_failure(self, exc: BaseException, bracket: bool) -> None:
        """After a failed sync: for ``ipc`` and ``nccl`` the workers end the reload and put back what they served
        (``memmgr_abandon_weight_update``; ``memmgr_gloo``'s engine has done so itself), and unless the stream
        merely disagreed with its metadata the connection is dropped (the next sync reconnects)."""
        if bracket:
            try:
                self._collective("memmgr_abandon_weight_update")
            except Exception as inner:
                logger.warning("vLLM weight sync: the workers could not put back their weights after %s: %s",
                               type(exc).__name__, inner)
        if self.backend != BACKEND and not isinstance(exc, MemmgrSyncMismatchError):
            self.close()

    def close(self) -> None:
        """Shuts the backend's trainer engine down and asks the engine to release its side of the connection."""
        engine, self.engine = self.engine, None
        if engine is None:
            return
        try:
            engine.shutdown()
        except Exception as exc:
            logger.warning("vLLM weight sync: the %s trainer engine's shutdown failed: %s", self.backend, exc)
        if self.backend != BACKEND and self.is_sender:  # memmgr_gloo's engine asks itself
            shutdown_transfer_engine(self.client)


def _run_out(source: WeightSource) -> None:
    """After the sender refused a sync before sending: runs a multi-rank export to its end, so that the other
    trainer ranks, which are in its collective, are not left waiting."""
    if isinstance(source, ExportWeightSource) and int(getattr(source.exporter, "world_size", 1)) > 1:
        for _ in source.iter_groups():
            pass


__all__ = ["VLLMWeightSync", "VLLMSyncReport", "free_port"]
