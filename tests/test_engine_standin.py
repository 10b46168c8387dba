"""The bench's engine stand-in: another process on the same GPU takes the freed memory and gives it back."""
import pytest
import torch

from memmgr.tools.engine_standin import EngineStandIn

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_engine_standin_takes_the_free_memory_and_gives_it_back():
    device = torch.device("cuda", torch.cuda.current_device())
    with EngineStandIn(device, headroom_bytes=1 << 30) as engine:
        free_before = torch.cuda.mem_get_info(device)[0]
        held = engine.occupy(4 << 30)
        free_while_held = torch.cuda.mem_get_info(device)[0]
        assert held == 4 << 30
        assert free_while_held <= free_before - held
        engine.release()
        assert torch.cuda.mem_get_info(device)[0] - free_while_held >= 0.9 * held  # given back to the driver
        assert engine.cycle() > 0
        assert engine.last_occupied_bytes > 0
