"""The memory ledger on CPU managers, with NVML absent or failing, and with a faked GPU + NVML."""
import json
import sys
import types
from collections import OrderedDict

import pytest
import torch
from click.testing import CliRunner

import memmgr
from memmgr import nvml
from memmgr.tools.cli import main
from memmgr.manager import GroupStatus
from memmgr.ledger import Ledger, gpu_categories, ledger_files, rank_path, read_records
from memmgr.tools.report import format_table, plot_timeline, render_logs, to_json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def fresh_nvml():
    nvml.reset()
    yield
    nvml.reset()
    memmgr.default_pool().trim()  # leave no host buffers behind for later tests


def _train_step(model, opt):
    model(torch.randn(8, 64)).sum().backward()
    opt.step()


def _run_cycle(tmp_path, rank=0):
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    opt = torch.optim.AdamW(model.parameters())
    mgr = memmgr.for_module(model, opt)
    ledger = Ledger(tmp_path / "ledger.jsonl", rank=rank)
    ledger.attach(mgr, "actor")
    ledger.snapshot("start")
    _train_step(model, opt)
    ledger.snapshot("after train step", phase="train")
    mgr.offload()
    mgr.onload()
    with mgr.phase("generate", keep=["weights"]):
        pass
    with mgr.weight_sync():
        pass
    ledger.close()
    mgr.close()  # returns its host buffers to the pool (trimmed after the test); snapshots "onload"
    return ledger, mgr


def test_ledger_records_cpu_managers(tmp_path):
    ledger, mgr = _run_cycle(tmp_path)
    labels = [r["label"] for r in ledger.records]
    assert labels[:2] == ["start", "after train step"]
    assert any(lab.startswith("offload") for lab in labels)
    assert "enter generate" in labels and "exit generate" in labels
    rec = next(r for r in ledger.records if r["label"] == "enter generate")
    assert rec["phase"] == "generate"
    groups = {g["name"]: g for g in rec["groups"]}
    assert set(groups) == {"weights", "grads", "optimizer_states"}
    assert groups["weights"]["state"] == "on_device"
    assert groups["optimizer_states"]["state"] == "on_host"
    assert groups["optimizer_states"]["host_bytes"] == groups["optimizer_states"]["nbytes"] > 0
    assert groups["grads"]["state"] == "discarded"
    for r in ledger.records:
        assert r["rank"] == 0
        if not torch.cuda.is_available():  # CPU managers on a GPU machine still see (and report) the GPUs
            assert r["gpus"] == [] and r["cuda"] != "ok"
        assert r["nvml"].startswith("unavailable") or r["nvml"] == "ok"
        assert r["host_memory"]["rss"] and r["host_memory"]["rss"] > 0
        assert isinstance(r["time"], float)
        assert 0 <= r["cost_s"] < 0.5


def test_snapshot_cost_small_on_cpu(tmp_path):
    ledger, _ = _run_cycle(tmp_path)
    ledger2 = Ledger()
    for i in range(20):
        ledger2.snapshot(f"s{i}")
    assert ledger2.mean_cost_s < 0.02
    assert ledger.total_cost_s == pytest.approx(sum(r["cost_s"] for r in ledger.records))


def test_jsonl_roundtrip_and_rank_files(tmp_path):
    ledger, _ = _run_cycle(tmp_path, rank=0)
    assert ledger.path == tmp_path / "ledger.rank0.jsonl"
    _run_cycle(tmp_path, rank=1)
    files = ledger_files(tmp_path / "ledger.jsonl")
    assert [f.name for f in files] == ["ledger.rank0.jsonl", "ledger.rank1.jsonl"]
    lines = (tmp_path / "ledger.rank0.jsonl").read_text().splitlines()
    assert all(json.loads(line)["rank"] == 0 for line in lines)
    records = read_records([tmp_path / "ledger.jsonl"])
    assert {r["rank"] for r in records} == {0, 1}
    assert len(records) == 2 * len(ledger.records)
    assert read_records([tmp_path]) == records
    assert read_records([str(tmp_path / "ledger.rank{rank}.jsonl")]) == records
    assert json.loads(to_json(records))["summary"]["ranks"] == [0, 1]


def test_rank_path_forms(tmp_path):
    assert rank_path("out/l.{rank}.jsonl", 3) == rank_path("out/l.3.jsonl", 0, multi_rank=False)
    assert rank_path("x.jsonl", 2).name == "x.rank2.jsonl"
    assert rank_path("x.rank5.jsonl", 2).name == "x.rank5.jsonl"
    assert rank_path("x.jsonl", 0, multi_rank=False).name == "x.jsonl"
    assert rank_path(tmp_path, 1) == tmp_path / "ledger.rank1.jsonl"


def test_truncated_line_is_skipped(tmp_path):
    ledger, _ = _run_cycle(tmp_path)
    with open(ledger.path, "a") as fh:
        fh.write('{"label": "cut sh')
    assert len(read_records([ledger.path])) == len(ledger.records)


def test_table_has_labels_and_deltas(tmp_path):
    ledger, _ = _run_cycle(tmp_path)
    table = format_table(ledger.records)
    for label in ("start", "after train step", "enter generate", "exit generate"):
        assert label in table
    assert "+" in table
    if not torch.cuda.is_available():  # with GPUs the table is per GPU and shows GPU columns instead
        assert "ΔRSS" in table
    assert "weights" in table and "optimizer_states" in table and "host" in table and "freed" in table
    assert "snapshot(s); each took" in table
    assert format_table([]) == "no snapshots"


def test_plot_is_png(tmp_path):
    ledger, _ = _run_cycle(tmp_path)
    out = plot_timeline(ledger.records, tmp_path / "t.png")
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_nvml_import_failure_is_reported(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    nvml.reset()
    assert nvml.available() is False
    assert "pynvml is not installed" in nvml.unavailable_reason()
    assert nvml.status().startswith("NVML unavailable:")
    assert nvml.device_memory(0) is None and nvml.process_memory(0) is None and nvml.pcie_link(0) is None
    assert nvml.nvml_index(0) is None and nvml.driver_version() is None
    rec = Ledger().snapshot("x")
    assert rec["nvml"].startswith("unavailable: pynvml is not installed")
    assert "error" not in rec


class _FakeNVMLError(Exception):
    pass


def _fake_pynvml(init_error=False, procs=None, fail=()):
    m = types.ModuleType("pynvml")
    m.NVMLError = _FakeNVMLError
    m.nvmlMemory_v2 = 2

    def maybe_fail(name):
        if name in fail:
            raise _FakeNVMLError(f"{name}: Not Supported")

    def init():
        if init_error:
            raise _FakeNVMLError("Driver Not Loaded")

    m.nvmlInit = init
    m.nvmlShutdown = lambda: None
    m.nvmlDeviceGetCount = lambda: 2
    m.nvmlDeviceGetHandleByIndex = lambda i: ("h", i)
    m.nvmlSystemGetDriverVersion = lambda: "580.00"
    m.nvmlSystemGetCudaDriverVersion = lambda: 13000
    m.nvmlDeviceGetName = lambda h: "Fake H100"
    m.nvmlDeviceGetUUID = lambda h: f"GPU-0000000{h[1]}-aaaa-bbbb-cccc-dddddddddddd"

    def mem(h, version=None):
        maybe_fail("mem")
        return types.SimpleNamespace(total=80 << 30, used=10 << 30, free=70 << 30, reserved=1 << 29)

    m.nvmlDeviceGetMemoryInfo = mem

    def running(h):
        maybe_fail("procs")
        return procs if procs is not None else []

    m.nvmlDeviceGetComputeRunningProcesses = running
    m.nvmlDeviceGetCurrPcieLinkGeneration = lambda h: 1
    m.nvmlDeviceGetCurrPcieLinkWidth = lambda h: 16
    m.nvmlDeviceGetMaxPcieLinkGeneration = lambda h: 5
    m.nvmlDeviceGetMaxPcieLinkWidth = lambda h: 16
    m.nvmlDeviceGetGpuMaxPcieLinkGeneration = lambda h: 5
    return m


def test_nvml_error_is_reported_not_raised(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(init_error=True))
    nvml.reset()
    assert not nvml.available()
    assert "Driver Not Loaded" in nvml.unavailable_reason()
    assert nvml.describe_device(0)["total"] is None
    rec = Ledger().snapshot("x")
    assert "Driver Not Loaded" in rec["nvml"]


def test_nvml_calls_failing_return_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(fail=("mem", "procs")))
    nvml.reset()
    assert nvml.available()
    assert nvml.device_memory(0) is None
    assert nvml.process_memory(0) is None
    assert nvml.pcie_link(0).max_gen == 5
    assert nvml.status() == "NVML: driver 580.00, 2 GPU(s)"
    assert nvml.cuda_driver_version() == "13.0"


def test_nvml_process_matching(monkeypatch):
    import os
    me = types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=3 << 30)
    other = types.SimpleNamespace(pid=1, usedGpuMemory=5 << 30)
    container = types.SimpleNamespace(pid=987654321, usedGpuMemory=2 << 30)
    for procs, want in (([me, other], (3 << 30, "pid")), ([container], (2 << 30, "only-process")),
                        ([container, other], (None, "not-visible")), ([], (None, "not-visible"))):
        monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(procs=procs))
        nvml.reset()
        pm = nvml.process_memory(0)
        assert (pm.nbytes, pm.source) == want


def test_nvml_index_respects_visible_devices(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no torch UUIDs: parse the variable
    nvml.reset()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert nvml.nvml_index(0) == 1 and nvml.nvml_index(1) == 0
    nvml.reset()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-00000001")
    assert nvml.nvml_index(0) == 1 and nvml.nvml_index(1) is None
    nvml.reset()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert nvml.nvml_index(1) == 1 and nvml.nvml_index(2) is None


def test_nvml_index_by_torch_uuid(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    nvml.reset()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(uuid="00000001-aaaa-bbbb-cccc-dddddddddddd"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # would say 0; the UUID says 1
    assert nvml.nvml_index(0) == 1


class _FakeGroup:
    def __init__(self, device, nbytes):
        self.device = torch.device(device)
        self.device_bytes = nbytes


class _FakeManager:
    """A manager whose weights sit on cuda:0 (only its surface is faked)."""

    pool = None
    left_behind = {"rotary cache": 1 << 20}

    @property
    def state(self):
        return OrderedDict(weights=GroupStatus("weights", "on_device", "copy", 2 << 30, 2 << 30, 0),
                           optimizer_states=GroupStatus("optimizer_states", "on_host", "copy", 4 << 30, 0, 4 << 30))

    def group(self, name):
        return _FakeGroup("cuda:0", 2 << 30) if name == "weights" else _FakeGroup("cuda:0", 0)


def _fake_gpu(monkeypatch, procs):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(procs=procs))
    nvml.reset()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i=None: 3 << 30)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i=None: 4 << 30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i=None: 6 << 30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid=None))
    monkeypatch.setattr(torch.cuda, "host_memory_stats", lambda: {"allocated_bytes.current": 0}, raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_gpu_categories_add_up(tmp_path, monkeypatch):
    import os
    _fake_gpu(monkeypatch, [types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=5 << 30)])
    ledger = Ledger(tmp_path / "l.jsonl")
    mgr = _FakeManager()  # the ledger holds managers weakly
    ledger.track(mgr, "actor")
    rec = ledger.snapshot("after offload", phase="generate")
    assert "error" not in rec, rec.get("error")
    (gpu,) = rec["gpus"]
    assert gpu["device"] == "cuda:0" and gpu["nvml_index"] == 0 and gpu["process_source"] == "pid"
    cats = gpu["categories"]
    assert cats == {"managed": 2 << 30, "other_allocated": 1 << 30, "cached": 1 << 30, "non_pytorch": 1 << 30}
    assert sum(cats.values()) == gpu["process"]
    assert gpu["total"] == 80 << 30 and gpu["used"] == 10 << 30 and gpu["max_allocated"] == 6 << 30
    table = format_table(ledger.records)
    assert "cuda:0" in table and "2.00*" in table  # managed is the largest holder
    assert "what holds cuda:0" in table and "outside PyTorch" in table and "rotary cache" in table
    png = plot_timeline(ledger.records * 3, tmp_path / "gpu.png")
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_same_address_managed_bytes_are_carved_out_of_non_pytorch_not_out_of_allocated():
    gib = 1 << 30
    gpu = {"allocated": 3 * gib, "reserved": 4 * gib, "managed": 5 * gib, "managed_same_address": 3 * gib,
           "process": 9 * gib}
    cats = gpu_categories(gpu)
    # 2 GiB managed inside PyTorch's allocated 3, 3 GiB mapped by memmgr itself inside the 5 outside PyTorch
    assert cats == {"managed": 5 * gib, "other_allocated": 1 * gib, "cached": 1 * gib, "non_pytorch": 2 * gib}
    assert sum(cats.values()) == gpu["process"]
    without = gpu_categories({k: v for k, v in gpu.items() if k != "managed_same_address"})
    assert without["managed"] == 3 * gib and without["non_pytorch"] == 5 * gib  # clamped to PyTorch's allocated


def test_a_groups_same_address_bytes_are_those_of_its_same_address_buckets_alone():
    from memmgr.ledger import _group_device_bytes

    bucket = lambda same, nb, dev: types.SimpleNamespace(same_address=same, device_bytes=nb, device=dev)  # noqa: E731
    group = types.SimpleNamespace(buckets=[bucket(True, 5, "cuda:0"), bucket(False, 7, "cuda:0"),
                                           bucket(True, 11, "cuda:1")])
    assert _group_device_bytes(group) == {"cuda:0": 12, "cuda:1": 11}
    assert _group_device_bytes(group, same_address_only=True) == {"cuda:0": 5, "cuda:1": 11}
    plain = types.SimpleNamespace(buckets=[bucket(False, 7, "cuda:0")])
    assert _group_device_bytes(plain, same_address_only=True) == {}


def test_gpu_process_not_visible(tmp_path, monkeypatch):
    _fake_gpu(monkeypatch, [types.SimpleNamespace(pid=1, usedGpuMemory=1),
                            types.SimpleNamespace(pid=2, usedGpuMemory=1)])
    rec = Ledger().snapshot("x")
    (gpu,) = rec["gpus"]
    assert gpu["process"] is None and gpu["process_source"] == "not-visible"
    assert gpu_categories(gpu)["non_pytorch"] is None
    assert "usage unknown" in format_table([rec])


def test_snapshot_never_raises():
    class Broken:
        pool = None

        @property
        def state(self):
            raise RuntimeError("boom")

    ledger = Ledger()
    rec = ledger.snapshot("x", managers=[Broken()])
    assert "boom" in rec["error"] and rec["cost_s"] >= 0
    assert "failed: RuntimeError: boom" in format_table(ledger.records)


def test_cli_report(tmp_path):
    ledger, _ = _run_cycle(tmp_path)
    runner = CliRunner()
    res = runner.invoke(main, ["report", str(ledger.path), "--plot", str(tmp_path / "cli.png")])
    assert res.exit_code == 0, res.output
    assert "enter generate" in res.output and "wrote" in res.output
    assert (tmp_path / "cli.png").read_bytes()[:8] == PNG_MAGIC
    res = runner.invoke(main, ["report", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["summary"]["snapshots"] == len(ledger.records)


def test_render_logs_empty(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    render_logs([str(empty)])
    assert "no snapshots" in capsys.readouterr().out
