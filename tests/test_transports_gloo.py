"""The gloo transport between two real processes on the CPU: bit-exact buckets, and failures that name the rank."""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from memmgr.errors import MemmgrInputError, MemmgrSyncError
from memmgr.sync.transports import MemmgrSyncTimeoutError, bucketize
from memmgr.sync.transports.gloo import GlooReceiver, GlooTransport, connect

from conftest import random_tensor, same_bits, tensors_from_bytes, tensors_to_bytes

pytestmark = pytest.mark.integration  # issue 31: tests by cost (tests/conftest.py)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights():
    g = torch.Generator().manual_seed(7)
    return {"emb": random_tensor((64, 32), torch.bfloat16, "cpu", g),
            "w1": random_tensor((32, 32), torch.float32, "cpu", g),
            "b1": random_tensor((32,), torch.float32, "cpu", g),
            "steps": random_tensor((3,), torch.int64, "cpu", g),
            "w2": random_tensor((128, 32), torch.float32, "cpu", g)}


def _receiver(port: int, nbuckets: int, metas, results, mode: str) -> None:
    group = connect("127.0.0.1", port, 2, 1, timeout_s=120)
    if mode == "die":
        os._exit(0)
    receiver = GlooReceiver(group)
    got = {}
    for _ in range(nbuckets):
        bucket = receiver.receive(metas.get(timeout=120) if mode == "announce" else None)
        got.update({n: v.clone() for n, v in bucket.views()})  # the buffer is reused by the next receive
    results.put(tensors_to_bytes(got))
    receiver.close()


@pytest.mark.parametrize("mode", ["inband", "announce"])
def test_gloo_buckets_arrive_bit_exact_in_another_process(mode):
    ctx = mp.get_context("spawn")
    weights = _weights()
    buckets = list(bucketize(weights.items(), bucket_bytes=4096))
    metas, results = ctx.Queue(), ctx.Queue()
    port = _free_port()
    proc = ctx.Process(target=_receiver, args=(port, len(buckets), metas, results, mode), daemon=True)
    proc.start()
    try:
        group = connect("127.0.0.1", port, 2, 0, timeout_s=120)  # generous: the child imports torch first
        transport = GlooTransport(group, announce=metas.put if mode == "announce" else None)
        for b in buckets:
            transport.send_bucket(b)
        transport.finish()
        got = tensors_from_bytes(results.get(timeout=120))
        transport.close()
    finally:
        proc.join(30)
    assert set(got) == set(weights)
    assert all(same_bits(got[n], weights[n]) for n in weights)
    assert transport.buckets == len(buckets) > 1


def test_gloo_connect_times_out_naming_the_missing_workers():
    with pytest.raises(MemmgrSyncTimeoutError, match=r"rank 0 waiting for the engine workers \(ranks 1..1\)"):
        connect("127.0.0.1", _free_port(), 2, 0, timeout_s=1)


def test_gloo_peer_that_dies_raises_naming_the_rank():
    ctx = mp.get_context("spawn")
    port = _free_port()
    proc = ctx.Process(target=_receiver, args=(port, 1, None, None, "die"), daemon=True)
    proc.start()
    try:
        group = connect("127.0.0.1", port, 2, 0, timeout_s=120)
        proc.join(60)
        transport = GlooTransport(group, timeout_s=10)
        with pytest.raises(MemmgrSyncError, match="engine worker rank 1"):
            for b in bucketize(_weights().items(), bucket_bytes=4096):
                transport.send_bucket(b)
        with pytest.raises(MemmgrSyncError, match="unusable"):
            transport.send_bucket(next(iter(bucketize(_weights().items()))))
    finally:
        proc.join(5)


def test_gloo_transport_refuses_the_wrong_side_and_device():
    with pytest.raises(MemmgrInputError, match="gloo SyncGroup"):
        GlooTransport(object())  # type: ignore[arg-type]
    with pytest.raises(MemmgrInputError, match="gloo SyncGroup"):
        GlooReceiver(object())  # type: ignore[arg-type]
