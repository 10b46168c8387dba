// Same-address device memory for memmgr (vmm.cpp): reserved virtual address ranges whose physical memory is
// released and re-created at the same address. Bound into memmgr._pinned by pinned_host.cpp's module.
#pragma once

#include <torch/extension.h>

// Adds VmmRange, vmm_supported, vmm_granularity and vmm_bytes to the extension module.
void memmgr_register_vmm(pybind11::module& m);
