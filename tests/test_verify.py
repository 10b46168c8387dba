"""Opt-in verification: a checksum taken at offload is checked at onload; corruption raises and keeps the host copy."""
import pytest
import torch

from conftest import random_tensor, same_bits
from memmgr.states import GroupState
from memmgr import (BucketizedFlatTensors, BucketState, FlatTensors, HostMemoryPool, MemmgrCorruptionError,
                    MemmgrError)
from memmgr.flat_tensors import bucket_checksum


def make_group(device, verify=True, bucket_size_mb=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = [random_tensor((33, 7), torch.float32, device, g), random_tensor((100,), torch.bfloat16, device, g),
               random_tensor((5,), torch.int64, device, g), random_tensor((3, 3), torch.uint8, device, g)]
    expected = [t.clone() for t in tensors]
    group = BucketizedFlatTensors(tensors, bucket_size_mb, name="weights", verify=verify,
                                  pool=HostMemoryPool(pin=None if device.type == "cuda" else False))
    return group, tensors, expected


def test_verified_round_trips_pass_and_are_bit_exact(device):
    group, tensors, expected = make_group(device)
    for _ in range(3):
        group.offload()
        group.onload()
        assert group.state is GroupState.ON_DEVICE
        assert all(same_bits(t, e) for t, e in zip(tensors, expected))


def test_verified_non_blocking_round_trip_passes(device):
    group, tensors, expected = make_group(device)
    group.offload(non_blocking=True).wait()
    group.onload(non_blocking=True).wait()
    assert all(same_bits(t, e) for t, e in zip(tensors, expected))


@pytest.mark.parametrize("byte", [0, 1, 5, 131, -1])
@pytest.mark.parametrize("bit", [0, 7])
def test_flipped_byte_in_host_store_raises_names_bucket_and_keeps_host_copy(device, byte, bit):
    group, tensors, expected = make_group(device)
    group.offload()
    bucket = group.buckets[0]
    host = bucket.host_buffer.tensor
    host[byte] ^= 1 << bit
    with pytest.raises(MemmgrCorruptionError, match=r"bucket 'weights/0' .*checksum at offload 0x[0-9a-f]{16}, "
                                                    r"after onload 0x[0-9a-f]{16}") as info:
        group.onload()
    want, got = info.value.mismatches["weights/0"]
    assert want != got
    # nothing half-restored: every bucket is back off the device, the host stores are kept
    assert group.state is GroupState.ON_HOST and group.device_bytes == 0
    assert all(b.host_buffer is not None for b in group.buckets)
    # repair the store: the next onload verifies again and restores the original bits
    host[byte] ^= 1 << bit
    group.onload()
    assert all(same_bits(t, e) for t, e in zip(tensors, expected))


def test_corruption_is_caught_when_verify_is_switched_on_after_construction(device):
    group, tensors, expected = make_group(device, verify=False)
    group.verify = True
    assert all(b.verify for b in group.buckets)
    group.offload()
    group.buckets[-1].host_buffer.tensor[3] ^= 0x10
    with pytest.raises(MemmgrCorruptionError, match=f"{group.buckets[-1].name!r}"):
        group.onload()


def test_without_verify_corruption_goes_unnoticed():
    group, tensors, expected = make_group(torch.device("cpu"), verify=False)
    group.offload()
    group.buckets[0].host_buffer.tensor[0] ^= 1
    group.onload()
    assert not same_bits(tensors[0], expected[0])


def test_swapped_elements_in_host_store_are_detected(device):
    for dtype in (torch.float32, torch.int64, torch.bfloat16, torch.uint8):
        t = random_tensor((4096,), dtype, device, torch.Generator().manual_seed(3))
        group = BucketizedFlatTensors([t], name=f"g_{dtype}", verify=True, pool=HostMemoryPool(pin=False))
        group.offload()
        store = group.buckets[0].host_buffer.tensor.view(dtype)
        i, j = 10, 3000
        while same_bits(store[i], store[j]):
            j += 1
        a, b = store[i].clone(), store[j].clone()
        store[i], store[j] = b, a
        with pytest.raises(MemmgrCorruptionError, match="checksum at offload"):
            group.onload()


def test_checksum_detects_every_single_byte_flip_and_word_swap():
    g = torch.Generator().manual_seed(7)
    data = torch.randint(0, 256, (4099,), dtype=torch.uint8, generator=g)  # odd length: word and byte tails
    base = int(bucket_checksum(data))
    assert base == int(bucket_checksum(data.clone()))
    for pos in range(data.numel()):
        flipped = data.clone()
        flipped[pos] ^= 1 << (pos % 8)
        assert int(bucket_checksum(flipped)) != base, pos
    words = data[:4096].view(torch.int32)
    for i, j in [(0, 1), (5, 900), (1, 1023), (100, 101)]:
        swapped = data.clone()
        w = swapped[:4096].view(torch.int32)
        w[i], w[j] = words[j].clone(), words[i].clone()
        assert int(bucket_checksum(swapped)) != base
    # 64-bit elements whose halves cancel out under linear position weights
    pair = torch.tensor([1, 0, 0, 1], dtype=torch.int32)
    swapped_pair = torch.tensor([0, 1, 1, 0], dtype=torch.int32)
    assert int(bucket_checksum(pair)) != int(bucket_checksum(swapped_pair))


def test_checksum_spans_several_rows_and_chunks():
    import memmgr.checksum as ft
    n = ft._CHECKSUM_ROW_WORDS * 4 * 3 + 4 * 17 + 2  # three full rows, a partial row, two leftover bytes
    data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    base = int(bucket_checksum(data))
    row = ft._CHECKSUM_ROW_WORDS * 4
    for pos in (0, row - 1, row, 2 * row + 5, 3 * row, n - 1):
        flipped = data.clone()
        flipped[pos] ^= 0x80
        assert int(bucket_checksum(flipped)) != base
    # the same word at the same column of two rows, swapped
    a = data.clone()
    w = a[:3 * row].view(torch.int32).view(3, -1)
    w[0, 9], w[2, 9] = w[2, 9].clone(), w[0, 9].clone()
    if not same_bits(a, data):
        assert int(bucket_checksum(a)) != base


def test_single_bucket_blocking_onload_verifies_too(device):
    t = torch.arange(64, dtype=torch.float32, device=device)
    bucket = FlatTensors.coalesce([("t", t)], name="solo", pool=HostMemoryPool(pin=False), verify=True)
    bucket.offload()
    bucket.host_buffer.tensor[7] ^= 2
    with pytest.raises(MemmgrCorruptionError, match="bucket 'solo'"):
        bucket.onload()
    assert bucket.state is BucketState.ON_HOST and bucket.device_bytes == 0
    bucket.host_buffer.tensor[7] ^= 2
    bucket.onload()
    assert same_bits(t, torch.arange(64, dtype=torch.float32))


def test_discarded_buckets_are_not_checked_and_stay_zero(device):
    group, tensors, _ = make_group(device)
    group.offload(discard=True)
    group.onload()
    assert all(torch.count_nonzero(t) == 0 for t in tensors)


def test_corruption_error_is_a_memmgr_error():
    assert issubclass(MemmgrCorruptionError, MemmgrError)
