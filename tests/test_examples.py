"""The programs in examples/ run as written (a subprocess each, as a user runs them) and pass their own checks: the loop
with memmgr ends with weights and optimizer state identical to the same loop without memmgr, for each optimizer
option; and a difference is reported with exit status 1. GPU variants are marked ``gpu`` and need CUDA."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")
CUDA = torch.cuda.is_available()


def has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


needs_megatron = pytest.mark.skipif(not has("megatron.core"), reason="megatron-core is not installed")
needs_vllm = pytest.mark.skipif(not (has("vllm") and has("transformers")), reason="vLLM is not installed")
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]


def run_example(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def assert_success(proc: subprocess.CompletedProcess, name: str) -> str:
    assert proc.returncode == 0, f"{name} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith(f"OK {name}:")]
    assert len(lines) == 1, f"no success line from {name}:\n{proc.stdout[-3000:]}"
    return lines[0]


def device_params(cases: list[tuple]) -> list:
    return [pytest.param("cpu", *c, id=f"cpu-{'-'.join(map(str, c))}") for c in cases] + \
        [pytest.param("cuda", *c, id=f"cuda-{'-'.join(map(str, c))}", marks=gpu) for c in cases]


# ---- plain torch ----
@pytest.mark.parametrize("device,optimizer", device_params([("adam",), ("adamw",), ("sgd",)]))
def test_plain_torch_loop_matches_the_loop_without_memmgr_bit_for_bit(device, optimizer):
    line = assert_success(run_example("plain_torch_loop.py", "--device", device, "--iterations", "4",
                                      "--optimizer", optimizer), "plain_torch_loop")
    assert f"4 iterations on {device} with {optimizer}, resumed at iteration 2" in line
    assert "identical to the loop without memmgr" in line


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_plain_torch_loop_with_same_address_keeps_every_parameter_at_its_address_and_matches_bit_for_bit():
    line = assert_success(run_example("plain_torch_loop.py", "--device", "cuda", "--iterations", "4",
                                      "--same-address"), "plain_torch_loop")
    assert "identical to the loop without memmgr" in line and "every parameter at its address" in line


def test_same_address_on_the_cpu_is_refused_by_the_example_with_the_reason():
    proc = run_example("plain_torch_loop.py", "--device", "cpu", "--same-address")
    assert proc.returncode == 2 and "--same-address needs --device cuda" in proc.stderr


def test_plain_torch_loop_runs_with_its_defaults():
    line = assert_success(run_example("plain_torch_loop.py", "--device", "cpu"), "plain_torch_loop")
    assert "10 iterations on cpu with adam, resumed at iteration 5" in line


def test_plain_torch_loop_reports_a_difference_in_the_optimizer_state_and_fails():
    proc = run_example("plain_torch_loop.py", "--device", "cpu", "--iterations", "2", "--optimizer", "sgd",
                       "--corrupt")
    assert proc.returncode == 1
    assert "FAILED: with memmgr the final optimizer state differs" in proc.stderr
    assert "momentum_buffer" in proc.stderr
    assert "OK plain_torch_loop" not in proc.stdout


# ---- megatron-core ----
@needs_megatron
@pytest.mark.parametrize("device,optimizer", device_params([("distributed",), ("float16",)]))
def test_megatron_loop_matches_the_loop_without_memmgr_bit_for_bit(device, optimizer):
    line = assert_success(run_example("megatron_loop.py", "--device", device, "--iterations", "3",
                                      "--optimizer", optimizer), "megatron_loop")
    assert f"3 iterations on {device} with the {optimizer} optimizer, resumed at iteration 1" in line
    assert "identical to the loop without memmgr" in line


@needs_megatron
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_megatron_loop_with_same_address_keeps_every_parameter_at_its_address_and_matches_bit_for_bit():
    line = assert_success(run_example("megatron_loop.py", "--device", "cuda", "--iterations", "3", "--same-address"),
                          "megatron_loop")
    assert "identical to the loop without memmgr" in line and "every parameter at its address" in line


@needs_megatron
def test_megatron_loop_reports_a_difference_in_the_optimizer_state_and_fails():
    proc = run_example("megatron_loop.py", "--device", "cpu", "--iterations", "2", "--corrupt")
    assert proc.returncode == 1
    assert "FAILED: with memmgr 1 of" in proc.stderr and "exp_avg_sq" in proc.stderr
    assert "OK megatron_loop" not in proc.stdout


# ---- vLLM ----
@needs_vllm
@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=gpu)])
def test_vllm_loop_generates_like_transformers_and_matches_the_loop_without_memmgr(device):
    line = assert_success(run_example("vllm_loop.py", "--device", device, "--iterations", "2"), "vllm_loop")
    assert f"2 iterations on {device} (trainer) with a vLLM engine" in line
    assert "equal to transformers' after every sync" in line


# ---- verl ----
VERL_SITE = os.environ.get("MEMMGR_VERL_SITE", "")  # verl installed with --no-deps --target (.ci/run)
needs_verl = pytest.mark.skipif(
    importlib.machinery.PathFinder.find_spec("verl", ([VERL_SITE] if VERL_SITE else []) + sys.path) is None
    or not has("transformers"), reason="verl is not installed (pip install verl==0.9.1, or MEMMGR_VERL_SITE: .ci/run)")


@needs_verl
def test_verl_loop_generates_like_transformers_and_matches_the_loop_without_memmgr():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO] + ([VERL_SITE] if VERL_SITE else []) + [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "verl_loop.py"), "--device", "cpu"], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=env)
    line = assert_success(proc, "verl_loop")
    assert "3 iterations on cpu (trainer) through verl's checkpoint-engine interface (MemmgrCheckpointEngine" in line
    assert "identical to the loop without memmgr" in line


# ---- Ray ----
needs_ray = pytest.mark.skipif(not has("ray"), reason="ray is not installed (pip install ray==2.60.0: the "
                                                      "test-vllm-cpu extra installs it)")


@needs_ray
@needs_megatron
@needs_vllm
def test_ray_loop_generates_like_transformers_and_matches_the_loop_without_memmgr():
    line = assert_success(run_example("ray_loop.py"), "ray_loop")  # its default: 3 iterations
    assert "3 iterations, 2 trainer actors (megatron-core TP=2, gloo) and a vLLM engine actor" in line
    assert "equal to transformers' after every sync" in line
    assert "identical to the loop without memmgr" in line
