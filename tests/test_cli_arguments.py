"""Every command-line argument of ``memmgr bench``, ``report`` and ``doctor`` is checked before anything runs: a bad
one ends the command with a non-zero exit status and one ``Error:`` line naming the option, what it got and what to
give (allowed names listed, sizes against the memory there is), never a traceback. Driven through the real CLI:
click's CliRunner, and the installed ``memmgr`` script in a subprocess where stderr must hold no traceback."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import memmgr
from memmgr.errors import MemmgrInputError
from memmgr.ledger import Ledger
from memmgr.tools import bench
from memmgr.tools.cli import main

from conftest import write_cpu_ledger

GPU = torch.cuda.is_available()


def _host_total_gb() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / 1e9
    raise AssertionError("no MemTotal in /proc/meminfo")


def _fails_in_one_line(args: list[str], *needles: str) -> str:
    """Runs ``memmgr ARGS`` through CliRunner; asserts a non-zero exit, no exception but click's exit, and a last
    output line ``Error: ...`` holding every needle. Returns that line."""
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert lines and lines[-1].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def _our_error_is_the_only_line(args: list[str], *needles: str) -> str:
    """As ``_fails_in_one_line`` for the checks memmgr makes itself: exit status 2 and nothing printed but the line."""
    result = CliRunner().invoke(main, args)
    line = _fails_in_one_line(args, *needles)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [line], result.output
    return line


def _memmgr(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("memmgr")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "memmgr.tools.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)


def _assert_one_line_no_traceback(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---------------------------------------------------------------- bench
def test_bench_unknown_method_fails_listing_the_methods_it_knows(tmp_path):
    _our_error_is_the_only_line(["bench", "--out", str(tmp_path), "--methods", "foo"],
                                "--methods", "'foo'", "memmgr", "per_tensor_to_cpu_non_blocking", "megatron_builtin")
    assert not (tmp_path / "bench.md").exists()


def test_bench_unknown_method_fails_through_the_installed_script_without_a_traceback(tmp_path):
    proc = _memmgr("bench", "--out", str(tmp_path / "out"), "--methods", "memmgr,foo")
    _assert_one_line_no_traceback(proc, "--methods", "'foo'", "choose from memmgr")
    assert proc.returncode == 2


def test_bench_empty_method_name_fails(tmp_path):
    _our_error_is_the_only_line(["bench", "--out", str(tmp_path), "--methods", ""], "--methods", "empty name")
    _our_error_is_the_only_line(["bench", "--out", str(tmp_path), "--methods", "memmgr,,memmgr"],
                                "--methods", "empty name")


def test_bench_negative_size_fails(tmp_path):
    _our_error_is_the_only_line(["bench", "--out", str(tmp_path), "--size-gb", "-1"], "--size-gb", "positive")


def test_bench_zero_size_fails(tmp_path):
    _our_error_is_the_only_line(["bench", "--out", str(tmp_path), "--size-gb", "0"], "--size-gb", "positive")


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_bench_size_that_is_not_a_finite_number_fails(tmp_path, value):
    _our_error_is_the_only_line(["bench", "--out", str(tmp_path), "--size-gb", value], "--size-gb", "positive")


def test_bench_size_below_the_smallest_state_it_builds_fails_naming_the_smallest(tmp_path):
    smallest = bench.smallest_state_bytes() / 1e9
    line = _our_error_is_the_only_line(["bench", "--out", str(tmp_path), "--size-gb", "0.001"], "--size-gb 0.001",
                                       "smallest state")
    assert f"{smallest:.2f}" in line


def test_bench_size_beyond_the_memory_there_is_fails_at_once_naming_what_is_available(tmp_path):
    too_big = f"{_host_total_gb() * 3:.0f}"
    line = _our_error_is_the_only_line(["bench", "--out", str(tmp_path), "--size-gb", too_big],
                                       f"--size-gb {too_big}", "or less")
    assert ("GB is available" in line) or ("GB free" in line), line
    assert not (tmp_path / "bench.md").exists()


def test_bench_size_beyond_host_memory_fails_through_the_installed_script_without_a_traceback(tmp_path):
    proc = _memmgr("bench", "--out", str(tmp_path), "--size-gb", f"{_host_total_gb() * 3:.0f}")
    _assert_one_line_no_traceback(proc, "--size-gb", "or less")


@pytest.mark.skipif(GPU, reason="the CPU path's host-memory check")
def test_bench_size_check_on_the_cpu_path_counts_state_and_host_copy_against_available_memory(monkeypatch):
    monkeypatch.setattr(bench, "host_memory_available", lambda: int(10e9))
    with pytest.raises(MemmgrInputError, match=r"--size-gb 5: .*11\.4 GB; 10\.0 GB is available\. Give --size-gb "
                                               r"4\.37 or less"):
        bench.check_size(5, torch.device("cpu"))
    bench.check_size(4.3, torch.device("cpu"))  # fits: no error


def test_bench_zero_cycles_fails_at_once_without_writing_a_report(tmp_path):
    _fails_in_one_line(["bench", "--out", str(tmp_path), "--cycles", "0"], "--cycles")
    assert not (tmp_path / "bench.md").exists()
    with pytest.raises(MemmgrInputError, match="--cycles: 0 .* give 1 to 1000"):
        bench.run_bench(out=str(tmp_path), cycles=0)  # the library entry point checks too, before any work
    assert not (tmp_path / "bench.md").exists()


def test_bench_unknown_condition_fails_listing_engine_and_pause(tmp_path):
    _our_error_is_the_only_line(["bench", "--out", str(tmp_path), "--between", "foo"],
                                "--between", "'foo'", "engine, pause")


@pytest.mark.skipif(GPU, reason="needs a machine without a GPU")
def test_bench_engine_condition_without_a_gpu_fails_through_the_installed_script_without_a_traceback(tmp_path):
    proc = _memmgr("bench", "--out", str(tmp_path), "--between", "engine")
    _assert_one_line_no_traceback(proc, "--between", "'engine' needs a GPU", "use 'pause'")


@pytest.mark.skipif(GPU, reason="needs a machine without a GPU")
def test_bench_engine_condition_without_a_gpu_fails_in_one_line(tmp_path):
    _our_error_is_the_only_line(["bench", "--out", str(tmp_path), "--between", "pause,engine"],
                                "--between", "needs a GPU")


def test_bench_unwritable_out_fails_naming_it(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    _our_error_is_the_only_line(["bench", "--out", str(blocker / "sub")], f"--out {blocker / 'sub'}",
                                "cannot write there")
    _our_error_is_the_only_line(["bench", "--out", str(blocker)], f"--out {blocker}", "not a directory")


def test_bench_unwritable_out_fails_through_the_installed_script_without_a_traceback(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = _memmgr("bench", "--out", str(blocker / "sub"))
    _assert_one_line_no_traceback(proc, "--out", "cannot write there")


@pytest.mark.parametrize("value", ["inf", "nan", "7200"])
def test_bench_phase_gap_that_is_not_a_usable_pause_fails(tmp_path, value):
    _fails_in_one_line(["bench", "--out", str(tmp_path), "--phase-gap", value], "--phase-gap")


def test_bench_negative_phase_gap_fails(tmp_path):
    _fails_in_one_line(["bench", "--out", str(tmp_path), "--phase-gap", "-1"], "--phase-gap")


def test_bench_unknown_gpt_fails_listing_the_models(tmp_path):
    _fails_in_one_line(["bench", "--out", str(tmp_path), "--gpt", "7b"], "--gpt", "1.3b", "4b")


def test_bench_megatron_requested_where_it_cannot_run_fails_saying_why(tmp_path, monkeypatch):
    from memmgr.tools import bench_megatron

    monkeypatch.setattr(bench_megatron, "unavailable_reason", lambda: "needs a CUDA GPU")
    _our_error_is_the_only_line(["bench", "--out", str(tmp_path), "--megatron"],
                                "--megatron", "needs a CUDA GPU", "leave out --megatron")


def test_bench_arguments_that_are_fine_pass_the_checks(tmp_path):
    checked = bench.check_arguments(out=str(tmp_path / "new"), size_gb=0.2, cycles=1,
                                    methods=["memmgr", " memmgr", "per_tensor_cpu_pageable"], between=["pause"],
                                    phase_gap_s=0.0, gpt="4b", megatron=False)
    assert checked.methods == ["memmgr", "per_tensor_cpu_pageable"]
    assert checked.between == ["pause"] and checked.cycles == 1 and checked.phase_gap_s == 0.0
    assert (tmp_path / "new").is_dir() and not any((tmp_path / "new").iterdir())  # made, the probe file gone


def test_every_method_the_bench_can_run_is_a_name_methods_accepts():
    from memmgr.tools.bench_megatron import MegatronBuiltinMethod, MegatronMemmgrMethod

    names = bench.method_names()
    for method in bench.all_methods():
        assert method.name in names
    assert MegatronMemmgrMethod.name in names and MegatronBuiltinMethod.name in names


# ---------------------------------------------------------------- report
def _ledger(tmp_path) -> str:
    return write_cpu_ledger(tmp_path)


def test_report_on_an_empty_folder_fails_saying_no_ledger_is_there(tmp_path):
    _our_error_is_the_only_line(["report", str(tmp_path)], "LOGS", str(tmp_path), "no ledger")


def test_report_on_an_empty_folder_fails_through_the_installed_script_without_a_traceback(tmp_path):
    proc = _memmgr("report", str(tmp_path))
    _assert_one_line_no_traceback(proc, "LOGS", "matches no ledger")
    assert proc.returncode == 2 and proc.stdout == ""


def test_report_on_a_non_json_file_fails_saying_no_snapshots_were_found(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not a ledger\nnor is this\n")
    _our_error_is_the_only_line(["report", str(path)], "no memmgr snapshots found", "notes.txt")


def test_report_on_json_lines_that_are_not_snapshots_fails(tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text(json.dumps({"loss": 1.0}) + "\n")
    _our_error_is_the_only_line(["report", str(path)], "no memmgr snapshots found", "other.jsonl")


def test_report_on_an_empty_ledger_fails_saying_no_snapshots_were_found(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    _our_error_is_the_only_line(["report", str(path)], "no memmgr snapshots found")


def test_report_on_a_missing_path_fails_naming_it(tmp_path):
    _our_error_is_the_only_line(["report", str(tmp_path / "nope.jsonl")], "nope.jsonl", "no such file")


def test_report_fails_when_one_of_several_paths_holds_no_snapshot_naming_that_path(tmp_path):
    good = _ledger(tmp_path)
    empty = tmp_path / "other" / "empty.jsonl"
    empty.parent.mkdir()
    empty.write_text("")
    _our_error_is_the_only_line(["report", good, str(empty)], "empty.jsonl")


def test_report_plot_that_is_not_a_png_path_fails_before_reading(tmp_path):
    good = _ledger(tmp_path)
    _our_error_is_the_only_line(["report", good, "--plot", str(tmp_path / "t.jpg")], "--plot", ".png")
    _our_error_is_the_only_line(["report", good, "--plot", str(tmp_path)], "--plot", ".png")


def test_report_plot_in_an_unwritable_place_fails(tmp_path):
    good = _ledger(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    _our_error_is_the_only_line(["report", good, "--plot", str(blocker / "t.png")], "--plot", "cannot write there")


def test_report_of_a_real_ledger_still_renders_and_plots(tmp_path):
    good = _ledger(tmp_path)
    result = CliRunner().invoke(main, ["report", good, "--plot", str(tmp_path / "p" / "t.png")])
    assert result.exit_code == 0, result.output
    assert "start" in result.output and (tmp_path / "p" / "t.png").exists()


def test_report_of_a_ledger_given_as_a_rank_pattern_renders(tmp_path):
    model = torch.nn.Linear(4, 4)
    mgr = memmgr.for_module(model)
    ledger = Ledger(tmp_path / "run.rank{rank}.jsonl", rank=0)
    ledger.attach(mgr, "actor")
    ledger.snapshot("start")
    ledger.close()
    mgr.close()
    result = CliRunner().invoke(main, ["report", str(tmp_path / "run.rank{rank}.jsonl")])
    assert result.exit_code == 0, result.output
    assert "start" in result.output


# ---------------------------------------------------------------- doctor
def test_doctor_unknown_option_fails_in_one_line():
    _fails_in_one_line(["doctor", "--fast"], "--fast")


def test_doctor_module_entry_point_refuses_unknown_arguments():
    proc = subprocess.run([sys.executable, "-m", "memmgr.tools.doctor", "--fast"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["Error: unknown argument(s) --fast; python -m memmgr.tools.doctor "
                                                "takes only --quick"]


def test_doctor_quick_argument_must_be_a_bool():
    from memmgr.tools.doctor import run_doctor

    with pytest.raises(MemmgrInputError, match="quick must be True or False"):
        run_doctor(quick="yes")  # type: ignore[arg-type]


def test_cli_module_is_runnable_without_the_script(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "memmgr.tools.cli", "report", str(tmp_path)], capture_output=True,
                          text=True, timeout=120, cwd=os.getcwd())
    _assert_one_line_no_traceback(proc, "LOGS")
