"""The same-GPU CUDA IPC transport between two processes (GPU only)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from memmgr.errors import MemmgrSyncError
from memmgr.sync.transports import WeightBucket, bucketize, group_pairs

from conftest import random_tensor, requires_cuda, same_bits, tensors_from_bytes, tensors_to_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the IPC engine lives in the lab
import lab  # noqa: E402

pytestmark = [pytest.mark.gpu, requires_cuda]


def _weights(device, n=12):
    g = torch.Generator().manual_seed(3)
    out = {}
    for i in range(n):
        dtype = torch.bfloat16 if i % 3 else torch.float32
        out[f"layers.{i}.w"] = random_tensor((256, 64 + i), dtype, "cpu", g).to(device)
    return out


def _consumer(descs, acks, results, delay_s: float) -> None:
    from memmgr.sync.transports.ipc import CudaIpcReceiver

    receiver = CudaIpcReceiver(torch.device("cuda", 0))
    got: dict[str, torch.Tensor] = {}
    while True:
        desc = descs.get(timeout=120)
        if desc is None:
            break
        try:
            if desc.get("fail"):
                raise RuntimeError(f"engine refused {desc['entries'][0][0]}")
            bucket = receiver.receive(desc)
            time.sleep(delay_s)  # a slow engine: the producer must not refill this slot meanwhile
            for name, view in bucket.views():
                got[name] = view.clone()
            receiver.done()
            acks.put(("ok", desc["slot"]))
        except Exception as exc:  # reported to the producer, like an RPC error
            acks.put(("error", str(exc)))
    results.put(tensors_to_bytes(got))
    receiver.close()


class _Engine:
    """A consumer process and the announce callable that drives it (returns once the bucket was copied out)."""

    def __init__(self, delay_s=0.0, visible=None):
        ctx = mp.get_context("spawn")
        self.descs, self.acks, self.results = ctx.Queue(), ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_consumer, args=(self.descs, self.acks, self.results, delay_s), daemon=True)
        lab.start_seeing(self.proc, visible)
        self.fail_next = False

    def announce(self, desc):
        if self.fail_next:
            desc = dict(desc, fail=True)
            self.fail_next = False
        self.descs.put(desc)
        status, detail = self.acks.get(timeout=120)
        if status != "ok":
            raise RuntimeError(detail)

    def stop(self):
        self.descs.put(None)
        got = tensors_from_bytes(self.results.get(timeout=120))
        self.proc.join(30)
        return got


@pytest.mark.parametrize("source", ["gpu", "host", "pairs"])
def test_ipc_ring_delivers_every_bucket_bit_exact_to_a_slow_engine(source):
    from memmgr.sync.transports.ipc import CudaIpcTransport

    dev = torch.device("cuda", 0)
    weights = _weights(dev if source != "host" else "cpu")
    engine = _Engine(delay_s=0.02)
    transport = CudaIpcTransport(engine.announce, device=dev, buffer_bytes=96 << 10, num_buffers=2)
    try:
        for _sync in range(2):  # the same exports serve every sync
            if source == "pairs":
                for name, t in weights.items():
                    transport.send_pairs([(name, t)])
            else:
                for bucket in bucketize(weights.items(), bucket_bytes=64 << 10):
                    transport.send_bucket(bucket)
            transport.finish()
        assert transport.buckets > 2 * transport.num_buffers  # slots were reused
        assert transport.ring_bytes == 2 * (96 << 10)
    finally:
        # the engine lets go of the IPC buffers before the producer frees them (freeing memory another process still
        # has open can take that process down)
        got = engine.stop()
        transport.close()
    assert set(got) == set(weights)
    assert all(same_bits(got[n], weights[n].cpu()) for n in weights)


@pytest.mark.parametrize("send", ["pairs", "bucket"])
def test_ipc_source_on_the_gpu_dropped_and_overwritten_right_after_the_send_arrives_as_sent(send):
    # the send returns before its copy into the ring has run (queued behind a ~0.2 s sleep here): the caller's next
    # use of the source's memory (a new tensor in it, overwritten) must still come after that copy
    from memmgr.sync.transports.ipc import CudaIpcTransport

    dev = torch.device("cuda", 0)
    g = torch.Generator().manual_seed(11)
    expected = random_tensor((1 << 20,), torch.bfloat16, "cpu", g)  # 2 MiB: PyTorch's large-block pool
    engine = _Engine()
    transport = CudaIpcTransport(engine.announce, device=dev, buffer_bytes=4 << 20, num_buffers=2)
    try:
        transport.send_pairs([("w", torch.zeros(1 << 20, dtype=torch.bfloat16, device=dev))])  # the ring exists
        transport.finish()
        source = expected.to(dev)
        torch.cuda.synchronize()
        torch.cuda._sleep(400_000_000)  # queued before the send: the transport's copy waits behind it
        t0 = time.perf_counter()
        if send == "pairs":
            transport.send_pairs([("w", source)])
        else:
            transport.send_bucket(WeightBucket.pack([("w", source)]))
        returned_s = time.perf_counter() - t0
        del source
        again = torch.empty(1 << 20, dtype=torch.bfloat16, device=dev)  # may take the source's memory
        again.fill_(7.0)
        transport.finish()
    finally:
        got = engine.stop()
        transport.close()
    assert same_bits(got["w"], expected)
    assert returned_s < 0.1, f"the send waited {returned_s:.3f} s for its copy"  # the sleep alone is ~0.2 s


def test_ipc_engine_failure_raises_on_the_producer():
    from memmgr.sync.transports.ipc import CudaIpcTransport

    engine = _Engine()
    transport = CudaIpcTransport(engine.announce, buffer_bytes=1 << 20)
    try:
        engine.fail_next = True
        transport.send_bucket(WeightBucket.pack([("layers.0.w", torch.ones(8, device="cuda"))]))
        with pytest.raises(MemmgrSyncError, match="engine refused layers.0.w"):
            transport.finish()
        with pytest.raises(MemmgrSyncError, match="unusable"):
            transport.send_bucket(WeightBucket.pack([("x", torch.ones(8, device="cuda"))]))
    finally:
        transport.close()
        engine.stop()


@pytest.mark.parametrize("source", ["bucket", "pairs"])
def test_ipc_bucket_larger_than_the_ring_buffers_goes_through_one_reused_oversize_slot(source):
    from memmgr.sync.transports.ipc import CudaIpcTransport

    dev = torch.device("cuda", 0)
    g = torch.Generator().manual_seed(5)
    weights = {"embed": random_tensor((4096, 64), torch.bfloat16, "cpu", g).to(dev),  # 512 KiB: over a slot
               "small.0": random_tensor((64, 64), torch.bfloat16, "cpu", g).to(dev),
               "bigger": random_tensor((24576, 64), torch.bfloat16, "cpu", g).to(dev),  # 3 MiB: grows the slot
               "small.1": random_tensor((64, 63), torch.bfloat16, "cpu", g).to(dev)}
    engine = _Engine()
    transport = CudaIpcTransport(engine.announce, device=dev, buffer_bytes=64 << 10, num_buffers=2)
    try:
        for _sync in range(2):
            for name, t in weights.items():
                if source == "pairs":
                    transport.send_pairs([(name, t)])
                else:
                    transport.send_bucket(WeightBucket.pack([(name, t)]))
            transport.finish()
        # the ring plus one slot the size of the largest tensor (in PyTorch's 2 MiB blocks), reused by the second sync
        assert transport.ring_bytes == 2 * (64 << 10) + (4 << 20)
    finally:
        got = engine.stop()
        transport.close()
    assert all(same_bits(got[n], weights[n].cpu()) for n in weights)


def test_ipc_receiver_on_another_gpu_names_both_uuids():
    from memmgr.sync.transports.ipc import CudaIpcReceiver

    receiver = CudaIpcReceiver(0)
    desc = WeightBucket.pack([("w", torch.ones(4))]).meta()
    desc.update({"slot": 0, "nbytes": 16, "ipc": {"GPU-00000000-not-this-one": ()}})
    with pytest.raises(MemmgrSyncError, match=f"GPU-00000000-not-this-one.*{receiver.uuid}"):
        receiver.receive(desc)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs to number one GPU differently per process")
def test_ipc_matches_the_gpu_by_uuid_across_different_visible_devices():
    from memmgr.sync.transports.ipc import CudaIpcTransport

    dev = torch.device("cuda", 1)
    weights = _weights(dev, n=4)
    engine = _Engine(visible="1")  # the engine sees the producer's cuda:1 as its cuda:0
    transport = CudaIpcTransport(engine.announce, device=dev, buffer_bytes=1 << 20)
    try:
        for bucket in bucketize(weights.items()):
            transport.send_bucket(bucket)
        transport.finish()
    finally:
        transport.close()
        got = engine.stop()
    assert all(same_bits(got[n], weights[n].cpu()) for n in weights)


def test_ipc_sync_into_a_transformers_engine_on_the_same_gpu_is_bit_exact_and_logits_match():
    transformers = pytest.importorskip("transformers", reason="the engine of this test is a transformers model")
    from memmgr.sync.transports import group_pairs
    from memmgr.sync.transports.ipc import CudaIpcTransport

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        trainer = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    weights = dict(trainer.state_dict())
    engine = lab.IpcEngineProcess(config, torch.bfloat16)
    transport = CudaIpcTransport(engine.announce, buffer_bytes=512 << 10, num_buffers=2)
    try:
        for group in group_pairs(weights.items(), 256 << 10):
            transport.send_pairs(group)
        transport.finish()
        report = engine.report([1, 5, 9, 13])
    finally:
        transport.close()
        engine.stop()
    assert report["checksums"] == lab.named_checksums(weights.items())  # every engine tensor, bit for bit
    assert all("rotary" in n for n in report["missing"])  # only non-persistent buffers were not sent
    with torch.no_grad():
        logits = trainer(torch.tensor([[1, 5, 9, 13]], device="cuda")).logits.float().cpu()
    # same weights, same kernels, same GPU: equal up to kernel nondeterminism
    torch.testing.assert_close(report["logits"], logits, rtol=1e-3, atol=1e-3)


def test_ipc_sync_that_does_not_fit_the_engine_is_refused_at_start():
    from memmgr.sync.transports import MemmgrSyncMismatchError, ParamSpec
    from memmgr.sync.transports.ipc import CudaIpcTransport

    announced = []
    transport = CudaIpcTransport(announced.append, held={"w": ((4, 2), torch.bfloat16)})
    try:
        with pytest.raises(MemmgrSyncMismatchError, match="'w'.*shape"):
            transport.start([ParamSpec("w", (2, 4), torch.bfloat16)])
        assert announced == [] and transport.ring_bytes == 0  # nothing announced, no ring allocated
    finally:
        transport.close()


def test_ipc_buckets_packed_into_reserved_slots_are_sent_from_there_bit_exact():
    from memmgr.sync.transports import ALIGN_BYTES
    from memmgr.sync.transports.base import aligned
    from memmgr.sync.transports.ipc import CudaIpcTransport

    dev = torch.device("cuda", 0)
    weights = _weights(dev)
    engine = _Engine(delay_s=0.01)
    transport = CudaIpcTransport(engine.announce, device=dev, buffer_bytes=96 << 10, num_buffers=2)
    try:
        for _sync in range(2):
            for group in group_pairs(weights.items(), 64 << 10):
                dtype = group[0][1].dtype
                item = group[0][1].element_size()
                numel = sum(aligned(t.numel() * item, ALIGN_BYTES) for _, t in group) // item  # pack's layout
                flat = transport.reserve(dtype, numel)
                assert flat is not None and flat.data_ptr() in {b.data_ptr() for b in transport._ring}
                bucket = WeightBucket.pack(group, out=flat)
                sent = transport.buckets
                transport.send_bucket(bucket)  # no copy: announced from the slot it was packed into
                assert transport.buckets == sent + 1
            transport.finish()
        # both slots reserved at once: a third reservation gets nothing (the caller allocates), and a plain send waits
        a, b = transport.reserve(torch.float32, 8), transport.reserve(torch.float32, 8)
        assert a is not None and b is not None and transport.reserve(torch.float32, 8) is None
        transport.release_reservations()
        assert transport.reserve(torch.float32, 8) is not None
        transport.release_reservations()
    finally:
        got = engine.stop()
        transport.close()
    assert all(same_bits(got[n], weights[n].cpu()) for n in weights)


def test_ipc_buckets_packed_in_place_from_pinned_host_are_announced_only_once_their_copies_finished():
    # a bucket packed into a reserved slot is announced from a helper thread after its copies' event: the producer
    # already packs the next slot. Large host->device copies and an engine that copies out at once would read a
    # half-filled slot (the previous bucket's bytes) if the announcement ran ahead of the copies.
    from memmgr.sync.transports.ipc import CudaIpcTransport

    dev = torch.device("cuda", 0)
    g = torch.Generator().manual_seed(11)
    engine = _Engine(delay_s=0.0)
    transport = CudaIpcTransport(engine.announce, device=dev, buffer_bytes=32 << 20, num_buffers=2)
    try:
        for sync in range(2):
            host = {f"layers.{i}.w": random_tensor((2048, 4096), torch.float32, "cpu", g).pin_memory()
                    for i in range(6)}  # 32 MiB each: one bucket per tensor, several ms per copy
            for name, tensor in host.items():
                flat = transport.reserve(torch.float32, tensor.numel())
                assert flat is not None
                flat.copy_(tensor.view(-1), non_blocking=True)
                transport.send_bucket(WeightBucket.from_meta(
                    WeightBucket.pack([(name, tensor)]).meta(), flat))
            transport.finish()
    finally:
        got = engine.stop()
        transport.close()
    assert set(got) == set(host)
    assert all(same_bits(got[n], host[n]) for n in host)
