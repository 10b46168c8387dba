// Same-address device memory for memmgr: a virtual address range reserved once (cuMemAddressReserve) whose physical
// memory is created and mapped (cuMemCreate, cuMemMap, cuMemSetAccess) and later unmapped and released (cuMemUnmap,
// cuMemRelease) while the addresses stay reserved. A tensor over the range keeps its data_ptr() across any number of
// release/map cycles, so views of it and CUDA graphs captured on it stay valid; between a release and the next map
// the range has no memory behind it and any access to it is an illegal-address error on the device.
//
// The driver API is reached through the CUDA runtime's driver entry points (cudaGetDriverEntryPointByVersion, from
// the statically linked cudart), so the extension keeps no link dependency on libcuda and still loads on machines
// without a GPU driver: every entry point reports a missing driver as an error message instead.
//
// A range can also back a torch storage (``vmm_adopt_storage``): the storage's memory moves into the range once, and
// the range's allocator becomes the storage's, so that ``storage.resize_(0)`` gives the physical memory back and
// ``storage.resize_(n)`` maps new memory at the same address; every tensor viewing the storage keeps its data_ptr().
// A release waits for the work queued on the stream named by ``release_after`` (the copy out) on a reaper thread, so
// the caller never blocks on it and each range's memory goes back as soon as its own copy completed.
//
// Every driver call runs with the device's primary context pushed (the context torch's runtime uses), so mappings are
// visible to torch's kernels and copies; the primary context is retained once per device and never released.
#include "vmm.h"

#include "device_scope.h"

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <c10/core/Allocator.h>
#include <c10/core/StorageImpl.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>

namespace {

struct Driver {
  decltype(&::cuInit) init = nullptr;
  decltype(&::cuDeviceGet) device_get = nullptr;
  decltype(&::cuDeviceGetAttribute) get_attribute = nullptr;
  decltype(&::cuDevicePrimaryCtxRetain) ctx_retain = nullptr;
  decltype(&::cuCtxPushCurrent) ctx_push = nullptr;
  decltype(&::cuCtxPopCurrent) ctx_pop = nullptr;
  decltype(&::cuMemGetAllocationGranularity) granularity = nullptr;
  decltype(&::cuMemAddressReserve) reserve = nullptr;
  decltype(&::cuMemAddressFree) address_free = nullptr;
  decltype(&::cuMemCreate) create = nullptr;
  decltype(&::cuMemRelease) release = nullptr;
  decltype(&::cuMemMap) map = nullptr;
  decltype(&::cuMemUnmap) unmap = nullptr;
  decltype(&::cuMemSetAccess) set_access = nullptr;
  decltype(&::cuGetErrorName) error_name = nullptr;
  decltype(&::cuGetErrorString) error_string = nullptr;
  std::string error;  // why the driver cannot be used; empty when every entry point was found and cuInit succeeded
};

std::atomic<int64_t> g_bytes_reserved{0};
std::atomic<int64_t> g_bytes_mapped{0};

std::string runtime_error_text(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

template <typename Fn>
bool load_entry_point(const char* name, Fn* fn, std::string* error) {
#if CUDART_VERSION >= 12000
  void* ptr = nullptr;
  cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
  cudaError_t err = cudaGetDriverEntryPointByVersion(name, &ptr, 12000, cudaEnableDefault, &status);
#else
  cudaError_t err = cudaGetDriverEntryPoint(name, &ptr, cudaEnableDefault, &status);
#endif
  if (err != cudaSuccess) {
    cudaGetLastError();
    *error = "cannot reach the CUDA driver (looking up " + std::string(name) + ": " + runtime_error_text(err) + ")";
    return false;
  }
  if (status != cudaDriverEntryPointSuccess || ptr == nullptr) {
    *error = "the CUDA driver has no " + std::string(name) + " (too old for virtual memory management: it needs a " +
             "driver for CUDA 12 or newer)";
    return false;
  }
  *fn = reinterpret_cast<Fn>(ptr);
  return true;
#else
  *error = "memmgr's extension was built with a CUDA toolkit older than 12.0; rebuild it with CUDA 12 or newer for "
           "same-address memory";
  return false;
#endif
}

const Driver& driver() {
  static Driver d;
  static std::once_flag once;
  std::call_once(once, [] {
    std::string error;
    bool ok = load_entry_point("cuGetErrorName", &d.error_name, &error) &&
              load_entry_point("cuGetErrorString", &d.error_string, &error) &&
              load_entry_point("cuInit", &d.init, &error) &&
              load_entry_point("cuDeviceGet", &d.device_get, &error) &&
              load_entry_point("cuDeviceGetAttribute", &d.get_attribute, &error) &&
              load_entry_point("cuDevicePrimaryCtxRetain", &d.ctx_retain, &error) &&
              load_entry_point("cuCtxPushCurrent", &d.ctx_push, &error) &&
              load_entry_point("cuCtxPopCurrent", &d.ctx_pop, &error) &&
              load_entry_point("cuMemGetAllocationGranularity", &d.granularity, &error) &&
              load_entry_point("cuMemAddressReserve", &d.reserve, &error) &&
              load_entry_point("cuMemAddressFree", &d.address_free, &error) &&
              load_entry_point("cuMemCreate", &d.create, &error) &&
              load_entry_point("cuMemRelease", &d.release, &error) &&
              load_entry_point("cuMemMap", &d.map, &error) &&
              load_entry_point("cuMemUnmap", &d.unmap, &error) &&
              load_entry_point("cuMemSetAccess", &d.set_access, &error);
    if (ok) {
      CUresult r = d.init(0);
      if (r != CUDA_SUCCESS) error = "cuInit failed (CUresult " + std::to_string(static_cast<int>(r)) + ")";
    }
    d.error = error;
  });
  return d;
}

std::string cu_error_text(CUresult r) {
  const Driver& d = driver();
  const char* name = nullptr;
  const char* text = nullptr;
  if (d.error_name != nullptr) d.error_name(r, &name);
  if (d.error_string != nullptr) d.error_string(r, &text);
  return std::string(name ? name : "CUresult " + std::to_string(static_cast<int>(r))) + ": " +
         (text ? text : "unknown error");
}

const Driver& require_driver(const char* where) {
  const Driver& d = driver();
  TORCH_CHECK(d.error.empty(), "memmgr._pinned.", where, ": ", d.error);
  return d;
}

void check(CUresult r, const char* where, const std::string& what) {
  if (r == CUDA_SUCCESS) return;
  if (r == CUDA_ERROR_OUT_OF_MEMORY) {
    TORCH_CHECK_WITH(OutOfMemoryError, false, "memmgr._pinned.", where, ": ", what, " failed (", cu_error_text(r),
                     ")");
  }
  TORCH_CHECK(false, "memmgr._pinned.", where, ": ", what, " failed (", cu_error_text(r), ")");
}

CUmemAllocationProp device_prop(CUdevice dev) {
  CUmemAllocationProp prop = {};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = static_cast<int>(dev);
  return prop;
}

// Pushes the device's primary context for the lifetime of the scope (retained once per device, never released).
class ContextScope {
 public:
  ContextScope(const Driver& d, int device, const char* where) : d_(d) {
    static std::mutex mu;
    static std::unordered_map<int, CUcontext> contexts;
    CUcontext ctx = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu);
      auto it = contexts.find(device);
      if (it == contexts.end()) {
        CUdevice dev = 0;
        check(d.device_get(&dev, device), where, "cuDeviceGet(" + std::to_string(device) + ")");
        check(d.ctx_retain(&ctx, dev), where, "cuDevicePrimaryCtxRetain(device " + std::to_string(device) + ")");
        contexts.emplace(device, ctx);
      } else {
        ctx = it->second;
      }
    }
    check(d.ctx_push(ctx), where, "cuCtxPushCurrent");
  }
  ~ContextScope() {
    CUcontext popped = nullptr;
    d_.ctx_pop(&popped);
  }
  ContextScope(const ContextScope&) = delete;
  ContextScope& operator=(const ContextScope&) = delete;

 private:
  const Driver& d_;
};

size_t granularity_of(const Driver& d, int device, const char* where) {
  CUdevice dev = 0;
  check(d.device_get(&dev, device), where, "cuDeviceGet(" + std::to_string(device) + ")");
  CUmemAllocationProp prop = device_prop(dev);
  size_t granularity = 0;
  check(d.granularity(&granularity, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM), where,
        "cuMemGetAllocationGranularity");
  return granularity;
}

size_t round_up(size_t value, size_t multiple) { return (value + multiple - 1) / multiple * multiple; }

class VmmRange;

// The allocator of a storage that lives in a VmmRange: allocate() maps memory at the range's address (the range owns
// its allocator; a storage keeps the range alive through its data pointer's context while memory is mapped, and the
// bucket that adopted the storage keeps it alive while none is).
class RangeAllocator final : public c10::Allocator {
 public:
  explicit RangeAllocator(VmmRange* range) : range_(range) {}
  c10::DataPtr allocate(size_t nbytes) override;
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    cudaError_t err = cudaMemcpy(dest, src, count, cudaMemcpyDeviceToDevice);
    if (err != cudaSuccess) {
      cudaGetLastError();
      TORCH_CHECK(false, "memmgr._pinned: copy within same-address memory failed (", runtime_error_text(err), ")");
    }
  }

 private:
  VmmRange* range_;
};

// Releases that wait for work on a stream: an event recorded on it, waited for on this thread, then the unmap.
class Reaper {
 public:
  struct Item {
    std::shared_ptr<VmmRange> range;
    uint64_t generation;
    cudaEvent_t event;
  };
  static Reaper& instance() {
    static Reaper* reaper = new Reaper();  // never destroyed: its thread outlives static destruction at exit
    return *reaper;
  }
  void push(Item item) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      items_.push_back(std::move(item));
    }
    cv_.notify_one();
  }

 private:
  Reaper() { std::thread([this] { run(); }).detach(); }
  void run();
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Item> items_;
};

// One reserved virtual address range on one device, with or without physical memory mapped behind it.
class VmmRange : public std::enable_shared_from_this<VmmRange> {
 public:
  VmmRange(int64_t nbytes, int64_t device) : nbytes_(nbytes), device_(static_cast<int>(device)) {
    TORCH_CHECK(nbytes >= 1, "memmgr._pinned.VmmRange: nbytes must be >= 1, got ", nbytes);
    TORCH_CHECK(device >= 0, "memmgr._pinned.VmmRange: device must be a CUDA device index >= 0, got ", device);
    const Driver& d = require_driver("VmmRange");
    ContextScope scope(d, device_, "VmmRange");
    CUdevice dev = 0;
    check(d.device_get(&dev, device_), "VmmRange", "cuDeviceGet(" + std::to_string(device_) + ")");
    int supported = 0;
    check(d.get_attribute(&supported, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev), "VmmRange",
          "cuDeviceGetAttribute(VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED)");
    TORCH_CHECK(supported != 0, "memmgr._pinned.VmmRange: device ", device_, " does not support virtual memory ",
                "management (CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED is 0)");
    granularity_ = granularity_of(d, device_, "VmmRange");
    reserved_ = round_up(static_cast<size_t>(nbytes), granularity_);
    check(d.reserve(&base_, reserved_, granularity_, 0, 0), "VmmRange",
          "cuMemAddressReserve of " + std::to_string(reserved_) + " bytes");
    g_bytes_reserved += static_cast<int64_t>(reserved_);
  }

  ~VmmRange() {
    // Never throws: at interpreter exit the driver may be gone already; a failed call only leaks.
    const Driver& d = driver();
    if (!d.error.empty() || base_ == 0) return;
    try {
      ContextScope scope(d, device_, "VmmRange");
      if (mapped_) release_physical(d);
      if (d.address_free(base_, reserved_) == CUDA_SUCCESS) g_bytes_reserved -= static_cast<int64_t>(reserved_);
    } catch (...) {
    }
  }

  // Creates physical memory for the whole range, maps it at the reserved address and makes it readable and writable
  // from the device. Its contents are undefined. Returns false (and does nothing) when the range is mapped already.
  bool map() {
    std::lock_guard<std::mutex> lock(mu_);
    ++generation_;  // a release still waiting for its stream is called off: the memory stays
    return map_locked();
  }

  // Unmaps and releases the physical memory; the addresses stay reserved. Work still using the range must have
  // completed (the caller waits for it). Returns false (and does nothing) when no memory is mapped.
  bool unmap() {
    std::lock_guard<std::mutex> lock(mu_);
    if (!mapped_) return false;
    const Driver& d = require_driver("VmmRange.unmap");
    ContextScope scope(d, device_, "VmmRange.unmap");
    release_physical(d);
    return true;
  }

  // ---- as a storage's memory (vmm_adopt_storage) ----
  // The next release of the storage's memory (storage.resize_(0)) waits for the work queued on `stream` until then.
  void release_after(int64_t stream) {
    std::lock_guard<std::mutex> lock(mu_);
    release_stream_ = reinterpret_cast<cudaStream_t>(stream);
    has_release_stream_ = true;
  }

  // Maps memory for the storage (calling off a release still pending) and returns its data pointer.
  c10::DataPtr storage_memory(size_t nbytes) {
    TORCH_CHECK(nbytes <= reserved_, "memmgr._pinned: same-address storage of ", nbytes_, " bytes cannot grow to ",
                nbytes, " bytes (its address range holds ", reserved_, ")");
    std::lock_guard<std::mutex> lock(mu_);
    if (!last_error_.empty()) {
      std::string error = last_error_;
      last_error_.clear();
      // A release that failed while waiting for the copy left the memory mapped, contents and all: it serves this
      // allocation. One that failed in the driver's unmap is reported.
      TORCH_CHECK(mapped_, "memmgr._pinned: an earlier release of same-address memory failed: ", error);
    }
    // One storage owns the range's memory at a time: a second data pointer to it (a clone through this allocator)
    // would alias the same bytes.
    TORCH_CHECK(!held_, "memmgr._pinned: same-address memory of ", nbytes_, " bytes at ", base_, " belongs to one ",
                "storage and cannot be allocated again while that storage holds it (copy the tensor with .clone())");
    ++generation_;
    map_locked();
    held_ = true;
    auto* hold = new std::shared_ptr<VmmRange>(shared_from_this());
    return c10::DataPtr(reinterpret_cast<void*>(base_), hold, &free_storage_memory,
                        c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device_)));
  }

  // Blocks until every release handed to the reaper has happened; the error of a failed one, else "".
  std::string wait_released() {
    std::unique_lock<std::mutex> lock(mu_);
    released_cv_.wait(lock, [this] { return pending_ == 0; });
    std::string error = last_error_;
    last_error_.clear();
    return error;
  }

  // The reaper's half of a release: unmaps unless the memory was mapped again since the release was asked for.
  void finish_release(uint64_t generation, const std::string& wait_error) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!wait_error.empty()) {
      last_error_ = wait_error;  // the memory stays mapped: the work before it may still be using it
    } else if (generation == generation_ && mapped_) {
      release_physical_noexcept();
    }
    --pending_;
    released_cv_.notify_all();
  }

  c10::Allocator* allocator() { return &allocator_; }
  int64_t pending_releases() {
    std::lock_guard<std::mutex> lock(mu_);
    return pending_;
  }

 private:
  static void free_storage_memory(void* ctx) {
    auto* hold = static_cast<std::shared_ptr<VmmRange>*>(ctx);
    (*hold)->storage_freed();
    delete hold;
  }

  // The storage let go of its memory (resize_(0), or its last tensor died): released once the work queued on the
  // stream named by release_after() completed; without one, after the whole device's work (as cudaFree waits).
  // Never throws (it runs inside torch's deleter); a failure is reported by the next wait_released or map.
  void storage_freed() {
    std::unique_lock<std::mutex> lock(mu_);
    held_ = false;
    const bool has_stream = has_release_stream_;
    has_release_stream_ = false;
    if (!mapped_) return;
    int previous = -1;
    cudaGetDevice(&previous);
    if (previous != device_) cudaSetDevice(device_);
    cudaError_t err = cudaSuccess;
    if (has_stream) {
      cudaEvent_t event = nullptr;
      err = cudaEventCreateWithFlags(&event, cudaEventDisableTiming);
      if (err == cudaSuccess) err = cudaEventRecord(event, release_stream_);
      if (err == cudaSuccess) {
        ++pending_;
        const uint64_t generation = generation_;  // read under the lock: a map right after the unlock bumps it
        if (previous != device_ && previous >= 0) cudaSetDevice(previous);
        lock.unlock();
        Reaper::instance().push({shared_from_this(), generation, event});
        return;
      }
      if (event != nullptr) cudaEventDestroy(event);
      cudaGetLastError();
    }
    err = cudaDeviceSynchronize();
    if (previous != device_ && previous >= 0) cudaSetDevice(previous);
    if (err != cudaSuccess) {
      cudaGetLastError();
      last_error_ = "waiting for the device before releasing same-address memory: " + runtime_error_text(err);
      return;
    }
    release_physical_noexcept();
  }

  void release_physical_noexcept() {
    try {
      const Driver& d = require_driver("VmmRange.release");
      ContextScope scope(d, device_, "VmmRange.release");
      release_physical(d);
    } catch (const std::exception& exc) {
      last_error_ = exc.what();
    }
  }

  bool map_locked() {
    if (mapped_) return false;
    const Driver& d = require_driver("VmmRange.map");
    ContextScope scope(d, device_, "VmmRange.map");
    CUdevice dev = 0;
    check(d.device_get(&dev, device_), "VmmRange.map", "cuDeviceGet(" + std::to_string(device_) + ")");
    CUmemAllocationProp prop = device_prop(dev);
    CUmemGenericAllocationHandle handle = 0;
    check(d.create(&handle, reserved_, &prop, 0), "VmmRange.map",
          "cuMemCreate of " + std::to_string(reserved_) + " bytes on device " + std::to_string(device_));
    CUresult r = d.map(base_, reserved_, 0, handle, 0);
    if (r != CUDA_SUCCESS) {
      d.release(handle);
      check(r, "VmmRange.map", "cuMemMap");
    }
    CUmemAccessDesc access = {};
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = device_;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    r = d.set_access(base_, reserved_, &access, 1);
    if (r != CUDA_SUCCESS) {
      d.unmap(base_, reserved_);
      d.release(handle);
      check(r, "VmmRange.map", "cuMemSetAccess");
    }
    handle_ = handle;
    mapped_ = true;
    g_bytes_mapped += static_cast<int64_t>(reserved_);
    return true;
  }

 public:
  // A uint8 tensor of nbytes over the range on its CUDA device. Its storage keeps the range alive: the reservation
  // (and any mapped memory) is freed once neither the range object nor any such tensor refers to it.
  at::Tensor tensor() {
    auto self = shared_from_this();
    return at::from_blob(
        reinterpret_cast<void*>(base_), {nbytes_}, [self](void*) {},
        at::TensorOptions().dtype(at::kByte).device(at::Device(at::kCUDA, device_)));
  }

  bool mapped() const { return mapped_; }
  int64_t address() const { return static_cast<int64_t>(base_); }
  int64_t nbytes() const { return nbytes_; }
  int64_t reserved_bytes() const { return static_cast<int64_t>(reserved_); }
  int64_t granularity() const { return static_cast<int64_t>(granularity_); }
  int64_t device() const { return device_; }

 private:
  void release_physical(const Driver& d) {
    CUresult r = d.unmap(base_, reserved_);
    if (r == CUDA_SUCCESS) r = d.release(handle_);
    mapped_ = false;
    handle_ = 0;
    g_bytes_mapped -= static_cast<int64_t>(reserved_);
    check(r, "VmmRange.unmap", "cuMemUnmap/cuMemRelease");
  }

  CUdeviceptr base_ = 0;
  int64_t nbytes_ = 0;
  size_t reserved_ = 0;
  size_t granularity_ = 0;
  int device_ = 0;
  CUmemGenericAllocationHandle handle_ = 0;
  bool mapped_ = false;
  std::mutex mu_;
  // as a storage's memory
  RangeAllocator allocator_{this};
  bool held_ = false;        // a storage's data pointer refers to the mapped memory
  uint64_t generation_ = 0;  // bumped by every map: a pending release of an older generation leaves the memory be
  cudaStream_t release_stream_ = nullptr;
  bool has_release_stream_ = false;
  int64_t pending_ = 0;  // releases handed to the reaper and not finished
  std::string last_error_;
  std::condition_variable released_cv_;
};

c10::DataPtr RangeAllocator::allocate(size_t nbytes) {
  if (nbytes == 0) return c10::DataPtr(nullptr, c10::Device(c10::DeviceType::CUDA));
  return range_->storage_memory(nbytes);
}

void Reaper::run() {
  for (;;) {
    Item item;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return !items_.empty(); });
      item = std::move(items_.front());
      items_.pop_front();
    }
    // on the range's device: a thread with none current would make device 0's context current for these calls
    cudaError_t err = cudaSetDevice(static_cast<int>(item.range->device()));
    if (err == cudaSuccess) err = cudaEventSynchronize(item.event);
    std::string error;
    if (err != cudaSuccess) {
      cudaGetLastError();
      error = "waiting for the copy before releasing same-address memory: " + runtime_error_text(err);
    }
    cudaEventDestroy(item.event);
    item.range->finish_release(item.generation, error);
  }
}

}  // namespace

// Moves the memory of `tensor`'s storage into a new VmmRange (a copy on `stream`, waited for) and makes the range's
// allocator the storage's: every tensor viewing the storage now addresses the range, and from here on
// storage.resize_(0) releases the physical memory (after the stream named by the range's release_after) and
// storage.resize_(nbytes) maps new memory at the same address. The storage's former memory goes back to its
// allocator. Returns the range, which the caller keeps as long as it may resize the storage.
std::shared_ptr<VmmRange> vmm_adopt_storage(const at::Tensor& tensor, int64_t stream) {
  TORCH_CHECK(tensor.is_cuda(), "memmgr._pinned.vmm_adopt_storage: the tensor is on ", tensor.device(),
              ", not a CUDA device");
  c10::StorageImpl* impl = tensor.storage().unsafeGetStorageImpl();
  const size_t nbytes = impl->nbytes();
  TORCH_CHECK(nbytes > 0, "memmgr._pinned.vmm_adopt_storage: the tensor's storage holds no memory (0 bytes)");
  auto range = std::make_shared<VmmRange>(static_cast<int64_t>(nbytes), tensor.device().index());
  c10::DataPtr memory = range->allocator()->allocate(nbytes);
  auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  cudaError_t err;
  {
    memmgr::DeviceScope scope(tensor.device().index());  // the copy on the tensor's device, whichever is current
    err = scope.error();
    if (err == cudaSuccess) {
      err = cudaMemcpyAsync(memory.get(), impl->data(), nbytes, cudaMemcpyDeviceToDevice, cuda_stream);
    }
    if (err == cudaSuccess) err = cudaStreamSynchronize(cuda_stream);
  }
  if (err != cudaSuccess) {
    cudaGetLastError();
    TORCH_CHECK(false, "memmgr._pinned.vmm_adopt_storage: copying ", nbytes, " bytes into same-address memory failed (",
                runtime_error_text(err), ")");
  }
  impl->set_data_ptr_noswap(std::move(memory));
  impl->set_allocator(range->allocator());
  impl->set_resizable(true);
  return range;
}

// Gives an adopted storage PyTorch's CUDA allocator back (the bucket that adopted it stops managing it): the memory it
// holds now stays mapped until the storage lets go of it, and a later resize_(nbytes) allocates from PyTorch's cache,
// at a new address, instead of through a range nobody may be keeping any more.
void vmm_disown_storage(const at::Tensor& tensor) {
  TORCH_CHECK(tensor.is_cuda(), "memmgr._pinned.vmm_disown_storage: the tensor is on ", tensor.device(),
              ", not a CUDA device");
  tensor.storage().unsafeGetStorageImpl()->set_allocator(c10::GetAllocator(c10::DeviceType::CUDA));
}

// (supported, message): whether `device` can hold same-address memory, and why not (no driver, an old driver, a
// device without virtual memory management).
std::tuple<bool, std::string> vmm_supported(int64_t device) {
  const Driver& d = driver();
  if (!d.error.empty()) return {false, d.error};
  CUdevice dev = 0;
  CUresult r = d.device_get(&dev, static_cast<int>(device));
  if (r != CUDA_SUCCESS) return {false, "no CUDA device " + std::to_string(device) + " (" + cu_error_text(r) + ")"};
  int supported = 0;
  r = d.get_attribute(&supported, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev);
  if (r != CUDA_SUCCESS) return {false, "cannot query virtual memory management support (" + cu_error_text(r) + ")"};
  if (supported == 0) {
    return {false, "device " + std::to_string(device) + " does not support virtual memory management " +
                       "(CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED is 0)"};
  }
  return {true, "device " + std::to_string(device) + " supports virtual memory management"};
}

// The size physical memory is created in on `device` (every VmmRange is rounded up to it).
int64_t vmm_granularity(int64_t device) {
  const Driver& d = require_driver("vmm_granularity");
  return static_cast<int64_t>(granularity_of(d, static_cast<int>(device), "vmm_granularity"));
}

std::tuple<int64_t, int64_t> vmm_bytes() { return {g_bytes_reserved.load(), g_bytes_mapped.load()}; }

void memmgr_register_vmm(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<VmmRange, std::shared_ptr<VmmRange>>(m, "VmmRange",
                                                  "a reserved device address range; physical memory mapped on demand")
      .def(py::init<int64_t, int64_t>(), py::arg("nbytes"), py::arg("device"))
      .def("map", &VmmRange::map, py::call_guard<py::gil_scoped_release>(),
           "creates and maps physical memory at the reserved address; False if mapped already")
      .def("unmap", &VmmRange::unmap, py::call_guard<py::gil_scoped_release>(),
           "unmaps and releases the physical memory, keeping the address; False if nothing was mapped")
      .def("tensor", &VmmRange::tensor, "uint8 CUDA tensor over the range; keeps the range alive")
      .def("release_after", &VmmRange::release_after, py::arg("stream"),
           "the next release of an adopted storage's memory waits for the work queued on this stream (raw handle)")
      .def("wait_released", &VmmRange::wait_released, py::call_guard<py::gil_scoped_release>(),
           "waits for the releases in flight; the error of a failed one, else ''")
      .def_property_readonly("pending_releases", &VmmRange::pending_releases)
      .def_property_readonly("mapped", &VmmRange::mapped)
      .def_property_readonly("address", &VmmRange::address)
      .def_property_readonly("nbytes", &VmmRange::nbytes)
      .def_property_readonly("reserved_bytes", &VmmRange::reserved_bytes)
      .def_property_readonly("granularity", &VmmRange::granularity)
      .def_property_readonly("device", &VmmRange::device);
  m.def("vmm_supported", &vmm_supported, "(supported, message): same-address memory on a device", py::arg("device"));
  m.def("vmm_granularity", &vmm_granularity, "physical memory granularity of a device in bytes", py::arg("device"));
  m.def("vmm_adopt_storage", &vmm_adopt_storage, py::arg("tensor"), py::arg("stream"),
        "moves a CUDA tensor's storage into a new VmmRange whose allocator it uses from then on; returns the range");
  m.def("vmm_disown_storage", &vmm_disown_storage, py::arg("tensor"),
        "gives an adopted storage PyTorch's CUDA allocator back (its current memory stays until it is freed)");
  m.def("vmm_bytes", &vmm_bytes, "(bytes reserved, bytes mapped) by live VmmRanges");
}
