"""Round trips of flat buckets: contents, identity, hooks, storage freed in place, states, and bad input."""
import logging

import pytest
import torch

from conftest import random_tensor, same_bits
from memmgr.states import GroupState
from memmgr import (BucketizedFlatTensors, FlatTensors, MemmgrInputError, MemmgrStateError,
                    HostMemoryPool)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.bool]
if hasattr(torch, "float8_e4m3fn"):
    DTYPES += [torch.float8_e4m3fn, torch.float8_e5m2]


def make_tensors(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(1,), (3, 5), (7,), (0,), (1023,), (17, 31), (2, 3, 5), (4096,), (33, 65)]
    tensors = []
    for i, dtype in enumerate(DTYPES):
        for shape in shapes[i % 3:]:
            tensors.append(random_tensor(shape, dtype, device, g))
    return tensors


def test_round_trip_is_bit_exact_for_every_dtype_over_several_cycles(device):
    tensors = make_tensors(device)
    expected = [t.clone() for t in tensors]
    group = BucketizedFlatTensors(tensors, bucket_size_mb=0.01, name="mixed")
    assert len({(b.device, b.dtype) for b in group.buckets}) == len(DTYPES)
    for _ in range(3):
        group.offload()
        assert group.state is GroupState.ON_HOST
        group.onload()
        assert group.state is GroupState.ON_DEVICE
        for t, e in zip(tensors, expected):
            assert same_bits(t, e)


def test_coalescing_keeps_tensor_identity_and_makes_views_of_one_bucket(device):
    tensors = [torch.randn(5, 3, device=device), torch.randn(7, device=device)]
    ids = [id(t) for t in tensors]
    group = BucketizedFlatTensors(tensors, name="g")
    assert [id(t) for t in group.tensors] == ids
    assert len(group.buckets) == 1
    flat_ptr = group.buckets[0].flat.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == flat_ptr for t in tensors)
    assert tensors[0].shape == (5, 3)


def test_storage_is_size_zero_while_offloaded_and_host_store_holds_the_bytes(device):
    tensors = [torch.randn(100, device=device), torch.randn(33, device=device)]
    group = BucketizedFlatTensors(tensors, name="g")
    payload = sum(t.numel() * 4 for t in tensors)
    group.offload()
    assert all(t.untyped_storage().nbytes() == 0 for t in tensors)
    assert group.device_bytes == 0
    assert payload <= group.host_bytes <= payload + 64 * len(tensors)
    group.onload()
    assert group.device_bytes == group.nbytes


def test_grad_hook_registered_before_coalescing_still_fires_after_round_trip(device):
    layer = torch.nn.Linear(4, 3).to(device)
    fired = []
    layer.weight.register_hook(lambda g: fired.append(g.shape))
    weight = layer.weight
    group = BucketizedFlatTensors(list(layer.parameters()), name="weights")
    group.offload()
    group.onload()
    assert layer.weight is weight and weight.requires_grad and weight.is_leaf
    layer(torch.randn(2, 4, device=device)).sum().backward()
    assert fired == [torch.Size([3, 4])]
    assert weight.grad is not None and weight.grad.shape == (3, 4)


def test_discard_policy_frees_without_copy_and_onload_zeroes(device):
    grads = [torch.randn(10, device=device), torch.randn(3, 3, device=device)]
    group = BucketizedFlatTensors(grads, name="grads", policy="discard")
    group.offload()
    assert group.state is GroupState.DISCARDED
    assert group.host_bytes == 0 and group.device_bytes == 0
    group.onload()
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_discard_flag_overrides_copy_policy_for_one_offload(device):
    t = torch.randn(10, device=device)
    group = BucketizedFlatTensors([t], name="g")
    group.offload(discard=True)
    assert group.state is GroupState.DISCARDED
    group.onload()
    assert torch.count_nonzero(t) == 0


def test_second_offload_and_second_onload_are_noops_with_a_debug_log(device, caplog):
    t = torch.randn(10, device=device)
    expected = t.clone()
    group = BucketizedFlatTensors([t], name="g")
    group.offload()
    with caplog.at_level(logging.DEBUG, logger="memmgr"):
        group.offload()
    assert "already on_host" in caplog.text
    group.onload()
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="memmgr"):
        group.onload()
    assert "already on_device" in caplog.text
    assert same_bits(t, expected)


def test_many_small_and_few_large_tensors_pack_into_bounded_buckets(device):
    small = [torch.randn(257, device=device) for _ in range(300)]
    large = [torch.randn(300_000, device=device) for _ in range(2)]
    expected = [t.clone() for t in small + large]
    group = BucketizedFlatTensors(small + large, bucket_size_mb=0.25, name="g")
    limit = 0.25 * 2**20
    for b in group.buckets:
        assert b.nbytes <= limit or len(b.members) == 1
    assert all(len(b.members) > 0 for b in group.buckets)
    for _ in range(2):
        group.offload()
        group.onload()
    assert all(same_bits(t, e) for t, e in zip(small + large, expected))


def test_bucket_smaller_than_largest_tensor_gives_it_its_own_bucket(device):
    big = torch.randn(1 << 16, device=device)
    small = torch.randn(10, device=device)
    group = BucketizedFlatTensors([small, big], bucket_size_mb=0.01, name="g")
    assert [len(b.members) for b in group.buckets] == [1, 1]
    assert group.buckets[1].members[0][1] is big


def test_zero_size_tensors_are_allowed(device):
    empty = torch.empty(0, device=device)
    t = torch.randn(3, device=device)
    expected = t.clone()
    group = BucketizedFlatTensors([empty, t], name="g")
    group.offload()
    group.onload()
    assert empty.numel() == 0 and same_bits(t, expected)
    only_empty = BucketizedFlatTensors([torch.empty(0, device=device)], name="e")
    only_empty.offload()
    only_empty.onload()
    assert only_empty.state is GroupState.ON_DEVICE


def test_adopting_a_flat_buffer_uses_it_without_copy_and_keeps_views_valid(device):
    buffer = torch.randn(64, device=device)
    views = [buffer[:16].view(4, 4), buffer[16:]]
    expected = buffer.clone()
    group = BucketizedFlatTensors.from_buffers({"param_data": buffer}, name="weights")
    assert group.buckets[0].flat is buffer
    group.offload()
    assert views[0].untyped_storage().nbytes() == 0
    group.onload()
    assert same_bits(buffer, expected)
    assert same_bits(views[0], expected[:16].view(4, 4))


def test_pool_reuses_exact_size_host_buffers(device):
    pool = HostMemoryPool(pin=False)
    pool.reserve([400, 400], background=True).result()
    assert pool.bytes_held == 800
    buf = pool.acquire(400)
    assert buf.nbytes == 400 and pool.bytes_held == 800
    pool.release(buf)
    assert pool.acquire(400) is buf
    assert pool.trim() == 400


# ---- bad input: a clear error naming the tensor, and nothing changed ----

def assert_unchanged(tensors, expected):
    for t, e in zip(tensors, expected):
        assert same_bits(t, e)


def test_non_tensor_is_rejected_with_its_name():
    with pytest.raises(MemmgrInputError, match="'g\\[1\\]' is a str"):
        BucketizedFlatTensors([torch.randn(2), "oops"], name="g")


def test_sparse_tensor_is_rejected():
    sparse = torch.randn(3, 3).to_sparse()
    with pytest.raises(MemmgrInputError, match="sparse"):
        BucketizedFlatTensors({"s": sparse}, name="g")


def test_non_contiguous_tensor_is_rejected_and_nothing_changes():
    ok = torch.randn(4)
    base = torch.randn(4, 4)
    transposed = base.t()
    expected = [ok.clone(), transposed.clone()]
    ptr = ok.untyped_storage().data_ptr()
    with pytest.raises(MemmgrInputError, match="'t' .* not contiguous"):
        BucketizedFlatTensors({"ok": ok, "t": transposed}, name="g")
    assert ok.untyped_storage().data_ptr() == ptr
    assert_unchanged([ok, transposed], expected)


def test_tensor_whose_storage_is_shared_outside_the_group_is_rejected():
    base = torch.randn(10)
    view = base[2:5]  # noqa: F841 - the outside reference is the point
    with pytest.raises(MemmgrInputError, match="'base' .* held by 1 other reference"):
        BucketizedFlatTensors({"base": base}, name="g")


def test_tensor_saved_for_an_unfinished_backward_is_rejected():
    layer = torch.nn.Linear(3, 3)
    loss = layer(torch.randn(2, 3, requires_grad=True)).sum()
    with pytest.raises(MemmgrInputError, match="unfinished backward"):
        BucketizedFlatTensors(dict(layer.named_parameters()), name="weights")
    loss.backward()
    BucketizedFlatTensors(dict(layer.named_parameters()), name="weights")


def test_overlapping_views_of_one_storage_in_one_group_are_rejected():
    base = torch.randn(10)
    a, b = base[:6], base[4:]
    del base
    with pytest.raises(MemmgrInputError, match=r"share one storage and \('a', 'b'\) overlap"):
        BucketizedFlatTensors({"a": a, "b": b}, name="g")


def test_disjoint_views_of_a_storage_nothing_else_holds_are_coalesced_and_the_old_memory_freed():
    base = torch.randn(10)
    a, b = base[:5], base[5:]
    expected = base.clone()
    del base
    group = BucketizedFlatTensors({"a": a, "b": b}, name="g", pool=HostMemoryPool(pin=False))
    assert torch.equal(torch.cat([a, b]), expected) and len(group.buckets) == 1
    assert a._base.untyped_storage().nbytes() == 0  # only the views' base held it; its memory went back
    group.offload()
    group.onload()
    assert torch.equal(torch.cat([a, b]), expected)


def test_same_tensor_twice_is_rejected():
    t = torch.randn(3)
    with pytest.raises(MemmgrInputError, match="appears twice"):
        BucketizedFlatTensors([t, t], name="g")


def test_single_bucket_rejects_mixed_devices_or_dtypes():
    with pytest.raises(MemmgrInputError, match="bucket is torch.float32"):
        FlatTensors.coalesce([("a", torch.randn(2)), ("b", torch.zeros(2, dtype=torch.int64))], name="b")
    if torch.cuda.device_count() >= 2:
        with pytest.raises(MemmgrInputError, match="one device"):
            FlatTensors.coalesce([("a", torch.randn(2, device="cuda:0")), ("b", torch.randn(2, device="cuda:1"))],
                                 name="b")


def test_adopting_a_partial_view_is_rejected():
    base = torch.randn(10)
    with pytest.raises(MemmgrInputError, match="covers 20 of its storage's 40 bytes"):
        BucketizedFlatTensors.from_buffers({"half": base[5:]}, name="g")


def test_nonpositive_bucket_size_is_rejected():
    with pytest.raises(MemmgrInputError, match="bucket_size_mb"):
        BucketizedFlatTensors([torch.randn(2)], bucket_size_mb=0, name="g")


def test_require_on_device_guards_use_while_offloaded_and_onload_restores_it():
    t = torch.randn(8)
    expected = t.clone()
    group = BucketizedFlatTensors([t], name="g")
    group.require_on_device()
    group.offload()
    with pytest.raises(MemmgrStateError, match="'g' is on_host.*call onload"):
        group.require_on_device()
    group.onload()
    group.require_on_device()
    assert same_bits(t, expected)


def test_releasing_host_store_of_an_offloaded_bucket_is_refused():
    group = BucketizedFlatTensors([torch.randn(8)], name="g")
    group.offload()
    with pytest.raises(MemmgrStateError, match="only copy"):
        group.release_host_buffers()


def test_repr_is_short_and_informative():
    group = BucketizedFlatTensors([torch.randn(8)], name="weights")
    assert repr(group).startswith("BucketizedFlatTensors('weights', 1 tensors in 1 buckets")


_BUSY_GPU_OFFLOAD = """
import time, torch
from memmgr import FlatTensors, HostMemoryPool
t = torch.ones(16 << 20, device="cuda")
bucket = FlatTensors.coalesce([("t", t)], name="busy", pool=HostMemoryPool())
bucket.ensure_host_buffer()
torch.cuda.synchronize()
props = torch.cuda.get_device_properties(0)
torch.cuda._sleep(int(0.5 * getattr(props, "clock_rate", 1_800_000) * 1000))
start = time.perf_counter()
bucket.offload(non_blocking=True)
took = time.perf_counter() - start
busy = not torch.cuda.current_stream().query()
bucket.wait()
print(took, busy, bool((bucket.host_buffer.tensor.view(torch.float32) == 1).all()))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_first_non_blocking_offload_of_a_process_returns_while_the_gpu_is_busy():
    # A fresh process: the first copy-stream creation of a process waits for the GPU, so the bucket makes its streams
    # when it is built, not inside the first offload.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _BUSY_GPU_OFFLOAD], capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    took, busy, intact = float(out[0]), out[1] == "True", out[2] == "True"
    assert took < 0.25 and busy, f"offload(non_blocking=True) took {took:.3f} s behind a 0.5 s kernel"
    assert intact
