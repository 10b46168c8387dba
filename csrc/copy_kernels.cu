// Zero-copy copy kernels: the SMs load and store across the host<->device link themselves (mapped pinned host
// memory, addressed through unified addressing), so a move does not wait for the copy engines. Right after GPU
// memory was given back to the driver (another process's release, or an empty_cache) host->device engine copies
// run at about half the link's speed for a while, while these kernels still run at ~0.93x of it (issue 16; H200
// figures in benchmarks/results/2026-11-29/h200-copy-paths-*). The SMs' ceiling below the engines' is likely the
// link's per-request overhead (smaller requests than the engines'); more blocks or more bytes in flight do not
// raise it (132 to 1056 blocks: 51.2-51.4 GB/s host->device).
//
// Kept free of torch headers: compiled by nvcc alone and linked into the memmgr._pinned extension.
#include "copy_kernels.h"
#include "device_scope.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace {

constexpr int kThreads = 256;
// Vectors each thread loads before it stores any (the launch shape's `unroll`): the link's latency is microseconds,
// so many requests must be in flight to keep ~55 GB/s moving (bytes in flight per block = threads * unroll * vector
// width). 4 held the link on the H200; the H100 read host memory at ~0.55x with it (issue 30), so the 16-byte kernel
// also comes with 8 and 16, and memmgr.copy_shape picks per device by measurement. Narrower vectors (misaligned
// buffers, which memmgr never makes) keep 4.
constexpr int kDefaultUnroll = 4;
// Blocks per multiprocessor when the caller does not say: 256 threads x 4 x 16 B = 16 KiB in flight per SM, ~2 MiB
// per H200, far above the link's bandwidth-delay product. More blocks copy no faster but queue the link deeper, and the
// driver's own traffic waits in that queue: a fresh 150 MiB cudaMalloc beside a host->device kernel copy took ~3 ms at
// 2 blocks per SM and ~1 ms at 1 (0.2 ms beside nothing), so an onload that allocates each bucket while the previous
// one copies fell behind its copies. Fewer than 1 per SM allocate faster still but copy slower right after another
// process's release (47.6 GB/s at 16-66 blocks against 51.1 at 132-264; onload_timeline.py, H200_SESSION6.md).
constexpr int kBlocksPerSm = 1;
constexpr int kMaxDevices = 64;

std::atomic<int> g_sm_count[kMaxDevices];

int sm_count(int device) {
  if (device < 0 || device >= kMaxDevices) return 0;
  int count = g_sm_count[device].load(std::memory_order_relaxed);
  if (count == 0) {
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    g_sm_count[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

using memmgr::DeviceScope;

template <typename V>
__device__ __forceinline__ V load_streaming(const V* p) {
  return __ldcs(p);
}

template <typename V>
__device__ __forceinline__ void store_streaming(V* p, V v) {
  __stcs(p, v);
}

// Copies nbytes from src to dst. Bytes [head, head + nvec * sizeof(V)) move as vectors of type V, which both src
// and dst hold at V-aligned addresses there; the unaligned head (< sizeof(V) bytes) and tail (< sizeof(V) bytes)
// move one byte per thread.
template <typename V, int kUnroll>
__global__ void __launch_bounds__(kThreads) copy_kernel(unsigned char* __restrict__ dst,
                                                        const unsigned char* __restrict__ src, size_t nbytes,
                                                        size_t head, size_t nvec) {
  const size_t tid = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  const size_t body_end = head + nvec * sizeof(V);
  if (tid < head) dst[tid] = src[tid];
  if (tid < nbytes - body_end) dst[body_end + tid] = src[body_end + tid];

  const V* s = reinterpret_cast<const V*>(src + head);
  V* d = reinterpret_cast<V*>(dst + head);
  // Grid-stride: consecutive threads touch consecutive vectors (a warp moves 32 * sizeof(V) contiguous bytes).
  size_t i = tid;
  for (; i + (kUnroll - 1) * stride < nvec; i += kUnroll * stride) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = load_streaming(s + i + u * stride);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) store_streaming(d + i + u * stride, v[u]);
  }
  for (; i < nvec; i += stride) store_streaming(d + i, load_streaming(s + i));
}

template <typename V, int kUnroll = kDefaultUnroll>
cudaError_t launch(unsigned char* dst, const unsigned char* src, size_t nbytes, cudaStream_t stream, int blocks) {
  constexpr size_t w = sizeof(V);
  const size_t misalign = reinterpret_cast<uintptr_t>(src) & (w - 1);
  const size_t head = std::min(nbytes, (w - misalign) & (w - 1));
  const size_t nvec = (nbytes - head) / w;
  // No more blocks than there is work for: one thread per vector per unrolled step, at least one block, which
  // also covers the head and tail bytes (< 2 * 16 threads).
  const size_t per_block = static_cast<size_t>(kThreads) * kUnroll;
  const size_t useful = std::max<size_t>(1, (nvec + per_block - 1) / per_block);
  const unsigned grid = static_cast<unsigned>(std::min<size_t>(static_cast<size_t>(blocks), useful));
  copy_kernel<V, kUnroll><<<grid, kThreads, 0, stream>>>(dst, src, nbytes, head, nvec);
  return cudaGetLastError();
}

// The bulk (TMA) variant, Hopper and later: one thread per block moves whole chunks with cp.async.bulk, global ->
// shared -> global, kBulkStages chunks in flight per block. The vector kernel's host reads are at most 16 bytes per
// thread per request, and on the H100 every launch shape of it stalled at ~0.55x of the link (4 to 32 times the reads
// in flight changed nothing; issue 30): the SMs' requests, not their number, looked to be the limit. The bulk copy unit
// issues its own requests for up to kBulkChunk bytes at a time; whether that lifts the ceiling is what
// memmgr.copy_shape measures (the bulk shapes are candidates beside the vector ones, and a shape whose copy does not
// arrive intact is never chosen).
constexpr int kBulkThreads = 32;  // thread 0 issues; the warp covers the unaligned head and tail bytes
constexpr int kBulkStages = 4;
constexpr size_t kBulkChunk = 24 * 1024;  // 4 x 24 KiB = 96 KiB of shared memory: two blocks fit on an SM
constexpr size_t kBulkSharedBytes = kBulkStages * kBulkChunk;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// Copies nbytes from src to dst: bytes [head, head + body) in chunks of kBulkChunk (body and the addresses there are
// multiples of 16, as cp.async.bulk needs), the rest (< 16 bytes each side) by the warp of block 0.
__global__ void __launch_bounds__(kBulkThreads) bulk_copy_kernel(unsigned char* __restrict__ dst,
                                                                 const unsigned char* __restrict__ src, size_t nbytes,
                                                                 size_t head, size_t body) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) unsigned char stage_bytes[];
  __shared__ __align__(8) uint64_t arrived[kBulkStages];
  const unsigned lane = threadIdx.x;
  if (blockIdx.x == 0) {
    if (lane < head) dst[lane] = src[lane];
    const size_t tail = nbytes - head - body;
    if (lane < tail) dst[head + body + lane] = src[head + body + lane];
  }
  if (lane != 0) return;
  const size_t chunks = (body + kBulkChunk - 1) / kBulkChunk;
  const size_t first = blockIdx.x, step = gridDim.x;
  if (first >= chunks) return;
  const size_t mine = (chunks - first + step - 1) / step;  // this block's chunks: first, first + step, ...
  for (int s = 0; s < kBulkStages; ++s)
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_address(&arrived[s])));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  const size_t base = reinterpret_cast<size_t>(src + head);
  const size_t out = reinterpret_cast<size_t>(dst + head);

  auto load = [&](size_t k) {  // this block's k-th chunk into stage k % kBulkStages
    const size_t offset = (first + k * step) * kBulkChunk;
    const uint32_t bytes = static_cast<uint32_t>(min(kBulkChunk, body - offset));
    const int s = static_cast<int>(k % kBulkStages);
    const uint32_t bar = shared_address(&arrived[s]);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
            shared_address(stage_bytes + s * kBulkChunk)),
        "l"(base + offset), "r"(bytes), "r"(bar)
        : "memory");
  };
  for (size_t k = 0; k < mine && k < kBulkStages; ++k) load(k);
  for (size_t k = 0; k < mine; ++k) {
    const int s = static_cast<int>(k % kBulkStages);
    const uint32_t parity = static_cast<uint32_t>((k / kBulkStages) & 1);
    asm volatile(
        "{\n .reg .pred done;\n WAIT_ARRIVED:\n"
        " mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n @!done bra WAIT_ARRIVED;\n}" ::"r"(
            shared_address(&arrived[s])),
        "r"(parity)
        : "memory");
    // the chunk was written by the bulk copy unit and is read by it again: order this thread's view for it
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    const size_t offset = (first + k * step) * kBulkChunk;
    const uint32_t bytes = static_cast<uint32_t>(min(kBulkChunk, body - offset));
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(out + offset),
                 "r"(shared_address(stage_bytes + s * kBulkChunk)), "r"(bytes)
                 : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    if (k + kBulkStages < mine) {
      // the stage is loaded again only once this store has read it; the other stages' loads stay in flight
      asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
      load(k + kBulkStages);
    }
  }
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");  // every store done before the kernel ends
#else
  __trap();  // compiled for an architecture without bulk copies: never launched there (probe_bulk_support)
#endif
}

// Whether dst and src share their addresses' low 4 bits: a common 16-byte grid, which the bulk copies need.
bool share_16_byte_grid(const void* dst, const void* src) {
  return ((reinterpret_cast<uintptr_t>(dst) ^ reinterpret_cast<uintptr_t>(src)) & 15) == 0;
}

cudaError_t launch_bulk(unsigned char* dst, const unsigned char* src, size_t nbytes, cudaStream_t stream, int blocks) {
  if (!share_16_byte_grid(dst, src)) return cudaErrorMisalignedAddress;
  const size_t misalign = reinterpret_cast<uintptr_t>(src) & 15;
  const size_t head = std::min(nbytes, (16 - misalign) & 15);
  const size_t body = (nbytes - head) & ~static_cast<size_t>(15);
  const size_t chunks = std::max<size_t>(1, (body + kBulkChunk - 1) / kBulkChunk);
  const unsigned grid = static_cast<unsigned>(std::min<size_t>(static_cast<size_t>(blocks), chunks));
  bulk_copy_kernel<<<grid, kBulkThreads, kBulkSharedBytes, stream>>>(dst, src, nbytes, head, body);
  return cudaGetLastError();
}

cudaError_t probe_bulk_support(int device, bool* supported) {
  int major = 0;
  cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess || major < 9) return err;
  cudaFuncAttributes attrs;
  if ((err = cudaFuncGetAttributes(&attrs, bulk_copy_kernel)) != cudaSuccess) return err;
  // The virtual architecture the loaded code was compiled from: a build without sm_90 carries compute_80 PTX, whose
  // body below is empty, and which the driver would JIT for this device (binaryVersion then says 90).
  if (attrs.ptxVersion < 90 || attrs.binaryVersion < 90) return cudaSuccess;
  err = cudaFuncSetAttribute(bulk_copy_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(kBulkSharedBytes));
  *supported = err == cudaSuccess;
  return err;
}

// Per device: 0 not yet known, 1 runs the bulk kernel (its shared-memory limit raised), 2 does not.
std::atomic<int> g_bulk_state[kMaxDevices];

// Whether the bulk kernel runs on `device`, the current device: compute capability 9.0 or later and code of it built
// from compute_90 or later (probe_bulk_support). Probed at the first call per device.
cudaError_t bulk_supported_on_current_device(int device, bool* supported) {
  *supported = false;
  if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
  const int known = g_bulk_state[device].load(std::memory_order_acquire);
  if (known != 0) {
    *supported = known == 1;
    return cudaSuccess;
  }
  cudaError_t err = probe_bulk_support(device, supported);
  if (err == cudaSuccess) g_bulk_state[device].store(*supported ? 1 : 2, std::memory_order_release);
  return err;
}

}  // namespace

extern "C" int memmgr_copy_kernel_threads() { return kThreads; }

extern "C" int memmgr_copy_kernel_default_blocks(int device) {
  const int sms = sm_count(device);
  return std::max(1, sms) * kBlocksPerSm;
}

extern "C" cudaError_t memmgr_prepare_copy_kernels(int device) {
  DeviceScope scope(device);
  cudaError_t err = scope.error();
  if (err != cudaSuccess) return err;
  // Looking a kernel up loads it into the context now. Under lazy module loading the first launch would load it,
  // and loading may wait for the whole device: a copy issued behind a long kernel would block the caller.
  cudaFuncAttributes attrs;
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attrs, copy_kernel<uint4, 4>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attrs, copy_kernel<uint4, 8>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attrs, copy_kernel<uint4, 16>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attrs, copy_kernel<uint2, kDefaultUnroll>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attrs, copy_kernel<unsigned int, kDefaultUnroll>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attrs, copy_kernel<unsigned short, kDefaultUnroll>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attrs, copy_kernel<unsigned char, kDefaultUnroll>);
  if (err == cudaSuccess && sm_count(device) == 0) err = cudaErrorInvalidDevice;
  bool bulk = false;  // loads the bulk variant too where the device runs it
  if (err == cudaSuccess && bulk_supported_on_current_device(device, &bulk) != cudaSuccess) cudaGetLastError();
  return err;
}

extern "C" int memmgr_copy_kernel_unroll_supported(int unroll) { return unroll == 4 || unroll == 8 || unroll == 16; }

extern "C" cudaError_t memmgr_launch_copy_kernel(void* dst, const void* src, size_t nbytes, cudaStream_t stream,
                                                 int device, int blocks, int unroll) {
  if (unroll <= 0) unroll = kDefaultUnroll;
  if (!memmgr_copy_kernel_unroll_supported(unroll)) return cudaErrorInvalidValue;
  if (nbytes == 0) return cudaSuccess;
  DeviceScope scope(device);
  cudaError_t err = scope.error();
  if (err != cudaSuccess) return err;
  if (blocks <= 0) blocks = memmgr_copy_kernel_default_blocks(device);
  auto* d = static_cast<unsigned char*>(dst);
  const auto* s = static_cast<const unsigned char*>(src);
  // The widest vector that src and dst share an alignment for; a 16-byte one in every bucket memmgr makes (device
  // buffers and host buffers are both at least 512-byte aligned and split points are 4 KiB multiples).
  const uintptr_t relative = reinterpret_cast<uintptr_t>(d) ^ reinterpret_cast<uintptr_t>(s);
  if ((relative & 15) == 0) {
    err = unroll == 16 ? launch<uint4, 16>(d, s, nbytes, stream, blocks)
        : unroll == 8  ? launch<uint4, 8>(d, s, nbytes, stream, blocks)
                       : launch<uint4, 4>(d, s, nbytes, stream, blocks);
  } else if ((relative & 7) == 0) {
    err = launch<uint2>(d, s, nbytes, stream, blocks);
  } else if ((relative & 3) == 0) {
    err = launch<unsigned int>(d, s, nbytes, stream, blocks);
  } else if ((relative & 1) == 0) {
    err = launch<unsigned short>(d, s, nbytes, stream, blocks);
  } else {
    err = launch<unsigned char>(d, s, nbytes, stream, blocks);
  }
  return err;
}

extern "C" int memmgr_bulk_copy_supported(int device) {
  DeviceScope scope(device);
  bool supported = false;
  if (scope.error() != cudaSuccess || bulk_supported_on_current_device(device, &supported) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return supported ? 1 : 0;
}

extern "C" cudaError_t memmgr_launch_bulk_copy_kernel(void* dst, const void* src, size_t nbytes, cudaStream_t stream,
                                                      int device, int blocks) {
  if (nbytes == 0) return cudaSuccess;
  // Buffers without a common 16-byte grid go to the vector kernel's narrower vectors.
  if (!share_16_byte_grid(dst, src)) return memmgr_launch_copy_kernel(dst, src, nbytes, stream, device, blocks, 0);
  DeviceScope scope(device);
  cudaError_t err = scope.error();
  if (err != cudaSuccess) return err;
  bool supported = false;
  err = bulk_supported_on_current_device(device, &supported);
  if (err == cudaSuccess && !supported) err = cudaErrorInvalidDeviceFunction;
  if (err != cudaSuccess) return err;
  if (blocks <= 0) blocks = memmgr_copy_kernel_default_blocks(device);
  return launch_bulk(static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), nbytes, stream, blocks);
}
