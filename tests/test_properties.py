"""Property tests on the CPU: random groups (shapes incl. 0-size, dtypes, bucket sizes, coalesced or adopted) run
random sequences of offload / onload / offload(discard=True) / writes, checked after every step against a model of
the expected state, placement, byte counts and contents."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import random_tensor, same_bits
from memmgr import BucketizedFlatTensors, GroupState, HostMemoryPool, Policy

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.bool]
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        DTYPES.append(getattr(torch, _name))

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)
# from 8 bytes (every tensor in a bucket of its own) to far more than any example needs (one bucket per dtype)
bucket_sizes = st.sampled_from([8 / 2**20, 64 / 2**20, 300 / 2**20, 4096 / 2**20, 256.0])
ops = st.lists(st.sampled_from(["offload", "onload", "discard", "write", "offload_nb", "onload_nb"]),
               min_size=1, max_size=12)


class Model:
    """What the group must look like: placement, whether a host store exists, and each tensor's contents."""

    def __init__(self, tensors, policy: Policy, pin_ahead: bool):
        self.contents = [t.clone() for t in tensors]
        self.state = GroupState.ON_DEVICE
        self.policy = policy
        self.host_allocated = pin_ahead and policy is Policy.COPY

    def offload(self, discard: bool | None):
        if self.state is not GroupState.ON_DEVICE:
            return  # a second offload is a no-op, also with discard=True: the host copy survives
        discard = self.policy is Policy.DISCARD if discard is None else discard
        if discard:
            self.state = GroupState.DISCARDED
        else:
            self.state = GroupState.ON_HOST
            self.host_allocated = True

    def onload(self):
        if self.state is GroupState.DISCARDED:
            self.contents = [torch.zeros_like(c) for c in self.contents]
        self.state = GroupState.ON_DEVICE


def check(group: BucketizedFlatTensors, tensors, model: Model, payload_bytes: int):
    group.wait()
    assert sorted(map(id, group.tensors)) == sorted(map(id, tensors))  # same objects (ordered by dtype)
    if payload_bytes == 0 and model.state is GroupState.ON_HOST:
        # a bucket of zero bytes "offloads" without a copy; it reports on_host
        assert group.state in (GroupState.ON_HOST, GroupState.DISCARDED)
    else:
        assert group.state is model.state
    assert payload_bytes <= group.nbytes
    if model.state is GroupState.ON_DEVICE:
        assert group.device_bytes == group.nbytes
        for t, c in zip(tensors, model.contents):
            assert same_bits(t, c)
    else:
        assert group.device_bytes == 0
        assert all(t.untyped_storage().nbytes() == 0 for t in tensors)
    expected_host = sum(b.nbytes for b in group.buckets if b.nbytes > 0) if model.host_allocated else 0
    assert group.host_bytes == expected_host


def run_ops(group, tensors, model, payload, operations, seed):
    g = torch.Generator().manual_seed(seed)
    check(group, tensors, model, payload)
    for op in operations:
        if op in ("offload", "offload_nb"):
            group.offload(non_blocking=op == "offload_nb").wait()
            model.offload(None)
        elif op == "discard":
            group.offload(discard=True)
            model.offload(True)
        elif op in ("onload", "onload_nb"):
            group.onload(non_blocking=op == "onload_nb").wait()
            model.onload()
        elif op == "write" and model.state is GroupState.ON_DEVICE:
            with torch.no_grad():
                for i, t in enumerate(tensors):
                    new = random_tensor(tuple(t.shape), t.dtype, "cpu", g)
                    t.copy_(new)
                    model.contents[i] = new
        check(group, tensors, model, payload)
    group.onload()
    model.onload()
    check(group, tensors, model, payload)


@SETTINGS
@given(specs=st.lists(st.tuples(shapes, st.sampled_from(DTYPES)), min_size=1, max_size=6),
       bucket_size_mb=bucket_sizes, policy=st.sampled_from(list(Policy)), pin_ahead=st.booleans(),
       verify=st.booleans(), operations=ops, seed=st.integers(0, 2**31 - 1))
def test_coalesced_group_follows_the_model(specs, bucket_size_mb, policy, pin_ahead, verify, operations, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = [random_tensor(shape, dtype, "cpu", g) for shape, dtype in specs]
    payload = sum(t.numel() * t.element_size() for t in tensors)
    model = Model(tensors, policy, pin_ahead)
    group = BucketizedFlatTensors(tensors, bucket_size_mb, name="g", policy=policy, pool=HostMemoryPool(pin=False),
                                  pin_ahead=pin_ahead, verify=verify)
    assert sorted(map(id, group.tensors)) == sorted(map(id, tensors))
    for b in group.buckets:
        assert len({m[1].dtype for m in b.members}) == 1
        assert b.nbytes <= group.bucket_size_bytes or len(b.members) == 1
    run_ops(group, tensors, model, payload, operations, seed + 1)


@SETTINGS
@given(specs=st.lists(st.tuples(st.integers(0, 40), st.sampled_from(DTYPES)), min_size=1, max_size=4),
       policy=st.sampled_from(list(Policy)), pin_ahead=st.booleans(), verify=st.booleans(), operations=ops,
       seed=st.integers(0, 2**31 - 1))
def test_adopted_buffers_follow_the_model(specs, policy, pin_ahead, verify, operations, seed):
    g = torch.Generator().manual_seed(seed)
    buffers = {f"buf{i}": random_tensor((n,), dtype, "cpu", g) for i, (n, dtype) in enumerate(specs)}
    tensors = list(buffers.values())
    payload = sum(t.numel() * t.element_size() for t in tensors)
    model = Model(tensors, policy, pin_ahead)
    group = BucketizedFlatTensors.from_buffers(buffers, name="g", policy=policy, pool=HostMemoryPool(pin=False),
                                               pin_ahead=pin_ahead, verify=verify)
    assert group.nbytes == payload  # adopted buckets are exactly the buffers
    run_ops(group, tensors, model, payload, operations, seed + 1)
