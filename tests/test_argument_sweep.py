"""A sweep of bad arguments over every public function: each must raise a MemmgrError subclass (never a bare
TypeError, ValueError, AttributeError or OverflowError) whose message names the argument, and change nothing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

import memmgr
from memmgr import (BucketizedFlatTensors, FlatTensors, HostMemoryPool, MemmgrError, MemoryManager,
                    allocate_host_buffer)
from memmgr.budget import apply_plan, offload_budget, plan_offload
from memmgr.ledger import Ledger
from memmgr.ordered import onload_in_order, record_first_use
from memmgr.sync import ModuleWeightLoader
from memmgr.sync.loaders import module_load_weights
from memmgr.sync.transports import (WeightBucket, as_specs, bucketize, check_specs, group_pairs, specs_of,
                                    split_per_dtype)

NAN, INF = float("nan"), float("inf")
HUGE = 2 ** 70
NOT_BOOL = [None, "yes", 1, 0.0]
NOT_OPTIONAL_BOOL = ["yes", 1]
NOT_COUNT = [None, "3", -1, 1.5, NAN, INF, HUGE, True]          # a byte count: an int >= 0
NOT_OPTIONAL_COUNT = ["3", -1, 1.5, NAN, INF, HUGE, True]
NOT_SIZE_MB = [None, "3", -1, 0, NAN, INF, -INF, True, HUGE]    # a positive finite number
NOT_NAME = [None, 3, "", ["weights"]]
NOT_GROUP = [3, None, ["weights"], "nope"]
NOT_CALLABLE = [None, 3, "fn"]
NOT_POOL = ["pool", 3, torch.randn(2)]


def sparse():
    return torch.randn(4).to_sparse()


def meta():
    return torch.empty(4, device="meta")


NOT_TENSORS = [None, 3, "abc", torch.randn(3), [torch.randn(2), "x"], [sparse()], [meta()], {"a": 3},
               {3: torch.randn(2)}]


class World:
    """A managed model with an optimizer, a spare tensor and a pool, and a fingerprint of all of it."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        self.opt = torch.optim.Adam(self.model.parameters())
        self.model(torch.randn(2, 4)).sum().backward()
        self.opt.step()
        self.pool = HostMemoryPool(pin=False)
        self.mgr = memmgr.for_module(self.model, self.opt, pool=self.pool, bucket_size_mb=1e-4)
        self.spare = torch.randn(6)
        self.group = BucketizedFlatTensors([torch.randn(5)], name="solo", pool=self.pool)

    def fingerprint(self) -> Any:
        tensors = list(self.model.parameters()) + [t for s in self.opt.state.values() for t in s.values()]
        return (dict(self.mgr.state), self.mgr.group_names, self.pool.bytes_held, self.group.state,
                [t.detach().clone() for t in tensors + [self.spare] + self.group.tensors])


def same(a: Any, b: Any) -> bool:
    *meta_a, ta = a
    *meta_b, tb = b
    return meta_a == meta_b and len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb))


@dataclass
class Arg:
    """One argument of one public function, the bad values to try, and the call that passes one."""

    where: str                                  # the function, for the test id
    name: str                                   # the argument; the error message must name it
    bad: list
    call: Callable[[World, Any], Any]
    names: str | None = None                    # what the message names instead of ``name``, if not it


def megatron_for(world: World, **kwargs: Any) -> Any:
    from memmgr.integrations.megatron import for_megatron

    return for_megatron(**kwargs)


ARGS = [
    # MemoryManager
    Arg("MemoryManager", "bucket_size_mb", NOT_SIZE_MB, lambda w, v: MemoryManager(bucket_size_mb=v)),
    Arg("MemoryManager", "empty_cache", NOT_BOOL, lambda w, v: MemoryManager(empty_cache=v)),
    Arg("MemoryManager", "pool", NOT_POOL, lambda w, v: MemoryManager(pool=v)),
    Arg("MemoryManager", "weights_group", NOT_NAME, lambda w, v: MemoryManager(weights_group=v)),
    Arg("MemoryManager", "named_weights", [3, "x"], lambda w, v: MemoryManager(named_weights=v)),
    Arg("add_group", "name", NOT_NAME, lambda w, v: w.mgr.add_group(v, [w.spare])),
    Arg("add_group", "tensors", NOT_TENSORS, lambda w, v: w.mgr.add_group("new", v), names="new"),
    Arg("add_group", "policy", [None, 3, "keep", ["copy"]], lambda w, v: w.mgr.add_group("new", [w.spare], v)),
    Arg("add_group", "priority", ["1", 1.5, NAN, HUGE, True],
        lambda w, v: w.mgr.add_group("new", [w.spare], priority=v)),
    Arg("add_group", "collect", [3, "f"], lambda w, v: w.mgr.add_group("new", [w.spare], collect=v)),
    Arg("add_group", "adopt", NOT_BOOL, lambda w, v: w.mgr.add_group("new", [w.spare], adopt=v)),
    Arg("add_group", "pin_ahead", NOT_BOOL, lambda w, v: w.mgr.add_group("new", [w.spare], pin_ahead=v)),
    Arg("add_group", "verify", NOT_BOOL, lambda w, v: w.mgr.add_group("new", [w.spare], verify=v)),
    Arg("offload", "groups", NOT_GROUP, lambda w, v: w.mgr.offload(v), names="group"),
    Arg("offload", "non_blocking", NOT_BOOL, lambda w, v: w.mgr.offload(non_blocking=v)),
    Arg("offload", "budget_bytes", [0, 1, 8], lambda w, v: w.mgr.offload(budget_bytes=v)),  # a budget is free()'s
    Arg("onload", "groups", NOT_GROUP, lambda w, v: w.mgr.onload(v), names="group"),
    Arg("onload", "non_blocking", NOT_BOOL, lambda w, v: w.mgr.onload(non_blocking=v)),
    Arg("free", "nbytes", NOT_COUNT, lambda w, v: w.mgr.free(v)),
    Arg("free", "non_blocking", NOT_BOOL, lambda w, v: w.mgr.free(1, non_blocking=v)),
    Arg("free", "strict", NOT_BOOL, lambda w, v: w.mgr.free(1, strict=v)),
    Arg("free", "groups", NOT_GROUP, lambda w, v: w.mgr.free(1, v), names="group"),
    Arg("plan_offload", "budget_bytes", NOT_COUNT, lambda w, v: w.mgr.plan_offload(v)),
    Arg("group", "name", NOT_GROUP, lambda w, v: w.mgr.group(v), names="group"),
    Arg("entries", "order", ["x", 3, ["onload"]], lambda w, v: w.mgr.entries(order=v)),
    Arg("phase", "name", [None, 3, ["p"]], lambda w, v: w.mgr.phase(v).__enter__()),
    Arg("phase", "keep", [3, [3], ["nope"], None], lambda w, v: w.mgr.phase("p", keep=v).__enter__(),
        names="group"),
    Arg("register_hook", "event", [None, 3, "x", ["before_offload"]],
        lambda w, v: w.mgr.register_hook(v, print), names="hook event"),
    Arg("register_hook", "fn", NOT_CALLABLE, lambda w, v: w.mgr.register_hook("before_offload", v)),
    Arg("attach_ledger", "ledger", [3, "ledger", object()], lambda w, v: w.mgr.attach_ledger(v)),
    Arg("onload_for_state_dicts", "owner", [None, 3, "m", torch.randn(2)],
        lambda w, v: w.mgr.onload_for_state_dicts(v, ["weights"]), names="onload_for_state_dicts"),
    Arg("onload_for_state_dicts", "groups", [[3], ["nope"], 3],
        lambda w, v: w.mgr.onload_for_state_dicts(w.model, v), names="group"),
    # flat tensors
    Arg("BucketizedFlatTensors", "tensors", NOT_TENSORS, lambda w, v: BucketizedFlatTensors(v, name="g", pool=w.pool),
        names="'g'"),
    Arg("BucketizedFlatTensors", "bucket_size_mb", NOT_SIZE_MB,
        lambda w, v: BucketizedFlatTensors([w.spare], v, name="g", pool=w.pool)),
    Arg("BucketizedFlatTensors", "name", NOT_NAME, lambda w, v: BucketizedFlatTensors([w.spare], name=v, pool=w.pool)),
    Arg("BucketizedFlatTensors", "policy", [None, 3, "keep"],
        lambda w, v: BucketizedFlatTensors([w.spare], name="g", policy=v, pool=w.pool)),
    Arg("BucketizedFlatTensors", "pool", NOT_POOL, lambda w, v: BucketizedFlatTensors([w.spare], name="g", pool=v)),
    Arg("BucketizedFlatTensors", "align_bytes", [0, -1, "64", 1.5, HUGE, None],
        lambda w, v: BucketizedFlatTensors([w.spare], name="g", pool=w.pool, align_bytes=v)),
    Arg("BucketizedFlatTensors", "pin_ahead", NOT_BOOL,
        lambda w, v: BucketizedFlatTensors([w.spare], name="g", pool=w.pool, pin_ahead=v)),
    Arg("BucketizedFlatTensors", "verify", NOT_BOOL,
        lambda w, v: BucketizedFlatTensors([w.spare], name="g", pool=w.pool, verify=v)),
    Arg("from_buffers", "buffers", [None, 3, [torch.randn(2, 2)], [sparse()], [meta()]],
        lambda w, v: BucketizedFlatTensors.from_buffers(v, name="g", pool=w.pool), names="'g"),
    Arg("from_buffers", "name", NOT_NAME, lambda w, v: BucketizedFlatTensors.from_buffers([w.spare], name=v)),
    Arg("extend", "tensors", NOT_TENSORS, lambda w, v: w.group.extend(v), names="'solo'"),
    Arg("extend", "pin_ahead", NOT_BOOL, lambda w, v: w.group.extend([w.spare], pin_ahead=v)),
    Arg("group.offload", "non_blocking", NOT_BOOL, lambda w, v: w.group.offload(non_blocking=v)),
    Arg("group.offload", "discard", NOT_OPTIONAL_BOOL, lambda w, v: w.group.offload(discard=v)),
    Arg("group.onload", "non_blocking", NOT_BOOL, lambda w, v: w.group.onload(non_blocking=v)),
    Arg("group.verify", "verify", NOT_BOOL, lambda w, v: setattr(w.group, "verify", v)),
    Arg("FlatTensors.adopt", "buffer", [None, 3, sparse(), meta(), torch.randn(2, 2)],
        lambda w, v: FlatTensors.adopt(v, name="b", pool=w.pool), names="'b'"),
    Arg("FlatTensors.adopt", "name", NOT_NAME, lambda w, v: FlatTensors.adopt(torch.randn(4), name=v, pool=w.pool)),
    Arg("FlatTensors.coalesce", "items", [None, 3, [("a", 3)], [], [torch.randn(2)]],
        lambda w, v: FlatTensors.coalesce(v, name="b", pool=w.pool), names="'b'"),
    Arg("FlatTensors.coalesce", "align_bytes", [0, "64", 1.5, HUGE],
        lambda w, v: FlatTensors.coalesce([("a", torch.randn(2))], name="b", pool=w.pool, align_bytes=v)),
    Arg("bucket.offload", "non_blocking", NOT_BOOL, lambda w, v: w.group.buckets[0].offload(non_blocking=v)),
    Arg("bucket.onload", "non_blocking", NOT_BOOL, lambda w, v: w.group.buckets[0].onload(non_blocking=v)),
    # integrations
    Arg("for_module", "module", [None, 3, "m", torch.randn(2), torch.nn.ReLU()],
        lambda w, v: memmgr.for_module(v, pool=w.pool), names="for_module|module"),
    Arg("for_module", "optimizer", [3, {"lr": 1}, "adam"], lambda w, v: memmgr.for_module(w.model, v, pool=w.pool)),
    Arg("for_module", "include_buffers", NOT_BOOL,
        lambda w, v: memmgr.for_module(w.model, include_buffers=v, pool=w.pool)),
    Arg("for_module", "bucket_size_mb", NOT_SIZE_MB,
        lambda w, v: memmgr.for_module(w.model, bucket_size_mb=v, pool=w.pool)),
    Arg("for_module", "empty_cache", NOT_BOOL, lambda w, v: memmgr.for_module(w.model, empty_cache=v, pool=w.pool)),
    Arg("for_module", "pin_ahead", NOT_BOOL, lambda w, v: memmgr.for_module(w.model, pin_ahead=v, pool=w.pool)),
    Arg("for_module", "pool", NOT_POOL, lambda w, v: memmgr.for_module(w.model, pool=v)),
    Arg("for_megatron", "model_chunks", [None, 3, [], [3], torch.nn.Linear(2, 2)],
        lambda w, v: megatron_for(w, model_chunks=v, optimizer=None), names="chunk"),
    Arg("for_megatron", "bucket_size_mb", NOT_SIZE_MB,
        lambda w, v: megatron_for(w, model_chunks=w.model, optimizer=None, bucket_size_mb=v)),
    Arg("for_megatron", "empty_cache", NOT_BOOL,
        lambda w, v: megatron_for(w, model_chunks=w.model, optimizer=None, empty_cache=v)),
    Arg("for_megatron", "pin_ahead", NOT_BOOL,
        lambda w, v: megatron_for(w, model_chunks=w.model, optimizer=None, pin_ahead=v)),
    Arg("for_megatron", "pool", NOT_POOL, lambda w, v: megatron_for(w, model_chunks=w.model, optimizer=None, pool=v)),
    # swap, budget, ordered onload
    Arg("swap", "out", [None, 3, "mgr", []], lambda w, v: memmgr.swap(out=v, into=w.group)),
    Arg("swap", "into", [None, 3, "mgr", [3]], lambda w, v: memmgr.swap(out=w.mgr, into=v)),
    Arg("swap", "margin_bytes", NOT_COUNT, lambda w, v: memmgr.swap(out=w.mgr, into=w.group, margin_bytes=v)),
    Arg("swap", "out_groups", ["weights", [3], ["nope"]],
        lambda w, v: memmgr.swap(out=w.mgr, into=w.group, out_groups=v), names="group"),
    Arg("swap", "non_blocking", NOT_BOOL, lambda w, v: memmgr.swap(out=w.mgr, into=w.group, non_blocking=v)),
    Arg("swap", "strict", NOT_BOOL, lambda w, v: memmgr.swap(out=w.mgr, into=w.group, strict=v)),
    Arg("swap", "track_torch_peak", NOT_BOOL, lambda w, v: memmgr.swap(out=w.mgr, into=w.group, track_torch_peak=v)),
    Arg("plan_offload(budget)", "budget_bytes", NOT_COUNT, lambda w, v: plan_offload(w.mgr, v)),
    Arg("offload_budget", "budget_bytes", NOT_COUNT, lambda w, v: offload_budget(w.mgr, v)),
    Arg("offload_budget", "strict", NOT_BOOL, lambda w, v: offload_budget(w.mgr, 1, strict=v)),
    Arg("apply_plan", "plan", [None, 3, "plan"], lambda w, v: apply_plan(v)),
    Arg("onload_in_order", "target", [None, 3, "mgr"], lambda w, v: onload_in_order(v, w.model),
        names="ordered onload"),
    Arg("onload_in_order", "module", [None, 3, torch.randn(2)], lambda w, v: onload_in_order(w.mgr, v)),
    Arg("onload_in_order", "order", [3, "ab", [0, 0], [-1], ["0"], [0.5]],
        lambda w, v: onload_in_order(w.mgr, w.model, order=v), names="order"),
    Arg("onload_in_order", "prefetch", [-1, "1", 1.5, NAN, HUGE],
        lambda w, v: onload_in_order(w.mgr, w.model, prefetch=v)),
    Arg("record_first_use", "module", [None, 3], lambda w, v: record_first_use(w.mgr.group("weights"), v, print)),
    Arg("record_first_use", "run", NOT_CALLABLE, lambda w, v: record_first_use(w.mgr.group("weights"), w.model, v)),
    # host memory
    Arg("HostMemoryPool", "pin", NOT_OPTIONAL_BOOL, lambda w, v: HostMemoryPool(pin=v)),
    Arg("HostMemoryPool", "num_threads", [0, -1, "4", 1.5, HUGE, None], lambda w, v: HostMemoryPool(num_threads=v)),
    Arg("HostMemoryPool.acquire", "nbytes", NOT_COUNT, lambda w, v: w.pool.acquire(v)),
    Arg("HostMemoryPool.reserve", "sizes", [3, ["1"], [-1], [NAN], [HUGE]], lambda w, v: w.pool.reserve(v)),
    Arg("HostMemoryPool.reserve", "background", NOT_BOOL, lambda w, v: w.pool.reserve([8], background=v)),
    Arg("HostMemoryPool.release", "buf", [None, 3, torch.randn(2)], lambda w, v: w.pool.release(v)),
    Arg("allocate_host_buffer", "nbytes", NOT_COUNT, lambda w, v: allocate_host_buffer(v, pin=False)),
    Arg("allocate_host_buffer", "pin", NOT_OPTIONAL_BOOL, lambda w, v: allocate_host_buffer(8, pin=v)),
    Arg("allocate_host_buffer", "num_threads", [0, "2", 1.5, None], lambda w, v: allocate_host_buffer(8, False, v)),
    Arg("allocate_host_buffer", "allow_pageable_fallback", NOT_BOOL,
        lambda w, v: allocate_host_buffer(8, False, allow_pageable_fallback=v)),
    # ledger
    Arg("Ledger", "path", [3, ["p"], 1.5], lambda w, v: Ledger(v)),
    Arg("Ledger", "rank", [-1, "0", 1.5, NAN, HUGE], lambda w, v: Ledger(rank=v)),
    Arg("Ledger", "devices", [3, ["0"], [-1], "0"], lambda w, v: Ledger(devices=v)),
    Arg("Ledger", "append", NOT_BOOL, lambda w, v: Ledger(append=v)),
    Arg("Ledger", "keep_records", NOT_BOOL, lambda w, v: Ledger(keep_records=v)),
    Arg("Ledger.track", "manager", [None, 3, "mgr"], lambda w, v: Ledger().track(v)),
    Arg("Ledger.track", "name", [3, "", ["n"]], lambda w, v: Ledger().track(w.mgr, v)),
    # weight loaders
    Arg("ModuleWeightLoader", "module", [None, 3, torch.randn(2)], lambda w, v: ModuleWeightLoader(v),
        names="ModuleWeightLoader"),
    Arg("ModuleWeightLoader", "include_buffers", NOT_BOOL, lambda w, v: ModuleWeightLoader(w.model, include_buffers=v)),
    Arg("module_load_weights", "module", [None, 3], lambda w, v: module_load_weights(v), names="ModuleWeightLoader"),
    Arg("load_weights", "weights", [None, 3, "ab", torch.randn(2), [("w",)], [(3, torch.randn(2))],
                                    [("0.weight", "x")], [["0.bias", torch.randn(8)]]],
        lambda w, v: ModuleWeightLoader(w.model)(v), names="load_weights"),
    # moving units, placements, plans
    Arg("offload_units", "units", [3, "weights", [3], [torch.randn(2)]],
        lambda w, v: w.mgr.offload_units(v, groups=("weights",))),
    Arg("onload_units", "units", [3, [3], [None]],
        lambda w, v: w.mgr.onload_units(v, groups=("weights",))),
    Arg("restore_placement", "placement", [None, 3, "weights", [("weights", 3, True)]],
        lambda w, v: w.mgr.restore_placement(v)),
    Arg("budget.plan_offload", "groups", [3, [3], "weights"], lambda w, v: plan_offload(w.mgr, 8, v)),
    Arg("offload_budget", "groups", [3, [3], "weights"], lambda w, v: offload_budget(w.mgr, 8, v)),
    Arg("OffloadPlan.onload", "non_blocking", NOT_BOOL, lambda w, v: plan_onload_of(w, v)),
    Arg("drop_buckets", "buckets", [3, [3], "b", [torch.randn(2)]],
        lambda w, v: w.mgr.group("weights").drop_buckets(v)),
    Arg("drop_buckets", "buckets", ["another group's bucket"],
        lambda w, v: w.mgr.group("weights").drop_buckets(w.group.buckets), names="not buckets of this group"),
    Arg("add_group", "tensors", ["a group of an open manager"], lambda w, v: w.mgr.add_group("again",
                                                                                          w.mgr.group("weights")),
        names="already in an open MemoryManager"),
    Arg("register_hook", "fn", [lambda: None, lambda event: None, lambda a, b, c: None],
        lambda w, v: w.mgr.register_hook("before_offload", v), names=r"fn\(event, group_names\)"),
    # weight-sync buckets
    Arg("bucketize", "pairs", [3, "ab", torch.randn(2), [3], [("w",)], [(3, torch.randn(2))], [("w", "x")]],
        lambda w, v: list(bucketize(v)), names="pair"),
    Arg("bucketize", "bucket_bytes", NOT_COUNT[1:] + [0], lambda w, v: bucketize([("w", w.spare)], v)),
    Arg("group_pairs", "bucket_bytes", [NAN, "x", 0, -1, 1.5], lambda w, v: group_pairs([("w", w.spare)], v),
        names="bucket_bytes"),
    Arg("WeightBucket.pack", "pairs", [3, None, [("w", "x")], [(3, torch.randn(2))]], lambda w, v: WeightBucket.pack(v),
        names="pair"),
    Arg("specs_of", "weights", [3, [("w", 3)]], lambda w, v: specs_of(v), names="pair"),
    Arg("as_specs", "items", [3, [3], ["w"]], lambda w, v: as_specs(v), names="as_specs"),
    Arg("check_specs", "sent", [3, [3]], lambda w, v: check_specs(v, {}), names="as_specs"),
    Arg("check_specs", "held", [3, [("w", (6,))]], lambda w, v: check_specs(specs_of([("w", w.spare)]), v)),
    Arg("split_per_dtype", "bucket", [3, None, torch.randn(2)], lambda w, v: split_per_dtype(v)),
]


def plan_onload_of(world: World, non_blocking: Any) -> Any:
    plan = world.mgr.free(1, "weights")
    try:
        return plan.onload(non_blocking=non_blocking)
    except MemmgrError:
        world.mgr.onload()  # the refused call changed nothing; put the freed bucket back for the fingerprint
        raise

CASES = [(arg, value) for arg in ARGS for value in arg.bad]


def case_id(case: tuple[Arg, Any]) -> str:
    arg, value = case
    shown = type(value).__name__ if isinstance(value, (torch.Tensor, list, dict, object)) and not isinstance(
        value, (str, int, float, type(None))) else repr(value)
    return f"{arg.where}.{arg.name}={shown[:20]}"


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arg, value", CASES, ids=[case_id(c) for c in CASES])
def test_bad_argument_raises_a_memmgr_error_naming_it_and_changes_nothing(arg, value):
    if arg.where == "for_megatron":
        pytest.importorskip("megatron.core")
    world = World()
    before = world.fingerprint()
    with pytest.raises(Exception) as info:
        arg.call(world, value)
    assert isinstance(info.value, MemmgrError), f"{type(info.value).__name__}: {info.value}"
    import re

    assert re.search(arg.names or arg.name, str(info.value)), str(info.value)
    assert same(world.fingerprint(), before), "the bad call changed the managed state"
    world.mgr.close()


def test_sweep_covers_every_public_entry_point():
    covered = {arg.where.split(".")[0] for arg in ARGS}
    assert {"MemoryManager", "add_group", "offload", "onload", "free", "plan_offload", "phase", "register_hook",
            "BucketizedFlatTensors", "FlatTensors", "for_module", "for_megatron", "swap", "offload_budget",
            "apply_plan", "onload_in_order", "HostMemoryPool", "allocate_host_buffer", "Ledger",
            "ModuleWeightLoader", "load_weights", "offload_units", "onload_units", "restore_placement",
            "drop_buckets", "bucketize", "group_pairs", "WeightBucket", "specs_of", "as_specs", "check_specs",
            "split_per_dtype"} <= covered
    assert len(CASES) >= 300
