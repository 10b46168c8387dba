"""vLLM's own weight-transfer backends driven by ``VLLMWeightSync`` on GPUs: ``ipc`` (the engine on the trainer's
GPU) and ``nccl`` (the engine on another GPU), each with a real vLLM engine started with
``vllm_engine_kwargs(backend=...)``. The synced weights generate like transformers, a mismatch moves nothing, and a
sync whose source fails part-way leaves the engine generating as before (the worker extension's atomicity bracket).
Skipped without CUDA (and, for nccl, without two GPUs)."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BACKEND_GPUS = {"ipc": 1, "nccl": 2}


@pytest.fixture(params=list(BACKEND_GPUS))
def engine(request, tmp_path_factory):
    pytest.importorskip("vllm")
    pytest.importorskip("transformers")
    backend = request.param
    if torch.cuda.device_count() < BACKEND_GPUS[backend]:
        pytest.skip(f"{backend} needs {BACKEND_GPUS[backend]} GPUs")
    from memmgr.tools import vllm_models as vs

    folder = str(tmp_path_factory.mktemp(f"gpu_{backend}"))
    hf = vs.build_tiny_model(folder)
    llm = vs.start_engine(folder, backend=backend, gpu_memory_utilization=0.3)  # vllm_engine_kwargs(backend=...)
    yield backend, llm, hf
    vs.stop_engine(llm)


def test_vllm_backend_syncs_generates_like_transformers_and_rolls_back_a_failed_sync(engine):
    from memmgr.errors import MemmgrSyncMismatchError
    from memmgr.sync.engines.vllm import VLLMWeightSync
    from memmgr.tools import vllm_models as vs

    backend, llm, hf = engine
    device = torch.device("cuda", 0 if backend == "ipc" else 1)  # nccl: the trainer on a GPU of its own
    torch.cuda.set_device(device)
    sync = VLLMWeightSync(llm, backend=backend, timeout_s=120)
    try:
        weights = {n: t.to(device) for n, t in vs.new_weights(hf, seed=1).items()}
        sync.sync(weights, weight_version=f"{backend}-1")
        assert llm.get_weight_version() == f"{backend}-1"
        expected = vs.greedy_hf(vs.hf_model_with(hf, {n: t.cpu() for n, t in weights.items()}))
        assert vs.greedy_vllm(llm) == expected

        bad = dict(weights)
        name = "model.layers.1.mlp.down_proj.weight"
        bad[name] = bad[name][:, :-1].contiguous()
        with pytest.raises(MemmgrSyncMismatchError, match=name.replace(".", r"\.")):
            sync.sync(bad, weight_version="never")
        assert vs.greedy_vllm(llm) == expected

        new = {n: t.to(device) for n, t in vs.new_weights(hf, seed=2).items()}
        names = list(new)

        def failing():
            for i, n in enumerate(names):
                if i == len(names) // 2:
                    raise RuntimeError("injected: the trainer failed mid-sync")
                yield n, new[n]

        from memmgr.sync.transports.base import specs_of

        with pytest.raises(Exception, match="injected"):
            sync.sync(failing(), specs=specs_of(new), weight_version="never")
        assert llm.get_weight_version() == f"{backend}-1"
        assert vs.greedy_vllm(llm) == expected  # every layer serves its previous weights
        sync.sync(new, weight_version=f"{backend}-2")
        assert vs.greedy_vllm(llm) == vs.greedy_hf(vs.hf_model_with(hf, {n: t.cpu() for n, t in new.items()}))
    finally:
        sync.close()
