"""``same_address=True`` and the same-address backing where no GPU can hold it: refused up front with
MemmgrInputError naming the option and the fix, and the default paths are untouched. The GPU behaviour is in
tests/test_vmm_gpu.py."""
from __future__ import annotations

import pytest
import torch

import memmgr
from memmgr._native import native_module
from memmgr.same_address import SameAddressBuffer, require_same_address, same_address_support

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")


@no_cuda
def test_support_says_why_not_without_cuda():
    supported, why = same_address_support()
    assert not supported and "CUDA is not available" in why


@no_cuda
@pytest.mark.parametrize("build", ["MemoryManager", "for_module", "for_megatron"])
def test_same_address_true_is_refused_naming_the_option_and_the_fix(build):
    with pytest.raises(memmgr.MemmgrInputError, match=r"^%s: same_address=True .*Pass same_address=False" % build):
        if build == "MemoryManager":
            memmgr.MemoryManager(same_address=True)
        elif build == "for_module":
            memmgr.for_module(torch.nn.Linear(4, 4), same_address=True)
        else:
            from memmgr.integrations.megatron import for_megatron

            for_megatron(torch.nn.Linear(4, 4), None, same_address=True)  # refused before the model is looked at


@pytest.mark.parametrize("value", [1, "yes", None])
def test_same_address_must_be_a_bool(value):
    with pytest.raises(memmgr.MemmgrInputError, match="same_address must be True or False"):
        memmgr.MemoryManager(same_address=value)


def test_the_default_manager_and_for_module_do_not_touch_same_address_memory():
    model = torch.nn.Linear(4, 4)
    before = model.weight.detach().clone()
    native = native_module()
    ranges = native.vmm_bytes() if native is not None and hasattr(native, "vmm_bytes") else None
    with memmgr.for_module(model, same_address=False) as mgr:
        mgr.offload()
        if ranges is not None:
            assert native.vmm_bytes() == ranges  # no range reserved or mapped by this manager
        mgr.onload()
    assert torch.equal(model.weight, before)


@no_cuda
def test_a_same_address_buffer_and_the_requirement_are_refused_without_cuda():
    with pytest.raises(memmgr.MemmgrInputError, match="SameAddressBuffer: same_address=True cannot be honoured"):
        SameAddressBuffer(1 << 20)
    with pytest.raises(memmgr.MemmgrInputError, match="sleep backend: same_address=True"):
        require_same_address("sleep backend")


@no_cuda
def test_backend_info_says_why_same_address_memory_is_unavailable():
    info = memmgr.backend_info()
    assert info.same_address.startswith("unavailable (CUDA is not available here")
    assert info.describe().endswith(f"same-address memory {info.same_address}")


def test_backend_info_of_a_fresh_process_reports_same_address_support():
    """``memmgr.backend_info()`` right after ``import memmgr`` (its modules load lazily) has the support check."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import memmgr; print(memmgr.backend_info().same_address)"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "not loaded" not in out.stdout and out.stdout.strip().startswith(("available", "unavailable ("))


@pytest.mark.parametrize("cached_unused,maps", [(64 << 20, True), (0, False)])
def test_mapping_out_of_memory_empties_pytorchs_cache_and_tries_once_more_only_when_it_holds_unused_blocks(
        monkeypatch, cached_unused, maps):
    from memmgr import same_address

    emptied = []
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 << 30)
    monkeypatch.setattr(torch.cuda, "memory_reserved",
                        lambda device=None: (1 << 30) + (0 if emptied else cached_unused))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    attempts = []

    def map_memory():
        attempts.append(True)
        if not emptied:
            raise torch.OutOfMemoryError("cuMemCreate failed (out of memory)")
        return "mapped"

    if maps:
        assert same_address.map_with_cache_released(torch.device("cuda", 0), map_memory) == "mapped"
        assert len(attempts) == 2 and len(emptied) == 1
    else:
        with pytest.raises(torch.OutOfMemoryError):
            same_address.map_with_cache_released(torch.device("cuda", 0), map_memory)
        assert len(attempts) == 1 and not emptied
