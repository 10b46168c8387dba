"""Checkpoints of a megatron-core trainer under for_megatron (dist_checkpointing, CPU, world size 1): saved while the
groups are offloaded, loaded into a managed trainer (the Float16 optimizer once refused every later offload), a
model managed again after close(), and a fresh trainer resumed under a new manager: each trains exactly as the same
steps do without memmgr. The scenario runs in its own process (tests/megatron_checkpoint_run.py), so that reading
freed memory would fail this test instead of crashing pytest."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # issue 31: tests by cost (tests/conftest.py)

pytest.importorskip("megatron.core")

CONFIGS = ["float16-opt", "distopt-bf16"]


@pytest.fixture(scope="module")
def results():
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(here), here]))
    out = subprocess.run([sys.executable, os.path.join(here, "megatron_checkpoint_run.py"), *CONFIGS],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stderr[-4000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("config", CONFIGS)
def test_dist_checkpoint_saved_while_offloaded_trains_like_without_memmgr(results, config):
    r = results[config]
    assert r["managed"] == r["reference"] and r["managed_params"] == r["reference_params"]
    # saving brought back what it reads (the hooks of onload_for_state_dicts); the dropped groups stayed dropped
    assert r["saved_offloaded_states"]["optimizer_states"] == "on_device"
    assert r["saved_offloaded_states"]["grad_buffers"] == "discarded"


@pytest.mark.parametrize("config", CONFIGS)
def test_dist_checkpoint_loaded_into_a_managed_trainer_keeps_it_offloadable_and_the_groups_their_size(results, config):
    r = results[config]
    assert r["managed_reloaded"] == r["reference_reloaded"]
    for group, before in r["sizes_before_load"].items():
        # loaded state rebuilt over the buckets joins them; only new scalars (Adam's step on the CPU) are added
        assert before <= r["sizes_after_load"][group] <= before + 4096, (group, before, r["sizes_after_load"][group])
    # and all of it is managed: nothing of the loaded state stayed on the device through the offload
    assert all(v == 0 for v in r["device_bytes_offloaded_after_load"].values()), r["device_bytes_offloaded_after_load"]


@pytest.mark.parametrize("config", CONFIGS)
def test_model_managed_again_after_close_and_fresh_trainer_resumed_under_a_new_manager(results, config):
    r = results[config]
    assert r["remanaged_off_bytes"] == 0
    assert r["resumed_under_new_manager"] == r["reference_resumed"]
    assert r["resumed_params"] == r["reference_resumed_params"]
