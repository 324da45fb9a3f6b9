// Paged optimizer state: CUDA unified (managed) memory handed to torch as
// DLPack tensors, prefetched to the device before a parameter group's update
// and optionally back to the host after it (qpeft/optim/paging.py drives this).
//
// Why managed memory: when the GPU runs short, the driver evicts managed pages
// to host RAM instead of failing an allocation, and a prefetch brings them back
// in bulk before the update kernels touch them (one migration per range instead
// of a page fault per 64 KB). Everything here is asynchronous on the caller's
// stream: no cudaDeviceSynchronize (the only implicit synchronization is the
// cudaFree of the deleter, when the optimizer state is destroyed).
//
// Not executed on the development machine (no GPU); compiled for every listed
// architecture in CI. Host code only: no kernels in this file.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "ops.h"
#include "qpeft/dlpack.h"
#include "qpeft/host_checks.h"

namespace qpeft {
namespace cuda {
namespace {

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so later calls start clean
    throw std::runtime_error(std::string("qpeft: ") + what + " failed: " + cudaGetErrorString(err));
  }
}

#if CUDART_VERSION >= 13000
// CUDA 13 takes a cudaMemLocation where CUDA 12 took a device ordinal.
cudaMemLocation location_of(int device) {
  cudaMemLocation loc{};
  if (device < 0) {
    loc.type = cudaMemLocationTypeHost;
    loc.id = 0;  // ignored for the host
  } else {
    loc.type = cudaMemLocationTypeDevice;
    loc.id = device;
  }
  return loc;
}
#endif

cudaError_t prefetch_async(const void* p, size_t bytes, int device, cudaStream_t stream) {
#if CUDART_VERSION >= 13000
  return cudaMemPrefetchAsync(p, bytes, location_of(device), 0, stream);
#else
  return cudaMemPrefetchAsync(p, bytes, device < 0 ? cudaCpuDeviceId : device, stream);
#endif
}

cudaError_t advise_accessed_by(const void* p, size_t bytes, int device) {
#if CUDART_VERSION >= 13000
  return cudaMemAdvise(p, bytes, cudaMemAdviseSetAccessedBy, location_of(device));
#else
  return cudaMemAdvise(p, bytes, cudaMemAdviseSetAccessedBy, device);
#endif
}

void free_managed(void* p) {
  cudaFree(p);
}  // deleter: no exception may escape

}  // namespace

dlpack::ManagedTensor* managed_dlpack(std::int64_t numel, int dl_code, int bits, int device) {
  const char* fn = "managed_dlpack";
  const bool ok = (dl_code == dlpack::kFloat && (bits == 16 || bits == 32)) ||
                  (dl_code == dlpack::kUInt && bits == 8) ||
                  (dl_code == dlpack::kBfloat && bits == 16);
  if (!ok) {
    host::fail(fn, "unsupported DLPack dtype code " + std::to_string(dl_code) + " with " +
                       std::to_string(bits) + " bits");
  }
  host::check_nonneg(fn, "device", device);
  // Checked: a wrapped numel * elem_size would allocate a small buffer for a large tensor.
  const size_t bytes = host::checked_bytes(fn, "numel", numel, bits / 8);
  void* p = nullptr;
  // cudaMemAttachGlobal: any stream on any device may access it (the update runs
  // on torch's current stream, which the caller does not pin at allocation).
  check_cuda(cudaMallocManaged(&p, bytes == 0 ? 1 : bytes, cudaMemAttachGlobal),
             "cudaMallocManaged");
  // Keep the GPU's mapping while pages sit in host RAM: an access from the device
  // then reads them over the interconnect instead of faulting (the prefetch before
  // each update still migrates them in bulk). Only a hint: ignored where the
  // device lacks concurrent managed access, so a failure is not an error.
  if (advise_accessed_by(p, bytes == 0 ? 1 : bytes, device) != cudaSuccess) cudaGetLastError();
  try {
    return dlpack::make_buffer(
        p, numel, dlpack::DataType{static_cast<uint8_t>(dl_code), static_cast<uint8_t>(bits), 1},
        dlpack::Device{dlpack::kCUDA, device}, free_managed);
  } catch (...) {
    cudaFree(p);
    throw;
  }
}

void prefetch(std::uintptr_t ptr, std::int64_t nbytes, int device, std::uintptr_t stream) {
  host::check_nonneg("prefetch", "nbytes", nbytes);
  if (nbytes == 0) return;
  host::check_ptr("prefetch", "ptr", ptr);
  check_cuda(prefetch_async(reinterpret_cast<const void*>(ptr), static_cast<size_t>(nbytes), device,
                            reinterpret_cast<cudaStream_t>(stream)),
             "cudaMemPrefetchAsync");
}

int prefetch_location(std::uintptr_t ptr, std::int64_t nbytes) {
  host::check_positive("prefetch_location", "nbytes", nbytes);
  host::check_ptr("prefetch_location", "ptr", ptr);
  int loc = cudaInvalidDeviceId;
  check_cuda(
      cudaMemRangeGetAttribute(&loc, sizeof(loc), cudaMemRangeAttributeLastPrefetchLocation,
                               reinterpret_cast<const void*>(ptr), static_cast<size_t>(nbytes)),
      "cudaMemRangeGetAttribute");
  return loc;  // a device ordinal, cudaCpuDeviceId (-1) or cudaInvalidDeviceId (-2: none / mixed)
}

bool concurrent_managed_access(int device) {
  int v = 0;
  check_cuda(cudaDeviceGetAttribute(&v, cudaDevAttrConcurrentManagedAccess, device),
             "cudaDeviceGetAttribute");
  return v != 0;
}

}  // namespace cuda
}  // namespace qpeft
