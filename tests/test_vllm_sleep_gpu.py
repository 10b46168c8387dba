"""memmgr's vLLM sleep-mode backend on a GPU (needs a CUDA build of vLLM, whose cumem allocator places memory at
fixed addresses): the backend object around a transformers model whose forward step is a captured CUDA graph
(suspend frees the memory, resume brings the weights back at the same addresses, the graph replays bit-exact), and a
vLLM engine with CUDA graphs that sleeps and wakes through the backend and generates the same tokens. Skipped
without CUDA."""
from __future__ import annotations

import pytest
import torch

from conftest import capture_forward

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture
def cumem():
    pytest.importorskip("vllm.device_allocator.cumem")  # a CUDA build of vLLM (not the GPU machine's subset)
    from vllm.device_allocator.cumem import CuMemAllocator, cumem_available

    if not cumem_available:
        pytest.skip("this vLLM has no cumem allocator (a CPU build)")
    return CuMemAllocator.get_instance()


def test_the_backend_suspends_and_resumes_a_model_whose_step_is_a_captured_cuda_graph(cumem, tmp_path):
    pytest.importorskip("transformers")
    from memmgr.sync.engines.vllm.sleep import MemmgrSleepBackend
    from memmgr.tools import vllm_models as vs

    hf = vs.build_tiny_model(str(tmp_path), hidden=256, layers=4)
    with cumem.use_memory_pool(tag="weights"):
        model = hf.to("cuda")
    with cumem.use_memory_pool(tag="kv_cache"):
        kv = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")  # stands for the KV cache: discarded at level 1
    ptrs = [p.data_ptr() for p in model.parameters()] + [kv.data_ptr()]
    ids = torch.tensor([list(vs.PROMPTS[0])], device="cuda")
    graph, logits, expected = capture_forward(model, ids)

    backend = MemmgrSleepBackend()
    held = sum(a.nbytes for a in backend.memory.allocations())
    torch.cuda.synchronize()
    free_awake = torch.cuda.mem_get_info()[0]
    backend.suspend(1)
    assert backend.state() == "SUSPENDED"
    assert torch.cuda.mem_get_info()[0] - free_awake >= held - (4 << 20)
    assert backend.status()["kv_cache"]["discarded"] >= kv.numel()
    backend.resume()
    assert backend.state() == "RUNNING"
    assert [p.data_ptr() for p in model.parameters()] + [kv.data_ptr()] == ptrs
    logits.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(logits, expected)


def test_a_vllm_engine_with_cuda_graphs_sleeps_and_wakes_through_the_backend(cumem, tmp_path):
    pytest.importorskip("transformers")
    from memmgr.sync.engines.vllm.sleep import use_memmgr_sleep_backend
    from memmgr.tools import vllm_models as vs

    vs.build_tiny_model(str(tmp_path))
    llm = vs.start_engine(str(tmp_path), backend="ipc", enable_sleep_mode=True, enforce_eager=False,
                          gpu_memory_utilization=0.3)
    try:
        assert use_memmgr_sleep_backend(llm)
        before = vs.greedy_vllm(llm)
        torch.cuda.synchronize()
        free_awake = torch.cuda.mem_get_info()[0]
        llm.sleep(level=1)
        assert torch.cuda.mem_get_info()[0] - free_awake > (1 << 30)  # the KV cache (0.3 of the GPU) went back
        llm.wake_up()
        assert vs.greedy_vllm(llm) == before
        for _ in range(2):  # again, through the reused host buffers
            llm.sleep(level=1)
            llm.wake_up()
        assert vs.greedy_vllm(llm) == before
    finally:
        vs.stop_engine(llm)
