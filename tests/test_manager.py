"""MemoryManager and the plain-PyTorch integration: equivalence of training with offloads, phases, hooks, misuse."""
import pytest
import torch

from conftest import requires_cuda, same_bits
import memmgr
from memmgr import MemmgrInputError, MemmgrStateError, MemoryManager


def make_mlp(device, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.LayerNorm(64),
                               torch.nn.Linear(64, 4)).to(device=device, dtype=dtype)


def train(device, dtype, steps, offload_between_steps):
    model = make_mlp(device, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    mgr = memmgr.for_module(model, opt) if offload_between_steps else None
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(steps):
        x = torch.randn(32, 16, generator=g).to(device, dtype)
        y = torch.randn(32, 4, generator=g).to(device, dtype)
        if mgr is not None and step > 0:
            mgr.onload()
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
        if mgr is not None:
            mgr.offload()
            assert all(p.untyped_storage().nbytes() == 0 for p in model.parameters())
            assert all(t.untyped_storage().nbytes() == 0 for s in opt.state.values() for t in s.values()
                       if t.device == next(model.parameters()).device and t.numel() > 0)
    if mgr is not None:
        mgr.onload()
    return losses, [p.detach().clone() for p in model.parameters()], mgr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_with_offload_between_steps_is_bitwise_identical(device, dtype):
    ref_losses, ref_params, _ = train(device, dtype, 6, offload_between_steps=False)
    losses, params, mgr = train(device, dtype, 6, offload_between_steps=True)
    assert all(same_bits(a, b) for a, b in zip(losses, ref_losses))
    assert all(same_bits(a, b) for a, b in zip(params, ref_params))
    assert mgr.state["optimizer_states"].nbytes > 0  # lazily created Adam moments were picked up


def test_state_reports_placement_and_bytes(device):
    model = make_mlp(device)
    mgr = memmgr.for_module(model)
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    st = mgr.state["weights"]
    assert st.state == "on_device" and st.device_bytes >= nbytes and st.host_bytes >= nbytes
    mgr.offload("weights")
    st = mgr.state["weights"]
    assert st.state == "on_host" and st.device_bytes == 0


def test_offload_order_frees_discardable_first_and_onload_brings_weights_first(device):
    model = make_mlp(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 16, device=device)).sum().backward()
    opt.step()
    mgr = memmgr.for_module(model, opt)
    order = []
    for name in mgr.group_names:
        for unit in mgr.group(name).units:
            for method in ("offload", "onload"):
                orig = getattr(unit, method)
                setattr(unit, method, (lambda orig, name, method: lambda *a, **k: (
                    order.append((method, name)), orig(*a, **k))[1])(orig, name, method))
    mgr.offload()
    mgr.onload()
    order = [step for i, step in enumerate(order) if i == 0 or order[i - 1] != step]  # one entry per group
    assert order == [("offload", "grads"), ("offload", "optimizer_states"), ("offload", "weights"),
                     ("onload", "weights"), ("onload", "optimizer_states"), ("onload", "grads")]


@requires_cuda
def test_an_onload_zeroes_discarded_cuda_buckets_while_its_copies_are_still_queued():
    from memmgr.transfer import copy_stream

    device = torch.device("cuda", torch.cuda.current_device())
    weights = {"w": torch.randn(1 << 22, device=device)}
    grads = {"g": torch.randn(1 << 22, device=device)}
    expected = weights["w"].clone()
    mgr = MemoryManager()
    mgr.add_group("weights", weights)
    mgr.add_group("grads", grads, policy="discard")
    mgr.offload()
    h2d, fill = copy_stream(device, "h2d"), copy_stream(device, "fill")
    clock_khz = getattr(torch.cuda.get_device_properties(device), "clock_rate", 1_800_000)
    with torch.cuda.stream(h2d):
        torch.cuda._sleep(int(0.5 * clock_khz * 1000))  # the onload's copies queue behind ~0.5 s
    handle = mgr.onload(non_blocking=True)
    fill.synchronize()
    copies_queued = not h2d.query()
    with torch.cuda.stream(fill):
        nonzero = int(torch.count_nonzero(grads["g"]).item())
    handle.wait()
    assert copies_queued, "the copies finished before the check; the test proves nothing"
    assert nonzero == 0
    assert torch.count_nonzero(grads["g"]).item() == 0  # on the current stream, ordered after the zeroing
    assert same_bits(weights["w"], expected)


def test_phase_offloads_all_but_kept_and_restores_after_an_exception(device):
    model = make_mlp(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 16, device=device)).sum().backward()
    opt.step()
    mgr = memmgr.for_module(model, opt)
    expected = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(KeyError):
        with mgr.phase("generate", keep=("optimizer_states",)):
            assert mgr.state["weights"].state == "on_host"
            assert mgr.state["optimizer_states"].state == "on_device"
            raise KeyError("boom")
    assert mgr.state["weights"].state == "on_device"
    assert all(same_bits(p, e) for p, e in zip(model.parameters(), expected))


def test_phases_nest_and_restore_each_level(device):
    model = make_mlp(device)
    mgr = memmgr.for_module(model)
    with mgr.phase("outer", keep=("weights",)):
        assert mgr.state["weights"].state == "on_device"
        with mgr.phase("inner"):
            assert mgr.current_phase == "inner"
            assert mgr.state["weights"].state == "on_host"
        assert mgr.state["weights"].state == "on_device"
        assert mgr.current_phase == "outer"
    assert mgr.current_phase is None


def test_hooks_fire_in_order_and_can_be_removed(device):
    mgr = memmgr.for_module(make_mlp(device))
    calls = []
    h1 = mgr.register_hook("before_offload", lambda e, g: calls.append(("a", e, g)))
    mgr.register_hook("before_offload", lambda e, g: calls.append(("b", e, g)))
    mgr.register_hook("after_offload", lambda e, g: calls.append(("c", e, g)))
    mgr.register_hook("after_onload", lambda e, g: calls.append(("d", e, g)))
    mgr.offload("weights")
    mgr.onload("weights")
    assert calls == [("a", "before_offload", ("weights",)), ("b", "before_offload", ("weights",)),
                     ("c", "after_offload", ("weights",)), ("d", "after_onload", ("weights",))]
    h1.remove()
    calls.clear()
    mgr.offload("weights")
    assert [c[0] for c in calls] == ["b", "c"]


def test_weight_sync_brings_back_only_weights_and_offloads_them_again_even_on_error(device):
    model = make_mlp(device)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 16, device=device)).sum().backward()
    opt.step()
    mgr = memmgr.for_module(model, opt)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    mgr.offload()
    events = []
    mgr.register_hook("before_weight_sync", lambda e, g: events.append((e, mgr.state["weights"].state)))
    mgr.register_hook("after_weight_sync", lambda e, g: events.append((e, mgr.state["weights"].state)))
    with mgr.weight_sync() as weights:
        assert mgr.state["optimizer_states"].state == "on_host"
        assert mgr.state["weights"].state == "on_device"
        assert list(weights)[:2] == ["0.weight", "0.bias"]
        assert all(same_bits(weights[n], expected[n]) for n in expected)
    assert events == [("before_weight_sync", "on_host"), ("after_weight_sync", "on_host")]
    with pytest.raises(RuntimeError, match="sync failed"):
        with mgr.weight_sync():
            raise RuntimeError("sync failed")
    assert mgr.state["weights"].state == "on_host"
    assert events[-1] == ("after_weight_sync", "on_host")


def test_weight_sync_whose_onload_fails_still_runs_the_after_hooks(monkeypatch):
    from memmgr import MemmgrOutOfMemoryError
    from memmgr.flat_tensors import FlatTensors

    model = make_mlp("cpu")
    mgr = memmgr.for_module(model)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    mgr.offload()
    events = []
    mgr.register_hook("before_weight_sync", lambda e, g: events.append(e))
    mgr.register_hook("after_weight_sync", lambda e, g: events.append(e))

    def no_memory(self):
        raise torch.OutOfMemoryError("simulated: the engine still holds the GPU")

    with monkeypatch.context() as patch:
        patch.setattr(FlatTensors, "allocate", no_memory)
        with pytest.raises(MemmgrOutOfMemoryError, match="weights"):
            with mgr.weight_sync():
                pytest.fail("the body must not run without the weights")
    assert events == ["before_weight_sync", "after_weight_sync"]  # what the before-hooks freed is given back
    assert mgr.state["weights"].state == "on_host"
    with mgr.weight_sync() as weights:  # a retry once memory is free syncs the same bits
        assert all(same_bits(weights[n], expected[n]) for n in expected)
    assert events == ["before_weight_sync", "after_weight_sync"] * 2


def _sync_hooks_manager(calls, fail=()):
    mgr = memmgr.for_module(torch.nn.Linear(4, 4), pin_ahead=False)
    for event in ("before_weight_sync", "after_weight_sync"):
        for i in range(2):
            def hook(ev, names, tag=f"{event}:{i}"):
                calls.append(tag)
                if tag in fail:
                    raise RuntimeError(f"hook {tag} failed")
            mgr.register_hook(event, hook)
    return mgr


def test_sync_hooks_that_fail_before_the_sync_still_run_every_after_hook_once():
    calls = []
    mgr = _sync_hooks_manager(calls, fail={"before_weight_sync:0"})
    body = []
    with pytest.raises(RuntimeError, match="before_weight_sync:0 failed"):
        with mgr.weight_sync_hooks():
            body.append("ran")
    assert body == []  # the sync does not run on an engine whose before hook failed
    assert calls == ["before_weight_sync:0", "after_weight_sync:0", "after_weight_sync:1"]


def test_failed_sync_raises_its_own_error_when_an_after_hook_fails_too():
    calls = []
    mgr = _sync_hooks_manager(calls, fail={"after_weight_sync:0"})
    with pytest.raises(ValueError, match="engine gone") as info:
        with mgr.weight_sync_hooks():
            raise ValueError("engine gone")
    assert calls == ["before_weight_sync:0", "before_weight_sync:1", "after_weight_sync:0", "after_weight_sync:1"]
    assert any("after_weight_sync:0 failed" in note for note in info.value.__notes__)


def test_after_hook_failing_a_good_sync_raises_after_every_after_hook_ran():
    calls = []
    mgr = _sync_hooks_manager(calls, fail={"after_weight_sync:0", "after_weight_sync:1"})
    with pytest.raises(RuntimeError, match="after_weight_sync:0 failed") as info:
        with mgr.weight_sync_hooks():
            pass
    assert calls[-2:] == ["after_weight_sync:0", "after_weight_sync:1"]
    assert any("after_weight_sync:1 failed" in note for note in info.value.__notes__)


def test_weight_sync_of_discarded_weights_is_refused():
    mgr = MemoryManager()
    mgr.add_group("weights", [torch.randn(4)], policy="discard")
    mgr.offload()
    with pytest.raises(MemmgrStateError, match="discarded"):
        with mgr.weight_sync():
            pass


def test_manager_over_arbitrary_groups_with_adopted_buffers():
    buffer = torch.randn(128)
    param_views = [buffer[:64], buffer[64:]]
    expected = buffer.clone()
    mgr = MemoryManager()
    mgr.add_group("weights", {"flat": buffer}, adopt=True)
    mgr.add_group("grad_buffers", {"g": torch.ones(128)}, policy="discard", adopt=True)
    mgr.offload()
    assert buffer.untyped_storage().nbytes() == 0
    mgr.onload()
    assert same_bits(param_views[0], expected[:64]) and same_bits(param_views[1], expected[64:])
    assert torch.count_nonzero(mgr.group("grad_buffers").tensors[0]) == 0


# ---- bad input ----

def test_unknown_group_names_list_the_known_ones():
    mgr = memmgr.for_module(make_mlp("cpu"))
    with pytest.raises(MemmgrInputError, match=r"unknown group\(s\) \['wieghts'\]; known groups: \['weights', "):
        mgr.offload("wieghts")
    with pytest.raises(MemmgrInputError, match="unknown group"):
        with mgr.phase("generate", keep=("nope",)):
            pass
    assert mgr.state["weights"].state == "on_device"


def test_module_without_parameters_is_rejected():
    with pytest.raises(MemmgrInputError, match="has no parameters"):
        memmgr.for_module(torch.nn.ReLU())


def test_optimizer_over_other_parameters_is_rejected():
    model = make_mlp("cpu")
    other = torch.nn.Linear(2, 2)
    with pytest.raises(MemmgrInputError, match="not the module's"):
        memmgr.for_module(model, torch.optim.SGD(other.parameters(), lr=0.1))


def test_same_tensor_in_two_groups_is_rejected():
    t = torch.randn(4)
    mgr = MemoryManager()
    mgr.add_group("a", [t])
    with pytest.raises(MemmgrInputError, match="already in group 'a'"):
        mgr.add_group("b", [t])


def test_offload_during_unfinished_backward_is_refused_and_nothing_moves():
    model = make_mlp("cpu")
    mgr = memmgr.for_module(model)
    expected = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.randn(2, 16)).sum()
    with pytest.raises(MemmgrStateError, match="unfinished step"):
        mgr.offload()
    assert mgr.state["weights"].state == "on_device"
    assert all(same_bits(p, e) for p, e in zip(model.parameters(), expected))
    loss.backward()
    mgr.offload()


def test_closed_manager_refuses_calls_and_left_state_on_device():
    model = make_mlp("cpu")
    mgr = memmgr.for_module(model)
    mgr.offload()
    mgr.close()
    assert all(p.untyped_storage().nbytes() > 0 for p in model.parameters())
    with pytest.raises(MemmgrStateError, match="closed"):
        mgr.offload()


def test_unknown_hook_event_is_rejected():
    mgr = memmgr.for_module(make_mlp("cpu"))
    with pytest.raises(MemmgrInputError, match="unknown hook event 'before_sync'"):
        mgr.register_hook("before_sync", print)


@requires_cuda
@pytest.mark.parametrize("empty_cache", [True, False])
def test_add_group_gives_the_storages_its_coalescing_freed_back_to_the_cuda_driver(empty_cache):
    torch.cuda.empty_cache()
    tensors = [torch.randn(1 << 20, device="cuda") for _ in range(8)]  # 8 x 4 MiB, coalesced into new buckets
    mgr = MemoryManager(empty_cache=empty_cache)
    mgr.add_group("weights", tensors)
    cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    if empty_cache:
        assert cached < 4 << 20  # nothing of the 32 MiB the former storages held
    else:
        assert cached >= 32 << 20
    mgr.close()


def test_add_group_releases_cache_only_for_coalesced_cuda_groups(monkeypatch):
    released = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: released.append(True))
    mgr = MemoryManager()
    mgr.add_group("weights", [torch.randn(16)])
    assert released == []  # CPU tensors: nothing cached on a GPU
