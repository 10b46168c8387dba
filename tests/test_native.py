"""The native extension: built where a CUDA toolkit exists, loads without a driver, and fails cleanly there."""
import logging
import os

import pytest
import torch

import memmgr
from memmgr._native import native_module
from memmgr.host_memory import allocate_host_buffer

native = native_module()
must_exist = os.environ.get("MEMMGR_BUILD_EXT") == "1"


def test_extension_is_built_when_the_build_required_it():
    info = memmgr.backend_info()
    if must_exist:
        assert info.extension_built, info.extension_error
    assert ("built" in info.describe()) and ("CUDA" in info.describe())


@pytest.mark.skipif(native is None, reason="native extension not built here")
def test_native_buffer_is_exact_size_and_freed_when_dropped():
    before = native.bytes_held()[0]
    t = native.allocate(12345, 4, True, False)
    assert t.dtype == torch.uint8 and t.numel() == 12345 and t.data_ptr() % 4096 == 0
    t.fill_(7)
    assert int(t.sum()) == 7 * 12345
    assert native.bytes_held()[0] - before == 16384  # page-rounded mapping, exact-size tensor
    del t
    assert native.bytes_held()[0] == before


@pytest.mark.skipif(native is None or torch.cuda.is_available(), reason="checks behaviour without a GPU driver")
def test_native_calls_fail_cleanly_without_a_driver():
    ok, message = native.cuda_status()
    assert not ok and message
    before = native.bytes_held()
    with pytest.raises(RuntimeError, match="cudaHostRegister of 4096 bytes failed"):
        native.allocate(4096, 2, True, True)
    assert native.bytes_held() == before  # nothing leaked by the failed pin
    with pytest.raises(RuntimeError, match="kernel_copy: cannot look up"):
        native.kernel_copy(0, 0, 16, 0, 0)


@pytest.mark.skipif(native is None, reason="needs memmgr's native extension")
@pytest.mark.parametrize("unroll", [-1, 1, 5, 32])
def test_the_copy_kernel_refuses_an_unroll_it_is_not_built_with_before_any_launch(unroll):
    with pytest.raises(RuntimeError, match="unroll must be 0 \\(the default\\), 4, 8 or 16"):
        native.kernel_copy(0, 0, 16, 0, 0, 0, unroll)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback when pinning is impossible")
def test_failed_pinning_falls_back_to_pageable_memory_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="memmgr"):
        buf = allocate_host_buffer(1000, pin=True)
    assert not buf.pinned and buf.nbytes == 1000 and buf.kind == "pageable-fallback"
    assert "falling back to pageable memory" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-fallback error")
def test_failed_pinning_without_fallback_raises_a_clear_error():
    with pytest.raises(memmgr.MemmgrHostMemoryError, match="ulimit -l"):
        allocate_host_buffer(1000, pin=True, allow_pageable_fallback=False)


@pytest.mark.skipif(native is None or torch.cuda.is_available(), reason="checks behaviour without a GPU driver")
def test_same_address_memory_fails_cleanly_without_a_driver():
    supported, why = native.vmm_supported(0)
    assert not supported and "CUDA driver" in why
    with pytest.raises(RuntimeError, match="memmgr._pinned.VmmRange: cannot reach the CUDA driver"):
        native.VmmRange(1 << 20, 0)
    with pytest.raises(RuntimeError, match="nbytes must be >= 1"):
        native.VmmRange(0, 0)
    assert native.vmm_bytes() == (0, 0)
