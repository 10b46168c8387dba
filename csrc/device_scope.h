// Makes a CUDA device current for a scope and restores the one that was, for native calls whose callers may have
// another device current (the copy-kernel launchers, the adoption of a storage into same-address memory).
#pragma once

#include <cuda_runtime_api.h>

namespace memmgr {

// Makes `device` current for its lifetime and then restores the device that was. error() is the failure to switch,
// if any.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    err_ = cudaGetDevice(&previous_);
    if (err_ == cudaSuccess && previous_ != device) {
      err_ = cudaSetDevice(device);
      switched_ = err_ == cudaSuccess;
    }
  }
  ~DeviceScope() {
    if (switched_ && previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
  cudaError_t error() const { return err_; }

 private:
  int previous_ = -1;
  cudaError_t err_ = cudaSuccess;
  bool switched_ = false;
};

}  // namespace memmgr
