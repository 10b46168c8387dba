"""The trainer side of ``memmgr_gloo``: ``VLLMWeightSync`` streams the trainer's weights into a running vLLM engine.

Start the engine with ``vllm.LLM(model, **vllm_engine_kwargs())`` (adds the backend and the worker extension), then
``VLLMWeightSync(llm).connect()`` and ``sync(weights, weight_version=...)``. A sync checks the names, shapes and
dtypes it is about to send against what the engine holds (``metadata.engine_weight_metadata``, asked from every
worker) before any weight moves, announces them to the workers as a manifest, streams flat per-dtype
``WeightBucket`` s (one ``update_weights`` chunk per bucket, its data broadcast over gloo while the engine
receives), and commits the new ``weight_version`` only after every engine worker finished. A failure mid-sync
abandons it: the workers put back their previous weights (``atomic=True``, see ``worker.py``) and no version is
committed; unless the stream merely disagreed with its specs, the group is dropped and the next sync reconnects.

This module imports nothing of the worker side (``worker.py``, ``served.py``).
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from memmgr import arguments
from memmgr.errors import MemmgrInputError, MemmgrStateError, MemmgrSyncError, MemmgrSyncMismatchError
from memmgr.sync.engines.vllm.client import as_client
from memmgr.sync.engines.vllm.metadata import decode_metadata
from memmgr.sync.engines.vllm.plan import Weights, plan_buckets
from memmgr.sync.engines.vllm.registry import BACKEND
from memmgr.sync.transports.base import DEFAULT_BUCKET_BYTES, WeightBucket, check_specs, dtype_name
from memmgr.sync.transports.gloo import GlooTransport, connect

logger = logging.getLogger("memmgr")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for the group's store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class VLLMSyncReport:
    """What one sync did: buckets and weight bytes moved, wall time from entering ``sync`` to the engine having
    committed, and the weight version committed."""
    weight_version: str
    buckets: int
    nbytes: int
    seconds: float

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class VLLMWeightSync:
    """Trainer side of memmgr's vLLM weight sync (the ``memmgr_gloo`` backend).

    ``client`` is the engine's control plane: a ``vllm.LLM`` (offline, wrapped in ``OfflineLLMClient``), or
    anything with the four methods of vLLM's ``VLLMWeightSyncClient`` protocol (plain dicts) plus ``collective_rpc``
    (to ask the engine what it holds). ``num_workers`` is the number of engine worker processes (tensor x pipeline
    x data parallel; default: as many as answer ``collective_rpc``).
    Every step is bounded by ``timeout_s``; a peer that does not answer raises ``MemmgrSyncTimeoutError``.
    ``atomic`` (default True) has every worker keep a host copy of what it serves for the length of a sync and put
    it back if the sync fails, so the engine never serves a mix of old and new weights; False saves that copy and
    time, and a failed sync then leaves the engine not consistent (``consistent()``) until a sync commits.
    Bad arguments raise ``MemmgrInputError`` naming them.
    """

    def __init__(self, client: Any, *, master_address: str = "127.0.0.1", master_port: int | None = None,
                 num_workers: int | None = None, timeout_s: float = 120.0,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, atomic: bool = True):
        where = "VLLMWeightSync"
        arguments.string(where, "master_address", master_address)
        arguments.integer(where, "master_port", master_port, minimum=1, maximum=65535, optional=True)
        arguments.integer(where, "num_workers", num_workers, minimum=1, maximum=1 << 20, optional=True)
        arguments.number(where, "timeout_s", timeout_s, positive=True)
        arguments.integer(where, "bucket_bytes", bucket_bytes, minimum=1)
        arguments.boolean(where, "atomic", atomic)
        client = as_client(client)
        for meth in ("init_weight_transfer_engine", "start_weight_update", "update_weights", "finish_weight_update",
                     "collective_rpc"):
            if not callable(getattr(client, meth, None)):
                raise MemmgrInputError(f"VLLMWeightSync: client {type(client).__name__} has no {meth}(); pass a "
                                       f"vllm.LLM started with vllm_engine_kwargs(), or a client with vLLM's "
                                       f"weight-transfer methods and collective_rpc")
        self.client = client
        self.master_address = master_address
        self.master_port = master_port
        self._fixed_port = master_port is not None
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.bucket_bytes = int(bucket_bytes)
        self.atomic = atomic
        self.transport: GlooTransport | None = None
        self.syncs = 0
        self.last_report: VLLMSyncReport | None = None

    # -- control plane ------------------------------------------------------------------------------------------------
    def _rpc(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except MemmgrSyncError:
            raise
        except Exception as exc:
            raise MemmgrSyncError(f"vLLM weight sync: the engine failed in {what} ({type(exc).__name__}: "
                                  f"{str(exc)[:800]})") from exc

    def engine_metadata(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of what the engine holds (asked from every worker; they must agree)."""
        answers = self._rpc("collective_rpc('memmgr_weight_metadata')", self.client.collective_rpc,
                            "memmgr_weight_metadata")
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
        return list(self._rpc("collective_rpc('memmgr_weight_state')", self.client.collective_rpc,
                              "memmgr_weight_state"))

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

    def connect(self) -> "VLLMWeightSync":
        """Joins the engine's workers in a gloo group of their own (the engine's ``init_weight_transfer_engine``
        runs on a helper thread while this process hosts the group's store as rank 0)."""
        if self.transport is not None:
            return self
        if self.num_workers is None:
            self.engine_metadata()
        assert self.num_workers is not None
        # a fixed port is the caller's; otherwise a fresh one per connection (a previous group's store may linger)
        port = self.master_port if self._fixed_port else free_port(self.master_address)
        world = 1 + int(self.num_workers)
        init = {"master_address": self.master_address, "master_port": port, "world_size": world, "rank_offset": 1,
                "timeout_s": self.timeout_s, "atomic": self.atomic}
        joined: dict[str, Any] = {}

        def join() -> None:
            try:
                joined["group"] = connect(self.master_address, port, world, 0, timeout_s=self.timeout_s)
            except BaseException as exc:  # handed to the caller below
                joined["error"] = exc

        # the engine's workers block in init_weight_transfer_engine until every rank joined, so this side hosts the
        # store on a thread of its own and watches the RPC: an engine that fails to init raises at once
        joiner = threading.Thread(target=join, name="memmgr-gloo-join", daemon=True)
        joiner.start()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="memmgr-vllm-init") as pool:
            future = pool.submit(self.client.init_weight_transfer_engine, init)
            while joiner.is_alive():
                if future.done() and future.exception() is not None:
                    exc = future.exception()
                    raise MemmgrSyncError(f"vLLM weight sync: the engine failed in init_weight_transfer_engine "
                                          f"({type(exc).__name__}: {str(exc)[:800]}); start it with "
                                          f"vllm_engine_kwargs() so it has the {BACKEND} backend") from exc
                joiner.join(0.01)
            if "error" in joined:
                raise joined["error"]
            self._rpc("init_weight_transfer_engine", future.result, self.timeout_s)
        group = joined["group"]
        self.master_port = port
        self.transport = GlooTransport(group, announce=self._announce, timeout_s=self.timeout_s)
        return self

    def _announce(self, description: dict[str, Any]) -> None:
        self.client.update_weights({"buckets": [description]})

    # -- one sync ------------------------------------------------------------------------------------------------------
    def sync(self, weights: Weights, *, specs: Sequence[Any] | None = None,
             weight_version: str | None = None) -> VLLMSyncReport:
        """Sends ``weights`` to the engine and commits ``weight_version`` (default: the count of syncs so far).

        ``weights``: a dict or list of ``(hf_name, tensor)``, a list of ``WeightBucket`` s (or of the Megatron
        export's buckets, one flat tensor per dtype), or a one-pass iterator of any of these together with ``specs``
        (``ParamSpec`` s, or the export's ``entries``: anything with name, shape and dtype). Names, shapes and dtypes
        are checked against the engine before any weight moves (``MemmgrSyncMismatchError``; the engine keeps its
        previous weights). The version is committed only after every engine worker finished loading.
        """
        t0 = time.perf_counter()
        if self.transport is None:
            self.connect()
        transport = self.transport
        assert transport is not None
        sent_specs, buckets = plan_buckets(weights, specs, self.bucket_bytes)
        check_specs(sent_specs, self.engine_metadata(), where="the vLLM engine")
        version = str(weight_version) if weight_version is not None else str(self.syncs + 1)
        manifest = [[s.name, list(s.shape), dtype_name(s.dtype)] for s in sent_specs]
        announced = {s.name: s for s in sent_specs}

        self._rpc("start_weight_update", self.client.start_weight_update)
        try:
            self.client.update_weights({"manifest": manifest})
        except Exception as exc:
            raise MemmgrSyncMismatchError(f"vLLM weight sync: the engine refused the sync's manifest before any "
                                          f"weight moved ({str(exc)[:800]}); it keeps its previous weights") from exc
        transport.start(sent_specs)
        nbuckets = nbytes = 0
        seen: set[str] = set()
        try:
            for bucket in buckets:
                for e in bucket.entries:
                    if announced.get(e.name) != e.spec() or e.name in seen:
                        raise MemmgrSyncMismatchError(
                            f"vLLM weight sync: the weight stream yielded {e.name!r} (shape {list(e.shape)}, "
                            f"{dtype_name(e.dtype)}) which its specs do not announce, or twice; the stream and its "
                            f"specs must agree. The sync was abandoned")
                    seen.add(e.name)
                if bucket.flat.device.type != "cpu":  # gloo moves host memory
                    bucket = WeightBucket(bucket.flat.cpu(), bucket.entries)
                transport.send_bucket(bucket)
                nbuckets += 1
                nbytes += bucket.payload_bytes
            transport.finish()
            if seen != set(announced):
                missing = sorted(set(announced) - seen)
                raise MemmgrSyncMismatchError(f"vLLM weight sync: the weight stream ended without {len(missing)} "
                                              f"announced weight(s) (e.g. {missing[:3]}); the sync was abandoned")
        except BaseException as exc:
            self._abandon(exc)
            raise
        self._rpc("finish_weight_update", self.client.finish_weight_update, version)
        self.syncs += 1
        self.last_report = VLLMSyncReport(version, nbuckets, nbytes, time.perf_counter() - t0)
        logger.info("vLLM weight sync %s: %d buckets, %.1f MB in %.3f s", version, nbuckets, nbytes / 1e6,
                    self.last_report.seconds)
        return self.last_report

    def _abandon(self, exc: BaseException) -> None:
        """After a failure mid-sync: asks the engine to restore layers not fully loaded and end its update session,
        without committing a version. Best effort when the transport itself broke (the worker restores on its own
        error then)."""
        try:
            self.client.update_weights({"abort": True})
            self.client.finish_weight_update()
        except Exception as inner:
            logger.warning("vLLM weight sync: could not close the engine's update session after %s: %s",
                           type(exc).__name__, inner)
        if not isinstance(exc, MemmgrSyncMismatchError):
            # the stream disagreeing with its specs is caught between buckets, with the group idle; after anything
            # else a broadcast may be half done, so the group is dropped and the next sync reconnects
            self.close()

    def close(self) -> None:
        """Releases the gloo group on this side and asks the engine to release its side."""
        transport, self.transport = self.transport, None
        if transport is None:
            return
        transport.close()
        shutdown = getattr(self.client, "shutdown_weight_transfer_engine", None)
        if callable(shutdown):
            try:
                shutdown()
            except Exception as exc:
                logger.warning("vLLM weight sync: shutdown_weight_transfer_engine failed: %s", exc)


__all__ = ["VLLMWeightSync", "VLLMSyncReport", "free_port"]
