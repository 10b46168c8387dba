"""memmgr's verl integration (issue 32): the checkpoint engine against the real verl package (0.9.1), driven the way
verl's CheckpointEngineManager drives its engines, and VerlOffload as verl's trainer engine.to().

verl pins transformers<5.11, which the vLLM CPU environment cannot share, so CI installs verl's checkpoint-engine
modules without their dependencies into a folder of their own and names it in MEMMGR_VERL_SITE (.ci/run); the tests
that need verl run it in a subprocess with that folder on PYTHONPATH (tests/verl_run.py), so the rest of the suite
never sees verl's ray or tensordict. Without verl they skip, saying how to install it."""
from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys

import pytest
import torch

import memmgr
from memmgr.errors import MemmgrInputError, MemmgrIntegrationError

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
VERL_SITE = os.environ.get("MEMMGR_VERL_SITE", "")


def verl_env() -> dict[str, str]:
    """This process's environment with the repository and MEMMGR_VERL_SITE (if set) first on PYTHONPATH."""
    paths = [REPO] + ([VERL_SITE] if VERL_SITE else []) + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


HAS_VERL = importlib.machinery.PathFinder.find_spec("verl", ([VERL_SITE] if VERL_SITE else []) + sys.path) is not None
needs_verl = pytest.mark.skipif(not HAS_VERL, reason="verl is not installed: pip install verl==0.9.1, or install it "
                                                     "with --no-deps --target DIR and set MEMMGR_VERL_SITE=DIR "
                                                     "(see .ci/run)")


# ---- without verl (unit) ----
def test_importing_the_integration_needs_no_verl_and_a_missing_verl_names_the_install(monkeypatch):
    import memmgr.integrations.verl as mv

    assert "verl" not in sys.modules or HAS_VERL
    monkeypatch.setattr(mv, "_ENGINE_CLASS", None)
    monkeypatch.setitem(sys.modules, "verl", None)  # import verl raises ImportError
    monkeypatch.setitem(sys.modules, "verl.checkpoint_engine", None)
    with pytest.raises(mv.MemmgrVerlMissingError, match=r"pip install verl"):
        mv.engine_class()
    with pytest.raises(ImportError):
        mv.MemmgrCheckpointEngine  # noqa: B018
    assert issubclass(mv.MemmgrVerlMissingError, MemmgrIntegrationError)


def _trainer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    return model, opt


def test_verl_offload_does_what_verls_engine_to_does_and_restores_bit_for_bit():
    from memmgr.integrations.verl import VerlOffload

    model, opt = _trainer()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    states = {(i, k): v.clone() for i, s in enumerate(opt.state.values()) for k, v in s.items()}

    class Engine:  # a verl trainer engine's to(): replaced by install
        def to(self, device, model=True, optimizer=True, grad=True):
            raise AssertionError("verl's own to() ran")

    engine = VerlOffload(memmgr.for_module(model, opt)).install(Engine())
    offload = engine.to.__self__
    assert (offload.model_groups, offload.grad_groups, offload.optimizer_groups) == (
        ("weights",), ("grads",), ("optimizer_states",))
    engine.to("cpu", model=True, optimizer=False, grad=False)  # verl after a sync: the model only
    state = offload.manager.state
    assert state["weights"].device_bytes == 0 and state["grads"].state == "discarded"
    assert state["optimizer_states"].device_bytes > 0
    engine.to("cpu")
    assert all(s.device_bytes == 0 for s in offload.manager.state.values())
    engine.to("cuda", model=True, optimizer=False, grad=False)  # back where it was (the CPU here)
    assert offload.manager.state["optimizer_states"].device_bytes == 0
    engine.to("cuda")
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert all(torch.equal(v, states[i, k]) for i, s in enumerate(opt.state.values()) for k, v in s.items())
    with pytest.raises(MemmgrInputError, match="grad=True needs model=True"):
        engine.to("cpu", model=False)
    streamed = dict((n, t.clone()) for n, t in offload.per_tensor_params())
    assert streamed.keys() == weights.keys() and all(torch.equal(streamed[n], weights[n]) for n in weights)
    offload.manager.close()


def test_verl_offload_refuses_what_is_not_a_manager_or_an_engine():
    from memmgr.integrations.verl import VerlOffload

    with pytest.raises(MemmgrInputError, match="takes a memmgr.MemoryManager"):
        VerlOffload(torch.nn.Linear(2, 2))
    mgr = memmgr.for_module(torch.nn.Linear(2, 2))
    with pytest.raises(MemmgrIntegrationError, match="has no to"):
        VerlOffload(mgr).install(object())
    mgr.close()


def _run_with_verl(script: str) -> dict:
    """Runs a script of tests/ with verl's folder on its path; its last stdout line is its JSON result."""
    out = subprocess.run([sys.executable, os.path.join(HERE, script)], capture_output=True, text=True,
                         env=verl_env(), cwd=REPO, timeout=600)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-6000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- against verl (integration) ----
@pytest.fixture(scope="module")
def results():
    return _run_with_verl("verl_run.py")


@needs_verl
@pytest.mark.integration
def test_the_engine_registers_through_custom_backend_module_and_builds_verls_topology(results):
    assert results["class"] == "MemmgrCheckpointEngine" and results["is_checkpoint_engine"]
    actor, rollout = results["topology"]
    assert actor["rank"] == [0, -1] and rollout["rank"] == [1, 2, 3]
    assert set(actor["world_size"] + rollout["world_size"]) == {4}
    assert all(m["master_port"] == 1 for m in actor["master_metadata"] + rollout["master_metadata"])


@needs_verl
@pytest.mark.integration
def test_three_iterations_generate_like_transformers_and_train_bit_exact_to_the_loop_without_memmgr(results):
    managed, plain = results["managed"], results["plain"]
    assert managed["same_generation"] == plain["same_generation"] == [True] * 3
    assert managed["taken"] == plain["taken"] == [21] * 3  # every parameter of the tiny Llama, each sync
    assert managed["device_bytes_in_rollout"] == [0, 0, 0]  # the trainer held nothing while the rollout ran
    assert managed["losses"] == plain["losses"]
    assert results["bit_exact"]


@needs_verl
@pytest.mark.integration
def test_a_failed_sync_raises_on_the_trainer_naming_the_cause_and_the_next_sync_works(results):
    trainer_fails, rollout_fails = results["failures"]["trainer_fails"], results["failures"]["rollout_fails"]
    assert trainer_fails["trainer"] == "ValueError: the trainer's weight generator failed (on purpose)"
    assert rollout_fails["trainer"].startswith("MemmgrSyncError: weight sync failed on the receiver (rank 1")
    assert "stopped taking weights after 3 tensors" in rollout_fails["trainer"]
    assert trainer_fails["next_sync"] and rollout_fails["next_sync"]


# ---- VerlOffload in place of verl's per-tensor helpers (integration) ----
@pytest.fixture(scope="module")
def helpers():
    return _run_with_verl("verl_helpers_run.py")


@needs_verl
@pytest.mark.integration
def test_install_helpers_rebinds_verls_helpers_where_its_engines_import_them_and_remove_restores_them(helpers):
    families = ["megatron"] + (["fsdp"] if helpers["fsdp_imports"] else [])  # fsdp_utils needs peft and accelerate
    assert {k.split(".")[-1] for k in helpers["before"]} >= {
        f"{verb}_{f}_{what}" for f in families for verb, what in (("offload", "model_to_cpu"), ("load", "model_to_gpu"),
                                                                  ("offload", "optimizer"), ("load", "optimizer"))}
    assert set(helpers["before"].values()) == {"verl"}
    assert helpers["installed"].keys() == helpers["before"].keys() and set(helpers["installed"].values()) == {"memmgr"}
    assert helpers["late_import"] and all(helpers["late_import"].values())  # imported while installed: memmgr's
    for key in ("removed", "after_plain", "after_megatron"):
        assert helpers[key] == helpers["before"]


@needs_verl
@pytest.mark.integration
def test_verls_helpers_move_a_torch_trainer_through_memmgr_bit_exact_and_refuse_a_foreign_model(helpers):
    for family, steps in helpers["plain"].items():
        assert steps["model_off"] == {"weights": 0, "grads": 0, "optimizer_states": 2048}, family
        assert steps["grads_after_offload"] == "discarded"
        assert steps["all_off"] == {"weights": 0, "grads": 0, "optimizer_states": 0}
        assert steps["model_on"]["weights"] == 896 and steps["model_on"]["optimizer_states"] == 0
        assert steps["all_on"] == {"weights": 896, "grads": 0, "optimizer_states": 2048}
        assert steps["same_objects"] and steps["bit_exact"]
        assert steps["foreign_model"].startswith(f"MemmgrIntegrationError: verl's offload_{family}_model_to_cpu(")
        assert "not this manager's (first: weight (2, 2))" in steps["foreign_model"]
        assert "install_helpers() on its VerlOffload" in steps["foreign_model"]
        assert steps["foreign_optimizer"].startswith(f"MemmgrIntegrationError: verl's offload_{family}_optimizer(")


@needs_verl
@pytest.mark.integration
def test_verls_megatron_helpers_move_a_megatron_trainer_through_memmgr_bit_exact(helpers):
    m = helpers["megatron"]
    assert all(v == 0 for v in m["all_off"].values())
    assert m["all_on"]["weights"] > 0 and m["all_on"]["main_weights"] > 0 and m["all_on"]["grad_buffers"] > 0
    assert m["same_objects"] and m["bit_exact"]
    assert m["foreign_model"].startswith("MemmgrIntegrationError: verl's offload_megatron_model_to_cpu(models=...)")


def test_a_helper_called_with_no_verloffload_installed_names_the_fix():
    from memmgr.integrations.verl import offload

    with pytest.raises(MemmgrIntegrationError, match=r"load_fsdp_optimizer\(optimizer=...\).*no VerlOffload is "
                                                     r"installed.*install_helpers\(\)"):
        offload.STAND_INS["load_fsdp_optimizer"](torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1), 0)
