"""memmgr.guard: with the guard installed, using a managed tensor while its group is offloaded raises MemmgrStateError
naming the tensor and the group instead of crashing; memmgr's own moves, training and other dispatch modes are
unaffected; without it nothing is active.

The reads of offloaded tensors run in a subprocess: without a working guard they crash the interpreter (a segfault
on the CPU path), which must fail the test rather than kill pytest."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import memmgr
from memmgr import guard
from memmgr.errors import MemmgrInputError, MemmgrStateError

pytestmark = pytest.mark.integration  # issue 31: tests by cost (tests/conftest.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SETUP = """
import json, sys, torch, memmgr, memmgr.guard
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
opt = torch.optim.Adam(model.parameters(), foreach=FOREACH)
model(torch.randn(4, 8)).sum().backward()
opt.step()
opt.zero_grad()
mgr = memmgr.for_module(model, opt)
memmgr.guard.install(mgr)
"""


def _misuse(body: str, foreach: bool = False) -> dict:
    """Runs SETUP then ``body`` (which must raise) in a fresh interpreter; returns what it raised."""
    script = "\n".join([
        SETUP.replace("FOREACH", repr(foreach)),
        "try:",
        textwrap.indent(textwrap.dedent(body).strip(), "    "),
        "except memmgr.MemmgrError as exc:",
        "    print(json.dumps({'type': type(exc).__name__, 'message': str(exc)}))",
        "    sys.exit(0)",
        "print(json.dumps({'type': None, 'message': 'nothing raised'}))",
    ])
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, MEMMGR_GUARD_OFFLOADED="0"))
    assert proc.returncode == 0, (f"the process died (exit status {proc.returncode}; -11 is a segfault): the guard "
                                  f"did not stop the read.\nstdout: {proc.stdout}\nstderr: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_names(raised: dict, tensor: str, group: str) -> None:
    assert raised["type"] == "MemmgrStateError", raised
    assert f"tensor {tensor!r}" in raised["message"], raised["message"]
    assert f"group {group!r}" in raised["message"], raised["message"]
    assert f"mgr.onload({group!r})" in raised["message"], raised["message"]


def test_forward_through_an_offloaded_module_raises_naming_the_weight_and_its_group():
    raised = _misuse("""
        mgr.offload()
        model(torch.randn(4, 8))
        """)
    _assert_names(raised, "0.weight", "weights")


@pytest.mark.parametrize("foreach", [False, True], ids=["single_tensor", "foreach"])
def test_optimizer_step_over_offloaded_adam_state_raises_naming_the_moment_and_its_group(foreach):
    raised = _misuse("""
        mgr.offload("optimizer_states")
        model(torch.randn(4, 8)).sum().backward()  # weights on the device: gradients exist, the step reads the moments
        opt.step()
        """, foreach=foreach)
    assert raised["type"] == "MemmgrStateError", raised
    assert "group 'optimizer_states'" in raised["message"]
    assert "tensor '0.weight.exp_avg" in raised["message"] or "tensor '0.weight.exp_avg_sq" in raised["message"] \
        or "tensor '0.weight.step" in raised["message"], raised["message"]


def test_sgd_step_with_offloaded_weights_raises_naming_the_weight():
    raised = _misuse("""
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.randn(4, 8)).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        mgr.offload("weights")
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        sgd.step()
        """)
    _assert_names(raised, "0.weight", "weights")


def test_sum_of_an_offloaded_parameter_raises_naming_it_and_its_group():
    raised = _misuse("""
        mgr.offload()
        model[2].bias.sum()
        """)
    _assert_names(raised, "2.bias", "weights")


def test_printing_an_offloaded_parameter_raises_naming_it_and_its_group():
    raised = _misuse("""
        mgr.offload()
        print(model[0].weight)
        """)
    _assert_names(raised, "0.weight", "weights")


def test_reading_weights_inside_a_phase_that_offloaded_them_raises_and_they_work_after_it():
    raised = _misuse("""
        with mgr.phase("generate"):
            try:
                model[0].weight.max()
            except memmgr.MemmgrStateError as exc:
                error = exc
        assert not memmgr.guard.active()
        model(torch.randn(2, 8)).sum().backward()  # back on the device: no guard in the way
        raise error
        """)
    _assert_names(raised, "0.weight", "weights")


def test_forward_backward_and_step_of_another_model_run_unchanged_while_the_guard_is_active():
    def step() -> list[torch.Tensor]:
        torch.manual_seed(2)
        other = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.GELU(), torch.nn.Linear(6, 1))
        opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):
            opt.zero_grad()
            other(torch.randn(5, 6)).pow(2).mean().backward()
            opt.step()
        return [p.detach().clone() for p in other.parameters()]

    expected = step()
    _, mgr = _small_manager()
    handle = guard.install(mgr)
    try:
        mgr.offload()
        assert guard.active()
        got = step()
    finally:
        handle.remove()
        mgr.close()
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def _train(guarded: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
    """Three steps of offload (two groups, in two moves), onload (two moves) and an Adam step; returns the
    parameters, the optimizer state and whether the guard's mode was active while the groups were off."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = [(torch.randn(16, 8), torch.randn(16, 3)) for _ in range(3)]
    mgr = memmgr.for_module(model, opt)
    handle = guard.install(mgr) if guarded else None
    was_active = False
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        mgr.offload("grads", "optimizer_states")
        mgr.offload("weights")  # memmgr's own copies under the active mode
        was_active |= guard.active()
        mgr.onload("weights")
        mgr.onload("optimizer_states", "grads")
    params = [p.detach().clone() for p in model.parameters()]
    state = [v.clone() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    if handle is not None:
        handle.remove()
    mgr.close()
    return params, state, was_active


def test_guarded_training_loop_is_bit_identical_to_the_unguarded_one():
    params, state, _ = _train(guarded=False)
    guarded_params, guarded_state, was_active = _train(guarded=True)
    assert was_active
    assert len(params) == len(guarded_params) and len(state) == len(guarded_state) > 0
    for a, b in zip(params + state, guarded_params + guarded_state):
        assert torch.equal(a, b)
    assert not guard.active()


def _small_manager() -> tuple[torch.nn.Module, memmgr.MemoryManager]:
    model = torch.nn.Linear(4, 4)
    return model, memmgr.for_module(model)


def test_guard_is_off_by_default_no_mode_becomes_active_on_offload(monkeypatch):
    monkeypatch.delenv(guard.ENV_VAR, raising=False)
    model, mgr = _small_manager()
    mgr.offload()
    try:
        assert not guard.active()
        assert torch._C._len_torch_dispatch_stack() == 0
        assert not getattr(torch.Tensor.__repr__, "_memmgr_guard", False)
        assert guard.requested(None) is False
    finally:
        mgr.close()


def test_requested_reads_the_option_first_then_the_environment_variable(monkeypatch):
    monkeypatch.setenv(guard.ENV_VAR, "1")
    assert guard.requested(None) is True
    assert guard.requested(False) is False
    monkeypatch.setenv(guard.ENV_VAR, "0")
    assert guard.requested(None) is False
    assert guard.requested(True) is True
    monkeypatch.setenv(guard.ENV_VAR, "yes")
    with pytest.raises(MemmgrInputError, match="MEMMGR_GUARD_OFFLOADED='yes'.*set it to 1"):
        guard.requested(None)
    with pytest.raises(MemmgrInputError, match="guard_offloaded must be True, False or None"):
        guard.requested("1")  # type: ignore[arg-type]


def test_install_on_a_manager_without_groups_yet_guards_the_groups_added_later():
    mgr = memmgr.MemoryManager()  # as the manager's guard_offloaded option installs it: at construction
    handle = guard.install(mgr)
    try:
        weights = [torch.randn(8, 8), torch.randn(3)]
        mgr.add_group("late", weights)
        mgr.offload("late")
        assert guard.active()
        with pytest.raises(MemmgrStateError, match="group 'late'"):
            weights[1].add(1)
        mgr.onload("late")
        assert not guard.active()
    finally:
        handle.remove()
        mgr.close()


def test_install_refuses_what_is_not_a_manager_naming_the_argument():
    with pytest.raises(MemmgrInputError, match="install: manager must be a memmgr.MemoryManager"):
        guard.install(torch.nn.Linear(2, 2))


def test_install_on_an_offloaded_manager_is_active_at_once_and_remove_turns_it_off():
    model, mgr = _small_manager()
    mgr.offload()
    handle = guard.install(mgr)
    try:
        assert guard.install(mgr) is handle
        assert guard.active() and handle.installed
        with pytest.raises(MemmgrStateError, match="tensor 'weight'"):
            model.weight.mul(2)
        handle.remove()
        assert not guard.active() and not handle.installed
        assert not getattr(torch.Tensor.__repr__, "_memmgr_guard", False)
        handle.remove()  # idempotent
    finally:
        handle.remove()
        mgr.close()


def test_ops_that_do_not_touch_the_data_pass_on_an_offloaded_tensor():
    model, mgr = _small_manager()
    handle = guard.install(mgr)
    try:
        mgr.offload()
        w = model.weight
        assert w.detach().shape == (4, 4)
        assert torch.empty_like(w).shape == (4, 4) and w.new_zeros(2).sum() == 0
        assert w.shape == (4, 4) and w.dtype == torch.float32
        with pytest.raises(MemmgrStateError, match="tensor 'weight'"):
            torch.nn.functional.linear(torch.ones(1, 4), w)
        mgr.onload()
        assert not guard.active()
        torch.nn.functional.linear(torch.ones(1, 4), w)  # back on the device: no guard, no error
    finally:
        handle.remove()
        mgr.close()


class _Counting(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def test_a_user_mode_entered_before_the_offload_exits_by_popping_itself_and_still_sees_ops():
    model, mgr = _small_manager()
    handle = guard.install(mgr)
    try:
        with _Counting() as counting:
            mgr.offload()  # the guard goes below the user's mode
            assert guard.active()
            torch.ones(2) + 1
            assert counting.ops >= 1
            with pytest.raises(MemmgrStateError, match="tensor 'weight'"):
                model.weight.sum()  # the user's mode passes it down to the guard
        stack = [torch._C._get_dispatch_stack_at(i) for i in range(torch._C._len_torch_dispatch_stack())]
        assert len(stack) == 1 and guard.active()  # the user's mode left, the guard stayed
        mgr.onload()
        assert torch._C._len_torch_dispatch_stack() == 0
    finally:
        handle.remove()
        mgr.close()


def test_a_user_mode_spanning_the_onload_keeps_its_place_when_the_guard_leaves():
    model, mgr = _small_manager()
    handle = guard.install(mgr)
    try:
        mgr.offload()
        with _Counting() as counting:
            mgr.onload()  # the guard leaves from under the user's mode
            assert not guard.active()
            stack = [torch._C._get_dispatch_stack_at(i) for i in range(torch._C._len_torch_dispatch_stack())]
            assert stack == [counting]
            model.weight.sum()
        assert counting.ops >= 1 and torch._C._len_torch_dispatch_stack() == 0
    finally:
        handle.remove()
        mgr.close()
