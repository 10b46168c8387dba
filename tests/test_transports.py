"""Flat per-dtype buckets, the pre-flight check and the in-process transport (CPU, no engine needed)."""
from __future__ import annotations

import pytest
import torch

from memmgr.errors import MemmgrError, MemmgrInputError, MemmgrSyncError
from memmgr.sync import ModuleWeightLoader
from memmgr.sync.transports import (ALIGN_BYTES, InProcessTransport, MemmgrSyncMismatchError, ParamSpec, WeightBucket,
                                    as_specs, bucketize, check_specs, specs_of, split_per_dtype)

from conftest import random_tensor, same_bits


def _weights():
    g = torch.Generator().manual_seed(0)
    shapes = [("a", (3, 5), torch.float32), ("b", (7,), torch.bfloat16), ("c", (2, 2, 3), torch.float32),
              ("d", (1,), torch.int64), ("e", (33,), torch.bfloat16), ("f", (64, 16), torch.float32)]
    return {n: random_tensor(s, d, "cpu", g) for n, s, d in shapes}


def test_bucketize_groups_by_dtype_keeps_order_and_round_trips_bit_exact():
    w = _weights()
    buckets = list(bucketize(w.items(), bucket_bytes=1 << 20))
    assert [b.dtype for b in buckets] == [torch.float32, torch.bfloat16, torch.int64]
    assert [e.name for b in buckets for e in b.entries] == ["a", "c", "f", "b", "e", "d"]
    for b in buckets:
        assert all(e.offset % ALIGN_BYTES == 0 for e in b.entries)
        for name, view in b.views():
            assert same_bits(view, w[name])
            assert view.data_ptr() >= b.flat.data_ptr()  # a view, not a copy


def test_bucketize_respects_the_byte_limit_and_gives_a_large_tensor_its_own_bucket():
    w = {f"t{i}": torch.full((100,), float(i)) for i in range(10)}  # 400 B each, 512 B aligned
    w["big"] = torch.arange(1000, dtype=torch.float32)
    buckets = list(bucketize(w.items(), bucket_bytes=1024))
    assert all(b.nbytes <= 1024 for b in buckets if len(b.entries) > 1)
    assert [len(b.entries) for b in buckets] == [2, 2, 2, 2, 2, 1]
    assert buckets[-1].entries[0].name == "big"
    got = {n: v for b in buckets for n, v in b.views()}
    assert all(torch.equal(got[n], t) for n, t in w.items())


def test_bucketize_refuses_a_name_twice():
    with pytest.raises(MemmgrInputError, match="'x' appears twice"):
        list(bucketize([("x", torch.ones(2)), ("x", torch.ones(2))]))


def test_bucket_meta_rebuilds_the_bucket_over_another_buffer():
    b = WeightBucket.pack([("p", torch.randn(3, 4)), ("q", torch.randn(5))])
    other = torch.empty(b.flat.numel() + 10)
    other[:b.flat.numel()] = b.flat
    again = WeightBucket.from_meta(b.meta(), other)
    assert again.entries == b.entries
    for (n1, v1), (n2, v2) in zip(b.views(), again.views()):
        assert n1 == n2 and torch.equal(v1, v2)


def test_pack_into_a_reused_buffer_and_its_refusals():
    out = torch.zeros(1024)
    b = WeightBucket.pack([("p", torch.ones(3))], out=out)
    assert b.flat.data_ptr() == out.data_ptr() and out[:3].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(MemmgrInputError, match="'q' is torch.float16"):
        WeightBucket.pack([("p", torch.ones(3)), ("q", torch.ones(3, dtype=torch.float16))])
    with pytest.raises(MemmgrInputError, match="at least"):
        WeightBucket.pack([("p", torch.ones(2000))], out=out)


def test_check_specs_names_every_kind_of_mismatch():
    held = {"w": ((4, 4), torch.float32), "v": ((4,), torch.float32), "u": ((2,), torch.float32)}
    sent = [ParamSpec("w", (4, 3), torch.float32), ParamSpec("v", (4,), torch.bfloat16),
            ParamSpec("wq", (2,), torch.float32)]
    with pytest.raises(MemmgrSyncMismatchError) as info:
        check_specs(sent, held, where="the engine")
    text = str(info.value)
    assert "'w': sent shape [4, 3], float32 but the engine holds shape [4, 4], float32" in text
    assert "'v': sent shape [4], bfloat16 but the engine holds shape [4], float32" in text
    assert "'wq' (shape [2], float32): the engine has no weight of that name" in text
    assert "not sent: ['u']" in text
    assert isinstance(info.value, MemmgrError) and isinstance(info.value, MemmgrSyncError)
    check_specs([ParamSpec("w", (4, 4), torch.float32)], held, require_all=False)  # a subset is fine when allowed


def test_inproc_transport_loads_buckets_bit_exact_into_a_module():
    src = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
    dst = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
    loader = ModuleWeightLoader(dst)
    check_specs(specs_of(src.state_dict()), loader.expected())
    transport = InProcessTransport(loader)
    transport.start(specs_of(src.state_dict()))
    for bucket in bucketize(src.state_dict().items(), bucket_bytes=256):
        transport.send_bucket(bucket)
    transport.finish()
    assert loader.missing() == []
    assert transport.buckets > 1
    assert all(same_bits(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def test_inproc_transport_failure_names_the_tensor():
    dst = torch.nn.Linear(4, 2)
    transport = InProcessTransport(ModuleWeightLoader(dst))
    bucket = WeightBucket.pack([("weight", torch.ones(3, 4))])
    with pytest.raises(MemmgrSyncError, match="'weight'") as info:
        transport.send_bucket(bucket)
    assert isinstance(info.value.__cause__, MemmgrInputError)
    with pytest.raises(MemmgrInputError, match="load_weights callable"):
        InProcessTransport(None)  # type: ignore[arg-type]


def test_sync_that_does_not_fit_the_engine_is_refused_before_any_weight_moves():
    from types import SimpleNamespace

    import memmgr
    from memmgr.sync.session import sync_weights

    trainer = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    mgr = memmgr.for_module(trainer, pin_ahead=False)
    engine = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))  # last layer: another shape
    before = {n: t.clone() for n, t in engine.state_dict().items()}
    weights = dict(trainer.state_dict())
    exporter = SimpleNamespace(entries=specs_of(weights), is_receiver=True,
                               buckets=lambda: iter([export_like_bucket({n: weights[n]}) for n in weights]))
    with pytest.raises(MemmgrSyncMismatchError, match=r"1\.weight.*shape") as info:
        sync_weights(mgr, exporter, ModuleWeightLoader(engine))  # the loader's expected() is what the engine holds
    assert "1.bias" in str(info.value)
    # checked at start: not even the first bucket ('0.weight', which fits) reached the engine
    assert all(torch.equal(t, before[n]) for n, t in engine.state_dict().items())
    ipc_like = InProcessTransport(lambda pairs: None, held={"w": ((2,), torch.float32)})
    with pytest.raises(MemmgrSyncMismatchError, match="'x'"):
        ipc_like.start([ParamSpec("x", (2,), torch.float32)])


def export_like_bucket(weights: dict[str, torch.Tensor]):
    """A bucket shaped like the Megatron export's: one flat tensor per dtype, entries with element offsets."""
    from types import SimpleNamespace

    flats, entries, fill = {}, [], {}
    for name, t in weights.items():
        entries.append(SimpleNamespace(name=name, shape=tuple(t.shape), dtype=t.dtype, offset=fill.get(t.dtype, 0)))
        fill[t.dtype] = fill.get(t.dtype, 0) + t.numel()
    for dtype, n in fill.items():
        flats[dtype] = torch.cat([t.reshape(-1) for t in weights.values() if t.dtype == dtype])
    return SimpleNamespace(flats=flats, entries=entries)


def test_split_per_dtype_turns_an_export_bucket_into_weight_buckets_without_copying():
    w = _weights()
    export = export_like_bucket(w)
    buckets = split_per_dtype(export)
    assert sorted(str(b.dtype) for b in buckets) == sorted(str(d) for d in export.flats)
    got = {n: v for b in buckets for n, v in b.views()}
    assert all(same_bits(got[n], w[n]) for n in w)
    assert all(b.flat.data_ptr() == export.flats[b.dtype].data_ptr() for b in buckets)
    assert as_specs(export.entries) == specs_of(w)
