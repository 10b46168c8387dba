"""Budgeted offload, bidirectional swap and ordered onload: planning logic, bounds and orders (fast, CPU; the same
tests run on a GPU when there is one)."""
import random

import pytest
import torch

from conftest import same_bits
import memmgr
from memmgr import MemmgrInputError, MemmgrStateError, MemoryManager, TransferHandle
from memmgr.budget import Candidate, MemmgrBudgetError, OffloadPlan, apply_plan, plan_units
from memmgr.groups import group_state
from memmgr.host_memory import HostMemoryPool
from memmgr.ordered import (bucket_events, check_order, module_buckets, onload_in_order, record_first_use,
                            registration_order, wait_for_buckets)
from memmgr.states import GroupState
from memmgr.swap import SwapLedger, SwapUnit, run_swap, swap

PARTIAL = GroupState.PARTIAL.value


def bucket_states(group):
    return {u.name: u.state.value for u in group.units}


KiB = 1024


# ---------------------------------------------------------------- pure planning
def cand(group, unit, nbytes, discard=False, priority=10, gi=0, ui=0):
    return Candidate(group, unit, nbytes, discard, priority, gi, ui)


def test_plan_takes_cheapest_first_and_stops_at_the_budget():
    cands = [cand("weights", "w/0", 100, priority=30, gi=0, ui=0), cand("weights", "w/1", 100, priority=30, gi=0, ui=1),
             cand("grads", "g/0", 50, True, priority=0, gi=1, ui=0),
             cand("optimizer_states", "o/0", 80, priority=10, gi=2, ui=0),
             cand("optimizer_states", "o/1", 80, priority=10, gi=2, ui=1),
             cand("main_weights", "m/0", 70, priority=20, gi=3, ui=0)]
    chosen, available = plan_units(cands, 200)
    assert available == 480
    # grads, then optimizer states from their last bucket back, then main weights; weights untouched
    assert [c.unit for c in chosen] == ["g/0", "o/1", "o/0"]
    assert sum(c.nbytes for c in chosen) == 210
    chosen, _ = plan_units(cands, 1)
    assert [c.unit for c in chosen] == ["g/0"]
    assert plan_units(cands, 0)[0] == []
    chosen, _ = plan_units(cands, 10_000)
    assert sum(c.nbytes for c in chosen) == 480  # everything, short of the budget
    assert [c.unit for c in chosen][-2:] == ["w/1", "w/0"]


def test_plan_prefers_discard_within_a_priority_and_skips_empty_units():
    cands = [cand("a", "a/0", 100, False, priority=5, gi=0), cand("b", "b/0", 100, True, priority=5, gi=1),
             cand("c", "c/0", 0, True, priority=0, gi=2)]
    chosen, available = plan_units(cands, 50)
    assert [c.unit for c in chosen] == ["b/0"] and available == 200
    with pytest.raises(MemmgrInputError):
        plan_units(cands, -1)


@pytest.mark.parametrize("seed", range(20))
def test_plan_bounds_hold_for_random_states(seed):
    rng = random.Random(seed)
    cands = [cand(f"g{g}", f"g{g}/{u}", rng.choice([0, rng.randint(1, 10_000)]), rng.random() < 0.2,
                  rng.choice([0, 10, 20, 30]), g, u) for g in range(5) for u in range(rng.randint(1, 8))]
    for _ in range(10):
        budget = rng.randint(0, 60_000)
        chosen, available = plan_units(cands, budget)
        moved = sum(c.nbytes for c in chosen)
        if available >= budget:
            assert moved >= budget
            if chosen:
                assert moved - chosen[-1].nbytes < budget  # no more than the budget plus one bucket
        else:
            assert moved == available
        keys = [(c.priority, not c.discard, c.group_index, -c.unit_index) for c in chosen]
        assert keys == sorted(keys)


# ---------------------------------------------------------------- budgeted offload on a manager
def tensors(prefix, n, numel, device, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {f"{prefix}.{i}": torch.randn(numel, generator=g).to(device=device, dtype=dtype) for i in range(n)}


def build_manager(device, pool=None):
    """Four groups, 4 KiB buckets: weights (bf16), grads (discard), main weights, optimizer states."""
    mgr = MemoryManager(bucket_size_mb=4 * KiB / 2**20, pool=pool or HostMemoryPool())
    state = {"weights": tensors("w", 6, 2048, device, 0, torch.bfloat16), "grads": tensors("g", 4, 1024, device, 1),
             "main_weights": tensors("m", 6, 1024, device, 2), "optimizer_states": tensors("o", 8, 1024, device, 3)}
    for name, ts in state.items():
        mgr.add_group(name, ts, policy="discard" if name == "grads" else "copy")
    snapshot = {n: [t.detach().clone() for t in ts.values()] for n, ts in state.items()}
    return mgr, state, snapshot


def device_bytes(mgr):
    return sum(s.device_bytes for s in mgr.state.values())


def test_budgeted_offload_frees_at_least_n_cheapest_first_and_onload_restores(device):
    mgr, state, snap = build_manager(device)
    total = device_bytes(mgr)
    budget = 6 * 4 * KiB + 100  # all grads (4 buckets) and then some
    dry = mgr.plan_offload(budget)
    assert dry.dry_run and device_bytes(mgr) == total  # nothing moved
    assert dry.planned_bytes >= budget
    plan = mgr.free(budget)
    assert not plan.dry_run and list(plan) == list(dry)
    freed = total - device_bytes(mgr)
    assert freed == plan.planned_bytes >= budget
    assert freed - max(b for _, _, b, _ in plan) < budget  # budget plus at most one bucket
    assert [g for g, _, _, _ in plan][:4] == ["grads"] * 4 and all(d for g, _, _, d in plan if g == "grads")
    assert plan.groups == ["grads", "optimizer_states"]
    st = mgr.state
    assert st["grads"].state == "discarded" and st["optimizer_states"].state == PARTIAL
    assert st["weights"].state == "on_device"
    assert group_state(mgr.group("optimizer_states")) is GroupState.PARTIAL
    assert "on_host" in bucket_states(mgr.group("optimizer_states")).values()
    assert "partial" in repr(mgr)
    plan.onload()
    assert device_bytes(mgr) == total
    for name in ("weights", "main_weights", "optimizer_states"):
        assert all(same_bits(a, b) for a, b in zip(state[name].values(), snap[name]))
    assert all(bool((t == 0).all()) for t in state["grads"].values())


def test_manager_onload_brings_back_every_off_bucket_and_plan_onload_only_its_own(device):
    mgr, state, snap = build_manager(device)
    mgr.offload("weights")  # off independently of the plan
    plan = mgr.free(3 * 4 * KiB, "main_weights")
    assert {g for g, _, _, _ in plan} == {"main_weights"}
    plan.onload()
    assert mgr.state["main_weights"].state == "on_device" and mgr.state["weights"].state == "on_host"
    plan2 = mgr.free(1)
    assert mgr.state["grads"].state == PARTIAL and list(plan2)[0][:2] == ("grads", "grads/3")  # one bucket
    mgr.onload()
    assert all(s.state == "on_device" for s in mgr.state.values())
    for name in ("weights", "main_weights", "optimizer_states"):
        assert all(same_bits(a, b) for a, b in zip(state[name].values(), snap[name]))


def test_partial_groups_work_with_offload_phase_and_state(device):
    mgr, state, snap = build_manager(device)
    mgr.free(7 * 4 * KiB)
    assert mgr.state["optimizer_states"].state == PARTIAL
    with mgr.phase("generate", keep=["weights"]):
        assert mgr.state["optimizer_states"].state == "on_host"
        assert mgr.state["weights"].state == "on_device"
    assert mgr.state["optimizer_states"].state == PARTIAL  # a phase restores each bucket's placement
    mgr.onload()
    mgr.free(7 * 4 * KiB)
    mgr.offload()  # the rest of a partial group goes too
    assert device_bytes(mgr) == 0
    mgr.onload()
    assert all(same_bits(a, b) for a, b in zip(state["optimizer_states"].values(), snap["optimizer_states"]))


def test_budget_too_large_raises_before_moving_anything_unless_not_strict(device):
    mgr, _, _ = build_manager(device)
    total = device_bytes(mgr)
    with pytest.raises(MemmgrBudgetError, match="hold only") as info:
        mgr.free(total + 1)
    assert info.value.available_bytes == total and device_bytes(mgr) == total
    plan = mgr.free(total + 1, strict=False)
    assert plan.shortfall_bytes == 1 and device_bytes(mgr) == 0
    mgr.onload()
    assert mgr.plan_offload(0).items == []


def test_offload_refuses_a_budget_and_names_free_instead(device):
    mgr, _, _ = build_manager(device)
    total = device_bytes(mgr)
    with pytest.raises(MemmgrInputError, match=r"budget_bytes.*mgr\.free\(nbytes"):
        mgr.offload(budget_bytes=8)
    assert device_bytes(mgr) == total


def test_offload_and_onload_return_transfer_handles_and_free_returns_its_plan(device):
    mgr, _, _ = build_manager(device)
    assert isinstance(mgr.offload("grads"), TransferHandle)
    assert isinstance(mgr.onload("grads"), TransferHandle)
    plan = mgr.free(1)
    assert isinstance(plan, OffloadPlan) and not plan.dry_run and plan.planned_bytes >= 1


def test_dry_run_plan_can_be_applied_once_and_goes_stale(device):
    mgr, _, _ = build_manager(device)
    dry = mgr.plan_offload(5 * 4 * KiB)
    with pytest.raises(MemmgrStateError, match="dry run"):
        dry.onload()
    stale = mgr.plan_offload(5 * 4 * KiB)
    apply_plan(dry)
    with pytest.raises(MemmgrStateError, match="carried out already"):
        apply_plan(dry)
    with pytest.raises(MemmgrStateError, match="stale"):
        apply_plan(stale)
    assert "bucket(s)" in dry.describe()


def test_budget_with_for_module_drops_grads_first(device):
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)]).to(device)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 64, device=device)).sum().backward()
    opt.step()
    mgr = memmgr.for_module(model, opt, bucket_size_mb=16 * KiB / 2**20)
    grads = mgr.state["grads"].device_bytes
    assert grads > 0
    plan = mgr.free(grads)
    assert [(g, d) for g, _, _, d in plan] == [("grads", True)]
    assert all(p.grad is None for p in model.parameters())
    mgr.onload()


# ---------------------------------------------------------------- swap bookkeeping
class FakeHandle:
    """Completes in order on a simulated d2h stream: done() once the clock passed it, wait() advances the clock."""

    def __init__(self, clock, index):
        self.clock, self.index = clock, index

    def done(self):
        return self.clock["completed"] > self.index

    def wait(self):
        self.clock["completed"] = max(self.clock["completed"], self.index + 1)


@pytest.mark.parametrize("seed", range(25))
def test_swap_schedule_never_exceeds_freed_plus_margin(seed):
    rng = random.Random(seed)
    clock = {"completed": 0}
    outs = [rng.randint(1, 100) for _ in range(rng.randint(1, 30))]
    ins = []
    budget = sum(outs) + (margin := rng.randint(0, 150))
    while True:
        n = rng.randint(1, 100)
        if sum(ins) + n > budget or len(ins) > 40:
            break
        ins.append(n)

    def out_unit(i, n):
        return SwapUnit(f"a{i}", n, lambda: FakeHandle(clock, i))

    def in_unit(i, n):
        def start():
            clock["completed"] = min(len(outs), clock["completed"] + rng.randint(0, 2))  # the copies progress
            return FakeHandle({"completed": 10**9}, 0)
        return SwapUnit(f"b{i}", n, start)

    sched = run_swap([out_unit(i, n) for i, n in enumerate(outs)], [in_unit(i, n) for i, n in enumerate(ins)], margin)
    ledger = sched.ledger
    assert ledger.high_water <= margin
    assert ledger.allocated_in == sum(ins)
    for event, allocated, freed in ledger.steps:
        if event == "allocated":
            assert allocated - freed <= margin
    # every out unit started before any in unit; waits are in d2h order
    kinds = [o.split(":")[0] for o in sched.order]
    assert kinds[:len(outs)] == ["out"] * len(outs)
    waited = [int(o.split(":a")[1]) for o in sched.order if o.startswith("wait:")]
    assert waited == sorted(waited)


def test_swap_ledger_refuses_over_the_bound_and_larger_margin_waits_less():
    ledger = SwapLedger(10)
    ledger.allocate(10)
    with pytest.raises(MemmgrInputError):
        ledger.allocate(1)
    ledger.complete_free(5)
    assert ledger.headroom_needed(5) == 0 and ledger.headroom_needed(6) == 1

    def waits(margin):
        clock = {"completed": 0}
        outs = [SwapUnit(f"a{i}", 10, (lambda i=i: FakeHandle(clock, i))) for i in range(10)]
        ins = [SwapUnit(f"b{i}", 10, lambda: FakeHandle({"completed": 1}, 0)) for i in range(10)]
        return run_swap(outs, ins, margin).host_waits

    assert waits(0) == 10 and waits(30) == 7 and waits(100) == 0
    with pytest.raises(MemmgrBudgetError):
        run_swap([SwapUnit("a", 5, lambda: FakeHandle({"completed": 1}, 0))],
                 [SwapUnit("b", 10, lambda: FakeHandle({"completed": 1}, 0))], 0)


def test_swap_managers_bit_exact_within_bound(device):
    pool = HostMemoryPool()
    a, a_state, a_snap = build_manager(device, pool)
    b, b_state, b_snap = build_manager(device, pool)
    b.offload()
    a_bytes = device_bytes(a)
    result = swap(out=a, into=b, margin_bytes=4 * KiB)
    assert device_bytes(a) == 0 and device_bytes(b) == a_bytes
    assert result.within_bound and result.high_water_bytes <= 4 * KiB
    assert result.out_bytes == a_bytes and result.in_bytes == a_bytes
    assert result.as_dict()["within_bound"]
    for name in ("weights", "main_weights", "optimizer_states"):
        assert all(same_bits(x, y) for x, y in zip(b_state[name].values(), b_snap[name]))
    back = swap(out=b, into=a)  # margin 0: every allocation waits for an equal free
    assert back.high_water_bytes <= 0
    for name in ("weights", "main_weights", "optimizer_states"):
        assert all(same_bits(x, y) for x, y in zip(a_state[name].values(), a_snap[name]))


def test_swap_refuses_an_incoming_state_larger_than_freed_plus_margin(device):
    pool = HostMemoryPool()
    a, _, _ = build_manager(device, pool)
    b, _, _ = build_manager(device, pool)
    a.offload("weights")
    b.offload()
    before = (device_bytes(a), device_bytes(b))
    with pytest.raises(MemmgrBudgetError, match="frees only"):
        swap(out=a, into=b)
    assert (device_bytes(a), device_bytes(b)) == before
    with pytest.raises(MemmgrInputError):
        swap(out=a, into=a.group("weights"), margin_bytes=-1)
    ok = swap(out=a, into=b, margin_bytes=10**9)
    assert ok.within_bound


# ---------------------------------------------------------------- ordered onload
class Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = torch.nn.Linear(d, d)

    def forward(self, x):
        return torch.relu(self.fc(x))


class Net(torch.nn.Module):
    """Registered head, b2, b1, emb but run emb -> b1 -> b2 -> head (tied to emb): registration != forward order."""

    def __init__(self, d=32, vocab=50):
        super().__init__()
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.b2 = Block(d)
        self.b1 = Block(d)
        self.emb = torch.nn.Embedding(vocab, d)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.b2(self.b1(self.emb(ids))))


def make_net(device):
    torch.manual_seed(0)
    net = Net().to(device)
    mgr = memmgr.for_module(net, bucket_size_mb=5 * KiB / 2**20)  # one Linear(32, 32) per bucket, about
    return net, mgr


def test_first_use_order_follows_the_forward_not_registration(device):
    net, mgr = make_net(device)
    group = mgr.group("weights")
    ids = torch.arange(10, device=device)
    owned = module_buckets(group, net)
    assert set(owned) == {"head", "b2.fc", "b1.fc", "emb"}
    assert owned["head"] == owned["emb"]  # tied
    reg = registration_order(group, net)
    first = record_first_use(group, net, lambda: net(ids))
    assert sorted(first) == list(range(len(group.buckets))) == sorted(reg)
    pos = {i: k for k, i in enumerate(first)}
    assert pos[owned["emb"][0]] < pos[owned["b1.fc"][0]] < pos[owned["b2.fc"][-1]]
    assert registration_order(group) == list(range(len(group.buckets)))
    with pytest.raises(MemmgrInputError):
        check_order([0, 0], 2)


def test_onload_in_order_restores_weights_and_hooks_wait_in_forward_order(device):
    net, mgr = make_net(device)
    group = mgr.group("weights")
    ids = torch.arange(10, device=device)
    with torch.no_grad():
        expected = net(ids).clone()
    order = record_first_use(group, net, lambda: net(ids))
    seen = []
    mgr.register_hook("before_onload", lambda ev, names: seen.append((ev, names)))
    mgr.offload("weights")
    assert group.device_bytes == 0
    ordered = onload_in_order(mgr, net, order)
    assert seen == [("before_onload", ("weights",))]
    assert ordered.hooks_active > 0
    assert set(bucket_events(group)) == {b.name for b in group.buckets}
    with torch.no_grad():
        out = net(ids)
    assert same_bits(out, expected)
    # the hooks waited on buckets in first-use order, then removed themselves
    assert ordered.hook_waits == [i for i in order if i in ordered.hook_waits]
    assert ordered.hooks_active == 0
    ordered.wait()
    wait_for_buckets(group.buckets)
    assert mgr.state["weights"].state == "on_device"


def test_onload_in_order_finish_covers_buckets_the_forward_does_not_touch(device):
    net, mgr = make_net(device)
    group = mgr.group("weights")
    mgr.offload("weights")
    ordered = onload_in_order(group, net)  # a group works too; registration order
    assert ordered.order == registration_order(group, net)
    ordered.finish()
    assert ordered.hooks_active == 0 and len(ordered.waited) == len(group.buckets)
    ordered.wait()
    with pytest.raises(MemmgrInputError):
        onload_in_order(object(), net)


@pytest.mark.parametrize("prefetch", [0, 1])
def test_onload_in_order_with_a_prefetch_window_issues_lazily_from_the_hooks(device, prefetch):
    net, mgr = make_net(device)
    group = mgr.group("weights")
    ids = torch.arange(10, device=device)
    with torch.no_grad():
        expected = net(ids).clone()
    order = record_first_use(group, net, lambda: net(ids))
    mgr.offload("weights")
    ordered = onload_in_order(mgr, net, order, prefetch=prefetch)
    assert ordered.issued == prefetch + 1 < len(group.buckets)
    # the rest is still on the host ("onloading" while a copy is in flight on a GPU: in-flight states win)
    assert mgr.state["weights"].state in (PARTIAL, "onloading")
    assert "on_host" in bucket_states(group).values()
    with torch.no_grad():
        assert same_bits(net(ids), expected)
    assert ordered.issued == len(group.buckets) and ordered.hooks_active == 0
    ordered.wait()
    assert mgr.state["weights"].state == "on_device"
    with pytest.raises(MemmgrInputError):
        onload_in_order(mgr, net, prefetch=-1)


def test_ordered_wait_without_a_forward_issues_everything(device):
    net, mgr = make_net(device)
    mgr.offload("weights")
    ordered = onload_in_order(mgr, net, prefetch=0)
    ordered.wait()
    assert mgr.state["weights"].state == "on_device" and ordered.hooks_active == 0
