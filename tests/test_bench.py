"""memmgr bench on the CPU path: every method round-trips the state intact, and the report compares honestly."""
import pytest
import torch

import memmgr

from memmgr.tools import bench, bench_methods

pytestmark = pytest.mark.integration  # issue 31: tests by cost (tests/conftest.py)


def test_every_cpu_method_round_trips_the_state_intact_and_frees_in_place():
    device = torch.device("cpu")
    for method in (bench.MemmgrMethod(), bench.PerTensorMethod(pinned_cache=False),
                   bench.PerTensorMethod(pinned_cache=True)):
        result = bench.run_method(method, 0.02 * bench.GB, device, 2, lambda: bench.make_state(0.02 * bench.GB, device))
        assert result.error is None, result.error
        assert result.intact, method.name
        assert len(result.offload_s) == len(result.onload_s) == 2


def test_per_tensor_peer_restores_tensors_that_share_one_storage():
    base = torch.arange(64, dtype=torch.float32)
    views = {"a": base[:32], "b": base[32:]}
    state = bench.TrainingState(weights=views, grads={}, main_weights={}, moments={})
    peer = bench.PerTensorMethod(pinned_cache=False)
    peer.offload(state)
    assert base.untyped_storage().nbytes() == 0
    peer.onload(state)
    assert torch.equal(base, torch.arange(64, dtype=torch.float32))


def test_per_tensor_peer_runs_again_on_a_new_state_whose_tensors_reuse_old_ids():
    peer = bench.PerTensorMethod(pinned_cache=False)
    device = torch.device("cpu")
    first = bench.run_method(peer, 0.01 * bench.GB, device, 1, lambda: bench.make_state(0.01 * bench.GB, device))
    assert first.error is None and first.intact
    bigger = bench.make_state(0.02 * bench.GB, device)
    # what id() reuse does after the first state is freed: an entry left under a new tensor's id, at another size
    peer.storage_bytes[id(bigger.copied[0])] = 4
    second = bench.run_method(peer, 0, device, 2, lambda: bigger)
    assert second.error is None, second.error
    assert second.intact


def _row(method, first, steady):
    return {"method": method, "first_offload_gbps": first, "steady_offload_gbps": steady}


def test_best_peer_ratio_takes_the_fastest_peer_for_each_cycle_kind():
    rows = [_row("memmgr", 48.0, 50.0), _row("memmgr_10000x64KiB", 40.0, 49.0), _row("slow_peer", 1.5, 1.6),
            _row("memmgr-same-address", 60.0, 60.0), _row("memmgr-same-address_10000x64KiB", 60.0, 60.0),
            _row("pinned_cache_peer", 2.0, 48.0), {"method": "skipped_peer", "skipped": "not installed"},
            dict(_row("failed_peer", 99.0, 99.0), error="RuntimeError")]
    vs = bench.against_best_peer(rows)
    assert vs["first_peer"] == "pinned_cache_peer" and vs["first"] == 24.0
    assert vs["steady_peer"] == "pinned_cache_peer" and abs(vs["steady"] - 50.0 / 48.0) < 1e-12
    assert bench.against_best_peer([_row("memmgr", 1.0, 1.0)]) is None


def test_report_names_why_the_megatron_workload_did_not_run():
    report = {"info": {"device": "CPU only", "date": "today"}, "peak_gbps": {"d2h": 10.0, "h2d": 10.0, "both": 20.0},
              "results": [], "megatron": {"skipped": "needs a CUDA GPU"}}
    text = bench.format_table(report)
    assert "## Real megatron-core GPT" in text and "not run: needs a CUDA GPU" in text


def test_checksum_sees_one_changed_byte_in_aligned_odd_sized_and_misaligned_tensors(monkeypatch):
    monkeypatch.setattr(bench_methods, "_CHECKSUM_CHUNK", 5)  # several chunks even for small tensors
    backing = torch.arange(103, dtype=torch.uint8)
    tensors = [torch.arange(40, dtype=torch.float32), backing[:99], backing[1:]]  # aligned, odd size, offset 1
    before = bench.checksum(tensors)
    for i, t in enumerate(tensors):
        raw = t.view(torch.uint8)
        raw[-2] += 1
        after = bench.checksum(tensors)
        assert after[i] != before[i]
        raw[-2] -= 1
    assert bench.checksum(tensors) == before


class _InstantMethod(bench.Method):
    """Moves nothing (the base class's no-op moves), so that only the bench's own pauses take time."""

    name = "instant"


def test_phase_gap_pauses_between_moves_without_being_timed():
    import time

    device = torch.device("cpu")
    t0 = time.perf_counter()
    result = bench.run_method(_InstantMethod(), 0.001 * bench.GB, device, 2,
                              lambda: bench.make_state(0.001 * bench.GB, device), phase_gap_s=0.15)
    elapsed = time.perf_counter() - t0
    assert result.error is None, result.error
    assert elapsed >= 4 * 0.15  # after each offload and each onload
    assert max(result.offload_s + result.onload_s) < 0.1


def test_phase_gap_defaults_to_half_a_second_on_a_gpu_and_none_on_the_cpu_path():
    import pytest

    from memmgr.errors import MemmgrInputError

    assert bench.phase_gap_for(torch.device("cuda", 0), None) == bench.DEFAULT_PHASE_GAP_S == 0.5
    assert bench.phase_gap_for(torch.device("cpu"), None) == 0.0
    assert bench.phase_gap_for(torch.device("cuda", 0), 0.0) == 0.0
    with pytest.raises(MemmgrInputError, match="negative"):
        bench.phase_gap_for(torch.device("cpu"), -1.0)
    report = {"info": {"device": "CPU only", "date": "today", "phase_gap_s": 0.5},
              "peak_gbps": {"d2h": 10.0, "h2d": 10.0, "both": 20.0}, "results": []}
    assert "pause after each offload and onload (the phases in between): 0.5 s" in bench.format_table(report)


def test_bench_conditions_default_to_engine_and_pause_on_a_gpu_and_pause_on_the_cpu():
    assert bench.conditions_for(torch.device("cuda", 0), None) == ["engine", "pause"]
    assert bench.conditions_for(torch.device("cpu"), None) == ["pause"]
    assert bench.conditions_for(torch.device("cuda", 0), ["pause", "pause"]) == ["pause"]


@pytest.mark.parametrize("requested, match", [(["engine"], "needs a GPU"), (["nap"], "unknown condition"),
                                              ([], "unknown condition")])
def test_bench_rejects_conditions_it_cannot_run_naming_the_choices(requested, match):
    with pytest.raises(memmgr.MemmgrInputError, match=match):
        bench.conditions_for(torch.device("cpu"), requested)


def test_bench_table_has_one_section_per_condition():
    row = {"method": "memmgr", "skipped": "not here"}
    report = {"info": {"device": "d", "date": "t", "phase_gap_s": 0.5}, "peak_gbps": {"d2h": 1, "h2d": 1, "both": 2},
              "results": [row], "by_condition": {"engine": [row], "pause": [row]}}
    text = bench.format_table(report)
    assert "## Megatron-shaped synthetic state, an engine in another process" in text
    assert "## Megatron-shaped synthetic state, an untimed pause" in text


def test_memmgr_records_the_paths_each_cycle_ran():
    device = torch.device("cpu")
    result = bench.run_method(bench.MemmgrMethod(), 0.01 * bench.GB, device, 3,
                              lambda: bench.make_state(0.01 * bench.GB, device))
    assert result.error is None, result.error
    assert len(result.paths) == 3
    assert set(result.paths[0]) == {"onload", "offload", "driver_settle_ms"}
    assert bench.run_method(_InstantMethod(), 0.001 * bench.GB, device, 2,
                            lambda: bench.make_state(0.001 * bench.GB, device)).paths == []


def test_bench_table_says_which_copy_paths_memmgr_ran():
    paths = [{"onload": "kernel (auto, probe: engines 26.1 GB/s, kernel 50.3 GB/s)", "offload": "engine",
              "driver_settle_ms": 31.0},
             {"onload": "kernel (auto, last probe)", "offload": "engine", "driver_settle_ms": 28.5},
             {"onload": "engine (auto, last probe)", "offload": "engine", "driver_settle_ms": 0.3}]
    rows = [{"method": "memmgr", "skipped": "x", "paths": paths}, {"method": "per_tensor", "skipped": "x"}]
    line = [x for x in bench._paths_line(rows) if x]
    assert line == ["memmgr, paths over 3 cycles: onload kernel ×2, engine ×1; offload engine ×3; driver settle "
                    "beside the offload's copies 0.3-31.0 ms"]
    assert bench._paths_line([{"method": "memmgr", "paths": [{"onload": None, "offload": None,
                                                                 "driver_settle_ms": None}]}]) == []


@pytest.mark.parametrize("peer_left_native_pools", [True, False])
def test_bench_command_ends_before_a_peers_teardown_can_abort_it(monkeypatch, tmp_path, peer_left_native_pools):
    from click.testing import CliRunner

    from memmgr.tools import cli

    ran, exits = [], []
    monkeypatch.setattr(bench, "run_bench", lambda **kwargs: ran.append(kwargs["out"]))
    monkeypatch.setattr(bench_methods, "_pools_released_only_in_a_region", peer_left_native_pools)

    def record_exit(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(cli.os, "_exit", record_exit)
    result = CliRunner().invoke(cli.main, ["bench", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert ran == [str(tmp_path)]
    assert exits == ([0] if peer_left_native_pools else [])


class _PooledMethod(bench.Method):
    """Builds its state in a pool of its own that keeps the memory after its run and reuses it for the next state,
    as torch_memory_saver's does; its moves release and map back that memory. ``gpu`` stands in for NVML."""

    name = "pooled"
    allocates_own_state = True

    def __init__(self, state_bytes: int):
        self.state_bytes = state_bytes
        self.gpu = 1000
        self.pooled = False

    def make_state(self, copied_bytes, device):
        if not self.pooled:
            self.gpu += self.state_bytes
            self.pooled = True
        return bench.make_state(copied_bytes, device)

    def offload(self, state):
        self.gpu -= self.state_bytes

    def onload(self, state):
        self.gpu += self.state_bytes


def test_a_method_whose_pool_keeps_memory_between_conditions_is_not_credited_with_it(monkeypatch):
    device = torch.device("cpu")
    method = _PooledMethod(state_bytes=500)
    monkeypatch.setattr(bench_methods, "process_gpu_bytes", lambda device: method.gpu)
    by_condition = {"engine": [], "pause": []}
    bench_methods.run_under_conditions(method, {"engine": lambda: None, "pause": None}, by_condition,
                                       {"d2h": 1.0, "h2d": 1.0}, 2, copied_bytes=0.001 * bench.GB, device=device,
                                       make=None, phase_gap_s=0.0)
    rows = [by_condition["engine"][0], by_condition["pause"][0]]
    assert [row["error"] for row in rows] == [None, None]
    assert [row["gpu_left_over_bytes"] for row in rows] == [0, 0]  # not -500 for the second condition
    assert [row["gpu_released_bytes"] for row in rows] == [500, 500]


def test_the_small_tensor_state_is_benched_with_same_address_buckets_too_when_that_method_runs(monkeypatch, tmp_path):
    """With memmgr-same-address among the methods (here standing in on the CPU, where it is not supported), the
    10,000 x 64 KiB state gets a row of its own for it beside memmgr's."""
    from memmgr.tools import bench
    from memmgr.tools.bench_methods import MemmgrMethod, MemmgrSameAddressMethod

    monkeypatch.setattr(MemmgrSameAddressMethod, "available", lambda self: None)
    monkeypatch.setattr(MemmgrSameAddressMethod, "build_manager", MemmgrMethod.build_manager)
    report = bench.run_bench(out=str(tmp_path), size_gb=0.13, cycles=1, methods=["memmgr", "memmgr-same-address"],
                             megatron=False)
    names = [r["method"] for r in report["results"]]
    assert "memmgr_10000x64KiB" in names and "memmgr-same-address_10000x64KiB" in names
    assert all(r.get("intact", True) for r in report["results"])
    # memmgr's at least five cycles, as its other rows: the steady figure is a median of four, not one cycle
    assert all(r["cycles"] == 5 for r in report["results"] if r["method"].endswith("10000x64KiB"))
