"""benchmarks/ipc_sync_speed.py --trainer megatron on the CPU (--cpu): the same program the GPU runs, with a tiny
Qwen3-shaped megatron-core trainer managed by memmgr and the engine in-process instead of behind CUDA IPC, so that
the GPU run works the first time there."""
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
PROGRAM = ROOT / "benchmarks" / "ipc_sync_speed.py"


def _run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(PROGRAM), *argv], capture_output=True, text=True, env=env,
                          timeout=180, cwd=str(cwd))


def test_megatron_trainer_syncs_the_export_bit_exact_from_device_and_host_copy(tmp_path):
    # small buckets: the export streams many buckets, as the 4B's does
    proc = _run("--trainer", "megatron", "--cpu", "--preset", "tiny-qwen3", "--reps", "2", "--bucket-mb", "0.05",
                "--out", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.startswith("ipc_sync megatron tiny-qwen3"), proc.stdout
    r = json.loads((tmp_path / "ipc_sync_speed.json").read_text())
    assert r["metadata"]["command"] and r["trainer"] == "megatron" and r["transport"].startswith("inproc")
    assert r["sync_api"].startswith("memmgr.sync.session.sync_weights")
    # every sync moved every exported byte, in several buckets, from where the weights were
    assert [run["source"] for run in r["runs"]["device"]] == ["device", "device"]
    assert [run["source"] for run in r["runs"]["host"]] == ["host copy", "host copy"]
    for run in r["runs"]["device"] + r["runs"]["host"]:
        assert run["nbytes"] == r["payload_bytes"] and run["buckets"] == r["export_buckets"] > 1
    assert r["weights_stayed_offloaded"] and all(run["weights_offloaded_after"] for run in r["runs"]["host"])
    # the engine holds the export bit for bit after each source (the weights changed in between), computes what a
    # transformers model loaded with the export computes, and what megatron computes up to bf16 rounding
    for source in ("device", "host"):
        ident = r["identity"][source]
        assert ident["bit_exact"] and ident["differing"] == [], (source, ident)
        assert ident["exported_tensors"] == r["exported_tensors"] == 3 + 2 * 11  # embed, norm, head; 11 per layer
        assert not [n for n in ident["engine_not_filled"] if "rotary_emb" not in n], ident["engine_not_filled"]
        assert ident["logits_equal_reference"], ident
        assert ident["argmax_agree_with_megatron"] == 1.0 and ident["logits_vs_megatron_relative"] < 0.05, ident
    assert r["identity"]["device"]["megatron_max_abs_logit"] != r["identity"]["host"]["megatron_max_abs_logit"]


def test_cpu_mode_is_refused_outside_the_megatron_trainer_and_the_tiny_presets(tmp_path):
    proc = _run("--cpu", "--preset", "tiny", "--out", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and "--trainer megatron" in proc.stderr
    proc = _run("--cpu", "--trainer", "megatron", "--preset", "4b", "--out", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and "tiny presets" in proc.stderr


def test_the_weight_source_path_batches_layer_groups_into_buckets_and_lands_bit_exact(tmp_path):
    # a bucket holds the whole tiny model: the WeightSource path sends it in one announce, as sync_weights does,
    # not one per layer group
    proc = _run("--trainer", "megatron", "--cpu", "--preset", "tiny-qwen3", "--reps", "1", "--bucket-mb", "1",
                "--via", "sync_weights,source", "--out", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    r = json.loads((tmp_path / "ipc_sync_speed.json").read_text())
    source, baseline = r["paths"]["source"], r["paths"]["sync_weights"]
    assert source["sync_api"].startswith("memmgr.sync.send_weight_source(memmgr.sync.engines.vllm.ExportWeightSource")
    for where in ("device", "host"):
        assert [run["buckets"] for run in source["runs"][where]] == [1]
        assert [run["buckets"] for run in baseline["runs"][where]] == [1]
        assert all(run["nbytes"] == r["payload_bytes"] for run in source["runs"][where])
        # the source path ran last: the engine holds what it sent
        assert r["identity"][where]["bit_exact"], r["identity"][where]
    assert source["moved_every_byte"] and source["weights_stayed_offloaded"]
