"""benchmarks/lab.py, the programs' shared helpers: the toy models keep the sizes of the committed runs, the timers
and the JSON writer work on the CPU."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lab  # noqa: E402


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Each program's default configuration and the parameter count its own copy of the model had when the committed
# results were made (built on the meta device: no memory, no time).
@pytest.mark.parametrize("program, kwargs, expected", [
    ("gpu_core.py", dict(vocab=32000, hidden=2048, layers=20, heads=16, final_norm=False), 1_138_237_440),
    ("gpu_beyond.py", dict(vocab=32000, hidden=2048, layers=24, heads=16, block="sdpa"), 1_339_674_624),
    ("gpu_report.py", dict(vocab=32000, hidden=1536, layers=16, heads=12, causal=True), 551_611_392),
    ("rl_cycle.py", dict(vocab=32000, hidden=2048, layers=16, heads=16, max_seq=1024, block="sdpa"), 938_905_600),
])
def test_toy_gpt_has_the_size_of_each_programs_committed_model(program, kwargs, expected):
    with torch.device("meta"):
        assert n_params(lab.ToyGPT(**kwargs)) == expected, program


@pytest.mark.parametrize("kwargs", [dict(), dict(causal=True), dict(block="sdpa", max_seq=16),
                                    dict(final_norm=False)])
def test_toy_gpt_forward_gives_logits_per_token(kwargs):
    torch.manual_seed(0)
    model = lab.ToyGPT(vocab=50, hidden=32, layers=2, heads=4, **kwargs)
    logits = model(torch.randint(0, 50, (2, 16)))
    assert logits.shape == (2, 16, 50) and torch.isfinite(logits).all()


def test_causal_block_output_ignores_later_tokens():
    torch.manual_seed(0)
    for model in (lab.ToyGPT(vocab=50, hidden=32, layers=2, heads=4, causal=True),
                  lab.ToyGPT(vocab=50, hidden=32, layers=2, heads=4, block="sdpa")):
        a = torch.randint(0, 50, (1, 8))
        b = a.clone()
        b[0, -1] = (a[0, -1] + 1) % 50
        with torch.no_grad():
            assert torch.allclose(model(a)[0, :-1], model(b)[0, :-1])


def test_unknown_block_kind_is_refused():
    with pytest.raises(ValueError, match="block"):
        lab.ToyGPT(vocab=10, hidden=8, layers=1, heads=2, block="rnn")


def test_timed_measures_the_call_on_the_cpu():
    import time

    assert lab.timed(lambda: time.sleep(0.02), torch.device("cpu")) >= 0.02


def test_write_json_records_metadata_and_non_json_values(tmp_path):
    meta = lab.metadata(["benchmarks/x.py", "--out", "d"])
    path = lab.write_json(tmp_path / "sub" / "r.json", {"meta": meta, "dtype": torch.float32})
    data = json.loads(path.read_text())
    assert data["dtype"] == "torch.float32"
    assert data["meta"]["command"] == "python benchmarks/x.py --out d"
    assert data["meta"]["device"] == ("cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0))
    assert len(data["meta"]["source_digest"]) == 16 and data["meta"]["date"].endswith("UTC")
    assert not list(tmp_path.glob("sub/*.tmp"))


def test_git_commit_prefers_the_commit_given_to_the_runner(monkeypatch):
    monkeypatch.setenv("MEMMGR_GIT_COMMIT", "0123abc")
    assert lab.git_commit() == "0123abc"


def test_bits_equal_compares_bytes_shape_and_dtype():
    a = torch.tensor([0.0, 1.0])
    assert lab.bits_equal(a, a.clone())
    assert not lab.bits_equal(a, torch.tensor([-0.0, 1.0]))  # equal as numbers, not as bits
    assert not lab.bits_equal(a, a.to(torch.float64))
    assert not lab.bits_equal(a, a.reshape(2, 1))


def test_onload_timeline_recorder_passes_an_onload_everything_the_transaction_gives_it():
    import onload_timeline

    import memmgr
    from memmgr.flat_tensors import FlatTensors
    from memmgr.transfer import copy_stream

    weights = {"w": torch.arange(64, dtype=torch.float32)}
    grads = {"g": torch.ones(32)}
    mgr = memmgr.MemoryManager()
    mgr.add_group("weights", weights)
    mgr.add_group("grads", grads, policy="discard")
    mgr.offload()
    with onload_timeline._Recorder(FlatTensors, copy_stream) as recorder:
        recorder.t0 = 0.0
        mgr.onload()  # the transaction passes zero_after to every unit's onload
    assert FlatTensors.onload is recorder._onload  # restored
    assert torch.equal(weights["w"], torch.arange(64, dtype=torch.float32)) and not grads["g"].any()
    mgr.close()


def test_the_runners_copy_shapes_suite_runs_every_shape_memmgr_chooses_from():
    import run

    from memmgr.copy_shape import BULK_CANDIDATES, CANDIDATES

    assert run.COPY_SHAPES == tuple(s.label for s in CANDIDATES + BULK_CANDIDATES)
