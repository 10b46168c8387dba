// Same-address device memory for memmgr (vmm.cpp): reserved virtual address ranges whose physical memory is
// released and re-created at the same address. Bound into memmgr._pinned by pinned_host.cpp's module.
#pragma once

// ATen's tensor and from_blob, c10's checks and torch's pybind11 casters alone: <torch/extension.h> would pull every
// ATen operator's header into each file (a ~35 s compile per file against ~7 s).
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>

// Adds VmmRange, vmm_supported, vmm_granularity and vmm_bytes to the extension module.
void memmgr_register_vmm(pybind11::module& m);
