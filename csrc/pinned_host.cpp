// Exact-size pinned host buffers for memmgr, the Python entry point of its copy kernels (copy_kernels.cu), and the
// module definition, which also binds the same-address device memory of vmm.cpp.
//
// Why not torch.empty(..., pin_memory=True): PyTorch's pinned allocator rounds every request up to a power of two
// and pins through cudaHostAlloc, which touches the pages from one thread (about 0.55 s/GiB). Here a buffer is
// exactly the requested size (rounded to the page), its pages are faulted in by several threads in parallel
// (optionally as transparent huge pages), and only then registered with cudaHostRegister, which is cheap on
// memory that is already resident.
//
// cudart is linked statically so the module loads on machines without a GPU driver; every CUDA call reports its
// error as a Python RuntimeError instead of aborting.

#include "copy_kernels.h"
#include "vmm.h"

#include <cuda_runtime_api.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

std::atomic<int64_t> g_bytes_mapped{0};
std::atomic<int64_t> g_bytes_registered{0};

size_t page_size() {
  static const size_t size = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return size;
}

size_t round_up(size_t value, size_t multiple) { return (value + multiple - 1) / multiple * multiple; }

std::string cuda_error_text(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

// Fault every page in with `num_threads` threads writing zeros; the kernel zero-fills anyway, the write is what
// makes the page resident so that cudaHostRegister does not have to fault it in from one thread.
void parallel_first_touch(char* base, size_t nbytes, int num_threads) {
  const size_t chunk_align = 2u << 20;  // whole huge pages per thread
  size_t per_thread = round_up((nbytes + num_threads - 1) / num_threads, chunk_align);
  std::vector<std::thread> workers;
  for (int i = 0; i < num_threads; ++i) {
    size_t begin = static_cast<size_t>(i) * per_thread;
    if (begin >= nbytes) break;
    size_t end = std::min(nbytes, begin + per_thread);
    workers.emplace_back([=] {
      const size_t step = page_size();
      for (size_t off = begin; off < end; off += step) base[off] = 0;
    });
  }
  for (auto& w : workers) w.join();
}

struct HostAllocation {
  void* ptr = nullptr;
  size_t mapped_bytes = 0;
  bool registered = false;
};

void release(HostAllocation* alloc) {
  if (alloc->registered) {
    // Never throw from a deleter: a failed unregister only leaks the registration, the unmap below frees memory.
    if (cudaHostUnregister(alloc->ptr) == cudaSuccess) {
      g_bytes_registered -= static_cast<int64_t>(alloc->mapped_bytes);
    } else {
      cudaGetLastError();
    }
  }
  if (alloc->ptr != nullptr) {
    munmap(alloc->ptr, alloc->mapped_bytes);
    g_bytes_mapped -= static_cast<int64_t>(alloc->mapped_bytes);
  }
  delete alloc;
}

}  // namespace

// Returns a uint8 CPU tensor of exactly `nbytes` elements that owns page-aligned memory, first-touched by
// `num_threads` threads and, when `pin` is set, registered with CUDA. The memory is unregistered and unmapped
// when the last reference to the tensor's storage goes away.
at::Tensor allocate(int64_t nbytes, int64_t num_threads, bool huge_pages, bool pin) {
  TORCH_CHECK(nbytes >= 0, "memmgr._pinned.allocate: nbytes must be >= 0, got ", nbytes);
  TORCH_CHECK(num_threads >= 1, "memmgr._pinned.allocate: num_threads must be >= 1, got ", num_threads);
  auto* alloc = new HostAllocation();
  alloc->mapped_bytes = round_up(std::max<size_t>(static_cast<size_t>(nbytes), 1), page_size());
  void* ptr = mmap(nullptr, alloc->mapped_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (ptr == MAP_FAILED) {
    size_t wanted = alloc->mapped_bytes;
    delete alloc;
    TORCH_CHECK(false, "memmgr._pinned.allocate: mmap of ", wanted, " bytes failed: ", std::strerror(errno));
  }
  alloc->ptr = ptr;
  g_bytes_mapped += static_cast<int64_t>(alloc->mapped_bytes);
#ifdef MADV_HUGEPAGE
  if (huge_pages) madvise(ptr, alloc->mapped_bytes, MADV_HUGEPAGE);
#endif
  {
    pybind11::gil_scoped_release no_gil;
    parallel_first_touch(static_cast<char*>(ptr), alloc->mapped_bytes, static_cast<int>(num_threads));
  }
  if (pin) {
    cudaError_t err;
    {
      pybind11::gil_scoped_release no_gil;
      // Mapped: the copy kernels address the buffer from the device (implied under unified addressing; explicit
      // so that cudaPointerGetAttributes always reports the device alias).
      err = cudaHostRegister(ptr, alloc->mapped_bytes, cudaHostRegisterPortable | cudaHostRegisterMapped);
    }
    if (err != cudaSuccess) {
      cudaGetLastError();
      release(alloc);
      TORCH_CHECK(false, "memmgr._pinned.allocate: cudaHostRegister of ", nbytes,
                  " bytes failed (", cuda_error_text(err), ")");
    }
    alloc->registered = true;
    g_bytes_registered += static_cast<int64_t>(alloc->mapped_bytes);
  }
  return at::from_blob(
      ptr, {nbytes}, [alloc](void*) { release(alloc); },
      at::TensorOptions().dtype(at::kByte).device(at::kCPU));
}

namespace {

// The address the device dereferences for `ptr`: itself for device memory, the mapped alias for pinned host memory
// (the same address under unified addressing). Pageable host memory has none: the kernels cannot reach it.
void* device_address(int64_t ptr, const char* which) {
  cudaPointerAttributes attrs;
  cudaError_t err = cudaPointerGetAttributes(&attrs, reinterpret_cast<const void*>(ptr));
  if (err != cudaSuccess) {
    cudaGetLastError();
    TORCH_CHECK(false, "memmgr._pinned.kernel_copy: cannot look up the ", which, " address (", cuda_error_text(err),
                ")");
  }
  TORCH_CHECK(attrs.type != cudaMemoryTypeUnregistered, "memmgr._pinned.kernel_copy: the ", which,
              " is pageable host memory, which copy kernels cannot reach; pin it (memmgr's host buffers are pinned) "
              "or copy it with the copy engines (copy path 'engine')");
  TORCH_CHECK(attrs.devicePointer != nullptr, "memmgr._pinned.kernel_copy: the ", which,
              " is pinned host memory that is not mapped into the device's address space; register it with "
              "cudaHostRegisterMapped (memmgr's host buffers are) or use copy path 'engine'");
  return attrs.devicePointer;
}

}  // namespace

// Copies `nbytes` from `src` to `dst` with a copy kernel (the SMs move the bytes, not the copy engines) on the stream
// given as its raw handle (torch's Stream.cuda_stream), on `device`. Either side may be device memory or pinned,
// mapped host memory; `blocks` == 0 picks the default grid, `unroll` == 0 the default 4 vectors per thread (4, 8 and 16
// are built; memmgr.copy_shape chooses). Asynchronous, ordered on the stream like a copy_.
void kernel_copy(int64_t dst, int64_t src, int64_t nbytes, int64_t stream, int64_t device, int64_t blocks,
                 int64_t unroll) {
  TORCH_CHECK(nbytes >= 0, "memmgr._pinned.kernel_copy: nbytes must be >= 0, got ", nbytes);
  TORCH_CHECK(unroll == 0 || memmgr_copy_kernel_unroll_supported(static_cast<int>(unroll)),
              "memmgr._pinned.kernel_copy: unroll must be 0 (the default), 4, 8 or 16, got ", unroll);
  if (nbytes == 0) return;
  void* dst_dev = device_address(dst, "destination");
  void* src_dev = device_address(src, "source");
  cudaError_t err = memmgr_launch_copy_kernel(dst_dev, src_dev, static_cast<size_t>(nbytes),
                                              reinterpret_cast<cudaStream_t>(stream), static_cast<int>(device),
                                              static_cast<int>(blocks), static_cast<int>(unroll));
  if (err != cudaSuccess) {
    cudaGetLastError();
    TORCH_CHECK(false, "memmgr._pinned.kernel_copy: launch failed (", cuda_error_text(err), ")");
  }
}

// The bulk (cp.async.bulk) variant of kernel_copy, compute capability 9.0 and later (bulk_kernel_supported).
void bulk_kernel_copy(int64_t dst, int64_t src, int64_t nbytes, int64_t stream, int64_t device, int64_t blocks) {
  TORCH_CHECK(nbytes >= 0, "memmgr._pinned.bulk_kernel_copy: nbytes must be >= 0, got ", nbytes);
  if (nbytes == 0) return;
  void* dst_dev = device_address(dst, "destination");
  void* src_dev = device_address(src, "source");
  cudaError_t err = memmgr_launch_bulk_copy_kernel(dst_dev, src_dev, static_cast<size_t>(nbytes),
                                                   reinterpret_cast<cudaStream_t>(stream), static_cast<int>(device),
                                                   static_cast<int>(blocks));
  if (err != cudaSuccess) {
    cudaGetLastError();
    TORCH_CHECK(false, "memmgr._pinned.bulk_kernel_copy: launch failed (", cuda_error_text(err), ")");
  }
}

bool bulk_kernel_supported(int64_t device) { return memmgr_bulk_copy_supported(static_cast<int>(device)) != 0; }

// Loads the copy kernels into `device`'s context now rather than at their first launch.
void kernel_prepare(int64_t device) {
  cudaError_t err = memmgr_prepare_copy_kernels(static_cast<int>(device));
  if (err != cudaSuccess) {
    cudaGetLastError();
    TORCH_CHECK(false, "memmgr._pinned.kernel_prepare failed (", cuda_error_text(err), ")");
  }
}

// (threads per block, default blocks) of the copy kernel on `device`.
std::tuple<int64_t, int64_t> kernel_copy_config(int64_t device) {
  return {memmgr_copy_kernel_threads(), memmgr_copy_kernel_default_blocks(static_cast<int>(device))};
}

// (available, message): whether the CUDA runtime sees a device from this module, and why not.
std::tuple<bool, std::string> cuda_status() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return {false, cuda_error_text(err)};
  }
  return {count > 0, std::to_string(count) + " device(s)"};
}

int64_t cuda_runtime_version() {
  int version = 0;
  cudaRuntimeGetVersion(&version);
  return version;
}

std::tuple<int64_t, int64_t> bytes_held() { return {g_bytes_mapped.load(), g_bytes_registered.load()}; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "memmgr native core: exact-size pinned host buffers, zero-copy copy kernels, same-address device memory";
  m.def("allocate", &allocate, "exact-size host buffer, parallel first touch, optionally pinned",
        pybind11::arg("nbytes"), pybind11::arg("num_threads") = 8, pybind11::arg("huge_pages") = true,
        pybind11::arg("pin") = true);
  m.def("kernel_copy", &kernel_copy, "copy kernel between device memory and mapped pinned host memory, on a stream",
        pybind11::arg("dst"), pybind11::arg("src"), pybind11::arg("nbytes"), pybind11::arg("stream"),
        pybind11::arg("device"), pybind11::arg("blocks") = 0, pybind11::arg("unroll") = 0);
  m.def("bulk_kernel_copy", &bulk_kernel_copy, "the copy kernel's bulk (cp.async.bulk) variant, sm_90 and later",
        pybind11::arg("dst"), pybind11::arg("src"), pybind11::arg("nbytes"), pybind11::arg("stream"),
        pybind11::arg("device"), pybind11::arg("blocks") = 0);
  m.def("bulk_kernel_supported", &bulk_kernel_supported, "whether the bulk variant runs on a device");
  m.def("kernel_prepare", &kernel_prepare, "loads the copy kernels into a device's context ahead of use");
  m.def("kernel_copy_config", &kernel_copy_config, "(threads per block, default blocks) of the copy kernel");
  m.def("cuda_status", &cuda_status);
  m.def("cuda_runtime_version", &cuda_runtime_version);
  m.def("bytes_held", &bytes_held, "(bytes mapped, bytes registered) by live buffers of this module");
  memmgr_register_vmm(m);
}
