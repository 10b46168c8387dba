"""memmgr.sync: WeightSender / WeightReceiver (name -> tensor maps over the gloo transport) between two processes.

One pair of spawned processes plays every scenario in order (each scenario's outcome, errors included, is written
to a JSON file per rank), so the suite pays the start-up of two Python processes once. Single-process tests cover
the sync plan and the module loader.
"""
from __future__ import annotations

import json
import os
import socket
import traceback

import pytest
import torch

import memmgr
from memmgr import MemmgrInputError, MemmgrStateError
from memmgr.sync import ModuleWeightLoader, WeightReceiver, WeightSender, init_sync_group
from memmgr.sync.loaders import module_load_weights
from memmgr.sync.sender import SyncPlan
from memmgr.sync.transports import group_pairs

SMALL_BUCKET_MB = 0.004  # ~4 KB: the test models span several buckets of each dtype


# ---------------------------------------------------------------------------------------------------------------------
# models shared by both processes
# ---------------------------------------------------------------------------------------------------------------------
class Net(torch.nn.Module):
    """Many tensors of two dtypes: fp32 layers and bf16 layers, plus a buffer."""

    def __init__(self, seed: int, width: int = 24, layers: int = 12, odd: dict | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        odd = odd or {}
        self.layers = torch.nn.ModuleList()
        for i in range(layers):
            dtype = torch.bfloat16 if i % 2 else torch.float32
            lin = torch.nn.Linear(width, width + i)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=g))
            self.layers.append(lin.to(dtype))
        self.register_buffer("scale", torch.randn(7, generator=g))
        for name, (shape, dtype) in odd.items():  # replace a parameter by one of another shape / dtype
            mod, attr = name.rsplit(".", 1)
            sub = self.get_submodule(mod)
            setattr(sub, attr, torch.nn.Parameter(torch.zeros(shape, dtype=dtype)))


class Engine(torch.nn.Module):
    """The engine's copy: the same network under another prefix (so a name_map is needed)."""

    def __init__(self, seed: int, **kw):
        super().__init__()
        self.model = Net(seed, **kw)


def engine_name(name: str) -> str:
    return "model." + name


def bump(module: torch.nn.Module, k: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(k)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.shape == b.shape and a.dtype == b.dtype and
            torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


def mismatches(engine: Engine, reference: Net) -> list[str]:
    ref = dict(reference.state_dict())
    return [n for n, t in engine.model.state_dict().items() if not bits_equal(t, ref[n])]


# ---------------------------------------------------------------------------------------------------------------------
# the two processes
# ---------------------------------------------------------------------------------------------------------------------
def _outcome(fn):
    try:
        extra = fn() or {}
        return {"ok": True, **extra}
    except Exception as exc:  # the scenario records the error; the peer raises its own
        return {"ok": False, "type": type(exc).__name__, "error": str(exc), "bases": [c.__name__ for c in
                                                                                       type(exc).__mro__],
                "tb": traceback.format_exc()[-1500:]}


def _stats(s) -> dict:
    return {"metadata_sent": s.metadata_sent, "collectives": s.collectives, "buckets": s.buckets, "nbytes": s.nbytes}


def _worker(rank: int, port: int, port2: int, out_dir: str) -> None:
    torch.manual_seed(0)
    group = init_sync_group(f"tcp://127.0.0.1:{port}", 2, rank, backend="gloo", timeout=30)
    results: dict[str, dict] = {}
    sender = receiver = None
    if rank == 0:
        model = Net(seed=1)
        sender = WeightSender(group, 0, bucket_size_mb=SMALL_BUCKET_MB)
    else:
        engine = Engine(seed=2)
        loader = module_load_weights(engine)
        receiver = WeightReceiver(group, 0, loader, name_map=engine_name)
        reference = Net(seed=1)  # what the sender holds, rebuilt here to compare bit for bit

    # 1. first sync: weights match bit for bit; 2. second sync: the updated weights arrive
    for step in ("first", "second"):
        if rank == 0:
            if step == "second":
                bump(model, 0.5)
            results[step] = _outcome(lambda: _stats(sender.send(dict(model.state_dict()))))
        else:
            if step == "second":
                bump(reference, 0.5)

            def recv():
                st = _stats(receiver.receive())
                st["mismatches"] = mismatches(engine, reference)
                st["missing"] = loader.missing()
                return st
            results[step] = _outcome(recv)

    # 3. a receiver built afresh (an engine restart) takes part in the next sync as it is
    if rank == 1:
        receiver = WeightReceiver(group, 0, loader, name_map=engine_name)
    if rank == 0:
        results["fresh_receiver"] = _outcome(lambda: _stats(sender.send(dict(model.state_dict()))))
    else:
        results["fresh_receiver"] = _outcome(lambda: {**_stats(receiver.receive()),
                                                      "mismatches": mismatches(engine, reference)})

    # 4. another set of tensors (a subset) syncs with its own plan
    if rank == 0:
        subset = {n: t for n, t in model.state_dict().items() if not n.startswith("layers.0.")}
        results["changed_layout"] = _outcome(lambda: _stats(sender.send(subset)))
        del subset  # views of the weights would keep for_module (below) from coalescing them
    else:
        results["changed_layout"] = _outcome(lambda: _stats(receiver.receive()))

    # 5-7. the engine lacks a tensor / holds one in another shape / in another dtype: fails before any weight moves
    odd_cases = {
        "missing_name": {"drop": "layers.3.weight"},
        "wrong_shape": {"odd": {"layers.2.weight": ((5, 5), torch.float32)}},
        "wrong_dtype": {"odd": {"layers.4.bias": ((28,), torch.float16)}},
    }
    for case, spec in odd_cases.items():
        if rank == 0:
            results[case] = _outcome(lambda: _stats(sender.send(dict(model.state_dict()))))
        else:
            odd_engine = Engine(seed=3, odd=spec.get("odd"))
            if "drop" in spec:
                mod, attr = spec["drop"].rsplit(".", 1)
                delattr(odd_engine.model.get_submodule(mod), attr)
            r = WeightReceiver(group, 0, module_load_weights(odd_engine), name_map=engine_name)
            results[case] = _outcome(lambda: _stats(r.receive()))

    # 8. the same mismatch found by load_weights itself (no expected layout): the receiver keeps draining buckets so
    # the sender does not hang, and both raise naming the tensor, both shapes and the mapping
    if rank == 0:
        results["load_error"] = _outcome(lambda: _stats(sender.send(dict(model.state_dict()))))
    else:
        odd_engine = Engine(seed=3, odd={"layers.5.weight": ((29, 3), torch.bfloat16)})
        inner = ModuleWeightLoader(odd_engine)
        r = WeightReceiver(group, 0, lambda w: inner(w), name_map=engine_name)
        results["load_error"] = _outcome(lambda: _stats(r.receive()))

    # 9. a MemoryManager as the source: hooks order, weights off again afterwards
    if rank == 0:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mgr = memmgr.for_module(model, opt)
        order: list[str] = []
        for ev in ("before_weight_sync", "before_onload", "after_onload", "before_offload", "after_offload",
                   "after_weight_sync"):
            mgr.register_hook(ev, lambda e, names: order.append(e))
        mgr.offload()
        order.clear()

        def send_mgr():
            st = _stats(sender.send(mgr))
            st["order"] = list(order)
            st["weights_state_after"] = mgr.state["weights"].state
            return st
        results["manager"] = _outcome(send_mgr)
    else:
        results["manager"] = _outcome(lambda: {**_stats(receiver.receive()),
                                               "mismatches": mismatches(engine, reference)})

    # 10. exception safety: the receiver's load_weights fails, the sender raises inside mgr.weight_sync(), and the
    # weights are offloaded again and after_weight_sync still fires
    if rank == 0:
        order.clear()

        def send_fail():
            try:
                sender.send(mgr)
            finally:
                results["manager_raises_state"] = {"order": list(order),
                                                   "weights_state": mgr.state["weights"].state}
        results["manager_raises"] = _outcome(send_fail)
    else:
        def boom(weights):
            for name, _ in weights:
                if name.endswith("layers.7.bias"):
                    raise RuntimeError(f"boom while loading {name}")
        r = WeightReceiver(group, 0, boom)
        results["manager_raises"] = _outcome(lambda: _stats(r.receive()))

    # 11. weights discarded on the sender: MemmgrStateError there, a clear abort on the receiver (no hang)
    if rank == 0:
        mgr.onload()
        mgr.group("weights").offload(discard=True)
        results["discarded"] = _outcome(lambda: _stats(sender.send(mgr)))
    else:
        results["discarded"] = _outcome(lambda: _stats(receiver.receive()))

    # 12. sender and engine on one GPU (simulated device UUIDs): refused before any collective, with the fix
    if rank == 0:
        s2 = WeightSender(group, 0, device_uuid="GPU-same", tag="same_gpu")
        results["same_gpu"] = _outcome(lambda: _stats(s2.send({"w": torch.ones(3)})))
    else:
        r2 = WeightReceiver(group, 0, lambda w: None, device_uuid="GPU-same", tag="same_gpu")
        results["same_gpu"] = _outcome(lambda: _stats(r2.receive()))

    # 13. over torch's default group (dist.init_process_group) instead of a group of its own
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port2}", world_size=2, rank=rank)
    try:
        if rank == 0:
            s3 = WeightSender(None, 0, bucket_size_mb=SMALL_BUCKET_MB)
            results["default_group"] = _outcome(lambda: _stats(s3.send(dict(Net(seed=9).state_dict()))))
        else:
            e3 = Engine(seed=4)
            r3 = WeightReceiver(None, 0, module_load_weights(e3), name_map=engine_name)
            results["default_group"] = _outcome(lambda: {**_stats(r3.receive()),
                                                         "mismatches": mismatches(e3, Net(seed=9))})
    finally:
        dist.destroy_process_group()

    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("sync")
    ctx = mp.start_processes(_worker, args=(_free_port(), _free_port(), str(out)), nprocs=2, join=False,
                             start_method="spawn")
    try:
        for _ in range(90):  # bounded: at most ~90 s
            if ctx.join(timeout=1):
                break
        else:
            pytest.fail("the sync processes did not finish within 90 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _ok(res, key):
    for rank in (0, 1):
        assert res[rank][key]["ok"], f"rank {rank}: {res[rank][key].get('tb')}"


# ---------------------------------------------------------------------------------------------------------------------
# the protocol, over gloo between two processes
# ---------------------------------------------------------------------------------------------------------------------
def test_sync_is_bit_exact_for_mixed_dtypes_over_several_buckets(results):
    _ok(results, "first")
    sent, got = results[0]["first"], results[1]["first"]
    assert got["mismatches"] == [] and got["missing"] == []
    assert sent["buckets"] >= 4 and got["buckets"] == sent["buckets"]
    assert sent["nbytes"] == got["nbytes"] > 0


def test_every_sync_sends_its_plan_then_one_broadcast_per_bucket(results):
    _ok(results, "second")
    for step in ("first", "second"):
        sent, got = results[0][step], results[1][step]
        assert sent["metadata_sent"] and got["metadata_sent"]
        # plan length, plan, status, one per bucket, final status
        assert sent["collectives"] == got["collectives"] == 4 + sent["buckets"]
    assert results[1]["second"]["mismatches"] == []  # the updated weights arrived


def test_a_receiver_built_afresh_takes_part_in_the_next_sync(results):
    _ok(results, "fresh_receiver")
    assert results[1]["fresh_receiver"]["mismatches"] == []


def test_another_set_of_weights_syncs_with_its_own_plan(results):
    _ok(results, "changed_layout")
    sent, got = results[0]["changed_layout"], results[1]["changed_layout"]
    assert got["buckets"] == sent["buckets"] and got["nbytes"] == sent["nbytes"] < results[0]["first"]["nbytes"]


@pytest.mark.parametrize("case, needles", [
    ("missing_name", ["'model.layers.3.weight' (trainer tensor 'layers.3.weight')", "no weight of that name",
                      "[27, 24]", "engine_name"]),
    ("wrong_shape", ["'model.layers.2.weight' (trainer tensor 'layers.2.weight')", "[26, 24]", "[5, 5]"]),
    ("wrong_dtype", ["(trainer tensor 'layers.4.bias')", "float32", "float16", "[28]"]),
])
def test_engine_mismatch_errors_name_the_tensor_and_both_shapes(results, case, needles):
    for rank in (0, 1):
        r = results[rank][case]
        assert not r["ok"] and r["type"] == "MemmgrSyncMismatchError", r
        for needle in needles:
            assert needle in r["error"], (rank, needle, r["error"])
    assert "receiver" in results[0][case]["error"]  # the sender says where it failed


def test_load_weights_error_names_tensor_shapes_and_mapping(results):
    for rank in (0, 1):
        r = results[rank]["load_error"]
        assert not r["ok"] and "MemmgrError" in r["bases"], r
        for needle in ("'model.layers.5.weight'", "(29, 3)", "(29, 24)", "trainer tensor 'layers.5.weight'",
                       "engine_name"):
            assert needle in r["error"], (rank, needle, r["error"])


def test_manager_source_fires_hooks_in_order_and_offloads_again(results):
    _ok(results, "manager")
    r = results[0]["manager"]
    assert r["order"] == ["before_weight_sync", "before_onload", "after_onload", "before_offload", "after_offload",
                          "after_weight_sync"]
    assert r["weights_state_after"] == "on_host"
    assert results[1]["manager"]["mismatches"] == []


def test_manager_weights_offloaded_again_when_sync_raises(results):
    r0, r1 = results[0]["manager_raises"], results[1]["manager_raises"]
    assert not r0["ok"] and not r1["ok"]
    assert "boom while loading" in r0["error"] and "boom while loading" in r1["error"]
    state = results[0]["manager_raises_state"]
    assert state["order"][0] == "before_weight_sync" and state["order"][-1] == "after_weight_sync"
    assert "before_offload" in state["order"] and state["weights_state"] == "on_host"


def test_discarded_weights_raise_on_sender_and_abort_receiver(results):
    r0, r1 = results[0]["discarded"], results[1]["discarded"]
    assert not r0["ok"] and r0["type"] == "MemmgrStateError" and "discarded" in r0["error"]
    assert not r1["ok"] and "aborted by the sender" in r1["error"] and "discarded" in r1["error"]


def test_same_gpu_is_refused_with_placement_advice(results):
    for rank in (0, 1):
        r = results[rank]["same_gpu"]
        assert not r["ok"] and "same GPU" in r["error"] and "NCCL refuses" in r["error"]
        assert "(i + 1) % n" in r["error"]


def test_sync_over_default_process_group(results):
    _ok(results, "default_group")
    assert results[1]["default_group"]["mismatches"] == []


# ---------------------------------------------------------------------------------------------------------------------
# single process: layout and loader
# ---------------------------------------------------------------------------------------------------------------------
def test_plan_lists_every_bucket_of_the_stream_and_round_trips_through_json():
    pairs = [(f"t{i}", torch.zeros(100 + i, dtype=torch.bfloat16 if i % 3 else torch.float32)) for i in range(40)]
    pairs.append(("big", torch.zeros(10_000)))
    groups = list(group_pairs(pairs, 2048))
    plan = SyncPlan.of(groups, "GPU-x")
    assert len(plan.buckets) == len(groups) >= 4
    assert sorted(t.name for t in plan.tensors) == sorted(n for n, _ in pairs)
    assert plan.max_bucket_nbytes >= 40_000  # the large tensor's bucket of its own
    assert SyncPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


def test_plan_of_another_format_or_malformed_is_refused_naming_the_fix():
    plan = SyncPlan.of([[("a", torch.zeros(4))]]).to_json()
    with pytest.raises(memmgr.MemmgrError, match="same memmgr version"):
        SyncPlan.from_json({**plan, "format": 1})
    plan["buckets"][0]["entries"][0][1] = "four"
    with pytest.raises(memmgr.MemmgrError, match="malformed bucket metadata"):
        SyncPlan.from_json(plan)


def test_module_loader_copies_bit_for_bit():
    src, dst = Net(seed=1), Net(seed=2)
    loader = ModuleWeightLoader(dst)
    loader(list(src.state_dict().items()))
    assert all(bits_equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    assert loader.missing() == []


def test_module_loader_errors_name_tensor_and_both_shapes_and_dtypes():
    loader = ModuleWeightLoader(Net(seed=1))
    with pytest.raises(MemmgrInputError,
                       match=r"no parameter or buffer 'layers\.0\.wieght'.*closest.*layers\.0\.weight"):
        loader([("layers.0.wieght", torch.zeros(24, 24))])
    with pytest.raises(MemmgrInputError, match=r"'layers\.0\.weight' arrived as shape \(3, 3\), torch.float32.*"
                                               r"shape \(24, 24\), torch.float32"):
        loader([("layers.0.weight", torch.zeros(3, 3))])
    with pytest.raises(MemmgrInputError, match=r"torch.float16.*torch.float32"):
        loader([("layers.0.weight", torch.zeros(24, 24, dtype=torch.float16))])


def test_module_loader_refuses_offloaded_engine():
    net = Net(seed=1)
    mgr = memmgr.for_module(net)
    mgr.offload()
    with pytest.raises(MemmgrStateError, match="offloaded"):
        ModuleWeightLoader(net)([("layers.0.weight", torch.zeros(24, 24))])
    mgr.onload()
