"""What a demanding user does around the designed paths: repeated calls, phases around syncs and budgets, failing
hooks, checkpoints, resumes, closing and managing again. Each test names the behaviour it holds memmgr to."""
from __future__ import annotations

import torch
import pytest

import memmgr
from memmgr import HostMemoryPool, MemoryManager

from conftest import same_bits


def mlp(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).to(device)


def step(model, opt, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt.zero_grad()
    model(torch.randn(4, 8, generator=g)).square().sum().backward()
    opt.step()


def states(mgr):
    return {n: s.state for n, s in mgr.state.items()}


# ---- the public API keeps working when called again ----
def test_memmgr_swap_is_the_function_on_every_call():
    a = memmgr.for_module(mlp(), pin_ahead=False)
    b = memmgr.for_module(mlp(1), pin_ahead=False)
    b.offload()
    for _ in range(3):
        memmgr.swap(out=a, into=b)
        a, b = b, a
    from memmgr.swap import SwapLedger, swap  # importing from the submodule again must not shadow the function

    assert callable(memmgr.swap) and memmgr.swap is swap and SwapLedger is not None
    assert states(a)["weights"] == "on_device" and states(b)["weights"] == "on_host"


def test_generator_of_tensors_makes_a_full_group():
    mgr = MemoryManager(pool=HostMemoryPool(pin=False))
    tensors = [torch.randn(4) for _ in range(3)]
    group = mgr.add_group("w", (t for t in tensors))
    assert len(group.tensors) == 3 and group.nbytes >= 3 * 16
    module = mlp()
    assert len(mgr.add_group("m", module.parameters()).tensors) == 4


# ---- phases and weight syncs restore what was there, unit by unit ----
def test_weight_sync_nested_in_a_phase_leaves_weights_off_until_the_phase_ends():
    model = mlp()
    mgr = memmgr.for_module(model, pin_ahead=False)
    with mgr.phase("generate"):
        assert states(mgr)["weights"] == "on_host"
        with mgr.weight_sync() as weights:
            assert states(mgr)["weights"] == "on_device" and len(weights) == 4
        assert states(mgr)["weights"] == "on_host"
        with mgr.weight_sync():  # and again: the second sync leaves them off too
            pass
        assert mgr.state["weights"].device_bytes == 0
    assert states(mgr)["weights"] == "on_device"


def test_nested_weight_syncs_each_restore_their_own_placement():
    mgr = memmgr.for_module(mlp(), pin_ahead=False)
    mgr.offload()
    with mgr.weight_sync():
        with mgr.weight_sync():
            pass
        assert states(mgr)["weights"] == "on_device"  # the inner sync found them on the device
    assert states(mgr)["weights"] == "on_host"
    with pytest.raises(memmgr.MemmgrStateError, match="without a begin_weight_sync"):
        mgr.end_weight_sync()


def test_leaving_a_phase_restores_a_budgeted_offload_bucket_by_bucket():
    model = mlp()
    mgr = memmgr.for_module(model, bucket_size_mb=200 / 2**20, pin_ahead=False)  # several buckets
    assert len(mgr.group("weights").buckets) > 1
    plan = mgr.free(100)
    off = {b.name for b in mgr.group("weights").buckets if b.device_bytes == 0}
    assert states(mgr)["weights"] == "partial" and off == {i[1] for i in plan}
    with mgr.phase("generate"):
        assert mgr.state["weights"].device_bytes == 0
    assert states(mgr)["weights"] == "partial"
    assert {b.name for b in mgr.group("weights").buckets if b.device_bytes == 0} == off
    with mgr.phase("train", keep=["weights"]):  # a kept partial group stays as it is
        assert {b.name for b in mgr.group("weights").buckets if b.device_bytes == 0} == off
    plan.onload()
    assert states(mgr)["weights"] == "on_device"


def test_failed_onload_in_weight_sync_leaves_the_weights_off_and_runs_the_after_hooks():
    model = mlp()
    expected = [p.detach().clone() for p in model.parameters()]
    mgr = memmgr.for_module(model, pin_ahead=False)
    mgr.offload()
    events = []
    mgr.register_hook("after_weight_sync", lambda e, g: events.append(e))

    def failing(_event, _groups):
        raise RuntimeError("engine refused the weights")

    handle = mgr.register_hook("after_onload", failing)
    with pytest.raises(RuntimeError, match="engine refused"):
        with mgr.weight_sync():
            pytest.fail("the body must not run")
    assert states(mgr)["weights"] == "on_host" and mgr.state["weights"].device_bytes == 0
    assert events == ["after_weight_sync"]
    handle.remove()
    mgr.onload()
    assert all(same_bits(p, e) for p, e in zip(model.parameters(), expected))


# ---- a member changed under memmgr is refused at the next move, never truncated or left unmanaged ----
def pool():
    return HostMemoryPool(pin=False)


def test_member_grown_with_resize_is_refused_before_anything_moves(device):
    t, u = torch.randn(10, device=device), torch.randn(6, device=device)
    mgr = MemoryManager(pool=pool())
    mgr.add_group("g", {"t": t, "u": u})
    t.resize_(1000)  # grows the bucket's storage in place
    t[10:] = 7.0
    expected = t.clone()
    with pytest.raises(memmgr.MemmgrStateError, match=r"storage holds 4000 bytes .*resize_.*Nothing was moved"):
        mgr.offload()
    assert mgr.state["g"].state == "on_device" and torch.equal(t, expected)


def test_member_resized_inside_its_bucket_is_named_in_the_refusal():
    t, u = torch.randn(10), torch.randn(6)
    mgr = MemoryManager(pool=pool())
    mgr.add_group("g", {"t": t, "u": u})
    u.resize_(2)  # shrinks the view: the bucket still holds it, but no longer as it was registered
    with pytest.raises(memmgr.MemmgrStateError, match=r"tensor 'u' is now \(2,\) .* joined the bucket as \(6,\)"):
        mgr.offload()
    assert mgr.state["g"].device_bytes == mgr.state["g"].nbytes


def test_member_resized_while_offloaded_is_refused_at_onload_with_the_host_copy_intact():
    t, u = torch.randn(10), torch.randn(6)
    expected = [t.clone(), u.clone()]
    mgr = MemoryManager(pool=pool())
    mgr.add_group("g", {"t": t, "u": u})
    mgr.offload()
    t.resize_(20)  # re-allocates the freed storage with 80 bytes
    with pytest.raises(memmgr.MemmgrStateError, match=r"bucket 'g/0': its storage holds 80 bytes"):
        mgr.onload()
    assert mgr.state["g"].state == "on_host"
    t.resize_(10)
    t.untyped_storage().resize_(0)  # undone: the onload goes through
    mgr.onload()
    assert torch.equal(t, expected[0]) and torch.equal(u, expected[1])


def test_member_rebound_while_offloaded_is_refused_at_onload_and_the_buckets_restored_before_it_are_freed_again(
        device):
    t, u = torch.randn(10, device=device), torch.randn(6, device=device)
    expected = [t.clone(), u.clone()]
    group = memmgr.BucketizedFlatTensors({"t": t, "u": u}, bucket_size_mb=40 / 2**20, name="g", pool=pool())
    assert len(group.units) == 2  # t and u in buckets of their own: the refusal comes after t's bucket was restored
    mgr = MemoryManager(pool=pool())
    mgr.add_group("g", group)
    mgr.offload()
    u.data = torch.zeros(3, device=device)
    with pytest.raises(memmgr.MemmgrStateError, match=r"tensor 'u' is now \(3,\) .* joined the bucket as \(6,\)"):
        mgr.onload()
    assert mgr.state["g"].state == "on_host"
    assert [b.flat.untyped_storage().nbytes() for b in group.units] == [0, 0]
    assert same_bits(group.units[0].host_copy(t), expected[0].cpu())  # nothing lost
    assert same_bits(group.units[1].host_buffer.tensor[:24].view(torch.float32), expected[1].cpu())


def test_a_check_made_for_an_abandoned_offload_does_not_vouch_for_a_later_one(device):
    t, u = torch.randn(16, device=device), torch.randn(8, device=device)
    bucket = memmgr.FlatTensors.coalesce([("t", t), ("u", u)], name="b", pool=pool())
    assert bucket.begin_offload()
    bucket.check_intact("offload")  # passes for this offload, which is then dropped
    bucket.abandon_offload()
    t.data = torch.randn(16, device=device)
    with pytest.raises(memmgr.MemmgrStateError, match=r"tensor 't' .* no longer views the bucket's memory"):
        bucket.offload()
    assert bucket.state is memmgr.BucketState.ON_DEVICE and bucket.device_bytes == bucket.nbytes + 16 * 4


def test_a_bucket_onloaded_on_its_own_refuses_a_buffer_given_other_memory_while_offloaded(device):
    buffer = torch.randn(16, device=device)
    expected = buffer.clone()
    bucket = memmgr.FlatTensors.adopt(buffer, name="b", pool=pool())
    bucket.offload()
    with torch.no_grad():
        buffer.set_(torch.zeros(16, device=device))
    with pytest.raises(memmgr.MemmgrStateError, match=r"bucket 'b': its buffer .* was given other memory"):
        bucket.onload()
    assert bucket.state is memmgr.BucketState.ON_HOST
    assert same_bits(bucket.host_buffer.tensor[:64].view(torch.float32), expected.cpu())  # the contents kept


@pytest.mark.parametrize("rebind", ["data", "set_"])
def test_member_given_other_memory_is_counted_refused_at_offload_and_managed_after_a_rebuild(rebind, device):
    model = mlp(device=device)
    mgr = memmgr.for_module(model, pin_ahead=False)
    weight = model[0].weight
    new = torch.randn(16, 8, device=device)
    mgr.offload()
    if rebind == "data":
        weight.data = new
    else:
        with torch.no_grad():
            weight.set_(new)
    new = new.clone()  # the test keeps no reference to the memory the weight now owns
    assert mgr.state["weights"].device_bytes == 16 * 8 * 4  # not 0: the new memory is seen
    mgr.onload()  # restoring the other members is safe
    with pytest.raises(memmgr.MemmgrStateError, match=r"tensor '0.weight' .* no longer views the bucket's memory"):
        mgr.offload()
    assert torch.equal(weight, new) and mgr.state["weights"].state == "on_device"
    mgr.close()
    mgr2 = memmgr.for_module(model, pin_ahead=False)  # the fix the message gives
    mgr2.offload()
    assert weight.untyped_storage().nbytes() == 0
    mgr2.onload()
    assert torch.equal(weight, new)


def test_a_refused_offload_of_several_groups_frees_none_of_them_and_the_next_offload_round_trips_bit_exact(device):
    # every bucket's copy is issued before the members are checked: a refusal must abandon all of them, free nothing,
    # and leave the buckets and their host buffers fit for the next offload
    g = torch.Generator().manual_seed(5)
    a = {f"a{i}": torch.randn(1000 + i, generator=g).to(device) for i in range(3)}
    b = {f"b{i}": torch.randn(500 + i, generator=g).to(device) for i in range(3)}
    everything = {**a, **b}
    mgr = MemoryManager(pool=pool())
    mgr.add_group("a", a)
    mgr.add_group("b", b)
    bucket_b = mgr.group("b").buckets[0].flat
    where = (b["b1"].storage_offset(), b["b1"].shape)
    b["b1"].data = torch.zeros_like(b["b1"])  # given other memory since it joined
    expected = {n: t.clone() for n, t in everything.items()}
    with pytest.raises(memmgr.MemmgrStateError, match=r"b1.* no longer views the bucket's memory"):
        mgr.offload()
    assert states(mgr) == {"a": "on_device", "b": "on_device"}
    assert all(t.untyped_storage().nbytes() > 0 for t in everything.values())
    assert all(same_bits(t, expected[n]) for n, t in everything.items())
    with torch.no_grad():
        b["b1"].set_(bucket_b.untyped_storage(), *where)  # views its place in the bucket again
        for t in everything.values():
            t.add_(1)  # new contents since the abandoned copies
    expected = {n: t.clone() for n, t in everything.items()}
    mgr.offload()
    assert all(t.untyped_storage().nbytes() == 0 for t in everything.values())
    mgr.onload()
    assert all(same_bits(t, expected[n]) for n, t in everything.items())
    mgr.close()


# ---- a storage is freed by one bucket only ----
def test_a_buffer_and_a_view_of_it_cannot_be_adopted_twice_in_one_or_two_managers():
    buf = torch.randn(16)
    mgr = MemoryManager(pool=pool())
    mgr.add_group("a", {"flat": buf}, adopt=True)
    with pytest.raises(memmgr.MemmgrInputError, match=r"buffer 'view' is already managed by bucket 'flat'"):
        mgr.add_group("b", {"view": buf[:]}, adopt=True)
    other = MemoryManager(pool=pool())
    with pytest.raises(memmgr.MemmgrInputError, match=r"already managed by bucket 'flat'"):
        other.add_group("b", {"view": buf.view(torch.int32)}, adopt=True)
    with pytest.raises(memmgr.MemmgrInputError, match=r"are the same storage"):
        other.add_group("c", {"x": (x := torch.randn(4)), "y": x[:]}, adopt=True)
    assert mgr.group_names == ["a"] and other.group_names == []
    mgr.offload()
    mgr.onload()
    with pytest.raises(memmgr.MemmgrInputError, match=r"already managed by bucket 'flat'"):
        other.add_group("d", [buf])  # coalescing a managed tensor is refused too


# ---- copies and pickles of offloaded tensors read the host copy; nothing reads freed memory ----
def run_isolated(code: str) -> str:
    """Runs ``code`` in a fresh interpreter, so that a crash (a segmentation fault reading freed memory) fails this
    test instead of killing pytest; returns its stdout."""
    import os
    import subprocess
    import sys
    import textwrap

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.path.join(root, "tests")]))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout}\n{out.stderr[-3000:]}"
    return out.stdout


def test_deepcopy_and_pickle_of_offloaded_tensors_read_the_host_copy_in_a_subprocess(device):
    out = run_isolated("""
        import copy, io, pickle, torch, memmgr
        torch.manual_seed(0)
        device = torch.device("DEVICE")
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).to(device)
        model.register_buffer("steps", torch.arange(5, device=device))
        opt = torch.optim.Adam(model.parameters())
        model(torch.randn(4, 8, device=device)).sum().backward()
        opt.step()
        ref_model, ref_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
        mgr = memmgr.for_module(model, opt, pin_ahead=False)
        mgr.offload()
        mgr.onload()
        osd = opt.state_dict()  # taken before the offload: the same tensor objects, no new views
        mgr.offload()
        clone = copy.deepcopy(model)                       # a module deep-copied while offloaded
        assert all(torch.equal(clone.state_dict()[k], v) for k, v in ref_model.items())
        assert isinstance(clone[0].weight, torch.nn.Parameter) and clone[0].weight.requires_grad
        buf = io.BytesIO()
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        torch.save({"model": tensors, "optimizer": osd}, buf)   # saved while offloaded
        buf.seek(0)
        loaded = torch.load(buf)
        # pickled from the host copy: CPU tensors with the same contents
        assert all(torch.equal(loaded["model"][k].cpu(), v.cpu()) for k, v in ref_model.items())
        assert all(torch.equal(loaded["optimizer"]["state"][i][k].cpu(), v.cpu()) for i, s in ref_opt["state"].items()
                   for k, v in s.items())
        assert torch.equal(pickle.loads(pickle.dumps(model[0].bias)).cpu(), ref_model["0.bias"].cpu())
        assert clone[0].weight.device.type == device.type
        assert all(s.device_bytes == 0 for s in mgr.state.values())  # nothing was onloaded for it
        assert all(torch.equal(model.state_dict()[k], v) for k, v in ref_model.items())  # state_dict onloads
        assert mgr.state["weights"].state == "on_device" and mgr.state["optimizer_states"].state == "on_host"
        print("ok")
    """.replace("DEVICE", str(device)))
    assert out.strip() == "ok"


def test_copying_a_tensor_without_memory_raises_and_a_discarded_one_reads_zeros_in_a_subprocess():
    out = run_isolated("""
        import copy, pickle, torch, memmgr
        from memmgr import HostMemoryPool, MemoryManager, MemmgrStateError
        grads = torch.randn(6)
        mgr = MemoryManager(pool=HostMemoryPool(pin=False))
        mgr.add_group("g", {"grads": grads}, policy="discard")
        mgr.offload()
        assert torch.equal(copy.deepcopy(grads), torch.zeros(6))  # what its onload restores
        assert torch.equal(pickle.loads(pickle.dumps(grads)), torch.zeros(6))
        freed = torch.randn(10)
        freed.untyped_storage().resize_(0)                      # freed by some other tool
        for attempt in (lambda: copy.deepcopy(freed), lambda: pickle.dumps(freed)):
            try:
                attempt()
            except MemmgrStateError as exc:
                assert "has no memory behind it" in str(exc)
            else:
                raise AssertionError("no error")
        print("ok")
    """)
    assert out.strip() == "ok"


def test_two_groups_adopting_one_storage_then_offloading_cannot_crash_in_a_subprocess():
    out = run_isolated("""
        import torch, memmgr
        from memmgr import HostMemoryPool, MemoryManager, MemmgrError
        buf = torch.randn(1 << 16)
        a = MemoryManager(pool=HostMemoryPool(pin=False))
        b = MemoryManager(pool=HostMemoryPool(pin=False))
        a.add_group("a", {"buf": buf}, adopt=True)
        try:
            b.add_group("b", {"view": buf[:]}, adopt=True)
        except MemmgrError as exc:
            print(type(exc).__name__)
        a.offload(); a.onload()
        print("ok")
    """)
    assert out.split() == ["MemmgrInputError", "ok"]


# ---- management ends and begins again ----
def train(model, opt, mgr=None, steps=3, seed=0):
    losses = []
    for i in range(steps):
        g = torch.Generator().manual_seed(seed + i)
        opt.zero_grad()
        loss = model(torch.randn(4, 8, generator=g).to(next(model.parameters()).device)).square().sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if mgr is not None:
            mgr.offload()
            mgr.onload()
    return losses


def test_closed_manager_releases_the_model_and_a_new_manager_works_and_reuses_the_host_buffers(device):
    host = HostMemoryPool()
    model, ref_model = mlp(device=device), mlp(device=device)
    opt, ref_opt = torch.optim.Adam(model.parameters()), torch.optim.Adam(ref_model.parameters())
    mgr = memmgr.for_module(model, opt, pool=host)
    losses = train(model, opt, mgr, steps=2)
    held = host.bytes_held
    mgr.offload()
    mgr.close()  # onloads, then lets go: the tensors are ordinary tensors again, the host buffers back in the pool
    assert mgr.state["weights"].nbytes == 0 and host.bytes_held == held
    for cycle in range(2):
        mgr = memmgr.for_module(model, opt, pool=host)
        losses += train(model, opt, mgr, steps=1, seed=2 + cycle)
        mgr.close()
    assert host.bytes_held == held  # the same exact-size buffers, reused
    assert losses == train(ref_model, ref_opt, steps=2) + train(ref_model, ref_opt, steps=1, seed=2) + \
        train(ref_model, ref_opt, steps=1, seed=3)
    assert all(same_bits(a, b) for a, b in zip(model.parameters(), ref_model.parameters()))


def test_manager_dropped_without_close_returns_its_host_buffers_to_the_pool():
    import gc

    host = pool()
    model = mlp()
    mgr = memmgr.for_module(model, pool=host)
    held = host.bytes_held
    assert held > 0 and not host.buffers_free()
    del mgr
    gc.collect()
    assert host.bytes_held == held and host.bytes_free == held  # back in the pool, reusable
    mgr = memmgr.for_module(model, pool=host)  # the same model again: its tensors are free to be managed
    assert host.bytes_held == held  # same sizes: the buffers the dropped manager gave back, no new host memory
    mgr.offload()
    assert mgr.state["weights"].device_bytes == 0
    mgr.onload()


def test_manager_dropped_while_offloaded_gives_the_tensors_their_contents_back_in_a_subprocess(device):
    out = run_isolated("""
        import gc, torch, memmgr
        from memmgr import HostMemoryPool
        torch.manual_seed(0)
        device = torch.device("DEVICE")
        host = HostMemoryPool(pin=False)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).to(device)
        opt = torch.optim.Adam(model.parameters())
        model(torch.randn(4, 8, device=device)).square().sum().backward()
        opt.step()
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        moments = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
        mgr = memmgr.for_module(model, opt, pool=host)
        mgr.offload()
        assert all(p.untyped_storage().nbytes() == 0 for p in model.parameters())
        del mgr
        gc.collect()
        assert all(torch.equal(p.detach(), weights[n]) for n, p in model.named_parameters())
        assert all(torch.equal(opt.state[p][k], v) for p, m in zip(model.parameters(), moments) for k, v in m.items())
        # the discarded grads come back as zeros with memory behind them, as an onload leaves them
        assert all(p.grad is None or (p.grad.untyped_storage().nbytes() > 0 and not p.grad.any())
                   for p in model.parameters())
        assert host.bytes_free == host.bytes_held  # every host buffer back in the pool
        model(torch.randn(4, 8, device=device)).square().sum().backward()  # and the model trains on
        opt.step()
        print("ok")
    """.replace("DEVICE", str(device)))
    assert out.strip() == "ok"


def test_optimizer_state_loaded_after_the_manager_replaces_the_old_buckets(device):
    import copy

    model, ref_model = mlp(device=device), mlp(device=device)
    opt, ref_opt = torch.optim.Adam(model.parameters()), torch.optim.Adam(ref_model.parameters())
    mgr = memmgr.for_module(model, opt, pin_ahead=False)
    losses = train(model, opt, mgr, steps=2)
    ref_losses = train(ref_model, ref_opt, steps=2)
    nbytes = mgr.group("optimizer_states").nbytes
    old = mgr.group("optimizer_states").buckets
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # new tensors, as a checkpoint load makes
    ref_opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    mgr.offload()
    assert mgr.group("optimizer_states").nbytes == nbytes  # not doubled: the old buckets were released
    assert not set(map(id, old)) & set(map(id, mgr.group("optimizer_states").buckets))
    # Adam's "step" counters stay on the CPU beside CUDA parameters (not device state): only the moments move
    assert all(t.untyped_storage().nbytes() == 0 for s in opt.state.values() for t in s.values()
               if t.device.type == device.type)
    mgr.onload()
    assert train(model, opt, mgr, steps=2, seed=2) == train(ref_model, ref_opt, steps=2, seed=2)
    assert losses == ref_losses
    assert all(same_bits(a, b) for a, b in zip(model.parameters(), ref_model.parameters()))


@pytest.mark.parametrize("saved_while", ["on_device", "offloaded"])
def test_checkpoint_saved_under_memmgr_resumes_under_a_new_manager_bitwise(tmp_path, saved_while, device):
    model, ref_model = mlp(device=device), mlp(device=device)
    opt, ref_opt = torch.optim.Adam(model.parameters()), torch.optim.Adam(ref_model.parameters())
    mgr = memmgr.for_module(model, opt, pin_ahead=False)
    train(model, opt, mgr, steps=2)
    train(ref_model, ref_opt, steps=2)
    if saved_while == "offloaded":
        mgr.offload()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    mgr.onload()

    ckpt = torch.load(tmp_path / "ckpt.pt")
    model2 = mlp(5, device=device)
    opt2 = torch.optim.Adam(model2.parameters())
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optimizer"])  # views of one loaded storage per saved bucket
    del ckpt
    mgr2 = memmgr.for_module(model2, opt2, pin_ahead=False)
    assert mgr2.group("optimizer_states").nbytes == mgr.group("optimizer_states").nbytes  # all of it managed
    mgr2.offload()
    assert all(s.device_bytes == 0 for s in mgr2.state.values())  # nothing of the loaded state left behind
    mgr2.onload()
    assert train(model2, opt2, mgr2, steps=3, seed=2) == train(ref_model, ref_opt, steps=3, seed=2)
    assert all(same_bits(a, b) for a, b in zip(model2.parameters(), ref_model.parameters()))
    for s, r in zip(opt2.state.values(), ref_opt.state.values()):
        assert all(same_bits(s[k], r[k]) for k in r)


def test_state_dict_and_load_state_dict_while_offloaded_bring_their_group_back_first():
    import copy

    model, source = mlp(), mlp(3)
    opt = torch.optim.Adam(model.parameters())
    train(model, opt)
    mgr = memmgr.for_module(model, opt, pin_ahead=False)
    mgr.offload()
    clone = copy.deepcopy(model)  # carries the hooks along, but they act for the managed module only
    clone.state_dict()
    assert states(mgr)["weights"] == "on_host"
    model.load_state_dict(source.state_dict())  # writes into the weights: they come back first
    assert states(mgr)["weights"] == "on_device" and states(mgr)["optimizer_states"] == "on_host"
    assert all(same_bits(a, b) for a, b in zip(model.parameters(), source.parameters()))
    sd = opt.state_dict()
    assert states(mgr)["optimizer_states"] == "on_device"
    assert all(t.untyped_storage().nbytes() > 0 for s in sd["state"].values() for t in s.values())
    mgr.close()
    assert not model._state_dict_pre_hooks and not model._load_state_dict_pre_hooks  # close() removed the hooks
