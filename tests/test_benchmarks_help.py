"""Every program under benchmarks/ imports and parses its arguments without a GPU, and its --help says what it
measures and what it writes; the runner has a suite for every program."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
# helper modules the programs import, not programs (lab.py: shared by all; vllm_ipc_receiver.py: ipc_sync_speed.py's
# vLLM IPC path, imported in its engine process too)
HELPERS = ("lab.py", "vllm_ipc_receiver.py")
PROGRAMS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name not in HELPERS)


def _run(*argv: str) -> subprocess.CompletedProcess:
    # the CPU path, also on a GPU machine; benchmarks/ on the path as `python benchmarks/X.py` puts it there
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(BENCHMARKS)]), CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


# One child process runs every program as __main__ with --help (torch is imported once, not once per program) and
# reports each one's exit status and output as JSON.
_DRIVER = """
import contextlib, io, json, runpy, sys
out = {}
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    buf, err, code = io.StringIO(), io.StringIO(), None
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as exc:
            code = exc.code or 0
        except BaseException as exc:
            code, err = 1, io.StringIO(repr(exc))
    out[path] = {"rc": code, "stdout": buf.getvalue(), "stderr": err.getvalue()}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def helps() -> dict[str, dict]:
    proc = _run("-c", _DRIVER, *(str(BENCHMARKS / name) for name in PROGRAMS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    reported = json.loads(proc.stdout.strip().splitlines()[-1])
    return {Path(path).name: r for path, r in reported.items()}


def description(help_text: str) -> str:
    """argparse's help: the usage block, a blank line, the description, a blank line, the options."""
    blocks = help_text.split("\n\n")
    body = [b for b in blocks[1:] if not b.lstrip().startswith(("options:", "positional arguments:"))]
    return "\n\n".join(body).strip()


def test_every_benchmark_program_is_found():
    assert {"gpu_megatron.py", "gpu_core.py", "run.py", "rl_cycle.py"} <= set(PROGRAMS)


@pytest.mark.parametrize("name", PROGRAMS)
def test_help_runs_without_gpu_and_describes_measure_and_outputs(helps, name):
    proc = helps[name]
    assert proc["rc"] == 0, f"{name} --help failed:\n{proc['stderr'][-3000:]}"
    text = description(proc["stdout"])
    assert len(text) >= 80, f"{name} --help has no description of what it measures:\n{proc['stdout']}"
    assert "DIR" in text or "stdout" in text, f"{name} --help does not say what it writes:\n{text}"


def test_runner_has_a_suite_for_every_program():
    proc = _run(str(BENCHMARKS / "run.py"), "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    unrun = [p for p in PROGRAMS if p != "run.py" and f"benchmarks/{p}" not in proc.stdout]
    assert not unrun, f"no suite of benchmarks/run.py runs {unrun}"


def test_the_runner_keeps_only_the_steps_memmgr_steps_names(monkeypatch):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import run
    finally:
        sys.path.remove(str(BENCHMARKS))
    monkeypatch.delenv("MEMMGR_STEPS", raising=False)
    assert run.wanted("soak", "soak") and run.wanted("same-address", "bench")
    monkeypatch.setenv("MEMMGR_STEPS", "ipc_source_4b, same-address/soak")
    assert run.wanted("ipc-sync-source", "ipc_source_4b") and run.wanted("same-address", "soak")
    assert not run.wanted("soak", "soak") and not run.wanted("same-address", "bench")
