"""Same-address device memory on a GPU (memmgr._pinned.VmmRange, memmgr.same_address): a buffer's physical memory
goes back to the driver and comes back at the same address, tensors over it keep their data_ptr(), contents copied
out and back are bit-exact, NVML sees the memory freed while released, and a CUDA graph captured on the buffer
replays after the memory came back. Skipped without CUDA."""
from __future__ import annotations

import gc

import pytest
import torch

from conftest import skip_without_same_address

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MIB = 1 << 20


@pytest.fixture(autouse=True)
def _needs_vmm():
    skip_without_same_address()


def _stream() -> torch.cuda.Stream:
    from memmgr.transfer import copy_stream

    return copy_stream(torch.device("cuda", torch.cuda.current_device()), "same-address-test")


def _pinned(nbytes: int) -> torch.Tensor:
    from memmgr.host_memory import allocate_host_buffer

    return allocate_host_buffer(nbytes, pin=True).tensor


def test_range_is_rounded_to_the_granularity_and_accounted_while_it_lives():
    from memmgr._native import native_module

    native = native_module()
    device = torch.cuda.current_device()
    granularity = native.vmm_granularity(device)
    gc.collect()  # ranges of earlier tests' objects go now, not in the middle of this count
    before = native.vmm_bytes()
    r = native.VmmRange(granularity + 1, device)
    assert r.reserved_bytes == 2 * granularity and r.nbytes == granularity + 1 and not r.mapped
    assert r.address % granularity == 0
    assert native.vmm_bytes() == (before[0] + 2 * granularity, before[1])
    assert r.map() and r.mapped and not r.map()  # a second map is a no-op
    assert native.vmm_bytes() == (before[0] + 2 * granularity, before[1] + 2 * granularity)
    t = r.tensor()
    assert t.data_ptr() == r.address and t.numel() == granularity + 1 and t.device.type == "cuda"
    assert r.unmap() and not r.mapped and not r.unmap()
    assert native.vmm_bytes()[1] == before[1]
    del r  # the tensor's storage keeps the reservation alive
    assert native.vmm_bytes()[0] == before[0] + 2 * granularity
    del t
    assert native.vmm_bytes() == before


def test_data_ptr_of_the_buffer_and_its_views_is_unchanged_and_contents_come_back_bit_exact():
    from memmgr.same_address import SameAddressBuffer, offload_buffers, onload_buffers

    nbytes = 24 * MIB + 123
    buf = SameAddressBuffer(nbytes)
    view = buf.tensor[: 16 * MIB].view(torch.float32)
    view.copy_(torch.randn(view.numel(), device="cuda"))
    buf.tensor[16 * MIB:].random_(0, 256)
    expected = buf.tensor.cpu().clone()
    ptrs = (buf.tensor.data_ptr(), view.data_ptr())
    host = _pinned(nbytes)
    offload_buffers([(buf, host)], _stream())
    assert not buf.mapped and torch.equal(host, expected)
    onload_buffers([(buf, host)], _stream())
    assert buf.mapped and (buf.tensor.data_ptr(), view.data_ptr()) == ptrs
    assert torch.equal(buf.tensor.cpu(), expected)


def test_the_memory_is_freed_while_released_as_the_driver_and_nvml_see_it():
    from memmgr import nvml
    from memmgr.same_address import SameAddressBuffer, offload_buffers, onload_buffers

    nbytes = 512 * MIB
    buf = SameAddressBuffer(nbytes)
    buf.tensor.fill_(3)
    host = _pinned(nbytes)  # before the readings: mapping pinned memory for the device may take some device memory
    torch.cuda.synchronize()
    index = nvml.nvml_index(torch.cuda.current_device())
    used_mapped = nvml.device_memory(index).used if index is not None else None
    free_mapped = torch.cuda.mem_get_info()[0]
    offload_buffers([(buf, host)], _stream())
    assert torch.cuda.mem_get_info()[0] - free_mapped >= nbytes - 2 * MIB
    if used_mapped is not None:
        assert used_mapped - nvml.device_memory(index).used >= nbytes - 2 * MIB
    onload_buffers([(buf, host)], _stream())
    assert free_mapped - torch.cuda.mem_get_info()[0] <= 8 * MIB
    assert int(buf.tensor[-1]) == 3


def test_a_cuda_graph_captured_on_the_buffer_replays_after_the_memory_came_back():
    from memmgr.same_address import SameAddressBuffer, offload_buffers, onload_buffers

    n = 1 << 20
    buf = SameAddressBuffer(2 * n * 4)
    weight, x = buf.tensor.view(torch.float32)[:n], buf.tensor.view(torch.float32)[n:]
    weight.copy_(torch.arange(n, device="cuda", dtype=torch.float32))
    x.fill_(2.0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture, as torch asks
        out = weight * x + 1
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = weight * x + 1
    graph.replay()
    expected = out.clone()
    host = _pinned(buf.nbytes)
    offload_buffers([(buf, host)], _stream())
    out.zero_()
    onload_buffers([(buf, host)], _stream())
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)
    x.fill_(3.0)  # the graph reads the buffer at its (unchanged) address
    graph.replay()
    assert torch.equal(out, weight * 3.0 + 1)


def test_several_buffers_release_each_after_its_own_copy_and_onload_out_of_memory_maps_nothing():
    from memmgr.errors import MemmgrOutOfMemoryError
    from memmgr.same_address import SameAddressBuffer, offload_buffers, onload_buffers

    bufs = [SameAddressBuffer(8 * MIB) for _ in range(3)]
    for i, b in enumerate(bufs):
        b.tensor.fill_(i + 1)
    hosts = [_pinned(8 * MIB) for _ in bufs]
    offload_buffers(list(zip(bufs, hosts)), _stream())
    assert not any(b.mapped for b in bufs)
    assert [int(h[0]) for h in hosts] == [1, 2, 3]
    gc.collect()
    torch.cuda.empty_cache()  # no unused cached blocks: an onload short of memory empties the cache and maps again
    free, _ = torch.cuda.mem_get_info()
    for step in range(64):  # room for one buffer, not three (a little less where the exact amount does not fit)
        try:
            hog = torch.empty(max(0, free - (12 + 2 * step) * MIB), dtype=torch.uint8, device="cuda")
            break
        except torch.OutOfMemoryError:
            continue
    assert torch.cuda.mem_get_info()[0] < 16 * MIB, "the hog left room for two buffers"
    with pytest.raises(MemmgrOutOfMemoryError):
        onload_buffers(list(zip(bufs, hosts)), _stream())
    assert not any(b.mapped for b in bufs)
    del hog
    torch.cuda.empty_cache()  # the hog's block goes back to the driver, where cuMemCreate finds it
    onload_buffers(list(zip(bufs, hosts)), _stream())
    assert [int(b.tensor[-1]) for b in bufs] == [1, 2, 3]
