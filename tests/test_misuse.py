"""Misuse of every part of the API, table-driven: each case must raise exactly the documented MemmgrError subclass,
with a message that names the problem, and leave every tensor it touched bit-for-bit as it was."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from conftest import same_bits
import memmgr
from memmgr import (BucketizedFlatTensors, FlatTensors, HostMemoryPool, MemmgrError,
                    MemmgrInputError, MemmgrStateError, MemoryManager)


@dataclass
class Misuse:
    """What one case does wrong, and how to check that nothing changed."""
    action: Callable[[], object]
    tensors: list[torch.Tensor]
    expected: list[torch.Tensor] = field(default_factory=list)
    restore: Callable[[], object] = lambda: None  # brings offloaded state back before the comparison
    keep: list = field(default_factory=list)  # objects that must stay alive until the comparison

    def __post_init__(self) -> None:
        if not self.expected:
            self.expected = [t.detach().clone() for t in self.tensors]


def snapshot(tensors):
    return [t.detach().clone() for t in tensors]


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def trained(model, opt):
    model(torch.randn(4, 8)).sum().backward()
    opt.step()


def pool():
    return HostMemoryPool(pin=False)


# ---- flat tensors ----

def non_tensor():
    t = torch.randn(3)
    return Misuse(lambda: BucketizedFlatTensors([t, "oops"], name="g", pool=pool()), [t])


def non_tensor_in_dict():
    t = torch.randn(3)
    return Misuse(lambda: BucketizedFlatTensors({"a": t, "step": 3}, name="g", pool=pool()), [t])


def single_tensor_not_list():
    t = torch.randn(3)
    return Misuse(lambda: BucketizedFlatTensors(t, name="g", pool=pool()), [t])


def sparse():
    ok, s = torch.randn(4), torch.randn(3, 3).to_sparse()
    return Misuse(lambda: BucketizedFlatTensors({"ok": ok, "s": s}, name="g", pool=pool()), [ok],
                  keep=[s, s.to_dense()])


def non_contiguous():
    ok, base = torch.randn(4), torch.randn(4, 5)
    t = base.t()
    return Misuse(lambda: BucketizedFlatTensors({"ok": ok, "t": t}, name="g", pool=pool()), [ok, t, base])


def meta_tensor():
    ok, m = torch.randn(4), torch.empty(3, device="meta")
    return Misuse(lambda: BucketizedFlatTensors({"ok": ok, "m": m}, name="g", pool=pool()), [ok])


def views_of_one_storage():
    base = torch.randn(10)
    a, b = base[:6], base[4:]  # overlapping: coalescing would separate them
    del base
    return Misuse(lambda: BucketizedFlatTensors({"a": a, "b": b}, name="g", pool=pool()), [a, b])


def storage_held_outside():
    base = torch.randn(10)
    view = base[2:5]
    return Misuse(lambda: BucketizedFlatTensors({"base": base}, name="g", pool=pool()), [base, view])


def saved_for_backward():
    layer = torch.nn.Linear(3, 3)
    loss = layer(torch.randn(2, 3, requires_grad=True)).sum()
    return Misuse(lambda: BucketizedFlatTensors(dict(layer.named_parameters()), name="weights", pool=pool()),
                  list(layer.parameters()), keep=[loss])


def same_tensor_twice():
    t = torch.randn(3)
    return Misuse(lambda: BucketizedFlatTensors([t, t], name="g", pool=pool()), [t])


def zero_bucket_size():
    t = torch.randn(3)
    return Misuse(lambda: BucketizedFlatTensors([t], bucket_size_mb=0, name="g", pool=pool()), [t])


def negative_bucket_size():
    t = torch.randn(3)
    return Misuse(lambda: BucketizedFlatTensors([t], bucket_size_mb=-1, name="g", pool=pool()), [t])


def mixed_dtypes_in_one_bucket():
    a, b = torch.randn(2), torch.arange(2)
    return Misuse(lambda: FlatTensors.coalesce([("a", a), ("b", b)], name="b0", pool=pool()), [a, b])


def empty_bucket():
    return Misuse(lambda: FlatTensors.coalesce([], name="b0", pool=pool()), [])


def adopt_partial_view():
    base = torch.randn(10)
    return Misuse(lambda: BucketizedFlatTensors.from_buffers({"half": base[5:]}, name="g", pool=pool()), [base])


def adopt_2d_buffer():
    buf = torch.randn(4, 4)
    return Misuse(lambda: BucketizedFlatTensors.from_buffers({"buf": buf}, name="g", pool=pool()), [buf])


def adopt_non_tensor():
    return Misuse(lambda: FlatTensors.adopt([1.0, 2.0], name="b0", pool=pool()), [])


def extend_with_member_again():
    t = torch.randn(5)
    group = BucketizedFlatTensors({"t": t}, name="g", pool=pool())
    return Misuse(lambda: group.extend({"again": t}), [t], keep=[group])


def extend_while_offloaded():
    t, new = torch.randn(5), torch.randn(3)
    expected = snapshot([t, new])
    group = BucketizedFlatTensors({"t": t}, name="g", pool=pool())
    group.offload()
    return Misuse(lambda: group.extend({"new": new}), [t, new], expected, restore=group.onload)


def release_only_copy():
    t = torch.randn(5)
    expected = snapshot([t])
    group = BucketizedFlatTensors({"t": t}, name="g", pool=pool())
    group.offload()
    return Misuse(group.release_host_buffers, [t], expected, restore=group.onload)


def release_only_copy_of_one_bucket():
    t = torch.randn(5)
    expected = snapshot([t])
    bucket = FlatTensors.coalesce([("t", t)], name="solo", pool=pool())
    bucket.offload()
    return Misuse(bucket.release_host_buffer, [t], expected, restore=bucket.onload)


def use_while_offloaded():
    t = torch.randn(5)
    expected = snapshot([t])
    group = BucketizedFlatTensors({"t": t}, name="g", pool=pool())
    group.offload()
    return Misuse(group.require_on_device, [t], expected, restore=group.onload)


def partly_on_device():
    a, b = torch.randn(5), torch.randn(100)
    expected = snapshot([a, b])
    group = BucketizedFlatTensors({"a": a, "b": b}, bucket_size_mb=1e-4, name="g", pool=pool())
    assert len(group.buckets) == 2
    group.buckets[0].offload()
    assert group.state is memmgr.GroupState.PARTIAL
    return Misuse(group.require_on_device, [a, b], expected, restore=group.onload)


# ---- host pool ----

def negative_host_buffer():
    return Misuse(lambda: pool().acquire(-1), [])


# ---- manager ----

def manager(model=None, opt=None):
    model = model or mlp()
    return model, memmgr.for_module(model, opt, pin_ahead=False)


def unknown_group_offload():
    model, mgr = manager()
    return Misuse(lambda: mgr.offload("wieghts"), list(model.parameters()), keep=[mgr])


def unknown_group_onload():
    model, mgr = manager()
    expected = snapshot(model.parameters())
    mgr.offload()
    return Misuse(lambda: mgr.onload("weights", "optim"), list(model.parameters()), expected, restore=mgr.onload)


def unknown_group_lookup():
    model, mgr = manager()
    return Misuse(lambda: mgr.group("weight"), list(model.parameters()), keep=[mgr])


def unknown_group_in_phase_keep():
    model, mgr = manager()

    def action():
        with mgr.phase("generate", keep=("nope",)):
            pass
    return Misuse(action, list(model.parameters()), keep=[mgr])


def duplicate_group_name():
    model, mgr = manager()
    t = torch.randn(3)
    return Misuse(lambda: mgr.add_group("weights", [t]), list(model.parameters()) + [t], keep=[mgr])


def same_tensor_in_two_groups():
    t, u = torch.randn(4), torch.randn(2)
    mgr = MemoryManager(pool=pool())
    mgr.add_group("a", [t])
    return Misuse(lambda: mgr.add_group("b", [u, t]), [t, u], keep=[mgr])


def same_buffer_adopted_in_two_groups():
    buf = torch.randn(16)
    mgr = MemoryManager(pool=pool())
    mgr.add_group("a", {"flat": buf}, adopt=True)
    return Misuse(lambda: mgr.add_group("b", {"flat": buf}, adopt=True), [buf], keep=[mgr])


def offload_during_unfinished_backward():
    model, mgr = manager()
    params = list(model.parameters())
    expected = snapshot(params)
    loss = model(torch.randn(2, 8)).sum()
    return Misuse(mgr.offload, params, expected, keep=[loss, mgr])


def unknown_hook_event():
    model, mgr = manager()
    return Misuse(lambda: mgr.register_hook("before_sync", print), list(model.parameters()), keep=[mgr])


def weight_sync_on_discarded_weights():
    t = torch.randn(4)
    expected = snapshot([t])
    mgr = MemoryManager(pool=pool())
    mgr.add_group("weights", [t], policy="discard")
    mgr.add_group("other", [torch.randn(2)])
    mgr.offload("weights")

    def action():
        with mgr.weight_sync():
            pass
    # discarded weights come back as zeros, never as the old values; the comparison is against zeros
    return Misuse(action, [t], [torch.zeros_like(e) for e in expected], restore=mgr.onload)


def weight_sync_without_weights_group():
    t = torch.randn(4)
    mgr = MemoryManager(pool=pool())
    mgr.add_group("params", [t])

    def action():
        with mgr.weight_sync():
            pass
    return Misuse(action, [t], keep=[mgr])


def bad_policy():
    t = torch.randn(4)
    mgr = MemoryManager(pool=pool())
    return Misuse(lambda: mgr.add_group("g", [t], policy="keep"), [t], keep=[mgr])


def closed_manager(method):
    def setup():
        model, mgr = manager()
        mgr.offload()
        mgr.close()
        params = list(model.parameters())
        actions = {
            "offload": mgr.offload,
            "onload": mgr.onload,
            "add_group": lambda: mgr.add_group("new", [torch.randn(2)]),
            "phase": lambda: mgr.phase("train").__enter__(),
            "weight_sync": lambda: mgr.weight_sync().__enter__(),
        }
        return Misuse(actions[method], params, keep=[mgr])
    setup.__name__ = f"closed_manager_{method}"
    return setup


# ---- for_module ----

def for_module_not_a_module():
    t = torch.randn(3)
    return Misuse(lambda: memmgr.for_module([t]), [t])


def for_module_no_parameters():
    return Misuse(lambda: memmgr.for_module(torch.nn.ReLU()), [])


def for_module_foreign_optimizer():
    model, other = mlp(), torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    return Misuse(lambda: memmgr.for_module(model, opt), list(model.parameters()) + list(other.parameters()))


def for_module_optimizer_not_an_optimizer():
    model = mlp()
    return Misuse(lambda: memmgr.for_module(model, {"lr": 0.1}), list(model.parameters()))


def for_module_saved_for_backward():
    model = mlp()
    loss = model(torch.randn(2, 8)).sum()
    return Misuse(lambda: memmgr.for_module(model, pin_ahead=False), list(model.parameters()), keep=[loss])


def for_module_optimizer_state_shared():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trained(model, opt)
    first = next(iter(opt.state.values()))
    alias = first["momentum_buffer"].view(-1)  # a view someone kept of an optimizer state tensor
    tensors = list(model.parameters()) + [t for s in opt.state.values() for t in s.values()]
    return Misuse(lambda: memmgr.for_module(model, opt, pin_ahead=False), tensors, keep=[alias])


CASES = [
    # (setup, exact error class, regex the message must match)
    (non_tensor, MemmgrInputError, r"item 'g\[1\]' is a str, not a torch.Tensor"),
    (non_tensor_in_dict, MemmgrInputError, r"item 'step' is a int"),
    (single_tensor_not_list, MemmgrInputError, r"got a single tensor; wrap it in a list"),
    (sparse, MemmgrInputError, r"tensor 's' .* is torch.sparse_coo; only dense"),
    (non_contiguous, MemmgrInputError, r"tensor 't' .* is not contiguous \(stride \(1, 5\)\)"),
    (meta_tensor, MemmgrInputError, r"tensor 'm' .* is on the meta device"),
    (views_of_one_storage, MemmgrInputError, r"tensors \['a', 'b'\] share one storage and \('a', 'b'\) overlap"),
    (storage_held_outside, MemmgrInputError, r"tensor 'base' .* held by 1 other reference"),
    (saved_for_backward, MemmgrInputError, r"tensor 'weight' .*unfinished backward"),
    (same_tensor_twice, MemmgrInputError, r"appears twice \(also as 'g\[0\]'\)"),
    (zero_bucket_size, MemmgrInputError,
     r"group 'g': bucket_size_mb must be a finite number > 0 and <= .*, got 0 \(int\)"),
    (negative_bucket_size, MemmgrInputError, r"bucket_size_mb must be a finite number > 0 .*, got -1"),
    (mixed_dtypes_in_one_bucket, MemmgrInputError, r"tensor 'b' .* is torch.int64 but the bucket is torch.float32"),
    (empty_bucket, MemmgrInputError, r"bucket 'b0': no tensors to coalesce"),
    (adopt_partial_view, MemmgrInputError, r"'half' .* covers 20 of its storage's 40 bytes \(offset 5\)"),
    (adopt_2d_buffer, MemmgrInputError, r"tensor 'buf' \(shape \(4, 4\).* not a 1-D contiguous buffer"),
    (adopt_non_tensor, MemmgrInputError, r"adopt\(\) takes a tensor, got list"),
    (extend_with_member_again, MemmgrInputError, r"tensor 'again' .* already in the group as 't'"),
    (extend_while_offloaded, MemmgrStateError, r"group 'g' is on_host; add tensors while it is on device"),
    (release_only_copy, MemmgrStateError, r"bucket 'g/0' is on_host: its host buffer holds the only copy"),
    (release_only_copy_of_one_bucket, MemmgrStateError, r"bucket 'solo' is on_host: .*only copy"),
    (use_while_offloaded, MemmgrStateError, r"group 'g' is on_host: .* call onload\(\)"),
    (partly_on_device, MemmgrStateError, r"group 'g' is partial: its tensors have no device memory"),
    (negative_host_buffer, MemmgrInputError, r"HostMemoryPool.acquire: nbytes must be an int >= 0.*, got -1"),
    (unknown_group_offload, MemmgrInputError, r"unknown group\(s\) \['wieghts'\]; known groups: \['weights'"),
    (unknown_group_onload, MemmgrInputError, r"unknown group\(s\) \['optim'\]"),
    (unknown_group_lookup, MemmgrInputError, r"unknown group\(s\) \['weight'\]"),
    (unknown_group_in_phase_keep, MemmgrInputError, r"unknown group\(s\) \['nope'\]"),
    (duplicate_group_name, MemmgrInputError, r"group 'weights' exists already"),
    (same_tensor_in_two_groups, MemmgrInputError, r"group 'b': tensor \(shape \(4,\).* already in group 'a'"),
    (same_buffer_adopted_in_two_groups, MemmgrInputError, r"already in group 'a'"),
    (offload_during_unfinished_backward, MemmgrStateError, r"bucket 'weights/0' is still referenced .*unfinished"),
    (unknown_hook_event, MemmgrInputError, r"unknown hook event 'before_sync'"),
    (weight_sync_on_discarded_weights, MemmgrStateError, r"group 'weights' was discarded, so there are no weights"),
    (weight_sync_without_weights_group, MemmgrInputError, r"unknown group\(s\) \['weights'\]; known groups: "
                                                          r"\['params'\]"),
    (bad_policy, MemmgrInputError, r"group 'g': unknown policy 'keep'; use one of \['copy', 'discard'\]"),
    (closed_manager("offload"), MemmgrStateError, r"MemoryManager is closed"),
    (closed_manager("onload"), MemmgrStateError, r"MemoryManager is closed"),
    (closed_manager("add_group"), MemmgrStateError, r"MemoryManager is closed"),
    (closed_manager("phase"), MemmgrStateError, r"MemoryManager is closed"),
    (closed_manager("weight_sync"), MemmgrStateError, r"MemoryManager is closed"),
    (for_module_not_a_module, MemmgrInputError, r"for_module takes a torch.nn.Module, got list"),
    (for_module_no_parameters, MemmgrInputError, r"module ReLU has no parameters"),
    (for_module_foreign_optimizer, MemmgrInputError,
     r"holds 2 parameter\(s\) that are not the module's \(shapes \[\(2, 2\), \(2,\)\]\)"),
    (for_module_optimizer_not_an_optimizer, MemmgrInputError, r"optimizer must be a torch.optim.Optimizer, got dict"),
    (for_module_saved_for_backward, MemmgrInputError, r"tensor '2.weight' .*unfinished backward"),
    (for_module_optimizer_state_shared, MemmgrInputError, r"'0.weight.momentum_buffer' .* held by 1 other"),
]


def _case_id(case) -> str:
    return (case.values[0] if hasattr(case, "values") else case[0]).__name__


@pytest.mark.parametrize("setup, error, message", CASES, ids=[_case_id(c) for c in CASES])
def test_misuse_raises_exact_error_naming_the_problem_and_changes_nothing(setup, error, message):
    case = setup()
    with pytest.raises(MemmgrError) as info:
        case.action()
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert info.match(message)
    case.restore()
    assert len(case.tensors) == len(case.expected)
    for i, (t, e) in enumerate(zip(case.tensors, case.expected)):
        assert t.untyped_storage().nbytes() > 0 or t.numel() == 0, f"tensor {i} has no storage after {setup.__name__}"
        assert same_bits(t, e), f"tensor {i} changed by {setup.__name__}"


def test_case_table_is_large_and_ids_are_distinct():
    ids = [_case_id(c) for c in CASES]
    assert len(ids) >= 20 and len(set(ids)) == len(ids)
