"""A stateful property test of memmgr's public API (issue 29, item 3), run as a program so that a crash is a failure.

Hypothesis' ``RuleBasedStateMachine`` draws random sequences of what a user does with a small plain-torch trainer (a
two-layer MLP with a float and an integer buffer, and a torch optimizer) managed by ``memmgr.for_module``: training
steps, ``offload``/``onload`` of groups, budgeted offloads (``free(N)``, ``memmgr.budget.offload_budget``,
``plan.onload()``), ``phase(name, keep=...)`` with allowed work inside, ``weight_sync()`` and ``sync_weights(...)``
into an in-process engine, hooks and engines that raise, checkpoints (``state_dict``/``load_state_dict``),
``memmgr.swap`` between two managers, and ``close()`` followed by a new manager. Every call is applied to a twin
model and optimizer that memmgr never sees (same initial values, same data), and after every step:

- each bucket's state and each group's ``mgr.state`` are what the docstrings promise for the calls so far;
- parameters, buffers, gradients and optimizer state equal the twin's bit for bit: read directly where the
  bucket is on the device, through ``copy.deepcopy`` (documented to read the host copy) where it is offloaded;
- a group that is not wholly on the device refuses ``require_on_device()`` with a MemmgrStateError.

``python tests/stateful_api_machine.py --examples N --optimizer adam|adamw|sgd [--device cuda] [--seed S]`` runs it
and exits non-zero (printing hypothesis' minimal failing sequence) on a failure; ``tests/test_stateful_api.py`` runs
it in a subprocess per optimizer, so a segfault fails that test instead of ending the pytest run. The last line of
the output is ``STATS {json}``: examples run and how often each rule ran.

Rules the memmgr bugs found so far break are listed in ``DISABLED`` with the reason; re-enabling one is deleting its
line there (``ENABLED`` is every rule name not in it).
"""
from __future__ import annotations

import argparse
import collections
import copy
import gc
import io
import json
import os
import sys
import warnings
from types import SimpleNamespace

import torch

import memmgr
from hypothesis import HealthCheck, Verbosity, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from memmgr import BucketizedFlatTensors, BucketState, GroupState, MemmgrError, MemmgrStateError, Policy
from memmgr.budget import MemmgrBudgetError, offload_budget
from memmgr.errors import MemmgrSyncError
from memmgr.sync.export.sources import HostCopySource
from memmgr.sync.loaders import ModuleWeightLoader
from memmgr.sync.session import sync_weights
from memmgr.sync.transports.base import specs_of

# ---------------------------------------------------------------------------------------------------- what runs
RULES = ["backward", "backward_with_grads_dropped", "optimizer_step", "zero_grad", "offload", "onload",
         "offload_budget", "free", "plan_onload", "phase", "weight_sync", "sync_weights", "failing_hook",
         "failing_engine", "save_checkpoint",
         "load_checkpoint", "close_and_rebuild", "swap", "deepcopy_model"]
# the work a phase body may do (phase.<name> in DISABLED turns one off)
PHASE_ACTIONS = ["train", "weight_sync", "sync_weights", "onload", "offload", "free", "save_checkpoint",
                 "load_checkpoint", "nested_phase", "raise"]
# the calls a failing hook is tried on (failing_hook.<op>.<event> in DISABLED turns one combination off)
FAILING_HOOK_OPS = ["offload", "onload", "free", "phase", "weight_sync", "sync_weights", "close", "swap_out",
                    "swap_into"]
# the hook events each of them fires (a failing hook is put mostly on one of these, sometimes on any event)
OP_EVENTS = {
    "offload": ["before_offload", "after_offload"], "free": ["before_offload", "after_offload"],
    "onload": ["before_onload", "after_onload"], "close": ["before_onload", "after_onload"],
    "phase": ["before_offload", "after_offload", "before_onload", "after_onload"],
    "weight_sync": ["before_weight_sync", "after_weight_sync", "before_onload", "after_onload", "before_offload",
                    "after_offload"],
    "sync_weights": ["before_weight_sync", "after_weight_sync"],
    "swap_out": ["before_offload", "after_offload"], "swap_into": ["before_onload", "after_onload"],
}
# name -> why it is off (a memmgr bug, with the repro in the report of issue 29 item 3). Re-enable: delete the line.
DISABLED: dict[str, str] = {
}
ENABLED = {r for r in RULES if r not in DISABLED}
ENABLED_PHASE_ACTIONS = [a for a in PHASE_ACTIONS if f"phase.{a}" not in DISABLED]

GROUPS = ("weights", "grads", "optimizer_states")
# the documented budgeted-offload order (memmgr.budget): discardable gradients, then optimizer states, then weights
BUDGET_ORDER = {"grads": 0, "optimizer_states": 1, "weights": 3}
HOOK_EVENTS = [e.value for e in memmgr.HookEvent]
BUCKET_SIZES_MB = [64 / 2**20, 200 / 2**20, 1.0]

DEVICE = torch.device("cpu")
OPTIMIZER = "adam"
STATS: collections.Counter = collections.Counter()

ON, HOST, DISC = BucketState.ON_DEVICE, BucketState.ON_HOST, BucketState.DISCARDED


class HookBoom(RuntimeError):
    """Raised by a failing hook."""


class EngineBoom(RuntimeError):
    """Raised by a failing engine."""


class BodyBoom(RuntimeError):
    """Raised by a phase body (the user's generation failing)."""


# ---------------------------------------------------------------------------------------------------- the trainer
class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(6, 8)
        self.l2 = torch.nn.Linear(8, 3)
        self.shift = torch.nn.Parameter(torch.linspace(-0.5, 0.5, 3).to(torch.bfloat16))  # a second dtype
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 3))
        self.register_buffer("count", torch.zeros(1, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(x))) * self.scale + self.shift.float()


def make_optimizer(params) -> torch.optim.Optimizer:
    if OPTIMIZER == "adam":
        return torch.optim.Adam(params, lr=1e-2)
    if OPTIMIZER == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    if OPTIMIZER == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    raise ValueError(OPTIMIZER)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 6, generator=g).to(DEVICE), torch.randn(4, 3, generator=g).to(DEVICE)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a = a.detach().contiguous().cpu().reshape(-1)
    b = b.detach().contiguous().cpu().reshape(-1)
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def has_memory(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() > 0


def off_state(unit, old: BucketState) -> BucketState:
    """What an offload leaves a unit in: copy-policy units go to the host, discard-policy ones are discarded; a unit
    already off stays as it is."""
    if not old.holds_device_memory:
        return old
    return DISC if unit.policy is Policy.DISCARD else HOST


def readable(t: torch.Tensor) -> torch.Tensor:
    """The tensor's contents wherever they are: itself on the device, its host copy (``copy.deepcopy``, documented
    to read the host copy of an offloaded tensor) when offloaded."""
    return t if has_memory(t) or t.numel() == 0 else copy.deepcopy(t)


class ModuleExporter:
    """The exporter ``sync_weights`` takes, for a plain module: the manager's named weights read through
    ``HostCopySource`` (device memory where a bucket is on the device, its host copy where it is offloaded), packed
    ``per_bucket`` tensors at a time into one flat tensor per dtype."""

    def __init__(self, mgr: memmgr.MemoryManager, per_bucket: int = 2):
        self.named = list(mgr.named_weights().items())
        self.source = HostCopySource(mgr.group("weights"), self.named)
        self.entries = specs_of(self.named)
        self.is_receiver = True
        self.per_bucket = per_bucket

    @property
    def load_calls(self) -> int:
        """How many times a sync calls the engine's load_weights: once per dtype of each bucket."""
        return sum(len({t.dtype for _n, t in self.named[i:i + self.per_bucket]})
                   for i in range(0, len(self.named), self.per_bucket))

    def buckets(self):
        for i in range(0, len(self.named), self.per_bucket):
            part = self.named[i:i + self.per_bucket]
            flats: dict[torch.dtype, list[torch.Tensor]] = {}
            entries = []
            fill: dict[torch.dtype, int] = {}
            for name, t in part:
                value = self.source.read(name, t)
                entries.append(SimpleNamespace(name=name, shape=tuple(t.shape), dtype=t.dtype,
                                               offset=fill.get(t.dtype, 0)))
                fill[t.dtype] = fill.get(t.dtype, 0) + t.numel()
                flats.setdefault(t.dtype, []).append(value.reshape(-1).to(DEVICE))
            yield SimpleNamespace(flats={d: torch.cat(v) for d, v in flats.items()}, entries=entries)


class FailingLoader:
    """An engine's load_weights that loads ``ok_calls`` buckets, then raises EngineBoom."""

    def __init__(self, loader: ModuleWeightLoader, ok_calls: int):
        self.loader = loader
        self.ok_calls = ok_calls
        self.calls = 0

    def expected(self):
        return self.loader.expected()

    def __call__(self, pairs):
        self.calls += 1
        if self.calls > self.ok_calls:
            raise EngineBoom(f"engine broke at bucket {self.calls}")
        self.loader(pairs)


class Trainer:
    """A managed model + optimizer, its unmanaged twin, an engine, and the expected state of every bucket."""

    def __init__(self, index: int, bucket_mb: float, seed: int, pin_ahead: bool = True):
        self.index = index
        self.bucket_mb = bucket_mb
        self.pin_ahead = pin_ahead
        torch.manual_seed(seed)
        self.model = Net().to(DEVICE)
        self.twin = copy.deepcopy(self.model)
        self.opt = make_optimizer(self.model.parameters())
        self.twin_opt = make_optimizer(self.twin.parameters())
        torch.manual_seed(seed + 1000)
        self.engine = Net().to(DEVICE)
        self.loader = ModuleWeightLoader(self.engine)
        self.checkpoints: list[bytes] = []
        self.build_manager()

    def build_manager(self) -> None:
        self.mgr = memmgr.for_module(self.model, self.opt, bucket_size_mb=self.bucket_mb,
                                    pin_ahead=self.pin_ahead)
        self.events: list[str] = []
        for event in HOOK_EVENTS:
            self.mgr.register_hook(event, lambda e, names: self.events.append(e))
        self.exp: dict[int, list] = {}  # id(unit) -> [unit, group, expected BucketState]
        self.plan = None
        self.opt_reloaded = False
        for g in GROUPS:
            for u in self.mgr.group(g).units:
                self.exp[id(u)] = [u, g, ON]

    # ---- the expected state
    def state_of(self, g: str) -> GroupState:
        return GroupState.of(s for _u, grp, s in self.exp.values() if grp == g)

    def units(self, g: str) -> list:
        return list(self.mgr.group(g).units)

    def apply(self, final=None, *, adopt: bool = False) -> dict[int, tuple]:
        """Moves the expected state on by one call: every unit the groups hold now gets ``final(group, unit, old)``
        (old: its expected state before the call; ON_DEVICE for a unit the call created by picking up new state).
        ``adopt``: take the units' actual states (after a call whose outcome the docs leave open). Returns the old
        states, id -> (unit, old)."""
        olds: dict[int, tuple] = {}
        now: set[int] = set()
        for g in GROUPS:
            for u in self.units(g):
                now.add(id(u))
                old = self.exp[id(u)][2] if id(u) in self.exp else ON
                olds[id(u)] = (u, old)
                new = u.state if adopt else final(g, u, old)
                self.exp[id(u)] = [u, g, new]
        for key in [k for k in self.exp if k not in now]:
            unit, g, _ = self.exp.pop(key)
            assert g == "optimizer_states" and self.opt_reloaded, \
                f"bucket {unit.name} of group {g!r} left its group without an optimizer load_state_dict"
        if adopt:
            grads = [p.grad for p in self.model.parameters()]
            if all(gr is None for gr in grads) and any(p.grad is not None for p in self.twin.parameters()):
                self.drop_twin_grads()
        return olds

    def drop_twin_grads(self) -> None:
        self.twin_opt.zero_grad(set_to_none=True)

    def uncollected_state(self) -> list[torch.Tensor]:
        held = {id(t) for u in self.units("optimizer_states") for _n, t, _o in u.members}
        return [v for p, s in self.opt.state.items() for v in s.values()
                if isinstance(v, torch.Tensor) and v.device == p.device and v.numel() > 0 and id(v) not in held]

    # ---- the checks
    def check(self) -> None:
        status = self.mgr.state
        for g in GROUPS:
            group = self.mgr.group(g)
            units = self.units(g)
            assert {id(u) for u in units} == {k for k, (_u, grp, _s) in self.exp.items() if grp == g}, \
                f"group {g!r}: buckets appeared or left unexpectedly: {[u.name for u in units]}"
            for u in units:
                want = self.exp[id(u)][2]
                # a non-blocking onload's copies may still be in flight on a GPU: onloading settles to on_device
                assert u.state.settled() is want, f"bucket {u.name} is {u.state.value}, expected {want.value}"
                if isinstance(u, memmgr.FlatTensors):
                    assert has_memory(u.flat) == want.holds_device_memory or u.nbytes == 0, \
                        (f"bucket {u.name} says {u.state.value} but its storage has "
                         f"{u.flat.untyped_storage().nbytes()} B")
            want_group = self.state_of(g)
            in_flight_ok = status[g].state == "onloading" and want_group.holds_device_memory
            assert status[g].state == want_group.value or in_flight_ok, \
                f"state[{g!r}] is {status[g].state}, expected {want_group.value}"
            if isinstance(group, BucketizedFlatTensors):
                assert status[g].device_bytes == sum(u.nbytes for u in units if self.exp[id(u)][2].holds_device_memory)
                try:
                    group.require_on_device()
                    refused = False
                except MemmgrStateError:
                    refused = True
                assert refused == (want_group is not GroupState.ON_DEVICE), \
                    f"{g}.require_on_device() {'refused' if refused else 'passed'} for a group {want_group.value}"
        self.check_weights()
        self.check_optimizer()
        self.check_grads()

    def check_weights(self) -> None:
        where = {id(t): u for u in self.units("weights") for _n, t, _o in u.members}
        ours = list(self.model.named_parameters()) + list(self.model.named_buffers())
        theirs = dict(list(self.twin.named_parameters()) + list(self.twin.named_buffers()))
        for name, t in ours:
            unit = where.get(id(t))
            assert unit is not None, f"weight {name} is not in the weights group"
            on = self.exp[id(unit)][2].holds_device_memory
            assert has_memory(t) == on, \
                f"weight {name}: bucket {unit.name} on={on} but storage {t.untyped_storage().nbytes()} B"
            assert same_bits(readable(t), theirs[name]), f"weight {name} differs from the twin's"

    def check_optimizer(self) -> None:
        managed = {id(t): u for u in self.units("optimizer_states") for _n, t, _o in u.members}
        any_off = any(not s.holds_device_memory for _u, g, s in self.exp.values() if g == "optimizer_states")
        params = list(self.model.parameters())
        twin_params = list(self.twin.parameters())
        for i, (p, tp) in enumerate(zip(params, twin_params)):
            s, ts = self.opt.state.get(p, {}), self.twin_opt.state.get(tp, {})
            assert set(s) == set(ts), f"param {i}: optimizer state keys {sorted(s)} vs twin {sorted(ts)}"
            for k, v in s.items():
                tv = ts[k]
                if not isinstance(v, torch.Tensor):
                    assert v == tv, f"param {i} state {k}: {v} vs {tv}"
                    continue
                unit = managed.get(id(v))
                if unit is None:
                    assert has_memory(v) or v.numel() == 0, f"param {i} state {k}: unmanaged and without memory"
                    if v.device == p.device and v.numel() > 0:
                        assert not any_off, (f"param {i} state {k} is not in the optimizer_states group although "
                                             f"the group was offloaded since it appeared (new state not picked up)")
                else:
                    on = self.exp[id(unit)][2].holds_device_memory
                    assert has_memory(v) == on, f"param {i} state {k}: bucket {unit.name} on={on}, storage disagrees"
                assert same_bits(readable(v), tv), f"param {i} optimizer state {k!r} differs from the twin's"
        for pg, tpg in zip(self.opt.param_groups, self.twin_opt.param_groups):
            assert {k: v for k, v in pg.items() if k != "params"} == {k: v for k, v in tpg.items() if k != "params"}

    def check_grads(self) -> None:
        dropped = any(s is DISC for _u, g, s in self.exp.values() if g == "grads")
        for i, (p, tp) in enumerate(zip(self.model.parameters(), self.twin.parameters())):
            assert (p.grad is None) == (tp.grad is None), \
                f"param {i}: grad is {p.grad is None and 'None' or 'set'}, twin's is not"
            if dropped:
                assert p.grad is None, f"param {i} has a grad while the grads group is discarded"
            if p.grad is not None:
                assert same_bits(p.grad, tp.grad), f"param {i}: grad differs from the twin's"

    def check_optimizer_plain(self) -> None:
        """After close(): the optimizer's state is ordinary tensors again, equal to the twin's."""
        for p, tp in zip(self.model.parameters(), self.twin.parameters()):
            s, ts = self.opt.state.get(p, {}), self.twin_opt.state.get(tp, {})
            assert set(s) == set(ts)
            for k, v in s.items():
                if isinstance(v, torch.Tensor):
                    assert has_memory(v) or v.numel() == 0, f"optimizer state {k} has no memory after close()"
                    assert same_bits(v, ts[k]), f"optimizer state {k} differs from the twin's after close()"

    def check_engine(self) -> None:
        theirs = dict(list(self.twin.named_parameters()) + list(self.twin.named_buffers()))
        for name, t in list(self.engine.named_parameters()) + list(self.engine.named_buffers()):
            assert same_bits(t, theirs[name]), f"engine tensor {name} is not the trainer's"

    def close(self) -> None:
        try:
            self.mgr.close()
        except Exception:  # noqa: BLE001 - teardown after a failure; the failure is what is reported
            pass


def forget_frames(exc: BaseException) -> BaseException:
    """Drops the tracebacks of a caught error and of its causes: their frames hold views of the weights (an export's
    reads, a bucket's pairs), and a kept error is a reference cycle that would keep those views alive until the next
    garbage collection, and an offload rightly refuses storages that are still viewed from outside."""
    seen = set()
    e = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__
    return exc


def expect_raises(types, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except types as exc:
        return forget_frames(exc)
    raise AssertionError(f"{getattr(fn, '__name__', fn)} did not raise {types}")


def is_hook_error(exc: BaseException) -> bool:
    return isinstance(exc, HookBoom) or isinstance(exc.__cause__, HookBoom)


# ---------------------------------------------------------------------------------------------------- the machine
def enabled(name: str):
    return precondition(lambda self: name in ENABLED)


trainer_index = st.integers(0, 1)
group_sets = st.lists(st.sampled_from(GROUPS), unique=True, max_size=3)
phase_actions = st.lists(st.tuples(st.sampled_from(ENABLED_PHASE_ACTIONS or ["train"]), st.integers(0, 10**6),
                                   group_sets), min_size=1, max_size=3)


class MemmgrAPIMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.trainers: list[Trainer] = []
        STATS["examples"] += 1

    @initialize(bucket_mb=st.sampled_from(BUCKET_SIZES_MB), seed=st.integers(0, 2**16), pin_ahead=st.booleans())
    def build(self, bucket_mb, seed, pin_ahead=True):
        self.trainers = [Trainer(0, bucket_mb, seed, pin_ahead), Trainer(1, bucket_mb, seed + 1, not pin_ahead)]

    def teardown(self) -> None:
        for tr in self.trainers:
            tr.close()

    @invariant()
    def everything_matches_the_twin(self) -> None:
        STATS["checked_steps"] += 1
        for tr in self.trainers:
            tr.check()

    def count(self, name: str) -> None:
        STATS[name] += 1

    # ---- training
    def can_backward(self, tr: Trainer) -> bool:
        return tr.state_of("weights") is GroupState.ON_DEVICE and tr.state_of("grads") is GroupState.ON_DEVICE

    def can_step(self, tr: Trainer) -> bool:
        return tr.state_of("weights") is GroupState.ON_DEVICE and \
            tr.state_of("optimizer_states") is GroupState.ON_DEVICE

    def do_backward(self, tr: Trainer, seed: int) -> None:
        if not self.can_backward(tr):
            # what a user gets who asks first: offloaded weights refuse to be used
            if tr.state_of("weights") is not GroupState.ON_DEVICE:
                expect_raises(MemmgrStateError, tr.mgr.group("weights").require_on_device)
            self.count("backward.refused")
            return
        x, y = batch(seed)
        for model in (tr.model, tr.twin):
            ((model(x) - y) ** 2).mean().backward()
        tr.apply(lambda g, u, old: old)
        self.count("backward.ran")

    def do_step(self, tr: Trainer) -> None:
        if not self.can_step(tr):
            if tr.state_of("optimizer_states") is not GroupState.ON_DEVICE:
                expect_raises(MemmgrStateError, tr.mgr.group("optimizer_states").require_on_device)
            self.count("optimizer_step.refused")
            return
        for model, opt in ((tr.model, tr.opt), (tr.twin, tr.twin_opt)):
            opt.step()
            with torch.no_grad():
                model.count += 1
                model.scale.mul_(0.99)
        tr.apply(lambda g, u, old: old)
        self.count("optimizer_step.ran")

    @rule(t=trainer_index, seed=st.integers(0, 10**6))
    @enabled("backward")
    def backward(self, t, seed):
        self.do_backward(self.trainers[t], seed)

    @rule(t=trainer_index, seed=st.integers(0, 10**6))
    @enabled("backward_with_grads_dropped")
    def backward_with_grads_dropped(self, t, seed):
        """What a user does who onloads only what the forward and the step need (``mgr.onload("weights")`` gives a
        model that can run forward): autograd re-creates the dropped gradients on the device, so the grads group
        holds device memory again and must say so (and leave with the next offload or phase)."""
        tr = self.trainers[t]
        if tr.state_of("grads") is not GroupState.DISCARDED:
            self.do_offload(tr, ["grads"])
        if tr.state_of("weights") is not GroupState.ON_DEVICE:
            self.do_onload(tr, ["weights"])
        x, y = batch(seed)
        for model in (tr.model, tr.twin):
            ((model(x) - y) ** 2).mean().backward()
        tr.apply(lambda g, u, old: ON if g == "grads" else old)
        self.count("backward_with_grads_dropped")

    @rule(t=trainer_index)
    @enabled("optimizer_step")
    def optimizer_step(self, t):
        self.do_step(self.trainers[t])

    @rule(t=trainer_index, set_to_none=st.booleans())
    @enabled("zero_grad")
    def zero_grad(self, t, set_to_none):
        tr = self.trainers[t]
        tr.opt.zero_grad(set_to_none=set_to_none)
        tr.twin_opt.zero_grad(set_to_none=set_to_none)
        tr.apply(lambda g, u, old: old)
        self.count("zero_grad")

    # ---- moves
    def do_offload(self, tr: Trainer, groups, non_blocking: bool = False) -> None:
        names = tuple(groups) or GROUPS
        handle = tr.mgr.offload(*groups, non_blocking=non_blocking)
        handle.wait()
        tr.apply(lambda g, u, old: off_state(u, old) if g in names else old)
        if "grads" in names:
            tr.drop_twin_grads()
        self.count("offload")

    def do_onload(self, tr: Trainer, groups, non_blocking: bool = False) -> None:
        names = tuple(groups) or GROUPS
        # not waited for: onload's copies are ordered before later work on the current stream (documented), and the
        # checks that follow read the tensors at once
        tr.mgr.onload(*groups, non_blocking=non_blocking)
        tr.apply(lambda g, u, old: ON if g in names else old)
        self.count("onload")

    @rule(t=trainer_index, groups=group_sets, non_blocking=st.booleans())
    @enabled("offload")
    def offload(self, t, groups, non_blocking):
        self.do_offload(self.trainers[t], groups, non_blocking)

    @rule(t=trainer_index, groups=group_sets, non_blocking=st.booleans())
    @enabled("onload")
    def onload(self, t, groups, non_blocking):
        self.do_onload(self.trainers[t], groups, non_blocking)

    def expected_plan(self, tr: Trainer, before_bytes: dict[int, int], budget: int) -> list[tuple]:
        """The plan the docs describe: units on the device, cheapest group first (grads, optimizer states,
        weights), discardable before copied, within a group the last bucket first, until ``budget`` bytes."""
        cands = []
        for gi, g in enumerate(GROUPS):
            for ui, u in enumerate(tr.units(g)):
                nbytes = before_bytes.get(id(u), u.nbytes)  # a unit new in this call was collected on the device
                was_on = tr.exp[id(u)][2].holds_device_memory if id(u) in tr.exp else True
                if was_on and nbytes > 0:
                    cands.append(((BUDGET_ORDER[g], u.policy is not Policy.DISCARD, gi, -ui),
                                  (g, u.name, nbytes, u.policy is Policy.DISCARD)))
        chosen, total = [], 0
        for _key, item in sorted(cands, key=lambda c: c[0]):
            if total >= budget:
                break
            chosen.append(item)
            total += item[2]
        return chosen

    def do_budget(self, tr: Trainer, fraction: float, over: bool, via_free: bool) -> None:
        before_bytes = {id(u): u.device_bytes for g in GROUPS for u in tr.units(g)}
        known = sum(b for k, b in before_bytes.items() if tr.exp[k][2].holds_device_memory)
        if over:
            budget = known + 1 if not tr.uncollected_state() else 10**9
        else:
            budget = int(known * fraction)
        call = (lambda: tr.mgr.free(budget)) if via_free else (lambda: offload_budget(tr.mgr, budget))
        if over:
            err = expect_raises(MemmgrBudgetError, call)
            assert err.budget_bytes == budget and err.available_bytes < budget
            tr.apply(lambda g, u, old: old)  # nothing moved (new state was picked up, on the device)
            self.count("offload_budget.refused")
            return
        plan = call()
        expected = self.expected_plan(tr, before_bytes, budget)
        assert [i for i in plan] == expected, f"plan {list(plan)} but the documented order gives {expected}"
        assert plan.planned_bytes >= budget and not plan.dry_run
        moved = {name for _g, name, _b, _d in expected}
        if any(g == "grads" for g, *_ in expected):
            tr.drop_twin_grads()
        tr.apply(lambda g, u, old: off_state(u, old) if u.name in moved else old)
        tr.plan = plan
        self.count("offload_budget.ran")

    @rule(t=trainer_index, fraction=st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.8, 1.0]), over=st.booleans())
    @enabled("offload_budget")
    def offload_budget(self, t, fraction, over):
        self.do_budget(self.trainers[t], fraction, over, via_free=False)

    @rule(t=trainer_index, fraction=st.sampled_from([0.05, 0.25, 0.6, 1.0]))
    @enabled("free")
    def free(self, t, fraction):
        self.count("free")
        self.do_budget(self.trainers[t], fraction, False, via_free=True)

    @rule(t=trainer_index)
    @enabled("plan_onload")
    def plan_onload(self, t):
        tr = self.trainers[t]
        if tr.plan is None:
            return
        plan, tr.plan = tr.plan, None
        names = {name for _g, name, _b, _d in plan}
        plan.onload().wait()
        tr.apply(lambda g, u, old: ON if u.name in names else old)
        self.count("plan_onload")

    # ---- phases
    def do_phase(self, tr: Trainer, keep, actions, depth: int = 0) -> None:
        mgr = tr.mgr
        to_off = [g for g in GROUPS if g not in keep and tr.state_of(g).holds_device_memory]
        ctx = mgr.phase(f"phase{depth}", keep=keep)
        ctx.__enter__()
        try:
            before = tr.apply(lambda g, u, old: off_state(u, old) if g in to_off else old)
            if "grads" in to_off:
                tr.drop_twin_grads()
            assert mgr.current_phase == f"phase{depth}"
            tr.check()
            for action, seed, groups in actions:
                self.phase_action(tr, action, seed, groups, depth)
                tr.check()
        except BodyBoom as exc:
            # the body failed: the phase restores the placement on the way out and the error propagates
            try:
                swallowed = ctx.__exit__(type(exc), exc, exc.__traceback__)
            except BodyBoom:
                swallowed = False
            assert not swallowed, "phase() swallowed the body's error"
            forget_frames(exc)
        except BaseException:
            ctx.__exit__(*sys.exc_info())
            raise
        else:
            ctx.__exit__(None, None, None)
        before_state = {k: old for k, (_u, old) in before.items()}
        restored_off = []

        def exit_state(g, u, old):
            if id(u) not in before_state:
                return old  # state added during the phase stays where it is
            was = before_state[id(u)]
            if was.holds_device_memory and not old.holds_device_memory:
                return ON
            if not was.holds_device_memory and old.holds_device_memory:
                restored_off.append(g)
                return off_state(u, old)
            return old

        tr.apply(exit_state)
        if "grads" in restored_off:
            tr.drop_twin_grads()
        self.count("phase")

    def phase_action(self, tr: Trainer, action: str, seed: int, groups, depth: int) -> None:
        self.count(f"phase.{action}")
        if action == "train":
            self.do_backward(tr, seed)
            self.do_step(tr)
        elif action == "weight_sync":
            self.do_weight_sync(tr)
        elif action == "sync_weights":
            self.do_sync_weights(tr)
        elif action == "onload":
            self.do_onload(tr, groups)
        elif action == "offload":
            self.do_offload(tr, groups)
        elif action == "free":
            self.do_budget(tr, 0.3, False, via_free=True)
        elif action == "save_checkpoint":
            self.do_save(tr)
        elif action == "load_checkpoint":
            self.do_load(tr, seed)
        elif action == "raise":
            raise BodyBoom("the phase body failed")
        elif action == "nested_phase" and depth < 2:
            self.do_phase(tr, groups, [], depth + 1)

    @rule(t=trainer_index, keep=group_sets, actions=phase_actions)
    @enabled("phase")
    def phase(self, t, keep, actions):
        self.do_phase(self.trainers[t], keep, actions)

    # ---- weight syncs
    def do_weight_sync(self, tr: Trainer) -> None:
        before = {id(u): s for u, g, s in tr.exp.values()}
        tr.events.clear()
        with tr.mgr.weight_sync() as weights:
            tr.apply(lambda g, u, old: ON if g == "weights" else old)
            tr.check()
            ours = [n for n, _ in list(tr.model.named_parameters()) + list(tr.model.named_buffers())]
            assert list(weights) == ours
            tr.loader(list(weights.items()))
        tr.apply(lambda g, u, old: before[id(u)] if g == "weights" else old)
        assert tr.events[0] == "before_weight_sync" and tr.events[-1] == "after_weight_sync", tr.events
        tr.check_engine()
        self.count("weight_sync")

    def do_sync_weights(self, tr: Trainer) -> None:
        on = tr.state_of("weights") is GroupState.ON_DEVICE
        tr.events.clear()
        result = sync_weights(tr.mgr, ModuleExporter(tr.mgr), tr.loader)
        assert tr.events == ["before_weight_sync", "after_weight_sync"], tr.events  # nothing moved
        assert result.source == ("device" if on else "host copy")
        tr.apply(lambda g, u, old: old)
        tr.check_engine()
        assert tr.loader.missing() == []
        self.count("sync_weights")

    @rule(t=trainer_index)
    @enabled("weight_sync")
    def weight_sync(self, t):
        self.do_weight_sync(self.trainers[t])

    @rule(t=trainer_index)
    @enabled("sync_weights")
    def sync_weights_into_engine(self, t):
        self.do_sync_weights(self.trainers[t])

    @rule(t=trainer_index, ok_calls=st.integers(0, 5), via=st.sampled_from(["sync_weights", "weight_sync"]))
    @enabled("failing_engine")
    def failing_engine(self, t, ok_calls, via):
        tr = self.trainers[t]
        before = {id(u): s for u, g, s in tr.exp.values()}
        tr.events.clear()
        loader = FailingLoader(tr.loader, ok_calls)
        if via == "sync_weights":
            exporter = ModuleExporter(tr.mgr)
            if exporter.load_calls > ok_calls:
                err = expect_raises(MemmgrSyncError, sync_weights, tr.mgr, exporter, loader)
                assert isinstance(err, MemmgrError) and isinstance(err.__cause__, EngineBoom), repr(err)
            else:
                sync_weights(tr.mgr, exporter, loader)
                tr.check_engine()
            assert tr.events == ["before_weight_sync", "after_weight_sync"], tr.events
            tr.apply(lambda g, u, old: old)
        else:
            loader.ok_calls = 0
            with_raised = False
            try:
                with tr.mgr.weight_sync() as weights:
                    loader(list(weights.items()))
            except EngineBoom:
                with_raised = True
            assert with_raised, "the body's error did not propagate out of weight_sync()"
            assert tr.events[-1] == "after_weight_sync", tr.events
            tr.apply(lambda g, u, old: before[id(u)] if g == "weights" else old)  # the weights left again
        self.count(f"failing_engine.{via}")

    # ---- hooks that raise
    @rule(t=trainer_index, op=st.sampled_from(FAILING_HOOK_OPS), groups=group_sets, data=st.data())
    @enabled("failing_hook")
    def failing_hook(self, t, op, groups, data):
        event = data.draw(st.one_of(st.sampled_from(OP_EVENTS[op]), st.sampled_from(HOOK_EVENTS)), label="event")
        tr = self.trainers[t]
        mgr = tr.mgr
        fired: list[str] = []

        def boom(e, names):
            fired.append(e)
            raise HookBoom(f"hook at {e}")

        if f"failing_hook.{op}.{event}" in DISABLED:
            self.count(f"failing_hook.{op}.{event}.disabled")
            return
        handle = mgr.register_hook(event, boom)
        late: list[str] = []  # a hook registered after the failing one: the README says every after-sync hook runs
        late_handle = mgr.register_hook("after_weight_sync", lambda e, names: late.append(e))
        names = tuple(groups) or GROUPS
        before = {id(u): s for u, g, s in tr.exp.values()}
        try:
            if op == "offload":
                exc = self.call_catching(mgr.offload, *groups)
                moved = exc is None or event == "after_offload"
                tr.apply(lambda g, u, old: off_state(u, old) if moved and g in names else old)
                if moved and "grads" in names:
                    tr.drop_twin_grads()
                assert (exc is not None) == (event in ("before_offload", "after_offload"))
            elif op == "onload":
                exc = self.call_catching(mgr.onload, *groups)
                moved = exc is None or event == "after_onload"
                tr.apply(lambda g, u, old: ON if moved and g in names else old)
                assert (exc is not None) == (event in ("before_onload", "after_onload"))
            elif op == "free":
                before_bytes = {id(u): u.device_bytes for g in GROUPS for u in tr.units(g)}
                known = sum(b for k, b in before_bytes.items() if tr.exp[k][2].holds_device_memory)
                budget = known // 2
                exc = self.call_catching(mgr.free, budget)
                expected = self.expected_plan(tr, before_bytes, budget)
                plan_moves = {name for _g, name, _b, _d in expected} if (exc is None or event == "after_offload") \
                    else set()
                if any(g == "grads" and name in plan_moves for g, name, *_ in expected):
                    tr.drop_twin_grads()
                tr.apply(lambda g, u, old: off_state(u, old) if u.name in plan_moves else old)
                assert (exc is not None) == (event in ("before_offload", "after_offload"))
            elif op == "sync_weights":
                exc = self.call_catching(sync_weights, mgr, ModuleExporter(mgr), tr.loader)
                tr.apply(lambda g, u, old: old)  # a sync_weights moves nothing, whatever fails
                assert (exc is not None) == (event in ("before_weight_sync", "after_weight_sync"))
                if event == "before_weight_sync":
                    assert "after_weight_sync" in tr.events, "a failing before-sync hook skipped the after hooks"
                else:
                    tr.check_engine()
            elif op == "weight_sync":
                def body():
                    with mgr.weight_sync() as weights:
                        tr.loader(list(weights.items()))
                exc = self.call_catching(body)
                if event in ("before_offload", "after_offload"):
                    tr.apply(adopt=True)  # the restore's offload failed: where the weights are is the hook's doing
                else:
                    tr.apply(lambda g, u, old: before[id(u)] if g == "weights" else old)
                if exc is None:
                    tr.check_engine()
            elif op == "phase":
                exc = self.call_catching(lambda: self.do_phase_plain(mgr, groups))
                tr.apply(adopt=True)
            elif op in ("swap_out", "swap_into"):
                # the hook is on the outgoing (swap_out) or the incoming (swap_into) manager; where each bucket ends
                # up when it raises is the hook's doing: take the actual states, and check they are consistent and
                # the contents intact
                other = self.trainers[1 - t]
                out, into = (tr, other) if op == "swap_out" else (other, tr)
                exc = self.call_catching(lambda: memmgr.swap(out=out.mgr, into=into.mgr, margin_bytes=1 << 20))
                tr.apply(adopt=True)
                other.apply(adopt=True)
                if exc is None:
                    assert all(not s.holds_device_memory for _u, _g, s in out.exp.values())
                    assert all(s is ON for _u, _g, s in into.exp.values())
            elif op == "close":
                # close() onloads first: a before_onload hook that raises leaves everything where it was, an
                # after_onload one everything on the device; either way the manager is still open and usable
                exc = self.call_catching(mgr.close)
                if exc is None:
                    assert event not in ("before_onload", "after_onload")
                    handle.remove()
                    late_handle.remove()
                    self.rebuild_after_close(tr)
                    self.count("failing_hook.close.quiet")
                    return
                moved = event == "after_onload"
                tr.apply(lambda g, u, old: ON if moved else old)
                assert event in ("before_onload", "after_onload")
            if fired:
                assert exc is not None, f"a hook at {event} raised but {op} returned normally"
            if exc is not None:
                assert is_hook_error(exc), f"{op} raised {exc!r}, not the hook's error"
                assert fired, f"{op} raised {exc!r} without the failing hook having run"
            if op in ("sync_weights", "weight_sync") and event in ("before_weight_sync", "after_weight_sync"):
                assert late == ["after_weight_sync"], \
                    f"{op}: a failing {event} hook; the after_weight_sync hooks registered after it ran {late}"
        finally:
            handle.remove()
            late_handle.remove()
        assert mgr.current_phase is None
        self.count(f"failing_hook.{op}.{'raised' if fired else 'quiet'}")

    @staticmethod
    def call_catching(fn, *args):
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - the caller checks what it is
            return forget_frames(exc)
        return None

    @staticmethod
    def do_phase_plain(mgr, keep) -> None:
        with mgr.phase("hooked", keep=keep):
            pass

    # ---- checkpoints
    def do_save(self, tr: Trainer) -> None:
        ours = io.BytesIO()
        torch.save({"model": tr.model.state_dict(), "opt": tr.opt.state_dict()}, ours)
        # the state_dict hooks brought the module's and the optimizer's groups back, where they stay
        tr.apply(lambda g, u, old: ON if g in ("weights", "optimizer_states") else old)
        theirs = io.BytesIO()
        torch.save({"model": tr.twin.state_dict(), "opt": tr.twin_opt.state_dict()}, theirs)
        a = torch.load(io.BytesIO(ours.getvalue()), weights_only=False)
        b = torch.load(io.BytesIO(theirs.getvalue()), weights_only=False)
        assert list(a["model"]) == list(b["model"])
        for k in a["model"]:
            assert same_bits(a["model"][k], b["model"][k]), f"checkpoint tensor {k} differs from the twin's"
        assert set(a["opt"]["state"]) == set(b["opt"]["state"])
        for i, s in a["opt"]["state"].items():
            for k, v in s.items():
                w = b["opt"]["state"][i][k]
                assert same_bits(v, w) if isinstance(v, torch.Tensor) else v == w, f"checkpoint opt state {i}.{k}"
        tr.checkpoints.append(theirs.getvalue())
        self.count("save_checkpoint")

    @rule(t=trainer_index)
    @enabled("save_checkpoint")
    def save_checkpoint(self, t):
        self.do_save(self.trainers[t])

    @rule(t=trainer_index, which=st.integers(0, 10))
    @enabled("load_checkpoint")
    def load_checkpoint(self, t, which):
        self.do_load(self.trainers[t], which)

    def do_load(self, tr: Trainer, which: int) -> None:
        if not tr.checkpoints:
            self.do_save(tr)
        data = tr.checkpoints[which % len(tr.checkpoints)]
        for model, opt in ((tr.model, tr.opt), (tr.twin, tr.twin_opt)):
            ckpt = torch.load(io.BytesIO(data), weights_only=False)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
        tr.opt_reloaded = True
        tr.plan = None
        # the load_state_dict hooks brought both groups back first
        tr.apply(lambda g, u, old: ON if g in ("weights", "optimizer_states") else old)
        self.count("load_checkpoint")

    @rule(t=trainer_index)
    @enabled("deepcopy_model")
    def deepcopy_model(self, t):
        """``copy.deepcopy`` of the managed module and optimizer reads offloaded tensors' host copies (README), moves
        nothing, and the copy's ``state_dict()`` (its hooks came along) does not onload the original's groups."""
        tr = self.trainers[t]
        model, opt_state = copy.deepcopy((tr.model, tr.opt.state_dict()))
        tr.apply(lambda g, u, old: old)
        theirs = dict(list(tr.twin.named_parameters()) + list(tr.twin.named_buffers()))
        for name, w in list(model.named_parameters()) + list(model.named_buffers()):
            assert has_memory(w) and same_bits(w, theirs[name]), f"deep copy of weight {name} differs from the twin's"
        model.state_dict()
        tr.apply(lambda g, u, old: ON if g == "optimizer_states" else old)  # tr.opt.state_dict() above onloaded it
        self.count("deepcopy_model")

    # ---- lifecycle
    @rule(t=trainer_index)
    @enabled("close_and_rebuild")
    def close_and_rebuild(self, t):
        tr = self.trainers[t]
        tr.mgr.close()
        self.rebuild_after_close(tr)
        self.count("close_and_rebuild")

    def rebuild_after_close(self, tr: Trainer) -> None:
        # close onloads every group and lets go: the model and optimizer are ordinary tensors on the device again
        for g in GROUPS:
            assert not tr.mgr.group(g).units or g == "grads", f"group {g!r} still holds buckets after close()"
        ours = list(tr.model.named_parameters()) + list(tr.model.named_buffers())
        theirs = dict(list(tr.twin.named_parameters()) + list(tr.twin.named_buffers()))
        for name, w in ours:
            assert has_memory(w) and same_bits(w, theirs[name]), f"weight {name} after close()"
        tr.check_optimizer_plain()
        tr.check_grads()
        expect_raises(MemmgrStateError, tr.mgr.offload)  # ...and later calls raise
        tr.exp.clear()
        tr.plan = None
        try:
            tr.build_manager()
        except memmgr.MemmgrInputError:
            # views of the weights this machine made (exporter reads, caught exceptions' frames) may sit in reference
            # cycles; taking the model over again rightly refuses storages viewed from outside, so collect them, as
            # a user drops such references, and take it over then
            gc.collect()
            tr.build_manager()

    @rule(t=trainer_index, margin=st.sampled_from([0, 1 << 20]))
    @enabled("swap")
    def swap(self, t, margin):
        out, into = self.trainers[t], self.trainers[1 - t]
        in_bytes = sum(u.nbytes for g in GROUPS for u in into.units(g)
                       if not into.exp[id(u)][2].holds_device_memory)
        known_out = sum(u.device_bytes for g in GROUPS for u in out.units(g)
                        if out.exp[id(u)][2].holds_device_memory)
        try:
            result = memmgr.swap(out=out.mgr, into=into.mgr, margin_bytes=margin)
        except MemmgrBudgetError as err:
            assert margin == 0 and err.budget_bytes == in_bytes and err.budget_bytes > err.available_bytes
            assert err.available_bytes >= known_out
            out.apply(lambda g, u, old: old)  # nothing moved (the outgoing side picked up new state)
            into.apply(lambda g, u, old: old)
            self.count("swap.refused")
            return
        assert result.in_bytes == in_bytes and result.out_bytes >= known_out
        assert in_bytes <= result.out_bytes + margin
        out.apply(lambda g, u, old: off_state(u, old))
        out.drop_twin_grads()
        into.apply(lambda g, u, old: ON)
        self.count("swap.ran")



# ---------------------------------------------------------------------------------------------------- running
class _Fixed:
    """Stands in for hypothesis' ``data`` where the hook matrix names the event itself."""

    def __init__(self, value):
        self.value = value

    def draw(self, strategy, label=None):
        return self.value


def hook_matrix() -> list[str]:
    """Every failing-hook combination (each call with each event it fires) once, on a trainer after a step and a
    budgeted offload (so that groups are partly off), not left to chance: returns the failures, one line each."""
    failures = []
    for op in FAILING_HOOK_OPS:
        for event in OP_EVENTS[op]:
            if "failing_hook" not in ENABLED or f"failing_hook.{op}.{event}" in DISABLED:
                continue
            machine = MemmgrAPIMachine()
            STATS["examples"] -= 1  # not one of hypothesis' sequences
            try:
                machine.build(bucket_mb=BUCKET_SIZES_MB[0], seed=7)
                machine.backward(0, 1)
                machine.optimizer_step(0)
                machine.do_budget(machine.trainers[0], 0.5, False, via_free=True)
                machine.failing_hook(0, op, ["grads", "optimizer_states"], _Fixed(event))
                machine.everything_matches_the_twin()
                STATS["hook_matrix"] += 1
            except Exception as exc:  # noqa: BLE001 - collected and reported together
                failures.append(f"failing_hook(op={op!r}, event={event!r}): {type(exc).__name__}: {exc}")
            finally:
                machine.teardown()
    # every phase body once, with nothing kept and with everything kept, likewise not left to chance
    if "phase" in ENABLED:
        for action in ENABLED_PHASE_ACTIONS:
            for keep in ([], list(GROUPS)):
                machine = MemmgrAPIMachine()
                STATS["examples"] -= 1
                try:
                    machine.build(bucket_mb=BUCKET_SIZES_MB[0], seed=11)
                    machine.backward(0, 1)
                    machine.optimizer_step(0)
                    machine.do_budget(machine.trainers[0], 0.5, False, via_free=True)
                    machine.phase(0, keep, [(action, 3, ["optimizer_states"])])
                    machine.everything_matches_the_twin()
                    STATS["phase_matrix"] += 1
                except Exception as exc:  # noqa: BLE001 - collected and reported together
                    failures.append(f"phase(keep={keep}, body=[{action!r}]): {type(exc).__name__}: {exc}")
                finally:
                    machine.teardown()
    return failures


def main(argv=None) -> int:
    global DEVICE, OPTIMIZER
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=int(os.environ.get("MEMMGR_STATEFUL_EXAMPLES", 100)))
    parser.add_argument("--steps", type=int, default=int(os.environ.get("MEMMGR_STATEFUL_STEPS", 30)))
    parser.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], default="adam")
    parser.add_argument("--device", default=os.environ.get("MEMMGR_STATEFUL_DEVICE", "cpu"))
    parser.add_argument("--seed", type=int, default=None, help="a seed instead of hypothesis' derandomized one")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    DEVICE = torch.device(args.device)
    OPTIMIZER = args.optimizer
    if DEVICE.type == "cuda":
        torch.cuda.set_device(torch.device(DEVICE).index or 0)
    warnings.simplefilter("ignore")
    from hypothesis.stateful import get_state_machine_test

    test_settings = settings(max_examples=args.examples, stateful_step_count=args.steps, deadline=None,
                             derandomize=args.seed is None, database=None, report_multiple_bugs=False,
                             suppress_health_check=list(HealthCheck),
                             verbosity=Verbosity.verbose if args.verbose else Verbosity.normal)
    test = get_state_machine_test(MemmgrAPIMachine, settings=test_settings)
    if args.seed is not None:
        import hypothesis

        test = hypothesis.seed(args.seed)(test)
    print(f"stateful API machine: optimizer={OPTIMIZER} device={DEVICE} examples={args.examples} "
          f"steps={args.steps} seed={args.seed} disabled={sorted(DISABLED)}", flush=True)
    status = 0
    failures = hook_matrix()
    for line in failures:
        print("MATRIX FAILURE " + line, flush=True)
    if failures:
        status = 1
    try:
        test()
    except BaseException:  # noqa: BLE001 - hypothesis printed the minimal failing sequence; report and fail
        import traceback

        traceback.print_exc()
        status = 1
    print("STATS " + json.dumps(dict(STATS), sort_keys=True), flush=True)
    return status


if __name__ == "__main__":
    from memmgr.tools.cpu_math import warm_up_vml
    warm_up_vml()  # the run is compared bit for bit (memmgr.tools.cpu_math)
    sys.exit(main())
