"""The engine stand-in: a helper process that takes GPU memory and releases it when told."""
import pytest
import torch

import memmgr
from memmgr.tools.engine_standin import EngineStandin

GiB = 1 << 30


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure without a GPU")
def test_standin_without_a_gpu_raises_a_state_error_naming_the_helper_failure():
    with pytest.raises(memmgr.MemmgrStateError, match="engine stand-in on cuda:0: start failed in the helper"):
        EngineStandin(device=0, start_timeout_s=60)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_standin_takes_memory_from_the_gpu_and_gives_it_back():
    with EngineStandin() as engine:
        free_before = torch.cuda.mem_get_info()[0]
        took = engine.take(2 * GiB)
        free_taken = torch.cuda.mem_get_info()[0]
        released = engine.release()
        free_after = torch.cuda.mem_get_info()[0]
        with pytest.raises(memmgr.MemmgrInputError, match="fraction"):
            engine.take(fraction=1.5)
    assert took["bytes"] == 2 * GiB and released["bytes"] == 2 * GiB
    assert free_before - free_taken >= 2 * GiB
    assert free_after - free_taken >= 2 * GiB  # released to the driver, not kept in the helper's cache
