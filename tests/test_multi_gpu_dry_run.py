"""benchmarks/multi_gpu.py's CPU dry run: every section under torchrun with 2 gloo ranks and tiny models, as the
GPU run does it on 2 GPUs (NCCL), so that the program works the first time there."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # issue 31: tests by cost (tests/conftest.py)

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def test_every_section_passes_on_two_gloo_ranks(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "benchmarks" / "multi_gpu.py"), "--cpu", "--tiny", "--out", str(tmp_path),
         "--sections", "comms,handover,export,train", "--bf16"],
        capture_output=True, text=True, env=env, timeout=240, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rank0 = json.loads((tmp_path / "multi_gpu.rank0.json").read_text())
    rank1 = json.loads((tmp_path / "multi_gpu.rank1.json").read_text())
    assert rank0["metadata"]["command"]
    r0, r1 = rank0["results"], rank1["results"]
    for name in ("comms", "handover", "export", "train"):
        assert r0[name]["pass"] and r1[name]["pass"], (name, r0[name], r1[name])
    # comms: gloo has no native suspend, so every group went through destroy + re-create, twice
    assert set(r0["comms"]["methods"].values()) == {"recreate"}
    assert all(row["releases"] == 2 for row in r0["comms"]["communicators"])
    assert (tmp_path / "ledger.rank0.jsonl").exists()
    # handover: the engine (a transformers model) on rank 1 holds the exported tensors bit for bit
    tiny = r1["handover"]["tiny"]
    assert tiny["engine"].startswith("transformers") and tiny["engine_equals_export"]
    assert tiny["engine_params_not_filled"] == [] and r0["handover"]["tiny"]["replicas_export_identical"]
    # every sync sends its plan (the layout of every bucket) before any weight moves
    assert all(sync["metadata_sent"] for sync in r0["handover"]["tiny"]["syncs"])
    # export: every layout against the TP=1 export
    for case in ("tp2", "pp2-vpp2", "ep2"):
        assert r0["export"][case]["pass"] and r0["export"][case]["differing"] == []
    # train: offload/onload between steps is bitwise invisible at TP=2 and PP=2
    for layout in ("tp2", "pp2"):
        t = r0["train"][layout]
        assert t["baseline_deterministic"] and t["params_differing"] == [] and t["all_groups_zero_after_offload"]


def test_data_parallel_trainers_each_feed_their_engine(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
         str(ROOT / "benchmarks" / "multi_gpu.py"), "--cpu", "--tiny", "--out", str(tmp_path),
         "--sections", "handover_dp", "--collective-timeout", "60", "--bf16"],
        capture_output=True, text=True, env=env, timeout=240, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = [json.loads((tmp_path / f"multi_gpu.rank{r}.json").read_text())["results"]["handover_dp"]
               for r in range(4)]
    assert [r["role"] for r in results] == ["trainer", "trainer", "engine", "engine"]
    assert [r["pair"] for r in results] == [0, 1, 0, 1]
    for engine in results[2:]:
        assert engine["equal"] and engine["not_filled"] == [] and engine["engine"].startswith("transformers")
    assert all(p["pass"] for p in results[0]["pairs"]) and len(results[0]["pairs"]) == 2
