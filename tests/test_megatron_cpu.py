"""for_megatron against real megatron-core on the CPU (world size 1, gloo), through memmgr.tools.megatron_cpu_shim."""
from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("megatron.core")

from memmgr.errors import MemmgrError, MemmgrIntegrationError, MemmgrStateError  # noqa: E402
from memmgr.host_memory import HostMemoryPool  # noqa: E402
from memmgr.integrations import megatron as mm  # noqa: E402

_POOL = HostMemoryPool()
_MANAGERS: list = []


def for_megatron(*args, **kwargs):
    """for_megatron with a pool of this module's own, so the host buffers are freed when the module ends."""
    mgr = mm.for_megatron(*args, pool=_POOL, **kwargs)
    _MANAGERS.append(mgr)
    return mgr

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")
pytestmark = [pytestmark, pytest.mark.integration]  # issue 31: tests by cost (tests/conftest.py)

SEQ, BATCH, VOCAB = 16, 2, 128

CONFIGS = {
    # name: (use_distributed_optimizer, bf16)
    "distopt-fp32": (True, False),
    "distopt-bf16": (True, True),
    "float16-opt": (False, True),
    "fp32-opt": (False, False),
}


@pytest.fixture(scope="module")
def megatron_env(tmp_path_factory):
    from memmgr.tools.megatron_cpu_shim import cpu_megatron

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    with cpu_megatron():
        from megatron.core import parallel_state

        init_file = tmp_path_factory.mktemp("dist") / "init"
        torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
        try:
            parallel_state.initialize_model_parallel(1, 1)
            yield
        finally:
            for mgr in _MANAGERS:
                mgr.close()
            _MANAGERS.clear()
            _POOL.trim()
            parallel_state.destroy_model_parallel()
            torch.distributed.destroy_process_group()


def build(config: str, grad_reduce_in_fp32: bool = True):
    from memmgr.tools.megatron_models import build_gpt

    dist_opt, bf16 = CONFIGS[config]
    return build_gpt(layers=2, hidden=64, heads=4, vocab=VOCAB, seq=SEQ, bf16=bf16, dist_opt=dist_opt, cpu_init=True,
                     seed=0, lr=1e-3, grad_reduce_in_fp32=grad_reduce_in_fp32, device=None)


def batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g))
            for _ in range(n)]


POS = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)


def train_step(ddp, opt, tokens, labels) -> float:
    ddp.zero_grad_buffer()
    opt.zero_grad()
    loss = ddp(tokens, POS, None, labels=labels).float().mean()
    loss.backward()
    ddp.finish_grad_sync()
    ok, _, _ = opt.step()
    assert ok
    return loss.item()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8).clone()


def snapshot(ddp, opt) -> dict:
    """Every tensor for_megatron could touch: its storage pointer and size, and its bytes."""
    tensors = {f"p.{n}": p for n, p in ddp.named_parameters()}
    for k, o in enumerate(opt.chained_optimizers):
        for i, (p, state) in enumerate(o.optimizer.state.items()):
            tensors[f"o{k}.{i}.param"] = p
            for key, v in state.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"o{k}.{i}.{key}"] = v
    return {n: (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes(), bits(t)) for n, t in tensors.items()}


def same_snapshot(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k][:2] == b[k][:2] and torch.equal(a[k][2], b[k][2]) for k in a)


# ---- (a) bitwise equivalence ----
@pytest.mark.parametrize("config", list(CONFIGS))
def test_offload_onload_between_steps_is_bitwise_identical(megatron_env, config):
    data = batches(3)
    ref_ddp, ref_opt = build(config)
    ref_losses = [train_step(ref_ddp, ref_opt, *b) for b in data]

    ddp, opt = build(config)
    mgr = for_megatron(ddp, opt)
    losses = []
    for b in data:
        losses.append(train_step(ddp, opt, *b))
        mgr.offload()
        assert all(s.device_bytes == 0 for s in mgr.state.values()), mgr.state
        mgr.onload()
    assert losses == ref_losses
    ref = dict(ref_ddp.named_parameters())
    for name, p in ddp.named_parameters():
        assert torch.equal(bits(p), bits(ref[name])), name
    assert mgr.group("optimizer_states").nbytes > 0  # Adam moments were picked up after the first step


# ---- (b) each group alone moves exactly its bytes ----
@pytest.mark.parametrize("config", ["distopt-bf16", "float16-opt"])
def test_each_group_alone_moves_its_bytes(megatron_env, config):
    ddp, opt = build(config)
    mgr = for_megatron(ddp, opt)
    train_step(ddp, opt, *batches(1)[0])
    mgr.offload("optimizer_states")  # picks up the Adam moments created by the step
    mgr.onload("optimizer_states")

    dist_opt = CONFIGS[config][0]
    bufs = ddp.buffers + ddp.expert_parallel_buffers
    grad_bytes = sum(b.grad_data.untyped_storage().nbytes() for b in bufs)
    assert mgr.group("grad_buffers").nbytes == grad_bytes
    if dist_opt:
        assert mgr.group("weights").nbytes == sum(b.param_data.untyped_storage().nbytes() for b in bufs)
    param_bytes = sum(p.numel() * p.element_size() for p in ddp.parameters())
    assert param_bytes <= mgr.group("weights").nbytes <= param_bytes + 64 * len(list(ddp.parameters()))
    main_bytes = sum(p.numel() * 4 for p in ddp.parameters())  # bf16 model: an fp32 copy of every weight
    assert main_bytes <= mgr.group("main_weights").nbytes <= main_bytes + 64 * len(list(ddp.parameters()))
    assert mgr.group("optimizer_states").nbytes >= 2 * main_bytes  # exp_avg + exp_avg_sq

    for name in ["grad_buffers", "weights", "main_weights", "optimizer_states"]:
        before = {n: s.device_bytes for n, s in mgr.state.items()}
        contents = [bits(t) for _, t in mgr.group(name).named_tensors]
        nbytes = mgr.group(name).nbytes
        assert before[name] == nbytes > 0
        mgr.offload(name)
        after = {n: s.device_bytes for n, s in mgr.state.items()}
        assert after[name] == 0
        assert {n: v for n, v in after.items() if n != name} == {n: v for n, v in before.items() if n != name}
        if name == "grad_buffers":
            assert all(b.grad_data.untyped_storage().nbytes() == 0 for b in bufs)
        if name == "weights" and dist_opt:
            assert all(b.param_data.untyped_storage().nbytes() == 0 for b in bufs)
        mgr.onload(name)
        assert mgr.state[name].device_bytes == nbytes
        restored = [bits(t) for _, t in mgr.group(name).named_tensors]
        if name == "grad_buffers":
            assert all(not r.any() for r in restored)  # re-zeroed
        else:
            assert all(torch.equal(a, b) for a, b in zip(contents, restored))


# ---- (c) weights alone are enough for a forward pass ----
@pytest.mark.parametrize("config", ["distopt-bf16", "fp32-opt"])
def test_onload_weights_alone_then_forward(megatron_env, config):
    ddp, opt = build(config)
    mgr = for_megatron(ddp, opt)
    data = batches(2)
    train_step(ddp, opt, *data[0])
    tokens, labels = data[1]
    with torch.no_grad():
        expected = ddp(tokens, POS, None, labels=labels).clone()
    mgr.offload()
    mgr.onload("weights")
    state = mgr.state
    assert state["weights"].state == "on_device"
    assert state["optimizer_states"].state == "on_host" and state["optimizer_states"].device_bytes == 0
    assert state["grad_buffers"].device_bytes == 0
    with torch.no_grad():
        got = ddp(tokens, POS, None, labels=labels)
    assert torch.equal(bits(got), bits(expected))
    names = [n for n, _ in mgr.named_weights().items()]
    from megatron.core.utils import unwrap_model
    assert names == [n for n, _ in unwrap_model(ddp).named_parameters()]
    mgr.onload()
    train_step(ddp, opt, *data[1])  # training resumes


# ---- (d) bad inputs raise and change nothing ----
def test_bad_inputs_raise_and_leave_tensors_unchanged(megatron_env):
    from megatron.core.utils import unwrap_model

    ddp, opt = build("distopt-bf16")
    other_ddp, other_opt = build("distopt-bf16")
    train_step(ddp, opt, *batches(1)[0])
    before = snapshot(ddp, opt)

    with pytest.raises(MemmgrIntegrationError, match=r"DistributedDataParallel\(config, ddp_config, module\)"):
        for_megatron(unwrap_model(ddp), opt)
    with pytest.raises(MemmgrIntegrationError, match=r"AdamW.*DistributedOptimizer"):
        for_megatron(ddp, torch.optim.AdamW(ddp.parameters()))
    with pytest.raises(MemmgrIntegrationError, match="not in the model chunks"):
        for_megatron(ddp, other_opt)
    with pytest.raises(MemmgrIntegrationError, match="not in the model chunks"):
        for_megatron(other_ddp, opt)
    assert issubclass(MemmgrIntegrationError, MemmgrError)
    assert same_snapshot(before, snapshot(ddp, opt))

    mgr = for_megatron(ddp, opt)
    mgr.offload("optimizer_states")
    mgr.onload("optimizer_states")
    before = snapshot(ddp, opt)
    states = mgr.state
    bucket_group = ddp.bucket_groups[0]
    bucket_group.grad_reduce_handle = object()  # a reduction in flight
    try:
        with pytest.raises(MemmgrStateError, match="gradient reduction is in flight"):
            mgr.offload()
        with pytest.raises(MemmgrStateError, match="finish_grad_sync"):
            mgr.offload("grad_buffers")
        with pytest.raises(MemmgrStateError):
            with mgr.phase("rollout"):
                pass
    finally:
        bucket_group.grad_reduce_handle = None
    bucket_group.param_gather_handle = object()
    try:
        with pytest.raises(MemmgrStateError, match="all-gather is in flight"):
            mgr.offload("weights")
    finally:
        bucket_group.param_gather_handle = None
    assert mgr.state == states
    assert same_snapshot(before, snapshot(ddp, opt))
    mgr.offload()  # and once nothing is in flight, it works
    mgr.onload()
    after = snapshot(ddp, opt)
    assert all(torch.equal(before[k][2], after[k][2]) for k in before)  # same contents (new allocations)
    assert isinstance(mgr.left_behind, dict) and all(isinstance(v, int) for v in mgr.left_behind.values())


def test_state_added_after_the_manager_is_picked_up_at_the_next_offload(megatron_env):
    ddp, opt = build("distopt-bf16")
    train_step(ddp, opt, *batches(1)[0])
    mgr = for_megatron(ddp, opt)
    mgr.offload()
    mgr.onload()
    held = mgr.group("optimizer_states").nbytes
    state = next(iter(opt.chained_optimizers[0].optimizer.state.values()))
    state["extra_new"] = torch.full((8,), 3.0)
    mgr.offload()
    assert state["extra_new"].untyped_storage().nbytes() == 0  # moved with the group, not left on the device
    assert mgr.group("optimizer_states").nbytes >= held + 8 * 4  # in a new bucket (aligned size)
    mgr.onload()
    assert torch.equal(state["extra_new"], torch.full((8,), 3.0))


def test_left_behind_is_refreshed_at_every_offload(megatron_env):
    ddp, opt = build("distopt-bf16")
    train_step(ddp, opt, *batches(1)[0])
    mgr = for_megatron(ddp, opt)
    before = sum(mgr.left_behind.values())
    ddp.module.register_buffer("added_after_the_manager", torch.zeros(1024))
    mgr.offload()
    assert sum(mgr.left_behind.values()) == before + 1024 * 4
    mgr.onload()


def test_budgeted_offload_frees_what_it_planned_and_restores_exactly(megatron_env):
    ddp, opt = build("distopt-bf16")
    train_step(ddp, opt, *batches(1)[0])
    mgr = for_megatron(ddp, opt)
    before = snapshot(ddp, opt)
    on_device = sum(s.device_bytes for s in mgr.state.values())
    plan = mgr.free(1 << 20)
    assert plan.planned_bytes >= 1 << 20
    assert on_device - sum(s.device_bytes for s in mgr.state.values()) == plan.planned_bytes
    plan.onload()
    after = snapshot(ddp, opt)
    assert before.keys() == after.keys() and all(torch.equal(before[k][2], after[k][2]) for k in before)


def test_bf16_grads_left_on_main_shards_are_dropped(megatron_env):
    ddp, opt = build("distopt-bf16", grad_reduce_in_fp32=False)
    mgr = for_megatron(ddp, opt)
    train_step(ddp, opt, *batches(1)[0])
    mains = [p for o in opt.chained_optimizers for g in o.optimizer.param_groups for p in g["params"]]
    held = sum(p.grad.numel() * 4 for p in mains if p.grad is not None)
    assert held > 0 and mgr.group("grads").device_bytes == held  # fp32 copies of the bf16 grads
    mgr.offload("grads")
    assert all(p.grad is None for p in mains) and mgr.group("grads").device_bytes == 0
    mgr.onload()
    train_step(ddp, opt, *batches(2)[1])


def test_model_without_optimizer_and_fp32_optimizer_groups(megatron_env):
    ddp, opt = build("fp32-opt")
    mgr = for_megatron([ddp], None)
    assert mgr.group("optimizer_states").nbytes == 0 and mgr.group("weights").nbytes > 0
    ddp, opt = build("fp32-opt")
    mgr = for_megatron(ddp, opt)
    assert mgr.group("main_weights").nbytes == 0  # FP32Optimizer updates the weights themselves


def test_grad_views_into_reallocated_grad_buffers_are_not_counted_twice(megatron_env):
    """Gradients on main-weight shards that view grad_data hold no memory of their own, also after an onload gave
    grad_data a new address (a stale address once made reports count them twice)."""
    ddp, opt = build("distopt-bf16")
    mgr = for_megatron(ddp, opt)
    for tokens, labels in batches(2):
        train_step(ddp, opt, tokens, labels)
        mgr.offload()
        mgr.onload()
    train_step(ddp, opt, *batches(1)[0])
    assert mgr.state["grads"].device_bytes == 0


# ---- the bench's Megatron workload reads the same state for_megatron manages ----
def test_bench_megatron_state_matches_the_groups_and_a_peer_round_trip_is_exact(megatron_env):
    from memmgr.tools.bench import PerTensorMethod, run_method
    from memmgr.tools.bench_megatron import MegatronBuiltinMethod, MegatronState

    ddp, opt = build("distopt-bf16")
    tokens, labels = batches(1)[0]
    train_step(ddp, opt, tokens, labels)
    state = MegatronState(ddp, opt)

    # a per-tensor peer first, as in the bench (before memmgr coalesces main weights and moments)
    before = snapshot(ddp, opt)
    result = run_method(PerTensorMethod(pinned_cache=False), 0, torch.device("cpu"), 2, lambda: state)
    assert result.error is None and result.intact
    assert result.copied_bytes == sum(t.numel() * t.element_size() for t in state.copied)
    after = snapshot(ddp, opt)
    assert before.keys() == after.keys() and all(torch.equal(before[k][2], after[k][2]) for k in before)

    mgr = mm.for_megatron(ddp, opt, pool=HostMemoryPool(pin=False))
    groups = mgr.state
    assert sum(t.numel() * t.element_size() for t in state.weights.values()) == groups["weights"].nbytes
    assert sum(t.numel() * t.element_size() for t in state.main_weights.values()) == groups["main_weights"].nbytes
    # the group also holds Adam's one-element step counters, which the bench's peers leave where they are
    in_group = {id(t): t for t in mgr.group("optimizer_states").tensors}
    moments = {id(t) for t in state.moments.values()}
    assert moments <= in_group.keys()
    assert all(t.numel() == 1 for i, t in in_group.items() if i not in moments)
    assert state.dropped_bytes == groups["grad_buffers"].nbytes
    mgr.close()
    reason = MegatronBuiltinMethod(state).available()
    assert reason is None or "megatron-core has no" in reason
