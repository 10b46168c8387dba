"""The copy-path settings: arguments and environment variables are validated with errors that say the fix, and
backend_info reports which paths exist."""
import pytest

import memmgr
from memmgr.transfer import (AUTO_PROBE_BYTES, CopyPolicy, copy_paths_status, kernels_available, resolve_copy_path,
                             resolve_kernel_blocks)


def test_copy_path_comes_from_the_argument_then_the_environment_then_auto(monkeypatch):
    monkeypatch.delenv("MEMMGR_COPY_PATH", raising=False)
    assert resolve_copy_path() == "auto"
    monkeypatch.setenv("MEMMGR_COPY_PATH", "Kernel")
    assert resolve_copy_path() == "kernel"
    assert resolve_copy_path("engine") == "engine"


def test_unknown_copy_path_in_the_environment_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv("MEMMGR_COPY_PATH", "dma")
    with pytest.raises(memmgr.MemmgrInputError, match=r"MEMMGR_COPY_PATH.*auto, engine, kernel;"):
        resolve_copy_path()
    with pytest.raises(memmgr.MemmgrInputError, match="path argument"):
        resolve_copy_path("fast")


def test_split_copy_path_is_refused_with_the_allowed_paths(monkeypatch):
    monkeypatch.setenv("MEMMGR_COPY_PATH", "split")
    with pytest.raises(memmgr.MemmgrInputError, match=r"'split'.*MEMMGR_COPY_PATH.*auto, engine, kernel;"):
        resolve_copy_path()
    with pytest.raises(memmgr.MemmgrInputError, match=r"'split'.*path argument.*auto, engine, kernel;"):
        resolve_copy_path("split")


def test_kernel_blocks_come_from_the_argument_then_the_environment_and_are_validated(monkeypatch):
    monkeypatch.delenv("MEMMGR_COPY_KERNEL_BLOCKS", raising=False)
    assert resolve_kernel_blocks() == 0
    monkeypatch.setenv("MEMMGR_COPY_KERNEL_BLOCKS", "66")
    assert resolve_kernel_blocks() == 66
    assert resolve_kernel_blocks(33) == 33
    for bad in ("many", "-2"):
        monkeypatch.setenv("MEMMGR_COPY_KERNEL_BLOCKS", bad)
        with pytest.raises(memmgr.MemmgrInputError, match="MEMMGR_COPY_KERNEL_BLOCKS.*grid size"):
            resolve_kernel_blocks()
    for bad in (-1, 2.5, True, "66"):
        with pytest.raises(memmgr.MemmgrInputError, match="kernel_blocks must be a whole number"):
            resolve_kernel_blocks(bad)



def test_the_auto_probe_size_comes_from_the_environment_in_mib_with_the_moves_policy_and_is_validated(monkeypatch):
    monkeypatch.delenv("MEMMGR_COPY_PROBE_MB", raising=False)
    assert CopyPolicy.from_env().probe(4 << 30) == AUTO_PROBE_BYTES == 64 << 20
    monkeypatch.setenv("MEMMGR_COPY_PROBE_MB", "16")
    policy = CopyPolicy.from_env()
    assert policy.probe(4 << 30) == policy.probe(100 << 20) == 16 << 20  # a size asked for is taken as it is
    assert policy.with_overrides("kernel").probe(4 << 30) == 16 << 20  # an override of the path keeps the probe
    for bad in ("0", "-4", "1.5", "big"):
        monkeypatch.setenv("MEMMGR_COPY_PROBE_MB", bad)
        with pytest.raises(memmgr.MemmgrInputError, match="MEMMGR_COPY_PROBE_MB.*in MiB"):
            CopyPolicy.from_env()
    with pytest.raises(memmgr.MemmgrInputError, match="probe_bytes must be a whole number"):
        CopyPolicy("auto", probe_bytes=-1)

def test_the_default_auto_probe_is_a_small_share_of_a_small_copy_and_never_below_its_floor():
    from memmgr.transfer import AUTO_PROBE_FLOOR_BYTES, AUTO_PROBE_SHARE

    policy = CopyPolicy("auto")
    assert policy.probe(2 << 30) == AUTO_PROBE_BYTES  # large copies: the full probe
    small = 655_360_000  # 10,000 x 64 KiB in one bucket
    assert policy.probe(small) <= small // AUTO_PROBE_SHARE and policy.probe(small) % 4096 == 0
    assert policy.probe(small) > AUTO_PROBE_FLOOR_BYTES
    assert policy.probe(128 << 20) == AUTO_PROBE_FLOOR_BYTES


def test_backend_info_reports_the_copy_paths_that_can_run():
    info = memmgr.backend_info()
    status = copy_paths_status()
    assert list(info.copy_paths) == status["available"]
    assert ("kernel" in info.copy_paths) == kernels_available()
    assert "copy paths" in info.describe()
