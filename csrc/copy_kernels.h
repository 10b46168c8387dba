// Copy kernels that move bytes between device memory and mapped pinned host memory with the SMs (zero-copy),
// instead of the copy engines. Plain C interface: compiled by nvcc, called from the torch extension, no torch
// headers on either side of it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

extern "C" {

// Launches a copy of `nbytes` from `src` to `dst` on `stream` (asynchronous, stream-ordered). Both are
// addresses the device can dereference: device memory, or pinned host memory translated with
// cudaHostGetDevicePointer / cudaPointerGetAttributes (identical to the host address under unified addressing).
// `blocks` == 0 picks blocks_per_sm * the device's multiprocessor count; `unroll` (16-byte vectors each thread loads
// before it stores; 4, 8 or 16, 0 for 4) is the other half of the launch shape. Returns the launch error, if any
// (cudaErrorInvalidValue for an unroll the kernel is not built with).
cudaError_t memmgr_launch_copy_kernel(void* dst, const void* src, size_t nbytes, cudaStream_t stream,
                                      int device, int blocks, int unroll);

// Whether the kernel is built with this unroll (non-zero) or not (0).
int memmgr_copy_kernel_unroll_supported(int unroll);

// Loads the kernels into `device`'s context and caches its multiprocessor count, so that no later launch has to
// (a lazy load can wait for the whole device). Call where a pause does not matter.
cudaError_t memmgr_prepare_copy_kernels(int device);

// The block count the launcher uses when `blocks` == 0, for a device; for reports.
int memmgr_copy_kernel_default_blocks(int device);

// Threads per block of the copy kernel.
int memmgr_copy_kernel_threads();

// The bulk variant (compute capability 9.0 and later): each block moves whole chunks with cp.async.bulk through
// shared memory, several chunks in flight. Same contract as memmgr_launch_copy_kernel; buffers whose addresses do not
// share a 16-byte grid go to the vector kernel. cudaErrorInvalidDeviceFunction where the device or the build lacks it.
cudaError_t memmgr_launch_bulk_copy_kernel(void* dst, const void* src, size_t nbytes, cudaStream_t stream, int device,
                                           int blocks);

// Whether the bulk variant runs on `device` (non-zero) or not (0).
int memmgr_bulk_copy_supported(int device);
}
