"""The NCCL transport: buckets from a trainer process on one GPU arrive bit-exact in an engine process on another
(needs two GPUs); on one machine without them, the transport refuses what it cannot carry and says why."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from memmgr.errors import MemmgrInputError
from memmgr.sync.transports import bucketize
from memmgr.sync.transports.nccl import NcclReceiver, NcclTransport, connect

from conftest import random_tensor, same_bits, tensors_from_bytes, tensors_to_bytes


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(device: str):
    g = torch.Generator().manual_seed(11)
    return {"emb": random_tensor((256, 64), torch.bfloat16, "cpu", g).to(device),
            "w": random_tensor((64, 64), torch.float32, "cpu", g).to(device),
            "steps": random_tensor((3,), torch.int64, "cpu", g).to(device)}


def test_nccl_transport_refuses_a_gloo_group_and_names_the_fix():
    with pytest.raises(MemmgrInputError, match="NcclTransport takes a nccl SyncGroup"):
        NcclTransport(object())  # type: ignore[arg-type]
    with pytest.raises(MemmgrInputError, match="NcclReceiver takes a nccl SyncGroup"):
        NcclReceiver(object())  # type: ignore[arg-type]


def _engine(port: int, nbuckets: int, results) -> None:
    torch.cuda.set_device(1)
    group = connect("127.0.0.1", port, 2, 1, timeout_s=120)
    receiver = NcclReceiver(group)
    got = {}
    for _ in range(nbuckets):
        bucket = receiver.receive()
        got.update({n: v.cpu().clone() for n, v in bucket.views()})
    results.put(tensors_to_bytes(got))
    receiver.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_nccl_buckets_arrive_bit_exact_on_another_gpu():
    ctx = mp.get_context("spawn")
    torch.cuda.set_device(0)
    weights = _weights("cuda:0")
    buckets = list(bucketize(weights.items(), bucket_bytes=16384))
    results = ctx.Queue()
    port = _free_port()
    proc = ctx.Process(target=_engine, args=(port, len(buckets), results), daemon=True)
    proc.start()
    try:
        transport = NcclTransport(connect("127.0.0.1", port, 2, 0, timeout_s=120))
        for b in buckets:
            transport.send_bucket(b)
        transport.finish()
        got = tensors_from_bytes(results.get(timeout=120))
        transport.close()
    finally:
        proc.join(timeout=60)
    assert sorted(got) == sorted(weights)
    assert all(same_bits(got[n], weights[n].cpu()) for n in weights)
